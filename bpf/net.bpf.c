// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Net sensor: counts outgoing TCP connection attempts per (process,
 * destination address, port) in the kernel and ships only the keys that cross
 * the threshold within a window.
 *
 * Hook: tp_btf/inet_sock_set_state. A socket enters SYN_SENT inside connect()
 * (tcp_v4_connect, tcp_v6_connect), in the connecting process's context, so
 * no syscall hook is needed and other syscalls pay nothing.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "net.h"
#include "common.bpf.h"

/* Set from the rules between open and load (see sensors/net.py). */
const volatile __u32 connect_threshold = 200;
const volatile __u64 connect_window_ns = 1000000000ULL;

/* Anchor the payload layout in the object's BTF for tests/unit/test_abi.py. */
const struct ksift_connect_crossing *ksift_connect_crossing_abi __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct ksift_connect_key);
	__type(value, struct ksift_connect_state);
} ks_connect_state SEC(".maps");

/* The destination of a connecting socket; false for a family we do not count. */
static __always_inline bool fill_destination(struct ksift_connect_key *key, const struct sock *sk)
{
	__u16 family = sk->__sk_common.skc_family;
	__u32 *words;

	key->port = __builtin_bswap16(sk->__sk_common.skc_dport);
	if (family == KSIFT_AF_INET) {
		key->family = KSIFT_AF_INET;
		__builtin_memcpy(key->addr, &sk->__sk_common.skc_daddr, 4);
		return true;
	}
	if (family != KSIFT_AF_INET6)
		return false;
	bpf_probe_read_kernel(key->addr, sizeof(key->addr), &sk->__sk_common.skc_v6_daddr);
	words = (__u32 *)key->addr;
	if (words[0] == 0 && words[1] == 0 && words[2] == __builtin_bswap32(0x0000ffff)) {
		/* ::ffff:a.b.c.d is IPv4 on the wire */
		key->family = KSIFT_AF_INET;
		words[0] = words[3];
		words[2] = 0;
		words[3] = 0;
	} else {
		key->family = KSIFT_AF_INET6;
	}
	return true;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(ks_connect, const struct sock *sk, const int oldstate, const int newstate)
{
	struct ksift_connect_state *st, init = {};
	struct ksift_connect_crossing *cross;
	struct ksift_connect_key key = {};
	struct ksift_record *rec;
	__u64 now;
	__u32 n;

	if (newstate != TCP_SYN_SENT || sk->sk_protocol != IPPROTO_TCP)
		return 0;
	count(KSIFT_CNT_CONNECT_SEEN);
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	if (key.tgid == ksift_tgid) {
		count(KSIFT_CNT_CONNECT_SELF);
		return 0;
	}
	if (!fill_destination(&key, sk)) {
		count(KSIFT_CNT_CONNECT_OTHER_FAMILY);
		return 0;
	}

	now = bpf_ktime_get_ns();
	init.win.window_start_ns = now;
	st = lookup_or_init(&ks_connect_state, &key, &init);
	if (!st)
		return 0;
	count(KSIFT_CNT_CONNECT_AGGREGATED);
	window_roll(&st->win, now, connect_window_ns);
	n = window_add(&st->win);
	rec = window_crossing(&st->win, n, connect_threshold, KSIFT_REC_CONNECT_CROSSING, now,
			      bpf_get_current_task_btf());
	if (!rec)
		return 0;
	count(KSIFT_CNT_CONNECT_CROSSINGS);
	cross = KSIFT_PAYLOAD(rec, struct ksift_connect_crossing);
	cross->key = key;
	submit_record(rec);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
