// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * The core object, loaded first and always: it creates what every sensor's
 * object shares (the ks_events ring buffer, the ks_transport counters and the
 * ks_exec_path task storage; see common.bpf.h) and keeps exec paths, the one
 * piece of process context several sensors name in their records.
 *
 * Hook: tp_btf/sched_process_exec only. Nothing runs at fork or exit: the
 * path lives in task storage and goes with the process.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "ksift.h"
#include "common.bpf.h"

enum ksift_core_counter {
	KSIFT_CNT_CORE_EXEC_SEEN = KSIFT_CNT_SENSOR_BASE, /* every sched_process_exec */
	KSIFT_CNT_CORE_EXEC_STORED,    /* exec paths kept */
};

SEC("tp_btf/sched_process_exec")
int BPF_PROG(ks_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	struct ksift_exec *exec;

	count(KSIFT_CNT_CORE_EXEC_SEEN);
	exec = bpf_task_storage_get(&ks_exec_path, task->group_leader, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!exec) {
		count(KSIFT_CNT_MAP_FULL);
		return 0;
	}
	/* NUL-padded whole: a re-exec with a shorter path leaves no tail behind. */
	__builtin_memset(exec->path, 0, sizeof(exec->path));
	if (bpf_probe_read_kernel_str(exec->path, sizeof(exec->path), BPF_CORE_READ(bprm, filename)) > 0)
		count(KSIFT_CNT_CORE_EXEC_STORED);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
