"""Net sensor: outgoing TCP connection storms counted per (process, destination) in the kernel (bpf/net.bpf.c).

The kernel sees each TCP socket enter SYN_SENT (tp_btf/inet_sock_set_state,
inside connect(), in the connecting process's context: no syscall hook), counts
it under {tgid, family, port, address} in fixed windows, and ships one record
per key per window over the threshold. A rule's key is (tgid, address, port),
the address as text ("10.0.0.5", "::1"); IPv4-mapped IPv6 destinations count
as IPv4.
"""

from __future__ import annotations

import ipaddress

import numpy as np

from ksift.rules.incidents import Crossing, Incident, KeyState
from ksift.rules.model import Rule
from ksift.sensors.base import CROSSING, WINDOW, WINDOW_ABI, Decoded, Sensor, how_long, window_crossing
from ksift.transport import records
from ksift.transport.records import AF_INET, AF_INET6
from ksift.units import format_duration

CONNECT_SIGNAL = "net.connect"

# Mirrors of bpf/net.h.
REC_CONNECT_CROSSING = 31
CONNECT_KEY = np.dtype([("tgid", "<u4"), ("family", "<u2"), ("port", "<u2"), ("addr", "u1", (16,))])
CONNECT_STATE = np.dtype([("win", WINDOW)])
CONNECT_CROSSING = np.dtype([("head", CROSSING), ("key", CONNECT_KEY)])

FAMILY_NAMES = {AF_INET: "ipv4", AF_INET6: "ipv6"}


def format_address(family: int, addr: bytes) -> str:
    """The destination address of a kernel key as text; ValueError for an unknown family."""
    if family == AF_INET:
        return str(ipaddress.IPv4Address(bytes(addr[:4])))
    if family == AF_INET6:
        return str(ipaddress.IPv6Address(bytes(addr[:16])))
    raise ValueError(f"unknown address family {family}")


def endpoint(address: str, port: int) -> str:
    """address:port, with an IPv6 address in brackets ("[::1]:443")."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def kernel_key(key: tuple[int, str, int]) -> bytes:
    """The bytes of struct ksift_connect_key for a rule key (tgid, address, port)."""
    tgid, address, port = key
    ip = ipaddress.ip_address(address)
    family = AF_INET if ip.version == 4 else AF_INET6
    raw = np.zeros(1, dtype=CONNECT_KEY)
    raw["tgid"], raw["family"], raw["port"] = tgid, family, port
    raw["addr"][0, : len(ip.packed)] = np.frombuffer(ip.packed, dtype=np.uint8)
    return raw.tobytes()


class ConnectSensor(Sensor):
    name = "net"
    record_base = 30  # KSIFT_REC_NET_BASE
    object_file = "net.bpf.o"
    signals = (CONNECT_SIGNAL,)
    counter_enum = "ksift_net_counter"
    counter_names = ("connect_seen", "connect_self", "connect_other_family", "connect_aggregated",
                     "connect_crossings")
    abi = {
        **WINDOW_ABI,
        "ksift_connect_key": (CONNECT_KEY, {}),
        "ksift_connect_state": (CONNECT_STATE, {}),
        "ksift_connect_crossing": (CONNECT_CROSSING, {}),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connect_rule: Rule | None = self.enabled.get(CONNECT_SIGNAL)
        self._state = None

    def rodata(self) -> dict[str, int]:
        return self.window_rodata("connect", self.connect_rule)

    def programs(self) -> list[str]:
        return ["ks_connect"] if self.connect_rule is not None else []

    def loaded(self) -> None:
        self._state = self.obj.map("ks_connect_state")

    def decode(self, batch: np.ndarray) -> Decoded:
        out = Decoded()
        if self.connect_rule is None or len(batch) == 0:
            return out
        rule = self.connect_rule.name
        out.crossings += self.decode_records(batch, REC_CONNECT_CROSSING, CONNECT_CROSSING,
                                             lambda row, p: self._crossing(rule, row, p), out, "connect crossing")
        return out

    def _crossing(self, rule: str, row: np.void, p: np.void) -> Crossing:
        task = records.task_context(row["task"])
        family = int(p["key"]["family"])
        address = format_address(family, bytes(p["key"]["addr"]))
        port = int(p["key"]["port"])
        return window_crossing(rule, row, p, task=task, key=(task.tgid, address, port),
                               details={"address": address, "port": port, "family": FAMILY_NAMES[family]})

    def current(self, rule: str, key: tuple[int, str, int]) -> KeyState | None:
        """One (process, destination)'s live counters, straight from the kernel map."""
        if self._state is None:
            return None
        return self.window_state(self._state, kernel_key(key), CONNECT_STATE)

    def summarize(self, inc: Incident, status: str) -> str:
        who = f"PID {inc.task.tgid} ({inc.task.comm})"
        window = format_duration(inc.rule.window_s)
        to = endpoint(inc.details.get("address", "?"), int(inc.details.get("port", 0)))
        if status == "open":
            return f"{who} attempted {inc.peak_window_count:,} connections to {to} in the last {window}"
        lasted = how_long(inc)
        return (f"{who} connection storm to {to} is over: {inc.count:,} connection attempts in {lasted} "
                f"(peak {inc.peak_window_count:,} in {window})")
