"""What a rule is, and which kernel signals rules can watch.

Plain frozen values: the parser builds them, the engine and the BPF loader read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType


@dataclass(frozen=True)
class SignalSpec:
    """A kind of event the kernel side counts, and what it can be grouped by."""

    name: str
    keys: tuple[str, ...]  # fields a rule may group counts by
    unit: str  # what one count is, for alert text ("forks")
    description: str


def _registry(*specs: SignalSpec) -> Mapping[str, SignalSpec]:
    # Read-only view so no caller can add or replace a signal at run time.
    return MappingProxyType({spec.name: spec for spec in specs})


# Every signal a rule may name. Adding a signal means adding a SignalSpec here
# (and the kernel program that counts it).
SIGNALS: Mapping[str, SignalSpec] = _registry(
    SignalSpec(
        name="process.fork",
        keys=("tgid",),
        unit="forks",
        description="new processes (not threads) created by one parent, counted in the kernel",
    ),
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
