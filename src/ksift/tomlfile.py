"""Reading TOML input files (config, rules) with errors that name the file."""

from __future__ import annotations

import os
import tomllib
from typing import Any

from ksift.errors import ConfigError


def read_text(path: str | os.PathLike[str], what: str) -> tuple[str, str]:
    """(text, source) of a UTF-8 file; `what` says which kind of file in errors."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError(source, f"cannot read {what}: {exc.strerror or exc}") from exc
    try:
        # utf-8-sig: a byte order mark (some Windows editors write one) is harmless, so it is dropped
        # rather than refused; TOML itself has no word for it and would call it an invalid statement.
        return data.decode("utf-8-sig"), source
    except UnicodeDecodeError as exc:
        raise ConfigError(source, f"not valid UTF-8: {exc}") from exc


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"invalid TOML: {exc}") from exc
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively: a file nested thousands deep
        # exhausts Python's stack. No config or rules file needs more than a few levels.
        raise ConfigError(source, "invalid TOML: arrays or tables nested too deeply") from None
