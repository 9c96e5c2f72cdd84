"""Policies in the rules file and the [remediation] section: defaults, and clear errors."""

from __future__ import annotations

import pytest

from ksift.config import parse_config
from ksift.errors import ConfigError
from ksift.remediation.engine import build_remediation
from ksift.remediation.policy import Policy, effective_mode, fast_path_enabled, parse_policy
from ksift.remediation.settings import DEFAULT_PROTECTED_CGROUPS, DEFAULT_PROTECTED_EXE, parse_remediation
from ksift.rules.parse import parse_rules

RULE = """
[[rule]]
name = "fork_storm"
severity = "critical"
signal = "process.fork"
key = "tgid"
threshold = 50
window = "1s"
"""


def test_no_policy_means_monitor_only():
    rules = parse_rules(RULE, "rules.toml")
    assert rules.rules[0].policy is None
    assert build_remediation(parse_config("", "agent.toml"), rules, store=None) is None


def test_the_packaged_rules_act_on_nothing():
    from ksift.rules.parse import load_rules

    assert all(rule.policy is None for rule in load_rules().rules)


def test_a_policy_in_the_rules_file():
    rules = parse_rules(RULE + '[rule.policy]\naction = "kill_tree"\nmode = "enforce"\nmax_processes = 500\n'
                               'fast_path = true\nonly_cgroups = ["/batch.slice/"]\ncooldown = "2m"\n', "rules.toml")
    policy = rules.rules[0].policy
    assert policy == Policy(action="kill_tree", mode="enforce", max_processes=500, fast_path=True,
                            only_cgroups=("/batch.slice",), cooldown_s=120.0)
    assert policy.scope == "tree" and policy.covers("/batch.slice/job-1") and not policy.covers("/batch.slicex")
    assert "SIGSTOP every process of the tree" in policy.describe()


def test_a_policy_without_mode_only_shows_what_it_would_do():
    assert parse_policy({"action": "terminate"}, "r", "p").mode == "dry-run"


@pytest.mark.parametrize("table,field,message", [
    ({}, "p.action", "missing required field"),
    ({"action": "nuke"}, "p.action", "invalid action 'nuke'"),
    ({"action": "terminate", "mode": "yolo"}, "p.mode", "invalid mode 'yolo' (expected one of: off, dry-run, ask"),
    ({"action": "terminate", "signal": 9}, "p.signal", "unknown field 'signal'"),
    ({"action": "stop", "grace": "1s"}, "p.grace", "grace applies only to action 'terminate'"),
    ({"action": "renice", "nice": -5}, "p.nice", "between 0 and 19"),
    ({"action": "kill_tree", "max_processes": 0}, "p.max_processes", "between 1 and"),
    ({"action": "kill_tree", "max_processes": True}, "p.max_processes", "must be an integer"),
    ({"action": "throttle", "cpu_percent": 0}, "p.cpu_percent", "must be a number between 1 and"),
    ({"action": "terminate", "grace": "1h"}, "p.grace", "between 0s and 5m"),
    ({"action": "kill_tree", "fast_path": "yes"}, "p.fast_path", "must be true or false"),
    ({"action": "terminate", "only_cgroups": ["/"]}, "p.only_cgroups[0]", "below the root"),
    ({"action": "terminate", "only_cgroups": "/x"}, "p.only_cgroups", "non-empty list"),
    ({"action": "kill_tree", "scope": "session"}, "p.scope", "invalid scope 'session' (expected one of: tree, cgroup"),
    ({"action": "kill_tree", "scope": 1}, "p.scope", "invalid scope 1"),
    ({"action": "freeze", "scope": "cgroup"}, "p.scope", "scope applies only to action 'kill_tree'"),
])
def test_bad_policies_name_the_field_and_value(table, field, message):
    with pytest.raises(ConfigError) as info:
        parse_policy(table, "rules.toml", "p")
    assert info.value.field == field and message in info.value.message


def test_a_bad_policy_in_a_rules_file_names_the_rule():
    with pytest.raises(ConfigError, match=r"rules.toml: rule\[0\] \(fork_storm\).policy.mode: invalid mode"):
        parse_rules(RULE + '[rule.policy]\naction = "terminate"\nmode = "always"\n', "rules.toml")


def test_fast_path_needs_a_fork_rule():
    with pytest.raises(ConfigError, match=r"rules.toml: rule\[0\] \(fork_storm\).policy.fast_path: fast_path works "
                                          r"only for process.fork and process.bomb rules \(it acts at fork time\), "
                                          r"not for 'cpu.usage'"):
        parse_rules(RULE.replace("process.fork", "cpu.usage") +
                    '[rule.policy]\naction = "kill_tree"\nfast_path = true\n', "rules.toml")


BOMB_RULE = """
[[rule]]
name = "fork_bomb"
severity = "critical"
signal = "process.bomb"
key = "tree"
threshold = 100
window = "1s"
params = { min_live = 100 }
"""


def test_a_fork_bomb_policy_may_ask_for_the_fast_path_and_the_cgroup_scope():
    rules = parse_rules(BOMB_RULE + '[rule.policy]\naction = "kill_tree"\nmode = "enforce"\nfast_path = true\n'
                                    'scope = "cgroup"\nonly_cgroups = ["/batch.slice"]\n', "rules.toml")
    policy = rules.rules[0].policy
    assert policy.fast_path and policy.kill_scope == "cgroup" and policy.scope == "cgroup"
    assert policy.as_dict()["scope"] == "cgroup" and "kill every process of the cgroup" in policy.describe()
    tree = parse_rules(BOMB_RULE + '[rule.policy]\naction = "kill_tree"\nfast_path = true\n', "rules.toml")
    assert tree.rules[0].policy.scope == "tree" and tree.rules[0].policy.as_dict()["scope"] == "tree"


@pytest.mark.parametrize("policy,field,message", [
    ('action = "terminate"', "policy.action", "action 'terminate' acts on one process; a fork bomb is stopped as a "
                                              "whole: use kill_tree"),
    ('action = "renice"', "policy.action", "acts on one process"),
    ('action = "kill_tree"\nscope = "bomb"', "policy.scope", "invalid scope 'bomb'"),
])
def test_bad_fork_bomb_policies_name_the_file_rule_and_field(policy, field, message):
    with pytest.raises(ConfigError) as info:
        parse_rules(BOMB_RULE + f"[rule.policy]\n{policy}\n", "rules.toml")
    assert str(info.value).startswith(f"rules.toml: rule[0] (fork_bomb).{field}: ") and message in str(info.value)


def test_settings_defaults_and_protected_lists_only_grow():
    settings = parse_remediation({}, "agent.toml")
    assert settings.enabled and not settings.dry_run and not settings.allow_other_users
    assert {"/usr/sbin/sshd", "/usr/lib/systemd/systemd", "/usr/bin/kubelet", "/usr/bin/containerd"} <= \
        settings.protected_exe
    custom = parse_remediation({"protected_exe": ["/opt/db/bin/postgres"],
                                "protected_cgroups": ["/system.slice/db.service/"]}, "agent.toml")
    assert custom.protected_exe == frozenset(DEFAULT_PROTECTED_EXE) | {"/opt/db/bin/postgres"}
    assert custom.protected_cgroups == frozenset(DEFAULT_PROTECTED_CGROUPS) | {"/system.slice/db.service"}


@pytest.mark.parametrize("table,field", [
    ({"enabled": "no"}, "remediation.enabled"),
    ({"protected_exe": ["sshd"]}, "remediation.protected_exe[0]"),
    ({"max_actions_per_minute": 0}, "remediation.max_actions_per_minute"),
    ({"ask_timeout": "0s"}, "remediation.ask_timeout"),
    ({"nice": -21}, "remediation.nice"),
    ({"kill_everything": True}, "remediation.kill_everything"),
])
def test_bad_settings(table, field):
    with pytest.raises(ConfigError) as info:
        parse_remediation(table, "agent.toml")
    assert info.value.field == field


def test_settings_through_the_agent_config():
    config = parse_config('[remediation]\ndry_run = true\nask_timeout = "1m"\nnice = false\n', "agent.toml")
    settings = config.section("remediation")
    assert settings.dry_run and settings.ask_timeout_s == 60 and settings.nice is None


def test_effective_mode_kill_switch_and_global_dry_run():
    enforce = Policy(action="kill_tree", mode="enforce", fast_path=True)
    assert effective_mode(enforce, parse_remediation({}, "a")) == "enforce"
    assert effective_mode(enforce, parse_remediation({"dry_run": True}, "a")) == "dry-run"
    assert effective_mode(enforce, parse_remediation({"enabled": False}, "a")) == "off"
    assert effective_mode(Policy(action="stop", mode="off"), parse_remediation({}, "a")) == "off"
    assert fast_path_enabled(enforce, parse_remediation({}, "a"))
    # The fast path acts: never attached in dry-run.
    assert not fast_path_enabled(enforce, parse_remediation({"dry_run": True}, "a"))
    assert not fast_path_enabled(Policy(action="kill_tree", mode="dry-run", fast_path=True), parse_remediation({}, "a"))
