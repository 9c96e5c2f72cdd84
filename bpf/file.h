/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * file.h: the file sensor's records, state and counters (fd bursts: one
 * process opening many new file descriptors in a short window).
 * Python mirror: src/ksift/sensors/files.py, checked by tests/unit/test_abi.py.
 */
#ifndef KSIFT_FILE_H
#define KSIFT_FILE_H

#include "ksift.h"

/* x86-64 syscall numbers that return a new file descriptor (arch/x86/entry/syscalls/syscall_64.tbl). */
#define KSIFT_NR_OPEN     2
#define KSIFT_NR_SOCKET   41
#define KSIFT_NR_ACCEPT   43
#define KSIFT_NR_CREAT    85
#define KSIFT_NR_OPENAT   257
#define KSIFT_NR_ACCEPT4  288
#define KSIFT_NR_OPENAT2  437

/* Directories sampled per flagged process: a bounded top-k (space-saving). */
#define KSIFT_DIR_SLOTS 8
/* Bytes of a user path read per sample: long enough to find the last '/'. */
#define KSIFT_USER_PATH_LEN 256

enum ksift_file_record {
	KSIFT_REC_FD_CROSSING = KSIFT_REC_FILE_BASE + 1, /* a process crossed the fd threshold */
	KSIFT_REC_FD_EXIT = KSIFT_REC_FILE_BASE + 2,     /* a flagged process exited: final totals */
};

enum ksift_file_counter {
	KSIFT_CNT_FD_SEEN = KSIFT_CNT_SENSOR_BASE, /* fd-creating syscalls that returned */
	KSIFT_CNT_FD_FAILED,           /* ... with an error: no new fd, filtered */
	KSIFT_CNT_FD_SELF,             /* by ksift itself: filtered */
	KSIFT_CNT_FD_AGGREGATED,       /* new fds counted in the per-process map */
	KSIFT_CNT_FD_CROSSINGS,        /* threshold crossings (one per process per window) */
	KSIFT_CNT_DIR_SAMPLES,         /* opens of hot processes whose directory was counted */
	KSIFT_CNT_DIR_UNREADABLE,      /* samples whose path could not be read */
	KSIFT_CNT_FILE_EXIT_FLAGGED,   /* exits of flagged processes (final record) */
};

struct ksift_fd_crossing {
	struct ksift_crossing head; /* new fds of this process */
	__u32 window_sockets;   /* of which sockets (socket, accept, accept4) */
	__u32 pad;
};

/* KSIFT_REC_FD_EXIT carries a struct ksift_window_exit (exit_code:
 * task->exit_code, (status << 8) | signal). */

/* Per-process state in the LRU hash, keyed by tgid. */
struct ksift_fd_state {
	struct ksift_window win;  /* new fds of this process */
	__u32 window_sockets;     /* of which sockets, in this window */
	__u32 pad;
};

/* One sampled directory of a hot process. */
struct ksift_dir_slot {
	__u64 hash;               /* FNV-1a of the directory (0: free slot) */
	__u32 count;              /* samples (space-saving: may overestimate by the slot's previous minimum) */
	__u16 len;                /* length of the directory name before truncation */
	__u8 relative;            /* 1: only the opened file's parent directory name is known */
	__u8 pad;
	char name[KSIFT_PATH_LEN];
};

/* Directory counts of a process over (or close to) its threshold, keyed by tgid. */
struct ksift_fd_dirs {
	__u32 samples;            /* opens sampled */
	__u32 unreadable;         /* samples whose path could not be read */
	struct ksift_dir_slot slot[KSIFT_DIR_SLOTS];
};

/* Per-CPU scratch for one path sample (too big for the BPF stack). */
struct ksift_path_scratch {
	char path[KSIFT_USER_PATH_LEN];
};

#endif /* KSIFT_FILE_H */
