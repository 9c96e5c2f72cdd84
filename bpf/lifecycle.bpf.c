// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Lifecycle sensor: how child processes end, judged in the kernel at exit.
 *
 * exec churn: a parent whose exec'd children keep exiting within
 *   max_lifetime of their start (per-parent window counter);
 * crash loop: one executable under one parent exiting with a non-zero status
 *   or by a signal again and again (per-(parent, exe) window counter).
 *
 * Hook (tp_btf, CO-RE): sched_process_exit does the counting; the exec path
 * of each process comes from the core object's ks_exec_path (common.bpf.h). Only crossings reach the ring
 * buffer. Each rule's part of the exit program is gated by rodata, so the
 * verifier drops the code of a disabled rule.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "lifecycle.h"
#include "common.bpf.h"

/* Set from the rules between open and load (see sensors/lifecycle.py). */
const volatile __u32 churn_enabled = 0;
const volatile __u32 churn_threshold = 40;
const volatile __u64 churn_window_ns = 2000000000ULL;
const volatile __u64 churn_max_lifetime_ns = 1000000000ULL;
const volatile __u32 crash_enabled = 0;
const volatile __u32 crash_threshold = 10;
const volatile __u64 crash_window_ns = 10000000000ULL;

/* Anchor the payload layouts in the object's BTF for tests/unit/test_abi.py. Never used. */
const struct ksift_churn_crossing *ksift_churn_crossing_abi __attribute__((unused));
const struct ksift_crash_crossing *ksift_crash_crossing_abi __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* parent tgid */
	__type(value, struct ksift_churn_state);
} ks_churn_state SEC(".maps");

/* Bounded: read in one batch when an alert is built, never per event. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 2048);
	__type(key, struct ksift_lc_key);
	__type(value, struct ksift_churn_exe);
} ks_churn_exe SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ksift_lc_key);
	__type(value, struct ksift_crash_state);
} ks_crash_state SEC(".maps");

/* Scratch for the 136-byte key: the BPF stack is too small for it next to the
 * rest. Safe per CPU: tracepoint programs run with preemption disabled. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ksift_lc_key);
} ks_lc_scratch SEC(".maps");

static __always_inline struct ksift_lc_key *scratch_key(__u32 parent_tgid)
{
	__u32 zero = 0;
	struct ksift_lc_key *key = bpf_map_lookup_elem(&ks_lc_scratch, &zero);

	if (key) {
		__builtin_memset(key, 0, sizeof(*key));
		key->parent_tgid = parent_tgid;
	}
	return key;
}

/* What the parent's wait() will report: wait_task_zombie() takes the group
 * exit code once SIGNAL_GROUP_EXIT is set, else the group leader's exit code.
 * exit_group() and fatal signals set the flag; on recent kernels the last
 * thread's plain exit() sets it too (synchronize_group_exit), so at group_dead it is
 * set on this kernel whichever way the process ended, even when the leader
 * left earlier with another code (tests/kernel/test_crash_loop.py checks each
 * way against the status the parent really got). */
static __always_inline __u32 wait_status(struct task_struct *task)
{
	struct signal_struct *sig = task->signal;

	/* Direct (BTF) loads, not probe-read helpers: this runs at every exit. */
	if (sig->flags & KSIFT_SIGNAL_GROUP_EXIT)
		return sig->group_exit_code;
	return task->group_leader->exit_code;
}

/* The executable for a key: the exec path when we saw the exec, else the
 * basename of mm->exe_file, else comm. `key` comes zeroed. */
static __always_inline void key_exe(struct ksift_lc_key *key, struct ksift_exec *exec,
				    struct task_struct *task)
{
	if (exec) {
		__builtin_memcpy(key->exe, exec->path, sizeof(key->exe));
		return;
	}
	if (read_exe_name(key->exe, task) > 1)
		return;
	__builtin_memset(key->exe, 0, sizeof(key->exe));
	BPF_CORE_READ_STR_INTO(&key->exe, task, group_leader, comm);
}

/* Count one more short-lived exec'd child of `parent`; emit a crossing once
 * per window when the parent goes over the threshold. */
static __always_inline void churn_count(struct task_struct *task, struct task_struct *parent, __u32 ptgid,
					struct ksift_exec *exec, __u64 now, __u64 lifetime)
{
	struct ksift_churn_state *st, st_init = {};
	struct ksift_churn_exe *per_exe, exe_init = {};
	struct ksift_lc_key *key;
	struct ksift_churn_crossing *cross;
	struct ksift_record *rec;
	__u64 parent_start;
	__u32 n;

	st_init.win.window_start_ns = now;
	st = process_state(&ks_churn_state, &ptgid, &st_init, parent, KSIFT_MARK_CHURN_PARENT);
	if (!st)
		return;
	count(KSIFT_CNT_CHURN_AGGREGATED);

	/* Per-executable counts for the alert's top executables. */
	parent_start = BPF_CORE_READ(parent, group_leader, start_boottime);
	key = scratch_key(ptgid);
	if (!key)
		return;
	__builtin_memcpy(key->exe, exec->path, sizeof(key->exe));
	exe_init.parent_start_ns = parent_start;
	per_exe = lookup_or_init(&ks_churn_exe, key, &exe_init);
	if (per_exe) {
		if (per_exe->parent_start_ns != parent_start) {
			/* The pid names a newer process now: start its counts over. */
			per_exe->parent_start_ns = parent_start;
			per_exe->count = 0;
		}
		__sync_fetch_and_add(&per_exe->count, 1);
	}

	window_roll(&st->win, now, churn_window_ns);
	n = window_add(&st->win);
	rec = window_crossing(&st->win, n, churn_threshold, KSIFT_REC_CHURN_CROSSING, now, parent);
	if (!rec)
		return;
	count(KSIFT_CNT_CHURN_CROSSINGS);
	cross = KSIFT_PAYLOAD(rec, struct ksift_churn_crossing);
	cross->max_lifetime_ns = churn_max_lifetime_ns;
	cross->last_lifetime_ns = lifetime;
	cross->last_child_tgid = BPF_CORE_READ(task, tgid);
	__builtin_memcpy(cross->last_child_exe, exec->path, sizeof(cross->last_child_exe) - 1);
	submit_record(rec);
}

/* Count one more failed exit of this executable under this parent. */
static __always_inline void crash_count(struct task_struct *task, __u32 ptgid, struct ksift_exec *exec,
					__u64 now, __u32 code)
{
	struct ksift_crash_state *st, st_init = {};
	struct ksift_crash_crossing *cross;
	struct ksift_lc_key *key = scratch_key(ptgid);
	struct ksift_record *rec;
	__u32 n, run;

	if (!key)
		return;
	key_exe(key, exec, task);
	st_init.win.window_start_ns = now;
	st = lookup_or_init(&ks_crash_state, key, &st_init);
	if (!st)
		return;
	count(KSIFT_CNT_CRASH_AGGREGATED);
	/* Failures are rare next to exits: plain stores are good enough for the
	 * last code and its run (a race only blurs which failure was "last"). */
	run = st->last_code == code ? st->same_code_run + 1 : 1;
	st->last_code = code;
	st->same_code_run = run;
	st->last_tgid = BPF_CORE_READ(task, tgid);

	window_roll(&st->win, now, crash_window_ns);
	n = window_add(&st->win);
	/* The subject is the failing process itself (gone a moment later), so the
	 * context is taken now; its parent is ancestry[0]. */
	rec = window_crossing(&st->win, n, crash_threshold, KSIFT_REC_CRASH_CROSSING, now, task);
	if (!rec)
		return;
	count(KSIFT_CNT_CRASH_CROSSINGS);
	/* Its executable as the key names it: at exit its memory is gone, so
	 * without an exec path the basename is too and the key falls back to comm. */
	__builtin_memcpy(rec->task.exe, key->exe, sizeof(rec->task.exe));
	cross = KSIFT_PAYLOAD(rec, struct ksift_crash_crossing);
	cross->lifetime_ns = now - BPF_CORE_READ(task, group_leader, start_time);
	cross->exit_code = code;
	cross->same_code_run = run;
	cross->parent_tgid = ptgid;
	submit_record(rec);
}

/* A flagged churn parent is gone: ship its final totals, then forget it. */
static __always_inline void churn_parent_exit(struct task_struct *task, __u32 tgid)
{
	struct ksift_churn_state *st;
	struct ksift_record *rec;

	if (!process_marked(task, KSIFT_MARK_CHURN_PARENT)) /* most exits: never a churn parent */
		return;
	st = bpf_map_lookup_elem(&ks_churn_state, &tgid);
	if (!st)
		return;
	if (st->win.flagged) {
		count(KSIFT_CNT_CHURN_EXIT_FLAGGED);
		rec = window_exit_record(&st->win, KSIFT_REC_CHURN_EXIT, task, wait_status(task));
		if (rec) {
			fill_exe(&rec->task, task);
			submit_record(rec);
		}
	}
	bpf_map_delete_elem(&ks_churn_state, &tgid);
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(ks_lc_exit, struct task_struct *task, bool group_dead)
{
	struct task_struct *parent;
	struct ksift_exec *exec;
	__u64 now, lifetime;
	__u32 tgid, ptgid, code;

	if (!group_dead) /* other threads still run: the process lives on */
		return 0;
	count(KSIFT_CNT_LC_EXIT_SEEN);
	/* Direct (BTF) loads on this per-exit path: no helper call for a field. */
	tgid = task->tgid;
	parent = task->real_parent;
	ptgid = parent->tgid;
	exec = exec_of(task);

	if (tgid == ksift_tgid || ptgid == ksift_tgid) {
		count(KSIFT_CNT_LC_EXIT_SELF);
		goto forget;
	}
	now = bpf_ktime_get_ns();
	/* Children that never exec'd (workers forked from their parent) are not churn. */
	if (churn_enabled && exec) {
		lifetime = now - task->group_leader->start_time;
		if (lifetime <= churn_max_lifetime_ns)
			churn_count(task, parent, ptgid, exec, now, lifetime);
		else
			count(KSIFT_CNT_CHURN_LONG_LIVED);
	}
	if (crash_enabled) {
		code = wait_status(task);
		if (code)
			crash_count(task, ptgid, exec, now, code);
	}

forget:
	if (churn_enabled)
		churn_parent_exit(task, tgid);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
