"""connect_storm end to end: the real net sensor, a real process connecting in a loop, the real agent."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from harness import (
    assert_released,
    owned_bpf_ids,
    packaged_rule,
    program_names,
    run_workload_script,
    start_agent,
    write_rules,
)


def rules_file(tmp_path: Path, name: str = "rules.toml", **overrides) -> Path:
    """The packaged connect_storm rule alone, enabled unless a test says otherwise."""
    overrides.setdefault("enabled", True)
    return write_rules(tmp_path / name, packaged_rule("connect_storm", **overrides))


class Listener:
    """A TCP listener on a loopback address and a free port; it never accepts (SYN_SENT is all we count)."""

    def __init__(self, host: str):
        self.host = host
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)

    def __enter__(self) -> "Listener":
        try:
            self.sock.bind((self.host, 0))
        except OSError as exc:
            self.sock.close()
            if ":" in self.host:
                pytest.skip(f"this host has no IPv6 loopback ({self.host}: {exc.strerror})")
            raise
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


def run_connector(host: str, port: int, rate: float, seconds: float, comm: str) -> dict:
    return run_workload_script("connector.py", "--host", host, "--port", port, "--rate", rate, "--seconds", seconds,
                               "--comm", comm, timeout=seconds + 60)


@pytest.mark.parametrize("listen, connect, address, family, shown", [
    ("127.0.0.1", "127.0.0.1", "127.0.0.1", "ipv4", "127.0.0.1:{port}"),
    ("::1", "::1", "::1", "ipv6", "[::1]:{port}"),
    # An IPv6 socket to an IPv4-mapped address is IPv4 on the wire: counted and shown as such.
    ("127.0.0.1", "::ffff:127.0.0.1", "127.0.0.1", "ipv4", "127.0.0.1:{port}"),
], ids=["ipv4", "ipv6", "ipv4-mapped"])
def test_connect_storm_gives_one_incident_with_the_destination(tmp_path, listen, connect, address, family, shown):
    with Listener(listen) as server:
        agent = start_agent(tmp_path / "agent", "--rules", str(rules_file(tmp_path)), duration=12)
        agent.wait_ready()
        held = owned_bpf_ids(agent.proc.pid)
        work = run_connector(connect, server.port, rate=1500, seconds=2.5, comm="ks-connector")
        assert agent.wait(timeout=60) == 0, agent.stderr()
    assert_released(held)

    alerts = agent.alerts_of("connect_storm", work["pid"])
    assert [a["status"] for a in alerts] == ["open", "resolved"], f"expected one incident, got {alerts}"
    opened, resolved = alerts
    assert opened["incident_id"] == resolved["incident_id"]
    endpoint = shown.format(port=server.port)

    assert opened["subject"]["comm"] == "ks-connector"
    assert opened["details"] == {"address": address, "port": server.port, "family": family}
    assert opened["summary"].startswith(f"PID {work['pid']} (ks-connector) attempted ")
    assert opened["summary"].endswith(f" connections to {endpoint} in the last 1s")
    assert opened["threshold"] == 500 and opened["count"] > 500 and opened["degraded"] is None

    # Every attempt counted in the kernel: the resolution's total is the workload's.
    assert abs(resolved["count"] - work["connects"]) <= 0.1 * work["connects"], (resolved["count"], work)
    assert f"connection storm to {endpoint} is over: " in resolved["summary"]
    assert resolved["details"] == opened["details"]

    stats = agent.stats()
    kernel = stats["kernel"]["net"]
    assert kernel["rb_dropped"] == 0 and stats["transport"]["malformed"] == 0
    assert kernel["connect_seen"] >= work["connects"]
    assert stats["transport"]["records_read"] * 100 <= kernel["connect_aggregated"]


def test_a_few_connections_give_no_alert(tmp_path):
    with Listener("127.0.0.1") as server:
        agent = start_agent(tmp_path / "agent", "--rules", str(rules_file(tmp_path)), duration=5)
        agent.wait_ready()
        work = run_connector("127.0.0.1", server.port, rate=10, seconds=0.5, comm="ks-quiet-conn")
        assert agent.wait(timeout=60) == 0, agent.stderr()

    assert agent.alerts_of("connect_storm", work["pid"]) == []
    kernel = agent.stats()["kernel"]["net"]
    assert kernel["rb_dropped"] == 0
    assert kernel["connect_aggregated"] >= work["connects"] >= 4  # it was watching, and it counted them


def test_the_hook_is_attached_only_while_the_rule_is_enabled(tmp_path):
    off = start_agent(tmp_path / "off", "--rules", str(rules_file(tmp_path, "off.toml", enabled=False)))
    off.wait_ready()
    progs, _ = owned_bpf_ids(off.proc.pid)
    assert "ks_connect" not in program_names(progs), "a disabled rule attached the net sensor"
    assert "sensor net attached" not in off.stderr()
    assert off.terminate() == 0, off.stderr()

    on = start_agent(tmp_path / "on", "--rules", str(rules_file(tmp_path, "on.toml")))
    on.wait_ready()
    held = owned_bpf_ids(on.proc.pid)
    assert program_names(held[0]) == {"ks_exec", "ks_connect"}  # the core object's hook, and the rule's
    assert len(held[1]) == 2, f"expected 2 links, got {held[1]}"
    assert "sensor net attached: ks_connect" in on.stderr()
    # Attached for real: it counts this test's own connection attempts.
    with Listener("127.0.0.1") as server:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5):
                pass
    assert on.terminate() == 0, on.stderr()
    assert on.stats()["kernel"]["net"]["connect_aggregated"] >= 3
    assert_released(held)
