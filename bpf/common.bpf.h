/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * common.bpf.h: the pieces every ksift sensor shares: the event ring buffer,
 * the per-CPU funnel counters, self-exclusion, task context capture and the
 * windowed counting of the sensors that count events per key.
 * Included by exactly one .bpf.c per object.
 */
#ifndef KSIFT_COMMON_BPF_H
#define KSIFT_COMMON_BPF_H

/* Set by the loader between open and load. */
const volatile __u32 ksift_tgid = 0;          /* the agent itself: never counted */
const volatile __u64 wakeup_bytes = 65536;    /* force a wake-up past this much unread data */

/* Shared by every object: the core object (core.bpf.c) creates these three and
 * each sensor's object reuses them (bpf_map__reuse_fd), so the agent has one
 * ring buffer to map, one fd to wait on and one transport counter map to read. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); /* resized by the loader */
} ks_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ksift_transport);
} ks_transport SEC(".maps");

/* The last exec path of each process, on its group leader: filled by the core
 * object's exec hook, gone with the process (nothing to clean up at exit, and a
 * recycled pid never finds a stale path). */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ksift_exec);
} ks_exec_path SEC(".maps");

/* Process marks (enum ksift_mark): shared like ks_exec_path. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ksift_marks);
} ks_marks SEC(".maps");

/* Room to resolve an executable's full path (read_exe_path): the names of its
 * directories, then the path written out, with a whole name of slack past the
 * first KSIFT_PATH_LEN bytes. Per CPU and per object; only crossings use it. */
struct ksift_exe_scratch {
	const unsigned char *names[KSIFT_EXE_DEPTH];
	char buf[2 * KSIFT_PATH_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ksift_exe_scratch);
} ks_exe_scratch SEC(".maps");

/* This object's own per-CPU counters: what its programs saw, filtered,
 * aggregated and emitted (read on demand: /metrics, the API, --stats). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ksift_counters);
} ks_counters SEC(".maps");

/* Anchor every record layout in the object's BTF so the Python mirror can be
 * checked against it (tests/unit/test_abi.py). Never read or written. */
const struct ksift_record *ksift_record_abi __attribute__((unused));
const struct ksift_window_exit *ksift_window_exit_abi __attribute__((unused));
const struct ksift_crossing *ksift_crossing_abi __attribute__((unused));

static __always_inline void count(__u32 idx)
{
	__u32 zero = 0;
	struct ksift_counters *c = bpf_map_lookup_elem(&ks_counters, &zero);

	if (c && idx < KSIFT_CNT_MAX)
		c->v[idx]++;
}

static __always_inline void count_transport(__u32 idx)
{
	__u32 zero = 0;
	struct ksift_transport *c = bpf_map_lookup_elem(&ks_transport, &zero);

	if (c && idx < KSIFT_TR_MAX)
		c->v[idx]++;
}

static __always_inline struct ksift_record *reserve_record(__u32 type, __u64 now)
{
	struct ksift_record *rec = bpf_ringbuf_reserve(&ks_events, sizeof(*rec), 0);

	if (!rec) {
		count(KSIFT_CNT_RB_DROPPED);
		count_transport(KSIFT_TR_DROPPED);
		return NULL;
	}
	/* Reserved memory is not zeroed: clear it so no stale bytes reach user space. */
	__builtin_memset(rec, 0, sizeof(*rec));
	rec->type = type;
	rec->cpu = bpf_get_smp_processor_id();
	rec->ktime_ns = now;
	return rec;
}

/* Submit a record; force a wake-up when the reader must act now (`urgent`:
 * a crossing a remediation policy may act on) or when this record takes the
 * unread data over the watermark (only that one record: a wake-up costs ~5 us,
 * and the records behind it ride the drain it starts). Otherwise flags 0: the
 * kernel wakes the reader only when this record is the first one it has not
 * read (it sleeps on an empty buffer, so an alert is never kept waiting) and
 * never for the records behind it: at most one wake-up per drain. */
static __always_inline void submit_record_wake(struct ksift_record *rec, bool urgent)
{
	/* Unread data, this reserved record included (8-byte ring header + record). */
	__u64 unread = bpf_ringbuf_query(&ks_events, BPF_RB_AVAIL_DATA);
	__u64 before = unread > sizeof(*rec) + 8 ? unread - sizeof(*rec) - 8 : 0;

	count(KSIFT_CNT_RB_EMITTED);
	count_transport(KSIFT_TR_EMITTED);
	if (urgent || (before < wakeup_bytes && unread >= wakeup_bytes)) {
		count(KSIFT_CNT_RB_WAKEUPS);
		count_transport(KSIFT_TR_WAKEUPS);
		bpf_ringbuf_submit(rec, BPF_RB_FORCE_WAKEUP);
	} else {
		bpf_ringbuf_submit(rec, 0);
	}
}

static __always_inline void submit_record(struct ksift_record *rec)
{
	submit_record_wake(rec, false);
}

/* Capture who the task is now: identity, credentials, cgroup and ancestry. */
static __always_inline void fill_task(struct ksift_task *out, struct task_struct *task)
{
	struct task_struct *leader = BPF_CORE_READ(task, group_leader);
	struct task_struct *p = task;
	const char *cgroup_name;
	__u32 i, pid;

	out->tgid = BPF_CORE_READ(task, tgid);
	out->pid = BPF_CORE_READ(task, pid);
	out->ppid = BPF_CORE_READ(task, real_parent, tgid);
	out->uid = BPF_CORE_READ(task, cred, uid.val);
	out->gid = BPF_CORE_READ(task, cred, gid.val);
	out->cgroup_id = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	cgroup_name = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, name); /* a pointer, not an array */
	if (cgroup_name)
		bpf_probe_read_kernel_str(out->cgroup_name, sizeof(out->cgroup_name), cgroup_name);
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

/* The executable's basename from mm->exe_file into out[KSIFT_PATH_LEN]: at
 * hand while the process has its memory (not at exit: it is gone by the time
 * sched_process_exit fires), unlike the full path (bpf_d_path is not allowed
 * from tracepoints). The bytes read with the NUL, or <= 0 when there is none. */
static __always_inline long read_exe_name(char *out, struct task_struct *task)
{
	const unsigned char *name = BPF_CORE_READ(task, mm, exe_file, f_path.dentry, d_name.name);

	return name ? bpf_probe_read_kernel_str(out, KSIFT_PATH_LEN, name) : 0;
}

/* The last exec of `task`'s process, or NULL when ksift did not see it exec
 * (it exec'd before ksift started, or it is a forked child that never exec'd).
 * `task` must be a BTF pointer (a tp_btf argument or a field read directly
 * from one), not a BPF_CORE_READ result. */
static __always_inline struct ksift_exec *exec_of(struct task_struct *task)
{
	return bpf_task_storage_get(&ks_exec_path, task->group_leader, 0, 0);
}

/* One step of the walk from an executable file up to its namespace's root
 * (read_exe_path): the state bpf_loop() hands each step. */
struct ksift_exe_walk {
	struct dentry *d;
	struct mount *mnt;
	__u32 n;    /* names collected in ks_exe_scratch, the file's first */
	__u32 done; /* reached the root */
};

/* A bpf_loop() callback: verified once, where a loop whose steps branch two
 * ways (a name, or a mount crossed) would be verified once per path. */
static long exe_walk_step(__u32 i, void *ctx)
{
	struct ksift_exe_walk *w = ctx;
	/* Locals, not w->...: a CO-RE read relocates every access in its argument. */
	struct dentry *d = w->d, *parent = BPF_CORE_READ(d, d_parent);
	struct mount *mnt = w->mnt, *up;
	struct ksift_exe_scratch *s;
	__u32 zero = 0;

	if (d == BPF_CORE_READ(mnt, mnt.mnt_root) || d == parent) {
		/* A mount's root: the path goes on at its mount point in the parent mount. */
		up = BPF_CORE_READ(mnt, mnt_parent);
		if (up == mnt || !up) {
			w->done = 1; /* the root of the namespace */
			return 1;
		}
		w->d = BPF_CORE_READ(mnt, mnt_mountpoint);
		w->mnt = up;
		return 0;
	}
	s = bpf_map_lookup_elem(&ks_exe_scratch, &zero);
	if (!s || w->n >= KSIFT_EXE_DEPTH)
		return 1; /* too deep: not resolved */
	s->names[w->n & (KSIFT_EXE_DEPTH - 1)] = BPF_CORE_READ(d, d_name.name);
	w->n++;
	w->d = parent;
	return 0;
}

/* The full path of `task`'s executable file (what /proc/PID/exe shows, as
 * seen from the root of the process's mount namespace) into
 * out[KSIFT_PATH_LEN], by walking its dentries and mounts up to that root:
 * bpf_d_path is not allowed from tracepoints. Needs the process's memory map
 * (none in a kernel thread, nor at sched_process_exit on kernels that release
 * it before tracing the exit). Returns the path's length, or 0 when it could not be resolved
 * whole (no executable, deeper than KSIFT_EXE_DEPTH, longer than
 * KSIFT_PATH_LEN - 1): the caller falls back to the exec path or the basename.
 * A function of its own (not inlined): every crossing site shares one copy. */
static __noinline long read_exe_path(char *out, struct task_struct *task)
{
	struct file *file = BPF_CORE_READ(task, mm, exe_file);
	struct ksift_exe_walk w = {};
	struct ksift_exe_scratch *s;
	__u32 zero = 0, i, off = 0, at;
	long len;

	if (!file)
		return 0;
	w.d = BPF_CORE_READ(file, f_path.dentry);
	w.mnt = (void *)BPF_CORE_READ(file, f_path.mnt) - bpf_core_field_offset(struct mount, mnt);
	bpf_loop(2 * KSIFT_EXE_DEPTH, exe_walk_step, &w, 0);
	s = bpf_map_lookup_elem(&ks_exe_scratch, &zero);
	if (!s || !w.done || w.n == 0 || w.n > KSIFT_EXE_DEPTH)
		return 0;
	/* Then written out root first: "/" and a name, for each. */
	__builtin_memset(s->buf, 0, KSIFT_PATH_LEN);
	for (i = 0; i < KSIFT_EXE_DEPTH && i < w.n; i++) {
		if (off >= KSIFT_PATH_LEN - 1)
			return 0;
		at = off & (KSIFT_PATH_LEN - 1);
		s->buf[at] = '/';
		len = bpf_probe_read_kernel_str(&s->buf[at + 1], KSIFT_PATH_LEN,
						s->names[(w.n - 1 - i) & (KSIFT_EXE_DEPTH - 1)]);
		if (len <= 1)
			return 0;
		off = at + len; /* at + 1 + (len - 1): past the name, on its NUL */
	}
	if (off >= KSIFT_PATH_LEN)
		return 0;
	__builtin_memcpy(out, s->buf, KSIFT_PATH_LEN);
	return off;
}

/* The first bytes of the arg area [start, end) of the current process's
 * memory (argv, NUL-separated: what /proc/PID/cmdline shows) into
 * args[KSIFT_ARGS_LEN]. Returns the area's whole size (more than
 * KSIFT_ARGS_LEN: cut short), or 0 when nothing was read. Only the current
 * process's memory can be read here (bpf_probe_read_user), and only the
 * arguments: the environment right after them is never copied. */
static __always_inline __u32 read_args(char *args, unsigned long start, unsigned long end)
{
	unsigned long size, len;

	if (!start || end <= start)
		return 0;
	size = end - start;
	len = size < KSIFT_ARGS_LEN ? size : KSIFT_ARGS_LEN;
	/* The compiler's min() may not bound the very register the call gets: say it again there. */
	barrier_var(len);
	if (len > KSIFT_ARGS_LEN)
		return 0;
	if (bpf_probe_read_user(args, len, (void *)start))
		return 0;
	return size < 0xffffffffUL ? size : 0xffffffffU;
}

/* The executable and its arguments, as of now: the executable file's full
 * path while the process has its memory map, else the path of the exec ksift
 * saw (the core object keeps it), else the basename; the arguments of that
 * exec, else, when the task is in the current process, those in its memory now
 * (a forked child that never exec'd, a process started before ksift). `task`
 * must be a BTF pointer (see exec_of). Call after fill_task(). Crossings only:
 * never on a per-event path. */
static __always_inline void fill_exe(struct ksift_task *out, struct task_struct *task)
{
	struct ksift_exec *exec = exec_of(task);
	struct mm_struct *mm = task->mm;

	if (mm && read_exe_path(out->exe, task) > 0)
		out->ctx_flags = KSIFT_CTX_EXE_EVENT;
	else if (exec) {
		__builtin_memcpy(out->exe, exec->path, sizeof(out->exe));
		out->ctx_flags = KSIFT_CTX_EXE_EXEC;
	} else {
		/* Exec'd before ksift started: the basename is what the kernel keeps handy. */
		read_exe_name(out->exe, task);
	}
	if (exec && exec->args_size) {
		__builtin_memcpy(out->args, exec->args, sizeof(out->args));
		out->args_size = exec->args_size;
		out->ctx_flags |= KSIFT_CTX_ARGS_EXEC;
		return;
	}
	if (!mm || out->tgid != bpf_get_current_pid_tgid() >> 32)
		return; /* no memory map (exited), or another process's memory: not readable here */
	out->args_size = read_args(out->args, mm->arg_start, mm->arg_end);
	if (out->args_size)
		out->ctx_flags |= KSIFT_CTX_ARGS_EVENT;
}

/* A key's state in `map`, created from `init` at its first event; NULL
 * (counted) when the map would not take it. */
static __always_inline void *lookup_or_init(void *map, const void *key, const void *init)
{
	void *val = bpf_map_lookup_elem(map, key);

	if (val)
		return val;
	/* Another CPU may insert the key first: then this lookup finds its entry. */
	bpf_map_update_elem(map, key, init, BPF_NOEXIST);
	val = bpf_map_lookup_elem(map, key);
	if (!val)
		count(KSIFT_CNT_MAP_FULL);
	return val;
}

/* Mark `task`'s process (a BTF pointer: see exec_of) with `bit`. */
static __always_inline void mark_process(struct task_struct *task, __u32 bit)
{
	struct ksift_marks *m = bpf_task_storage_get(&ks_marks, task->group_leader, 0,
						     BPF_LOCAL_STORAGE_GET_F_CREATE);

	if (m && !(m->bits & bit))
		__sync_fetch_and_or(&m->bits, bit);
}

/* Whether `task`'s process carries `bit`: an exit hook's cheap first question. */
static __always_inline bool process_marked(struct task_struct *task, __u32 bit)
{
	struct ksift_marks *m = bpf_task_storage_get(&ks_marks, task->group_leader, 0, 0);

	return m && (m->bits & bit);
}

/* lookup_or_init() for state kept per process: the process (`task`) is marked
 * with `bit` when its entry is made, so its exit hook knows to look. */
static __always_inline void *process_state(void *map, const void *key, const void *init,
					   struct task_struct *task, __u32 bit)
{
	void *val = bpf_map_lookup_elem(map, key);

	if (val)
		return val;
	val = lookup_or_init(map, key, init);
	if (val)
		mark_process(task, bit);
	return val;
}

/* Fixed windows that start at the first event after the previous one ended:
 * true, with *start_ns moved to now, when the event at `now` starts a new one. */
static __always_inline bool window_restarts(__u64 *start_ns, __u64 now, __u64 window_ns)
{
	if (now - *start_ns < window_ns)
		return false;
	*start_ns = now;
	return true;
}

/* Start a new window of the key if the event at `now` is past the current
 * one. True when it did: the caller resets its own per-window figures. */
static __always_inline bool window_roll(struct ksift_window *w, __u64 now, __u64 window_ns)
{
	if (!window_restarts(&w->window_start_ns, now, window_ns))
		return false;
	w->window_count = 0;
	return true;
}

/* Count one event of the key (after window_roll); returns its number in the window. */
static __always_inline __u32 window_add(struct ksift_window *w)
{
	__sync_fetch_and_add(&w->total, 1);
	return __sync_fetch_and_add(&w->window_count, 1) + 1;
}

/* The event numbered n in its window went over the threshold: the one call
 * per window that wins the claim (whichever CPU gets there first) gets a
 * reserved record of `type` for the crossing, filled with the subject's
 * context (fill_task, fill_exe) and the payload's head (struct
 * ksift_crossing, the first member of every crossing payload); the caller
 * adds its own fields after the head and submits it. Every other call gets
 * NULL. When the ring buffer is full the claim is given back, so the next
 * event of this window tries again. `subject` must be a BTF pointer: a tp_btf
 * argument, a field read directly from one (task->real_parent), or
 * bpf_get_current_task_btf(); not a BPF_CORE_READ result. */
static __always_inline struct ksift_record *window_crossing(struct ksift_window *w, __u32 n, __u32 threshold,
							    __u32 type, __u64 now, struct task_struct *subject)
{
	struct ksift_crossing *head;
	struct ksift_record *rec;
	__u64 start, reported;

	if (n <= threshold)
		return NULL;
	start = w->window_start_ns;
	reported = w->reported_window_ns;
	if (reported == start)
		return NULL;
	if (__sync_val_compare_and_swap(&w->reported_window_ns, reported, start) != reported)
		return NULL;
	rec = reserve_record(type, now);
	if (!rec) {
		w->reported_window_ns = reported;
		return NULL;
	}
	w->flagged = 1;
	fill_task(&rec->task, subject);
	fill_exe(&rec->task, subject);
	head = KSIFT_PAYLOAD(rec, struct ksift_crossing);
	head->window_start_ns = start;
	head->total = w->total;
	head->window_count = n;
	head->threshold = threshold;
	return rec;
}

/* The exit record of a flagged key whose process is gone: reserved, with the
 * task and the final totals filled in; the caller adds the executable
 * (fill_exe) and submits it. NULL when the ring buffer is full (counted). */
static __always_inline struct ksift_record *window_exit_record(const struct ksift_window *w, __u32 type,
							       struct task_struct *task, __u32 exit_code)
{
	struct ksift_record *rec = reserve_record(type, bpf_ktime_get_ns());
	struct ksift_window_exit *out;

	if (!rec)
		return NULL;
	fill_task(&rec->task, task);
	out = KSIFT_PAYLOAD(rec, struct ksift_window_exit);
	out->window_start_ns = w->window_start_ns;
	out->window_count = w->window_count;
	out->total = w->total;
	out->exit_code = exit_code;
	return rec;
}

#endif /* KSIFT_COMMON_BPF_H */
