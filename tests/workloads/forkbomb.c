/*
 * Workload: a fork bomb that is bounded for safety, for the remediation tests.
 *
 * usage: forkbomb --counter FILE [--cgroup DIR]... [--seconds S] [--root-interval-us N]
 *                 [--member-interval-us N] [--member-delay-ms N] [--members-start-after N] [--comm NAME]
 *
 * The launcher process moves itself into every --cgroup given (the test's v1
 * pids cgroup, whose pids.max is the real bound, and a v2 scratch cgroup),
 * becomes a child subreaper, forks the bomb's root and reaps until nothing is
 * left. The root forks a member every --root-interval-us; every member waits
 * --member-delay-ms, and until the root has made --members-start-after forks
 * (so the whole bomb takes off together once the root's storm is under way),
 * then forks its own members every --member-interval-us (0: members never
 * fork). A fork refused by pids.max is retried at the next interval. Every
 * process exits by itself at --seconds, so the bomb ends even if nothing
 * stops it.
 *
 * Each process, as its first act, takes the next slot of the shared counter
 * file and writes its start time (CLOCK_MONOTONIC ns) there. The file holds
 * u64s: [0] processes that ran, [1] fork attempts pids.max refused, [2] fork
 * calls the root made; from HEADER_SLOTS on, three arrays of MAX_TRACKED: the
 * start times in order, then, indexed by the root's fork call, the time the
 * root called fork() and the time that child first ran (0: it never did).
 * A child killed before it ever runs takes no slot and leaves its mark at 0.
 * At the end the launcher prints one JSON line:
 * {"launcher": pid, "root": pid, "spawned": n, "fork_refused": n}.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_CGROUPS 4
#define HEADER_SLOTS 8
#define MAX_TRACKED (1 << 15)
#define STARTS HEADER_SLOTS
#define CALLED (STARTS + MAX_TRACKED)
#define RAN (CALLED + MAX_TRACKED)
#define MAX_SLOTS (RAN + MAX_TRACKED)

static volatile uint64_t *counter;
static uint64_t deadline_ns, root_interval_ns, member_interval_ns, member_delay_ns, members_start_after;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void sleep_until(uint64_t t)
{
	uint64_t now = now_ns();
	struct timespec ts;

	if (t <= now)
		return;
	ts.tv_sec = (t - now) / 1000000000ULL;
	ts.tv_nsec = (t - now) % 1000000000ULL;
	nanosleep(&ts, NULL);
}

static void record_start(void)
{
	uint64_t slot = __atomic_fetch_add(&counter[0], 1, __ATOMIC_SEQ_CST);

	if (slot < MAX_TRACKED)
		counter[STARTS + slot] = now_ns();
}

/* Fork every `interval` until the deadline; children run member(). */
static void forker(uint64_t interval, int reap) __attribute__((noreturn));

static void member(uint64_t call) __attribute__((noreturn));

/* call: the index of the root's fork() that made this process, or MAX_TRACKED. */
static void member(uint64_t call)
{
	if (call < MAX_TRACKED)
		counter[RAN + call] = now_ns();
	record_start();
	if (member_interval_ns == 0) {
		sleep_until(deadline_ns);
		_exit(0);
	}
	sleep_until(now_ns() + member_delay_ns);
	while (__atomic_load_n(&counter[2], __ATOMIC_SEQ_CST) <= members_start_after && now_ns() < deadline_ns)
		sleep_until(now_ns() + 1000000ULL);
	forker(member_interval_ns, 0);
}

static void forker(uint64_t interval, int reap)
{
	uint64_t next = now_ns();

	while (now_ns() < deadline_ns) {
		uint64_t call = MAX_TRACKED;
		pid_t pid;

		if (reap) { /* the root: note when it called fork(), per call */
			call = __atomic_fetch_add(&counter[2], 1, __ATOMIC_SEQ_CST);
			if (call < MAX_TRACKED)
				counter[CALLED + call] = now_ns();
		}
		pid = fork();
		if (pid == 0)
			member(call);
		if (pid < 0)
			__atomic_fetch_add(&counter[1], 1, __ATOMIC_SEQ_CST);
		if (reap)
			while (waitpid(-1, NULL, WNOHANG) > 0)
				;
		next += interval;
		sleep_until(next < deadline_ns ? next : deadline_ns);
	}
	_exit(0);
}

static void join_cgroup(const char *dir)
{
	char path[4096], pid[32];
	int fd, n;

	snprintf(path, sizeof(path), "%s/cgroup.procs", dir);
	fd = open(path, O_WRONLY);
	n = snprintf(pid, sizeof(pid), "%d", getpid());
	if (fd < 0 || write(fd, pid, n) != n) {
		fprintf(stderr, "forkbomb: cannot join cgroup %s: %s\n", dir, strerror(errno));
		exit(2);
	}
	close(fd);
}

int main(int argc, char **argv)
{
	const char *cgroups[MAX_CGROUPS], *counter_path = NULL, *comm = "ks-forkbomb";
	double seconds = 5;
	uint64_t start;
	int ncg = 0, fd, i;
	pid_t root;

	root_interval_ns = 5000000ULL;
	member_interval_ns = 0;
	member_delay_ns = 0;
	for (i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--cgroup") && ncg < MAX_CGROUPS)
			cgroups[ncg++] = argv[i + 1];
		else if (!strcmp(argv[i], "--counter"))
			counter_path = argv[i + 1];
		else if (!strcmp(argv[i], "--seconds"))
			seconds = atof(argv[i + 1]);
		else if (!strcmp(argv[i], "--root-interval-us"))
			root_interval_ns = strtoull(argv[i + 1], NULL, 10) * 1000ULL;
		else if (!strcmp(argv[i], "--member-interval-us"))
			member_interval_ns = strtoull(argv[i + 1], NULL, 10) * 1000ULL;
		else if (!strcmp(argv[i], "--member-delay-ms"))
			member_delay_ns = strtoull(argv[i + 1], NULL, 10) * 1000000ULL;
		else if (!strcmp(argv[i], "--members-start-after"))
			members_start_after = strtoull(argv[i + 1], NULL, 10);
		else if (!strcmp(argv[i], "--comm"))
			comm = argv[i + 1];
		else {
			fprintf(stderr, "forkbomb: unknown argument %s\n", argv[i]);
			return 2;
		}
	}
	if (!counter_path || root_interval_ns == 0 || seconds <= 0 || seconds > 60) {
		fprintf(stderr, "forkbomb: need --counter FILE, a root interval > 0 and 0 < seconds <= 60\n");
		return 2;
	}
	fd = open(counter_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || ftruncate(fd, MAX_SLOTS * sizeof(uint64_t)) < 0) {
		perror("forkbomb: counter file");
		return 2;
	}
	counter = mmap(NULL, MAX_SLOTS * sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (counter == MAP_FAILED) {
		perror("forkbomb: mmap");
		return 2;
	}
	close(fd);
	for (i = 0; i < ncg; i++)
		join_cgroup(cgroups[i]);
	/* Orphans of killed members come here and are reaped, not left to init. */
	prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
	start = now_ns();
	deadline_ns = start + (uint64_t)(seconds * 1e9);

	root = fork();
	if (root < 0) {
		perror("forkbomb: fork");
		return 2;
	}
	if (root == 0) {
		prctl(PR_SET_NAME, comm, 0, 0, 0);
		/* The root keeps its tree together: orphans of members stay in it. */
		prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
		record_start();
		forker(root_interval_ns, 1);
	}
	prctl(PR_SET_NAME, "ks-bomb-launch", 0, 0, 0);
	while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
		;
	printf("{\"launcher\": %d, \"root\": %d, \"spawned\": %llu, \"fork_refused\": %llu, \"elapsed_s\": %.3f}\n",
	       getpid(), root, (unsigned long long)counter[0], (unsigned long long)counter[1],
	       (now_ns() - start) / 1e9);
	return 0;
}
