// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * CPU sensor: samples every CPU with perf cpu-clock at a low rate, counts the
 * samples of each process (tgid) per window in the kernel and ships only the
 * processes that go over the share of a core the rule allows. While a process
 * is over it, its user and kernel stacks are counted so the alert can name
 * where the time goes.
 *
 * Hooks: perf_event (cpu-clock, one event per online CPU, opened by the loader),
 * tp_btf/sched_process_exit (final totals of flagged processes, map cleanup).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "cpu.h"
#include "common.bpf.h"

#define KSIFT_EFAULT 14 /* bpf_get_stackid: no stack of that kind here */
#define KSIFT_EEXIST 17 /* bpf_get_stackid: the stack's hash slot holds another stack */

/* Set from the rule between open and load (see sensors/cpu.py): samples per
 * window above which a process is hot (share of a core * sample rate * window). */
const volatile __u32 cpu_threshold = 44;
const volatile __u64 cpu_window_ns = 1000000000ULL;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* tgid */
	__type(value, struct ksift_cpu_state);
} ks_cpu_state SEC(".maps");

/* Stacks of hot processes; user space reads and deletes the ids it drained. */
struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 2048);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, KSIFT_CPU_STACK_DEPTH * sizeof(__u64));
} ks_cpu_stacks SEC(".maps");

/* Samples per (tgid, user stack, kernel stack) of hot processes; drained by
 * user space with each batch of crossings. Full means counted, not grown. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ksift_cpu_stack_key);
	__type(value, __u64);
} ks_cpu_stack_counts SEC(".maps");

static __always_inline void count_stack_error(long id)
{
	if (id == -KSIFT_EEXIST)
		count(KSIFT_CNT_CPU_STACK_COLLISIONS);
	else if (id < 0 && id != -KSIFT_EFAULT)
		count(KSIFT_CNT_CPU_STACK_ERRORS);
}

static __always_inline void count_stack(struct bpf_perf_event_data *ctx, __u32 tgid)
{
	struct ksift_cpu_stack_key key = { .tgid = tgid };
	__u64 one = 1, *n;
	long kid, uid;

	kid = bpf_get_stackid(ctx, &ks_cpu_stacks, 0);
	uid = bpf_get_stackid(ctx, &ks_cpu_stacks, BPF_F_USER_STACK);
	/* -EFAULT only says there is no such stack (a sample in user mode has no
	 * kernel part, a kernel thread no user part); anything else is a loss.
	 * Without BPF_F_REUSE_STACKID a slot is never overwritten, so an id read
	 * once keeps naming the same stack until user space deletes it. */
	count_stack_error(kid);
	count_stack_error(uid);
	key.kernel_stack_id = kid < 0 ? -1 : kid;
	key.user_stack_id = uid < 0 ? -1 : uid;

	n = bpf_map_lookup_elem(&ks_cpu_stack_counts, &key);
	if (!n) {
		/* Another CPU may insert the same key first: then add to its entry. */
		if (bpf_map_update_elem(&ks_cpu_stack_counts, &key, &one, BPF_NOEXIST) == 0) {
			count(KSIFT_CNT_CPU_STACKS);
			return;
		}
		n = bpf_map_lookup_elem(&ks_cpu_stack_counts, &key);
		if (!n) {
			count(KSIFT_CNT_MAP_FULL);
			return;
		}
	}
	__sync_fetch_and_add(n, 1);
	count(KSIFT_CNT_CPU_STACKS);
}

SEC("perf_event")
int ks_cpu_sample(struct bpf_perf_event_data *ctx)
{
	struct ksift_cpu_state *st, init = {};
	struct ksift_cpu_crossing *cross;
	struct ksift_record *rec;
	__u64 now, last_start;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 n, last_count, prev;

	count(KSIFT_CNT_CPU_SAMPLES);
	if (tgid == 0) { /* the idle task (and the CPU's own boot thread): not a process */
		count(KSIFT_CNT_CPU_IDLE);
		return 0;
	}
	if (tgid == ksift_tgid) {
		count(KSIFT_CNT_CPU_SELF);
		return 0;
	}

	now = bpf_ktime_get_ns();
	init.win.window_start_ns = now;
	init.run_start_ns = now;
	st = process_state(&ks_cpu_state, &tgid, &init, bpf_get_current_task_btf(), KSIFT_MARK_CPU);
	if (!st)
		return 0;
	count(KSIFT_CNT_CPU_AGGREGATED);
	last_start = st->win.window_start_ns;
	last_count = st->win.window_count;
	if (window_roll(&st->win, now, cpu_window_ns)) {
		/* The window that just ended is the previous one only if no whole
		 * window passed without a sample in between. */
		prev = now - last_start < 2 * cpu_window_ns ? last_count : 0;
		if (prev <= cpu_threshold) { /* not hot: a new run may start here */
			st->run_start_ns = now;
			st->run_samples = 0;
		}
		st->prev_window_count = prev;
	}
	n = window_add(&st->win);
	__sync_fetch_and_add(&st->run_samples, 1);

	/* Hot now, or hot in the window before: where does its time go? */
	if (n > cpu_threshold || st->prev_window_count > cpu_threshold)
		count_stack(ctx, tgid);
	rec = window_crossing(&st->win, n, cpu_threshold, KSIFT_REC_CPU_CROSSING, now, bpf_get_current_task_btf());
	if (!rec)
		return 0;
	count(KSIFT_CNT_CPU_CROSSINGS);
	cross = KSIFT_PAYLOAD(rec, struct ksift_cpu_crossing);
	cross->run_start_ns = st->run_start_ns;
	cross->run_samples = st->run_samples;
	submit_record(rec);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(ks_cpu_exit, struct task_struct *task, bool group_dead)
{
	struct ksift_cpu_state *st;
	struct ksift_record *rec;
	__u32 tgid;

	if (!group_dead) /* other threads still run: the process lives on */
		return 0;
	/* Most exits: never sampled, so never marked, and no lookup. */
	if (!process_marked(task, KSIFT_MARK_CPU))
		return 0;
	tgid = task->tgid; /* a direct (BTF) load */
	st = bpf_map_lookup_elem(&ks_cpu_state, &tgid);
	if (!st) /* evicted */
		return 0;
	if (st->win.flagged) {
		/* A flagged process is gone: ship its final totals before forgetting it. */
		count(KSIFT_CNT_CPU_EXIT_FLAGGED);
		rec = window_exit_record(&st->win, KSIFT_REC_CPU_EXIT, task, BPF_CORE_READ(task, exit_code));
		if (rec) {
			fill_exe(&rec->task, task);
			submit_record(rec);
		}
	}
	bpf_map_delete_elem(&ks_cpu_state, &tgid);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
