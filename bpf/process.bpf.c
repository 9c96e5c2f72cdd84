// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Process sensor: counts new processes per parent (fork storms) and per process
 * tree (fork bombs) in the kernel, and ships only the keys that cross their
 * threshold within a window.
 *
 * Hooks (all tp_btf, CO-RE): sched_process_fork, sched_process_exit. Nothing here emits one record per fork.
 * Each rule's part is gated by rodata, so the verifier drops a disabled one.
 * (Remediation's in-kernel fork-bomb guard is its own object: guard.bpf.c.)
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "process.h"
#include "common.bpf.h"

/* Set from the rules between open and load (see sensors/process.py). */
const volatile __u32 fork_enabled = 0;
const volatile __u32 fork_threshold = 50;
const volatile __u64 fork_window_ns = 1000000000ULL;
/* Force a wake-up at every crossing: set when the fork rule is urgent (a policy
 * may act on its alerts, which the composition says: Sensor.urgent_rules), where
 * every millisecond counts. */
const volatile __u32 fork_crossing_wakeup = 0;
const volatile __u32 bomb_enabled = 0;
const volatile __u32 bomb_threshold = 100;          /* forks by a tree's members in a window */
const volatile __u64 bomb_window_ns = 1000000000ULL;
const volatile __u32 bomb_min_live = 100;           /* ... while this many of them are alive */
const volatile __u32 bomb_crossing_wakeup = 0;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* parent tgid */
	__type(value, struct ksift_fork_state);
} ks_fork_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* session id */
	__type(value, struct ksift_tree_state);
} ks_tree_state SEC(".maps");

/* The session a task belongs to (its id in the initial pid namespace), or 0. */
static __always_inline __u32 session_of(struct task_struct *task)
{
	struct pid *sid = task->signal->pids[PIDTYPE_SID];

	return sid ? BPF_CORE_READ(sid, numbers[0].nr) : 0;
}

/* Count a new process in its tree and judge the tree: true when the tree is a
 * bomb now (over its fork threshold with min_live members alive, in this
 * window or the one before), so this fork belongs to the bomb, not to a fork
 * storm of its parent. `parent` is the forking task, which is current. */
static __always_inline bool tree_fork(struct task_struct *parent, __u64 now)
{
	struct ksift_tree_state *st, init = {};
	struct ksift_bomb_crossing *bomb;
	struct ksift_record *rec;
	struct mm_struct *mm;
	__u32 tree, n;
	__s64 live;

	tree = session_of(parent);
	if (!tree)
		return false;
	init.win.window_start_ns = now;
	st = lookup_or_init(&ks_tree_state, &tree, &init);
	if (!st)
		return false;
	count(KSIFT_CNT_TREE_FORKS);
	window_roll(&st->win, now, bomb_window_ns);
	n = window_add(&st->win);
	live = __sync_add_and_fetch(&st->live, 1);
	if (live > st->peak_live)
		st->peak_live = live; /* a race only blurs the peak by a fork or two */
	if (live < bomb_min_live || n <= bomb_threshold)
		return st->bomb_window_ns && now - st->bomb_window_ns < 2 * bomb_window_ns;
	st->bomb_window_ns = st->win.window_start_ns;
	rec = window_crossing(&st->win, n, bomb_threshold, KSIFT_REC_BOMB_CROSSING, now, parent);
	if (!rec)
		return true;
	count(KSIFT_CNT_BOMB_CROSSINGS);
	bomb = KSIFT_PAYLOAD(rec, struct ksift_bomb_crossing);
	bomb->tree = tree;
	bomb->live = live;
	bomb->peak_live = st->peak_live;
	bomb->min_live = bomb_min_live;
	/* Its command line now, from its own memory: the members of a bomb are gone in a moment. */
	mm = parent->mm;
	if (mm) {
		bomb->cmdline_len = mm->arg_end - mm->arg_start;
		bpf_probe_read_user(bomb->cmdline, sizeof(bomb->cmdline), (void *)mm->arg_start);
	}
	submit_record_wake(rec, bomb_crossing_wakeup);
	return true;
}

/* A member of a tree is gone: one fewer alive (never below zero: members born
 * before ksift watched the tree leave too). */
static __always_inline void tree_exit(struct task_struct *task)
{
	struct ksift_tree_state *st;
	__u32 tree = session_of(task);

	if (!tree)
		return;
	st = bpf_map_lookup_elem(&ks_tree_state, &tree);
	if (!st)
		return;
	count(KSIFT_CNT_TREE_EXITS);
	if (st->live > 0)
		__sync_fetch_and_sub(&st->live, 1);
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(ks_fork, struct task_struct *parent, struct task_struct *child)
{
	struct ksift_fork_state *st, init = {};
	struct ksift_record *rec;
	bool in_bomb;
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
	in_bomb = bomb_enabled && tree_fork(parent, now);
	if (!fork_enabled)
		return 0;
	init.win.window_start_ns = now;
	st = process_state(&ks_fork_state, &tgid, &init, parent, KSIFT_MARK_FORK_PARENT);
	if (!st)
		return 0;
	count(KSIFT_CNT_FORK_AGGREGATED);
	window_roll(&st->win, now, fork_window_ns);
	n = window_add(&st->win);
	if (in_bomb) {
		/* One bomb is one incident, not one fork storm per member (counted once per window). */
		if (n == fork_threshold + 1)
			count(KSIFT_CNT_FORK_IN_BOMB);
		return 0;
	}
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
	if (bomb_enabled)
		tree_exit(task);
	if (!fork_enabled)
		return 0;
	/* Most exiting processes never forked while we watched: no mark, no lookup. */
	if (!process_marked(task, KSIFT_MARK_FORK_PARENT))
		return 0;
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
	if (st)
		bpf_map_delete_elem(&ks_fork_state, &tgid);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
