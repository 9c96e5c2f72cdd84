/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * process.h: the process sensor's records, state and counters (fork storms).
 * Python mirror: src/ksift/sensors/process.py, checked by tests/unit/test_abi.py.
 */
#ifndef KSIFT_PROCESS_H
#define KSIFT_PROCESS_H

#include "ksift.h"

enum ksift_process_record {
	KSIFT_REC_FORK_CROSSING = KSIFT_REC_PROCESS_BASE + 1, /* a parent crossed the fork threshold */
	KSIFT_REC_FORK_EXIT = KSIFT_REC_PROCESS_BASE + 2,     /* a flagged parent exited: final totals */
	KSIFT_REC_BOMB_CROSSING = KSIFT_REC_PROCESS_BASE + 3, /* a process tree multiplied: a fork bomb */
};

enum ksift_process_counter {
	KSIFT_CNT_FORK_SEEN = KSIFT_CNT_SENSOR_BASE, /* every sched_process_fork */
	KSIFT_CNT_FORK_THREADS,        /* clones that made a thread: not counted */
	KSIFT_CNT_FORK_SELF,           /* forks by ksift itself: filtered */
	KSIFT_CNT_FORK_AGGREGATED,     /* new processes counted in the per-parent map */
	KSIFT_CNT_FORK_CROSSINGS,      /* threshold crossings (one per parent per window) */
	KSIFT_CNT_EXIT_SEEN,           /* thread-group exits */
	KSIFT_CNT_EXIT_FLAGGED,        /* exits of flagged parents (final record) */
	KSIFT_CNT_TREE_FORKS,          /* new processes counted in their tree (session) */
	KSIFT_CNT_TREE_EXITS,          /* exits counted off their tree's live members */
	KSIFT_CNT_BOMB_CROSSINGS,      /* bomb crossings (one per tree per window) */
	KSIFT_CNT_FORK_IN_BOMB,        /* fork-storm crossings withheld: the parent's tree is a bomb */
};

struct ksift_fork_crossing {
	struct ksift_crossing head; /* forks: of this window at the crossing, and since first tracked */
};
/* Anchor the payload layout in the BTF of the object that includes this header
 * (only casts reach it) for tests/unit/test_abi.py. Never used. */
const struct ksift_fork_crossing *ksift_fork_crossing_abi __attribute__((unused));

/* KSIFT_REC_FORK_EXIT carries a struct ksift_window_exit (exit_code:
 * task->exit_code, (status << 8) | signal). */

/* Per-parent fork state in the LRU hash, keyed by tgid. */
struct ksift_fork_state {
	struct ksift_window win;  /* forks (new processes) of this parent */
};

/* Fork bombs: the whole, not one parent. A tree is every process of one
 * session (the kernel's session id, which children inherit and which neither
 * the root's exit nor reparenting changes): in a bomb no single process forks
 * much, but the tree's forks and its live members grow together. */
struct ksift_tree_state {
	struct ksift_window win;  /* forks by any member of the tree */
	__s64 live;               /* members born while we watched, minus those gone */
	__s64 peak_live;          /* most alive at once */
	__u64 bomb_window_ns;     /* window of its last bomb crossing (0: never): fork storms defer to it */
};

#define KSIFT_CMDLINE_LEN 96

struct ksift_bomb_crossing {
	struct ksift_crossing head; /* forks by the tree's members: in this window, and since first tracked */
	__u32 tree;                 /* the session id that keys the tree */
	__u32 live;                 /* members alive at the crossing */
	__u32 peak_live;
	__u32 min_live;             /* the rule's bar for live members */
	__u32 cmdline_len;          /* bytes of argv in the forking member's memory (cmdline holds a prefix) */
	__u32 pad;
	char cmdline[KSIFT_CMDLINE_LEN]; /* the forking member's argv, NUL-separated, truncated */
};
const struct ksift_bomb_crossing *ksift_bomb_crossing_abi __attribute__((unused));

#endif /* KSIFT_PROCESS_H */
