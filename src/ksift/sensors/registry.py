"""Which sensor feeds which signal, and building only the sensors enabled rules need.

Sensor modules are imported only when one of their signals has an enabled rule,
so a host that watches only forks never loads (or even imports) the others.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Collection
from pathlib import Path

from ksift.config import AgentConfig
from ksift.kernel_side import Preloaded
from ksift.loader.libbpf import Libbpf
from ksift.rules.model import SIGNALS, RuleSet
from ksift.sensors.base import Sensor

log = logging.getLogger("ksift.agent")

# signal -> (module, class) of the sensor that feeds it.
SENSORS: dict[str, tuple[str, str]] = {
    "process.fork": ("ksift.sensors.process", "ProcessSensor"),
    "process.bomb": ("ksift.sensors.process", "ProcessSensor"),
    "process.short_lived": ("ksift.sensors.lifecycle", "LifecycleSensor"),
    "process.crash": ("ksift.sensors.lifecycle", "LifecycleSensor"),
    "file.open": ("ksift.sensors.files", "FileSensor"),
    "net.connect": ("ksift.sensors.net", "ConnectSensor"),
    "net.slow_request": ("ksift.sensors.request", "RequestSensor"),
    "cpu.usage": ("ksift.sensors.cpu", "CpuSensor"),
    "memory.oom_kill": ("ksift.sensors.memory", "MemorySensor"),
    "memory.rss_growth": ("ksift.sensors.memory", "MemorySensor"),
    "pressure.cpu": ("ksift.sensors.pressure", "PressureSensor"),
    "pressure.memory": ("ksift.sensors.pressure", "PressureSensor"),
    "pressure.io": ("ksift.sensors.pressure", "PressureSensor"),
}

assert set(SENSORS) == set(SIGNALS), "every signal needs a sensor"


def sensor_class(signal: str) -> type[Sensor]:
    module, name = SENSORS[signal]
    return getattr(importlib.import_module(module), name)


def all_sensor_classes() -> list[type[Sensor]]:
    """Every sensor class, once each (for doctor and the ABI test)."""
    out: list[type[Sensor]] = []
    for signal in SENSORS:
        cls = sensor_class(signal)
        if cls not in out:
            out.append(cls)
    return out


def build_sensors(lib: Libbpf | None, objects_dir: Path, config: AgentConfig, rules: RuleSet,
                  urgent_rules: Collection[str] = (), self_tgid: int | None = None) -> list[Sensor]:
    """Only the sensors an enabled rule needs: an unused hook costs the whole host.

    urgent_rules: rules whose crossings must reach user space at once (see Sensor.urgent_rules);
    the composition decides which (remediation's acting_rules), the sensors only obey.
    """
    classes: list[type[Sensor]] = []
    for rule in rules.enabled():
        cls = sensor_class(rule.signal)
        if cls not in classes:
            classes.append(cls)
    tgid = os.getpid() if self_tgid is None else self_tgid  # given: plans made in a child (ksift.kernel_side)
    sensors = [cls(lib, objects_dir, config, tgid, rules) for cls in classes]
    for sensor in sensors:
        sensor.urgent_rules = frozenset(urgent_rules)
    return sensors


def start_kernel_side(core, sensors: list[Sensor], preloaded: Preloaded | None = None) -> None:
    """Load the core object (the shared ring buffer and maps), then attach every sensor to
    them; all or nothing: on any failure what was started is closed again.

    preloaded: objects already loaded from the sensors' plans (ksift.kernel_side), taken by
    the core and the sensors whose plan they match, attached here."""
    preloaded = preloaded or Preloaded()
    started: list[Sensor] = []
    try:
        if core is not None:
            core.start(preloaded.take_core())
        for sensor in sensors:
            loaded = preloaded.take(sensor.plan()) if sensor.object_file else None
            shared = core.shared_fds if core is not None else None
            if loaded is not None:
                sensor.start(shared, loaded=loaded)
            else:
                sensor.start(shared)
            started.append(sensor)
            log.info("sensor %s attached: %s", sensor.name, sensor.attached_text())
    except BaseException:
        for sensor in reversed(started):
            sensor.close()
        if core is not None:
            core.close()
        raise
