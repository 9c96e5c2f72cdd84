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
        return data.decode("utf-8"), source
    except UnicodeDecodeError as exc:
        raise ConfigError(source, f"not valid UTF-8: {exc}") from exc


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"invalid TOML: {exc}") from exc
