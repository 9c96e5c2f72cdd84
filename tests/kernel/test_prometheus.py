"""A real Prometheus (Debian's /usr/bin/prometheus) scrapes the agent's /metrics and sees a fork storm's alert."""

from __future__ import annotations

import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from harness import ServerProcess, free_port, get_json, packaged_rule, run_forker, start_agent, wait_for, write_rules

PROMETHEUS = "/usr/bin/prometheus"


class Prometheus(ServerProcess):
    """Prometheus started by the test, scraping one target every second, with its own storage."""

    def __init__(self, workdir: Path, target: str):
        super().__init__(workdir / "prometheus.log")
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: ksift\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        self.start([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"])

    def query(self, promql: str) -> list[dict]:
        answer = get_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert answer["status"] == "success", answer
        return answer["data"]["result"]


def opened(prom: Prometheus) -> float | None:
    result = prom.query('ksift_alerts_opened_total{job="ksift",rule="fork_storm"}')
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_alert_counter(tmp_path: Path):
    if not Path(PROMETHEUS).exists() or shutil.which(PROMETHEUS) is None:
        pytest.skip(f"{PROMETHEUS} is not installed (Debian package prometheus)")
    rules = write_rules(tmp_path / "rules.toml", packaged_rule("fork_storm"))
    api_port = free_port()
    agent = start_agent(tmp_path / "agent", "--rules", str(rules), api=f"127.0.0.1:{api_port}")
    prom = None
    try:
        agent.wait_ready()
        prom = Prometheus(tmp_path, f"127.0.0.1:{api_port}")
        prom.wait_ready("/-/ready")
        # The target is up and the counter exists, at its value before our storm.
        wait_for("the ksift target is up", lambda: [r for r in prom.query('up{job="ksift"}')
                                                     if r["value"][1] == "1"], proc=prom.proc, log=prom.log)
        before = wait_for("the counter before the storm", lambda: opened(prom) is not None and (opened(prom),))[0]

        work = run_forker(rate=200, seconds=3, comm="ks-prom")
        ours = wait_for("the agent's alert", lambda: [a for a in agent.alerts() if a["rule"] == "fork_storm"
                                                      and a["status"] == "open"
                                                      and a["subject"]["pid"] == work["pid"]])
        assert ours[0]["summary"].startswith(f"PID {work['pid']} (ks-prom) forked ")

        # Prometheus's own query API now returns the agent's count, our alert included
        # (other storms on the host may add to it: compare with what the agent printed).
        def scraped_matches_agent():
            value = opened(prom)
            printed = sum(1 for a in agent.alerts() if a["rule"] == "fork_storm" and a["status"] == "open")
            return value is not None and value >= before + 1 and value == printed and (value, printed)

        value, printed = wait_for("prometheus sees the alert counter", scraped_matches_agent, proc=prom.proc,
                                  log=prom.log)
        assert value >= 1
        series = prom.query('ksift_alerts_opened_total{rule="fork_storm"}')[0]["metric"]
        assert series["severity"] == "warning" and series["instance"] == f"127.0.0.1:{api_port}"
    finally:
        if prom is not None:
            prom.stop()
        if agent.proc.poll() is None:
            assert agent.terminate() == 0, agent.stderr()
