/*
 * Workload: one thread that burns CPU in a function with a known name.
 *
 * usage: hot [--seconds S] [--duty PERCENT]
 *
 * Busy for PERCENT of every 100 ms (default 100: all the time) and asleep for
 * the rest, for S seconds (default 20), then prints one JSON line:
 * {"pid": ..., "ppid": ..., "cpu_s": ..., "elapsed_s": ...}.
 * The tests build it with gcc -O1 -fno-omit-frame-pointer -g so the kernel can
 * walk its user stack. handle_batch is a leaf that needs no frame, and gcc gives
 * it none even so: its samples show handle_batch <- main (run is skipped).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PERIOD_NS 100000000LL

static volatile unsigned long sink;

static long long now_ns(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The hot function the alert must name: a few tens of microseconds of arithmetic. */
__attribute__((noinline)) void handle_batch(unsigned long seed)
{
	unsigned long x = seed;

	for (int i = 0; i < 20000; i++)
		x = x * 6364136223846793005UL + 1442695040888963407UL;
	sink = x;
}

__attribute__((noinline)) void run(double seconds, int duty)
{
	long long start = now_ns(CLOCK_MONOTONIC);
	long long end = start + (long long)(seconds * 1e9);
	long long busy = PERIOD_NS * duty / 100;
	unsigned long seed = 1;

	for (long long period = start; period < end; period += PERIOD_NS) {
		while (now_ns(CLOCK_MONOTONIC) < period + busy)
			handle_batch(seed++);
		long long wake = period + PERIOD_NS;
		long long left = wake - now_ns(CLOCK_MONOTONIC);
		if (duty < 100 && left > 0) {
			struct timespec ts = { left / 1000000000LL, left % 1000000000LL };
			nanosleep(&ts, NULL);
		}
	}
}

int main(int argc, char **argv)
{
	double seconds = 20;
	int duty = 100;

	for (int i = 1; i + 1 < argc; i += 2) {
		if (strcmp(argv[i], "--seconds") == 0)
			seconds = atof(argv[i + 1]);
		else if (strcmp(argv[i], "--duty") == 0)
			duty = atoi(argv[i + 1]);
		else {
			fprintf(stderr, "usage: %s [--seconds S] [--duty PERCENT]\n", argv[0]);
			return 2;
		}
	}
	if (seconds <= 0 || duty < 1 || duty > 100) {
		fprintf(stderr, "%s: --seconds must be > 0 and --duty within 1..100\n", argv[0]);
		return 2;
	}
	long long t0 = now_ns(CLOCK_MONOTONIC);
	run(seconds, duty);
	printf("{\"pid\": %d, \"ppid\": %d, \"cpu_s\": %.3f, \"elapsed_s\": %.3f}\n", getpid(), getppid(),
	       now_ns(CLOCK_PROCESS_CPUTIME_ID) / 1e9, (now_ns(CLOCK_MONOTONIC) - t0) / 1e9);
	return 0;
}
