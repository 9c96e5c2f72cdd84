"""Ask mode end to end: the real agent proposes, a person answers with `ksift actions`.

A steady fork storm (tests/workloads/forker.py) in a scratch cgroup; the
policy is confined to that cgroup, terminates after approval, and its
pending decisions expire after ASK_TIMEOUT_S.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import WORKLOADS, ScratchCgroup, packaged_rule, start_agent, write_rules

ASK_TIMEOUT_S = 4


def _rules(path: Path, scope: str) -> Path:
    return write_rules(path, packaged_rule("fork_storm", severity="critical", policy={
        "action": "terminate", "mode": "ask", "grace": "2s", "ask_timeout": f"{ASK_TIMEOUT_S}s",
        "only_cgroups": [scope]}))


def _ksift(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksift", *args], capture_output=True, text=True, timeout=60)


def _decisions(db: Path) -> list[dict]:
    done = _ksift("actions", "list", "--json", "--db", str(db))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _wait_decision(db: Path, pid: int, status: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    seen: list = []
    while time.monotonic() < deadline:
        seen = [d for d in _decisions(db) if d["subject"]["pid"] == pid]
        if seen and seen[-1]["status"] == status:
            return seen[-1]
        time.sleep(0.2)
    raise AssertionError(f"no {status} decision for pid {pid} after {timeout}s; saw {seen}")


def _storm(cg: ScratchCgroup, comm: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKLOADS / "forker.py"), "--rate", "150", "--seconds", "40",
                             "--comm", comm, "--cgroup", str(cg.path)], stdout=subprocess.DEVNULL)


def test_ask_mode_approve_reject_and_expiry_through_the_cli(tmp_path):
    storms: list[subprocess.Popen] = []
    with ScratchCgroup() as cg:
        config = tmp_path / "agent.toml"
        config.write_text('[api]\nenabled = false\n\n[remediation]\npoll_interval = "200ms"\n')
        agent = start_agent(tmp_path / "agent", "--config", str(config), "--rules",
                            str(_rules(tmp_path / "rules.toml", cg.rel)))
        try:
            agent.wait_ready()
            db = agent.db_path

            # Approve: the agent carries the action out, then records whether it helped.
            approved = _storm(cg, "ks-ask-yes")
            storms.append(approved)
            pending = _wait_decision(db, approved.pid, "pending")
            assert pending["mode"] == "ask" and pending["plan"]["steps"][0].startswith(f"SIGTERM {approved.pid}")
            assert pending["expires_unix"] > pending["created_unix"]
            done = _ksift("actions", "approve", pending["id"], "--db", str(db))
            assert done.returncode == 0, done.stderr
            assert f"{pending['id']}: approved" in done.stdout
            assert approved.wait(timeout=30) == -signal.SIGTERM
            final = _wait_decision(db, approved.pid, "done")
            assert final["decided_by"].startswith("cli (")
            assert [h["status"] for h in final["history"]][:3] == ["pending", "approved", "done"]
            assert final["result"]["signal"] == "SIGTERM"
            final = _wait_decision(db, approved.pid, "done")
            deadline = time.monotonic() + 30
            while final.get("outcome") is None and time.monotonic() < deadline:
                time.sleep(0.2)
                final = _wait_decision(db, approved.pid, "done")
            assert final["outcome"]["resolved"] is True, final

            # Reject: nothing is done; the storm goes on.
            rejected = _storm(cg, "ks-ask-no")
            storms.append(rejected)
            pending = _wait_decision(db, rejected.pid, "pending")
            done = _ksift("actions", "reject", pending["id"], "--db", str(db))
            assert done.returncode == 0, done.stderr
            assert _wait_decision(db, rejected.pid, "rejected")["decided_by"].startswith("cli (")
            # Answering twice is refused, with the state it is in.
            again = _ksift("actions", "approve", pending["id"], "--db", str(db))
            assert again.returncode == 1 and "is rejected, not pending" in again.stderr

            # Expiry: nobody answers; after the timeout the decision expires and cannot be approved.
            ignored = _storm(cg, "ks-ask-none")
            storms.append(ignored)
            pending = _wait_decision(db, ignored.pid, "pending")
            expired = _wait_decision(db, ignored.pid, "expired", timeout=ASK_TIMEOUT_S + 30)
            assert expired["reason"] == "nobody answered before it expired"
            late = _ksift("actions", "approve", pending["id"], "--db", str(db))
            assert late.returncode == 1 and "expired" in late.stderr

            # Neither the rejected nor the expired one was touched.
            assert rejected.poll() is None and ignored.poll() is None

            unknown = _ksift("actions", "approve", "000000000000", "--db", str(db))
            assert unknown.returncode == 2 and "no decision with id" in unknown.stderr
            listing = _ksift("actions", "list", "--db", str(db))
            assert listing.returncode == 0 and pending["id"] in listing.stdout
        finally:
            for storm in storms:
                if storm.poll() is None:
                    storm.kill()
                storm.wait(timeout=30)
            assert agent.terminate() == 0, agent.stderr()
