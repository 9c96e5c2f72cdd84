"""The request sensor's pure parts: the HTTP/1.x request-line parser, record decoding and the alert."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import numpy as np
import pytest

from ksift.config import AgentConfig
from ksift.rules.incidents import NS, IncidentEngine
from ksift.rules.parse import load_rules, parse_rules
from ksift.sensors.request import (
    HEAD_LEN,
    HIST_SLOTS,
    REC_SLOW_REQUEST,
    REQ_STATS,
    SLOW_REQUEST,
    RequestLine,
    RequestSensor,
    format_endpoint,
    histogram_view,
    human_latency,
    parse_request_line,
)
from ksift.transport import records

RULE = """
[[rule]]
name = "slow_request"
severity = "warning"
signal = "net.slow_request"
key = "tgid"
threshold = {threshold}
window = "10s"
enabled = {enabled}
params = {{ latency = "{latency}" }}
"""

BORN = 123_456_789
TGID = 4242


def sensor(threshold: int = 2, latency: str = "500ms", enabled: str = "true") -> RequestSensor:
    rules = parse_rules(RULE.format(threshold=threshold, latency=latency, enabled=enabled), "test.toml")
    return RequestSensor(None, Path("/nonexistent"), AgentConfig(), 1, rules)


# -- the request line ----------------------------------------------------------------


def test_parses_a_request_line_and_drops_the_query():
    line = parse_request_line(b"GET /api/orders?token=secret HTTP/1.1\r\nHost: x\r\n\r\n")
    assert line == RequestLine("GET", "/api/orders", "HTTP/1.1", truncated=False)


@pytest.mark.parametrize("head, expected", [
    (b"POST /v1/items HTTP/1.0\r\n", ("POST", "/v1/items", "HTTP/1.0", False)),
    (b"OPTIONS * HTTP/1.1\r\n", ("OPTIONS", "*", "HTTP/1.1", False)),
    (b"CONNECT example.com:443 HTTP/1.1\r\n", ("CONNECT", "example.com:443", "HTTP/1.1", False)),
    (b"GET http://example.com/a?b HTTP/1.1\r\n", ("GET", "http://example.com/a", "HTTP/1.1", False)),
    (b"GET /x#frag HTTP/1.1\n", ("GET", "/x", "HTTP/1.1", False)),  # bare LF
    # The kernel keeps 64 bytes: a capture may end inside the version or the target.
    (b"GET /api/orders HTTP/1", ("GET", "/api/orders", None, False)),
    (b"GET /api/orders ", ("GET", "/api/orders", None, False)),
    (b"GET /very/long/path/that/the/capture/cut", ("GET", "/very/long/path/that/the/capture/cut", None, True)),
])
def test_partial_and_other_forms(head, expected):
    line = parse_request_line(head)
    assert line is not None
    assert (line.method, line.path, line.version, line.truncated) == expected


@pytest.mark.parametrize("head", [
    b"",
    b"GET",
    b"GET /",  # cut off after the target: may still be a request (checked below)
    b"GET /\r\n",  # HTTP/0.9: not reported
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 preface
    b"get /lower HTTP/1.1\r\n",
    b"GET /a HTTP/1.1 extra\r\n",
    b"GET /a SMTP/1.1\r\n",
    b"GET a-relative-target HTTP/1.1\r\n",
    b"GET /a\x00b HTTP/1.1\r\n",
    b"GET /caf\xc3\xa9 HTTP/1.1\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n",  # redis
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # postgres SSLRequest
])
def test_not_an_http1_request_line(head):
    line = parse_request_line(head)
    if head == b"GET /":
        assert line == RequestLine("GET", "/", None, truncated=True)  # cut off: it may still be one
    else:
        assert line is None


def test_never_raises_on_junk_or_odd_types():
    rng = random.Random(7)
    valid = b"GET /api/orders?id=1 HTTP/1.1\r\nHost: localhost\r\n\r\n"
    samples = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, HEAD_LEN + 1))) for _ in range(3000)]
    samples += [valid[:n] for n in range(len(valid) + 1)]
    samples += [bytes(rng.choice(b"GET /HTP1.\r\n ?#*") for _ in range(rng.randrange(0, 40))) for _ in range(3000)]
    for sample in samples:
        line = parse_request_line(sample)
        assert line is None or isinstance(line, RequestLine)
    assert parse_request_line(None) is None
    assert parse_request_line(bytearray(b"GET / HTTP/1.1\r\n")).path == "/"
    assert parse_request_line(memoryview(b"HEAD /h HTTP/1.1\r\n")).method == "HEAD"


# -- figures ---------------------------------------------------------------------------


def test_endpoints():
    v4 = socket.inet_aton("127.0.0.1") + bytes(12)
    assert format_endpoint(2, v4, 8080) == "127.0.0.1:8080"
    assert format_endpoint(10, socket.inet_pton(socket.AF_INET6, "::1"), 443) == "[::1]:443"
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.1.2.3")
    assert format_endpoint(10, mapped, 80) == "10.1.2.3:80"
    assert format_endpoint(1, v4, 1) is None  # AF_UNIX: not ours
    assert format_endpoint(10, b"\x01", 1) is None  # short: no exception


def test_histogram_buckets_are_log2_microseconds():
    hist = np.zeros(HIST_SLOTS, dtype=np.uint64)
    hist[0], hist[9], hist[19], hist[HIST_SLOTS - 1] = 5, 2, 1, 1
    assert histogram_view(hist) == [
        {"le_ms": 0.002, "count": 5},  # under 2 us
        {"le_ms": 1.024, "count": 2},  # 512 us .. 1.024 ms
        {"le_ms": 1048.576, "count": 1},  # 524 ms .. 1.05 s
        {"le_ms": None, "count": 1},  # the open-ended last slot
    ]


def test_latency_wording():
    assert human_latency(0.5) == "500 ms"
    assert human_latency(0.3) == "300 ms"
    assert human_latency(1.5) == "1.5 s"


# -- the sensor ------------------------------------------------------------------------


def test_programs_and_rodata_follow_the_rule():
    on = sensor(threshold=3, latency="250ms")
    assert on.programs() == ["ks_req_state", "ks_req_recv", "ks_req_send"]
    assert on.rodata() == {"latency_ns": 250_000_000, "req_threshold": 3, "req_window_ns": 10 * NS,
                           "max_records": 4}
    off = sensor(enabled="false")
    assert off.programs() == [] and off.rodata() == {}


def test_packaged_rule():
    rule = load_rules().by_name("slow_request")
    assert rule is not None and rule.signal == "net.slow_request" and rule.key == "tgid"
    assert rule.window_s == 10.0 and rule.param("latency") == 0.5 and rule.threshold == 2


def record(*, duration_ms: float, head: bytes, window_start_ns: int, window_slow: int, window_requests: int,
           slow_total: int, ktime_ns: int, tgid: int = TGID, born: int = BORN) -> np.ndarray:
    rec = np.zeros(1, dtype=records.RECORD)
    rec["type"] = REC_SLOW_REQUEST
    rec["ktime_ns"] = ktime_ns
    task = rec["task"]
    task["tgid"], task["pid"], task["ppid"], task["start_boottime_ns"] = tgid, tgid, 1, born
    task["comm"] = b"gunicorn"
    pay = np.zeros(1, dtype=SLOW_REQUEST)
    pay["duration_ns"] = int(duration_ms * 1e6)
    pay["window_start_ns"], pay["slow_total"] = window_start_ns, slow_total
    pay["window_slow"], pay["window_requests"], pay["threshold"] = window_slow, window_requests, 2
    pay["head_len"] = min(len(head), HEAD_LEN)
    pay["head"][0, : len(head[:HEAD_LEN])] = np.frombuffer(head[:HEAD_LEN], dtype=np.uint8)
    ends = pay["ends"]
    ends["family"], ends["lport"], ends["rport"] = socket.AF_INET, 8000, 51234
    ends["laddr"][0, :4] = list(socket.inet_aton("127.0.0.1"))
    ends["raddr"][0, :4] = list(socket.inet_aton("127.0.0.2"))
    raw = pay.tobytes() + bytes(records.PAYLOAD_SIZE - SLOW_REQUEST.itemsize)
    rec["payload"] = np.frombuffer(raw, dtype=f"V{records.PAYLOAD_SIZE}")
    return rec


class FakeStatsMap:
    """Stands in for the kernel's ks_req_stats map: lookup(tgid bytes) -> raw value."""

    def __init__(self):
        self.values: dict[int, bytes] = {}

    def put(self, tgid: int, **fields) -> None:
        st = np.zeros(1, dtype=REQ_STATS)
        for name, value in fields.items():
            if name == "window_max_head":
                st["window_max_head"][0, : len(value)] = np.frombuffer(value, dtype=np.uint8)
                st["window_max_head_len"] = len(value)
            elif name == "window_max_ends":
                for key, v in value.items():
                    st["window_max_ends"][key] = v
            else:
                st[name] = value
        self.values[tgid] = st.tobytes()

    def lookup(self, key: bytes) -> bytes | None:
        return self.values.get(int.from_bytes(key, "little"))


def test_decode_makes_a_crossing_with_the_request():
    s = sensor()
    batch = record(duration_ms=812.5, head=b"GET /api/orders HTTP/1.1\r\nHost: a\r\n", window_start_ns=5 * NS,
                   window_slow=3, window_requests=412, slow_total=9, ktime_ns=7 * NS)
    decoded = s.decode(batch)
    assert decoded.failed == 0 and len(decoded.crossings) == 1
    c = decoded.crossings[0]
    assert (c.rule, c.key, c.window_count, c.total, c.window_start_ns) == ("slow_request", TGID, 3, 9, 5 * NS)
    assert c.task.comm == "gunicorn" and c.task.start_boottime_ns == BORN
    assert c.details == {"request": {"method": "GET", "path": "/api/orders", "duration_ms": 812.5,
                                     "local": "127.0.0.1:8000", "peer": "127.0.0.2:51234"},
                         "slow_requests": 3, "requests": 412}
    # Other record types in the batch are not ours; a disabled sensor decodes nothing.
    other = record(duration_ms=1, head=b"", window_start_ns=0, window_slow=1, window_requests=1,
                   slow_total=1, ktime_ns=1)
    other["type"] = 1
    assert s.decode(other).crossings == []
    assert sensor(enabled="false").decode(batch).crossings == []


def _open(s: RequestSensor, batch: np.ndarray):
    rule = s.rule
    engine = IncidentEngine([rule])
    (c,) = s.decode(batch).crossings
    (tr,) = engine.observe(c)
    return engine, tr.incident


def test_alert_reads_n_of_m_and_the_slowest_from_the_kernel():
    s = sensor()
    stats = FakeStatsMap()
    s.stats_map = stats
    engine, inc = _open(s, record(duration_ms=812, head=b"GET /api/orders HTTP/1.1\r\n", window_start_ns=5 * NS,
                                  window_slow=3, window_requests=400, slow_total=3, ktime_ns=6 * NS))
    hist = np.zeros(HIST_SLOTS, dtype=np.uint64)
    hist[7], hist[19] = 408, 4
    # Since the crossing, one more request (slower, on another path) finished in the same window.
    stats.put(TGID, start_boottime_ns=BORN, window_start_ns=5 * NS, requests=412, slow=4, max_ns=950_000_000,
              window_requests=412, window_slow=4, window_max_ns=950_000_000,
              window_max_head=b"POST /api/checkout HTTP/1.1\r\n",
              window_max_ends={"family": 2, "lport": 8000, "rport": 40000}, hist=hist)
    d = s.details(inc, "open")
    assert (d["method"], d["path"], d["duration_ms"]) == ("POST", "/api/checkout", 950.0)
    assert d["local"] == "0.0.0.0:8000" and d["peer"] == "0.0.0.0:40000"
    assert (d["slow_requests"], d["requests"]) == (4, 412)
    assert (d["requests_total"], d["slow_total"], d["max_ms"]) == (412, 4, 950.0)
    assert sum(b["count"] for b in d["histogram"]) == 412
    assert (d["latency_ms"], d["window_s"]) == (500.0, 10.0)
    assert s.summarize(inc, "open") == \
        "POST /api/checkout took 950 ms in PID 4242 (gunicorn): 4 of 412 requests over 500 ms in the last 10s"
    assert s.current("slow_request", TGID).window_count == 4


def test_alert_keeps_the_record_when_the_window_moved_on_or_the_pid_was_reused():
    s = sensor()
    stats = FakeStatsMap()
    s.stats_map = stats
    _, inc = _open(s, record(duration_ms=812, head=b"GET /api/orders HTTP/1.1\r\n", window_start_ns=5 * NS,
                             window_slow=3, window_requests=20, slow_total=3, ktime_ns=6 * NS))
    # A later, quiet window: its figures are not the crossing's.
    stats.put(TGID, start_boottime_ns=BORN, window_start_ns=16 * NS, requests=30, slow=3, window_requests=10,
              window_slow=0, window_max_ns=0)
    d = s.details(inc, "open")
    assert (d["method"], d["path"], d["duration_ms"], d["slow_requests"], d["requests"]) == \
        ("GET", "/api/orders", 812.0, 3, 20)
    assert d["requests_total"] == 30
    # The pid now names another process: none of its figures are used.
    stats.put(TGID, start_boottime_ns=BORN + 1, window_start_ns=5 * NS, requests=99, slow=50, window_requests=99,
              window_slow=50, window_max_ns=5 * NS, window_max_head=b"GET /other HTTP/1.1\r\n")
    d = s.details(inc, "open")
    assert "requests_total" not in d and (d["path"], d["requests"]) == ("/api/orders", 20)
    assert s.current("slow_request", TGID) is None


def test_slowest_across_records_of_one_incident_and_resolution_wording():
    s = sensor()
    engine, inc = _open(s, record(duration_ms=900, head=b"GET /slow HTTP/1.1\r\n", window_start_ns=5 * NS,
                                  window_slow=3, window_requests=10, slow_total=3, ktime_ns=6 * NS))
    # A later, faster slow request in the next window: the alert keeps the slowest.
    (later,) = s.decode(record(duration_ms=600, head=b"GET /meh HTTP/1.1\r\n", window_start_ns=15 * NS,
                               window_slow=3, window_requests=5, slow_total=6, ktime_ns=16 * NS)).crossings
    engine.observe(later)
    d = s.details(inc, "open")
    assert (d["path"], d["duration_ms"]) == ("/slow", 900.0)
    (tr,) = engine.tick(40 * NS)
    assert tr.kind == "resolved"
    assert s.summarize(tr.incident, "resolved") == \
        "PID 4242 (gunicorn) answers within 500 ms again: 6 slow requests in 35s (slowest GET /slow, 900 ms)"
    # Long after, a new incident of the same process starts from its own requests.
    engine2, inc2 = _open(s, record(duration_ms=700, head=b"GET /new HTTP/1.1\r\n", window_start_ns=100 * NS,
                                    window_slow=3, window_requests=3, slow_total=9, ktime_ns=101 * NS))
    assert s.details(inc2, "open")["path"] == "/new"


def test_non_http_request_is_described_by_its_address():
    s = sensor()
    _, inc = _open(s, record(duration_ms=1500, head=b"*2\r\n$3\r\nGET\r\n", window_start_ns=5 * NS,
                             window_slow=3, window_requests=3, slow_total=3, ktime_ns=6 * NS))
    d = s.details(inc, "open")
    assert d["method"] is None and d["path"] is None
    assert s.summarize(inc, "open") == \
        "a request on 127.0.0.1:8000 took 1,500 ms in PID 4242 (gunicorn): 3 of 3 requests over 500 ms in the last 10s"


def test_a_bad_record_is_counted_not_fatal(monkeypatch):
    s = sensor()
    batch = np.concatenate([
        record(duration_ms=900, head=b"GET /a HTTP/1.1\r\n", window_start_ns=1, window_slow=3, window_requests=3,
               slow_total=3, ktime_ns=2),
        record(duration_ms=900, head=b"GET /b HTTP/1.1\r\n", window_start_ns=1, window_slow=4, window_requests=4,
               slow_total=4, ktime_ns=3),
    ])
    real = records.task_context
    calls = []

    def flaky(task):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("garbled")
        return real(task)

    monkeypatch.setattr(records, "task_context", flaky)
    decoded = s.decode(batch)
    assert decoded.failed == 1 and [c.details["request"]["path"] for c in decoded.crossings] == ["/b"]
