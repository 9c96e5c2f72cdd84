"""The command line's contract for bad input: exit 2, one clear line, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alert_factory import make_alert


def ksift(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksift", *args], capture_output=True, text=True, timeout=60)


def assert_clean_error(done: subprocess.CompletedProcess, status: int, *needles: str) -> None:
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def test_rules_check_accepts_the_default_rules(tmp_path):
    from ksift.rules.parse import default_rules_text

    path = tmp_path / "rules.toml"
    path.write_text(default_rules_text())
    done = ksift("rules", "check", str(path))
    assert done.returncode == 0, done.stderr
    assert "13 rule(s), 12 enabled" in done.stdout
    assert "enabled  fork_storm" in done.stdout and "disabled fd_burst" in done.stdout


@pytest.mark.parametrize("body, needles", [
    ('[[rule]]\nname="x"\nseverity="warning"\nsignal="process.fork"\nkey="tgid"\nthreshold="many"\nwindow="1s"\n',
     ["rule[0] (x).threshold", "many"]),
    ('[[rule]]\nname="x"\nseverity="loud"\nsignal="process.fork"\nkey="tgid"\nthreshold=5\nwindow="1s"\n',
     ["rule[0] (x).severity", "loud"]),
    ('[[rule]]\nname="x"\nseverity="info"\nsignal="process.fork"\nkey="tgid"\nthreshold=5\nwindow="1s"\n'
     'colour="red"\n', ["unknown field 'colour'"]),
    ('[[rule]\nname=', ["invalid TOML"]),
    # Checks of the whole rule (the CPU sensor's and remediation's limits) are the parser's too.
    ('[[rule]]\nname="hot"\nseverity="info"\nsignal="cpu.usage"\nkey="tgid"\nthreshold=90\nwindow="100ms"\n',
     ["rule[0] (hot).window", "4.9 samples"]),
    ('[[rule]]\nname="hot"\nseverity="info"\nsignal="cpu.usage"\nkey="tgid"\nthreshold=1000000000\nwindow="1h"\n'
     'params={sample_hz=1000}\n', ["rule[0] (hot).threshold", "more than the kernel counts"]),
    ('[[rule]]\nname="hot"\nseverity="info"\nsignal="cpu.usage"\nkey="tgid"\nthreshold=90\nwindow="1s"\n'
     '[rule.policy]\naction="kill_tree"\nfast_path=true\n', ["rule[0] (hot).policy.fast_path", "process.fork"]),
])
def test_bad_rules_exit_2_naming_file_and_field(tmp_path, body, needles):
    path = tmp_path / "bad-rules.toml"
    path.write_text(body)
    assert_clean_error(ksift("rules", "check", str(path)), 2, "bad-rules.toml", *needles)
    # `run` refuses the same file before touching the kernel.
    assert_clean_error(ksift("run", "--rules", str(path), "--for", "1", "--db", str(tmp_path / "a.db")), 2,
                       "bad-rules.toml", *needles)
    assert not (tmp_path / "a.db").exists()  # refused before anything was built


def test_bad_config_exits_2_naming_file_and_field(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\ntik = "100ms"\n')
    assert_clean_error(ksift("run", "--config", str(path), "--for", "1"), 2, "agent.toml", "agent.tik", "unknown")
    path.write_text('[transport]\nringbuf_bytes = 1000\n')
    assert_clean_error(ksift("run", "--config", str(path), "--for", "1"), 2, "agent.toml",
                       "transport.ringbuf_bytes", "1000")


def test_missing_rules_file_is_named(tmp_path):
    assert_clean_error(ksift("rules", "check", str(tmp_path / "nope.toml")), 2, "nope.toml")


def test_alerts_without_a_store_says_so(tmp_path):
    db = tmp_path / "none.db"
    assert_clean_error(ksift("alerts", "--db", str(db)), 1, "no alert store")
    assert not db.exists()


def test_alerts_bad_since_is_a_usage_error(tmp_path):
    from ksift.store.sqlite import AlertStore

    AlertStore(tmp_path / "a.db").close()
    assert_clean_error(ksift("alerts", "--db", str(tmp_path / "a.db"), "--since", "yesterday-ish"), 2,
                       "--since", "yesterday-ish")


def test_alerts_lists_stored_alerts_as_json(tmp_path):
    import json

    from ksift.store.sqlite import AlertStore

    alert = make_alert(summary="PID 1 (x) forked 60 times in the last 1s", count=60)
    with AlertStore(tmp_path / "a.db") as store:
        store.add(alert)
    done = ksift("alerts", "--db", str(tmp_path / "a.db"), "--json")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == ["a1"]
    text = ksift("alerts", "--db", str(tmp_path / "a.db"))
    assert "forked 60 times" in text.stdout
