"""Alertmanager in high availability: two real Alertmanagers (Debian's prometheus-alertmanager) clustered on
loopback, the agent sending every alert to both (`urls`), fork storms of tests/workloads/forker.py.

One storm gives one notification at the receiver (the cluster deduplicates through its gossiped
notification log), and killing a replica loses nothing: the one that notified dies while the incident is
open, the survivor sends its resolution, and the next storm still reaches the receiver once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from harness import (
    ServerProcess,
    free_port,
    packaged_rule,
    run_forker_retried,
    start_agent,
    stop_process,
    wait_for,
    workload_command,
    write_rules,
)
from test_alertmanager import ALERTMANAGER, Notifications

# How long a replica waits for the one before it in the cluster to notify (--cluster.peer-timeout).
PEER_TIMEOUT_S = 1.0


class ClusteredAlertmanager(ServerProcess):
    """One replica: its own web port, cluster port and storage; peers with the other replica."""

    def __init__(self, workdir: Path, name: str, notify_url: str, cluster_port: int, peer_port: int):
        super().__init__(workdir / f"{name}.log")
        self.name = name
        config = workdir / f"{name}.yml"
        config.write_text(
            "route:\n  receiver: test\n  group_by: ['alertname', 'pid']\n"
            "  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n"
            "receivers:\n  - name: test\n    webhook_configs:\n"
            f"      - url: '{notify_url}'\n        send_resolved: true\n")
        data = workdir / f"{name}-data"
        data.mkdir()
        self.start([ALERTMANAGER, f"--config.file={config}", f"--storage.path={data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    f"--cluster.listen-address=127.0.0.1:{cluster_port}",
                    f"--cluster.advertise-address=127.0.0.1:{cluster_port}",
                    f"--cluster.peer=127.0.0.1:{peer_port}",
                    f"--cluster.peer-timeout={PEER_TIMEOUT_S}s",
                    # Gossip settles in a few of its intervals; short ones keep the test short.
                    "--cluster.gossip-interval=50ms", "--cluster.pushpull-interval=2s",
                    "--cluster.settle-timeout=10s", "--log.level=warn"])

    def get(self, path: str) -> dict | list:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return json.loads(response.read())

    def clustered(self) -> bool:
        cluster = self.get("/api/v2/status")["cluster"]
        return cluster["status"] == "ready" and len(cluster.get("peers") or []) == 2

    def alerts(self, **filters: str) -> list[dict]:
        query = urllib.parse.urlencode([("filter", f'{k}="{v}"') for k, v in filters.items()])
        return self.get(f"/api/v2/alerts?{query}")

    def notifications_sent(self) -> float:
        """alertmanager_notifications_total of the webhook integration: what this replica sent."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("alertmanager_notifications_total{") and 'integration="webhook"' in line)


def statuses(notifications: Notifications, pid: int) -> list[str]:
    """The status of every notification (one per group) that named pid, in arrival order."""
    return [status for status, _ in notifications.for_pid(pid)]


def settle(notifications: Notifications, pid: int) -> list[str]:
    """Wait for pid's firing and resolved notifications, then long enough for a duplicate to show up."""
    wait_for(f"firing and resolved notifications for pid {pid}",
             lambda: {"firing", "resolved"} <= set(statuses(notifications, pid)))
    time.sleep(3 * PEER_TIMEOUT_S + 2.0)  # the later replica waits peer_timeout, then checks the log
    return statuses(notifications, pid)


def test_two_replicas_one_notification_and_a_dead_replica_loses_nothing(tmp_path: Path):
    if not Path(ALERTMANAGER).exists():
        pytest.skip(f"{ALERTMANAGER} is not installed (Debian package prometheus-alertmanager)")
    notifications = Notifications()
    ports = free_port(), free_port()
    replicas = [ClusteredAlertmanager(tmp_path, f"am{i}", notifications.url, ports[i], ports[1 - i])
                for i in range(2)]
    agent = None
    storm = None
    try:
        for am in replicas:
            am.wait_ready("/-/ready")
        for am in replicas:
            wait_for(f"{am.name} in a settled cluster of two", am.clustered, timeout=30, proc=am.proc, log=am.log)
        rules = write_rules(tmp_path / "rules.toml", packaged_rule("fork_storm"))
        config = tmp_path / "agent.toml"
        config.write_text("[sinks.alertmanager]\n"
                          f'urls = ["{replicas[0].url}", "{replicas[1].url}"]\n'
                          'timeout = "2s"\nmax_retries = 2\nbackoff = "100ms"\nmax_backoff = "200ms"\n')
        agent = start_agent(tmp_path / "agent", "--rules", str(rules), "--config", str(config))
        agent.wait_ready()
        names = [f"alertmanager@127.0.0.1:{am.port}" for am in replicas]

        # 1. Both replicas up: each gets the alert, the receiver one notification (and one resolution).
        first = run_forker_retried(rate=200, seconds=4, comm="ks-amha-1")
        for am in replicas:
            wait_for(f"the alert in {am.name}", lambda am=am: am.alerts(alertname="fork_storm",
                                                                         pid=str(first["pid"])),
                     proc=am.proc, log=am.log)
        assert settle(notifications, first["pid"]) == ["firing", "resolved"]

        # 2. The replica that notified dies while the next incident is open: the survivor resolves it.
        sent_before = [am.notifications_sent() for am in replicas]
        storm = subprocess.Popen(workload_command("forker.py", "--rate", 200, "--seconds", 8, "--comm", "ks-amha-2"),
                                 stdout=subprocess.PIPE, text=True)
        wait_for("the second storm's firing notification", lambda: "firing" in statuses(notifications, storm.pid))
        notified = [i for i, am in enumerate(replicas) if am.notifications_sent() > sent_before[i]]
        assert len(notified) == 1, notified  # one replica sent it; the other saw it in the log and held back
        dead, alive = replicas[notified[0]], replicas[1 - notified[0]]
        # It logs the notification once the receiver answered, then gossips it (every 50 ms): let that happen.
        time.sleep(0.5)
        assert storm.poll() is None and agent.alerts_of("fork_storm", storm.pid)[-1]["status"] == "open"
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait(timeout=10)
        assert storm.wait(timeout=60) == 0
        assert settle(notifications, storm.pid) == ["firing", "resolved"]
        assert not alive.alerts(alertname="fork_storm", pid=str(storm.pid))  # resolved there too

        # 3. One replica left: the next storm still reaches the receiver, once.
        third = run_forker_retried(rate=200, seconds=4, comm="ks-amha-3")
        assert settle(notifications, third["pid"]) == ["firing", "resolved"]

        assert agent.terminate() == 0, agent.stderr()
        sinks = agent.stats()["sinks"]
        survivor, lost = sinks[names[replicas.index(alive)]], sinks[names[replicas.index(dead)]]
        # The survivor got every alert (open and resolved of three storms); only the dead one counts losses.
        assert survivor["delivered"] >= 6 and survivor["failed"] == 0, survivor
        assert lost["delivered"] >= 3 and lost["failed"] >= 3 and lost["gave_up"] + lost["dropped_at_stop"] >= 3, lost
    finally:
        if storm is not None:
            stop_process(storm)
        if agent is not None and agent.proc.poll() is None:
            agent.terminate()
        for am in replicas:
            am.stop()
        notifications.close()
