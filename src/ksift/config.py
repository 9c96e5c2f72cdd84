"""Agent configuration from a TOML file.

Layout (every section and field optional):

    [agent]
    tick = "1s"           # longest sleep while nothing happens: counters, loss check, polls
    log_level = "info"    # debug, info, warning, error
    [transport]
    ringbuf_bytes = 1048576
    wakeup_bytes = 262144
    [store]
    db = "/var/lib/ksift/ksift.db"
    [rules]
    file = "/etc/ksift/rules.toml"
    [output]
    json = false

Sections owned by other parts of ksift ([api], [sinks], [kubernetes],
[remediation], [pressure]) are parsed by those parts (see _EXTENSIONS) and documented with them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from ksift.errors import ConfigError
from ksift.settings_fields import boolean, choice, duration_between, integer, non_empty_path
from ksift.tomlfile import parse_toml, read_text

LOG_LEVELS = ("debug", "info", "warning", "error")

MIN_TICK_S = 0.01
MAX_TICK_S = 5.0
MIN_RINGBUF_BYTES = 16384
MAX_RINGBUF_BYTES = 1 << 30
DEFAULT_WAKEUP_BYTES = 256 * 1024


@dataclass(frozen=True)
class AgentConfig:
    tick_s: float = 1.0  # housekeeping: the longest the agent sleeps while nothing is due
    log_level: str = "info"
    ringbuf_bytes: int = 1 << 20  # BPF ring buffer size: power of two, 16 KiB .. 1 GiB
    wakeup_bytes: int = DEFAULT_WAKEUP_BYTES  # wake userspace once this much is queued
    db_path: str | None = None  # None: default_db_path()
    rules_path: str | None = None  # None: the packaged default rules
    json_output: bool = False
    # Parsed extension sections by name (see _EXTENSIONS); absent ones read as their defaults.
    extensions: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def section(self, name: str) -> Any:
        """An extension section's parsed config: the file's, else its defaults."""
        if name in self.extensions:
            return self.extensions[name]
        return _parse_extension(name, {}, "<defaults>")


def load_config(path: str | os.PathLike[str] | None) -> AgentConfig:
    """Parse the config file at `path`; None means all defaults."""
    if path is None:
        return AgentConfig()
    return parse_config(*read_text(path, "config file"))


def parse_config(text: str, source: str) -> AgentConfig:
    """Parse config TOML `text`; `source` names where it came from in error messages."""
    document = parse_toml(text, source)

    for section in document:
        if section not in _SECTIONS and section not in _EXTENSIONS:
            allowed = ", ".join([*_SECTIONS, *_EXTENSIONS])
            raise ConfigError(source, f"unknown section (allowed: {allowed})", field=section)

    values: dict[str, Any] = {}
    extensions = {}
    for section in _EXTENSIONS:
        if section in document:
            table = document[section]
            if not isinstance(table, dict):
                raise ConfigError(source, f"must be a table, written [{section}]", field=section)
            extensions[section] = _parse_extension(section, table, source)
    values["extensions"] = MappingProxyType(extensions)
    for section, fields in _SECTIONS.items():
        table = document.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(source, f"must be a table, written [{section}]", field=section)
        for name in table:
            if name not in fields:
                allowed = ", ".join(fields)
                raise ConfigError(source, f"unknown field (allowed: {allowed})", field=f"{section}.{name}")
        for name, (attribute, convert) in fields.items():
            if name in table:
                values[attribute] = convert(table[name], source, f"{section}.{name}")

    config = AgentConfig(**values)
    if "wakeup_bytes" not in values:
        # The default wakeup does not fit a small ring buffer; shrink it to fit
        # rather than reject a config that never mentioned wakeup_bytes.
        config = replace(config, wakeup_bytes=min(DEFAULT_WAKEUP_BYTES, config.ringbuf_bytes // 2))
    elif config.wakeup_bytes > config.ringbuf_bytes // 2:
        # Checked after both are known: the limit depends on ringbuf_bytes.
        raise ConfigError(
            source,
            f"invalid value {config.wakeup_bytes}: must be <= ringbuf_bytes // 2 "
            f"({config.ringbuf_bytes // 2})",
            field="transport.wakeup_bytes",
        )
    return config


def default_db_path(euid: int | None = None, env: Mapping[str, str] | None = None) -> str:
    """Where the alert store lives when the config does not say.

    root: /var/lib/ksift/ksift.db; anyone else: the XDG state directory.
    """
    if euid is None:
        euid = os.geteuid()
    if env is None:
        env = os.environ
    if euid == 0:
        return "/var/lib/ksift/ksift.db"
    # The XDG spec says to ignore relative values of XDG_STATE_HOME.
    state_home = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state_home):
        home = env.get("HOME") or os.path.expanduser("~")
        state_home = os.path.join(home, ".local", "state")
    return os.path.join(state_home, "ksift", "ksift.db")


# --- field converters: (raw TOML value, source, dotted field name) -> validated value


def _tick(value: object, source: str, field: str) -> float:
    return duration_between(value, source, field, MIN_TICK_S, MAX_TICK_S)


def _log_level(value: object, source: str, field: str) -> str:
    # Accept "INFO" as well: it is how most tools spell levels.
    return choice(value, source, field, LOG_LEVELS, fold_case=True)


def _ringbuf_bytes(value: object, source: str, field: str) -> int:
    size = integer(value, source, field)
    # The kernel requires a power-of-two ring buffer size (a multiple of the page size).
    power_of_two = size > 0 and size & (size - 1) == 0
    if not power_of_two or not MIN_RINGBUF_BYTES <= size <= MAX_RINGBUF_BYTES:
        raise ConfigError(
            source,
            f"invalid value {value!r}: must be a power of two between {MIN_RINGBUF_BYTES} "
            f"and {MAX_RINGBUF_BYTES}",
            field=field,
        )
    return size


def _wakeup_bytes(value: object, source: str, field: str) -> int:
    size = integer(value, source, field)
    if size <= 0:
        raise ConfigError(source, f"invalid value {value!r}: must be > 0", field=field)
    return size  # the upper bound depends on ringbuf_bytes; checked in parse_config


def _path(value: object, source: str, field: str) -> str:
    return non_empty_path(value, source, field, "path string")


_Converter = Callable[[object, str, str], Any]

# section -> TOML field -> (AgentConfig attribute, converter); read-only. Field
# order is the order shown in "allowed: ..." messages.
_SECTIONS: Mapping[str, Mapping[str, tuple[str, _Converter]]] = MappingProxyType(
    {
        "agent": MappingProxyType({"tick": ("tick_s", _tick), "log_level": ("log_level", _log_level)}),
        "transport": MappingProxyType(
            {
                "ringbuf_bytes": ("ringbuf_bytes", _ringbuf_bytes),
                "wakeup_bytes": ("wakeup_bytes", _wakeup_bytes),
            }
        ),
        "store": MappingProxyType({"db": ("db_path", _path)}),
        "rules": MappingProxyType({"file": ("rules_path", _path)}),
        "output": MappingProxyType({"json": ("json_output", boolean)}),
    }
)

# Sections parsed by the part of ksift they configure: section -> (module, function).
# The function takes (table, source) and returns a frozen config object; it names
# fields as "<section>.<field>" in its ConfigErrors. Imported only when needed.
_EXTENSIONS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "api": ("ksift.interfaces.settings", "parse_api"),
        "sinks": ("ksift.sinks.settings", "parse_sinks"),
        "kubernetes": ("ksift.enrich.kubernetes", "parse_kubernetes"),
        "remediation": ("ksift.remediation.settings", "parse_remediation"),
        "pressure": ("ksift.sensors.psi", "parse_pressure_settings"),
    }
)


def _parse_extension(section: str, table: dict, source: str) -> Any:
    module, function = _EXTENSIONS[section]
    return getattr(importlib.import_module(module), function)(table, source)
