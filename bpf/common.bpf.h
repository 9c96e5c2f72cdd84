/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * common.bpf.h: the pieces every ksift sensor shares: the event ring buffer,
 * the per-CPU funnel counters, self-exclusion and task context capture.
 * Included by exactly one .bpf.c per object.
 */
#ifndef KSIFT_COMMON_BPF_H
#define KSIFT_COMMON_BPF_H

/* Set by the loader between open and load. */
const volatile __u32 ksift_tgid = 0;          /* the agent itself: never counted */
const volatile __u64 wakeup_bytes = 65536;    /* force a wake-up past this much unread data */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); /* resized by the loader */
} ks_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ksift_counters);
} ks_counters SEC(".maps");

/* Anchor every record layout in the object's BTF so the Python mirror can be
 * checked against it (tests/unit/test_abi.py). Never read or written. */
const struct ksift_record *ksift_record_abi __attribute__((unused));

static __always_inline void count(__u32 idx)
{
	__u32 zero = 0;
	struct ksift_counters *c = bpf_map_lookup_elem(&ks_counters, &zero);

	if (c && idx < KSIFT_CNT_MAX)
		c->v[idx]++;
}

static __always_inline struct ksift_record *reserve_record(__u32 type, __u64 now)
{
	struct ksift_record *rec = bpf_ringbuf_reserve(&ks_events, sizeof(*rec), 0);

	if (!rec) {
		count(KSIFT_CNT_RB_DROPPED);
		return NULL;
	}
	/* Reserved memory is not zeroed: clear it so no stale bytes reach user space. */
	__builtin_memset(rec, 0, sizeof(*rec));
	rec->type = type;
	rec->cpu = bpf_get_smp_processor_id();
	rec->ktime_ns = now;
	return rec;
}

/* Submit without waking the reader unless the unread data crossed the
 * watermark: the reader drains on its tick anyway, and a wake-up per record
 * costs more than the record. */
static __always_inline void submit_record(struct ksift_record *rec)
{
	__u64 unread = bpf_ringbuf_query(&ks_events, BPF_RB_AVAIL_DATA);

	count(KSIFT_CNT_RB_EMITTED);
	if (unread + sizeof(*rec) >= wakeup_bytes) {
		count(KSIFT_CNT_RB_WAKEUPS);
		bpf_ringbuf_submit(rec, BPF_RB_FORCE_WAKEUP);
	} else {
		bpf_ringbuf_submit(rec, BPF_RB_NO_WAKEUP);
	}
}

/* Capture who the task is now: identity, credentials, cgroup and ancestry. */
static __always_inline void fill_task(struct ksift_task *out, struct task_struct *task)
{
	struct task_struct *leader = BPF_CORE_READ(task, group_leader);
	struct task_struct *p = task;
	__u32 i, pid;

	out->tgid = BPF_CORE_READ(task, tgid);
	out->pid = BPF_CORE_READ(task, pid);
	out->ppid = BPF_CORE_READ(task, real_parent, tgid);
	out->uid = BPF_CORE_READ(task, cred, uid.val);
	out->gid = BPF_CORE_READ(task, cred, gid.val);
	out->cgroup_id = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	out->start_boottime_ns = BPF_CORE_READ(leader, start_boottime);
	BPF_CORE_READ_STR_INTO(&out->comm, leader, comm);

	for (i = 0; i < KSIFT_ANCESTRY_MAX; i++) {
		p = BPF_CORE_READ(p, real_parent, group_leader);
		if (!p)
			break;
		pid = BPF_CORE_READ(p, tgid);
		if (pid == 0) /* the idle task: above init */
			break;
		out->ancestry[i].pid = pid;
		BPF_CORE_READ_STR_INTO(&out->ancestry[i].comm, p, comm);
		out->ancestry_len = i + 1;
		if (pid == 1)
			break;
	}
}

/* The executable's basename from mm->exe_file: always at hand, unlike the full
 * path (bpf_d_path is not allowed from tracepoints). Enrichment adds the full
 * path from /proc while the process lives. */
static __always_inline void fill_exe_name(struct ksift_task *out, struct task_struct *task)
{
	const unsigned char *name = BPF_CORE_READ(task, mm, exe_file, f_path.dentry, d_name.name);

	if (name)
		bpf_probe_read_kernel_str(out->exe, sizeof(out->exe), name);
}

#endif /* KSIFT_COMMON_BPF_H */
