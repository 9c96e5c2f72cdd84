import sqlite3
import stat
import subprocess
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alert_factory import make_alert, make_subject

from ksift.alert_model import STORE_COLUMNS
from ksift.errors import StoreError
from ksift.store.sqlite import MIGRATIONS, AlertStore


@pytest.fixture
def store(tmp_path):
    with AlertStore(tmp_path / "alerts.db") as s:
        yield s


def test_creates_parent_directory_and_private_file(tmp_path):
    path = tmp_path / "state" / "ksift" / "alerts.db"
    with AlertStore(path):
        pass
    assert path.is_file()
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o007 == 0
    assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0


def test_wal_mode_and_pragmas(tmp_path):
    path = tmp_path / "alerts.db"
    with AlertStore(path) as s:
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert s._conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    # journal_mode=WAL is persistent, so a fresh plain connection sees it too.
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_migrations_recorded_and_idempotent_on_reopen(tmp_path):
    path = tmp_path / "alerts.db"
    with AlertStore(path) as s:
        assert s.schema_version() == MIGRATIONS[-1][0]
        s.add(make_alert(id="a1"))
    with AlertStore(path) as s:
        assert s.schema_version() == MIGRATIONS[-1][0]
        assert s.get("a1") is not None
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT version, applied_at FROM schema_migrations ORDER BY version").fetchall()
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        conn.close()
    assert [v for v, _ in rows] == [v for v, _ in MIGRATIONS]
    assert all(applied_at.endswith("Z") for _, applied_at in rows)
    assert {"alerts_ts_unix", "alerts_rule_ts_unix", "alerts_incident_id"} <= indexes


def test_migrations_are_applied_in_order_and_versions_unique():
    versions = [v for v, _ in MIGRATIONS]
    assert versions == sorted(set(versions))
    assert versions[0] == 1


def test_database_from_the_future_is_refused(tmp_path):
    path = tmp_path / "alerts.db"
    AlertStore(path).close()
    future = MIGRATIONS[-1][0] + 1
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO schema_migrations VALUES (?, '2030-01-01T00:00:00.000Z')", (future,))
    conn.close()
    with pytest.raises(StoreError, match="newer") as info:
        AlertStore(path)
    assert str(path) in str(info.value)
    with pytest.raises(StoreError, match="newer"):
        AlertStore.open_readonly(path)


def test_not_a_database_is_a_store_error(tmp_path):
    path = tmp_path / "alerts.db"
    path.write_bytes(b"this is not sqlite, just some text long enough to fill a header" * 10)
    with pytest.raises(StoreError) as info:
        AlertStore(path)
    assert str(path) in str(info.value)


def test_add_get_round_trip_keeps_unknown_keys(store):
    alert = make_alert(id="a1", future_field={"nested": [1, 2, 3]}, note="héllo ✓")
    store.add(alert)
    assert store.get("a1") == alert
    assert store.get("missing") is None


def test_add_replaces_by_id(store):
    store.add(make_alert(id="a1"))
    store.add(make_alert(id="a1", status="resolved", duration_s=3.2))
    assert len(store.list()) == 1
    assert store.get("a1")["status"] == "resolved"


def test_list_is_chronological_and_limit_keeps_the_newest(store):
    # Inserted out of order on purpose: ordering must follow ts, not insertion.
    for i in (3, 1, 4, 0, 2):
        store.add(make_alert(id=f"a{i}", ts=f"2026-11-25T00:1{i}:00.000Z"))
    assert [a["id"] for a in store.list()] == ["a0", "a1", "a2", "a3", "a4"]
    assert [a["id"] for a in store.list(limit=2)] == ["a3", "a4"]


def test_list_ties_keep_insertion_order(store):
    for i in range(3):
        store.add(make_alert(id=f"t{i}"))
    assert [a["id"] for a in store.list()] == ["t0", "t1", "t2"]


def test_list_ordering_uses_instants_not_strings(store):
    # Same instant family, different offsets: 00:30+01:00 is before 00:10Z.
    store.add(make_alert(id="late", ts="2026-11-25T00:10:00Z"))
    store.add(make_alert(id="early", ts="2026-11-25T00:30:00+01:00"))
    assert [a["id"] for a in store.list()] == ["early", "late"]


def test_list_filters(store):
    store.add(make_alert(id="old", ts="2026-11-24T23:00:00.000Z"))
    store.add(make_alert(id="fork", ts="2026-11-25T00:10:00.000Z"))
    store.add(make_alert(id="exec", ts="2026-11-25T00:11:00.000Z", rule="exec_burst", severity="critical"))
    store.add(make_alert(id="done", ts="2026-11-25T00:12:00.000Z", status="resolved"))

    since = datetime(2026, 11, 25, 0, 0, tzinfo=timezone.utc)
    assert [a["id"] for a in store.list(since=since)] == ["fork", "exec", "done"]
    # A naive since means UTC.
    assert [a["id"] for a in store.list(since=since.replace(tzinfo=None))] == ["fork", "exec", "done"]
    # since is inclusive.
    exact = datetime(2026, 11, 25, 0, 11, tzinfo=timezone.utc)
    assert [a["id"] for a in store.list(since=exact)] == ["exec", "done"]
    assert [a["id"] for a in store.list(rule="exec_burst")] == ["exec"]
    assert [a["id"] for a in store.list(severity="warning")] == ["old", "fork", "done"]
    assert [a["id"] for a in store.list(status="resolved")] == ["done"]
    assert [a["id"] for a in store.list(since=since, rule="fork_storm", status="open")] == ["fork"]
    assert store.list(rule="nope") == []


def test_list_rejects_nonpositive_limit(store):
    with pytest.raises(ValueError):
        store.list(limit=0)


def test_indexed_columns_are_filled(store):
    store.add(make_alert(id="a1"))
    row = store._conn.execute("SELECT ts_unix, pid, summary FROM alerts WHERE id = 'a1'").fetchone()
    expected = datetime(2026, 11, 25, 0, 10, 0, 123000, tzinfo=timezone.utc).timestamp()
    assert row[0] == pytest.approx(expected)
    assert row[1] == 1234
    assert row[2].startswith("PID 1234")


def test_the_alerts_table_has_the_alert_models_columns(store):
    columns = [row[1] for row in store._conn.execute("PRAGMA table_info(alerts)")]
    assert sorted(columns) == sorted(STORE_COLUMNS)


def test_alert_without_pid_is_stored(store):
    alert = make_alert(id="a1", subject=make_subject(pid=None))
    store.add(alert)
    assert store.get("a1") == alert


@pytest.mark.parametrize(
    "broken",
    [
        {"id": "x"},  # missing fields
        make_alert(id="x", ts="yesterday"),
        make_alert(id="x", count=object()),  # not JSON-able
    ],
)
def test_invalid_alert_is_a_store_error(store, broken):
    with pytest.raises(StoreError) as info:
        store.add(broken)
    assert str(store.path) in str(info.value)


def test_open_readonly_missing_path_errors_and_creates_nothing(tmp_path):
    path = tmp_path / "nowhere" / "alerts.db"
    with pytest.raises(StoreError, match="no alert store at") as info:
        AlertStore.open_readonly(path)
    assert str(path) in str(info.value)
    assert not path.exists()
    assert not path.parent.exists()


def test_open_readonly_reads_and_refuses_writes(tmp_path):
    path = tmp_path / "alerts.db"
    with AlertStore(path) as s:
        s.add(make_alert(id="a1"))
    with AlertStore.open_readonly(path) as ro:
        assert ro.schema_version() == MIGRATIONS[-1][0]
        assert [a["id"] for a in ro.list()] == ["a1"]
        with pytest.raises(StoreError) as info:
            ro.add(make_alert(id="a2"))
        assert str(path) in str(info.value)


def test_readonly_reader_sees_writes_from_a_live_writer(tmp_path):
    path = tmp_path / "alerts.db"
    with AlertStore(path) as writer:
        with AlertStore.open_readonly(path) as reader:
            writer.add(make_alert(id="a1"))
            assert reader.get("a1") is not None


def test_open_readonly_on_a_path_with_spaces_and_hash(tmp_path):
    path = tmp_path / "odd dir #1" / "alerts?.db"
    AlertStore(path).close()
    with AlertStore.open_readonly(path) as ro:
        assert ro.list() == []


def test_use_after_close_is_a_store_error(tmp_path):
    s = AlertStore(tmp_path / "alerts.db")
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError):
        s.list()
    with pytest.raises(StoreError):
        s.add(make_alert(id="a1"))


def test_uncreatable_parent_is_a_store_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError) as info:
        AlertStore(blocker / "alerts.db")
    assert str(blocker / "alerts.db") in str(info.value)


def test_concurrent_adds_from_threads(store):
    def worker(n):
        for i in range(50):
            store.add(make_alert(id=f"{n}-{i}"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.list()) == 200


# --- files the store refuses, tightens or cannot write (issue 16, section 3)


def test_a_device_or_folder_is_refused_without_a_journal_beside_it(tmp_path):
    from ksift.store.sqlite import store_path_problem

    for path, kind in (("/dev/null", "a device"), (str(tmp_path), "a directory")):
        assert kind in store_path_problem(path)
        with pytest.raises(StoreError, match=kind) as info:
            AlertStore(path)
        assert path in str(info.value)
    assert not Path("/dev/null-journal").exists() and not Path("/dev/null-wal").exists()
    assert store_path_problem(tmp_path / "new.db") is None


def test_a_planted_link_is_never_followed_to_create_the_store(tmp_path):
    target = tmp_path / "elsewhere"
    link = tmp_path / "alerts.db"
    link.symlink_to(target)  # dangling: creating "alerts.db" through it would make `target`
    with pytest.raises(StoreError, match="cannot create"):
        AlertStore(link)
    assert not target.exists()


def test_a_store_others_may_read_is_tightened_with_its_wal_and_shm(tmp_path, caplog):
    path = tmp_path / "alerts.db"
    parts = (path, tmp_path / "alerts.db-wal", tmp_path / "alerts.db-shm")
    with AlertStore(path) as earlier:  # still open: its -wal and -shm stay
        earlier.add(make_alert())
        for part in parts:
            part.chmod(0o666)
        with caplog.at_level("WARNING"), AlertStore(path):
            for part in parts:
                assert stat.S_IMODE(part.stat().st_mode) == 0o640, part
    assert "was mode 666: made 640" in caplog.text
    path.chmod(0o600)  # tighter than 0640 stays as it is
    with AlertStore(path):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def chattr(flag: str, *paths) -> None:
    done = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr {flag} does not work here (root on ext4 needed): {done.stderr.strip()}")


def test_an_immutable_store_is_refused_at_open_not_alert_by_alert(tmp_path):
    from ksift.errors import StoreWriteError

    path = tmp_path / "alerts.db"
    AlertStore(path).close()
    chattr("+i", path)
    try:
        with pytest.raises(StoreWriteError, match="cannot be written") as info:
            AlertStore(path)
        assert str(path) in str(info.value)
    finally:
        chattr("-i", path)


def test_a_store_another_agent_created_a_moment_before_is_opened(tmp_path, monkeypatch):
    path = tmp_path / "alerts.db"
    AlertStore(path).close()
    # It appears between the check and the O_EXCL create, as when two agents start at once.
    monkeypatch.setattr(Path, "exists", lambda self: False)
    with AlertStore(path) as store:
        assert store.schema_version() == MIGRATIONS[-1][0]
