// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Request sensor: request latency of TCP servers, measured in the kernel.
 *
 * A connection is a server's when the kernel moves it SYN_RECV -> ESTABLISHED
 * (the passive side of the handshake); connections a process opened itself go
 * SYN_SENT -> ESTABLISHED and are never tracked. On a tracked connection a
 * request starts at the first read after the previous response and ends at
 * the first write of the response. Every request lands in a per-process log2
 * histogram; only requests slower than `latency_ns`, and only once a process
 * has more than `req_threshold` of them in a window, leave the kernel, at most
 * `max_records` per process per window.
 *
 * Hooks (all tp_btf): sock:inet_sock_set_state, sock:sock_recv_length,
 * sock:sock_send_length. No syscall tracepoint: those would tax every syscall
 * of the host. Connections accepted before ksift started are not tracked (the
 * handshake was missed).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "request.h"
#include "common.bpf.h"

#define KSIFT_MSG_PEEK 2

/* x86-64 syscall numbers of the reads whose buffer we can find in the registers. */
#define KSIFT_SYS_READ 0
#define KSIFT_SYS_READV 19
#define KSIFT_SYS_RECVFROM 45
#define KSIFT_SYS_RECVMSG 47
#define KSIFT_SYS_RECVMMSG 299

/* Set from the rule between open and load (see sensors/request.py). */
const volatile __u64 latency_ns = 500000000ULL;
const volatile __u32 req_threshold = 2;
const volatile __u64 req_window_ns = 10000000000ULL;
const volatile __u32 max_records = 4;

/* Anchor the payload layout in the object's BTF for tests/unit/test_abi.py. Never used. */
const struct ksift_slow_request *ksift_slow_request_abi __attribute__((unused));

/* Fresh per-process stats are copied from here: the struct is too big for the stack. */
const volatile struct ksift_req_stats ks_req_zero_stats = {};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* open accepted connections; the oldest idle ones go first */
	__type(key, __u64); /* struct sock * of an accepted connection */
	__type(value, struct ksift_req_conn);
} ks_req_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192); /* processes that answered requests; ~4 MB preallocated */
	__type(key, __u32); /* tgid */
	__type(value, struct ksift_req_stats);
} ks_req_stats SEC(".maps");

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(ks_req_state, const struct sock *sk, const int oldstate, const int newstate)
{
	__u64 key = (__u64)sk;
	struct ksift_req_conn fresh = {};

	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	if (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED) {
		/* Runs in softirq: the accepting process is not known yet, the socket is enough. */
		if (bpf_map_update_elem(&ks_req_conns, &key, &fresh, BPF_ANY))
			count(KSIFT_CNT_MAP_FULL);
		else
			count(KSIFT_CNT_REQ_CONN_ACCEPTED);
	} else if (newstate == TCP_CLOSE) {
		/* Forget it before the kernel frees it: the pointer may name another socket next. */
		if (bpf_map_lookup_elem(&ks_req_conns, &key) && !bpf_map_delete_elem(&ks_req_conns, &key))
			count(KSIFT_CNT_REQ_CONN_CLOSED);
	}
	return 0;
}

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r, shift;

	r = (v > 0xFFFFFFFFULL) << 5;
	v >>= r;
	shift = (v > 0xFFFF) << 4;
	v >>= shift;
	r |= shift;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	return r | (__u32)(v >> 1);
}

/* The received bytes are already in the caller's buffer: find it from the
 * syscall's registers and copy the first few (the HTTP request line). */
static __always_inline void capture_head(struct ksift_req_conn *c, int ret)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	struct user_msghdr msg;
	struct iovec iov;
	const void *buf = NULL;
	__u64 len = ret;
	long nr = BPF_CORE_READ(regs, orig_ax);
	unsigned long arg2 = BPF_CORE_READ(regs, si);

	c->head_len = 0;
	if (nr == KSIFT_SYS_READ || nr == KSIFT_SYS_RECVFROM) {
		buf = (const void *)arg2;
	} else if (nr == KSIFT_SYS_READV) {
		if (!bpf_probe_read_user(&iov, sizeof(iov), (const void *)arg2)) {
			buf = iov.iov_base;
			len = len < iov.iov_len ? len : iov.iov_len;
		}
	} else if (nr == KSIFT_SYS_RECVMSG || nr == KSIFT_SYS_RECVMMSG) {
		/* recvmmsg's first struct mmsghdr starts with its struct user_msghdr. */
		if (!bpf_probe_read_user(&msg, sizeof(msg), (const void *)arg2) && msg.msg_iovlen > 0 &&
		    !bpf_probe_read_user(&iov, sizeof(iov), msg.msg_iov)) {
			buf = iov.iov_base;
			len = len < iov.iov_len ? len : iov.iov_len;
		}
	}
	if (!buf || len == 0) {
		count(KSIFT_CNT_REQ_HEAD_MISSED);
		return;
	}
	if (len > KSIFT_REQ_HEAD_LEN)
		len = KSIFT_REQ_HEAD_LEN;
	if (bpf_probe_read_user(c->head, len, buf)) {
		count(KSIFT_CNT_REQ_HEAD_MISSED);
		return;
	}
	c->head_len = len;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(ks_req_recv, struct sock *sk, int ret, int flags)
{
	__u64 key = (__u64)sk;
	struct ksift_req_conn *c;
	__u64 now;

	/* A peek leaves the data queued: the real read that follows starts the request. */
	if (ret <= 0 || (flags & KSIFT_MSG_PEEK))
		return 0;
	c = bpf_map_lookup_elem(&ks_req_conns, &key);
	if (!c || c->start_ns) /* not a server's connection, or the rest of a request being read */
		return 0;
	if ((bpf_get_current_pid_tgid() >> 32) == ksift_tgid) {
		count(KSIFT_CNT_REQ_SELF);
		return 0;
	}
	now = bpf_ktime_get_ns();
	/* Two threads reading one connection at once: one of them starts the request. */
	if (__sync_val_compare_and_swap(&c->start_ns, 0, now) != 0)
		return 0;
	count(KSIFT_CNT_REQ_STARTED);
	capture_head(c, ret);
	return 0;
}

static __always_inline void fill_endpoints(struct ksift_req_endpoints *ends, struct sock *sk)
{
	ends->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	ends->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	ends->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (ends->family == KSIFT_AF_INET6) {
		BPF_CORE_READ_INTO(&ends->laddr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&ends->raddr, sk, __sk_common.skc_v6_daddr);
	} else {
		BPF_CORE_READ_INTO((__u32 *)ends->laddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO((__u32 *)ends->raddr, sk, __sk_common.skc_daddr);
	}
}

/* The response started: account the request to the process and report it if
 * it was slow and the process is over the threshold in this window. */
static __always_inline void finish_request(struct sock *sk, struct ksift_req_conn *c, __u64 start, __u64 now)
{
	struct task_struct *task = bpf_get_current_task_btf();
	__u32 tgid = task->tgid;
	__u64 born = task->group_leader->start_boottime;
	__u64 duration = now - start;
	struct ksift_req_stats *st;
	struct ksift_slow_request *req;
	struct ksift_record *rec;
	__u32 slot, nreq, nslow, emitted;
	__u64 slow_total;

	st = bpf_map_lookup_elem(&ks_req_stats, &tgid);
	if (!st || st->start_boottime_ns != born) {
		if (st)
			count(KSIFT_CNT_REQ_PID_REUSED);
		if (bpf_map_update_elem(&ks_req_stats, &tgid, (const void *)&ks_req_zero_stats, BPF_ANY)) {
			count(KSIFT_CNT_MAP_FULL);
			return;
		}
		st = bpf_map_lookup_elem(&ks_req_stats, &tgid);
		if (!st) {
			count(KSIFT_CNT_MAP_FULL);
			return;
		}
		st->start_boottime_ns = born;
		st->window_start_ns = now;
	}
	count(KSIFT_CNT_REQ_DONE);

	if (window_restarts(&st->window_start_ns, now, req_window_ns)) {
		st->window_requests = 0;
		st->window_slow = 0;
		st->window_emitted = 0;
		st->window_max_ns = 0;
		st->window_max_head_len = 0;
	}
	__sync_fetch_and_add(&st->requests, 1);
	nreq = __sync_fetch_and_add(&st->window_requests, 1) + 1;
	slot = log2_u64(duration / 1000);
	if (slot >= KSIFT_REQ_HIST_SLOTS)
		slot = KSIFT_REQ_HIST_SLOTS - 1;
	__sync_fetch_and_add(&st->hist[slot], 1);
	if (duration > st->max_ns)
		st->max_ns = duration; /* racy between CPUs: at worst a near-maximum */
	if (duration <= latency_ns)
		return;

	count(KSIFT_CNT_REQ_SLOW);
	slow_total = __sync_fetch_and_add(&st->slow, 1) + 1;
	nslow = __sync_fetch_and_add(&st->window_slow, 1) + 1;
	if (duration > st->window_max_ns) {
		st->window_max_ns = duration;
		__builtin_memcpy(st->window_max_head, c->head, KSIFT_REQ_HEAD_LEN);
		st->window_max_head_len = c->head_len;
		fill_endpoints(&st->window_max_ends, sk);
	}
	if (nslow <= req_threshold)
		return;
	/* Over the threshold: the first few slow requests of the window leave the
	 * kernel, the rest are counted in the stats user space reads. */
	emitted = __sync_fetch_and_add(&st->window_emitted, 1);
	if (emitted >= max_records) {
		count(KSIFT_CNT_REQ_CAPPED);
		return;
	}
	rec = reserve_record(KSIFT_REC_SLOW_REQUEST, now);
	if (!rec) {
		/* Let the next slow request in this window try again. */
		__sync_fetch_and_sub(&st->window_emitted, 1);
		return;
	}
	count(KSIFT_CNT_REQ_EMITTED);
	fill_task(&rec->task, task);
	fill_exe(&rec->task, task);
	req = KSIFT_PAYLOAD(rec, struct ksift_slow_request);
	req->duration_ns = duration;
	req->window_start_ns = st->window_start_ns;
	req->slow_total = slow_total;
	req->window_slow = nslow;
	req->window_requests = nreq;
	req->threshold = req_threshold;
	req->head_len = c->head_len;
	__builtin_memcpy(req->head, c->head, KSIFT_REQ_HEAD_LEN);
	fill_endpoints(&req->ends, sk);
	submit_record(rec);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(ks_req_send, struct sock *sk, int ret, int flags)
{
	__u64 key = (__u64)sk;
	struct ksift_req_conn *c;
	__u64 start;

	if (ret <= 0)
		return 0;
	c = bpf_map_lookup_elem(&ks_req_conns, &key);
	if (!c)
		return 0;
	start = c->start_ns;
	if (!start) /* not answering a request: more of the same response, or a server push */
		return 0;
	/* Two threads writing at once: one of them ends the request. */
	if (__sync_val_compare_and_swap(&c->start_ns, start, 0) != start)
		return 0;
	finish_request(sk, c, start, bpf_ktime_get_ns());
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
