/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * lifecycle.h: the lifecycle sensor's records, state and counters
 * (exec churn: short-lived exec'd children per parent; crash loops: failed
 * exits of one executable under one parent).
 * Python mirror: src/ksift/sensors/lifecycle.py, checked by tests/unit/test_abi.py.
 */
#ifndef KSIFT_LIFECYCLE_H
#define KSIFT_LIFECYCLE_H

#include "ksift.h"

enum ksift_lifecycle_record {
	KSIFT_REC_CHURN_CROSSING = KSIFT_REC_LIFECYCLE_BASE + 1, /* a parent crossed the churn threshold */
	KSIFT_REC_CHURN_EXIT = KSIFT_REC_LIFECYCLE_BASE + 2,     /* a flagged parent exited: final totals */
	KSIFT_REC_CRASH_CROSSING = KSIFT_REC_LIFECYCLE_BASE + 3, /* (parent, exe) crossed the crash threshold */
};

enum ksift_lifecycle_counter {
	KSIFT_CNT_LC_EXIT_SEEN = KSIFT_CNT_SENSOR_BASE, /* thread-group exits */
	KSIFT_CNT_LC_EXIT_SELF,        /* exits of ksift or of its children: filtered */
	KSIFT_CNT_CHURN_LONG_LIVED,    /* exec'd children that outlived max_lifetime: filtered */
	KSIFT_CNT_CHURN_AGGREGATED,    /* short-lived exec'd children counted per parent */
	KSIFT_CNT_CHURN_CROSSINGS,     /* churn crossings (one per parent per window) */
	KSIFT_CNT_CHURN_EXIT_FLAGGED,  /* exits of flagged parents (final record) */
	KSIFT_CNT_CRASH_AGGREGATED,    /* failed exits counted per (parent, exe) */
	KSIFT_CNT_CRASH_CROSSINGS,     /* crash crossings (one per key per window) */
};

/* signal_struct->flags bit of a thread group that is exiting as a whole
 * (include/linux/sched/signal.h; a #define, so not in BTF). Exit statuses here
 * are what the parent's wait() gets: (status << 8) | signal, 0x80 = core dumped. */
#define KSIFT_SIGNAL_GROUP_EXIT 0x00000004

/* A parent and one executable: the key of crash loops and of the churn
 * sensor's per-executable counts. */
struct ksift_lc_key {
	__u32 parent_tgid;
	__u32 pad;                 /* always 0: keys are hashed as raw bytes */
	char exe[KSIFT_PATH_LEN];  /* exec path, else the exe basename, else comm */
};

/* Per-parent churn state in the LRU hash, keyed by tgid. */
struct ksift_churn_state {
	struct ksift_window win;   /* short-lived exec'd children of this parent */
};

/* Short-lived children of one parent per executable (for "top executables"). */
struct ksift_churn_exe {
	__u64 count;
	__u64 parent_start_ns;     /* the parent's start_boottime: a recycled pid starts over */
};

struct ksift_churn_crossing {
	struct ksift_crossing head; /* short-lived exec'd children of the parent */
	__u64 max_lifetime_ns;
	__u64 last_lifetime_ns;    /* the child whose exit crossed: how long it lived */
	__u32 last_child_tgid;
	__u32 pad;
	char last_child_exe[KSIFT_PATH_LEN - 32]; /* its exec path, truncated to fit the record */
};

/* KSIFT_REC_CHURN_EXIT carries a struct ksift_window_exit (exit_code: the
 * wait() status, (status << 8) | signal). */

/* Per-(parent, exe) crash state in the LRU hash. */
struct ksift_crash_state {
	struct ksift_window win;   /* failed exits of this executable under this parent */
	__u32 last_code;           /* wait() status of the last failure */
	__u32 same_code_run;       /* consecutive failures with last_code */
	__u32 last_tgid;
	__u32 pad;
};

struct ksift_crash_crossing {
	struct ksift_crossing head; /* failed exits of this executable under this parent */
	__u64 lifetime_ns;         /* how long the crossing child lived */
	__u32 exit_code;           /* wait() status of this failure */
	__u32 same_code_run;       /* consecutive failures with exit_code, this one included */
	__u32 parent_tgid;
	__u32 pad;
};

#endif /* KSIFT_LIFECYCLE_H */
