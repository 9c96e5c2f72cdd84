// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* A program the verifier must refuse: it reads a map value without checking
 * the lookup for NULL. Used to prove the loader surfaces the verifier log. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH); /* a hash lookup may always miss */
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} ks_bad_map SEC(".maps");

SEC("tp_btf/sched_process_fork")
int ks_rejected(void *ctx)
{
	__u32 zero = 0;
	__u64 *v = bpf_map_lookup_elem(&ks_bad_map, &zero);

	return *v; /* no NULL check: "invalid mem access 'map_value_or_null'" */
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
