"""The small hierarchy every OS or input error is translated into at the boundary.

Callers catch these, never OSError or sqlite3.Error from deep inside.
"""

from __future__ import annotations


class KsiftError(Exception):
    """Base of every error ksift raises on purpose."""


class ConfigError(KsiftError):
    """A config or rules file (or a value in it) is invalid.

    The message always names the file and, when known, the field and the bad value.
    """

    def __init__(self, source: str, message: str, field: str | None = None):
        self.source = source
        self.field = field
        self.message = message
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {message}")


class ProcessGone(KsiftError):
    """The process exited (or its pid was recycled) while we were reading it."""

    def __init__(self, pid: int):
        self.pid = pid
        super().__init__(f"process {pid} is gone")


class AccessDenied(KsiftError):
    """The OS refused to let us read or act on something."""


class BpfError(KsiftError):
    """Loading, attaching or talking to a BPF object failed."""


class BpfLoadError(BpfError):
    """The kernel refused a BPF object; carries libbpf's log (verifier output)."""

    def __init__(self, message: str, log: str = ""):
        self.log = log
        super().__init__(f"{message}\n--- libbpf log ---\n{log}" if log else message)


class StoreError(KsiftError):
    """The alert store could not be opened, migrated or written."""


class StoreWriteError(StoreError):
    """The alert store's database refused a write (read-only, immutable, disk full, locked too long)."""
