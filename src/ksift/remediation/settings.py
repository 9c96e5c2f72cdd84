"""The [remediation] config section: limits and protections shared by every policy.

    [remediation]
    enabled = true                 # false: every rule's policy is off (a kill switch)
    dry_run = false                # true: ask and enforce policies only record what they would do
    protected_exe = ["/opt/db/bin/postgres"]    # added to the built-in list, matched exactly
    protected_cgroups = ["/system.slice/db.service"]  # cgroup paths, added to the built-in list, exact
    allow_other_users = false      # act on processes of users other than ksift's own
    max_actions_per_minute = 20    # every rule together (each policy has its own rate_per_minute)
    max_processes = 1000           # ceiling on any policy's max_processes (blast radius)
    ask_timeout = "5m"             # pending approvals expire after this
    poll_interval = "500ms"        # how often the agent picks up approvals written by `ksift actions`
    nice = -10                     # the agent's loop and remediation threads run at this nice value, so
                                   # the CPU storm they fight cannot starve them; false keeps the default

Policies themselves live in the rules file (see ksift.remediation.policy).
The built-in protected lists cannot be shortened from the config: a typo in
a list must never expose init or sshd.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ksift.errors import ConfigError
from ksift.settings_fields import boolean, duration_between, integer_between

# Never acted on, whatever a policy says (matched exactly on /proc/<pid>/exe).
DEFAULT_PROTECTED_EXE: tuple[str, ...] = (
    # init / systemd
    "/sbin/init", "/usr/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd",
    "/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald",
    "/lib/systemd/systemd-logind", "/usr/lib/systemd/systemd-logind",
    "/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd", "/usr/bin/dbus-daemon",
    # remote access
    "/usr/sbin/sshd", "/usr/bin/sshd", "/usr/local/sbin/sshd",
    # container runtimes
    "/usr/bin/containerd", "/usr/local/bin/containerd", "/usr/bin/containerd-shim",
    "/usr/bin/containerd-shim-runc-v2", "/usr/local/bin/containerd-shim-runc-v2",
    "/usr/bin/dockerd", "/usr/sbin/dockerd", "/usr/bin/docker-proxy",
    "/usr/bin/runc", "/usr/sbin/runc", "/usr/local/bin/runc", "/usr/bin/crun",
    "/usr/bin/crio", "/usr/local/bin/crio", "/usr/bin/conmon", "/usr/libexec/crio/conmon",
    "/usr/bin/podman",
    # kubernetes
    "/usr/bin/kubelet", "/usr/local/bin/kubelet", "/opt/bin/kubelet",
)

# No process in these cgroups is acted on, and neither they nor a cgroup that
# contains one of them is frozen or limited (exact cgroup paths). The root
# cgroup is never acted on as a cgroup either; that is a rule, not a list entry.
DEFAULT_PROTECTED_CGROUPS: tuple[str, ...] = (
    "/init.scope", "/system.slice/ssh.service", "/system.slice/sshd.service",
    "/system.slice/containerd.service", "/system.slice/docker.service", "/system.slice/crio.service",
    "/system.slice/kubelet.service", "/system.slice/systemd-journald.service",
    "/system.slice/systemd-logind.service", "/system.slice/dbus.service",
)

_FIELDS = ("enabled", "dry_run", "protected_exe", "protected_cgroups", "allow_other_users",
           "max_actions_per_minute", "max_processes", "ask_timeout", "poll_interval", "nice")


@dataclass(frozen=True)
class RemediationSettings:
    enabled: bool = True
    dry_run: bool = False
    protected_exe: frozenset[str] = field(default_factory=lambda: frozenset(DEFAULT_PROTECTED_EXE))
    protected_cgroups: frozenset[str] = field(default_factory=lambda: frozenset(DEFAULT_PROTECTED_CGROUPS))
    allow_other_users: bool = False
    max_actions_per_minute: int = 20
    max_processes: int = 1000
    ask_timeout_s: float = 300.0
    poll_interval_s: float = 0.5
    nice: int | None = -10


def parse_remediation(table: dict, source: str) -> RemediationSettings:
    """Parse the [remediation] table; errors name remediation.<field> and the bad value."""
    for name in table:
        if name not in _FIELDS:
            raise ConfigError(source, f"unknown field (allowed: {', '.join(_FIELDS)})", field=f"remediation.{name}")
    values: dict = {}
    for name in ("enabled", "dry_run", "allow_other_users"):
        if name in table:
            values[name] = boolean(table[name], source, f"remediation.{name}")
    if "protected_exe" in table:
        values["protected_exe"] = frozenset(DEFAULT_PROTECTED_EXE) | _paths(
            table["protected_exe"], source, "remediation.protected_exe", "executable path")
    if "protected_cgroups" in table:
        values["protected_cgroups"] = frozenset(DEFAULT_PROTECTED_CGROUPS) | {
            _normalize_cgroup(p) for p in _paths(table["protected_cgroups"], source, "remediation.protected_cgroups",
                                                 "cgroup path such as /system.slice/db.service")}
    for name, low, high in (("max_actions_per_minute", 1, 10_000), ("max_processes", 1, 100_000)):
        if name in table:
            values[name] = integer_between(table[name], source, f"remediation.{name}", low, high)
    for name, attribute, low, high in (("ask_timeout", "ask_timeout_s", 1.0, 86_400.0),
                                       ("poll_interval", "poll_interval_s", 0.05, 60.0)):
        if name in table:
            values[attribute] = duration_between(table[name], source, f"remediation.{name}", low, high)
    if "nice" in table:
        value = table["nice"]
        if value is False:
            values["nice"] = None
        elif not isinstance(value, int) or isinstance(value, bool) or not -20 <= value <= 19:
            raise ConfigError(source, f"invalid value {value!r}: must be an integer between -20 and 19, or false",
                              field="remediation.nice")
        else:
            values["nice"] = value
    return RemediationSettings(**values)


def _paths(value: object, source: str, field: str, what: str) -> frozenset[str]:
    if not isinstance(value, list):
        raise ConfigError(source, f"invalid value {value!r}: must be a list of absolute paths", field=field)
    out = set()
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.startswith("/"):
            raise ConfigError(source, f"invalid value {item!r}: must be an absolute {what}",
                              field=f"{field}[{index}]")
        out.add(item)
    return frozenset(out)


def _normalize_cgroup(path: str) -> str:
    # "/system.slice/db.service/" and "/system.slice/db.service" are the same cgroup.
    return path.rstrip("/") or "/"
