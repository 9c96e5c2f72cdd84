// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Lifecycle sensor: how child processes end, judged in the kernel at exit.
 *
 * exec churn: a parent whose exec'd children keep exiting within
 *   max_lifetime of their start (per-parent window counter);
 * crash loop: one executable under one parent (or in one slice) failing, a
 *   non-zero status or a signal, shortly after each start, again and again:
 *   per key, the run of such failures, how each was restarted (after a pause
 *   or at once), their statuses and the last few lifetimes and pauses. A
 *   crossing leaves the kernel once per run: when more than threshold
 *   failures in a row were each restarted after a pause (a supervisor's
 *   back-off or fixed delay), or kept coming, each within a second of the
 *   last, for tight_for (a loop without a pause).
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
const volatile __u64 crash_window_ns = 600000000000ULL;   /* longest time between two failures of a run */
const volatile __u64 crash_max_lifetime_ns = 60000000000ULL;
const volatile __u64 crash_min_gap_ns = 20000000ULL;      /* a restart this long after the last failure is paced */
const volatile __u64 crash_tight_for_ns = 5000000000ULL;  /* a streak of failures: a loop once it lasts this */

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

/* Keys of failing executables only: far fewer than processes. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 2048);
	__type(key, struct ksift_crash_key);
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

/* The same for the crash key (one entry, key 0) and a fresh state (key 1):
 * neither fits the stack either. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ksift_crash_key);
} ks_crash_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ksift_crash_state);
} ks_crash_init SEC(".maps");

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
 * basename of mm->exe_file, else comm. `exe` comes zeroed. */
static __always_inline void key_exe(char *exe, struct ksift_exec *exec, struct task_struct *task)
{
	if (exec) {
		__builtin_memcpy(exe, exec->path, KSIFT_PATH_LEN);
		return;
	}
	if (read_exe_name(exe, task) > 1)
		return;
	__builtin_memset(exe, 0, KSIFT_PATH_LEN);
	bpf_probe_read_kernel_str(exe, KSIFT_COMM_LEN, task->group_leader->comm);
}

/* The crash key of a failing process (see struct ksift_crash_key), in scratch. */
static __always_inline struct ksift_crash_key *crash_key(struct task_struct *task, struct task_struct *parent,
							 __u32 ptgid, struct ksift_exec *exec)
{
	__u32 zero = 0;
	struct ksift_crash_key *key = bpf_map_lookup_elem(&ks_crash_scratch, &zero);
	struct cgroup *cg;

	if (!key)
		return NULL;
	__builtin_memset(key, 0, sizeof(*key));
	cg = task->cgroups->dfl_cgrp;
	if (cg != parent->cgroups->dfl_cgrp && cg->self.parent)
		/* Put in a cgroup of its own (a unit, a container): the css is
		 * the first member of struct cgroup, so its parent css is the
		 * parent cgroup. */
		key->cgroup_id = BPF_CORE_READ((struct cgroup *)cg->self.parent, kn, id);
	else
		key->parent_tgid = ptgid;
	key_exe(key->exe, exec, task);
	return key;
}

/* Count this failure's status in the run (first free slot, else "other"). */
static __always_inline void crash_code(struct ksift_crash_run *run, __u32 code)
{
	__u32 i;

	for (i = 0; i < KSIFT_CRASH_CODES; i++) {
		if (run->codes[i].count == 0)
			run->codes[i].status = code;
		if (run->codes[i].status == code) {
			run->codes[i].count++;
			return;
		}
	}
	run->other_codes++;
}

/* Count one more short-lived exec'd child of `parent`; emit a crossing once
 * per window when the parent goes over the threshold. */
static __always_inline void churn_count(struct task_struct *task, struct task_struct *parent, __u32 ptgid,
					struct ksift_exec *exec, __u64 now, __u64 lifetime, bool superseded)
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
	if (superseded && n > churn_threshold && st->win.reported_window_ns != st->win.window_start_ns) {
		/* This child is in a crash loop already reported: that incident is
		 * the more specific one. The window stays unclaimed, so a child
		 * that is not (another program, a success) may still report it. */
		count(KSIFT_CNT_CHURN_SUPERSEDED);
		return;
	}
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

/* Killed by SIGHUP, SIGINT, SIGTERM or SIGPIPE: asked to stop, not a crash
 * (systemd counts these as a clean exit of a service too). */
static __always_inline bool clean_signal(__u32 status)
{
	__u32 sig = status & 0x7f;

	return sig == 1 || sig == 2 || sig == 13 || sig == 15;
}

/* A gap in ms for the history, saturated (unsigned division: BPF before v4 has no signed one). */
static __always_inline __s32 gap_ms(__s64 gap)
{
	__u64 ms;

	if (gap == KSIFT_CRASH_NO_GAP)
		return KSIFT_CRASH_NO_GAP;
	ms = (gap >= 0 ? (__u64)gap : (__u64)-gap) / 1000000;
	if (ms > 0x7fffffff)
		ms = 0x7fffffff;
	return gap >= 0 ? (__s32)ms : -(__s32)ms;
}

/* One more failure of a key: extend its run (or start one) and emit the run's
 * crossing once it is a loop. Failures are rare next to exits, and a key's
 * failures rarely come on two CPUs at once (a supervisor restarts one process
 * at a time): plain stores, where a race only blurs a figure of the run.
 * Returns whether the key's run was reported (its crossing went out). */
static __always_inline bool crash_count(struct task_struct *task, struct task_struct *parent, __u32 ptgid,
					struct ksift_exec *exec, __u64 now, __u32 code)
{
	struct ksift_crash_state *st, *init;
	struct ksift_crash_crossing *cross;
	struct ksift_crash_key *key;
	struct ksift_crash_run *run;
	struct ksift_record *rec;
	__u64 start = task->group_leader->start_time;
	__u64 lifetime = now - start;
	__s64 gap;
	__u32 zero = 0, n, slot;

	key = crash_key(task, parent, ptgid, exec);
	if (!key)
		return false;
	if (lifetime > crash_max_lifetime_ns) {
		/* It ran a while first: not a crash loop's failure, and the end of any run. */
		count(KSIFT_CNT_CRASH_LONG_LIVED);
		st = bpf_map_lookup_elem(&ks_crash_state, key);
		if (st)
			st->last_exit_ns = 0;
		return false;
	}
	st = bpf_map_lookup_elem(&ks_crash_state, key);
	if (!st) {
		init = bpf_map_lookup_elem(&ks_crash_init, &zero); /* zeroed: never written */
		if (!init)
			return false;
		st = lookup_or_init(&ks_crash_state, key, init);
		if (!st)
			return false;
	}
	count(KSIFT_CNT_CRASH_AGGREGATED);
	run = &st->run;
	if (!st->last_exit_ns || now - st->last_exit_ns > crash_window_ns) {
		/* A new run: none before, or quiet for a whole window. Its first
		 * failure starts both counts. */
		__builtin_memset(run, 0, sizeof(*run));
		st->win.window_start_ns = now;
		st->win.window_count = 0;
		gap = KSIFT_CRASH_NO_GAP;
		run->paced = 1;
		run->streak = 1;
		run->streak_start_ns = now;
	} else {
		gap = (__s64)(start - st->last_exit_ns);
		/* Started before the last one died (workers of a service stopping
		 * together) or right after it (a loop without a pause, a script):
		 * not a supervisor's restart; this failure may begin a paced row. */
		run->paced = gap >= (__s64)crash_min_gap_ns ? run->paced + 1 : 1;
		if (now - st->last_exit_ns <= KSIFT_CRASH_STREAK_GAP_NS) {
			run->streak++;
		} else {
			run->streak = 1;
			run->streak_start_ns = now;
		}
	}
	crash_code(run, code);
	slot = run->hist_n % KSIFT_CRASH_HISTORY;
	/* The verifier cannot see a modulo's bound, and clang would drop a check it
	 * knows holds: hide the value from clang so the check stays. */
	asm volatile("" : "+r"(slot));
	if (slot < KSIFT_CRASH_HISTORY) {
		run->hist[slot].gap_ms = gap_ms(gap);
		run->hist[slot].lifetime_us = lifetime / 1000;
	}
	run->hist_n++;
	if (key->cgroup_id)
		bpf_probe_read_kernel_str(st->cgroup_name, sizeof(st->cgroup_name),
					  BPF_CORE_READ(task->cgroups->dfl_cgrp, kn, name));
	st->last_exit_ns = now;
	st->last_tgid = task->tgid;
	st->win.total++;
	n = ++st->win.window_count;

	if (run->paced <= crash_threshold &&
	    (run->streak <= crash_threshold || now - run->streak_start_ns < crash_tight_for_ns))
		return st->win.reported_window_ns == st->win.window_start_ns;
	/* The subject is the failing process itself (gone a moment later), so the
	 * context is taken now; its parent is ancestry[0]. */
	rec = window_crossing(&st->win, n, crash_threshold, KSIFT_REC_CRASH_CROSSING, now, task);
	if (!rec)
		return st->win.reported_window_ns == st->win.window_start_ns;
	count(KSIFT_CNT_CRASH_CROSSINGS);
	/* Its executable as the key names it: at exit its memory is gone, so
	 * without an exec path the basename is too and the key falls back to comm. */
	__builtin_memcpy(rec->task.exe, key->exe, sizeof(rec->task.exe));
	/* ... and says so: the exec path when there was one, else only a name. */
	rec->task.ctx_flags = (rec->task.ctx_flags & ~(KSIFT_CTX_EXE_EVENT | KSIFT_CTX_EXE_EXEC)) |
			      (exec ? KSIFT_CTX_EXE_EXEC : 0);
	cross = KSIFT_PAYLOAD(rec, struct ksift_crash_crossing);
	cross->group_cgroup_id = key->cgroup_id;
	cross->parent_tgid = ptgid;
	cross->exit_code = code;
	__builtin_memcpy(&cross->run, run, sizeof(cross->run));
	submit_record(rec);
	return true;
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
	bool superseded = false;

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
	/* Crash first: a child whose crash loop was reported is left out of churn's crossings. */
	if (crash_enabled) {
		code = wait_status(task);
		if (code && !clean_signal(code))
			superseded = crash_count(task, parent, ptgid, exec, now, code);
	}
	/* Children that never exec'd (workers forked from their parent) are not churn. */
	if (churn_enabled && exec) {
		lifetime = now - task->group_leader->start_time;
		if (lifetime <= churn_max_lifetime_ns)
			churn_count(task, parent, ptgid, exec, now, lifetime, superseded);
		else
			count(KSIFT_CNT_CHURN_LONG_LIVED);
	}

forget:
	if (churn_enabled)
		churn_parent_exit(task, tgid);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
