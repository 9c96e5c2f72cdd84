"""The bounded worker thread that runs slow work off the event loop (ksift.worker)."""

from __future__ import annotations

import threading
import time

import pytest

from ksift.worker import BoundedWorker


class Gate:
    """A job that blocks until opened, telling when it started."""

    def __init__(self):
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, value=None):
        self.entered.set()
        assert self.opened.wait(10)
        return value


def test_jobs_run_in_order_on_the_worker_thread():
    worker = BoundedWorker("t", 100)
    seen: list[tuple[int, str]] = []
    futures = [worker.submit(lambda n: seen.append((n, threading.current_thread().name)) or n, n) for n in range(20)]
    assert worker.flush(5)
    assert [f.result() for f in futures] == list(range(20))
    assert [n for n, _ in seen] == list(range(20))
    assert {name for _, name in seen} == {"ksift-t"}
    assert worker.ran == 20 and worker.queued == 0
    assert worker.close(5)


def test_submit_never_blocks_and_a_full_queue_drops_the_oldest_waiting_job():
    dropped = []
    worker = BoundedWorker("t", 3, on_drop=lambda job: dropped.append(job.args[0]))
    gate = Gate()
    first = worker.submit(gate, "first")
    assert gate.entered.wait(5)  # the worker is busy with it
    started = time.monotonic()
    later = {n: worker.submit(lambda n: n, n) for n in range(10)}
    assert time.monotonic() - started < 1.0
    assert worker.dropped == 7 and dropped == list(range(7))
    assert all(later[n].cancelled() for n in range(7))
    gate.opened.set()
    assert worker.flush(5)
    assert first.result() == "first"
    assert [later[n].result() for n in (7, 8, 9)] == [7, 8, 9]
    worker.close(5)


def test_flush_waits_for_what_was_submitted_before_it_only():
    worker = BoundedWorker("t", 10)
    gate = Gate()
    worker.submit(gate)
    assert gate.entered.wait(5)
    assert not worker.flush(0.05)  # the job in flight is not done
    threading.Timer(0.1, gate.opened.set).start()
    assert worker.flush(5)
    worker.close(5)


def test_flush_is_not_fooled_by_a_later_job_dropped_while_one_is_in_flight():
    worker = BoundedWorker("t", 1)
    gate = Gate()
    worker.submit(gate)
    assert gate.entered.wait(5)
    worker.submit(lambda: None)  # queued...
    worker.submit(lambda: None)  # ...and dropped for this one: a job done, but not the one in flight
    assert worker.dropped == 1
    assert not worker.flush(0.05)
    gate.opened.set()
    assert worker.flush(5)
    worker.close(5)


def test_an_error_in_a_job_is_its_future_s_and_the_worker_goes_on():
    worker = BoundedWorker("t", 10)

    def boom():
        raise ValueError("bad")

    failed = worker.submit(boom)
    ok = worker.submit(lambda: 7)
    assert ok.result(5) == 7
    with pytest.raises(ValueError):
        failed.result(0)
    worker.close(5)


def test_close_runs_what_is_queued_then_refuses_more():
    worker = BoundedWorker("t", 100)
    done = []
    for n in range(50):
        worker.submit(lambda n: time.sleep(0.001) or done.append(n), n)
    assert worker.close(10)
    assert done == list(range(50))
    assert worker.submit(lambda: None) is None
    assert worker.close(1)  # idempotent


def test_close_that_times_out_leaves_the_queue_for_abandon():
    worker = BoundedWorker("t", 10)
    gate = Gate()
    worker.submit(gate)
    assert gate.entered.wait(5)
    waiting = [worker.submit(lambda: None) for _ in range(3)]
    assert not worker.close(0.05)
    jobs = worker.abandon()
    assert len(jobs) == 3 and all(f.cancelled() for f in waiting)
    gate.opened.set()
    assert worker.close(5)


def test_no_thread_until_the_first_job():
    worker = BoundedWorker("t", 1)
    assert worker._thread is None and worker.flush(0) and worker.close(0)
    with pytest.raises(ValueError):
        BoundedWorker("t", 0)
