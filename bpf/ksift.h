/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * ksift.h: every record layout and constant shared between the BPF programs
 * and the Python agent. The Python mirror lives in src/ksift/transport/records.py
 * and tests/unit/test_abi.py checks it against the BTF of the built objects.
 *
 * Records are fixed-size (KSIFT_RECORD_SIZE) with the type tag at offset 0, so a
 * batch read from the ring buffer decodes as one numpy structured array.
 */
#ifndef KSIFT_H
#define KSIFT_H

#define KSIFT_COMM_LEN 16
#define KSIFT_PATH_LEN 128
#define KSIFT_ANCESTRY_MAX 8

/* Total size of one record as submitted to the ring buffer. With the ring
 * buffer's own 8-byte header every record occupies exactly 512 bytes. */
#define KSIFT_RECORD_SIZE 504

/* Record types (ksift_record.type). */
enum ksift_record_type {
	KSIFT_REC_FORK_CROSSING = 1, /* a parent crossed the fork threshold in a window */
	KSIFT_REC_FORK_EXIT = 2,     /* a flagged parent exited: final totals */
};

/* Per-CPU counters, one slot each in ksift_counters.v[]. Every stage of the
 * kernel side counts what it saw, filtered, aggregated, emitted and dropped. */
enum ksift_counter {
	KSIFT_CNT_FORK_SEEN = 0,       /* every sched_process_fork */
	KSIFT_CNT_FORK_THREADS,        /* clones that made a thread: not counted */
	KSIFT_CNT_FORK_SELF,           /* forks by ksift itself: filtered */
	KSIFT_CNT_FORK_AGGREGATED,     /* new processes counted in the per-parent map */
	KSIFT_CNT_FORK_CROSSINGS,      /* threshold crossings (one per parent per window) */
	KSIFT_CNT_EXEC_SEEN,
	KSIFT_CNT_EXIT_SEEN,           /* thread-group exits */
	KSIFT_CNT_EXIT_FLAGGED,        /* exits of flagged parents (final record) */
	KSIFT_CNT_MAP_FULL,            /* map updates that failed */
	KSIFT_CNT_RB_EMITTED,          /* records submitted to the ring buffer */
	KSIFT_CNT_RB_DROPPED,          /* ring buffer reservations that failed */
	KSIFT_CNT_RB_WAKEUPS,          /* forced wake-ups (watermark crossed) */
	KSIFT_CNT_MAX = 16,
};

struct ksift_counters {
	__u64 v[KSIFT_CNT_MAX];
};

struct ksift_ancestor {
	__u32 pid;
	char comm[KSIFT_COMM_LEN];
};

/* Context of a task captured in the kernel at event time: it stays valid after
 * the process is gone. */
struct ksift_task {
	__u64 cgroup_id;        /* cgroup v2 id (inode of the cgroup directory) */
	__u64 start_boottime_ns; /* group leader's start, CLOCK_BOOTTIME ns */
	__u32 tgid;
	__u32 pid;
	__u32 ppid;             /* real parent's tgid */
	__u32 uid;
	__u32 gid;
	__u32 ancestry_len;     /* valid entries in ancestry[], parent first */
	char comm[KSIFT_COMM_LEN];
	struct ksift_ancestor ancestry[KSIFT_ANCESTRY_MAX];
	char exe[KSIFT_PATH_LEN]; /* exec filename if seen, else exe basename */
};

struct ksift_fork_crossing {
	__u64 window_start_ns;  /* ktime of the window's first fork */
	__u64 total;            /* forks by this parent since first tracked */
	__u32 window_count;     /* forks in this window at the crossing */
	__u32 threshold;
};

struct ksift_fork_exit {
	__u64 window_start_ns;
	__u64 total;
	__u32 window_count;
	__u32 exit_code;        /* task->exit_code: (status << 8) | signal */
};

struct ksift_record {
	__u32 type;             /* enum ksift_record_type */
	__u32 cpu;
	__u64 ktime_ns;         /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	struct ksift_task task;
	union {
		struct ksift_fork_crossing fork;
		struct ksift_fork_exit fork_exit;
		__u8 raw[KSIFT_RECORD_SIZE - 16 - sizeof(struct ksift_task)];
	} u;
};

/* Per-parent fork state in the LRU hash, keyed by tgid. */
struct ksift_fork_state {
	__u64 window_start_ns;
	__u64 reported_window_ns; /* window_start_ns of the last crossing emitted */
	__u64 total;
	__u32 window_count;
	__u32 flagged;            /* crossed at least once: report its exit */
};

#endif /* KSIFT_H */
