/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * cpu.h: the CPU sensor's records, state and counters (CPU hogs).
 * Python mirror: src/ksift/sensors/cpu.py, checked by tests/unit/test_abi.py.
 */
#ifndef KSIFT_CPU_H
#define KSIFT_CPU_H

#include "ksift.h"

/* Frames kept per stack in the stack-trace map. Deep enough for real programs;
 * the map's memory is max_entries * depth * 8 bytes, preallocated. */
#define KSIFT_CPU_STACK_DEPTH 64

enum ksift_cpu_record {
	KSIFT_REC_CPU_CROSSING = KSIFT_REC_CPU_BASE + 1, /* a process went over the CPU share in a window */
	KSIFT_REC_CPU_EXIT = KSIFT_REC_CPU_BASE + 2,     /* a flagged process exited: final totals */
};

enum ksift_cpu_counter {
	KSIFT_CNT_CPU_SAMPLES = KSIFT_CNT_SENSOR_BASE, /* every cpu-clock sample, every CPU */
	KSIFT_CNT_CPU_IDLE,            /* samples of the idle task: nobody to count */
	KSIFT_CNT_CPU_SELF,            /* samples of ksift itself: filtered */
	KSIFT_CNT_CPU_AGGREGATED,      /* samples counted in the per-process map */
	KSIFT_CNT_CPU_CROSSINGS,       /* threshold crossings (one per process per window) */
	KSIFT_CNT_CPU_STACKS,          /* samples of hot processes whose stacks were counted */
	KSIFT_CNT_CPU_STACK_COLLISIONS, /* a stack's slot in the stack map held another stack: not captured */
	KSIFT_CNT_CPU_STACK_ERRORS,    /* stacks not captured for another reason (no memory, no callchain) */
	KSIFT_CNT_CPU_EXIT_FLAGGED,    /* exits of flagged processes (final record) */
};

struct ksift_cpu_crossing {
	struct ksift_crossing head; /* cpu-clock samples of this process */
	__u64 run_start_ns;     /* start of the current run of hot windows */
	__u64 run_samples;      /* samples since run_start_ns */
};
/* Anchor the payload layout in the BTF of the object that includes this header
 * (only casts reach it) for tests/unit/test_abi.py. Never used. */
const struct ksift_cpu_crossing *ksift_cpu_crossing_abi __attribute__((unused));

/* KSIFT_REC_CPU_EXIT carries a struct ksift_window_exit (exit_code:
 * task->exit_code, (status << 8) | signal). */

/* Per-process sampling state in the LRU hash, keyed by tgid. */
struct ksift_cpu_state {
	struct ksift_window win;  /* samples of this process */
	__u64 run_start_ns;       /* start of the current run of hot windows */
	__u64 run_samples;        /* samples since run_start_ns */
	__u32 prev_window_count;  /* samples in the previous window (hot when > threshold) */
	__u32 _pad;
};

/* Key of the per-stack sample counts of hot processes. A negative stack id
 * means no stack of that kind (a kernel thread has no user stack, a sample
 * taken in user mode has no kernel stack). */
struct ksift_cpu_stack_key {
	__u32 tgid;
	__s32 user_stack_id;
	__s32 kernel_stack_id;
	__u32 _pad;
};

#endif /* KSIFT_CPU_H */
