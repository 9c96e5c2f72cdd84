// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Remediation's in-kernel fork-bomb guard: remediation's enforcement program,
 * not a sensor. Loaded (by src/ksift/remediation/guard.py) only when a rule's
 * policy asks for the fast path; it reuses the core object's shared maps, so
 * it makes no ring buffer of its own, and it emits no records.
 *
 * Once user space has judged a process tree and flagged it (ks_tree_flags: its
 * processes by tgid; ks_bomb_flags: a fork bomb by session and cgroup, or a
 * whole cgroup), a fork anywhere in it is answered with SIGKILL in the
 * kernel, so a fork bomb stops growing without waiting for user space.
 *
 * Hook: tp_btf/sched_process_fork, one of two programs (the kfunc form, or
 * the fallback for kernels without it; user space attaches one).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "guard.h"
#include "common.bpf.h"

/* Nanoseconds per clock tick of /proc/<pid>/stat (USER_HZ): flags carry start times in ticks. */
const volatile __u64 clock_tick_ns = 10000000ULL;

/* Processes of judged trees (see struct ksift_tree_flag). Written by user
 * space only after every guard passed; the kernel only reads it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32); /* tgid */
	__type(value, struct ksift_tree_flag);
} ks_tree_flags SEC(".maps");

/* Judged fork bombs (session + cgroup) and cgroup-scoped kill_tree (cgroup,
 * session 0): a new process of a flagged one is killed at fork, within the
 * flag's own budget. Written by user space only after every guard passed. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct ksift_bomb_key);
	__type(value, struct ksift_bomb_flag);
} ks_bomb_flags SEC(".maps");

/* Kills left per judged tree (root tgid -> remaining): the blast-radius limit
 * of the fast path. User space sets it; at 0 the kernel stops killing. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __s64);
} ks_tree_budget SEC(".maps");

/* Number of flagged entries (slot 0), kept by user space: while it is 0 the
 * guard costs every fork one array lookup and nothing more. */
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

/* The session a task belongs to (its id in the initial pid namespace), or 0
 * (as process.bpf.c keys its trees). */
static __always_inline __u32 session_of(struct task_struct *task)
{
	struct pid *sid = BPF_CORE_READ(task, signal, pids[PIDTYPE_SID]);

	return sid ? BPF_CORE_READ(sid, numbers[0].nr) : 0;
}

/* The flag of the judged bomb (session in cgroup) or cgroup `member` belongs
 * to, or NULL. `member` is the new child (the kfunc form) or the forking
 * parent (the fallback, which kills the parent): either way a member of a
 * flagged whole, by the cgroup and session it is in now. */
static __always_inline struct ksift_bomb_flag *bomb_flag_of(struct task_struct *member)
{
	struct ksift_bomb_key key = {};
	struct ksift_bomb_flag *flag;

	key.cgroup_id = BPF_CORE_READ(member, cgroups, dfl_cgrp, kn, id);
	key.session = session_of(member);
	if (key.session) {
		flag = bpf_map_lookup_elem(&ks_bomb_flags, &key);
		if (flag)
			return flag;
	}
	key.session = 0;
	return bpf_map_lookup_elem(&ks_bomb_flags, &key);
}

/* Spend one kill of a budget; false (and counted) once it is spent. */
static __always_inline bool spend(__s64 *budget)
{
	if (!budget || __sync_fetch_and_sub(budget, 1) <= 0) {
		count(KSIFT_CNT_TREE_BUDGET_SPENT);
		return false;
	}
	return true;
}

/* Is this fork (a new process, not a thread, not ksift's) one the guard
 * must answer, within its tree's kill budget? `member` is the task whose
 * cgroup and session say whether it belongs to a flagged bomb (see
 * bomb_flag_of). */
static __always_inline bool fork_in_flagged_tree(struct task_struct *parent, struct task_struct *child,
						 struct task_struct *member)
{
	struct ksift_bomb_flag *bomb;
	__u32 zero = 0, *armed, root, tgid;

	armed = bpf_map_lookup_elem(&ks_tree_armed, &zero);
	if (!armed || !*armed)
		return false;
	if (BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid))
		return false;
	tgid = BPF_CORE_READ(parent, tgid);
	if (tgid == ksift_tgid)
		return false;
	bomb = bomb_flag_of(member);
	if (bomb) {
		if (bomb->spare_tgid && bomb->spare_tgid == tgid)
			return false; /* the session's leader: not a member of the bomb */
		return spend(&bomb->budget);
	}
	root = flagged_root(parent);
	if (!root)
		return false;
	return spend(bpf_map_lookup_elem(&ks_tree_budget, &root));
}

/* The new child gets SIGKILL before it ever runs: sched_process_fork fires
 * before the child is first woken, so it dies on its way to user space. */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(ks_tree_guard, struct task_struct *parent, struct task_struct *child)
{
	if (!fork_in_flagged_tree(parent, child, child))
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
	if (!fork_in_flagged_tree(parent, child, parent))
		return 0;
	if (bpf_send_signal(KSIFT_SIGKILL))
		count(KSIFT_CNT_TREE_KILL_FAILED);
	else
		count(KSIFT_CNT_TREE_FORK_KILLED);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
