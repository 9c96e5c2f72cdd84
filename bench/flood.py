"""Flood a RUNNING agent's ring buffer with synthetic records (bench/flood.bpf.c).

The flood object is loaded with its ks_events and ks_transport maps reused
from the agent's own (found by name among the maps the agent's process holds,
opened by id), so its records go through the agent's one ring buffer and its
failed reservations land in the counter the agent reads to see losses. Its
program runs with BPF_PROG_TEST_RUN, `batch` records a run, paced against
absolute deadlines to the target rate. The agent counts the records as
`synthetic` (transport.synthetic in its --stats) and never decodes them.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from pathlib import Path

import bpfsys

SHARED = ("ks_events", "ks_transport")
TRANSPORT_SLOTS = 8  # struct ksift_transport (bpf/ksift.h): emitted, dropped, wakeups, ...
COUNTER_SLOTS = 32  # struct ksift_counters: slot 0 records emitted, 1 reservations that failed


class FloodArgs(ctypes.Structure):
    _fields_ = [("records", ctypes.c_uint32)]  # struct ksift_flood_args (bench/flood.bpf.c)


class Flood:
    """The flood object, loaded against one agent process; a context manager."""

    def __init__(self, obj_path: Path, agent_pid: int, agent_wakeup: bool = False):
        self.obj_path = Path(obj_path)
        self.agent_pid = agent_pid
        self.agent_wakeup = agent_wakeup  # submit like the sensors (watermark wake-ups), not with flags 0
        self.obj = None
        self.prog_fd = -1
        self.map_ids: dict[str, int] = {}
        self.ringbuf_bytes = 0
        self._fds: dict[str, int] = {}
        self._transport_value_size = 0

    def __enter__(self) -> "Flood":
        from ksift.config import DEFAULT_WAKEUP_BYTES
        from ksift.loader.bpf_object import BpfObject
        from ksift.loader.libbpf import Libbpf

        self.map_ids = bpfsys.maps_by_name(self.agent_pid, SHARED)
        missing = [name for name in SHARED if name not in self.map_ids]
        if missing:
            raise RuntimeError(f"the agent (pid {self.agent_pid}) holds no map named {', '.join(missing)}")
        try:
            for name, map_id in self.map_ids.items():
                opened = bpfsys.open_map(map_id)
                if opened is None:
                    raise RuntimeError(f"map {name} (id {map_id}) is gone")
                self._fds[name], info = opened
                if name == "ks_events":
                    self.ringbuf_bytes = info["max_entries"]
                else:
                    self._transport_value_size = info["value_size"]
            self.obj = BpfObject(self.obj_path, Libbpf()).open()
            for name, fd in self._fds.items():
                self.obj.reuse_map(name, fd)
            # The agent's own watermark (its default config: at most half the ring buffer).
            self.obj.set_rodata(wakeup_bytes=min(DEFAULT_WAKEUP_BYTES, self.ringbuf_bytes // 2),
                                agent_wakeup=int(self.agent_wakeup))
            self.obj.load()
            # The loader has no public program-fd accessor; the bench reaches for it.
            self.prog_fd = self.obj.lib.so.bpf_program__fd(self.obj._program("ks_flood"))
            if self.prog_fd < 0:
                raise RuntimeError("ks_flood did not load")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.obj is not None:
            self.obj.close()
            self.obj = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def transport(self) -> dict[str, int]:
        """The agent's shared transport counters (every object's records), summed over CPUs."""
        v = bpfsys.percpu_sum(self._fds["ks_transport"], self._transport_value_size, TRANSPORT_SLOTS)
        return {"emitted": v[0], "dropped": v[1], "wakeups": v[2]}

    def own(self) -> dict[str, int]:
        """This object's own counters: flood records submitted and reservations that failed."""
        raw = self.obj.map("ks_counters")
        v = bpfsys.percpu_sum(raw.fd, raw.value_size, COUNTER_SLOTS)
        return {"emitted": v[0], "dropped": v[1], "wakeups": v[2]}

    def run(self, rate: int, seconds: float, batch: int, side=None) -> dict:
        """Offer `rate` records/s for `seconds`, `batch` per BPF_PROG_TEST_RUN.

        Runs start at absolute deadlines (one late run does not shift the others)
        and stop when the time is up, so a driver that cannot keep up offers less
        (offered_per_s says how much) rather than running longer.
        side: optional (at_s, argv) started with subprocess.Popen `at_s` seconds
        into the flood (a small fork storm whose alert should come out degraded).
        Returns the pacing figures; the Popen of `side`, if started, is in "side_proc".
        """
        ctx = FloodArgs(records=batch)
        period = batch / rate
        runs = late = 0
        side_proc = side_started = None
        cpu0 = os.times()
        t0 = time.monotonic()
        end = t0 + seconds
        while True:
            deadline = t0 + runs * period
            now = time.monotonic()
            if deadline >= end or now >= end:
                break
            if side is not None and side_proc is None and now - t0 >= side[0]:
                side_proc = subprocess.Popen(side[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                side_started = round(time.monotonic() - t0, 3)
            if now < deadline:
                time.sleep(deadline - now)
            elif now - deadline >= period:
                late += 1
            bpfsys.test_run(self.prog_fd, ctx)
            runs += 1
        elapsed = time.monotonic() - t0
        cpu1 = os.times()
        driver_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        return {"rate": rate, "seconds": seconds, "batch": batch, "runs": runs, "late_runs": late,
                "offered": runs * batch, "elapsed_s": round(elapsed, 3),
                "offered_per_s": round(runs * batch / elapsed, 1),
                "driver_cpu_s": round(driver_cpu, 3), "driver_cpu_ns_per_record":
                round(1e9 * driver_cpu / (runs * batch), 1) if runs else None,
                "side_started_at_s": side_started, "side_proc": side_proc}
