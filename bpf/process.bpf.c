// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Process sensor: counts new processes per parent in the kernel and ships only
 * the parents that cross the fork threshold within a window.
 *
 * Hooks (all tp_btf, CO-RE): sched_process_fork, sched_process_exit. Nothing here emits one record per fork.
 *
 * Remediation's fast path (ks_tree_guard*, attached only when a rule's policy
 * asks for it): once user space has judged a process tree and flagged it in
 * ks_tree_flags, a fork anywhere in that tree is answered with SIGKILL in the
 * kernel, so a fork bomb stops growing without waiting for user space.
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
/* Nanoseconds per clock tick of /proc/<pid>/stat (USER_HZ), for the fast path. */
const volatile __u64 clock_tick_ns = 10000000ULL;
/* Wake user space at every crossing instead of at its next tick: set when a
 * policy may act on fork storms, where every millisecond of latency counts. */
const volatile __u32 fork_crossing_wakeup = 0;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* parent tgid */
	__type(value, struct ksift_fork_state);
} ks_fork_state SEC(".maps");

/* Fast path: processes of judged trees (see struct ksift_tree_flag). Written
 * by user space only after every guard passed; the kernel only reads it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32); /* tgid */
	__type(value, struct ksift_tree_flag);
} ks_tree_flags SEC(".maps");

/* Kills left per judged tree (root tgid -> remaining): the blast-radius limit
 * of the fast path. User space sets it; at 0 the kernel stops killing. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __s64);
} ks_tree_budget SEC(".maps");

/* Number of flagged entries (slot 0), kept by user space: while it is 0 the
 * fast path costs every fork one array lookup and nothing more. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} ks_tree_armed SEC(".maps");

/* A kfunc since Linux 6.13. Weak: on older kernels the object still loads and
 * user space attaches ks_tree_guard_parent instead. */
extern int bpf_send_signal_task(struct task_struct *task, int sig, enum pid_type type, __u64 value) __weak __ksym;

#define KSIFT_SIGKILL 9

SEC("tp_btf/sched_process_fork")
int BPF_PROG(ks_fork, struct task_struct *parent, struct task_struct *child)
{
	struct ksift_fork_state *st, init = {};
	struct ksift_fork_crossing *fork;
	struct ksift_record *rec;
	__u64 now, window_start;
	__u32 tgid, n;

	count(KSIFT_CNT_FORK_SEEN);
	/* A clone that shares the thread group is a thread, not a process. */
	if (BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid)) {
		count(KSIFT_CNT_FORK_THREADS);
		return 0;
	}
	tgid = BPF_CORE_READ(parent, tgid);
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
	rec = window_crossing(&st->win, n, fork_threshold, KSIFT_REC_FORK_CROSSING, now, &window_start);
	if (!rec)
		return 0;
	count(KSIFT_CNT_FORK_CROSSINGS);
	fill_task(&rec->task, parent);
	fill_exe(&rec->task, parent);
	fork = KSIFT_PAYLOAD(rec, struct ksift_fork_crossing);
	fork->window_start_ns = window_start;
	fork->window_count = n;
	fork->threshold = fork_threshold;
	fork->total = st->win.total;
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
	tgid = BPF_CORE_READ(task, tgid);

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

/* The root of the judged tree the forking task belongs to, or 0: the task
 * itself flagged (any scope), or one of its first KSIFT_TREE_DEPTH ancestors
 * flagged KSIFT_TREE_WHOLE. Flags carry the start time, so a recycled pid
 * never matches. */
static __always_inline __u32 flagged_root(struct task_struct *task)
{
	struct ksift_tree_flag *flag;
	struct task_struct *p = task;
	__u32 tgid, i;

	for (i = 0; i < KSIFT_TREE_DEPTH; i++) {
		tgid = BPF_CORE_READ(p, tgid);
		if (tgid <= 1) /* init or the idle task: above every tree */
			return 0;
		flag = bpf_map_lookup_elem(&ks_tree_flags, &tgid);
		if (flag && (i == 0 || flag->scope == KSIFT_TREE_WHOLE) &&
		    flag->start_ticks == BPF_CORE_READ(p, group_leader, start_boottime) / clock_tick_ns)
			return flag->root_tgid;
		p = BPF_CORE_READ(p, real_parent);
		if (!p)
			return 0;
	}
	return 0;
}

/* Is this fork (a new process, not a thread, not ksift's) one the fast path
 * must answer, within its tree's kill budget? */
static __always_inline bool fork_in_flagged_tree(struct task_struct *parent, struct task_struct *child)
{
	__u32 zero = 0, *armed, root;
	__s64 *budget;

	if (BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid))
		return false;
	armed = bpf_map_lookup_elem(&ks_tree_armed, &zero);
	if (!armed || !*armed)
		return false;
	if (BPF_CORE_READ(parent, tgid) == ksift_tgid)
		return false;
	root = flagged_root(parent);
	if (!root)
		return false;
	budget = bpf_map_lookup_elem(&ks_tree_budget, &root);
	if (!budget || __sync_fetch_and_sub(budget, 1) <= 0) {
		count(KSIFT_CNT_TREE_BUDGET_SPENT);
		return false;
	}
	return true;
}

/* The new child gets SIGKILL before it ever runs: sched_process_fork fires
 * before the child is first woken, so it dies on its way to user space. */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(ks_tree_guard, struct task_struct *parent, struct task_struct *child)
{
	if (!fork_in_flagged_tree(parent, child))
		return 0;
	if (bpf_send_signal_task(child, KSIFT_SIGKILL, PIDTYPE_TGID, 0))
		count(KSIFT_CNT_TREE_KILL_FAILED);
	else
		count(KSIFT_CNT_TREE_FORK_KILLED);
	return 0;
}

/* Fallback for kernels without bpf_send_signal_task: bpf_send_signal() can
 * only signal the current task, which here is the forking member of the
 * flagged tree; killing it stops that branch from growing. */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(ks_tree_guard_parent, struct task_struct *parent, struct task_struct *child)
{
	if (!fork_in_flagged_tree(parent, child))
		return 0;
	if (bpf_send_signal(KSIFT_SIGKILL))
		count(KSIFT_CNT_TREE_KILL_FAILED);
	else
		count(KSIFT_CNT_TREE_FORK_KILLED);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
