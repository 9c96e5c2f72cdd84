"""Local alert history in a single SQLite file.

The agent appends alerts while the CLI reads them from another process, so
the database runs in WAL mode (readers never block the writer). The whole
alert dict is kept as JSON in `body`; the other columns (ksift.alert_model's
STORE_COLUMNS) exist only to filter and sort without parsing it.

Every sqlite3 error is turned into StoreError naming the database path.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

from ksift.alert_model import STORE_COLUMNS, store_row
from ksift.errors import StoreError, StoreWriteError
from ksift.outfile import store_path_problem
from ksift.timeparse import rfc3339

# Append-only: never edit a released migration, add a new version instead.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE alerts (
            id TEXT PRIMARY KEY,
            incident_id TEXT NOT NULL,
            ts TEXT NOT NULL,
            ts_unix REAL NOT NULL,
            rule TEXT NOT NULL,
            severity TEXT NOT NULL,
            status TEXT NOT NULL,
            pid INTEGER,
            summary TEXT NOT NULL,
            body TEXT NOT NULL
        );
        CREATE INDEX alerts_ts_unix ON alerts (ts_unix);
        CREATE INDEX alerts_rule_ts_unix ON alerts (rule, ts_unix);
        CREATE INDEX alerts_incident_id ON alerts (incident_id);
        """,
    ),
    (
        2,
        # Remediation decisions (ksift.remediation.decisions): the whole record as JSON
        # in body; the columns filter, sort, and let `ksift actions` approve with one UPDATE.
        """
        CREATE TABLE decisions (
            id TEXT PRIMARY KEY,
            created_unix REAL NOT NULL,
            updated_unix REAL NOT NULL,
            rule TEXT NOT NULL,
            incident_id TEXT NOT NULL,
            action TEXT NOT NULL,
            mode TEXT NOT NULL,
            status TEXT NOT NULL,
            pid INTEGER,
            expires_unix REAL,
            body TEXT NOT NULL
        );
        CREATE INDEX decisions_status ON decisions (status, expires_unix);
        CREATE INDEX decisions_created ON decisions (created_unix);
        CREATE INDEX decisions_incident_id ON decisions (incident_id);
        """,
    ),
)

_LATEST_VERSION = MIGRATIONS[-1][0]
log = logging.getLogger(__name__)
# The columns come from the alert model; a unit test checks they are migration 1's alerts table.
_INSERT_ALERT = (f"INSERT OR REPLACE INTO alerts ({', '.join(STORE_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(STORE_COLUMNS))})")
_BUSY_TIMEOUT_MS = 5000
# How long a read waits for alerts already handed to the writer thread (see set_write_barrier).
_READ_WAIT_S = 2.0


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into single statements.

    executescript() would commit our open transaction first, so migrations run
    statement by statement; complete_statement() keeps a ';' inside a string
    or trigger body from splitting a statement in two.
    """
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                yield pending
            pending = ""
    if pending.strip(" \t\r\n;"):
        yield pending  # incomplete: let sqlite report the syntax error


def _tighten(path: Path) -> None:
    """A store made before (or by hand) that others may read is brought to 0640 at most, with its -wal
    and -shm: alerts carry command lines, which often hold secrets. Tightened rather than only warned
    about: a warning leaves the leak open until someone reads it, and the agent made the store 0640 in
    the first place. Owner and group keep what they had (a 0600 store stays 0600)."""
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:  # through an fd opened without following a link: the mode changed is the file's checked
            fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # absent (-wal, -shm), or a link: sqlite will say what it thinks of it
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o137:
                continue
            old, mode = stat.S_IMODE(st.st_mode), stat.S_IMODE(st.st_mode) & 0o640
            try:
                os.fchmod(fd, mode)
            except OSError as exc:
                log.warning("alert store %s is mode %o (others may read it) and cannot be made %o: %s", part,
                            old, mode, exc.strerror or exc)
            else:
                log.warning("alert store %s was mode %o: made %o (alerts carry command lines)", part, old, mode)
        finally:
            os.close(fd)


def check_not_newer(conn: sqlite3.Connection, path: Path) -> None:
    """StoreError if the database's schema is newer than this ksift knows (for other users of the file:
    `ksift actions`); sqlite3.Error if it cannot be read."""
    version = AlertStore._read_version(conn)
    if version > _LATEST_VERSION:
        raise AlertStore._too_new_error(path, version)


def connect(target: str, path: Path, *, uri: bool = False) -> sqlite3.Connection:
    """A connection to the alert store at `path` (`target`: its file name, or a file: URI
    with uri=True), set up as every user of the store shares one; StoreError naming the path."""
    try:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so the
        # sqlite3 module never opens a transaction behind our back.
        conn = sqlite3.connect(
            target,
            uri=uri,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open alert store {path}: {exc}") from exc
    return conn


class AlertStore:
    """Alerts persisted in SQLite, safe to share between threads of one process.

    Use `AlertStore(path)` in the agent (creates and migrates the database) and
    `AlertStore.open_readonly(path)` in the CLI (never creates or writes).
    """

    # The write-behind writer's flush(timeout) (ksift.sinks.store), or None: see set_write_barrier.
    _write_barrier: Callable[[float], bool] | None = None

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        # One connection shared by sink and query threads; sqlite3 objects are
        # not safe for concurrent use, so every access holds this lock.
        self._lock = threading.Lock()
        self._readonly = False
        self._conn = self._open_writable()

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> AlertStore:
        """Open an existing store for reading; StoreError if it does not exist."""
        store = cls.__new__(cls)
        store.path = Path(path)
        store._lock = threading.Lock()
        store._readonly = True
        store._conn = store._open_readonly()
        return store

    # -- opening -----------------------------------------------------------

    def _open_writable(self) -> sqlite3.Connection:
        problem = store_path_problem(self.path)
        if problem is not None:
            raise StoreError(problem)
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            # Alerts carry command lines, so keep the file away from other users;
            # sqlite gives the -wal and -shm files the same permissions. O_EXCL|O_NOFOLLOW:
            # never create through a link another user planted.
            if not self.path.exists():
                try:
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640))
                except FileExistsError:
                    # Another agent starting at once made it first: fine, unless what is there now is
                    # not a regular file (a link planted meanwhile, which sqlite would follow).
                    if not stat.S_ISREG(os.lstat(self.path).st_mode):
                        raise
            else:
                _tighten(self.path)
        except OSError as exc:
            raise StoreError(f"cannot create alert store {self.path}: {exc.strerror or exc}") from exc
        conn = connect(str(self.path), self.path)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"alert store {self.path}: cannot enable WAL journal mode (got {mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate(conn)
            self._check_writable(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot open alert store {self.path}: {exc}") from exc
        except StoreError:
            conn.close()
            raise
        return conn

    def _check_writable(self, conn: sqlite3.Connection) -> None:
        """Fail now, not alert by alert, on a store that opens but cannot be written (an immutable file,
        a read-only mount): sqlite then opens it read-only and only a write says so. The probe writes
        nothing (a DELETE that matches no row) but needs the write lock, so it fails the same way."""
        conn.execute("BEGIN")
        try:
            conn.execute("DELETE FROM alerts WHERE 0")
        except sqlite3.Error as exc:
            raise StoreWriteError(f"alert store {self.path} cannot be written: {exc} "
                                  "(immutable file, read-only file system or no permission?)") from exc
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _open_readonly(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise StoreError(f"no alert store at {self.path}")
        # mode=ro in a URI is the only way to stop sqlite creating the file.
        uri = self.path.resolve().as_uri() + "?mode=ro"
        conn = connect(uri, self.path, uri=True)
        try:
            version = self._read_version(conn)
            if version > _LATEST_VERSION:
                raise self._too_new(version)
            if version < _LATEST_VERSION:
                raise StoreError(
                    f"alert store {self.path} has schema version {version}, "
                    f"this ksift needs {_LATEST_VERSION}; start the agent once to migrate it"
                )
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot read alert store {self.path}: {exc}") from exc
        except StoreError:
            conn.close()
            raise
        return conn

    @staticmethod
    def _read_version(conn: sqlite3.Connection) -> int:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        ).fetchone()
        if not exists:
            return 0
        row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def _too_new(self, version: int) -> StoreError:
        return self._too_new_error(self.path, version)

    @staticmethod
    def _too_new_error(path: Path, version: int) -> StoreError:
        return StoreError(
            f"alert store {path} has schema version {version}, newer than this "
            f"ksift knows ({_LATEST_VERSION}); upgrade ksift or use another path"
        )

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_at TEXT)"
        )
        current = self._read_version(conn)
        if current > _LATEST_VERSION:
            raise self._too_new(current)
        for version, script in MIGRATIONS:
            if version <= current:
                continue
            # IMMEDIATE takes the write lock up front; re-checking inside it
            # makes two agents starting at once apply each migration once.
            conn.execute("BEGIN IMMEDIATE")
            try:
                done = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
                ).fetchone()
                if not done:
                    for statement in _statements(script):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                        (version, rfc3339(time.time())),
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # -- public API --------------------------------------------------------

    def schema_version(self) -> int:
        """The highest migration applied to this database (0 if none)."""
        with self._guard("read schema version of"):
            return self._read_version(self._conn)

    def set_write_barrier(self, flush: Callable[[float], bool] | None) -> None:
        """Alerts reach this store through a writer thread (the store sink): list() and get() first wait,
        up to _READ_WAIT_S, until what it was handed before the read is written, so a reader in this
        process (the API) sees every alert emitted before its query. None removes it."""
        self._write_barrier = flush

    def wait_for_writes(self, timeout: float = _READ_WAIT_S) -> bool:
        """Wait until the alerts handed to the writer so far are in the database; False on timeout.

        Never call it from the writer thread itself (it would wait for itself until timeout)."""
        barrier = self._write_barrier
        return True if barrier is None else barrier(timeout)

    def add(self, alert: dict[str, Any]) -> None:
        """Store an alert, replacing any earlier one with the same id.

        StoreError for an alert that cannot be stored (a missing field); its subclass StoreWriteError
        when the database refused the write (read-only, immutable, disk full, locked too long)."""
        row = self._row(alert)
        with self._lock:
            try:
                self._conn.execute(_INSERT_ALERT, row)
            except sqlite3.Error as exc:
                raise StoreWriteError(f"cannot write to alert store {self.path}: {exc}") from exc

    def list(
        self,
        since: datetime | None = None,
        rule: str | None = None,
        severity: str | None = None,
        status: str | None = None,
        limit: int = 1000,
        *,
        severities: Collection[str] | None = None,
    ) -> list[dict[str, Any]]:
        """The newest `limit` matching alerts, returned oldest first.

        A naive `since` is taken as UTC. Ties on timestamp keep insertion order.
        `severities` keeps alerts of any of those severities (an "at least" filter
        passes the severities from the floor up).
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            if since.tzinfo is None:
                since = since.replace(tzinfo=timezone.utc)
            where.append("ts_unix >= ?")
            params.append(since.timestamp())
        for column, value in (("rule", rule), ("severity", severity), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if severities is not None:
            wanted = sorted(set(severities))
            where.append(f"severity IN ({', '.join('?' * len(wanted))})" if wanted else "0")
            params.extend(wanted)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        # Pick the newest rows, then flip them back into chronological order.
        sql = (
            f"SELECT body FROM (SELECT body, ts_unix, rowid AS seq FROM alerts {clause} "
            "ORDER BY ts_unix DESC, seq DESC LIMIT ?) ORDER BY ts_unix ASC, seq ASC"
        )
        params.append(limit)
        self.wait_for_writes()
        with self._guard("read"):
            rows = self._conn.execute(sql, params).fetchall()
        return [self._decode(body) for (body,) in rows]

    def get(self, alert_id: str) -> dict[str, Any] | None:
        """The alert with this id, or None."""
        self.wait_for_writes()
        with self._guard("read"):
            row = self._conn.execute("SELECT body FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        return None if row is None else self._decode(row[0])

    def close(self) -> None:
        """Close the database; safe to call more than once."""
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot close alert store {self.path}: {exc}") from exc

    def __enter__(self) -> AlertStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self._readonly else "rw"
        return f"AlertStore({str(self.path)!r}, {mode})"

    # -- helpers -----------------------------------------------------------

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Hold the lock and turn sqlite3 errors into StoreError naming the path."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise StoreError(f"cannot {action} alert store {self.path}: {exc}") from exc

    def _row(self, alert: dict[str, Any]) -> tuple[Any, ...]:
        """The alerts table's values (ksift.alert_model.store_row); StoreError if the alert lacks them."""
        try:
            return store_row(alert)
        except KeyError as exc:
            raise StoreError(f"cannot store alert in {self.path}: missing field {exc}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise StoreError(f"cannot store alert in {self.path}: {exc}") from None

    def _decode(self, body: str) -> dict[str, Any]:
        try:
            return json.loads(body)
        except ValueError as exc:
            raise StoreError(f"alert store {self.path} holds a corrupt alert: {exc}") from None
