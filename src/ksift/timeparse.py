"""Parsing and formatting of the timestamps users type and alerts carry.

Everything here works in UTC: alerts are stamped in UTC and a naive timestamp
typed on the command line is taken to be UTC too, so results never depend on
the host's local time zone.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

# Seconds per unit of a relative duration such as "10m".
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_timestamp(value: str) -> datetime:
    """Parse an RFC 3339 / ISO 8601 timestamp into an aware UTC datetime.

    A trailing "Z" and any numeric offset are accepted; a naive value means UTC.
    Raises ValueError naming the value when it is not a timestamp.
    """
    if not isinstance(value, str):
        raise ValueError(f"invalid timestamp {value!r}: expected a string")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"invalid timestamp {value!r}: expected RFC 3339 like 2026-11-25T00:10:00Z"
        ) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def parse_since(value: str, now: datetime) -> datetime:
    """Turn a --since argument into an aware UTC datetime.

    Accepts a duration back from `now` ("30s", "10m", "2h", "1d", "1w", decimals
    allowed) or an absolute RFC 3339 / ISO 8601 timestamp (naive means UTC).
    Raises ValueError naming the value when it is neither.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    text = value.strip() if isinstance(value, str) else ""
    match = _DURATION.fullmatch(text)
    if match:
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        try:
            return (now - timedelta(seconds=seconds)).astimezone(timezone.utc)
        except (OverflowError, ValueError):
            raise ValueError(f"invalid time {value!r}: duration is too large") from None
    try:
        return parse_timestamp(text)
    except ValueError:
        raise ValueError(
            f"invalid time {value!r}: expected a duration like 30s, 10m, 2h, 1d, 1w "
            "or a timestamp like 2026-11-25T00:10:00Z"
        ) from None


def rfc3339(ts_unix: float) -> str:
    """Format a Unix timestamp as "YYYY-MM-DDTHH:MM:SS.mmmZ" (UTC, milliseconds)."""
    # Round to whole milliseconds first so .9996 carries into the next second
    # instead of printing ".1000".
    total_ms = round(ts_unix * 1000)
    seconds, millis = divmod(total_ms, 1000)
    stamp = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{millis:03d}Z"
