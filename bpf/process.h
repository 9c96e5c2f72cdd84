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
};

enum ksift_process_counter {
	KSIFT_CNT_FORK_SEEN = KSIFT_CNT_SENSOR_BASE, /* every sched_process_fork */
	KSIFT_CNT_FORK_THREADS,        /* clones that made a thread: not counted */
	KSIFT_CNT_FORK_SELF,           /* forks by ksift itself: filtered */
	KSIFT_CNT_FORK_AGGREGATED,     /* new processes counted in the per-parent map */
	KSIFT_CNT_FORK_CROSSINGS,      /* threshold crossings (one per parent per window) */
	KSIFT_CNT_EXIT_SEEN,           /* thread-group exits */
	KSIFT_CNT_EXIT_FLAGGED,        /* exits of flagged parents (final record) */
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

#endif /* KSIFT_PROCESS_H */
