"""deploy/prometheus/ksift-rules.yaml, unchanged, in a real Prometheus (Debian's) scraping a real agent.

The agent's own /metrics names every metric the rules read (no name drift); a fork storm whose alert
its webhook sink cannot deliver makes KsiftSinkFailing and KsiftSinkDown fire for that sink and
nothing else; a stopped agent makes KsiftAgentDown pending.
"""

from __future__ import annotations

import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from harness import (
    REPO,
    ServerProcess,
    free_port,
    get_json,
    packaged_rule,
    run_forker,
    start_agent,
    wait_for,
    write_rules,
)
from prometheus_client.parser import text_string_to_metric_families

PROMETHEUS = "/usr/bin/prometheus"
RULES = REPO / "deploy" / "prometheus" / "ksift-rules.yaml"


class RulesPrometheus(ServerProcess):
    """Prometheus scraping one agent every second in the job the rules expect, the rules file as shipped."""

    def __init__(self, workdir: Path, target: str):
        super().__init__(workdir / "prometheus.log")
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {RULES}\n"
            "scrape_configs:\n  - job_name: ksift\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        self.start([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"])

    def query(self, promql: str) -> list[dict]:
        answer = get_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def alerts(self) -> list[dict]:
        """Pending and firing alerts of the loaded rules."""
        return get_json(f"{self.url}/api/v1/alerts")["data"]["alerts"]

    def alert_states(self) -> dict[tuple[str, str], str]:
        return {(a["labels"]["alertname"], a["labels"].get("sink", "")): a["state"] for a in self.alerts()}

    def loaded_rules(self) -> list[str]:
        groups = get_json(f"{self.url}/api/v1/rules")["data"]["groups"]
        return [rule["name"] for group in groups for rule in group["rules"]]


def scraped_names(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_shipped_rules_on_a_real_agent(tmp_path: Path):
    if shutil.which(PROMETHEUS) is None:
        pytest.skip(f"{PROMETHEUS} is not installed (Debian package prometheus)")
    rules = write_rules(tmp_path / "rules.toml", packaged_rule("fork_storm"))
    config = tmp_path / "agent.toml"
    # A webhook nobody listens on: every alert it gets is lost, at once (no retry).
    config.write_text(f'[[sinks.webhook]]\nurl = "http://127.0.0.1:{free_port()}/hook"\nmax_retries = 0\n')
    api_port = free_port()
    agent = start_agent(tmp_path / "agent", "--rules", str(rules), "--config", str(config),
                        api=f"127.0.0.1:{api_port}")
    prom = None
    try:
        agent.wait_ready()
        # 1. No name drift: the real agent serves every metric the rules read.
        used = set(re.findall(r"\b(ksift_[a-z_]+)\b", RULES.read_text()))
        served = scraped_names(f"http://127.0.0.1:{api_port}/metrics")
        assert used <= served, sorted(used - served)

        prom = RulesPrometheus(tmp_path, f"127.0.0.1:{api_port}")
        prom.wait_ready("/-/ready")
        assert len(prom.loaded_rules()) == 13
        wait_for("the agent scraped and ready", lambda: prom.query('ksift_agent_ready{job="ksift"} == 1'),
                 proc=prom.proc, log=prom.log)
        assert prom.query('ksift_bpf_programs_attached{sensor="process"} > 0')
        # A few evaluations of a healthy agent: nothing about it is pending or firing.
        wait_for("a few rule evaluations", lambda: len(prom.query("ksift_sink_alerts_failed_total[5s]")[0]["values"])
                 >= 3, proc=prom.proc, log=prom.log)
        quiet = {"KsiftAgentNotReady", "KsiftBpfProgramsDetached"}
        if not agent.alerts():  # nothing else on the host alerted yet: the webhook has lost nothing either
            quiet |= {"KsiftSinkFailing", "KsiftSinkDown"}
        assert not {name for name, _ in prom.alert_states()} & quiet

        # 2. A storm's alert the webhook cannot deliver: that sink fails, and is down.
        work = run_forker(rate=200, seconds=3, comm="ks-rules")
        wait_for("the agent's alert", lambda: agent.alerts_of("fork_storm", work["pid"]))
        states = wait_for("KsiftSinkFailing and KsiftSinkDown firing for the webhook",
                          lambda: (s := prom.alert_states()).get(("KsiftSinkFailing", "webhook")) == "firing"
                          and s.get(("KsiftSinkDown", "webhook")) == "firing" and s, proc=prom.proc, log=prom.log)
        # The store and the API delivered the same alert: they are not failing.
        assert {sink for (name, sink) in states if name.startswith("KsiftSink")} == {"webhook"}
        assert ("KsiftAgentNotReady", "") not in states and ("KsiftAgentDown", "") not in states

        # 3. The agent stops: its target goes down, and KsiftAgentDown waits out its 5 minutes.
        assert agent.terminate() == 0, agent.stderr()
        wait_for("KsiftAgentDown pending", lambda: prom.alert_states().get(("KsiftAgentDown", "")) == "pending",
                 proc=prom.proc, log=prom.log)
        (down,) = [a for a in prom.alerts() if a["labels"]["alertname"] == "KsiftAgentDown"]
        assert down["labels"] == {"alertname": "KsiftAgentDown", "job": "ksift", "severity": "critical",
                                  "instance": f"127.0.0.1:{api_port}"}
        assert down["annotations"]["summary"] == f"ksift on 127.0.0.1:{api_port} is down"
    finally:
        if prom is not None:
            prom.stop()
        if agent.proc.poll() is None:
            agent.terminate()
