"""What every sensor shares: one BPF object, its ring buffer and its counters."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ksift.config import AgentConfig
from ksift.errors import BpfError
from ksift.loader.bpf_object import BpfMap, BpfObject
from ksift.loader.libbpf import Libbpf
from ksift.rules.incidents import Crossing, Incident, KeyExit, KeyState
from ksift.rules.model import Rule, RuleSet
from ksift.transport import records
from ksift.transport.ringbuf import RingBufferReader


def default_objects_dir() -> Path:
    """Where the compiled *.bpf.o live: $KSIFT_BPF_OBJECTS, else inside the package."""
    override = os.environ.get("KSIFT_BPF_OBJECTS")
    if override:
        return Path(override)
    return Path(str(resources.files("ksift") / "bpf_objects"))


@dataclass
class Decoded:
    """What one ring-buffer batch told us."""

    crossings: list[Crossing] = field(default_factory=list)
    exits: list[KeyExit] = field(default_factory=list)
    failed: int = 0  # records that could not be decoded (counted, logged, skipped)


class Sensor:
    """One BPF object with the common lifecycle; subclasses say what to configure and attach.

    A subclass declares its signals, object file, counter names and ABI mirrors,
    and implements rodata(), programs() (only the hooks its enabled rules need),
    decode(), and optionally current(), summarize() and details().
    """

    name = "sensor"
    object_file = ""
    signals: tuple[str, ...] = ()
    # Names of the sensor's own counter slots, from records.SENSOR_COUNTER_BASE on,
    # in the order of its enum in bpf/<sensor>.h (`counter_enum`).
    counter_names: tuple[str, ...] = ()
    counter_enum = ""
    # C struct name -> (numpy dtype, {C member: numpy field} where they differ):
    # checked against the object's BTF by tests/unit/test_abi.py.
    abi: dict[str, tuple[np.dtype, dict[str, str]]] = {}

    def __init__(self, lib: Libbpf, objects_dir: Path, config: AgentConfig, self_tgid: int, rules: RuleSet):
        self.lib = lib
        self.path = objects_dir / self.object_file
        self.config = config
        self.self_tgid = self_tgid
        # signal -> its enabled rule, for this sensor's signals only
        self.enabled: dict[str, Rule] = {s: r for s in self.signals if (r := rules.for_signal(s)) is not None}
        self.obj: BpfObject | None = None
        self.reader: RingBufferReader | None = None
        self._counters: BpfMap | None = None

    @classmethod
    def wanted(cls, rules: RuleSet) -> bool:
        """Load this sensor only when an enabled rule needs one of its signals."""
        return any(rules.for_signal(s) is not None for s in cls.signals)

    @classmethod
    def all_counter_names(cls) -> tuple[str, ...]:
        return records.COMMON_COUNTER_NAMES + cls.counter_names

    # -- what subclasses provide ---------------------------------------------

    def rules(self) -> list[Rule]:
        """The enabled rules this sensor feeds."""
        return list(self.enabled.values())

    def rodata(self) -> dict[str, int]:
        return {}

    def programs(self) -> list[str]:
        return []

    def decode(self, batch: np.ndarray) -> Decoded:
        return Decoded()

    def current(self, rule: str, key: int) -> KeyState | None:
        """The key's live counters from the kernel, for incidents still open."""
        return None

    def summarize(self, incident: Incident, status: str) -> str | None:
        """One sentence for the alert; None means the generic wording."""
        return None

    def details(self, incident: Incident, status: str) -> dict | None:
        """The signal's own figures for the alert's `details`; None means incident.details."""
        return None

    def start(self) -> None:
        """open -> configure -> load -> attach; on any failure, everything is torn down."""
        obj = BpfObject(self.path, self.lib)
        self.obj = obj
        try:
            obj.open()
            obj.set_rodata(ksift_tgid=self.self_tgid, wakeup_bytes=self.config.wakeup_bytes, **self.rodata())
            obj.resize_map("ks_events", self.config.ringbuf_bytes)
            wanted = set(self.programs())
            for prog in obj.program_names():
                obj.set_autoload(prog, prog in wanted)
            obj.load()
            for prog in self.programs():
                obj.attach(prog)
            events = obj.map("ks_events")
            self.reader = RingBufferReader(events.fd, events.max_entries)
            self._counters = obj.map("ks_counters")
        except BaseException:
            self.close()
            raise

    @property
    def events_fd(self) -> int:
        if self.reader is None:
            raise BpfError(f"sensor {self.name} is not started")
        return self.reader.fd

    def counters(self) -> dict[str, int]:
        if self._counters is None:
            return {}
        raw = self._counters.lookup(b"\0\0\0\0")
        if raw is None:
            return {}
        return records.sum_counters(raw, self._counters.ncpus, self._counters.slot_size, self.all_counter_names())

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self._counters = None
        if self.obj is not None:
            self.obj.close()
            self.obj = None
