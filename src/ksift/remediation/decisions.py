"""Remediation decisions: the record of every proposal, refusal and action, in SQLite.

A decision is made once per alert that a policy covers, and moves through:

    dry-run                      what would have been done (the plan), nothing done
    refused                      a guard said no (which guard, and why)
    pending -> approved -> done  ask mode: a person approved through `ksift actions approve` or the API
            -> rejected          ... or rejected it
            -> expired           ... or nobody answered in time
    done                         enforce mode (or approved): the action was carried out
    failed                       the guards passed but the action could not be carried out (why)

An approved or enforce decision can still end refused: the guards run again at
the moment of acting. Once done, `outcome` says whether the alert's own signal
fell back under its threshold and how long after the action.

The table lives in the alert store's database (migration 2 in
ksift.store.sqlite). The agent writes; `ksift actions` approves or rejects
with one conditional UPDATE, so a decision is never both approved and expired.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ksift.errors import KsiftError, StoreError
from ksift.remediation import STATUSES  # defined there for the command line's parser
from ksift.store.sqlite import check_not_newer, connect
from ksift.timeparse import rfc3339

FINAL = frozenset({"dry-run", "refused", "rejected", "expired", "done", "failed"})
SCHEMA_VERSION = 2


class DecisionError(KsiftError):
    """An approval or rejection that cannot happen. `unknown` means no such id (bad input)."""

    def __init__(self, message: str, unknown: bool = False):
        self.unknown = unknown
        super().__init__(message)


def new_id() -> str:
    # Short enough to type in `ksift actions approve ID`, random enough never to collide.
    return uuid.uuid4().hex[:12]


@dataclass
class Decision:
    id: str
    rule: str
    incident_id: str
    alert_id: str
    action: str
    mode: str
    status: str
    created_unix: float
    updated_unix: float
    subject: dict[str, Any]
    policy: dict[str, Any]
    plan: dict[str, Any] | None = None
    guard: str | None = None       # refused: which guard
    reason: str | None = None      # refused / failed / expired: why
    expires_unix: float | None = None  # pending: when it expires
    decided_by: str | None = None  # approved / rejected: who
    result: dict[str, Any] | None = None   # done: what was done
    outcome: dict[str, Any] | None = None  # done: did it help
    history: list[dict[str, Any]] = field(default_factory=list)

    def set(self, status: str, now: float, note: str | None = None, by: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown decision status {status!r}")
        self.status = status
        self.updated_unix = now
        entry: dict[str, Any] = {"status": status, "at": rfc3339(now)}
        if note:
            entry["note"] = note
        if by:
            entry["by"] = by
        self.history.append(entry)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def summary(self) -> str:
        """One line for people: the CLI, logs and the alert's `remediation` field."""
        who = f"pid {self.subject.get('pid')} ({self.subject.get('comm') or '?'})"
        plan = self.plan or {}
        what = f"{self.action} {who}"
        count = _processes(plan.get("processes"))
        tree = plan.get("tree")
        if plan.get("scope") == "tree" and tree:
            what = f"{self.action} the fork bomb of session {tree.get('session')} in {tree.get('cgroup')} ({count})"
        elif plan.get("scope") == "tree":
            what = f"{self.action} {who} and its tree ({count})"
        elif plan.get("scope") == "cgroup" and plan.get("cgroup") and self.action == "kill_tree":
            what = f"{self.action} cgroup {plan['cgroup'].get('path')} ({count})"
        elif plan.get("scope") == "cgroup" and plan.get("cgroup"):
            what = f"{self.action} cgroup {plan['cgroup'].get('path')} of {who}"
        if self.status == "dry-run":
            return f"dry-run: would {what}: " + "; ".join(plan.get("steps") or [])
        if self.status == "refused":
            return f"refused by {self.guard}: {self.reason}"
        if self.status == "pending":
            return f"pending approval until {rfc3339(self.expires_unix or 0)}: {what}"
        if self.status == "approved":
            return f"approved by {self.decided_by}: {what}"
        if self.status == "rejected":
            return f"rejected by {self.decided_by}: {what}"
        if self.status == "expired":
            return f"expired: {what} ({self.reason})"
        if self.status == "failed":
            return f"failed: {what}: {self.reason}"
        text = f"done: {what}"
        result = self.result or {}
        if isinstance(result.get("killed"), int) and isinstance(result.get("took_s"), (int, float)):
            text += f"; killed {_processes(result['killed'])} in {result['took_s']:g}s"
            if result.get("left"):
                text += f", {_processes(result['left'])} still left"
        if self.outcome:
            text += f"; {self.outcome.get('text')}"
        return text

    def brief(self) -> dict[str, Any]:
        """What the alert carries about its decision."""
        return {"decision_id": self.id, "action": self.action, "mode": self.mode, "status": self.status,
                "guard": self.guard, "reason": self.reason, "summary": self.summary(),
                "outcome": self.outcome}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


def _processes(n: object) -> str:
    """"1 process", "3 processes" (and "? processes" when the plan does not say)."""
    if not isinstance(n, int):
        return "? processes"
    return f"{n:,} process" + ("" if n == 1 else "es")


class DecisionStore:
    """Decisions in the alert store's SQLite file; safe to share between threads.

    The agent opens it after AlertStore created and migrated the database;
    `ksift actions` opens an existing one (create=False) and never creates it.
    """

    def __init__(self, path: str | os.PathLike[str], clock=time.time):
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.Lock()
        if not self.path.is_file():
            raise StoreError(f"no alert store at {self.path} (start the agent once to create it)")
        self._conn = connect(str(self.path), self.path)
        try:
            exists = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'decisions'").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open alert store {self.path}: {exc}") from exc
        if not exists:
            self._conn.close()
            raise StoreError(f"alert store {self.path} has no decisions table (schema version < {SCHEMA_VERSION}); "
                             "start the agent once to migrate it")
        try:
            # A newer ksift's store may mean something else by these rows: refuse it, as run and alerts do.
            check_not_newer(self._conn, self.path)
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(f"cannot open alert store {self.path}: {exc}") from exc
        except StoreError:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass

    @contextmanager
    def _guard(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                self._rollback()
                raise StoreError(f"cannot {what} decisions in {self.path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    @staticmethod
    def _row(d: Decision) -> tuple:
        body = json.dumps(d.as_dict(), separators=(",", ":"), ensure_ascii=False, default=str)
        return (d.id, d.created_unix, d.updated_unix, d.rule, d.incident_id, d.action, d.mode, d.status,
                d.subject.get("pid") if isinstance(d.subject.get("pid"), int) else None, d.expires_unix, body)

    def save(self, decision: Decision) -> None:
        with self._guard("write") as conn:
            conn.execute("INSERT OR REPLACE INTO decisions (id, created_unix, updated_unix, rule, incident_id, action, "
                         "mode, status, pid, expires_unix, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         self._row(decision))

    def annotate_alerts(self, decision: Decision) -> None:
        """Put the decision on its incident's stored alerts (the `remediation` field)."""
        brief = json.dumps(decision.brief(), separators=(",", ":"), ensure_ascii=False, default=str)
        with self._guard("annotate alerts with") as conn:
            conn.execute("UPDATE alerts SET body = json_set(body, '$.remediation', json(?)) WHERE incident_id = ?",
                         (brief, decision.incident_id))

    def get(self, decision_id: str) -> Decision | None:
        with self._guard("read") as conn:
            row = conn.execute("SELECT body FROM decisions WHERE id = ?", (decision_id,)).fetchone()
        return None if row is None else self._decode(row[0])

    def list(self, status: str | None = None, limit: int = 100) -> list[Decision]:
        """The newest `limit` decisions (optionally of one status), oldest first."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        where, params = ("WHERE status = ?", [status]) if status else ("", [])
        sql = (f"SELECT body FROM (SELECT body, created_unix, rowid AS seq FROM decisions {where} "
               "ORDER BY created_unix DESC, seq DESC LIMIT ?) ORDER BY created_unix ASC, seq ASC")
        with self._guard("read") as conn:
            rows = conn.execute(sql, [*params, limit]).fetchall()
        return [self._decode(body) for (body,) in rows]

    def statuses(self, ids: list[str]) -> dict[str, Decision]:
        """The stored record of each of these decisions (for the agent to pick up answers)."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._guard("read") as conn:
            rows = conn.execute(f"SELECT id, body FROM decisions WHERE id IN ({marks})", ids).fetchall()
        return {i: self._decode(body) for i, body in rows}

    def answer(self, decision_id: str, approve: bool, by: str) -> Decision:
        """Approve or reject a pending decision. DecisionError if it is unknown, not
        pending, or expired (then it is marked expired)."""
        now = self.clock()
        with self._guard("update") as conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT body FROM decisions WHERE id = ?", (decision_id,)).fetchone()
            if row is None:
                conn.execute("ROLLBACK")
                raise DecisionError(f"no decision with id {decision_id!r} (see `ksift actions list`)", unknown=True)
            decision = self._decode(row[0])
            if decision.status != "pending":
                conn.execute("ROLLBACK")
                raise DecisionError(f"decision {decision_id} is {decision.status}, not pending: {decision.summary()}")
            if decision.expires_unix is not None and now >= decision.expires_unix:
                decision.reason = "nobody answered before it expired"
                decision.set("expired", now, note=decision.reason)
                self._update(conn, decision)
                conn.execute("COMMIT")
                raise DecisionError(f"decision {decision_id} expired at {rfc3339(decision.expires_unix)}; "
                                    "it can no longer be approved or rejected")
            decision.decided_by = by
            decision.set("approved" if approve else "rejected", now, by=by)
            self._update(conn, decision)
            conn.execute("COMMIT")
        return decision

    def expire(self, decision: Decision, reason: str) -> bool:
        """Mark a decision expired if it is still pending in the store; False if someone answered first."""
        now = self.clock()
        with self._guard("expire") as conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT body FROM decisions WHERE id = ?", (decision.id,)).fetchone()
            if row is None or self._decode(row[0]).status != "pending":
                conn.execute("ROLLBACK")
                return False
            decision.reason = reason
            decision.set("expired", now, note=reason)
            self._update(conn, decision)
            conn.execute("COMMIT")
        return True

    def expire_all_pending(self, reason: str) -> int:
        """Expire every pending decision (an agent that proposed them is gone)."""
        expired = 0
        for decision in self.list(status="pending", limit=100_000):
            if self.expire(decision, reason):
                expired += 1
        return expired

    @staticmethod
    def _update(conn: sqlite3.Connection, d: Decision) -> None:
        row = DecisionStore._row(d)
        conn.execute("UPDATE decisions SET updated_unix = ?, status = ?, expires_unix = ?, body = ? WHERE id = ?",
                     (row[2], row[7], row[9], row[10], d.id))

    def _decode(self, body: str) -> Decision:
        try:
            return Decision.from_dict(json.loads(body))
        except (ValueError, TypeError) as exc:
            raise StoreError(f"alert store {self.path} holds a corrupt decision: {exc}") from None
