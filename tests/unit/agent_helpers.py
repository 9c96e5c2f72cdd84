"""A minimal fork_storm rule and a real crossing of it, for unit tests of rules files and of the agent's outputs.

An Agent built from these needs no sensor and no root: tests feed the crossing
to agent.engine.observe() as a sensor would after decoding a kernel record.
"""

from __future__ import annotations

import time

from ksift.enrich.cgroup import CgroupResolver
from ksift.enrich.context import Enricher
from ksift.enrich.procfs import ProcFS
from ksift.events import TaskContext
from ksift.rules.incidents import Crossing
from ksift.rules.model import RuleSet
from ksift.rules.parse import parse_rules

# The required fields only: every optional one keeps its default.
FORK_STORM_RULE = """
[[rule]]
name = "fork_storm"
severity = "warning"
signal = "process.fork"
key = "tgid"
threshold = 50
window = "1s"
"""


def fork_storm_rules() -> RuleSet:
    """FORK_STORM_RULE, parsed as if from rules.toml."""
    return parse_rules(FORK_STORM_RULE, "rules.toml")


def plain_enricher() -> Enricher:
    """Enrichment from /proc only, with no cgroup mount to resolve ids against."""
    return Enricher(ProcFS(), CgroupResolver(None))


def fork_storm_crossing(pid: int, count: int) -> Crossing:
    """pid forked `count` times in the last half second: a fork_storm crossing as the process sensor decodes it."""
    now = time.monotonic_ns()
    task = TaskContext(tgid=pid, pid=pid, ppid=1, uid=0, gid=0, cgroup_id=0, start_boottime_ns=1,
                       comm="ks-forker", exe="/usr/bin/python3", ancestry=((1, "systemd"),))
    return Crossing(rule="fork_storm", key=pid, ktime_ns=now, window_start_ns=now - 500_000_000,
                    window_count=count, total=count, task=task)
