"""Remediation sits on top of the sensors, never inside them.

The sensors observe; remediation acts. A sensor that imported remediation (or
carried its enforcement program) would tie every host's watching to the
machinery that acts on it. These tests read the sensors' source and what
importing them loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "ksift"
SENSOR_FILES = sorted((SRC / "sensors").glob("*.py"))
BPF_DIR = SRC.parents[1] / "bpf"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports too), and any
    string that names a ksift.remediation module (importlib.import_module, registries)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against ksift.sensors
                base = "ksift.sensors" if node.level == 1 else "ksift"
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                node.value.startswith("ksift.remediation"):
            out.add(node.value)
    return out


def test_there_are_sensor_files_to_check():
    assert len(SENSOR_FILES) >= 5, SENSOR_FILES


@pytest.mark.parametrize("path", SENSOR_FILES, ids=[p.name for p in SENSOR_FILES])
def test_sensors_never_import_remediation(path):
    bad = sorted(m for m in imported_modules(path) if m == "ksift.remediation" or m.startswith("ksift.remediation."))
    assert not bad, f"{path.relative_to(SRC.parent)} imports {bad}: sensors never import remediation"


def test_importing_every_sensor_loads_no_remediation_module():
    code = ("import sys\n"
            "from ksift.sensors.registry import all_sensor_classes\n"
            "all_sensor_classes()\n"
            "print(sorted(m for m in sys.modules if m.startswith('ksift.remediation')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_fork_bomb_guard_is_not_in_the_process_sensor():
    """Its programs and maps live in remediation's own object (bpf/guard.bpf.c)."""
    process = (BPF_DIR / "process.bpf.c").read_text() + (BPF_DIR / "process.h").read_text()
    for name in ("ks_tree_guard", "ks_tree_flags", "ks_tree_budget", "ks_tree_armed", "ksift_tree_flag"):
        assert name not in process, f"{name} is still in the process sensor"
    guard = (BPF_DIR / "guard.bpf.c").read_text()
    assert '#include "guard.h"' in guard and '#include "common.bpf.h"' in guard
    assert "ks_tree_guard_parent" in guard and "ks_tree_flags" in guard
    source = (SRC / "sensors" / "process.py").read_text()
    assert "flag_tree" not in source and "fast_path" not in source


def _fork_rule(policy: str):
    from ksift.rules.parse import parse_rules

    return parse_rules('[[rule]]\nname = "fork_storm"\nseverity = "critical"\nsignal = "process.fork"\n'
                       'key = "tgid"\nthreshold = 50\nwindow = "1s"\n' + policy, "rules.toml")


@pytest.mark.parametrize("policy, settings, urgent", [
    ("", {}, False),
    ('[rule.policy]\naction = "kill_tree"\nmode = "dry-run"\n', {}, False),
    ('[rule.policy]\naction = "kill_tree"\nmode = "ask"\n', {}, True),
    ('[rule.policy]\naction = "kill_tree"\nmode = "enforce"\n', {}, True),
    ('[rule.policy]\naction = "kill_tree"\nmode = "enforce"\n', {"dry_run": True}, False),
    ('[rule.policy]\naction = "kill_tree"\nmode = "enforce"\n', {"enabled": False}, False),
])
def test_a_crossing_wakes_the_agent_at_once_only_when_a_policy_may_act(policy, settings, urgent):
    """The composition decides (remediation's acting_rules); the process sensor only obeys."""
    from records_helpers import unstarted_sensor

    from ksift.remediation.policy import acting_rules
    from ksift.remediation.settings import parse_remediation
    from ksift.sensors.process import ProcessSensor

    rules = _fork_rule(policy)
    names = acting_rules(rules, parse_remediation(settings, "agent.toml"))
    assert names == ({"fork_storm"} if urgent else set())
    sensor = unstarted_sensor(ProcessSensor, rules)
    assert sensor.rodata()["fork_crossing_wakeup"] == 0  # nobody said it is urgent
    sensor.urgent_rules = frozenset(names)  # what build_sensors(..., urgent_rules=) does
    assert sensor.rodata()["fork_crossing_wakeup"] == int(urgent)
    assert sensor.programs() == ["ks_fork", "ks_exit"]  # never the guard's programs


def test_build_sensors_hands_the_urgent_rules_to_every_sensor():
    from ksift.config import AgentConfig
    from ksift.sensors.registry import build_sensors

    rules = _fork_rule('[rule.policy]\naction = "kill_tree"\nmode = "enforce"\n')
    [sensor] = build_sensors(None, Path("/nonexistent"), AgentConfig(), rules, urgent_rules={"fork_storm"})
    assert sensor.urgent_rules == {"fork_storm"} and sensor.rodata()["fork_crossing_wakeup"] == 1
    [plain] = build_sensors(None, Path("/nonexistent"), AgentConfig(), rules)
    assert plain.rodata()["fork_crossing_wakeup"] == 0


def test_the_composition_marks_the_rules_a_policy_may_act_on_urgent():
    from ksift.compose import _urgent_rules
    from ksift.config import parse_config

    acting = _fork_rule('[rule.policy]\naction = "kill_tree"\nmode = "enforce"\n')
    assert _urgent_rules(parse_config("", "agent.toml"), acting) == {"fork_storm"}
    assert _urgent_rules(parse_config("[remediation]\ndry_run = true\n", "agent.toml"), acting) == set()
    assert _urgent_rules(parse_config("", "agent.toml"), _fork_rule("")) == set()
