// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * flood.bpf.c: the ring-buffer flood of ksift's benchmark (bench/run_bench.py).
 *
 * One SEC("syscall") program that the benchmark runs with BPF_PROG_TEST_RUN,
 * paced to a target rate: each run emits `records` synthetic records of type
 * KSIFT_REC_FLOOD (the agent counts them as `synthetic` and never decodes
 * them), each reserved and filled like every sensor's (reserve_record from
 * common.bpf.h: a zeroed 504-byte record, a failed reservation counted in
 * ks_transport.dropped). The benchmark loads this object with its ks_events
 * and ks_transport maps reused from the RUNNING agent's (bpf_map__reuse_fd),
 * so the records land in the agent's one ring buffer and every loss is
 * counted where the agent looks for losses.
 *
 * Submission: by default with flags 0, the kernel's own wake-up (the reader
 * is woken only by the first record it has not seen: at most once per drain).
 * With agent_wakeup set, through the sensors' submit_record (that, plus a
 * forced wake-up on every record while the unread data is past the
 * watermark): each forced wake-up is a self-IPI (irq_work), about 5 us on the
 * benchmark's nested VM against ~0.15 us for the rest of a record, which
 * caps what one CPU can offer far below 1M records/s. See docs/benchmarks.md.
 *
 * Built by `make bench` with the Makefile's BPF_CFLAGS (-Ibpf), never loaded by
 * the agent.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "ksift.h"
#include "common.bpf.h"

/* Set by the benchmark between open and load (--flood-agent-wakeup). */
const volatile bool agent_wakeup = false;

/* BPF_PROG_TEST_RUN's ctx_in. */
struct ksift_flood_args {
	__u32 records; /* records to emit in this run */
};

static long emit_one(__u64 index, void *ctx)
{
	struct ksift_record *rec = reserve_record(KSIFT_REC_FLOOD, bpf_ktime_get_ns());

	if (!rec) /* counted by reserve_record (ks_transport.dropped) */
		return 0;
	if (agent_wakeup) {
		submit_record(rec);
		return 0;
	}
	count(KSIFT_CNT_RB_EMITTED);
	count_transport(KSIFT_TR_EMITTED);
	bpf_ringbuf_submit(rec, 0);
	return 0;
}

SEC("syscall")
int ks_flood(struct ksift_flood_args *args)
{
	bpf_loop(args->records, emit_one, NULL, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
