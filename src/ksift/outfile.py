"""Files the agent writes besides its store (`--stats`): checked at start, written without following links.

The path comes from the command line and may be in a folder other users can write (/tmp, where
fs.protected_symlinks may be 0): open(path, "w") there follows a symlink another user planted and lets
root overwrite any file. So the content goes to a new temporary file in the same folder (created with
O_EXCL: never an existing file or link), which is then renamed over the path: rename replaces a link
itself, never what it points to. The same folder keeps the rename on one file system (atomic).
"""

from __future__ import annotations

import os
import stat

from ksift.errors import ConfigError, KsiftError


def check_writable(path: str, what: str) -> None:
    """Raise ConfigError (naming `what`, e.g. "--stats", and the path) if write_replacing(path)
    would fail: an empty path, a folder that does not exist or cannot be written, a directory."""
    if not path.strip():
        raise ConfigError(what, "must not be empty")
    if os.path.isdir(path) and not os.path.islink(path):
        raise ConfigError(what, f"cannot write {path}: it is a directory")
    import tempfile  # here, as below: `ksift run` imports this module before the kernel side loads (see compose)

    folder = _folder(path)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ksift-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(what, f"cannot write {path}: {exc.strerror or exc} (folder {folder})") from exc


def write_replacing(path: str, text: str, what: str, mode: int = 0o644) -> None:
    """Write `text` to `path` through a temporary file renamed over it; a link at `path` is replaced,
    never followed. KsiftError naming `what` and the path on failure (nothing is left behind)."""
    import tempfile

    folder = _folder(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.")
    except OSError as exc:
        raise KsiftError(f"{what}: cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), mode)  # mkstemp makes 0600; these counters are not secret
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise KsiftError(f"{what}: cannot write {path}: {exc.strerror or exc}") from exc


def _folder(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def store_path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be an alert store (it exists and is not a regular file: a device such as
    /dev/null, where sqlite would put a world-writable journal beside it; a folder), or None.

    Here rather than in ksift.store.sqlite: `ksift run` checks the path before it loads the
    kernel side, and sqlite3 is imported only after (see ksift.compose)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot use {os.fspath(path)!r} as the alert store: {exc.strerror or exc}"
    if stat.S_ISREG(st.st_mode):
        return None
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
        stat.S_ISBLK(st.st_mode) else "not a regular file"
    return f"cannot use {os.fspath(path)!r} as the alert store: it is {kind}, not a regular file"
