"""Durations: parsing config values and formatting them back for summaries."""

from __future__ import annotations

import pytest

from ksift.errors import ConfigError
from ksift.units import format_duration, parse_duration


def parse(value):
    return parse_duration(value, source="agent.toml", field="agent.tick")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (1, 1.0),
        (0, 0.0),
        (0.25, 0.25),
        ("500ms", 0.5),
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("250us", 0.00025),
        ("0s", 0.0),
        (" 10ms ", 0.01),
        ("1 s", 1.0),
        (".5s", 0.5),
    ],
)
def test_parse_valid(value, seconds):
    assert parse(value) == pytest.approx(seconds)
    assert isinstance(parse(value), float)


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -0.5,
        "-1s",
        "",
        "   ",
        "abc",
        "1",  # a quoted number needs a unit
        "1x",
        "1d",
        "s",
        "1.2.3s",
        "1e3ms",
        True,
        False,
        None,
        [1],
        float("inf"),
        float("nan"),
    ],
)
def test_parse_invalid_names_file_field_and_value(value):
    with pytest.raises(ConfigError) as info:
        parse(value)
    message = str(info.value)
    assert "agent.toml" in message
    assert "agent.tick" in message
    assert repr(value) in message
    assert info.value.field == "agent.tick"


def test_parse_quoted_number_hints_at_missing_unit():
    with pytest.raises(ConfigError, match="missing unit"):
        parse("5")


def test_parse_unknown_unit_lists_known_units():
    with pytest.raises(ConfigError, match="unknown unit 'd'.*ms"):
        parse("3d")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (1, "1s"),
        (0.5, "500ms"),
        (120, "2m"),
        (1.5, "1.5s"),
        (90, "90s"),
        (3600, "1h"),
        (0.00025, "250us"),
        (0.3, "300ms"),
        (0.01, "10ms"),
        (30, "30s"),
        (0, "0s"),
        (2.125, "2.125s"),
        (0.0000005, "0.5us"),
    ],
)
def test_format(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", ["1s", "500ms", "2m", "1.5s", "250us", "1h", "90s", "2.125s"])
def test_format_round_trips(text):
    assert format_duration(parse(text)) == text
