// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Memory sensor: OOM kills and resident memory growth.
 *
 * tp_btf/mark_victim: one record per OOM victim with its memory figures and the
 * memory cgroup whose limit was hit, found here while the charge that failed is
 * still accounted (the nearest memcg, from the victim's up, whose page_counter
 * usage is at its max).
 *
 * iter/task, run by user space once per poll (sensors/memory.py): a pass over
 * every task reads each process's RSS (the kernel's own mm counters) and
 * reports a process only when its RSS moved a whole step from its last report,
 * so a growing process sends a record per poll at most and a stable one none.
 * Nothing runs on page faults or forks: the cost is one pass per poll, whatever
 * the host does. User space decides whether the reports add up to growth.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "memory.h"
#include "common.bpf.h"

/* task_struct.flags (include/linux/sched.h) */
#define KS_PF_KTHREAD 0x00200000

/* Deep enough for any real cgroup tree; bounds the verifier's loop. */
#define KS_MEMCG_DEPTH_MAX 16

/* Set from the rules between open and load (see sensors/memory.py). */
const volatile __u64 rss_step_pages = 8192;        /* 32 MiB of 4 KiB pages */
/* A memcg counts as "at its limit" when its usage is within this of its max
 * (capped at max/8): the charge that failed is usually a page or a huge page,
 * and per-CPU charge stocks keep usage a little under max. */
const volatile __u64 oom_limit_slack_pages = 1024; /* 4 MiB */

/* Per-process RSS state, attached to the thread group leader's task_struct:
 * a cached lookup without hashing, gone with the process (no stale entry for a
 * recycled pid), and only processes seen past one step have one. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ksift_rss_state);
} ks_rss_state SEC(".maps");

/* Anchor the payload layouts in the object's BTF for tests/unit/test_abi.py. */
const struct ksift_oom_kill *ksift_oom_kill_abi __attribute__((unused));
const struct ksift_rss_step *ksift_rss_step_abi __attribute__((unused));

/* The kernel's own figure (get_mm_counter, as /proc/PID/status shows it): the
 * counter's global part, which lags the per-CPU deltas by at most a batch (32
 * pages here) per CPU. mm->rss_stat is a percpu_counter array since Linux 6.2;
 * older kernels fail to load this. A direct (CO-RE relocated) load. `member`
 * is the kernel's mm counter index (MM_FILEPAGES, MM_ANONPAGES...: the
 * anonymous enum of include/linux/mm_types_task.h, in vmlinux.h). */
static __always_inline __u64 mm_pages(struct mm_struct *mm, int member)
{
	__s64 n = mm->rss_stat[member].count;

	return n > 0 ? n : 0;
}

static __always_inline void fill_memcg_name(char *out, struct mem_cgroup *memcg)
{
	const char *name = BPF_CORE_READ(memcg, css.cgroup, kn, name);

	if (name)
		bpf_probe_read_kernel_str(out, KSIFT_MEMCG_NAME_LEN, name);
}

/* From the victim's memcg up: the nearest one whose memory (or, on v1,
 * memory+swap) counter is at its max is the one whose limit was hit. */
static __always_inline void find_limit(struct ksift_oom_kill *oom, struct task_struct *task)
{
	int memory_id = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
	struct cgroup_subsys_state *css = NULL;
	struct mem_cgroup *memcg;
	struct css_set *cset;
	__u64 usage, max, slack;
	__u32 depth, kind;

	cset = BPF_CORE_READ(task, cgroups);
	if (!cset || memory_id < 0 || memory_id >= CGROUP_SUBSYS_COUNT)
		return;
	bpf_core_read(&css, sizeof(css), &cset->subsys[memory_id]);
	if (!css)
		return;
	/* css is mem_cgroup's first member (container_of with a CO-RE offset). */
	memcg = (void *)css - bpf_core_field_offset(struct mem_cgroup, css);
	oom->memcg_id = BPF_CORE_READ(memcg, css.cgroup, kn, id);
	oom->hierarchy_id = BPF_CORE_READ(memcg, css.cgroup, root, hierarchy_id);
	fill_memcg_name(oom->memcg_name, memcg);

	for (depth = 0; depth < KS_MEMCG_DEPTH_MAX; depth++) {
		kind = KSIFT_OOM_LIMIT_NONE;
		max = BPF_CORE_READ(memcg, memory.max);
		usage = BPF_CORE_READ(memcg, memory.usage.counter);
		slack = max >> 3 < oom_limit_slack_pages ? max >> 3 : oom_limit_slack_pages;
		if (usage + slack >= max) {
			kind = KSIFT_OOM_LIMIT_MEMORY;
		} else if (oom->hierarchy_id != 0) {
			/* v1 only: the union holds memsw there (swap on v2 never triggers an OOM) */
			max = BPF_CORE_READ(memcg, memsw.max);
			usage = BPF_CORE_READ(memcg, memsw.usage.counter);
			slack = max >> 3 < oom_limit_slack_pages ? max >> 3 : oom_limit_slack_pages;
			if (usage + slack >= max)
				kind = KSIFT_OOM_LIMIT_MEMSW;
		}
		if (kind != KSIFT_OOM_LIMIT_NONE) {
			oom->limit_kind = kind;
			oom->limit_depth = depth;
			oom->limit_pages = max;
			oom->usage_pages = usage;
			oom->limit_memcg_id = BPF_CORE_READ(memcg, css.cgroup, kn, id);
			fill_memcg_name(oom->limit_name, memcg);
			count(KSIFT_CNT_OOM_LIMIT_FOUND);
			return;
		}
		css = BPF_CORE_READ(memcg, css.parent);
		if (!css) /* the root memcg: no limit of its own */
			return;
		memcg = (void *)css - bpf_core_field_offset(struct mem_cgroup, css);
	}
}

SEC("tp_btf/mark_victim")
int BPF_PROG(ks_mark_victim, struct task_struct *task, uid_t uid)
{
	struct ksift_oom_kill *oom;
	struct ksift_record *rec;
	struct mm_struct *mm;

	count(KSIFT_CNT_OOM_SEEN);
	/* Rare and final: no retry is possible, a failed reservation is counted. */
	rec = reserve_record(KSIFT_REC_OOM_KILL, bpf_ktime_get_ns());
	if (!rec)
		return 0;
	fill_task(&rec->task, task);
	fill_exe(&rec->task, task);
	oom = KSIFT_PAYLOAD(rec, struct ksift_oom_kill);
	oom->uid = uid;
	oom->trigger_tgid = bpf_get_current_pid_tgid() >> 32;
	oom->oom_score_adj = BPF_CORE_READ(task, signal, oom_score_adj);
	/* The victim still holds its mm here (the kernel reports the same figures). */
	mm = task->mm;
	if (!mm)
		mm = task->signal->oom_mm;
	if (mm) {
		oom->total_vm_pages = mm->total_vm;
		oom->anon_rss_pages = mm_pages(mm, MM_ANONPAGES);
		oom->file_rss_pages = mm_pages(mm, MM_FILEPAGES);
		oom->shmem_rss_pages = mm_pages(mm, MM_SHMEMPAGES);
		oom->pgtables_bytes = mm->pgtables_bytes.counter;
	}
	find_limit(oom, task);
	submit_record(rec);
	return 0;
}

/* One task of a pass (the iterator visits every task, threads included, then
 * calls once more with task NULL at the end of the pass). */
SEC("iter/task")
int ks_rss_iter(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	struct ksift_rss_state *st;
	struct ksift_rss_step *step;
	struct ksift_record *rec;
	struct mm_struct *mm;
	__u64 rss, anon, file, shmem, level, now;

	if (!task) {
		count(KSIFT_CNT_RSS_PASSES);
		return 0;
	}
	count(KSIFT_CNT_RSS_TASKS);
	/* Processes only: their leader stands for them (the mm is shared by every
	 * thread). Kernel threads have no RSS of their own (one may borrow an mm),
	 * an exiting process has dropped its mm, and ksift does not watch itself. */
	if (task->pid != task->tgid || task->flags & KS_PF_KTHREAD || task->tgid == ksift_tgid)
		return 0;
	mm = task->mm;
	if (!mm)
		return 0;
	count(KSIFT_CNT_RSS_PROCS);
	file = mm_pages(mm, MM_FILEPAGES);
	anon = mm_pages(mm, MM_ANONPAGES);
	shmem = mm_pages(mm, MM_SHMEMPAGES);
	rss = file + anon + shmem;

	st = bpf_task_storage_get(&ks_rss_state, task, 0, 0);
	if (!st) {
		/* Most processes never reach one step: no state for them. */
		if (rss < rss_step_pages)
			return 0;
		/* First seen past one step: the baseline the first report is measured from. */
		st = bpf_task_storage_get(&ks_rss_state, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (!st) {
			count(KSIFT_CNT_MAP_FULL);
			return 0;
		}
		st->mm = (__u64)mm;
		st->level_pages = rss;
		st->level_ns = bpf_ktime_get_ns();
		count(KSIFT_CNT_RSS_TRACKED);
		return 0;
	}
	if (st->mm != (__u64)mm) {
		/* exec gave this process a new address space: start over */
		st->mm = (__u64)mm;
		st->level_pages = rss;
		st->level_ns = bpf_ktime_get_ns();
		st->reports = 0;
		count(KSIFT_CNT_RSS_REBASED);
		return 0;
	}
	level = st->level_pages;
	if (rss < level + rss_step_pages && rss + rss_step_pages > level)
		return 0;
	/* A step (or more) away from the last report. One pass runs at a time
	 * (user space reads one iterator to its end), so no other CPU races us. */
	now = bpf_ktime_get_ns();
	rec = reserve_record(KSIFT_REC_RSS_STEP, now);
	if (!rec)
		return 0; /* counted; the next pass tries again from the same level */
	fill_task(&rec->task, task);
	fill_exe(&rec->task, task);
	step = KSIFT_PAYLOAD(rec, struct ksift_rss_step);
	step->rss_pages = rss;
	step->anon_pages = anon;
	step->file_pages = file;
	step->shmem_pages = shmem;
	step->prev_pages = level;
	step->prev_ns = st->level_ns;
	step->reports = ++st->reports;
	st->level_pages = rss;
	st->level_ns = now;
	count(KSIFT_CNT_RSS_STEPS);
	submit_record(rec);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
