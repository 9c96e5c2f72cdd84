"""Read and validate rules files (TOML) into a RuleSet.

Every problem becomes a ConfigError naming the file, the rule (index and name)
and the field, so a typo is fixed from the message alone. This is the only
place rules are validated (sensors and remediation trust what it returns), so
`ksift rules check` and `ksift run` accept exactly the same files.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from types import MappingProxyType

from ksift.errors import ConfigError
from ksift.rules.model import (
    MIN_CPU_SAMPLES_PER_WINDOW,
    PRESSURE_SIGNALS,
    PSI_MAX_WINDOW_S,
    PSI_MIN_WINDOW_S,
    SEVERITIES,
    SIGNALS,
    ParamSpec,
    Rule,
    RuleSet,
    Severity,
    SignalSpec,
    cpu_samples_threshold,
)
from ksift.tomlfile import parse_toml, read_text
from ksift.units import format_duration, parse_duration

DEFAULT_RULES_RESOURCE = "default_rules.toml"
DEFAULT_RULES_SOURCE = "<default rules: ksift/rules/default_rules.toml>"

_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_REQUIRED = ("name", "severity", "signal", "key", "threshold", "window")
_OPTIONAL = ("description", "sustain", "cooldown", "enabled", "params", "policy")
_ALLOWED = ", ".join(sorted(_REQUIRED + _OPTIONAL))

# The kernel stores thresholds as u32 and fires on "count > threshold".
_THRESHOLD_LIMIT = 2**32
# Signals whose policies may ask for the in-kernel fast path (remediation's guard acts at fork time).
FAST_PATH_SIGNALS = ("process.fork", "process.bomb")
_MAX_WINDOW_S = 3600.0
_THRESHOLD_HELP = (
    f"must be an integer >= 0 and < {_THRESHOLD_LIMIT} "
    "(alert when more than threshold events happen within window; 0 = on the first one)"
)


def default_rules_text() -> str:
    """The packaged default rules file, as text."""
    try:
        return resources.files("ksift.rules").joinpath(DEFAULT_RULES_RESOURCE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        # Only a broken install gets here; say which file is missing and why.
        raise ConfigError(DEFAULT_RULES_SOURCE, f"cannot read packaged rules file: {_reason(exc)}") from exc


def load_rules(path: str | os.PathLike[str] | None = None) -> RuleSet:
    """Parse the rules file at `path`, or the packaged defaults when None."""
    if path is None:
        return parse_rules(default_rules_text(), DEFAULT_RULES_SOURCE)
    return parse_rules(*read_text(path, "rules file"))


def parse_rules(text: str, source: str) -> RuleSet:
    """Parse rules TOML `text`; `source` names where it came from in error messages."""
    document = parse_toml(text, source)

    for top_key in document:
        if top_key != "rule":
            raise ConfigError(source, f"unknown field {top_key!r} (expected: rule)")

    if document.get("rule", []) == []:
        # An agent with no rules watches nothing and looks healthy: a file left empty by mistake must
        # not start one. Turning every rule off is still possible, and explicit: `enabled = false`.
        raise ConfigError(source, "no rules in this file (at least one [[rule]] table; to watch nothing, "
                                  "list rules with enabled = false)")
    tables = document["rule"]
    # `[rule]` (one table) instead of `[[rule]]` parses as a dict; catch that here.
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise ConfigError(source, "must be an array of tables, written [[rule]]", field="rule")

    rules = tuple(_parse_rule(table, index, source) for index, table in enumerate(tables))
    _check_unique_names(rules, source)
    _check_one_enabled_per_signal(rules, source)
    return RuleSet(rules=rules, source=source)


def _parse_rule(table: dict, index: int, source: str) -> Rule:
    name = _parse_name(table, index, source)
    label = _label(index, name)

    unknown = sorted(set(table) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        names = ", ".join(repr(field) for field in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise ConfigError(source, f"unknown field{plural} {names} (allowed: {_ALLOWED})", field=label)

    for field in _REQUIRED:
        if field not in table:
            raise ConfigError(source, "missing required field", field=f"{label}.{field}")

    def where(field: str) -> str:
        return f"{label}.{field}"

    severity = table["severity"]
    if not isinstance(severity, str) or severity not in SEVERITIES:
        raise ConfigError(
            source,
            f"invalid severity {severity!r} (expected one of: {', '.join(SEVERITIES)})",
            field=where("severity"),
        )

    signal = table["signal"]
    if not isinstance(signal, str) or signal not in SIGNALS:
        known = ", ".join(sorted(SIGNALS))
        raise ConfigError(
            source, f"unknown signal {signal!r} (known signals: {known})", field=where("signal")
        )

    key = table["key"]
    keys = SIGNALS[signal].keys
    if not isinstance(key, str) or key not in keys:
        raise ConfigError(
            source,
            f"invalid key {key!r} for signal {signal!r} (expected one of: {', '.join(keys)})",
            field=where("key"),
        )

    threshold = table["threshold"]
    # bool is an int subclass; `threshold = true` must not become 1.
    valid_threshold = isinstance(threshold, int) and not isinstance(threshold, bool)
    if not valid_threshold or not 0 <= threshold < _THRESHOLD_LIMIT:
        raise ConfigError(
            source, f"invalid threshold {threshold!r}: {_THRESHOLD_HELP}", field=where("threshold")
        )

    window_s = parse_duration(table["window"], source=source, field=where("window"))
    if not 0 < window_s <= _MAX_WINDOW_S:
        raise ConfigError(
            source,
            f"invalid window {table['window']!r}: must be > 0 and <= {format_duration(_MAX_WINDOW_S)}",
            field=where("window"),
        )

    sustain_s = parse_duration(table.get("sustain", 0), source=source, field=where("sustain"))
    cooldown_s = parse_duration(table.get("cooldown", 0), source=source, field=where("cooldown"))

    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(
            source, f"invalid enabled {enabled!r}: must be true or false", field=where("enabled")
        )

    description = table.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(
            source, f"invalid description {description!r}: must be a string", field=where("description")
        )

    params = _parse_params(table.get("params", {}), SIGNALS[signal], source, where("params"))
    policy = None
    if "policy" in table:
        # Imported here: remediation is optional machinery the rules model must not depend on.
        from ksift.remediation.policy import parse_policy

        policy = parse_policy(table["policy"], source, where("policy"))

    rule = Rule(
        name=name,
        severity=Severity(severity),
        signal=signal,
        key=key,
        threshold=threshold,
        window_s=window_s,
        sustain_s=sustain_s,
        cooldown_s=cooldown_s,
        enabled=enabled,
        description=description,
        params=MappingProxyType(params),
        policy=policy,
    )
    _check_combination(rule, source, label)
    return rule


def _check_combination(rule: Rule, source: str, label: str) -> None:
    """What no single field shows: limits of the signal's kernel side and of the policy.

    Every check of a rule lives in this module, none in the sensors or remediation,
    so `ksift rules check` refuses exactly what `ksift run` refuses. Disabled rules
    are checked too: enabling one later must not be when it fails.
    """
    if rule.signal == "process.crash" and rule.sustain_s > 0:
        # The kernel reports a crash loop once per run, when it is one: there is no later
        # crossing a sustain could wait for, so the rule would never fire.
        raise ConfigError(source, f"invalid sustain {format_duration(rule.sustain_s)}: a crash loop is reported "
                                  "once, when it is one; say how long it must go on with threshold (failures "
                                  "in a row) and params.tight_for instead, and leave sustain at 0s",
                          field=f"{label}.sustain")
    if rule.signal == "cpu.usage":
        hz = int(rule.param("sample_hz"))
        per_window = hz * rule.window_s
        if per_window < MIN_CPU_SAMPLES_PER_WINDOW:
            raise ConfigError(source, f"window {format_duration(rule.window_s)} at params.sample_hz {hz} holds "
                                      f"{per_window:g} samples of a busy core; at least "
                                      f"{MIN_CPU_SAMPLES_PER_WINDOW} are needed to measure a share: lengthen the "
                                      "window or raise sample_hz", field=f"{label}.window")
        samples = cpu_samples_threshold(rule.threshold, hz, rule.window_s)
        if samples >= _THRESHOLD_LIMIT:
            # The kernel compares a u32 count of samples with this.
            raise ConfigError(source, f"invalid threshold {rule.threshold!r}: {rule.threshold}% of one CPU at "
                                      f"params.sample_hz {hz} over {format_duration(rule.window_s)} is {samples} "
                                      f"samples, more than the kernel counts in a window (< {_THRESHOLD_LIMIT}); "
                                      "100 is one busy core", field=f"{label}.threshold")
    if rule.signal in PRESSURE_SIGNALS:
        _check_pressure(rule, source, label)
    policy = rule.policy
    if policy is not None and policy.fast_path and rule.signal not in FAST_PATH_SIGNALS:
        raise ConfigError(source, f"fast_path works only for {' and '.join(FAST_PATH_SIGNALS)} rules (it acts at "
                                  f"fork time), not for {rule.signal!r}", field=f"{label}.policy.fast_path")
    if policy is not None and rule.signal == "process.bomb" and policy.scope == "process":
        # A bomb's subject is one member of hundreds, gone a moment later: acting on it alone stops nothing.
        raise ConfigError(source, f"action {policy.action!r} acts on one process; a fork bomb is stopped as a "
                                  "whole: use kill_tree (its tree, or scope = \"cgroup\"), freeze or limit_pids",
                          field=f"{label}.policy.action")


def _check_pressure(rule: Rule, source: str, label: str) -> None:
    """A PSI trigger's limits: what the kernel would refuse is refused here, naming the value."""
    if not 1 <= rule.threshold <= 100:
        raise ConfigError(source, f"invalid threshold {rule.threshold!r}: a pressure rule's threshold is the "
                                  "percent of the window its tasks were stalled, from 1 to 100",
                          field=f"{label}.threshold")
    if not PSI_MIN_WINDOW_S <= rule.window_s <= PSI_MAX_WINDOW_S:
        raise ConfigError(source, f"invalid window {format_duration(rule.window_s)}: the kernel's PSI triggers take "
                                  f"windows from {format_duration(PSI_MIN_WINDOW_S)} to "
                                  f"{format_duration(PSI_MAX_WINDOW_S)} (without CAP_SYS_RESOURCE, only "
                                  "multiples of 2s: 2s, 4s, 6s, 8s, 10s)", field=f"{label}.window")
    critical = int(rule.param("critical"))
    if critical and critical < rule.threshold:
        raise ConfigError(source, f"invalid value {critical!r}: critical must be 0 (off) or at least the threshold "
                                  f"({rule.threshold})", field=f"{label}.params.critical")
    if rule.policy is not None:
        # Remediation acts on an alert's subject, and a pressure alert's subject is the stalled
        # workload: the victim. Acting on it by default would punish the wrong one.
        raise ConfigError(source, "a pressure rule's subject is the stalled cgroup (the victim), so a policy would "
                                  "act on the victim; pressure rules only alert (their alerts name the offenders)",
                          field=f"{label}.policy")


def _parse_params(table: object, spec: SignalSpec, source: str, field: str) -> dict[str, float | int | str]:
    """The signal's parameters: every known one with its default, overridden by the rule."""
    if not isinstance(table, dict):
        raise ConfigError(source, "must be a table, e.g. params = { latency = \"500ms\" }", field=field)
    known = {p.name: p for p in spec.params}
    unknown = sorted(set(table) - set(known))
    if unknown:
        allowed = ", ".join(known) or "none"
        raise ConfigError(source, f"unknown parameter {unknown[0]!r} for signal {spec.name!r} (allowed: {allowed})",
                          field=f"{field}.{unknown[0]}")
    out: dict[str, float | int | str] = {}
    for name, param in known.items():
        if name not in table:
            out[name] = param.default
            continue
        out[name] = _param_value(table[name], param, source, f"{field}.{name}")
    return out


def _param_value(raw: object, param: ParamSpec, source: str, field: str) -> float | int | str:
    if param.kind == "choice":
        if not isinstance(raw, str) or raw not in param.choices:
            raise ConfigError(source, f"invalid value {raw!r} (expected one of: {', '.join(param.choices)}; "
                                      f"{param.help})", field=field)
        return raw
    if param.kind == "duration":
        value: float | int = parse_duration(raw, source=source, field=field)
        shown = format_duration
    elif param.kind in ("int", "bytes"):
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise ConfigError(source, f"invalid value {raw!r}: must be an integer ({param.help})", field=field)
        value, shown = raw, str
    else:
        if not isinstance(raw, (int, float)) or isinstance(raw, bool):
            raise ConfigError(source, f"invalid value {raw!r}: must be a number ({param.help})", field=field)
        value, shown = float(raw), str
    if not param.minimum <= value <= param.maximum:
        raise ConfigError(source, f"invalid value {raw!r}: must be between {shown(param.minimum)} and "
                                  f"{shown(param.maximum)} ({param.help})", field=field)
    return value


def _parse_name(table: dict, index: int, source: str) -> str:
    # Checked first: every later message labels the rule by its name.
    field = f"{_label(index, None)}.name"
    if "name" not in table:
        raise ConfigError(source, "missing required field", field=field)
    name = table["name"]
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            source,
            f"invalid name {name!r}: must match ^[a-z][a-z0-9_]{{0,63}}$ "
            "(lowercase letter, then up to 63 lowercase letters, digits or underscores)",
            field=field,
        )
    return name


def _check_unique_names(rules: tuple[Rule, ...], source: str) -> None:
    first_index: dict[str, int] = {}
    for index, rule in enumerate(rules):
        if rule.name in first_index:
            raise ConfigError(
                source,
                f"duplicate rule name {rule.name!r} (already used by rule[{first_index[rule.name]}])",
                field=f"{_label(index, rule.name)}.name",
            )
        first_index[rule.name] = index


def _check_one_enabled_per_signal(rules: tuple[Rule, ...], source: str) -> None:
    # The kernel holds a single threshold per signal, so two enabled rules on one
    # signal cannot both be honoured; refuse rather than silently pick one.
    owner: dict[str, int] = {}
    for index, rule in enumerate(rules):
        if not rule.enabled:
            continue
        if rule.signal in owner:
            first = owner[rule.signal]
            raise ConfigError(
                source,
                f"rules {rules[first].name!r} (rule[{first}]) and {rule.name!r} (rule[{index}]) are both "
                f"enabled for signal {rule.signal!r}; at most one enabled rule per signal is allowed "
                "because the kernel holds one threshold per signal (set enabled = false on one of them)",
                field=f"{_label(index, rule.name)}.signal",
            )
        owner[rule.signal] = index


def _label(index: int, name: str | None) -> str:
    """`rule[0] (fork_storm)` when the name is known, else `rule[0]`."""
    return f"rule[{index}] ({name})" if name else f"rule[{index}]"


def _reason(exc: BaseException) -> str:
    """The OS reason ("No such file or directory") without repeating the path."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
