"""Files the agent writes (issue 16, section 3), with the real agent and a real fork storm.

--stats: a link planted at its path is replaced, never followed; a path that fails at exit (its folder
removed during the run) is one line and exit 1, after a teardown that skipped nothing (the storm's alert
stored, nothing left attached). The store: immutable at start is refused at once (exit 1); immutable
during the run, each lost alert is counted (ksift_sink_events_total{event="unwritable"}) and /readyz says
the agent is not ready, until the store takes writes again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from harness import (
    assert_released,
    free_port,
    owned_bpf_ids,
    packaged_rule,
    run_forker_retried,
    start_agent,
    wait_for,
    write_rules,
)


def fork_storm_rules(tmp_path: Path) -> Path:
    return write_rules(tmp_path / "rules.toml", packaged_rule("fork_storm"))


def stored(db: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "ksift", "alerts", "--db", str(db), "--json"], capture_output=True,
                          text=True, timeout=60, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def chattr(flag: str, *paths: Path) -> None:
    done = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr {flag} does not work here (needs root on ext4): {done.stderr.strip()}")


def test_stats_replaces_a_planted_link_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim"  # what another user wants root to overwrite
    victim.write_text("precious\n")
    shared = tmp_path / "shared"  # a folder everyone may write, as /tmp
    shared.mkdir(mode=0o1777)
    link = shared / "ksift-stats.json"
    link.symlink_to(victim)
    agent = start_agent(tmp_path / "run", "--rules", str(fork_storm_rules(tmp_path)), "--stats", str(link),
                        duration=3)
    assert agent.wait(timeout=60) == 0, agent.stderr()
    assert victim.read_text() == "precious\n"
    assert not link.is_symlink() and "transport" in json.loads(link.read_text())
    assert [p.name for p in shared.iterdir()] == ["ksift-stats.json"]  # no temporary file left


def test_a_stats_failure_at_exit_is_one_line_after_a_complete_teardown(tmp_path):
    folder = tmp_path / "stats"
    folder.mkdir()
    agent = start_agent(tmp_path / "run", "--rules", str(fork_storm_rules(tmp_path)),
                        "--stats", str(folder / "stats.json"))
    agent.wait_ready()
    held = owned_bpf_ids(agent.proc.pid)
    storm = run_forker_retried(rate=200, seconds=3, comm="ks-statsfail")
    wait_for("the storm's alert on stdout", lambda: agent.alerts_of("fork_storm", storm["pid"]), timeout=30,
             proc=agent.proc, log=agent.stderr_path)
    folder.rmdir()  # checked at start: it goes away during the run
    assert agent.terminate() == 1, agent.stderr()
    err = agent.stderr()
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ksift: error: --stats: cannot write ") and "stats.json" in last, err
    # The teardown went on after the failure: the funnel was reported, the store closed with the
    # storm's alert in it, nothing left in the kernel.
    assert "funnel: " in err
    assert [a["status"] for a in stored(agent.db_path) if a["subject"]["pid"] == storm["pid"]][:1] == ["open"]
    assert_released(held)


def test_an_immutable_store_is_refused_at_start(tmp_path):
    from ksift.store.sqlite import AlertStore

    db = tmp_path / "alerts.db"
    AlertStore(db).close()
    chattr("+i", db)
    try:
        agent = start_agent(tmp_path / "run", "--rules", str(fork_storm_rules(tmp_path)), "--db", str(db),
                            duration=30)
        assert agent.wait(timeout=60) == 1
        err = agent.stderr()
        assert "Traceback" not in err and "watching the host" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"ksift: error: alert store {db} cannot be written"), err
    finally:
        chattr("-i", db)


def readyz(base: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metric(base: str, name: str, *labels: str) -> float:
    """A sample of /metrics (open from loopback) whose line starts with name and holds every label."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name) and line[len(name)] in "{ " and all(label in line for label in labels):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def unwritable_count(base: str) -> float:
    return metric(base, "ksift_sink_events_total", 'sink="store"', 'event="unwritable"')


def test_a_store_that_becomes_unwritable_is_counted_and_makes_the_agent_not_ready(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    agent = start_agent(tmp_path / "run", "--rules", str(fork_storm_rules(tmp_path)), api=f"127.0.0.1:{port}")
    agent.wait_ready()
    db = agent.db_path
    wal = db.with_name(db.name + "-wal")
    try:
        wait_for("ready", lambda: readyz(base)[0] == 200, timeout=30, proc=agent.proc, log=agent.stderr_path)
        assert unwritable_count(base) == 0
        # Open, the store writes its -wal: both must refuse.
        chattr("+i", db, wal)
        storm = run_forker_retried(rate=200, seconds=3, comm="ks-readonly")
        wait_for("the storm's alert on stdout", lambda: agent.alerts_of("fork_storm", storm["pid"]), timeout=30,
                 proc=agent.proc, log=agent.stderr_path)
        status, body = wait_for("not ready", lambda: (r := readyz(base))[0] == 503 and r, timeout=30)
        assert "sink store: alert store not writable" in body["reason"] and str(db) in body["reason"], body
        assert unwritable_count(base) >= 1
        assert metric(base, "ksift_agent_ready") == 0  # as /readyz
        err = agent.stderr()
        assert err.count("alerts are not being saved") == 1, err  # said once, not once per alert
    finally:
        chattr("-i", db, wal)
    # Writable again: the next alert is stored and the agent is ready again.
    again = run_forker_retried(rate=200, seconds=3, comm="ks-writable")
    wait_for("the second storm stored", lambda: any(a["subject"]["pid"] == again["pid"] for a in stored(db)),
             timeout=30, proc=agent.proc, log=agent.stderr_path)
    wait_for("ready again", lambda: readyz(base)[0] == 200, timeout=30)
    assert metric(base, "ksift_agent_ready") == 1
    assert agent.terminate() == 0, agent.stderr()
    assert agent.stats()["sinks"]["store"]["unwritable"] >= 1
