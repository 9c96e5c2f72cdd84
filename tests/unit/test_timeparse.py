from datetime import datetime, timedelta, timezone

import pytest

from ksift.timeparse import parse_since, parse_timestamp, rfc3339

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("value", "delta"),
    [
        ("30s", timedelta(seconds=30)),
        ("10m", timedelta(minutes=10)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1w", timedelta(weeks=1)),
        ("1.5h", timedelta(minutes=90)),
        ("0s", timedelta(0)),
        (" 5m ", timedelta(minutes=5)),
    ],
)
def test_relative_durations_count_back_from_now(value, delta):
    assert parse_since(value, NOW) == NOW - delta


def test_naive_now_is_treated_as_utc():
    result = parse_since("1h", NOW.replace(tzinfo=None))
    assert result == NOW - timedelta(hours=1)
    assert result.tzinfo is not None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-25T00:10:00.123Z", datetime(2026, 11, 25, 0, 10, 0, 123000, tzinfo=timezone.utc)),
        ("2026-11-25T00:10:00Z", datetime(2026, 11, 25, 0, 10, tzinfo=timezone.utc)),
        ("2026-11-25T02:10:00+02:00", datetime(2026, 11, 25, 0, 10, tzinfo=timezone.utc)),
        ("2026-11-25T00:10:00", datetime(2026, 11, 25, 0, 10, tzinfo=timezone.utc)),
        ("2026-11-25 00:10:00", datetime(2026, 11, 25, 0, 10, tzinfo=timezone.utc)),
        ("2026-11-25", datetime(2026, 11, 25, tzinfo=timezone.utc)),
    ],
)
def test_absolute_timestamps_become_aware_utc(value, expected):
    result = parse_since(value, NOW)
    assert result == expected
    assert result.utcoffset() == timedelta(0)


@pytest.mark.parametrize("value", ["", "abc", "10", "10x", "-5m", "m", "10 m", "2026-13-01", "1e3s"])
def test_bad_values_raise_value_error_naming_the_value(value):
    with pytest.raises(ValueError) as info:
        parse_since(value, NOW)
    assert repr(value) in str(info.value)


def test_absurd_duration_is_a_value_error():
    with pytest.raises(ValueError, match="too large"):
        parse_since("999999999999w", NOW)


def test_parse_timestamp_rejects_non_strings():
    with pytest.raises(ValueError):
        parse_timestamp(12345)  # type: ignore[arg-type]


def test_rfc3339_formats_milliseconds_in_utc():
    ts = datetime(2026, 11, 25, 0, 10, 0, 123000, tzinfo=timezone.utc).timestamp()
    assert rfc3339(ts) == "2026-11-25T00:10:00.123Z"
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"


def test_rfc3339_rounding_carries_into_the_next_second():
    assert rfc3339(59.9996) == "1970-01-01T00:01:00.000Z"


def test_rfc3339_round_trips_through_parse_timestamp():
    ts = 1795565400.456
    assert parse_timestamp(rfc3339(ts)).timestamp() == pytest.approx(ts, abs=1e-3)
