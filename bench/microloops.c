/*
 * microloops MODE N: the per-sensor micro-workloads of bench/sensor_bench.py.
 *
 * Each mode repeats one operation N times, as fast as it can, the operation a
 * ksift sensor hooks:
 *   getpid    the cheapest syscall: the tax a syscall tracepoint puts on every
 *             syscall of the host (fd_burst attaches one)
 *   open      openat("/dev/null") + close (fd_burst)
 *   connect   TCP connect to a listener on 127.0.0.1 + accept + close both
 *             (connect_storm; slow_request's socket-state hook)
 *   request   one request/response round trip on an accepted loopback TCP
 *             connection: the client writes 64 bytes, the server reads them and
 *             writes 64 back (slow_request)
 *   forkexec  fork + execve("/bin/true") + waitpid (exec_churn, crash_loop)
 *   fault     touch a fresh anonymous page, 64 MiB at a time then munmap
 *             (memory_growth's rss_stat hook; one op = one page fault)
 *   spin      a short arithmetic loop, no syscalls (cpu_hog's sampling)
 *
 * Prints one JSON object: mode, n, elapsed_s, ns_per_op, cpu_self_s,
 * cpu_children_s (getrusage user+system). Exit 0 ok, 1 an operation failed,
 * 2 bad arguments.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_S 1000000000LL
#define MSG 64

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

static double cpu_s(int who)
{
	struct rusage ru;

	getrusage(who, &ru);
	return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void die(const char *what)
{
	fprintf(stderr, "microloops: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* A listening socket on 127.0.0.1 with a kernel-chosen port. */
static int listener(struct sockaddr_in *addr)
{
	socklen_t len = sizeof(*addr);
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		die("socket");
	memset(addr, 0, sizeof(*addr));
	addr->sin_family = AF_INET;
	addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(fd, (struct sockaddr *)addr, sizeof(*addr)) || listen(fd, 1024) ||
	    getsockname(fd, (struct sockaddr *)addr, &len))
		die("listen");
	return fd;
}

static void loop_getpid(long n)
{
	for (long i = 0; i < n; i++)
		syscall(SYS_getpid);
}

static void loop_open(long n)
{
	for (long i = 0; i < n; i++) {
		int fd = openat(AT_FDCWD, "/dev/null", O_RDONLY);

		if (fd < 0)
			die("openat");
		close(fd);
	}
}

static void loop_connect(long n)
{
	struct sockaddr_in addr;
	int lfd = listener(&addr);

	for (long i = 0; i < n; i++) {
		int c = socket(AF_INET, SOCK_STREAM, 0), s;

		if (c < 0 || connect(c, (struct sockaddr *)&addr, sizeof(addr)))
			die("connect");
		s = accept(lfd, NULL, NULL);
		if (s < 0)
			die("accept");
		/* The client closes first: its TIME_WAIT is the usual client-side cost. */
		close(c);
		close(s);
	}
	close(lfd);
}

static int full_io(int fd, char *buf, int out)
{
	int done = 0;

	while (done < MSG) {
		ssize_t r = out ? write(fd, buf + done, MSG - done) : read(fd, buf + done, MSG - done);

		if (r <= 0)
			return -1;
		done += r;
	}
	return 0;
}

static void *serve(void *arg)
{
	int fd = *(int *)arg;
	char buf[MSG];

	while (full_io(fd, buf, 0) == 0)
		if (full_io(fd, buf, 1))
			break;
	close(fd);
	return NULL;
}

static void loop_request(long n)
{
	struct sockaddr_in addr;
	int lfd = listener(&addr), c = socket(AF_INET, SOCK_STREAM, 0), s, one = 1;
	char buf[MSG];
	pthread_t server;

	if (c < 0 || connect(c, (struct sockaddr *)&addr, sizeof(addr)))
		die("connect");
	s = accept(lfd, NULL, NULL);
	if (s < 0)
		die("accept");
	setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (pthread_create(&server, NULL, serve, &s))
		die("pthread_create");
	memset(buf, 'x', sizeof(buf));
	memcpy(buf, "GET /bench HTTP/1.1\r\n", 21);
	for (long i = 0; i < n; i++)
		if (full_io(c, buf, 1) || full_io(c, buf, 0))
			die("request");
	shutdown(c, SHUT_WR);
	pthread_join(server, NULL);
	close(c);
	close(lfd);
}

static void loop_forkexec(long n)
{
	for (long i = 0; i < n; i++) {
		pid_t pid = fork();
		int status;

		if (pid < 0)
			die("fork");
		if (pid == 0) {
			execl("/bin/true", "true", (char *)NULL);
			_exit(127);
		}
		if (waitpid(pid, &status, 0) < 0)
			die("waitpid");
	}
}

static void loop_fault(long n)
{
	const long page = sysconf(_SC_PAGESIZE), chunk = (64L << 20) / page;

	for (long done = 0; done < n; done += chunk) {
		long pages = n - done < chunk ? n - done : chunk;
		char *p = mmap(NULL, pages * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (p == MAP_FAILED)
			die("mmap");
		for (long i = 0; i < pages; i++)
			p[i * page] = 1;
		munmap(p, pages * page);
	}
}

static void loop_spin(long n)
{
	volatile unsigned long x = 1;

	for (long i = 0; i < n; i++)
		for (int j = 0; j < 100; j++)
			x = x * 6364136223846793005UL + 1442695040888963407UL;
}

static const struct {
	const char *name;
	void (*run)(long n);
} modes[] = {
	{"getpid", loop_getpid}, {"open", loop_open}, {"connect", loop_connect}, {"request", loop_request},
	{"forkexec", loop_forkexec}, {"fault", loop_fault}, {"spin", loop_spin},
};

int main(int argc, char **argv)
{
	long long t0, t1;
	long n;

	if (argc != 3 || (n = strtol(argv[2], NULL, 10)) <= 0) {
		fprintf(stderr, "usage: microloops MODE N (MODE: getpid open connect request forkexec fault spin)\n");
		return 2;
	}
	for (size_t m = 0; m < sizeof(modes) / sizeof(modes[0]); m++) {
		if (strcmp(argv[1], modes[m].name))
			continue;
		t0 = now_ns();
		modes[m].run(n);
		t1 = now_ns();
		printf("{\"mode\": \"%s\", \"n\": %ld, \"elapsed_s\": %.6f, \"ns_per_op\": %.1f, "
		       "\"cpu_self_s\": %.6f, \"cpu_children_s\": %.6f}\n",
		       argv[1], n, (t1 - t0) / 1e9, (double)(t1 - t0) / n, cpu_s(RUSAGE_SELF),
		       cpu_s(RUSAGE_CHILDREN));
		return 0;
	}
	fprintf(stderr, "microloops: unknown mode %s\n", argv[1]);
	return 2;
}
