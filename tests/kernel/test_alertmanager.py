"""A real Alertmanager (Debian's prometheus-alertmanager) receives a fork storm's alert, then its resolution."""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
from harness import (
    LoopbackHttpServer,
    QuietHandler,
    ServerProcess,
    packaged_rule,
    run_forker,
    start_agent,
    wait_for,
    write_rules,
)

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"


class Notifications(LoopbackHttpServer):
    """The receiver Alertmanager notifies (webhook_configs): records every notification."""

    def __init__(self):
        self.received: list[dict] = []
        outer = self

        class Handler(QuietHandler):
            def do_POST(self):  # noqa: N802 - the name http.server calls
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

        super().__init__(Handler)
        self.url = self.base_url + "/notify"

    def for_pid(self, pid: int) -> list[tuple[str, dict]]:
        return [(n["status"], a) for n in self.received for a in n["alerts"]
                if a["labels"].get("pid") == str(pid)]


class Alertmanager(ServerProcess):
    """Alertmanager started by the test: its own port, config and storage, no cluster listener."""

    def __init__(self, workdir: Path, notify_url: str):
        super().__init__(workdir / "alertmanager.log")
        config = workdir / "alertmanager.yml"
        config.write_text(
            "route:\n  receiver: test\n  group_by: ['alertname', 'pid']\n"
            "  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n"
            "receivers:\n  - name: test\n    webhook_configs:\n"
            f"      - url: '{notify_url}'\n        send_resolved: true\n")
        (workdir / "am-data").mkdir()
        self.start([ALERTMANAGER, f"--config.file={config}", f"--storage.path={workdir / 'am-data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=warn"])

    def alerts(self, **filters: str) -> list[dict]:
        query = urllib.parse.urlencode([("filter", f'{k}="{v}"') for k, v in filters.items()])
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?{query}", timeout=5) as response:
            return json.loads(response.read())


def parse_time(text: str) -> datetime:
    # Alertmanager writes nanoseconds; datetime takes microseconds.
    head, _, rest = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + ("." + rest[:6] if rest else "")).replace(tzinfo=timezone.utc)


def test_alertmanager_gets_the_alert_and_its_resolution(tmp_path: Path):
    if not Path(ALERTMANAGER).exists():
        pytest.skip(f"{ALERTMANAGER} is not installed (Debian package prometheus-alertmanager)")
    notifications = Notifications()
    am = Alertmanager(tmp_path, notifications.url)
    agent = None
    try:
        am.wait_ready("/-/ready")
        rules = write_rules(tmp_path / "rules.toml", packaged_rule("fork_storm"))
        config = tmp_path / "agent.toml"
        config.write_text(f'[sinks.alertmanager]\nurl = "{am.url}"\ntimeout = "2s"\nlabels = {{ test = "ksift" }}\n')
        agent = start_agent(tmp_path / "agent", "--rules", str(rules), "--config", str(config))
        agent.wait_ready()

        work = run_forker(rate=200, seconds=3, comm="ks-am")
        pid = str(work["pid"])
        (alert,) = wait_for("the alert in alertmanager", lambda: am.alerts(alertname="fork_storm", pid=pid),
                            proc=am.proc, log=am.log)
        host = os.environ.get("NODE_NAME") or socket.gethostname()
        assert alert["labels"] == {"alertname": "fork_storm", "severity": "warning", "instance": host,
                                   "pid": pid, "comm": "ks-am", "test": "ksift"}
        assert alert["annotations"]["summary"].startswith(f"PID {pid} (ks-am) forked ")
        assert "ks-am" in alert["annotations"]["description"]
        assert alert["status"]["state"] == "active"
        opened = next(a for a in agent.alerts() if a["subject"]["pid"] == work["pid"] and a["status"] == "open")
        assert alert["annotations"]["incident_id"] == opened["incident_id"]
        assert parse_time(alert["startsAt"]) == parse_time(opened["started_at"])
        # Open: no endsAt from ksift, so Alertmanager's own (now + resolve_timeout) lies ahead.
        assert parse_time(alert["endsAt"]) > datetime.now(timezone.utc)

        # The resolution: Alertmanager stops listing the alert as active ...
        wait_for("the alert resolved in alertmanager", lambda: not am.alerts(alertname="fork_storm", pid=pid),
                 proc=am.proc, log=am.log)
        resolved = next(a for a in agent.alerts() if a["subject"]["pid"] == work["pid"] and a["status"] == "resolved")
        # ... and notifies the resolution with ksift's end time, in the past.
        statuses = wait_for("the resolved notification",
                            lambda: "resolved" in [s for s, _ in notifications.for_pid(work["pid"])]
                            and notifications.for_pid(work["pid"]))
        assert statuses[0][0] == "firing"
        _, last = [s for s in statuses if s[0] == "resolved"][-1]
        assert parse_time(last["endsAt"]) == parse_time(resolved["resolved_at"])
        assert parse_time(last["endsAt"]) < datetime.now(timezone.utc)

        assert agent.terminate() == 0, agent.stderr()
        sink = agent.stats()["sinks"]["alertmanager"]
        assert sink["delivered"] >= 2 and sink["failed"] == 0 and sink["gave_up"] == 0
    finally:
        if agent is not None and agent.proc.poll() is None:
            agent.terminate()
        am.stop()
        notifications.close()
