// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * The core object, loaded first and always: it creates what every sensor's
 * object shares (the ks_events ring buffer, the ks_transport counters and the
 * ks_exec_path task storage; see common.bpf.h) and keeps each exec's path and
 * arguments, the process context every sensor's records carry.
 *
 * Hook: tp_btf/sched_process_exec only. Nothing runs at fork or exit: the
 * path and arguments live in task storage and go with the process.
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
	KSIFT_CNT_CORE_ARGS_STORED,    /* exec arguments kept */
};

SEC("tp_btf/sched_process_exec")
int BPF_PROG(ks_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	struct ksift_exec *exec;
	struct mm_struct *mm;

	count(KSIFT_CNT_CORE_EXEC_SEEN);
	exec = bpf_task_storage_get(&ks_exec_path, task->group_leader, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!exec) {
		count(KSIFT_CNT_MAP_FULL);
		return 0;
	}
	/* NUL-padded whole: a re-exec with shorter ones leaves no tail behind. A
	 * new storage comes zeroed: only a re-exec has arguments to clear. */
	__builtin_memset(exec->path, 0, sizeof(exec->path));
	if (exec->args_size)
		__builtin_memset(exec->args, 0, sizeof(exec->args));
	if (bpf_probe_read_kernel_str(exec->path, sizeof(exec->path), BPF_CORE_READ(bprm, filename)) > 0)
		count(KSIFT_CNT_CORE_EXEC_STORED);
	/* The new image's arguments, while they are sure to be there: the process
	 * may be gone before anything it does looks interesting. `task` is current
	 * here, so its memory is readable; one bounded copy per exec, none per fork. */
	mm = task->mm;
	exec->args_size = mm ? read_args(exec->args, mm->arg_start, mm->arg_end) : 0;
	if (exec->args_size)
		count(KSIFT_CNT_CORE_ARGS_STORED);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
