"""Bad numbers, empty strings, odd files (issue 16, sections 3 and 4): exit 2 with one line naming the
option or file and the value, refused before anything is built (no store, no BPF); `ksift config check`."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ksift.rules.parse import default_rules_text, parse_rules
from ksift.store.sqlite import AlertStore

ONE_RULE = ('[[rule]]\nname = "fork_storm"\nseverity = "warning"\nsignal = "process.fork"\nkey = "tgid"\n'
            'threshold = 50\nwindow = "1s"\n')


def ksift(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksift", *args], capture_output=True, text=True, timeout=60)


def assert_clean_error(done: subprocess.CompletedProcess, status: int, *needles: str) -> None:
    assert done.returncode == status, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ksift: error: "), done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def run_refused(tmp_path: Path, *args: str, needles: tuple[str, ...], status: int = 2, db: bool = True) -> None:
    """`ksift run ARGS` is refused before it builds anything: no store appears (db=False: no --db added)."""
    db_path = tmp_path / "never.db"
    extra = ("--db", str(db_path)) if db and "--db" not in args else ()
    assert_clean_error(ksift("run", "--api", "off", *extra, *args), status, *needles)
    assert not db_path.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "0", "-3"])
def test_for_must_be_a_positive_finite_number(tmp_path, value):
    run_refused(tmp_path, f"--for={value}", needles=("--for", "finite"))


@pytest.mark.parametrize("option", ["--db", "--config", "--rules", "--stats"])
def test_an_empty_path_option_is_refused_not_taken_as_the_default(tmp_path, option):
    run_refused(tmp_path, option, "", "--for", "1", needles=(option, "must not be empty"))


def test_a_store_that_is_not_a_regular_file_is_refused(tmp_path):
    run_refused(tmp_path, "--db", "/dev/null", "--for", "1", needles=("--db", "'/dev/null'", "a device"))
    run_refused(tmp_path, "--db", str(tmp_path), "--for", "1", needles=("--db", "a directory"))
    assert not Path("/dev/null-journal").exists() and not Path("/dev/null-wal").exists()
    config = tmp_path / "agent.toml"
    config.write_text('[store]\ndb = "/dev/null"\n')
    run_refused(tmp_path, "--config", str(config), "--for", "1", needles=("agent.toml: store.db", "a device"),
                db=False)


def test_a_stats_path_that_cannot_be_written_is_refused_at_start(tmp_path):
    run_refused(tmp_path, "--stats", str(tmp_path / "no" / "such" / "stats.json"), "--for", "1",
                needles=("--stats", "no/such/stats.json", "No such file or directory"))
    run_refused(tmp_path, "--stats", str(tmp_path), "--for", "1", needles=("--stats", "is a directory"))
    assert list(tmp_path.iterdir()) == []  # the probe left nothing behind


def test_alerts_empty_db_empty_since_and_a_huge_limit(tmp_path):
    AlertStore(tmp_path / "a.db").close()
    db = ("--db", str(tmp_path / "a.db"))
    assert_clean_error(ksift("alerts", "--db", ""), 2, "--db", "must not be empty")
    assert_clean_error(ksift("alerts", *db, "--since", ""), 2, "--since", "''")
    assert_clean_error(ksift("alerts", *db, "--limit", "99999999999999999999"), 2, "--limit",
                       "99999999999999999999")
    assert ksift("alerts", *db, "--limit", str(2**63 - 1)).returncode == 0


def test_actions_empty_db_a_huge_limit_and_a_newer_schema(tmp_path):
    path = tmp_path / "a.db"
    AlertStore(path).close()
    assert_clean_error(ksift("actions", "list", "--db", ""), 2, "--db", "must not be empty")
    assert_clean_error(ksift("actions", "list", "--db", str(path), "--limit", "99999999999999999999"), 2,
                       "--limit", "99999999999999999999")
    assert ksift("actions", "list", "--db", str(path)).returncode == 0
    with sqlite3.connect(path) as conn:  # as a newer ksift would leave it
        conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (99, 'later')")
    for args in (("list",), ("approve", "d-1"), ("reject", "d-1")):
        assert_clean_error(ksift("actions", *args, "--db", str(path)), 1, "schema version 99", "newer")
    assert_clean_error(ksift("alerts", "--db", str(path)), 1, "schema version 99", "newer")


def test_rules_with_a_byte_order_mark_are_accepted_and_an_empty_file_is_refused(tmp_path):
    rules = tmp_path / "bom.toml"
    rules.write_bytes(b"\xef\xbb\xbf" + ONE_RULE.encode())
    done = ksift("rules", "check", str(rules))
    assert done.returncode == 0 and "1 rule(s), 1 enabled" in done.stdout, done.stderr
    empty = tmp_path / "empty.toml"
    empty.write_text("# to do\n")
    assert_clean_error(ksift("rules", "check", str(empty)), 2, "empty.toml", "no rules in this file")
    run_refused(tmp_path, "--rules", str(empty), "--for", "1", needles=("empty.toml", "no rules"))


@pytest.mark.parametrize("kind", ["rules", "config"])
def test_a_file_nested_100000_deep_is_exit_2_not_a_recursion_error(tmp_path, kind):
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert_clean_error(ksift(kind, "check", str(path)), 2, "deep.toml", "nested too deeply")
    run_refused(tmp_path, f"--{kind}", str(path), "--for", "1", needles=("deep.toml", "nested too deeply"))


# --- ksift config check: the same parser and checks as run


def test_config_check_accepts_a_config_and_the_rules_file_it_names(tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(default_rules_text())
    config = tmp_path / "agent.toml"
    config.write_bytes(b"\xef\xbb\xbf" + f'[agent]\ntick = "500ms"\n[rules]\nfile = "{rules}"\n'
                       f'[store]\ndb = "{tmp_path / "a.db"}"\n[api]\nlisten = "127.0.0.1:9999"\n'.encode())
    done = ksift("config", "check", str(config))
    assert done.returncode == 0, done.stderr
    defaults = parse_rules(default_rules_text(), "defaults")
    counts = f"{len(defaults.rules)} rule(s), {len(defaults.enabled())} enabled"
    assert done.stdout.splitlines() == [f"{config}: ok", f"  rules: {rules}: {counts}",
                                        f"  store: {tmp_path / 'a.db'}", "  sections: api"]
    assert not (tmp_path / "a.db").exists()  # checking builds nothing


@pytest.mark.parametrize("body, needles", [
    ('[agent]\ntik = "100ms"\n', ("agent.tik", "unknown")),
    ('[transport]\nringbuf_bytes = 1000\n', ("transport.ringbuf_bytes", "1000")),
    ('[sinks.webhook]\nurl = "ftp://x"\n', ("sinks.webhook.url", "'ftp'")),
    ('[store]\ndb = "/dev/null"\n', ("store.db", "a device")),
    ('[rules]\nfile = "{tmp}/missing.toml"\n', ("missing.toml", "cannot read rules file")),
    ('[rules]\nfile = "{tmp}/empty.toml"\n', ("empty.toml", "no rules in this file")),
    ('[agent\n', ("invalid TOML",)),
])
def test_config_check_refuses_what_run_refuses_with_the_same_line(tmp_path, body, needles):
    (tmp_path / "empty.toml").write_text("")
    config = tmp_path / "agent.toml"
    config.write_text(body.replace("{tmp}", str(tmp_path)))
    checked = ksift("config", "check", str(config))
    assert_clean_error(checked, 2, *needles)
    ran = ksift("run", "--config", str(config), "--api", "off", "--db", str(tmp_path / "never.db"), "--for", "1")
    if "store.db" not in needles:  # --db given to run overrides the file's store.db
        assert_clean_error(ran, 2, *needles)
        assert ran.stderr == checked.stderr


def test_config_check_of_a_missing_or_empty_path(tmp_path):
    assert_clean_error(ksift("config", "check", str(tmp_path / "nope.toml")), 2, "nope.toml", "cannot read")
    assert_clean_error(ksift("config", "check", ""), 2, "FILE", "must not be empty")
