"""The kernel side loaded while `ksift run` is still small: before numpy and the sensors' modules.

For each BPF object it loads, libbpf parses the kernel's BTF (two copies of the ~5 MB
/sys/kernel/btf/vmlinux for a moment, ~11 MiB), so the moment of a load is the agent's peak
memory unless the process is small then. The sensors' modules import numpy (their record
layouts) and with it ~11 MiB that stays resident: loaded by the sensors themselves, the
transient lands on top of it (measured: 34 MiB resident + 13 MiB at the load).

So `ksift run` works out first what each object needs, in a child it forks for the purpose: the
child imports the sensors, asks each enabled one for its plan (`Sensor.plan()`: object file,
rodata, programs) and sends the plans back as JSON before it exits, taking numpy and the
sensors' modules with it. This process, which never imported them, opens, configures and loads
the core object and every planned one (`load_object`, the same steps a sensor's own start
takes). The sensors made afterwards take their loaded object (`Preloaded.take`) when their plan
is still the same, which they are, being the same code on the same inputs, and attach it; a
sensor whose plan differs, or a child that failed, falls back to a sensor loading its own.

This module imports nothing that imports numpy (tests/unit/test_footprint.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ksift.config import AgentConfig
from ksift.loader.bpf_object import BpfObject
from ksift.loader.libbpf import Libbpf
from ksift.rules.model import RuleSet

log = logging.getLogger("ksift.agent")

CORE_OBJECT = "core.bpf.o"
# The maps every object declares (common.bpf.h) and the core object creates: the others reuse its.
SHARED_MAPS = ("ks_events", "ks_transport", "ks_exec_path", "ks_marks")


def default_objects_dir() -> Path:
    """Where the compiled *.bpf.o live: $KSIFT_BPF_OBJECTS, else inside the package."""
    override = os.environ.get("KSIFT_BPF_OBJECTS")
    if override:
        return Path(override)
    return Path(str(resources.files("ksift") / "bpf_objects"))


@dataclass(frozen=True)
class ObjectPlan:
    """What a sensor's BPF object is loaded with: its rodata (besides ksift_tgid and wakeup_bytes,
    which every object gets) and the programs it loads (the others are not even loaded)."""

    object_file: str
    rodata: Mapping[str, int]
    programs: tuple[str, ...]

    def to_json(self) -> dict:
        return {"object_file": self.object_file, "rodata": dict(self.rodata), "programs": list(self.programs)}

    @classmethod
    def from_json(cls, raw: dict) -> ObjectPlan:
        return cls(str(raw["object_file"]), {str(k): int(v) for k, v in raw["rodata"].items()},
                   tuple(str(p) for p in raw["programs"]))


def load_object(lib: Libbpf, path: Path, config: AgentConfig, self_tgid: int, plan: ObjectPlan | None,
                shared: Mapping[str, int] | None = None) -> BpfObject:
    """Open, configure and load one object (not attached); closed again on any failure.

    plan None: the core object (every program loaded, its own maps). `shared` maps names of the
    maps every object declares (common.bpf.h) to the fds of the core object's, so all objects
    write one ring buffer."""
    obj = BpfObject(path, lib)
    try:
        obj.open()
        obj.set_rodata(ksift_tgid=self_tgid, wakeup_bytes=config.wakeup_bytes, **(plan.rodata if plan else {}))
        obj.resize_map("ks_events", config.ringbuf_bytes)
        for name, fd in (shared or {}).items():
            obj.reuse_map(name, fd)
        if plan is not None:
            wanted = set(plan.programs)
            for prog in obj.program_names():
                obj.set_autoload(prog, prog in wanted)
        obj.load()
    except BaseException:
        obj.close()
        raise
    return obj


class Preloaded:
    """The objects loaded ahead of the sensors, until each is taken; close() closes the rest."""

    def __init__(self, core: BpfObject | None = None, objects: dict[str, tuple[ObjectPlan, BpfObject]] | None = None):
        self.core = core
        self.objects = objects or {}

    def take_core(self) -> BpfObject | None:
        core, self.core = self.core, None
        return core

    def take(self, plan: ObjectPlan) -> BpfObject | None:
        """The object loaded for this plan, or None (not preloaded, or loaded for another plan:
        then it is closed, and the sensor loads its own)."""
        found = self.objects.pop(plan.object_file, None)
        if found is None:
            return None
        planned, obj = found
        if planned != plan:
            log.warning("%s was loaded ahead for %s, but its sensor now asks for %s: loading it again",
                        plan.object_file, planned, plan)
            obj.close()
            return None
        return obj

    def close(self) -> None:
        for _, obj in self.objects.values():
            obj.close()
        self.objects = {}
        if self.core is not None:
            self.core.close()
            self.core = None


def preload(lib: Libbpf, objects_dir: Path, config: AgentConfig, rules: RuleSet, self_tgid: int,
            urgent_rules: Collection[str] = ()) -> Preloaded:
    """The core object and every planned sensor object, loaded; nothing preloaded (the sensors
    will load their own) when the plans could not be had. A load that fails raises, with
    whatever was loaded closed: the sensor would have failed the same way."""
    plans = plans_from_child(objects_dir, config, rules, self_tgid, urgent_rules)
    if plans is None:
        return Preloaded()
    done = Preloaded()
    try:
        done.core = load_object(lib, objects_dir / CORE_OBJECT, config, self_tgid, None)
        shared = {name: done.core.map(name).fd for name in SHARED_MAPS}
        for plan in plans:
            done.objects[plan.object_file] = (plan, load_object(lib, objects_dir / plan.object_file, config,
                                                                self_tgid, plan, shared))
    except BaseException:
        done.close()
        raise
    return done


def plans_from_child(objects_dir: Path, config: AgentConfig, rules: RuleSet, self_tgid: int,
                     urgent_rules: Collection[str] = ()) -> list[ObjectPlan] | None:
    """Every enabled sensor's plan, worked out in a forked child (see the module docstring);
    None if the child failed (its error comes again when the sensors are made here)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 1
        try:
            os.close(read_fd)
            logging.disable(logging.CRITICAL)  # the sensors are made again by the parent: it logs
            plans = sensor_plans(objects_dir, config, rules, self_tgid, urgent_rules)
            with os.fdopen(write_fd, "w", encoding="utf-8") as out:
                json.dump([p.to_json() for p in plans], out)
            status = 0
        finally:
            os._exit(status)  # no atexit handlers, no buffers of the parent's flushed twice
    os.close(write_fd)
    with os.fdopen(read_fd, encoding="utf-8") as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        log.debug("the kernel side's plans could not be worked out ahead: each sensor loads its own object")
        return None
    return [ObjectPlan.from_json(raw) for raw in json.loads(text)]


def sensor_plans(objects_dir: Path, config: AgentConfig, rules: RuleSet, self_tgid: int,
                 urgent_rules: Collection[str] = ()) -> list[ObjectPlan]:
    """The plans of the sensors `build_sensors` makes for these rules, those with a BPF object."""
    # Imported here, in the child: the registry imports every sensor's module, and numpy with them.
    from ksift.sensors.registry import build_sensors

    sensors = build_sensors(None, objects_dir, config, rules, urgent_rules=urgent_rules, self_tgid=self_tgid)
    return [s.plan() for s in sensors if s.object_file]
