/*
 * Workload: a program that ends in one chosen way, for the crash loop tests.
 * Built by the test: gcc -O1 -pthread crash_worker.c -o ks-worker
 *
 *   ks-worker exit N          exit(N): glibc's exit_group(N)
 *   ks-worker sys-exit N      the raw exit(N) syscall of the only thread
 *   ks-worker thread-exit N   a second thread calls exit(N) while main waits
 *   ks-worker leader-first N  main leaves with the raw exit(0), then the last
 *                             thread with exit(N): wait() reports the leader's 0
 *   ks-worker segv            a NULL write: killed by SIGSEGV
 *   ks-worker thread-segv     a second thread does the NULL write
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int code;

static void crash(void)
{
	volatile int *volatile nowhere = NULL;

	*nowhere = 1;
}

static void *exit_group_thread(void *arg)
{
	(void)arg;
	exit(code);
}

static void *segv_thread(void *arg)
{
	(void)arg;
	crash();
	return NULL;
}

static void *last_thread(void *arg)
{
	(void)arg;
	usleep(20000); /* let main's thread exit first */
	syscall(SYS_exit, code);
	return NULL;
}

static void in_thread(void *(*fn)(void *))
{
	pthread_t t;

	if (pthread_create(&t, NULL, fn, NULL))
		exit(99);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "exit";

	code = argc > 2 ? atoi(argv[2]) : 1;
	if (!strcmp(mode, "exit"))
		exit(code);
	if (!strcmp(mode, "sys-exit"))
		syscall(SYS_exit, code);
	if (!strcmp(mode, "thread-exit")) {
		in_thread(exit_group_thread);
		pause();
	}
	if (!strcmp(mode, "leader-first")) {
		in_thread(last_thread);
		syscall(SYS_exit, 0);
	}
	if (!strcmp(mode, "segv"))
		crash();
	if (!strcmp(mode, "thread-segv")) {
		in_thread(segv_thread);
		pause();
	}
	fprintf(stderr, "ks-worker: unknown mode %s\n", mode);
	return 98;
}
