"""`ksift actions list|approve|reject`: output and exit status (0 ok, 1 cannot answer, 2 bad input)."""

from __future__ import annotations

import json
import time

from ksift.cli.main import main
from ksift.remediation.decisions import Decision, DecisionStore
from ksift.store.sqlite import AlertStore


def _db(tmp_path, expires_in: float = 300.0):
    db = tmp_path / "alerts.db"
    AlertStore(db).close()
    now = time.time()
    store = DecisionStore(db)
    for n, status in enumerate(("pending", "pending", "done")):
        store.save(Decision(id=f"d{n}", rule="fork_storm", incident_id=f"i{n}", alert_id=f"a{n}", action="kill_tree",
                            mode="ask", status=status, created_unix=now + n, updated_unix=now + n,
                            subject={"pid": 100 + n, "comm": "bomb"}, policy={}, expires_unix=now + expires_in))
    store.close()
    return db


def test_list_and_filters(tmp_path, capsys):
    db = _db(tmp_path)
    assert main(["actions", "list", "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["d0", "d1", "d2"]
    assert "pending approval until" in lines[0] and "kill_tree pid 100 (bomb)" in lines[0]
    assert main(["actions", "list", "--db", str(db), "--status", "pending", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == ["d0", "d1"] and all("summary" in r for r in rows)


def test_approve_reject_and_their_exit_status(tmp_path, capsys):
    db = _db(tmp_path)
    assert main(["actions", "approve", "d0", "--db", str(db)]) == 0
    assert "d0: approved" in capsys.readouterr().out
    assert main(["actions", "reject", "d1", "--db", str(db)]) == 0
    assert "d1: rejected" in capsys.readouterr().out
    assert main(["actions", "approve", "d1", "--db", str(db)]) == 1
    assert "d1 is rejected, not pending" in capsys.readouterr().err
    assert main(["actions", "reject", "nope", "--db", str(db)]) == 2
    assert "no decision with id 'nope'" in capsys.readouterr().err
    store = DecisionStore(db)
    assert store.get("d0").decided_by.startswith("cli (") and store.get("d1").status == "rejected"
    store.close()


def test_an_expired_decision_cannot_be_approved(tmp_path, capsys):
    db = _db(tmp_path, expires_in=-1)
    assert main(["actions", "approve", "d0", "--db", str(db)]) == 1
    assert "expired" in capsys.readouterr().err
    store = DecisionStore(db)
    assert store.get("d0").status == "expired"
    store.close()


def test_a_missing_store_and_a_bad_limit(tmp_path, capsys):
    assert main(["actions", "list", "--db", str(tmp_path / "none.db")]) == 1
    assert "no alert store" in capsys.readouterr().err
    assert main(["actions", "list", "--db", str(_db(tmp_path)), "--limit", "0"]) == 2
