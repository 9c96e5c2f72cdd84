"""Turn a kernel-captured TaskContext into the subject/ancestry an alert shows.

Called at an incident's first crossing (IncidentEngine's capture), when the
process first looked interesting. The kernel's view is authoritative for what
it captured at event time (ids, comm, cgroup, ancestry); /proc gives the full
executable path and the live command line, but only while the pid still names
the same process. When it does not (the process exited a moment after the
crossing, or its pid was recycled), the executable and arguments the kernel
captured (at exec, or from the process's memory at the event) stand in, and
`exe_source`/`cmdline_source` say which. Nothing here raises for a single
process: a gone, recycled or unreadable process just means less detail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ksift.enrich.cgroup import CgroupResolver, parse_cgroup_path
from ksift.enrich.procfs import ProcFS, ProcStat
from ksift.errors import AccessDenied, ProcessGone
from ksift.events import TaskContext

if TYPE_CHECKING:  # the resolver's module (urllib, ssl) loads only when [kubernetes] is on
    from ksift.enrich.kubernetes import PodMetadataResolver

_NS_PER_S = 1_000_000_000

_T = TypeVar("_T")


class Enricher:
    def __init__(self, procfs: ProcFS, cgroups: CgroupResolver, ancestry_limit: int = 64,
                 pods: PodMetadataResolver | None = None):
        self.procfs = procfs
        self.cgroups = cgroups
        self.ancestry_limit = ancestry_limit
        self.pods = pods  # Kubernetes names from a cache refreshed in the background; never waits

    def context(self, task: TaskContext) -> dict[str, Any]:
        """What an incident keeps of its subject: {"subject": ..., "ancestry": [...]}, read now."""
        return {"subject": self.subject(task), "ancestry": self.ancestry(task)}

    # -- subject ------------------------------------------------------------

    def subject(self, task: TaskContext) -> dict[str, Any]:
        pid = task.tgid
        exe = proc_cgroup = None
        cmdline: list[str] | None = None
        if self._same_process(task):
            exe = self._try(self.procfs.exe, pid)
            cmdline = self._try(self.procfs.cmdline, pid)
            proc_cgroup = self._try(self.procfs.cgroup_v2_path, pid)
            # The pid may have been recycled between the check and the reads;
            # if so, none of what we just read belongs to this task.
            if not self._same_process(task):
                exe = cmdline = proc_cgroup = None
        exe_source = "proc" if exe else None
        if not exe:
            exe, exe_source = task.exe or None, task.exe_source if task.exe else None
        # A zombie's /proc cmdline is empty: the kernel's copy is then the better word.
        cmdline_source, truncated = ("proc" if cmdline else None), False
        if not cmdline and task.cmdline is not None:
            cmdline, cmdline_source, truncated = list(task.cmdline), task.cmdline_source, task.cmdline_truncated

        # The id is what the kernel saw at event time; /proc shows where the
        # process is now, which only differs if it was moved since.
        cgroup = self.cgroups.path_for_id(task.cgroup_id) if task.cgroup_id > 0 else None
        if cgroup is None:
            cgroup = proc_cgroup
        info = parse_cgroup_path(cgroup) if cgroup is not None else None
        if info is None and task.cgroup_name not in ("", "/"):
            # The cgroup is gone (a unit or container that ended with its process): its own name,
            # which the kernel kept, still says which container or unit it was.
            info = parse_cgroup_path("/" + task.cgroup_name)
        pod = None
        if self.pods is not None and info is not None and (info.pod_uid or info.container_id):
            pod = self.pods.lookup(info.pod_uid, info.container_id)

        return {
            "pid": pid,
            "ppid": task.ppid,
            "comm": task.comm,
            "exe": exe,
            "cmdline": cmdline or None,
            "uid": task.uid,
            "start_boottime_ns": task.start_boottime_ns,  # with pid, the process's identity
            "cgroup_id": task.cgroup_id,
            "cgroup": cgroup,
            "container_id": info.container_id if info else None,
            "container_runtime": info.runtime if info else None,
            "pod_uid": info.pod_uid if info else None,
            "systemd_unit": info.systemd_unit if info else None,
            "pod_name": pod.pod_name if pod else None,
            "pod_namespace": pod.pod_namespace if pod else None,
            "container_name": pod.container_name if pod else None,
            "cgroup_name": task.cgroup_name or None,
            "exe_source": exe_source,
            "cmdline_source": cmdline_source if cmdline else None,
            "cmdline_truncated": truncated,
        }

    # -- ancestry -----------------------------------------------------------

    def ancestry(self, task: TaskContext) -> list[dict[str, Any]]:
        """Parents of the task, nearest first, ending at pid 1 when reachable."""
        limit = self.ancestry_limit
        chain = [{"pid": pid, "comm": comm} for pid, comm in task.ancestry[:limit]]
        if len(chain) >= limit or (chain and chain[-1]["pid"] == 1):
            return chain

        seen = {task.tgid, *(entry["pid"] for entry in chain)}
        # Where to continue: the parent of the last kernel ancestor, or the
        # task's own parent if the kernel captured no chain at all.
        child: ProcStat | None = None
        if chain:
            child = self._stat(chain[-1]["pid"])
            if child is None or not self._started_before_task(child, task):
                return chain  # gone, or its pid now names a newer process
            next_pid = child.ppid
        else:
            next_pid = task.ppid

        while len(chain) < limit and next_pid > 0 and next_pid not in seen:
            parent = self._stat(next_pid)
            if parent is None:
                break
            # A parent (or the reaper it was reparented to) always started no
            # later than its child; otherwise the pid was recycled.
            if child is None:
                if not self._started_before_task(parent, task):
                    break
            elif parent.start_ticks > child.start_ticks:
                break
            chain.append({"pid": parent.pid, "comm": parent.comm})
            seen.add(parent.pid)
            if parent.pid == 1:
                break
            child, next_pid = parent, parent.ppid
        return chain

    # -- helpers ------------------------------------------------------------

    def _same_process(self, task: TaskContext) -> bool:
        try:
            return self.procfs.same_process(task.tgid, task.start_boottime_ns)
        except (ProcessGone, AccessDenied):
            return False

    def _stat(self, pid: int) -> ProcStat | None:
        return self._try(self.procfs.stat, pid)

    def _started_before_task(self, stat: ProcStat, task: TaskContext) -> bool:
        if task.start_boottime_ns <= 0:
            return True  # start time not captured: nothing to compare against
        # /proc truncates to clock ticks, so a genuine ancestor is never later.
        start_ns = stat.start_ticks * _NS_PER_S // self.procfs.clock_ticks
        return start_ns <= task.start_boottime_ns

    @staticmethod
    def _try(read: Callable[[int], _T], pid: int) -> _T | None:
        try:
            return read(pid)
        except (ProcessGone, AccessDenied):
            return None
