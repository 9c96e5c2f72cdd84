"""Rules files: the packaged default, and every way a rules file can be wrong."""

from __future__ import annotations

import dataclasses

import pytest
from agent_helpers import FORK_STORM_RULE

from ksift.errors import ConfigError
from ksift.rules.model import SIGNALS, Rule, Severity, severity_rank
from ksift.rules.parse import DEFAULT_RULES_SOURCE, default_rules_text, load_rules, parse_rules

SOURCE = "my_rules.toml"


def rule_toml(name="fork_storm", **overrides) -> str:
    """One [[rule]] table; an override of None drops that field."""
    fields = {
        "name": repr(name) if name is not None else None,
        "severity": '"warning"',
        "signal": '"process.fork"',
        "key": '"tgid"',
        "threshold": "50",
        "window": '"1s"',
    }
    fields.update(overrides)
    lines = [f"{field} = {value}" for field, value in fields.items() if value is not None]
    return "[[rule]]\n" + "\n".join(lines) + "\n"


def parse_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_rules(text, SOURCE)
    return info.value


# --- the packaged default


DEFAULT_RULE_NAMES = ("fork_storm", "fork_bomb", "exec_churn", "crash_loop", "fd_burst", "connect_storm",
                      "slow_request", "cpu_hog", "oom_kill", "memory_growth", "cpu_pressure", "memory_pressure",
                      "io_pressure")


def test_default_rules_are_every_detection():
    rules = load_rules()
    assert rules.source == DEFAULT_RULES_SOURCE
    assert sorted(r.name for r in rules.rules) == sorted(DEFAULT_RULE_NAMES)
    # one rule for every signal a sensor feeds, so every detection ships with a default
    assert {r.signal for r in rules.rules} == set(SIGNALS)
    # fd_burst is the one that taxes every syscall of the host: opt-in
    assert {r.name for r in rules.rules if not r.enabled} == {"fd_burst"}


def test_default_fork_bomb_rule_judges_the_tree():
    rule = load_rules().by_name("fork_bomb")
    assert (rule.signal, rule.key, rule.threshold, rule.window_s, rule.severity) == \
        ("process.bomb", "tree", 100, 1.0, Severity.CRITICAL)
    assert rule.param("min_live") == 100 and rule.enabled


def test_default_fork_storm_rule():
    rule = load_rules().by_name("fork_storm")
    assert rule == Rule(
        name="fork_storm",
        severity=Severity.WARNING,
        signal="process.fork",
        key="tgid",
        threshold=50,
        window_s=1.0,
        sustain_s=1.0,
        cooldown_s=30.0,
        enabled=True,
        description="One parent created more than 50 processes a second for over a second (a fork storm)",
    )
    assert rule.severity == "warning"


def test_default_rules_text_is_commented_toml():
    text = default_rules_text()
    assert text.lstrip().startswith("#")
    assert parse_rules(text, "x") == dataclasses.replace(load_rules(), source="x")


def test_load_rules_from_file(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(rule_toml(sustain='"2s"', cooldown="5", description='"d"'))
    rules = load_rules(str(path))
    assert rules.source == str(path)
    rule = rules.by_name("fork_storm")
    assert rule is not None
    assert (rule.sustain_s, rule.cooldown_s, rule.description) == (2.0, 5.0, "d")


def test_load_rules_accepts_pathlike(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(FORK_STORM_RULE)
    assert load_rules(path).source == str(path)


def test_load_rules_missing_file_names_path_and_reason(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_rules(str(path))
    assert str(path) in str(info.value)
    assert "No such file or directory" in str(info.value)


def test_load_rules_directory_names_reason(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_rules(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert "directory" in str(info.value).lower()


def test_load_rules_invalid_utf8(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="UTF-8") as info:
        load_rules(str(path))
    assert str(path) in str(info.value)


def test_empty_rules_file_is_refused(tmp_path):
    # Deliberately changed (issue 16): an empty file used to be an empty RuleSet, an agent watching nothing.
    path = tmp_path / "empty.toml"
    for text in ("# nothing here\n", "", "rule = []\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="no rules in this file") as info:
            load_rules(str(path))
        assert str(path) in str(info.value)


def test_every_rule_disabled_is_still_allowed(tmp_path):
    rules = parse_rules(rule_toml(enabled="false"), SOURCE)
    assert rules.enabled() == () and rules.for_signal("process.fork") is None


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + rule_toml().encode())
    assert load_rules(str(path)).rules == parse_rules(rule_toml(), SOURCE).rules


@pytest.mark.parametrize("nested", ["x = " + "[" * 100_000 + "]" * 100_000,
                                    "x = " + "{a=" * 100_000 + "1" + "}" * 100_000])
def test_a_file_nested_100000_deep_is_a_config_error_not_a_recursion_error(tmp_path, nested):
    path = tmp_path / "deep.toml"
    path.write_text(nested + "\n")
    with pytest.raises(ConfigError, match="nested too deeply") as info:
        load_rules(str(path))
    assert str(path) in str(info.value)


# --- defaults and RuleSet queries


def test_optional_fields_default():
    rule = parse_rules(FORK_STORM_RULE, SOURCE).rules[0]
    assert (rule.sustain_s, rule.cooldown_s, rule.enabled, rule.description) == (0.0, 0.0, True, "")


def test_ruleset_queries():
    text = rule_toml("off", enabled="false") + rule_toml("on")
    rules = parse_rules(text, SOURCE)
    assert [rule.name for rule in rules.rules] == ["off", "on"]
    assert [rule.name for rule in rules.enabled()] == ["on"]
    assert rules.for_signal("process.fork").name == "on"
    assert rules.for_signal("no.such") is None
    assert rules.by_name("off").enabled is False
    assert rules.by_name("missing") is None


def test_two_disabled_rules_on_one_signal_are_fine():
    text = rule_toml("a", enabled="false") + rule_toml("b", enabled="false")
    assert parse_rules(text, SOURCE).for_signal("process.fork") is None


def test_model_values_are_frozen():
    rule = parse_rules(FORK_STORM_RULE, SOURCE).rules[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.threshold = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        SIGNALS["x"] = SIGNALS["process.fork"]  # type: ignore[index]


def test_signal_registry():
    spec = SIGNALS["process.fork"]
    assert spec.keys == ("tgid",)
    assert spec.unit == "forks"


def test_severity_rank_orders():
    assert severity_rank("info") < severity_rank("warning") < severity_rank("critical")
    assert severity_rank(Severity.CRITICAL) == severity_rank("critical")
    with pytest.raises(ValueError):
        severity_rank("loud")


# --- validation errors: each names the file and the field


@pytest.mark.parametrize(
    ("text", "field", "detail"),
    [
        ('x = 1\n' + FORK_STORM_RULE, None, "unknown field 'x' (expected: rule)"),
        ('[rule]\nname = "a"\n', "rule", "[[rule]]"),
        (
            rule_toml(colour='"red"'),
            "rule[0] (fork_storm)",
            "unknown field 'colour' (allowed: cooldown, description",
        ),
        (rule_toml(name=None), "rule[0].name", "missing required field"),
        (rule_toml(name="Fork"), "rule[0].name", "'Fork'"),
        (rule_toml(name="a" * 65), "rule[0].name", "invalid name"),
        (rule_toml(threshold=None), "rule[0] (fork_storm).threshold", "missing required field"),
        (
            rule_toml(severity='"loud"'),
            "rule[0] (fork_storm).severity",
            "'loud' (expected one of: info, warning, critical)",
        ),
        (
            rule_toml(signal='"process.exec"'),
            "rule[0] (fork_storm).signal",
            "'process.exec' (known signals: cpu.usage, file.open",
        ),
        (rule_toml(key='"pid"'), "rule[0] (fork_storm).key", "'pid'"),
        (rule_toml(threshold='"abc"'), "rule[0] (fork_storm).threshold", "invalid threshold 'abc'"),
        (rule_toml(threshold="true"), "rule[0] (fork_storm).threshold", "invalid threshold True"),
        (rule_toml(threshold=str(2**32)), "rule[0] (fork_storm).threshold", f"invalid threshold {2**32}"),
        (rule_toml(threshold="-3"), "rule[0] (fork_storm).threshold", "invalid threshold -3"),
        (rule_toml(threshold="5.0"), "rule[0] (fork_storm).threshold", "invalid threshold 5.0"),
        (rule_toml(window='"soon"'), "rule[0] (fork_storm).window", "'soon'"),
        (rule_toml(window='"0s"'), "rule[0] (fork_storm).window", "'0s': must be > 0 and <= 1h"),
        (rule_toml(window='"2h"'), "rule[0] (fork_storm).window", "'2h'"),
        (rule_toml(window="-1"), "rule[0] (fork_storm).window", "-1"),
        (rule_toml(sustain='"-1s"'), "rule[0] (fork_storm).sustain", "'-1s'"),
        (rule_toml(cooldown='"later"'), "rule[0] (fork_storm).cooldown", "'later'"),
        (rule_toml(enabled='"yes"'), "rule[0] (fork_storm).enabled", "'yes'"),
        (rule_toml(description="3"), "rule[0] (fork_storm).description", "3"),
        (
            rule_toml("a", enabled="false") + rule_toml("a", enabled="false"),
            "rule[1] (a).name",
            "duplicate rule name 'a'",
        ),
        ("[[rule]\nname = 1\n", None, "invalid TOML: "),
    ],
)
def test_validation_errors(text, field, detail):
    error = parse_error(text)
    message = str(error)
    assert message.startswith(SOURCE + ":")
    assert error.source == SOURCE
    assert error.field == field
    if field:
        assert field in message
    assert detail in message


def test_threshold_upper_bound_is_inclusive_of_2_32_minus_1():
    rule = parse_rules(rule_toml(threshold=str(2**32 - 1)), SOURCE).rules[0]
    assert rule.threshold == 2**32 - 1


def test_window_of_one_hour_is_allowed():
    assert parse_rules(rule_toml(window='"1h"'), SOURCE).rules[0].window_s == 3600.0


def test_unknown_fields_all_listed():
    error = parse_error(rule_toml(colour='"red"', size="3"))
    assert "unknown fields 'colour', 'size'" in str(error)


def test_unknown_key_lists_the_signals_keys():
    error = parse_error(rule_toml(key='"pid"'))
    assert "process.fork" in str(error)
    assert "tgid" in str(error)


def test_second_error_is_labelled_by_index():
    error = parse_error(FORK_STORM_RULE + rule_toml("second", severity='"loud"', enabled="false"))
    assert error.field == "rule[1] (second).severity"


def test_two_enabled_rules_on_one_signal_names_both():
    error = parse_error(rule_toml("first") + rule_toml("quiet", enabled="false") + rule_toml("second"))
    message = str(error)
    assert SOURCE in message
    assert error.field == "rule[2] (second).signal"
    assert "'first' (rule[0])" in message
    assert "'second' (rule[2])" in message
    assert "process.fork" in message
    assert "one threshold per signal" in message


def test_invalid_toml_carries_tomllib_message(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[[rule]]\nname = "a\n')
    with pytest.raises(ConfigError) as info:
        load_rules(str(path))
    assert str(info.value).startswith(f"{path}: invalid TOML: ")
    assert "line 2" in str(info.value)


def test_threshold_zero_means_the_first_event():
    assert parse_rules(rule_toml(threshold="0"), SOURCE).rules[0].threshold == 0


SLOW = """
[[rule]]
name = "slow"
severity = "warning"
signal = "net.slow_request"
key = "tgid"
threshold = 0
window = "10s"
"""


def test_params_default_and_override():
    rule = parse_rules(SLOW, SOURCE).rules[0]
    assert rule.param("latency") == 0.5 and rule.params["latency"] == 0.5
    rule = parse_rules(SLOW + 'params = { latency = "250ms" }\n', SOURCE).rules[0]
    assert rule.param("latency") == 0.25


@pytest.mark.parametrize("params, field, words", [
    ('params = { latncy = "1s" }', "rule[0] (slow).params.latncy", "unknown parameter 'latncy'"),
    ('params = { latency = "2h" }', "rule[0] (slow).params.latency", "must be between"),
    ('params = { latency = "soon" }', "rule[0] (slow).params.latency", "soon"),
    ('params = 3', "rule[0] (slow).params", "must be a table"),
])
def test_bad_params_name_the_field(params, field, words):
    with pytest.raises(ConfigError) as err:
        parse_rules(SLOW + params + "\n", SOURCE)
    assert field in str(err.value) and words in str(err.value)


CPU = """
[[rule]]
name = "cpu_hog"
severity = "warning"
signal = "cpu.usage"
key = "tgid"
threshold = {threshold}
window = "{window}"
enabled = {enabled}
params = {{ sample_hz = {hz} }}
"""


def cpu_toml(threshold=90, window="1s", hz=49, enabled="true", policy=""):
    return CPU.format(threshold=threshold, window=window, hz=hz, enabled=enabled) + policy


# What the sensors and remediation used to refuse only when `ksift run` built them.
@pytest.mark.parametrize("text, field, detail", [
    (cpu_toml(window="100ms"), "rule[0] (cpu_hog).window", "holds 4.9 samples of a busy core; at least 10"),
    (cpu_toml(window="100ms", enabled="false"), "rule[0] (cpu_hog).window", "at params.sample_hz 49"),
    (cpu_toml(threshold=10**9, window="1h", hz=1000), "rule[0] (cpu_hog).threshold",
     "more than the kernel counts in a window"),
    (cpu_toml(policy='[rule.policy]\naction = "kill_tree"\nfast_path = true\n'),
     "rule[0] (cpu_hog).policy.fast_path", "fast_path works only for process.fork and process.bomb rules"),
])
def test_checks_of_the_whole_rule_name_the_file_rule_and_field(text, field, detail):
    error = parse_error(text)
    assert error.source == SOURCE and error.field == field
    assert str(error).startswith(f"{SOURCE}: {field}: ") and detail in str(error)


def test_the_cpu_limits_are_inclusive():
    parse_rules(cpu_toml(window="100ms", hz=100), SOURCE)  # exactly 10 samples
    most = (2**32 - 1) * 100 // (1000 * 3600)  # percent whose samples still fit the kernel's u32
    parse_rules(cpu_toml(threshold=most, window="1h", hz=1000), SOURCE)
    with pytest.raises(ConfigError):
        parse_rules(cpu_toml(threshold=most + 1, window="1h", hz=1000), SOURCE)
