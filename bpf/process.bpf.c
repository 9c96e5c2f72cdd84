// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Process sensor: counts new processes per parent in the kernel and ships only
 * the parents that cross the fork threshold within a window.
 *
 * Hooks (all tp_btf, CO-RE): sched_process_fork, sched_process_exit. Nothing here emits one record per fork.
 * (Remediation's in-kernel fork-bomb guard is its own object: guard.bpf.c.)
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "process.h"
#include "common.bpf.h"

/* Set from the rules between open and load (see sensors/process.py). */
const volatile __u32 fork_threshold = 50;
const volatile __u64 fork_window_ns = 1000000000ULL;
/* Force a wake-up at every crossing: set when the fork rule is urgent (a policy
 * may act on its alerts, which the composition says: Sensor.urgent_rules), where
 * every millisecond counts. */
const volatile __u32 fork_crossing_wakeup = 0;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* parent tgid */
	__type(value, struct ksift_fork_state);
} ks_fork_state SEC(".maps");

SEC("tp_btf/sched_process_fork")
int BPF_PROG(ks_fork, struct task_struct *parent, struct task_struct *child)
{
	struct ksift_fork_state *st, init = {};
	struct ksift_record *rec;
	__u64 now;
	__u32 tgid, n;

	count(KSIFT_CNT_FORK_SEEN);
	/* A clone that shares the thread group is a thread, not a process. */
	/* Direct (BTF) loads, not probe-read helpers: this runs at every fork. */
	if (child->pid != child->tgid) {
		count(KSIFT_CNT_FORK_THREADS);
		return 0;
	}
	tgid = parent->tgid;
	if (tgid == ksift_tgid) {
		count(KSIFT_CNT_FORK_SELF);
		return 0;
	}

	now = bpf_ktime_get_ns();
	init.win.window_start_ns = now;
	st = lookup_or_init(&ks_fork_state, &tgid, &init);
	if (!st)
		return 0;
	count(KSIFT_CNT_FORK_AGGREGATED);
	window_roll(&st->win, now, fork_window_ns);
	n = window_add(&st->win);
	/* The payload (struct ksift_fork_crossing) is the head window_crossing fills. */
	rec = window_crossing(&st->win, n, fork_threshold, KSIFT_REC_FORK_CROSSING, now, parent);
	if (!rec)
		return 0;
	count(KSIFT_CNT_FORK_CROSSINGS);
	submit_record_wake(rec, fork_crossing_wakeup);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(ks_exit, struct task_struct *task, bool group_dead)
{
	struct ksift_fork_state *st;
	struct ksift_record *rec;
	__u32 tgid;

	if (!group_dead) /* other threads still run: the process lives on */
		return 0;
	count(KSIFT_CNT_EXIT_SEEN);
	tgid = task->tgid; /* a direct (BTF) load: this runs at every exit */

	st = bpf_map_lookup_elem(&ks_fork_state, &tgid);
	if (st && st->win.flagged) {
		/* A flagged parent is gone: ship its final totals before forgetting it. */
		count(KSIFT_CNT_EXIT_FLAGGED);
		rec = window_exit_record(&st->win, KSIFT_REC_FORK_EXIT, task, BPF_CORE_READ(task, exit_code));
		if (rec) {
			fill_exe(&rec->task, task);
			submit_record(rec);
		}
	}
	/* Most exiting processes never forked while we watched: the lock-free
	 * lookup above spares them the bucket lock a delete takes. */
	if (st)
		bpf_map_delete_elem(&ks_fork_state, &tgid);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
