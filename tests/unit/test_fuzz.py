"""Property-based fuzzing (Hypothesis) of everything that reads input ksift does not control.

Files and command-line values (rules, agent config, durations, --since) either parse or raise
ConfigError/ValueError with a message naming where; never another exception (a traceback, exit 1
instead of 2). Ring-buffer contents (random bytes, truncated batches, bad headers) are read or counted
as malformed, never an exception and never a consumer position past the producer's; sensors decode
random records of their own types without raising. Bounded: each test runs a fixed number of examples
with no deadline (the machine is shared), all of them together in a few seconds.
"""

from __future__ import annotations

import mmap
import os
import struct
from datetime import datetime, timezone

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from records_helpers import unstarted_sensor

from ksift.config import parse_config
from ksift.errors import ConfigError
from ksift.rules.model import SIGNALS
from ksift.rules.parse import parse_rules
from ksift.sensors.base import Decoded
from ksift.timeparse import parse_since, parse_timestamp
from ksift.transport import records
from ksift.transport.ringbuf import BUSY_BIT, DISCARD_BIT, RingBufferReader
from ksift.units import parse_duration

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOURCE = "fuzz.toml"

# --- TOML documents built from the fields the parsers know, with values of every TOML type

_scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["1s", "100ms", "0s", "-1s", "1e9h", "nan", "inf", "5m", "1h30m", "", " ", "1", "1.5s",
                     "warning", "critical", "tgid", "process.fork", "cpu.usage", "kill_tree", "ask",
                     "http://127.0.0.1:1/", "127.0.0.1:0", "/dev/null", "\ufeff"]),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.sampled_from(["a", "b", "x"]), inner,
                                                                          max_size=3)), max_leaves=8)


def _key(name: str) -> str:
    return name if name.replace("_", "").replace("-", "").isalnum() else '"' + _escape(name) + '"'


def _escape(text: str) -> str:
    return "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in text)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value > 0 else "-inf") if value in (float("inf"), float("-inf")) \
            else repr(value)
    if isinstance(value, str):
        return '"' + _escape(value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


RULE_FIELDS = ["name", "severity", "signal", "key", "threshold", "window", "description", "sustain", "cooldown",
               "enabled", "params", "policy", "colour"]
_rule_table = st.dictionaries(st.sampled_from(RULE_FIELDS), _values, max_size=len(RULE_FIELDS))
# Near-valid rules: the required fields right, one or more others random.
_near_rule = st.builds(lambda sig, extra: {"name": "r", "severity": "warning", "signal": sig,
                                           "key": SIGNALS[sig].keys[0], "threshold": 5, "window": "1s", **extra},
                       st.sampled_from(sorted(SIGNALS)), _rule_table)


def rules_document(tables: list[dict]) -> str:
    out = []
    for table in tables:
        out.append("[[rule]]")
        out += [f"{_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


def assert_config_error(exc: ConfigError) -> None:
    assert str(exc).startswith(SOURCE) and str(exc) != SOURCE + ": "


@FUZZ
@given(st.lists(st.one_of(_rule_table, _near_rule), max_size=3))
def test_rules_files_parse_or_raise_config_error(tables):
    try:
        parse_rules(rules_document(tables), SOURCE)
    except ConfigError as exc:
        assert_config_error(exc)


@FUZZ
@given(st.text(max_size=200))
def test_any_text_as_rules_or_config_parses_or_raises_config_error(text):
    for parse in (parse_rules, parse_config):
        try:
            parse(text, SOURCE)
        except ConfigError as exc:
            assert_config_error(exc)


CONFIG_SECTIONS = {
    "agent": ["tick", "log_level", "x"],
    "transport": ["ringbuf_bytes", "wakeup_bytes"],
    "store": ["db"],
    "rules": ["file"],
    "output": ["json"],
    "api": ["listen", "token", "cors", "x"],
    "sinks": ["webhook", "slack", "alertmanager", "otlp", "x"],
    "kubernetes": ["enabled", "x"],
    "remediation": ["dry_run", "poll_interval", "x"],
    "nope": ["x"],
}
_config = st.dictionaries(
    st.sampled_from(sorted(CONFIG_SECTIONS)),
    st.one_of(_values, st.dictionaries(st.sampled_from(sorted({f for fs in CONFIG_SECTIONS.values() for f in fs})),
                                       _values, max_size=4)),
    max_size=4)


@FUZZ
@given(_config)
def test_config_files_parse_or_raise_config_error(document):
    text = "\n".join(f"{_key(k)} = {toml_value(v)}" for k, v in document.items()) + "\n"
    try:
        parse_config(text, SOURCE)
    except ConfigError as exc:
        assert_config_error(exc)


# --- durations and times typed by people


@FUZZ
@given(st.one_of(_scalars, st.from_regex(r"-?[0-9]{0,30}(\.[0-9]{0,20})?(e[0-9]{1,4})?(ns|us|ms|s|m|h|d|w)?",
                                         fullmatch=True)))
def test_durations_parse_to_a_finite_non_negative_number_or_raise_config_error(value):
    try:
        seconds = parse_duration(value, source=SOURCE, field="rule[0].window")
    except ConfigError as exc:
        assert "rule[0].window" in str(exc)
    else:
        assert seconds >= 0 and seconds == seconds and seconds != float("inf")


NOW = datetime(2026, 12, 7, tzinfo=timezone.utc)


@FUZZ
@given(st.one_of(st.text(max_size=40), st.from_regex(r"[0-9]{1,400}(\.[0-9]{0,5})?[smhdw]", fullmatch=True)))
def test_since_and_timestamps_parse_or_raise_value_error_naming_the_value(text):
    for parse in (lambda t: parse_since(t, NOW), parse_timestamp):
        try:
            when = parse(text)
        except ValueError as exc:
            assert repr(text) in str(exc)
        else:
            assert when.tzinfo is not None


# --- the ring buffer: random and truncated batches

PAGE = mmap.PAGESIZE
DATA = 16 * PAGE
STRIDE = (records.RECORD_SIZE + 8 + 7) // 8 * 8


@pytest.fixture(scope="module")
def ring_file():
    fd = os.memfd_create("ksift-fuzz-ringbuf")
    os.ftruncate(fd, 2 * PAGE + 2 * DATA)
    mm = mmap.mmap(fd, 2 * PAGE + 2 * DATA)
    yield fd, mm
    mm.close()
    os.close(fd)


_header = st.one_of(
    st.just(records.RECORD_SIZE),
    st.just(records.RECORD_SIZE | BUSY_BIT),
    st.just(records.RECORD_SIZE | DISCARD_BIT),
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=0, max_value=2 * records.RECORD_SIZE),
)


@FUZZ
# Found by this test: a committed header whose record ends past the producer (only a corrupt ring holds
# one) moved consumer_pos past producer_pos, after which the kernel sees a full ring and drops everything.
@example(headers=[records.RECORD_SIZE], bodies=b"", cut=8, cons_start=0)
@given(headers=st.lists(_header, min_size=0, max_size=40), bodies=st.binary(min_size=0, max_size=4096),
       cut=st.integers(min_value=0, max_value=DATA), cons_start=st.integers(min_value=0, max_value=2**40))
def test_the_reader_never_raises_and_never_passes_the_producer(ring_file, headers, bodies, cut, cons_start):
    fd, mm = ring_file
    cons_start = cons_start // 8 * 8  # positions are 8-byte aligned
    mm[2 * PAGE:] = bytes(2 * DATA)
    # Records laid out as the headers say (whatever their lengths), bodies of random bytes.
    pos = 0
    for i, hdr in enumerate(headers):
        length = hdr & ~(BUSY_BIT | DISCARD_BIT)
        stride = (length + 8 + 7) // 8 * 8
        if pos + 8 > DATA:
            break
        off = 2 * PAGE + ((cons_start + pos) & (DATA - 1))
        mm[off:off + 8] = struct.pack("<II", hdr, 0)
        chunk = bodies[i * 64:(i * 64) + min(length, DATA - pos - 8, 64)]
        mm[off + 8:off + 8 + len(chunk)] = chunk
        pos += stride
    prod = cons_start + min(pos, cut, DATA)  # a truncated batch: the producer stops anywhere
    mm[0:8] = struct.pack("<Q", cons_start)
    mm[PAGE:PAGE + 8] = struct.pack("<Q", prod)
    reader = RingBufferReader(fd, DATA)
    try:
        batch = reader.read()
        assert batch.dtype == records.RECORD
        cons = struct.unpack("<Q", mm[0:8])[0]
        assert cons_start <= cons <= prod, (cons_start, cons, prod)
        assert len(batch) * STRIDE <= cons - cons_start
        assert reader.read().size == 0 or cons < prod  # what was read is never read twice
    finally:
        reader.close()


# --- every sensor's decoder, on random records of its own types


def _sensor(signal: str):
    from ksift.sensors.registry import sensor_class

    spec = SIGNALS[signal]
    rule = parse_rules(rules_document([{"name": "r", "severity": "warning", "signal": signal, "key": spec.keys[0],
                                        "threshold": 90 if signal == "cpu.usage" else 5, "window": "1s"}]),
                       SOURCE).rules
    return unstarted_sensor(sensor_class(signal), rule)


@FUZZ
# pressure.* have no records: their sensor reads PSI triggers, not the ring buffer.
@given(signal=st.sampled_from(sorted(s for s in SIGNALS if not s.startswith("pressure."))),
       n=st.integers(min_value=1, max_value=8), data=st.data())
def test_sensors_decode_random_records_of_their_types_without_raising(signal, n, data):
    sensor = _sensor(signal)
    raw = data.draw(st.binary(min_size=n * records.RECORD_SIZE, max_size=n * records.RECORD_SIZE))
    batch = np.frombuffer(raw, dtype=records.RECORD).copy()
    types = data.draw(st.lists(st.integers(min_value=sensor.record_base, max_value=sensor.record_base + 9),
                               min_size=n, max_size=n))
    batch["type"] = types
    decoded = sensor.decode(batch)
    assert isinstance(decoded, Decoded)
    assert decoded.failed <= n
