"""The net sensor's pure parts: decoding connect-storm records, addresses, kernel keys and summaries."""

from __future__ import annotations

import ipaddress
from functools import partial

import numpy as np
import pytest
from records_helpers import crossing_head, task_record, unstarted_sensor

from ksift.events import TaskContext
from ksift.rules.incidents import NS, Incident
from ksift.rules.model import Rule, Severity
from ksift.sensors import net

connect_rule = partial(Rule, name="connect_storm", severity=Severity.WARNING, signal="net.connect",
                       key="tgid_destination", threshold=500, window_s=1.0, cooldown_s=60.0)


def sensor(*rules: Rule) -> net.ConnectSensor:
    return unstarted_sensor(net.ConnectSensor, rules or (connect_rule(),))


def crossing(tgid: int, family: int, addr: bytes, port: int, window_count=1500, total=2000) -> np.ndarray:
    p = np.zeros(1, dtype=net.CONNECT_CROSSING)
    p["key"]["tgid"], p["key"]["family"], p["key"]["port"] = tgid, family, port
    p["key"]["addr"][0, : len(addr)] = np.frombuffer(addr, dtype=np.uint8)
    p["head"] = crossing_head(window_start_ns=2 * NS, total=total, window_count=window_count, threshold=500)
    return p


def batch_of(*payloads: np.ndarray, rec_type: int = net.REC_CONNECT_CROSSING) -> np.ndarray:
    return np.concatenate([task_record(rec_type, p, tgid=int(p["key"]["tgid"][0]), ktime_ns=3 * NS, comm=b"client")
                           for p in payloads])


V4 = ipaddress.ip_address("10.0.0.5").packed
V6 = ipaddress.ip_address("2001:db8::17").packed


# -- addresses ---------------------------------------------------------------


def test_addresses_format_per_family():
    assert net.format_address(net.AF_INET, V4 + bytes(12)) == "10.0.0.5"
    assert net.format_address(net.AF_INET6, V6) == "2001:db8::17"
    assert net.format_address(net.AF_INET6, ipaddress.ip_address("::1").packed) == "::1"
    with pytest.raises(ValueError, match="family 1"):
        net.format_address(1, bytes(16))


def test_endpoints_bracket_ipv6():
    assert net.endpoint("10.0.0.5", 443) == "10.0.0.5:443"
    assert net.endpoint("::1", 8080) == "[::1]:8080"


@pytest.mark.parametrize("address, family", [("10.0.0.5", net.AF_INET), ("2001:db8::17", net.AF_INET6)])
def test_kernel_key_matches_the_c_layout(address, family):
    raw = net.kernel_key((77, address, 443))
    assert len(raw) == net.CONNECT_KEY.itemsize == 24
    assert int.from_bytes(raw[0:4], "little") == 77
    assert int.from_bytes(raw[4:6], "little") == family
    assert int.from_bytes(raw[6:8], "little") == 443
    packed = ipaddress.ip_address(address).packed
    assert raw[8:8 + len(packed)] == packed and raw[8 + len(packed):] == bytes(16 - len(packed))


def test_kernel_key_round_trips_through_a_decoded_record():
    out = sensor().decode(batch_of(crossing(77, net.AF_INET6, V6, 443)))
    key = out.crossings[0].key
    assert net.kernel_key(key) == crossing(77, net.AF_INET6, V6, 443)["key"].tobytes()


# -- decoding ----------------------------------------------------------------


def test_ipv4_and_ipv6_crossings_decode_with_their_destination():
    out = sensor().decode(batch_of(crossing(77, net.AF_INET, V4, 443), crossing(78, net.AF_INET6, V6, 8443, 600)))
    assert out.failed == 0
    v4, v6 = out.crossings
    assert v4.rule == "connect_storm" and v4.key == (77, "10.0.0.5", 443) and v4.task.comm == "client"
    assert (v4.window_count, v4.total, v4.window_start_ns) == (1500, 2000, 2 * NS)
    assert v4.details == {"address": "10.0.0.5", "port": 443, "family": "ipv4"}
    assert v6.key == (78, "2001:db8::17", 8443) and v6.window_count == 600
    assert v6.details == {"address": "2001:db8::17", "port": 8443, "family": "ipv6"}


def test_a_record_with_an_unknown_family_is_counted_and_skipped():
    out = sensor().decode(batch_of(crossing(77, 99, V4, 443), crossing(78, net.AF_INET, V4, 80)))
    assert out.failed == 1 and [c.key for c in out.crossings] == [(78, "10.0.0.5", 80)]


def test_other_record_types_and_disabled_rules_give_nothing():
    assert sensor().decode(batch_of(crossing(77, net.AF_INET, V4, 443), rec_type=1)).crossings == []
    off = sensor(connect_rule(enabled=False))
    assert off.programs() == [] and off.rodata() == {}
    assert off.decode(batch_of(crossing(77, net.AF_INET, V4, 443))).crossings == []


def test_rule_thresholds_reach_rodata_and_one_program_attaches():
    s = sensor(connect_rule(threshold=20, window_s=0.25))
    assert s.rodata() == {"connect_threshold": 20, "connect_window_ns": NS // 4}
    assert s.programs() == ["ks_connect"]


# -- alerts ------------------------------------------------------------------

TASK = TaskContext(tgid=77, pid=77, ppid=1, uid=0, gid=0, cgroup_id=1, start_boottime_ns=5, comm="client",
                   exe="client")


def incident(address: str, port: int, family: str, peak=1500, total=None, resolved=None) -> Incident:
    inc = Incident(id="i1", rule=connect_rule(), key=(77, address, port), task=TASK, opened_ns=3 * NS,
                   first_window_ns=2 * NS, base_total=0, latest_total=total or peak, peak_window_count=peak,
                   last_window_ns=2 * NS, details={"address": address, "port": port, "family": family})
    inc.resolved_ns = resolved
    return inc


def test_summaries_name_the_destination():
    s = sensor()
    assert s.summarize(incident("10.0.0.5", 443, "ipv4"), "open") == (
        "PID 77 (client) attempted 1,500 connections to 10.0.0.5:443 in the last 1s")
    assert s.summarize(incident("::1", 8080, "ipv6"), "open") == (
        "PID 77 (client) attempted 1,500 connections to [::1]:8080 in the last 1s")
    done = incident("10.0.0.5", 443, "ipv4", total=3750, resolved=2 * NS + int(4.3 * NS))
    assert s.summarize(done, "resolved") == (
        "PID 77 (client) connection storm to 10.0.0.5:443 is over: 3,750 connection attempts in 4.3s "
        "(peak 1,500 in 1s)")


def test_details_are_the_incidents_destination():
    inc = incident("::1", 8080, "ipv6")
    # None: the alert carries the incident's own details (address, port, family).
    assert sensor().details(inc, "open") is None and inc.details["family"] == "ipv6"


def test_current_without_a_started_object_reads_nothing():
    assert sensor().current("connect_storm", (77, "10.0.0.5", 443)) is None
