/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * guard.h: remediation's in-kernel fork-bomb guard (guard.bpf.c): the tree
 * and bomb flags user space writes, and the guard's counters. Not a sensor: it emits
 * no records. Python mirror: src/ksift/remediation/guard.py, checked by
 * tests/unit/test_abi.py.
 */
#ifndef KSIFT_GUARD_H
#define KSIFT_GUARD_H

#include "ksift.h"

enum ksift_guard_counter {
	KSIFT_CNT_TREE_FORK_KILLED = KSIFT_CNT_SENSOR_BASE, /* new children of a flagged tree killed at fork */
	KSIFT_CNT_TREE_KILL_FAILED,    /* the kernel refused to signal such a child */
	KSIFT_CNT_TREE_BUDGET_SPENT,   /* a fork let live: the tree's kill budget is spent */
};

/* Processes user space judged and flagged, keyed by tgid; the start time makes
 * a recycled pid never count as flagged. It is in clock ticks, as /proc shows
 * it, because that is all user space knows of the tree's members. */
enum ksift_tree_scope {
	KSIFT_TREE_CHILDREN = 1, /* kill new children of this process only */
	KSIFT_TREE_WHOLE = 2,    /* ... and of every descendant of it */
};

struct ksift_tree_flag {
	__u64 start_ticks;       /* group leader's start_boottime / clock_tick_ns */
	__u32 root_tgid;         /* the judged tree's root: its kill budget's key */
	__u32 scope;             /* enum ksift_tree_scope */
};

/* Fork bombs (and cgroup-scoped kill_tree): the judged whole is keyed by what
 * the kernel gives every member and every newborn of it: its cgroup and its
 * session. Keyed by both, a same-numbered session in another cgroup is never
 * hit; session 0 flags every process of the cgroup. */
struct ksift_bomb_key {
	__u64 cgroup_id;         /* cgroup v2 id (kernfs id: the directory's inode) */
	__u32 session;           /* session id in the initial pid namespace; 0: the whole cgroup */
	__u32 pad;
};

struct ksift_bomb_flag {
	__s64 budget;            /* kills left (the fast path's blast radius); at 0 the kernel stops killing */
	__u32 spare_tgid;        /* never answer a fork of this process (the session's leader, older than the bomb); 0: none */
	__u32 pad;
};

/* How many ancestors of a forking process the guard looks at. */
#define KSIFT_TREE_DEPTH 16

#endif /* KSIFT_GUARD_H */
