"""Stacks symbolized off the loop: the CPU sensor's worker, PendingStack, and the StackGate before the sinks."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
from agent_helpers import plain_enricher
from records_helpers import FakeBpfMap, unstarted_sensor
from test_cpu import FakeSymbolizer, crossing_payload, record, stack_key, stack_value

from ksift.alerts import Clocks, build_alert
from ksift.enrich.stacks import PendingStack, StackGate, settled
from ksift.rules.incidents import NS, IncidentEngine
from ksift.rules.parse import parse_rules
from ksift.sensors.cpu import REC_CPU_CROSSING, CpuSensor, hot_frame
from ksift.worker import BoundedWorker

# No sustain: the first crossing opens the incident, so its alert is built right after decode.
RULES = """
[[rule]]
name = "cpu_hog"
severity = "warning"
signal = "cpu.usage"
key = "tgid"
threshold = 90
window = "1s"
params = { sample_hz = 49 }
"""
TGID = 3_999_999  # no such process here: enrichment falls back to the record, the same in every run
CLOCKS = Clocks(wall=lambda: 1_700_000_000.0, mono_ns=lambda: 20 * NS)


class SlowSymbolizer(FakeSymbolizer):
    """Symbolizes only once `opened` is set (a big binary to parse), noting the threads it runs in."""

    def __init__(self, opened: bool = False):
        super().__init__()
        self.opened = threading.Event()
        if opened:
            self.opened.set()
        self.threads: set[str] = set()

    def user_frames(self, pid, addresses, start_boottime_ns=None):
        self.threads.add(threading.current_thread().name)
        assert self.opened.wait(20)
        return super().user_frames(pid, addresses, start_boottime_ns)

    def kernel_frames(self, addresses):
        self.threads.add(threading.current_thread().name)
        return super().kernel_frames(addresses)


def hot_sensor(sym) -> CpuSensor:
    ruleset = parse_rules(RULES, "test.toml")
    s = unstarted_sensor(CpuSensor, ruleset, symbolizer=sym, clock_ns=lambda: 0)
    s._stacks, s._stack_counts, s._state = FakeBpfMap(), FakeBpfMap(), FakeBpfMap()
    s._stacks.entries = {(1).to_bytes(4, "little"): stack_value(0x1000, 0x2000),
                         (2).to_bytes(4, "little"): stack_value(0xFFFF0001)}
    s._stack_counts.entries = {stack_key(TGID, 1, -1): np.array([120], "<u8").tobytes(),
                               stack_key(TGID, 1, 2): np.array([7], "<u8").tobytes()}
    return s


def batch():
    return record(REC_CPU_CROSSING, crossing_payload(15 * NS, 10 * NS, 290), tgid=TGID, ktime=16 * NS)


def open_alert(s: CpuSensor):
    """decode -> engine -> build_alert, as the agent does: (alert, incident)."""
    engine = IncidentEngine(s.rules(), new_id=lambda: "inc-1")
    [crossing] = s.decode(batch()).crossings
    [tr] = engine.observe(crossing)
    return build_alert(tr, plain_enricher(), CLOCKS, s.summarize, s.details), tr.incident


def without_id(alert: dict) -> dict:
    return {k: v for k, v in alert.items() if k != "id"}


EXPECTED_STACK = [{"samples": 120, "user": ["u1000", "u2000"], "kernel": []},
                  {"samples": 7, "user": ["u1000", "u2000"], "kernel": ["kffff0001"]}]


def test_deferred_decode_never_symbolizes_on_the_calling_thread():
    sym = SlowSymbolizer()
    s = hot_sensor(sym)
    StackGate(lambda alert: None, [s])  # a gate tells the sensor to defer
    assert s.defer_stacks
    started = time.monotonic()
    [crossing] = s.decode(batch()).crossings
    assert time.monotonic() - started < 1.0  # the symbolizer is stuck all along
    assert isinstance(crossing.stack, PendingStack) and not crossing.stack.done()
    assert hot_frame(crossing.stack) is None  # what an API view of the incident shows meanwhile
    sym.opened.set()
    assert crossing.stack.wait(10)
    assert crossing.stack.result() == EXPECTED_STACK
    assert sym.threads == {"ksift-symbols"}
    s.close()


def test_gated_alert_is_the_same_as_one_symbolized_in_place():
    in_place = hot_sensor(FakeSymbolizer())
    expected, _ = open_alert(in_place)
    assert expected["stack"] == EXPECTED_STACK and " in u1000()," in expected["summary"]

    sym = SlowSymbolizer()
    s = hot_sensor(sym)
    delivered: list[dict] = []
    gate = StackGate(delivered.append, [s])

    async def main():
        alert, incident = open_alert(s)
        gate.submit(alert, incident, s.summarize)
        gate.submit({"id": "next", "rule": "fork_storm", "stack": None})  # made later: waits its turn
        await asyncio.sleep(0.05)
        assert delivered == [] and len(gate) == 2
        sym.opened.set()  # the worker finishes; the loop is woken, no polling
        for _ in range(200):
            if len(delivered) == 2:
                break
            await asyncio.sleep(0.01)
        return incident

    incident = asyncio.run(main())
    assert [a["id"] for a in delivered][1:] == ["next"]
    assert without_id(delivered[0]) == without_id(expected)
    assert incident.stack == EXPECTED_STACK  # the incident holds the frames now (its resolved alert too)
    assert gate.stats == {"waited": 1, "late": 0}
    s.close()
    in_place.close()


def test_a_stack_late_beyond_max_wait_goes_out_without_it():
    sym = SlowSymbolizer()
    s = hot_sensor(sym)
    delivered: list[dict] = []
    gate = StackGate(delivered.append, [s], max_wait_s=0.1)

    async def main():
        alert, incident = open_alert(s)
        gate.submit(alert, incident, s.summarize)
        await asyncio.sleep(0.4)

    asyncio.run(main())
    [alert] = delivered
    assert alert["stack"] is None and " in " not in alert["summary"]
    assert gate.stats == {"waited": 1, "late": 1}
    sym.opened.set()
    s.close()


def test_without_a_loop_the_gate_waits_in_place_and_without_anything_pending_delivers_at_once():
    delivered: list[dict] = []
    gate = StackGate(delivered.append)
    gate.submit({"id": "plain", "stack": None})
    assert [a["id"] for a in delivered] == ["plain"]  # nothing pending: straight through

    sym = SlowSymbolizer()
    s = hot_sensor(sym)
    s.defer_stacks = True
    alert, incident = open_alert(s)
    threading.Timer(0.1, sym.opened.set).start()
    gate.submit(alert, incident, s.summarize)  # no running loop (a synchronous caller): waits here
    assert delivered[-1]["stack"] == EXPECTED_STACK and " in u1000()," in delivered[-1]["summary"]
    s.close()


def test_drain_lets_held_stacks_finish_before_the_sinks_stop():
    sym = SlowSymbolizer()
    s = hot_sensor(sym)
    delivered: list[dict] = []
    gate = StackGate(delivered.append, [s])

    async def main():
        alert, incident = open_alert(s)
        gate.submit(alert, incident, s.summarize)
        asyncio.get_running_loop().call_later(0.1, sym.opened.set)
        await gate.drain()

    asyncio.run(main())
    assert [a["stack"] for a in delivered] == [EXPECTED_STACK]
    s.close()


def test_without_a_gate_decode_waits_for_the_worker_and_crossings_carry_frames():
    s = hot_sensor(SlowSymbolizer(opened=True))
    [crossing] = s.decode(batch()).crossings
    assert crossing.stack == EXPECTED_STACK
    s.close()


def test_a_batch_the_worker_had_no_room_for_is_counted_and_has_no_stack():
    sym = SlowSymbolizer()
    s = hot_sensor(sym)
    s.defer_stacks = True
    s._symbols = BoundedWorker("symbols", 1, on_drop=s._symbol_job_dropped)
    first = s.decode(batch()).crossings[0].stack  # the worker is stuck on it
    for _ in range(200):
        if sym.threads:
            break
        time.sleep(0.01)
    dropped = s.decode(batch()).crossings[0].stack  # queued...
    kept = s.decode(batch()).crossings[0].stack  # ...and pushed out by this one
    assert s.symbol_jobs_dropped == 1 and dropped.done() and dropped.result() is None
    sym.opened.set()
    assert first.wait(10) and kept.wait(10) and kept.result()
    s.close()


def test_no_symbolizing_thread_to_be_had_still_lets_the_crossings_out(monkeypatch):
    s = hot_sensor(FakeSymbolizer())

    def refuse(*args):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(s._symbols, "submit", refuse)
    for defer in (False, True):
        s.defer_stacks = defer
        [crossing] = s.decode(batch()).crossings
        assert settled(crossing.stack) is None
