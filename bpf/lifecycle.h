/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * lifecycle.h: the lifecycle sensor's records, state and counters
 * (exec churn: short-lived exec'd children per parent; crash loops: early
 * failed exits of one executable under one parent or in one slice).
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
	KSIFT_CNT_CRASH_AGGREGATED,    /* early failures counted per key */
	KSIFT_CNT_CRASH_CROSSINGS,     /* crash crossings (one per key per run) */
	KSIFT_CNT_CRASH_LONG_LIVED,    /* failures of processes that outlived max_lifetime: filtered */
	KSIFT_CNT_CHURN_SUPERSEDED,    /* churn crossings left out: the child is in a reported crash loop */
};

/* signal_struct->flags bit of a thread group that is exiting as a whole
 * (include/linux/sched/signal.h; a #define, so not in BTF). Exit statuses here
 * are what the parent's wait() gets: (status << 8) | signal, 0x80 = core dumped. */
#define KSIFT_SIGNAL_GROUP_EXIT 0x00000004

/* A parent and one executable: the key of the churn sensor's per-executable counts. */
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

/* Crash loops. A failure is an exit with a non-zero status or by a signal, as
 * the parent's wait() sees it, of a process that lived at most max_lifetime.
 * A key's run is its failures in a row, each within window of the one before;
 * a failure that lived longer ends the run. Within the run, `paced` counts the
 * last failures that were each restarted at least min_gap after the previous
 * one ended (a supervisor's delay: back-off, RestartSec), `streak` the last ones
 * that each came within KSIFT_CRASH_STREAK_GAP_NS of the one before, however
 * they were restarted (a loop without a pause keeps one going; a script's
 * burst of failures is one too, but a short one). */
#define KSIFT_CRASH_CODES 4
#define KSIFT_CRASH_HISTORY 6
#define KSIFT_CRASH_NO_GAP (-2147483647 - 1) /* hist gap of a run's first failure: none before it */
#define KSIFT_CRASH_STREAK_GAP_NS 1000000000ULL /* a failure within 1 s of the last keeps the streak */
/* A cgroup's name (its directory: "web.service", "cri-containerd-<64 hex>.scope"). */
#define KSIFT_CGROUP_NAME_LEN 96

/* What a crash loop is keyed by: its executable and, when the process lives in
 * its parent's cgroup, the parent (a supervisor restarting a child in place);
 * else the parent cgroup of its own (a systemd unit's or a container's, under a
 * slice or a pod that outlives every restart, whoever the parent is). */
struct ksift_crash_key {
	__u64 cgroup_id;           /* that parent cgroup, else 0 */
	__u32 parent_tgid;         /* the parent, else 0 */
	__u32 pad;                 /* always 0: keys are hashed as raw bytes */
	char exe[KSIFT_PATH_LEN];  /* exec path, else the exe basename, else comm */
};

struct ksift_crash_code {
	__u32 status;              /* wait() status: (code << 8) | signal */
	__u32 count;               /* failures of the run with it */
};

struct ksift_crash_event {
	__s32 gap_ms;              /* previous failure's exit to this one's start (< 0: it started before) */
	__u32 lifetime_us;         /* how long this one lived */
};

/* A run's figures: kept in the state, copied whole into each crossing. */
struct ksift_crash_run {
	__u64 streak_start_ns;     /* exit of the first failure of the streak */
	__u32 paced;               /* last failures in a row restarted >= min_gap after the one before */
	__u32 streak;              /* last failures in a row within KSIFT_CRASH_STREAK_GAP_NS of the one before */
	__u32 hist_n;              /* failures written to hist; the next goes to hist[hist_n % HISTORY] */
	__u32 other_codes;         /* failures whose status found no free slot in codes */
	struct ksift_crash_code codes[KSIFT_CRASH_CODES];
	struct ksift_crash_event hist[KSIFT_CRASH_HISTORY];
};

/* Per-key crash state in the LRU hash. win.window_start_ns is the run's first
 * failure, win.window_count its failures, win.total every failure of the key. */
struct ksift_crash_state {
	struct ksift_window win;
	__u64 last_exit_ns;        /* the last failure's exit; 0: no run (none yet, or a long life ended it) */
	__u32 last_tgid;
	__u32 pad;
	struct ksift_crash_run run;
	/* Keyed by cgroup: the name of the last failure's own cgroup (the unit's,
	 * the container's), taken at its exit. Its supervisor may remove the
	 * cgroup a moment later (systemd does between restarts), and with it the
	 * only way user space could name it from the cgroup id. */
	char cgroup_name[KSIFT_CGROUP_NAME_LEN];
};

struct ksift_crash_crossing {
	struct ksift_crossing head; /* window_start_ns: the run's first failure; window_count: its failures */
	__u64 group_cgroup_id;     /* the key's cgroup (keyed by cgroup), else 0 */
	__u32 parent_tgid;         /* the failing process's parent */
	__u32 exit_code;           /* wait() status of this failure */
	struct ksift_crash_run run;
};

#endif /* KSIFT_LIFECYCLE_H */
