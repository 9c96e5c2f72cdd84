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
/* Bytes of a process's arguments (its arg area: argv, NUL-separated) a record
 * carries; a longer command line is cut here and says so (args_size). */
#define KSIFT_ARGS_LEN 376
/* Bytes of a cgroup's own name (the last part of its path) a record carries. */
#define KSIFT_TASK_CGROUP_LEN 128
#define KSIFT_ANCESTRY_MAX 8

/* Address families (include/linux/socket.h: #defines, so not in vmlinux.h),
 * as the net and request sensors' keys and records carry them. */
#define KSIFT_AF_INET  2
#define KSIFT_AF_INET6 10

/* Total size of one record as submitted to the ring buffer. With the ring
 * buffer's own 8-byte header every record occupies exactly 1024 bytes: the
 * task's context (with its command line) and a payload of up to 144 bytes. */
#define KSIFT_RECORD_SIZE 1016

/* Record types (ksift_record.type): one range per sensor, so a type names its
 * sensor in any dump. Each sensor's own header (bpf/<sensor>.h) defines its
 * types, payload structs and counters. */
#define KSIFT_REC_PROCESS_BASE   0   /* process.h: fork storms */
#define KSIFT_REC_LIFECYCLE_BASE 10  /* lifecycle.h: exec churn, crash loops */
#define KSIFT_REC_FILE_BASE      20  /* file.h: fd bursts */
#define KSIFT_REC_NET_BASE       30  /* net.h: connection storms */
#define KSIFT_REC_REQUEST_BASE   40  /* request.h: slow requests */
#define KSIFT_REC_CPU_BASE       50  /* cpu.h: CPU hogs */
#define KSIFT_REC_MEMORY_BASE    60  /* memory.h: OOM kills, memory growth */
#define KSIFT_REC_SENSOR_SPAN    10  /* types per sensor: type / 10 names the range */
/* Synthetic records a load generator (bench/flood.bpf.c) pushes through the
 * shared ring buffer to measure the transport: counted and skipped by the agent. */
#define KSIFT_REC_FLOOD          250

/* Per-CPU counters, one slot each in ksift_counters.v[]. Slots below
 * KSIFT_CNT_SENSOR_BASE are the transport's and mean the same in every object;
 * each sensor numbers its own from KSIFT_CNT_SENSOR_BASE up (what it saw,
 * filtered, aggregated and emitted). */
enum ksift_counter {
	KSIFT_CNT_RB_EMITTED = 0,      /* records submitted to the ring buffer */
	KSIFT_CNT_RB_DROPPED,          /* ring buffer reservations that failed */
	KSIFT_CNT_RB_WAKEUPS,          /* forced wake-ups (watermark crossed) */
	KSIFT_CNT_MAP_FULL,            /* map updates that failed */
	KSIFT_CNT_SENSOR_BASE = 4,
	KSIFT_CNT_MAX = 32,
};

struct ksift_counters {
	__u64 v[KSIFT_CNT_MAX];
};

/* The transport's own per-CPU counters, in the one ks_transport map that every
 * object shares with the agent's core object (as it shares ks_events): the
 * agent reads this one map, at most once a second, to see any loss anywhere. */
enum ksift_transport_counter {
	KSIFT_TR_EMITTED = 0,          /* records submitted to ks_events, by any object */
	KSIFT_TR_DROPPED,              /* reservations that failed (ring buffer full) */
	KSIFT_TR_WAKEUPS,              /* submits that woke the reader */
	KSIFT_TR_MAX = 8,
};

struct ksift_transport {
	__u64 v[KSIFT_TR_MAX];
};

/* Marks on a process (task storage on its group leader, shared by every object
 * through the core object): a sensor marks a process when it makes per-process
 * state for it, so the exit hooks look their maps up only for marked
 * processes: most processes that exit never had any state, and a task-storage
 * miss costs far less than a hash lookup at every exit. */
enum ksift_mark {
	KSIFT_MARK_FORK_PARENT = 1 << 0,  /* process: an entry in ks_fork_state */
	KSIFT_MARK_CHURN_PARENT = 1 << 1, /* lifecycle: an entry in ks_churn_state */
	KSIFT_MARK_CPU = 1 << 2,          /* cpu: an entry in ks_cpu_state */
	KSIFT_MARK_FILE = 1 << 3,         /* file: entries in ks_fd_state / ks_fd_dirs */
};

struct ksift_marks {
	__u32 bits; /* enum ksift_mark */
	__u32 pad;
};

/* The last exec of a process (task storage on its group leader, shared by every
 * object through the core object): which executable a record names and with
 * which arguments, even when the process is gone by the time user space reads it. */
struct ksift_exec {
	char path[KSIFT_PATH_LEN]; /* bprm->filename, NUL-padded (copied whole into hashed keys) */
	__u32 args_size;           /* bytes of the new arg area (argv, NUL-separated) at exec */
	__u32 pad;
	char args[KSIFT_ARGS_LEN]; /* its first min(args_size, KSIFT_ARGS_LEN) bytes, then zeros */
};

/* Where a record's executable and arguments came from (ksift_task.ctx_flags). */
enum ksift_ctx_flag {
	KSIFT_CTX_EXE_EXEC = 1 << 0,   /* exe: the exec path the core object kept */
	KSIFT_CTX_ARGS_EXEC = 1 << 1,  /* args: copied at exec by the core object */
	KSIFT_CTX_ARGS_EVENT = 1 << 2, /* args: read from the process's memory at the event (no exec seen) */
	KSIFT_CTX_EXE_EVENT = 1 << 3,  /* exe: the full path of its executable file, resolved at the event */
};
/* Neither EXE flag: exe is the executable's basename, or empty. */

/* Directories a resolved executable path may have (deeper: the exec path or
 * the basename instead). */
#define KSIFT_EXE_DEPTH 32

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
	char cgroup_name[KSIFT_TASK_CGROUP_LEN]; /* its cgroup v2's own name: names it once the cgroup is gone */
	__u32 args_size;        /* bytes of the process's arg area (0: none captured) */
	__u32 ctx_flags;        /* enum ksift_ctx_flag: where exe and args came from */
	char args[KSIFT_ARGS_LEN]; /* argv, NUL-separated: its first min(args_size, KSIFT_ARGS_LEN) bytes */
};

struct ksift_record {
	__u32 type;             /* enum ksift_record_type */
	__u32 cpu;
	__u64 ktime_ns;         /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	struct ksift_task task;
	union {
		__u8 raw[KSIFT_RECORD_SIZE - 16 - sizeof(struct ksift_task)];
	} u; /* the sensor's payload: cast raw to its struct (see KSIFT_PAYLOAD) */
};

/* Windowed counting, the state every counting sensor keeps per key (first
 * member of its state struct; helpers in common.bpf.h): fixed windows that
 * start at the first event after the previous one ended, and at most one
 * crossing record per key per window. */
struct ksift_window {
	__u64 window_start_ns;    /* ktime of the window's first event */
	__u64 reported_window_ns; /* window_start_ns of the last crossing emitted */
	__u64 total;              /* events of this key since first tracked */
	__u32 window_count;       /* events in this window */
	__u32 flagged;            /* crossed at least once: report its exit */
};

/* The head every windowed crossing payload starts with (first member "head"
 * of each sensor's crossing struct), filled by window_crossing() in
 * common.bpf.h: which window crossed, and by how much. */
struct ksift_crossing {
	__u64 window_start_ns;    /* ktime of the window's first event */
	__u64 total;              /* events of this key since first tracked */
	__u32 window_count;       /* events in this window at the crossing */
	__u32 threshold;          /* events per window the count went over */
};

/* Payload of a sensor's exit record: the final totals of a flagged key whose
 * process is gone. */
struct ksift_window_exit {
	__u64 window_start_ns;
	__u64 total;
	__u32 window_count;
	__u32 exit_code;        /* the sensor's: task->exit_code, or the wait() status */
};

/* The payload of a record as the sensor's own struct, checked to fit. */
#define KSIFT_PAYLOAD(rec, type) ({ \
	_Static_assert(sizeof(type) <= sizeof((rec)->u.raw), #type " does not fit a record"); \
	(type *)(rec)->u.raw; })

#endif /* KSIFT_H */
