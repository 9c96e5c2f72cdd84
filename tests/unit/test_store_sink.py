"""The store sink writes from its own thread: emit never waits for SQLite, overflow is counted, close flushes."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import threading
import time

import pytest
from agent_helpers import fork_storm_rules, plain_enricher
from alert_factory import make_alert

from ksift.agent import Agent
from ksift.config import AgentConfig
from ksift.sinks.base import QUEUE_COUNTERS, Sink
from ksift.sinks.store import StoreSink
from ksift.store.sqlite import AlertStore


class SlowStore(AlertStore):
    """A real store whose writes wait until `opened` is set (a slow disk, a lock held elsewhere)."""

    def __init__(self, path):
        super().__init__(path)
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.writer_threads: set[str] = set()

    def add(self, alert):
        self.writer_threads.add(threading.current_thread().name)
        self.entered.set()
        assert self.opened.wait(20)
        super().add(alert)


def stored_ids(path) -> list[str]:
    store = AlertStore.open_readonly(path)
    try:
        return [a["id"] for a in store.list(limit=1000)]
    finally:
        store.close()


def test_emit_never_waits_for_a_slow_store(tmp_path):
    store = SlowStore(tmp_path / "alerts.db")
    sink = StoreSink(store)
    assert isinstance(sink, Sink)
    started = time.monotonic()
    for n in range(1, 51):
        sink.emit(make_alert(n))
    assert time.monotonic() - started < 1.0  # the writer is stuck in the first write all along
    assert store.entered.wait(5)
    assert sink.delivered == 0 and sink.counters()["queued"] == 50
    store.opened.set()
    assert sink.flush(10)
    assert (sink.delivered, sink.failed) == (50, 0)
    assert store.writer_threads == {"ksift-store"}  # never the caller's thread
    sink.close()
    assert stored_ids(tmp_path / "alerts.db") == [f"a{n}" for n in range(1, 51)]


def test_a_full_queue_drops_the_oldest_and_counts_it(tmp_path, caplog):
    store = SlowStore(tmp_path / "alerts.db")
    sink = StoreSink(store, queue_size=3)
    sink.emit(make_alert(1))
    assert store.entered.wait(5)  # a1 is being written
    with caplog.at_level(logging.WARNING, logger="ksift.sinks.store"):
        for n in range(2, 11):
            sink.emit(make_alert(n))
    counters = sink.counters()
    assert counters["dropped_queue_full"] == 6 and counters["failed"] == 6 and counters["queued"] == 4
    assert "store sink: queue full (3), dropped 1 alert(s) so far" in caplog.text
    store.opened.set()
    sink.close()
    assert sink.delivered == 4
    assert stored_ids(tmp_path / "alerts.db") == ["a1", "a8", "a9", "a10"]  # the newest stay


def test_close_writes_everything_queued_then_closes_the_store(tmp_path):
    store = SlowStore(tmp_path / "alerts.db")
    sink = StoreSink(store)
    for n in range(1, 21):
        sink.emit(make_alert(n))
    threading.Timer(0.2, store.opened.set).start()
    sink.close()  # waits for the writer: nothing emitted is lost
    assert (sink.delivered, sink.failed) == (20, 0)
    assert len(stored_ids(tmp_path / "alerts.db")) == 20
    sink.emit(make_alert(99))  # after close: counted, never raised
    assert sink.dropped_at_stop == 1 and sink.failed == 1
    sink.close()


def test_close_gives_up_on_a_stuck_store_and_counts_what_was_left(tmp_path, caplog):
    store = SlowStore(tmp_path / "alerts.db")
    sink = StoreSink(store, drain_timeout_s=0.2)
    for n in range(1, 6):
        sink.emit(make_alert(n))
    assert store.entered.wait(5)
    started = time.monotonic()
    sink.close()
    assert time.monotonic() - started < 5
    assert sink.dropped_at_stop == 4  # the four still queued; a1 is in the writer's hands
    assert "did not take 4 alert(s)" in caplog.text
    store.opened.set()  # the stuck write ends; the store was left open for it
    assert sink.flush(5)
    assert sink.delivered == 1
    store.close()


def test_stop_drains_in_the_loop_without_blocking_it(tmp_path):
    store = SlowStore(tmp_path / "alerts.db")
    sink = StoreSink(store)

    async def main():
        await sink.start()
        for n in range(1, 11):
            sink.emit(make_alert(n))
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        asyncio.get_running_loop().call_later(0.3, store.opened.set)
        await sink.stop()
        task.cancel()
        return ticks

    ticks = asyncio.run(main())
    assert ticks >= 10  # the loop kept running while stop() waited for the writer
    assert sink.delivered == 10 and sink.counters()["queued"] == 0
    sink.close()


def test_reads_see_what_was_emitted_before_them(tmp_path):
    store = SlowStore(tmp_path / "alerts.db")
    sink = StoreSink(store)
    sink.emit(make_alert(1))
    threading.Timer(0.2, store.opened.set).start()
    assert store.get("a1") is not None  # get() waited for the writer
    assert [a["id"] for a in store.list()] == ["a1"]
    store.opened.clear()
    sink.emit(make_alert(2))
    assert not store.wait_for_writes(0.05)  # bounded: a stuck writer delays a read, never hangs it
    store.opened.set()
    sink.close()


def test_counters_have_the_network_sinks_shape(tmp_path):
    with AlertStore(tmp_path / "a.db") as store:
        sink = StoreSink(store)
        sink.emit(make_alert(1))
        sink.emit({"id": "broken"})
        assert sink.flush(5)
        counters = sink.counters()
        assert set(counters) == {*QUEUE_COUNTERS, "queued", "unwritable"}
        assert (counters["delivered"], counters["rejected"], counters["failed"]) == (1, 1, 1)
        sink.close()


def chattr(flag: str, *paths) -> None:
    done = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr {flag} does not work here (root on ext4 needed): {done.stderr.strip()}")


def test_a_store_that_stops_taking_writes_is_counted_logged_once_and_unready(tmp_path, caplog):
    path = tmp_path / "a.db"
    store = AlertStore(path)
    sink = StoreSink(store)
    view = Agent(AgentConfig(), fork_storm_rules(), [], plain_enricher(), [sink]).view
    sink.emit(make_alert(1))
    assert sink.flush(5) and view.sink_problems() == []
    # Writes go to the -wal while the store is open: both must refuse them.
    chattr("+i", path, tmp_path / "a.db-wal")
    try:
        with caplog.at_level(logging.WARNING):
            for n in (2, 3, 4):
                sink.emit(make_alert(n))
            assert sink.flush(5)
        counters = sink.counters()
        assert (counters["delivered"], counters["unwritable"], counters["rejected"]) == (1, 3, 3)
        assert counters["failed"] == 3
        problems = view.sink_problems()
        assert len(problems) == 1 and problems[0].startswith("sink store: alert store not writable"), problems
        assert str(path) in problems[0]
        assert caplog.text.count("alerts are not being saved") == 1  # once, not once per alert
    finally:
        chattr("-i", path, tmp_path / "a.db-wal")
    sink.emit(make_alert(5))
    assert sink.flush(5)
    assert view.sink_problems() == [] and sink.counters()["delivered"] == 2
    assert "takes alerts again" in caplog.text
    sink.close()
