/*
 * forkloop N [RATE]: the workload of ksift's benchmark (bench/run_bench.py).
 *
 * N iterations of fork() + child _exit(0) + waitpid(), either as fast as
 * possible (RATE 0 or absent) or paced to RATE forks per second against
 * absolute CLOCK_MONOTONIC deadlines (clock_nanosleep TIMER_ABSTIME), so a
 * late iteration does not shift the ones after it.
 *
 * Prints one JSON object on stdout:
 *   n, rate, elapsed_s, ns_per_fork, achieved_rate, late (paced mode: how many
 *   iterations started after their deadline had passed by a whole period),
 *   cpu_self_s / cpu_children_s (getrusage: the parent's and the reaped
 *   children's user+system CPU time).
 * Exit status: 0 ok, 1 a fork or waitpid failed, 2 bad arguments.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_S 1000000000LL

static long long ts_ns(const struct timespec *ts)
{
	return (long long)ts->tv_sec * NS_PER_S + ts->tv_nsec;
}

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts_ns(&ts);
}

static double tv_s(const struct timeval *tv)
{
	return tv->tv_sec + tv->tv_usec / 1e6;
}

static int parse_count(const char *s, long long *out)
{
	char *end;

	errno = 0;
	*out = strtoll(s, &end, 10);
	return errno || end == s || *end || *out < 0 ? -1 : 0;
}

int main(int argc, char **argv)
{
	long long n, rate = 0, period = 0, late = 0, start, elapsed;
	struct rusage self, children;

	if (argc < 2 || argc > 3 || parse_count(argv[1], &n) || n == 0 ||
	    (argc == 3 && (parse_count(argv[2], &rate) || rate > NS_PER_S))) {
		fprintf(stderr, "usage: forkloop N [RATE]  (N > 0 forks; RATE forks/s, 0 = as fast as possible)\n");
		return 2;
	}
	if (rate > 0)
		period = NS_PER_S / rate;

	start = now_ns();
	for (long long i = 0; i < n; i++) {
		if (period) {
			long long deadline = start + i * period;
			struct timespec ts = { deadline / NS_PER_S, deadline % NS_PER_S };

			if (now_ns() - deadline >= period)
				late++;
			while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
				;
		}
		pid_t pid = fork();
		if (pid < 0) {
			perror("forkloop: fork");
			return 1;
		}
		if (pid == 0)
			_exit(0);
		while (waitpid(pid, NULL, 0) < 0) {
			if (errno != EINTR) {
				perror("forkloop: waitpid");
				return 1;
			}
		}
	}
	elapsed = now_ns() - start;

	getrusage(RUSAGE_SELF, &self);
	getrusage(RUSAGE_CHILDREN, &children);
	printf("{\"n\": %lld, \"rate\": %lld, \"elapsed_s\": %.6f, \"ns_per_fork\": %.1f, "
	       "\"achieved_rate\": %.1f, \"late\": %lld, \"cpu_self_s\": %.6f, \"cpu_children_s\": %.6f}\n",
	       n, rate, elapsed / 1e9, (double)elapsed / n, n * 1e9 / elapsed, late,
	       tv_s(&self.ru_utime) + tv_s(&self.ru_stime),
	       tv_s(&children.ru_utime) + tv_s(&children.ru_stime));
	return 0;
}
