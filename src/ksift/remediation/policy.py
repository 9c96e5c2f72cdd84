"""A rule's remediation policy: what to do about its alerts, in which mode, within which limits.

Written in the rules file as a table under the rule:

    [[rule]]
    name = "fork_storm"
    ...
    [rule.policy]
    action = "kill_tree"      # terminate, stop, continue, kill_tree, freeze, throttle, limit_pids, renice
    mode = "enforce"          # off, dry-run (default), ask, enforce
    max_processes = 500       # blast radius: at most this many processes per action
    scope = "tree"            # kill_tree: "tree" (default) or "cgroup" (every process of the subject's cgroup)
    fast_path = true          # fork storms and fork bombs: the kernel kills new members of the judged tree
    only_cgroups = ["/batch.slice"]  # optional scope: act only on subjects in (or below) these cgroups

A rule without a policy, or with mode "off", is monitor-only: nothing is
proposed, recorded or done. Every value is checked here, so a typo stops the
agent at start with the file and field named, never at the moment of acting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ksift.errors import ConfigError
from ksift.settings_fields import boolean, duration_between, integer_between
from ksift.units import format_duration

MODES = ("off", "dry-run", "ask", "enforce")
DEFAULT_MODE = "dry-run"  # a policy that names no mode only shows what it would do

# action -> what it acts on: one process, its whole tree, or its cgroup.
ACTION_SCOPE = {
    "terminate": "process",   # SIGTERM, then SIGKILL after `grace`
    "stop": "process",        # SIGSTOP
    "continue": "process",    # SIGCONT (undoes stop)
    "renice": "process",      # lower the CPU priority of every thread
    "kill_tree": "tree",      # stop the whole tree, then SIGKILL every member
    "freeze": "cgroup",       # cgroup v2 cgroup.freeze, else the v1 freezer
    "throttle": "cgroup",     # cgroup v2 cpu.max, else the v1 CFS quota
    "limit_pids": "cgroup",   # pids.max (v2, else v1)
}
ACTIONS = tuple(ACTION_SCOPE)

_FIELDS = ("action", "mode", "grace", "cpu_percent", "pids_max", "nice", "max_processes", "rate_per_minute",
           "cooldown", "ask_timeout", "verify_for", "fast_path", "only_cgroups", "scope")
# Options that only mean something for one action: refused elsewhere rather than silently ignored.
_ACTION_ONLY = {"grace": "terminate", "cpu_percent": "throttle", "pids_max": "limit_pids", "nice": "renice",
                "fast_path": "kill_tree", "scope": "kill_tree"}
# kill_tree's reach: "tree" = the judged tree (a process and its descendants; for a fork bomb, the
# members of its session inside its cgroup), "cgroup" = every process of the subject's cgroup.
KILL_SCOPES = ("tree", "cgroup")

MAX_PROCESSES_LIMIT = 100_000
MAX_GRACE_S = 300.0
MAX_COOLDOWN_S = 86_400.0
MAX_ASK_TIMEOUT_S = 86_400.0
MAX_VERIFY_S = 3600.0


@dataclass(frozen=True)
class Policy:
    """One rule's remediation policy (see the module docstring)."""

    action: str
    mode: str = DEFAULT_MODE
    grace_s: float = 5.0             # terminate: SIGTERM, then SIGKILL this long after
    cpu_percent: float = 10.0        # throttle: CPU share of the cgroup, in % of one CPU
    pids_max: int = 64               # limit_pids: the cgroup's pids.max
    nice: int = 10                   # renice: the new nice value (0..19: only ever lower the priority)
    max_processes: int = 50          # blast radius: at most this many processes per action
    rate_per_minute: int = 6         # actions of this rule per minute
    cooldown_s: float = 60.0         # after acting on a subject, leave it alone this long
    ask_timeout_s: float | None = None  # ask mode: pending approvals expire; None = [remediation] ask_timeout
    verify_for_s: float | None = None   # outcome watch; None = a few of the rule's windows
    fast_path: bool = False          # kill_tree on fork storms and bombs: the kernel kills new members at fork
    only_cgroups: tuple[str, ...] = ()  # scope: subjects outside these cgroups are left alone (empty = all)
    kill_scope: str = "tree"         # kill_tree: "tree" or "cgroup" (written `scope` in the rules file)

    @property
    def scope(self) -> str:
        """What the action acts on: "process", "tree" or "cgroup" (kill_tree with scope = "cgroup")."""
        if self.action == "kill_tree" and self.kill_scope == "cgroup":
            return "cgroup"
        return ACTION_SCOPE[self.action]

    def covers(self, cgroup: str | None) -> bool:
        """Is a subject in this cgroup (v2 path) within the policy's scope?"""
        if not self.only_cgroups:
            return True
        if cgroup is None:
            return False
        return any(cgroup == top or cgroup.startswith(top.rstrip("/") + "/") for top in self.only_cgroups)

    @property
    def active(self) -> bool:
        """False for mode "off": the rule stays monitor-only."""
        return self.mode != "off"

    def describe(self) -> str:
        """What the action does, in words (used by dry-run records and the CLI)."""
        if self.action == "terminate":
            return f"SIGTERM, then SIGKILL after {format_duration(self.grace_s)} if still running"
        if self.action == "stop":
            return "SIGSTOP the process"
        if self.action == "continue":
            return "SIGCONT the process"
        if self.action == "renice":
            return f"renice every thread to {self.nice}"
        if self.action == "kill_tree":
            text = ("kill every process of the cgroup" if self.kill_scope == "cgroup"
                    else "SIGSTOP every process of the tree, then SIGKILL them all")
            return text + (" (in-kernel fast path: new children killed at fork)" if self.fast_path else "")
        if self.action == "freeze":
            return "freeze the cgroup"
        if self.action == "throttle":
            return f"limit the cgroup to {self.cpu_percent:g}% of one CPU"
        return f"set the cgroup's pids.max to {self.pids_max}"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action, "mode": self.mode, "max_processes": self.max_processes,
                               "rate_per_minute": self.rate_per_minute, "cooldown_s": self.cooldown_s}
        extra = {"terminate": ("grace_s", self.grace_s), "throttle": ("cpu_percent", self.cpu_percent),
                 "limit_pids": ("pids_max", self.pids_max), "renice": ("nice", self.nice),
                 "kill_tree": ("fast_path", self.fast_path)}.get(self.action)
        if extra:
            out[extra[0]] = extra[1]
        if self.action == "kill_tree":
            out["scope"] = self.kill_scope
        if self.only_cgroups:
            out["only_cgroups"] = list(self.only_cgroups)
        return out


def parse_policy(table: object, source: str, field: str) -> Policy:
    """Parse one rule's `policy` table; ConfigError names `field`.<name> and the bad value."""
    if not isinstance(table, dict):
        raise ConfigError(source, 'must be a table, e.g. policy = { action = "terminate", mode = "dry-run" }',
                          field=field)
    unknown = sorted(set(table) - set(_FIELDS))
    if unknown:
        raise ConfigError(source, f"unknown field {unknown[0]!r} (allowed: {', '.join(_FIELDS)})",
                          field=f"{field}.{unknown[0]}")
    if "action" not in table:
        raise ConfigError(source, f"missing required field (one of: {', '.join(ACTIONS)})", field=f"{field}.action")
    action = table["action"]
    if not isinstance(action, str) or action not in ACTION_SCOPE:
        raise ConfigError(source, f"invalid action {action!r} (expected one of: {', '.join(ACTIONS)})",
                          field=f"{field}.action")
    for option, owner in _ACTION_ONLY.items():
        if option in table and action != owner:
            raise ConfigError(source, f"{option} applies only to action {owner!r}, not {action!r}",
                              field=f"{field}.{option}")

    def where(name: str) -> str:
        return f"{field}.{name}"

    values: dict[str, Any] = {"action": action}
    mode = table.get("mode", DEFAULT_MODE)
    if not isinstance(mode, str) or mode not in MODES:
        raise ConfigError(source, f"invalid mode {mode!r} (expected one of: {', '.join(MODES)})", field=where("mode"))
    values["mode"] = mode
    if "grace" in table:
        values["grace_s"] = duration_between(table["grace"], source, where("grace"), 0.0, MAX_GRACE_S)
    if "cpu_percent" in table:
        values["cpu_percent"] = _number(table["cpu_percent"], source, where("cpu_percent"), 1.0, 100_000.0,
                                        "the CPU share in % of one CPU (50 = half a CPU)")
    if "pids_max" in table:
        values["pids_max"] = integer_between(table["pids_max"], source, where("pids_max"), 1, 4_194_304)
    if "nice" in table:
        # Remediation only ever lowers priority: a negative nice would favour the offender.
        values["nice"] = integer_between(table["nice"], source, where("nice"), 0, 19)
    if "max_processes" in table:
        values["max_processes"] = integer_between(table["max_processes"], source, where("max_processes"), 1,
                                                  MAX_PROCESSES_LIMIT)
    if "rate_per_minute" in table:
        values["rate_per_minute"] = integer_between(table["rate_per_minute"], source, where("rate_per_minute"), 1,
                                                    10_000)
    if "cooldown" in table:
        values["cooldown_s"] = duration_between(table["cooldown"], source, where("cooldown"), 0.0, MAX_COOLDOWN_S)
    if "ask_timeout" in table:
        values["ask_timeout_s"] = duration_between(table["ask_timeout"], source, where("ask_timeout"), 1.0,
                                                   MAX_ASK_TIMEOUT_S)
    if "verify_for" in table:
        values["verify_for_s"] = duration_between(table["verify_for"], source, where("verify_for"), 0.1, MAX_VERIFY_S)
    if "fast_path" in table:
        values["fast_path"] = boolean(table["fast_path"], source, where("fast_path"))
    if "only_cgroups" in table:
        values["only_cgroups"] = _cgroups(table["only_cgroups"], source, where("only_cgroups"))
    if "scope" in table:
        scope = table["scope"]
        if not isinstance(scope, str) or scope not in KILL_SCOPES:
            raise ConfigError(source, f"invalid scope {scope!r} (expected one of: {', '.join(KILL_SCOPES)}: "
                                      '"tree" kills the judged tree, "cgroup" every process of its cgroup)',
                              field=where("scope"))
        values["kill_scope"] = scope
    return Policy(**values)


def effective_mode(policy: Policy, settings: Any) -> str:
    """The mode a policy runs in under the [remediation] settings.

    enabled = false turns every policy off; dry_run = true caps every one at dry-run.
    """
    if not policy.active or not getattr(settings, "enabled", True):
        return "off"
    if getattr(settings, "dry_run", False) and policy.mode in ("ask", "enforce"):
        return "dry-run"
    return policy.mode


def fast_path_enabled(policy: Policy, settings: Any) -> bool:
    """Whether the in-kernel fast path must be attached for this policy."""
    return policy.fast_path and policy.action == "kill_tree" and effective_mode(policy, settings) in ("ask", "enforce")


def acting_rules(rules: Any, settings: Any) -> frozenset[str]:
    """Names of the enabled rules whose policy may act (ask or enforce under `settings`).

    Their crossings must reach user space at once: the composition hands this set to the
    sensors (Sensor.urgent_rules), which never import remediation themselves.
    """
    return frozenset(r.name for r in rules.enabled()
                     if r.policy is not None and effective_mode(r.policy, settings) in ("ask", "enforce"))


def _cgroups(value: object, source: str, field: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(source, f"invalid value {value!r}: must be a non-empty list of cgroup paths such as "
                                  '"/batch.slice"', field=field)
    out = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.startswith("/") or item.rstrip("/") == "":
            raise ConfigError(source, f"invalid value {item!r}: must be an absolute cgroup path below the root",
                              field=f"{field}[{index}]")
        out.append(item.rstrip("/"))
    return tuple(out)


def _number(value: object, source: str, field: str, low: float, high: float, meaning: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(source, f"invalid value {value!r}: must be a number between {low:g} and {high:g} "
                                  f"({meaning})", field=field)
    return float(value)
