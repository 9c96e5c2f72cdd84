"""deploy/prometheus/ksift-rules.yaml: valid for promtool, its own unit tests pass, and every metric it
reads is one the agent exports and docs/api.md documents (a renamed metric would leave a rule silent)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_metrics import CountingSink, FakeProgramStats, build, scrape

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "ksift-rules.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "ksift-rules.test.yaml"
PROMTOOL = "promtool"


def promtool() -> str:
    path = shutil.which(PROMTOOL)
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus, installed by make test)")
    return path


def test_promtool_checks_the_rules():
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 13 rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass():
    done = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], capture_output=True, text=True,
                          timeout=120, cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_unit_test():
    rules = re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M)
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert len(rules) == 13 and set(rules) == tested


def metric_names_in_rules() -> set[str]:
    """Every ksift metric the file names: in expressions, and in what annotations tell people to look at."""
    return set(re.findall(r"\b(ksift_[a-z_]+)\b", RULES.read_text()))


def test_rules_read_metrics_the_agent_exports_and_the_docs_list():
    names = metric_names_in_rules()
    assert {"ksift_agent_ready", "ksift_transport_records_dropped_total", "ksift_sink_alerts_failed_total",
            "ksift_bpf_programs_attached", "ksift_alerts_degraded_total"} <= names
    # What the agent's /metrics serves (every family, bpf stats on so none is left out).
    agent, api = build(bpf_stats=True, obj=FakeProgramStats({"ks_fork": (1, 1)}))
    agent.sinks.append(CountingSink())  # a network sink: retried, gave_up... (ksift_sink_events_total)
    exported = {name for name, _ in scrape(api)}
    assert names <= exported, sorted(names - exported)
    documented = set(re.findall(r"`(ksift_[a-z_]+)`", (REPO / "docs" / "api.md").read_text()))
    assert names <= documented, sorted(names - documented)
