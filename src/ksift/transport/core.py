"""The core BPF object: what every sensor's object shares, loaded first and always.

bpf/core.bpf.c creates the maps every object declares in common.bpf.h (the
ks_events ring buffer, the ks_transport counters, the ks_exec_path task
storage) and keeps each exec's path and arguments with its one hook
(sched_process_exec). Each
sensor's object then reuses those maps (`shared_fds`), so the agent maps one
ring buffer, waits on one fd, and reads one counter map to see any loss.
"""

from __future__ import annotations

from pathlib import Path

from ksift.config import AgentConfig
from ksift.errors import BpfError
from ksift.kernel_side import CORE_OBJECT, SHARED_MAPS, load_object
from ksift.loader.bpf_object import BpfMap, BpfObject
from ksift.loader.libbpf import Libbpf
from ksift.transport import records
from ksift.transport.ringbuf import RingBufferReader

# enum ksift_core_counter (bpf/core.bpf.c), from records.SENSOR_COUNTER_BASE on.
CORE_COUNTER_NAMES = ("exec_seen", "exec_stored", "args_stored")


class CoreObject:
    """Owns core.bpf.o, the shared maps and the one ring-buffer reader."""

    name = "core"
    object_file = CORE_OBJECT

    def __init__(self, lib: Libbpf, objects_dir: Path, config: AgentConfig, self_tgid: int):
        self.lib = lib
        self.path = objects_dir / self.object_file
        self.config = config
        self.self_tgid = self_tgid
        self.obj: BpfObject | None = None
        self.reader: RingBufferReader | None = None
        self.shared_fds: dict[str, int] = {}
        self._transport: BpfMap | None = None
        self._counters: BpfMap | None = None

    def start(self, loaded: BpfObject | None = None) -> None:
        """Load (unless `loaded` already is: ksift.kernel_side) and attach; closed on any failure."""
        self.obj = loaded
        try:
            if self.obj is None:
                self.obj = load_object(self.lib, self.path, self.config, self.self_tgid, None)
            obj = self.obj
            obj.attach("ks_exec")
            events = obj.map("ks_events")
            self.reader = RingBufferReader(events.fd, events.max_entries)
            self.shared_fds = {name: obj.map(name).fd for name in SHARED_MAPS}
            self._transport = obj.map("ks_transport")
            self._counters = obj.map("ks_counters")
        except BaseException:
            self.close()
            raise

    @property
    def events_fd(self) -> int:
        if self.reader is None:
            raise BpfError("the core BPF object is not started")
        return self.reader.fd

    def transport_counters(self) -> dict[str, int]:
        """Records emitted, dropped (ring buffer full) and wake-ups, by every object together."""
        return records.read_counters(self._transport, records.TRANSPORT_COUNTER_NAMES) or {}

    def counters(self) -> dict[str, int]:
        """The core object's own counters (execs seen, paths and arguments kept)."""
        return records.read_counters(self._counters, records.COMMON_COUNTER_NAMES + CORE_COUNTER_NAMES) or {}

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.shared_fds = {}
        self._transport = self._counters = None
        if self.obj is not None:
            self.obj.close()
            self.obj = None
