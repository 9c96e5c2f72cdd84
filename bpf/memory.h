/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * memory.h: the memory sensor's records, state and counters (OOM kills,
 * resident memory growth).
 * Python mirror: src/ksift/sensors/memory.py, checked by tests/unit/test_abi.py.
 */
#ifndef KSIFT_MEMORY_H
#define KSIFT_MEMORY_H

#include "ksift.h"

#define KSIFT_MEMCG_NAME_LEN 24

enum ksift_memory_record {
	KSIFT_REC_OOM_KILL = KSIFT_REC_MEMORY_BASE + 1, /* the OOM killer chose a victim */
	KSIFT_REC_RSS_STEP = KSIFT_REC_MEMORY_BASE + 2, /* a process's RSS moved a step from its last report */
};

enum ksift_memory_counter {
	KSIFT_CNT_OOM_SEEN = KSIFT_CNT_SENSOR_BASE, /* every oom:mark_victim */
	KSIFT_CNT_OOM_LIMIT_FOUND,     /* victims with a memory cgroup (or ancestor) at its limit */
	KSIFT_CNT_RSS_PASSES,          /* iter/task passes over every task (one per poll) */
	KSIFT_CNT_RSS_TASKS,           /* tasks those passes visited, threads and kernel threads included */
	KSIFT_CNT_RSS_PROCS,           /* processes whose RSS was read (leaders with an mm, not ksift) */
	KSIFT_CNT_RSS_TRACKED,         /* processes first seen past one step: tracked from then on */
	KSIFT_CNT_RSS_REBASED,         /* a tracked tgid with a new mm (exec): baseline reset */
	KSIFT_CNT_RSS_STEPS,           /* step records: RSS a step above or below the last report */
};

/* What the memory cgroup walk found at the victim's OOM kill. */
enum ksift_oom_limit_kind {
	KSIFT_OOM_LIMIT_NONE = 0,      /* no memory cgroup at its limit: system-wide (or policy) OOM */
	KSIFT_OOM_LIMIT_MEMORY = 1,    /* memory.limit_in_bytes (v1) / memory.max (v2) */
	KSIFT_OOM_LIMIT_MEMSW = 2,     /* memory.memsw.limit_in_bytes (v1: memory + swap) */
};

struct ksift_oom_kill {
	__u64 total_vm_pages;   /* the victim's mm, as the oom:mark_victim tracepoint reports it */
	__u64 anon_rss_pages;
	__u64 file_rss_pages;
	__u64 shmem_rss_pages;
	__u64 pgtables_bytes;
	__u64 memcg_id;         /* kernfs id (directory inode) of the victim's memory cgroup */
	__u64 limit_memcg_id;   /* the nearest memory cgroup at its limit, 0 if none */
	__u64 limit_pages;      /* its page_counter max */
	__u64 usage_pages;      /* its page_counter usage when the victim was marked */
	__s32 oom_score_adj;
	__u32 uid;
	__u32 trigger_tgid;     /* the process whose allocation ran the OOM killer */
	__u32 limit_kind;       /* enum ksift_oom_limit_kind */
	__u32 limit_depth;      /* levels above the victim's memory cgroup (0 = its own) */
	__u32 hierarchy_id;     /* the memory controller's hierarchy: 0 = cgroup v2, else a v1 mount */
	char memcg_name[KSIFT_MEMCG_NAME_LEN];  /* last path component, for when the cgroup is gone */
	char limit_name[KSIFT_MEMCG_NAME_LEN];
};

struct ksift_rss_step {
	__u64 rss_pages;        /* file + anon + shmem pages at this pass */
	__u64 anon_pages;
	__u64 file_pages;
	__u64 shmem_pages;
	__u64 prev_pages;       /* RSS at the previous report (or when first tracked) */
	__u64 prev_ns;          /* ktime of that report (or baseline): user space chains reports on it */
	__u64 reports;          /* step records of this mm so far, this one included */
};

/* Per-process RSS state: task storage of the thread group leader. */
struct ksift_rss_state {
	__u64 mm;               /* the mm the level belongs to: a new one (exec) starts over */
	__u64 level_pages;      /* RSS at the last report */
	__u64 level_ns;
	__u64 reports;
};

#endif /* KSIFT_MEMORY_H */
