"""Request sensor: slow requests of TCP servers, measured in the kernel (bpf/request.bpf.c).

The kernel tracks connections a process accepted (SYN_RECV -> ESTABLISHED),
times each request from its first read to the first write of the response,
keeps a log2 histogram of every request per process and ships only slow
requests of processes over the rule's threshold. Here the records become
crossings, and the per-process stats map supplies "N of M requests over L in
the last W", the slowest request and the histogram when an alert is written.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ksift.rules.incidents import NS, Crossing, Incident, KeyState
from ksift.rules.model import Rule
from ksift.sensors.base import Decoded, Sensor, how_long, tgid_key
from ksift.transport import records
from ksift.transport.records import AF_INET, AF_INET6
from ksift.units import format_duration

SLOW_REQUEST_SIGNAL = "net.slow_request"

# Mirrors of bpf/request.h.
HEAD_LEN = 64
HIST_SLOTS = 32
ADDR_LEN = 16
REC_SLOW_REQUEST = 41
ENDPOINTS = np.dtype(
    [("family", "<u2"), ("lport", "<u2"), ("rport", "<u2"), ("pad", "<u2"),
     ("laddr", "u1", (ADDR_LEN,)), ("raddr", "u1", (ADDR_LEN,))]
)
SLOW_REQUEST = np.dtype(
    [
        ("duration_ns", "<u8"),
        ("window_start_ns", "<u8"),
        ("slow_total", "<u8"),
        ("window_slow", "<u4"),
        ("window_requests", "<u4"),
        ("threshold", "<u4"),
        ("head_len", "<u4"),
        ("ends", ENDPOINTS),
        ("head", "u1", (HEAD_LEN,)),
    ]
)
REQ_CONN = np.dtype([("start_ns", "<u8"), ("head_len", "<u4"), ("pad", "<u4"), ("head", "u1", (HEAD_LEN,))])
REQ_STATS = np.dtype(
    [
        ("start_boottime_ns", "<u8"),
        ("window_start_ns", "<u8"),
        ("requests", "<u8"),
        ("slow", "<u8"),
        ("max_ns", "<u8"),
        ("window_max_ns", "<u8"),
        ("window_requests", "<u4"),
        ("window_slow", "<u4"),
        ("window_emitted", "<u4"),
        ("window_max_head_len", "<u4"),
        ("window_max_head", "u1", (HEAD_LEN,)),
        ("window_max_ends", ENDPOINTS),
        ("hist", "<u8", (HIST_SLOTS,)),
    ]
)

# Slow request records per process per window once it is over the threshold;
# the rest are counted in the kernel's stats (and the `req_capped` counter).
MAX_RECORDS_PER_WINDOW = 4
# Processes whose slowest request we remember between records and alerts.
_SLOWEST_KEYS = 4096

# -- HTTP/1.x request line ---------------------------------------------------------

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


@dataclass(frozen=True)
class RequestLine:
    """What the first bytes of a request say, when they are an HTTP/1.x request line."""

    method: str
    path: str  # the target without its query string (queries may carry secrets)
    version: str | None  # "HTTP/1.1", or None when the capture ended before it
    truncated: bool  # the capture ended inside the target: path is its beginning only


def _visible(raw: bytes) -> bool:
    """Printable ASCII without spaces: what a request target and version consist of."""
    return all(0x21 <= b <= 0x7E for b in raw)


def parse_request_line(head: bytes) -> RequestLine | None:
    """The HTTP/1.x request line at the start of `head`, or None when it is not one.

    Never raises: binary data, a partial capture (the kernel keeps 64 bytes) and
    garbage all give None or a line marked truncated.
    """
    try:
        data = bytes(head)
    except (TypeError, ValueError):
        return None
    end = data.find(b"\n")
    complete = end >= 0
    line = data[:end].rstrip(b"\r") if complete else data
    parts = line.split(b" ")
    if len(parts) < 2 or len(parts) > 3:
        return None
    method, target = parts[0], parts[1]
    try:
        name = method.decode("ascii")
    except UnicodeDecodeError:
        return None
    if name not in HTTP_METHODS or not target or not _visible(target):
        return None
    version: str | None = None
    if len(parts) == 3:
        raw_version = parts[2]
        if raw_version in (b"HTTP/1.0", b"HTTP/1.1"):
            version = raw_version.decode("ascii")
        elif complete or not b"HTTP/1.1".startswith(raw_version):
            return None  # a third word that is no HTTP/1.x version: not an HTTP/1.x request
    elif complete:
        return None  # HTTP/0.9 and other two-word lines are not what we report
    # Origin form ("/a/b"), asterisk form ("*"), absolute form (proxies) or authority form (CONNECT).
    text = target.decode("ascii")
    if not (text.startswith("/") or text == "*" or "://" in text or name == "CONNECT"):
        return None
    path = text.split("?", 1)[0].split("#", 1)[0]
    return RequestLine(method=name, path=path, version=version, truncated=len(parts) == 2)


# -- addresses ---------------------------------------------------------------------

def format_endpoint(family: int, addr: bytes, port: int) -> str | None:
    """'127.0.0.1:8080' or '[::1]:8080' (IPv4-mapped IPv6 shown as IPv4); None for another family."""
    try:
        if family == AF_INET:
            return f"{ipaddress.IPv4Address(bytes(addr[:4]))}:{port}"
        if family == AF_INET6:
            ip6 = ipaddress.IPv6Address(bytes(addr[:16]))
            if ip6.ipv4_mapped is not None:
                return f"{ip6.ipv4_mapped}:{port}"
            return f"[{ip6}]:{port}"
    except ValueError:
        return None
    return None


def endpoints_view(ends: np.void) -> dict[str, str | None]:
    """local and peer of one struct ksift_req_endpoints."""
    family = int(ends["family"])
    return {"local": format_endpoint(family, bytes(ends["laddr"]), int(ends["lport"])),
            "peer": format_endpoint(family, bytes(ends["raddr"]), int(ends["rport"]))}


def _ms(ns: int) -> float:
    return round(ns / 1e6, 1)


def request_view(head: bytes, duration_ns: int) -> dict[str, Any]:
    """method, path and duration of one request, as the alert shows them."""
    line = parse_request_line(head)
    out: dict[str, Any] = {"method": None, "path": None, "duration_ms": _ms(duration_ns)}
    if line is not None:
        out["method"], out["path"] = line.method, line.path + ("..." if line.truncated else "")
    return out


def histogram_view(hist: np.ndarray) -> list[dict[str, Any]]:
    """Non-empty log2 buckets: slot i holds requests of [2^i, 2^(i+1)) us (slot 0 from 0)."""
    out = []
    for i, n in enumerate(hist[:HIST_SLOTS]):
        if int(n):
            upper = None if i == HIST_SLOTS - 1 else (1 << (i + 1)) / 1000  # the last slot is open-ended
            out.append({"le_ms": upper, "count": int(n)})
    return out


def human_latency(seconds: float) -> str:
    """'500 ms', '1.5 s': how the alert sentence writes a bound."""
    if seconds < 1:
        return f"{seconds * 1000:g} ms"
    return f"{seconds:g} s"


def describe(request: dict[str, Any]) -> str:
    """'GET /api/orders' or 'a request' when its first bytes were not an HTTP request line."""
    if request.get("method") and request.get("path"):
        return f"{request['method']} {request['path']}"
    return "a request"


@dataclass(frozen=True)
class _Slowest:
    """The slowest request the records of one process showed in its current run of hot windows."""

    born: int  # start_boottime_ns: the process, not just its pid
    request: dict[str, Any]
    duration_ns: int
    last_window_ns: int  # start of the latest window a record came from


@dataclass(frozen=True)
class LiveStats:
    """One process's request statistics as the kernel holds them now."""

    start_boottime_ns: int
    window_start_ns: int
    requests: int
    slow: int
    max_ns: int
    window_requests: int
    window_slow: int
    window_max_ns: int
    window_max_head: bytes
    window_max_ends: dict[str, str | None]
    hist: np.ndarray

    @classmethod
    def from_raw(cls, raw: bytes) -> "LiveStats":
        st = np.frombuffer(raw[: REQ_STATS.itemsize], dtype=REQ_STATS)[0]
        n = min(int(st["window_max_head_len"]), HEAD_LEN)
        return cls(
            start_boottime_ns=int(st["start_boottime_ns"]), window_start_ns=int(st["window_start_ns"]),
            requests=int(st["requests"]), slow=int(st["slow"]), max_ns=int(st["max_ns"]),
            window_requests=int(st["window_requests"]), window_slow=int(st["window_slow"]),
            window_max_ns=int(st["window_max_ns"]), window_max_head=bytes(st["window_max_head"][:n]),
            window_max_ends=endpoints_view(st["window_max_ends"]),
            hist=np.array(st["hist"], dtype=np.uint64),
        )


class RequestSensor(Sensor):
    name = "request"
    record_base = 40  # KSIFT_REC_REQUEST_BASE
    object_file = "request.bpf.o"
    signals = (SLOW_REQUEST_SIGNAL,)
    counter_enum = "ksift_request_counter"
    counter_names = ("req_conn_accepted", "req_conn_closed", "req_self", "req_started", "req_done",
                     "req_slow", "req_emitted", "req_capped", "req_head_missed", "req_pid_reused")
    abi = {
        "ksift_req_endpoints": (ENDPOINTS, {}),
        "ksift_slow_request": (SLOW_REQUEST, {}),
        "ksift_req_conn": (REQ_CONN, {}),
        "ksift_req_stats": (REQ_STATS, {}),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rule: Rule | None = self.enabled.get(SLOW_REQUEST_SIGNAL)
        # The kernel's per-process stats: a BpfMap once started (anything with lookup(bytes) in tests).
        self.stats_map = None
        # tgid -> the slowest request its records showed in its current run of hot windows.
        self._slowest: OrderedDict[int, _Slowest] = OrderedDict()

    def latency_ns(self) -> int:
        return int(self.rule.param("latency") * NS) if self.rule is not None else 0

    def rodata(self) -> dict[str, int]:
        if self.rule is None:
            return {}
        return {"latency_ns": self.latency_ns(), **self.window_rodata("req", self.rule),
                "max_records": MAX_RECORDS_PER_WINDOW}

    def programs(self) -> list[str]:
        # The handshake marks server sockets; reads start requests, writes end them.
        return ["ks_req_state", "ks_req_recv", "ks_req_send"] if self.rule is not None else []

    def loaded(self) -> None:
        self.stats_map = self.obj.map("ks_req_stats")

    # -- records -------------------------------------------------------------------

    def decode(self, batch: np.ndarray) -> Decoded:
        out = Decoded()
        if self.rule is None or len(batch) == 0:
            return out
        out.crossings += self.decode_records(batch, REC_SLOW_REQUEST, SLOW_REQUEST, self._crossing, out, "slow request")
        return out

    def _crossing(self, row: np.void, p: np.void) -> Crossing:
        task = records.task_context(row["task"])
        head = bytes(p["head"][: min(int(p["head_len"]), HEAD_LEN)])
        duration_ns = int(p["duration_ns"])
        request = dict(request_view(head, duration_ns), **endpoints_view(p["ends"]))
        self._remember_slowest(task.tgid, task.start_boottime_ns, request, duration_ns, int(p["window_start_ns"]))
        details = {"request": request, "slow_requests": int(p["window_slow"]),
                   "requests": int(p["window_requests"])}
        return Crossing(rule=self.rule.name, key=task.tgid, ktime_ns=int(row["ktime_ns"]),
                        window_start_ns=int(p["window_start_ns"]), window_count=int(p["window_slow"]),
                        total=int(p["slow_total"]), task=task, details=details)

    def _remember_slowest(self, tgid: int, born: int, request: dict[str, Any], duration_ns: int,
                          window_start_ns: int) -> None:
        known = self._slowest.get(tgid)
        # A whole quiet window since the last hot one ends the run (and the incident), as in rules.windows.
        new_run = known is None or known.born != born or \
            window_start_ns - known.last_window_ns > 2 * int(self.rule.window_s * NS)
        if new_run or duration_ns > known.duration_ns:
            self._slowest[tgid] = _Slowest(born, request, duration_ns, window_start_ns)
        else:
            self._slowest[tgid] = _Slowest(born, known.request, known.duration_ns,
                                           max(known.last_window_ns, window_start_ns))
        self._slowest.move_to_end(tgid)
        while len(self._slowest) > _SLOWEST_KEYS:
            self._slowest.popitem(last=False)

    # -- live state ----------------------------------------------------------------

    def live(self, tgid: int, start_boottime_ns: int | None = None) -> LiveStats | None:
        """The process's stats from the kernel map; None if absent or now another process's."""
        if self.stats_map is None or not isinstance(tgid, int):
            return None
        raw = self.stats_map.lookup(tgid_key(tgid))
        if raw is None:
            return None
        stats = LiveStats.from_raw(raw)
        if start_boottime_ns is not None and stats.start_boottime_ns != start_boottime_ns:
            return None  # the pid was reused: these figures belong to someone else
        return stats

    def current(self, rule: str, key: int) -> KeyState | None:
        known = self._slowest.get(key)
        stats = self.live(key, known.born if known else None)
        if stats is None:
            return None
        return KeyState(stats.slow, stats.window_start_ns, stats.window_slow)

    # -- the alert -----------------------------------------------------------------

    def details(self, inc: Incident, status: str) -> dict[str, Any]:
        """The figures of the alert: the slowest request, N of M in the window, the histogram."""
        rule = inc.rule
        d: dict[str, Any] = {"latency_ms": _ms(int(rule.param("latency") * NS)), "window_s": rule.window_s}
        request = dict(inc.details.get("request") or {})
        slowest_ns = int(round(float(request.get("duration_ms") or 0) * 1e6))
        known = self._slowest.get(inc.key)
        if known is not None and known.born == inc.task.start_boottime_ns and \
                known.last_window_ns >= inc.first_window_ns and known.duration_ns > slowest_ns:
            request, slowest_ns = dict(known.request), known.duration_ns
        slow, requests = int(inc.details.get("slow_requests", 0)), int(inc.details.get("requests", 0))
        stats = self.live(inc.key, inc.task.start_boottime_ns)
        if stats is not None:
            if stats.window_start_ns == inc.last_window_ns:
                # Still the window that crossed: the kernel has the figures up to now.
                slow, requests = max(slow, stats.window_slow), max(requests, stats.window_requests)
                if stats.window_max_ns > slowest_ns:
                    request = dict(request_view(stats.window_max_head, stats.window_max_ns),
                                   **stats.window_max_ends)
                    slowest_ns = stats.window_max_ns
            d["requests_total"] = stats.requests
            d["slow_total"] = stats.slow
            d["max_ms"] = _ms(stats.max_ns)
            d["histogram"] = histogram_view(stats.hist)
        d.update(method=request.get("method"), path=request.get("path"), duration_ms=_ms(slowest_ns),
                 local=request.get("local"), peer=request.get("peer"),
                 slow_requests=slow, requests=requests)
        return d

    def summarize(self, inc: Incident, status: str) -> str:
        who = f"PID {inc.task.tgid} ({inc.task.comm})"
        d = self.details(inc, status)
        latency = human_latency(float(inc.rule.param("latency")))
        window = format_duration(inc.rule.window_s)
        what = describe(d)
        if what == "a request" and d.get("local"):
            what = f"a request on {d['local']}"
        took = f"{d['duration_ms']:,.0f} ms"
        if status == "open":
            return (f"{what} took {took} in {who}: {d['slow_requests']:,} of {d['requests']:,} "
                    f"requests over {latency} in the last {window}")
        lasted = how_long(inc)
        slow = f"{inc.count:,} slow request" + ("" if inc.count == 1 else "s")
        return f"{who} answers within {latency} again: {slow} in {lasted} (slowest {what}, {took})"
