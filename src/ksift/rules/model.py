"""What a rule is, and which kernel signals rules can watch.

Plain frozen values: the parser builds them, the engine and the BPF loader read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class ParamSpec:
    """A per-rule setting a signal understands, beyond threshold and window.

    kind: "duration" (seconds, written "500ms"), "int", "float", "bytes" or "choice" (one of
    `choices`; minimum and maximum unused).
    """

    name: str
    kind: str
    default: float | int | str
    minimum: float | int
    maximum: float | int
    help: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class SignalSpec:
    """A kind of event the kernel side counts, and what it can be grouped by."""

    name: str
    keys: tuple[str, ...]  # what a rule groups counts by; the first is the default
    unit: str  # what the threshold counts ("forks", "% of one CPU")
    description: str
    params: tuple[ParamSpec, ...] = ()
    where: str = "kernel"  # where the threshold is decided: "kernel" or "user space"

    def param(self, name: str) -> ParamSpec | None:
        for spec in self.params:
            if spec.name == name:
                return spec
        return None


def _registry(*specs: SignalSpec) -> Mapping[str, SignalSpec]:
    # Read-only view so no caller can add or replace a signal at run time.
    return MappingProxyType({spec.name: spec for spec in specs})


_MIB = 1 << 20
_NS = 1_000_000_000

# cpu.usage: the kernel counts samples, so a rule's window must hold enough of
# them for a share to mean something: at 49 Hz a 1 s window has 49, and 90% of
# them is 44; at 5 samples, one sample is 20%.
MIN_CPU_SAMPLES_PER_WINDOW = 10


def cpu_samples_threshold(threshold_percent: int, sample_hz: int, window_s: float) -> int:
    """Samples per window a process must go over: threshold% of sample_hz * window, rounded down.

    Integer arithmetic on nanoseconds, so 90% of 49 Hz over 1 s is exactly 44 (44.1 rounded down).
    """
    window_ns = round(window_s * _NS)
    return threshold_percent * sample_hz * window_ns // (100 * _NS)


# pressure.*: the kernel's PSI triggers take windows from 500 ms to 10 s (kernel/sched/psi.c,
# WINDOW_MIN_US and WINDOW_MAX_US); without CAP_SYS_RESOURCE only multiples of 2 s.
PSI_MIN_WINDOW_S = 0.5
PSI_MAX_WINDOW_S = 10.0
PRESSURE_SIGNALS = ("pressure.cpu", "pressure.memory", "pressure.io")


def _pressure_params(default_stall: str) -> tuple[ParamSpec, ...]:
    return (
        ParamSpec("stall", "choice", default_stall, 0, 0,
                  "which PSI line: \"some\" (at least one task of the cgroup stalled) or \"full\" (all of its "
                  "non-idle tasks stalled at once)", choices=("some", "full")),
        ParamSpec("critical", "int", 0, 0, 100,
                  "the alert is critical instead of the rule's severity when the share stalled in the window "
                  "that opens the incident (or a later one) is at least this percent (0: never)"),
    )


def _pressure_signal(resource: str, what: str, default_stall: str) -> SignalSpec:
    return SignalSpec(
        name=f"pressure.{resource}",
        keys=("cgroup",),
        unit="% of the window stalled",
        description=f"time the tasks of one cgroup (or the whole host) were stalled waiting for {what}, from "
                    "the kernel's pressure stall information (a PSI trigger per cgroup, no polling): the "
                    "host and cgroups that hold processes; the alert names the other cgroups that used the "
                    "resource meanwhile, or says the cgroup is held back by its own limit",
        params=_pressure_params(default_stall),
    )

# Every signal a rule may name. Adding a signal means adding a SignalSpec here,
# the sensor that feeds it (sensors/registry.py) and its kernel program.
SIGNALS: Mapping[str, SignalSpec] = _registry(
    SignalSpec(
        name="process.fork",
        keys=("tgid",),
        unit="forks",
        description="new processes (not threads) created by one parent, counted in the kernel",
    ),
    SignalSpec(
        name="process.bomb",
        keys=("tree",),
        unit="forks",
        description="new processes created by the members of one process tree (every descendant of the "
                    "session it started in, followed through setsid and reparenting), counted in the kernel "
                    "while the tree has at least min_live members alive: a fork bomb, not a busy build",
        params=(ParamSpec("min_live", "int", 100, 2, 1_000_000,
                          "members of the tree alive at once before its forks count as a bomb"),),
    ),
    SignalSpec(
        name="process.short_lived",
        keys=("tgid",),
        unit="short-lived children",
        description="children of one parent (tgid) that exec'd and exited within max_lifetime",
        params=(ParamSpec("max_lifetime", "duration", 1.0, 0.001, 3600.0,
                          "a child that exits sooner than this after it started counts"),),
    ),
    SignalSpec(
        name="process.crash",
        keys=("parent_exe",),
        unit="failures in a row",
        description="exits with a non-zero status or by a signal shortly after the start (max_lifetime), of one "
                    "executable under one parent (or, for a process put in a cgroup of its own such as a "
                    "systemd unit or a container, under the cgroup above it), each within window of the one "
                    "before: a loop once more than threshold of them were each restarted after a pause "
                    "(min_gap), or once they kept coming, each within a second of the last, for tight_for",
        params=(
            ParamSpec("max_lifetime", "duration", 60.0, 0.001, 3600.0,
                      "a failure counts when the process exited this soon after it started; one that lived "
                      "longer ends the run"),
            ParamSpec("min_gap", "duration", 0.02, 0.0, 60.0,
                      "a restart this long or longer after the previous failure is a supervisor's pause "
                      "(back-off, RestartSec); sooner is a loop without a pause, or a script's burst"),
            ParamSpec("tight_for", "duration", 5.0, 0.0, 3600.0,
                      "failures that keep coming, each within a second of the last, are a loop (one without "
                      "a pause) once they went on this long"),
        ),
    ),
    SignalSpec(
        name="file.open",
        keys=("tgid",),
        unit="new file descriptors",
        description="successful open/openat/openat2/creat/socket/accept calls of one process "
                    "(attaches syscall tracepoints: a cost on every syscall of the host)",
    ),
    SignalSpec(
        name="net.connect",
        keys=("tgid_destination",),
        unit="connections",
        description="outgoing TCP connection attempts (IPv4 and IPv6) from one process to one address and port",
    ),
    SignalSpec(
        name="net.slow_request",
        keys=("tgid",),
        unit="slow requests",
        description="requests on TCP connections a process accepted that took longer than latency "
                    "(first read after a response to the first write of the next response)",
        params=(ParamSpec("latency", "duration", 0.5, 0.001, 3600.0,
                          "a request slower than this counts"),),
    ),
    SignalSpec(
        name="cpu.usage",
        keys=("tgid",),
        unit="% of one CPU",
        description="CPU time of one process, sampled in the kernel (perf cpu-clock), as a share of one core",
        params=(ParamSpec("sample_hz", "int", 49, 1, 1000, "samples per second per CPU"),),
    ),
    SignalSpec(
        name="memory.oom_kill",
        keys=("victim",),
        unit="OOM kills",
        description="the kernel's OOM killer chose a victim (oom:mark_victim)",
    ),
    SignalSpec(
        name="memory.rss_growth",
        keys=("tgid",),
        unit="MB of resident memory growth",
        description="resident memory of one process growing within window, from a task iterator that reads "
                    "every process's RSS in the kernel once a second (only processes that pass step are tracked), "
                    "or growing fast enough to reach its memory limit within eta",
        where="user space",
        params=(
            ParamSpec("min_growth_percent", "float", 50.0, 0.0, 100000.0,
                      "the growth must also be at least this share of the starting RSS"),
            ParamSpec("step", "bytes", 32 * _MIB, _MIB, 1 << 40,
                      "the kernel reports a process each time its RSS grows by this much"),
            ParamSpec("eta", "duration", 30.0, 0.0, 3600.0,
                      "also alert when, at the rate of its latest reports, the process would use up the room "
                      "left below its memory cgroup limit or the host's available memory within this time "
                      "(0 turns the projection off)"),
        ),
    ),
    _pressure_signal("cpu", "a CPU", "some"),
    _pressure_signal("memory", "memory (reclaim, refaults, swap-in)", "full"),
    _pressure_signal("io", "I/O", "full"),
)


class Severity(StrEnum):
    """How loud an alert is. A StrEnum so it compares equal to and prints as its name."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


# Least to most severe; the position is the rank.
SEVERITIES: tuple[str, ...] = tuple(severity.value for severity in Severity)


def severity_rank(name: str) -> int:
    """0 for info, 1 for warning, 2 for critical; for sorting and "at least" filters.

    Raises ValueError for an unknown name (config input is validated before this).
    """
    try:
        return SEVERITIES.index(str(name))
    except ValueError:
        raise ValueError(f"unknown severity {name!r} (expected one of: {', '.join(SEVERITIES)})") from None


@dataclass(frozen=True)
class Rule:
    """Alert when more than `threshold` events of `signal`, for one `key`, happen within `window_s`.

    sustain_s: the condition must hold this long before the alert fires (0 = at once).
    cooldown_s: after firing for a key, stay quiet this long for that key.
    """

    name: str
    severity: Severity
    signal: str
    key: str
    threshold: int
    window_s: float
    sustain_s: float = 0.0
    cooldown_s: float = 0.0
    enabled: bool = True
    description: str = ""
    params: Mapping[str, float | int | str] = field(default_factory=dict)  # the signal's ParamSpecs, defaults filled
    policy: Any = None  # remediation policy (ksift.remediation); None = monitor only

    def param(self, name: str) -> float | int | str:
        """A signal parameter: the rule's value, else the signal's default."""
        if name in self.params:
            return self.params[name]
        spec = SIGNALS[self.signal].param(name)
        if spec is None:
            raise KeyError(f"signal {self.signal!r} has no parameter {name!r}")
        return spec.default


@dataclass(frozen=True)
class RuleSet:
    """The rules from one file, in file order; `source` names the file for messages."""

    rules: tuple[Rule, ...]
    source: str

    def enabled(self) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.enabled)

    def for_signal(self, signal: str) -> Rule | None:
        """The enabled rule watching `signal` (the parser allows at most one)."""
        for rule in self.rules:
            if rule.enabled and rule.signal == signal:
                return rule
        return None

    def by_name(self, name: str) -> Rule | None:
        for rule in self.rules:
            if rule.name == name:
                return rule
        return None
