"""The process context every record carries (struct ksift_task): its arguments and where they came from."""

from __future__ import annotations

import numpy as np
import pytest

from ksift.transport import records
from ksift.transport.records import ARGS_LEN, CTX_ARGS_EVENT, CTX_ARGS_EXEC, CTX_EXE_EVENT, CTX_EXE_EXEC, decode_args


@pytest.mark.parametrize("raw, size, want", [
    (b"python3\0forker.py\0--rate\x00200\0", None, ("python3", "forker.py", "--rate", "200")),
    (b"true\0", None, ("true",)),
    (b"sh\0-c\0\0x\0", None, ("sh", "-c", "", "x")),  # an empty argument between two NULs stays
    (b"cmd\0\0", None, ("cmd", "")),  # ... and so does an empty last one
    (b"", 0, ()),
])
def test_whole_arguments_decode_as_argv(raw, size, want):
    assert decode_args(raw.ljust(ARGS_LEN, b"\0"), len(raw) if size is None else size) == (want, False)


def test_arguments_cut_at_the_record_say_so_and_keep_the_partial_last_one():
    argv = b"\0".join([b"python3", b"-c", b"x" * 600]) + b"\0"
    args, cut = decode_args(argv[:ARGS_LEN], len(argv))
    assert cut is True
    assert args[:2] == ("python3", "-c") and args[2] == "x" * (ARGS_LEN - len(b"python3\0-c\0"))


def test_a_cut_exactly_after_a_nul_shows_an_empty_partial_argument():
    argv = b"a" * (ARGS_LEN - 1) + b"\0" + b"next\0"
    assert decode_args(argv[:ARGS_LEN], len(argv)) == (("a" * (ARGS_LEN - 1), ""), True)


def test_odd_bytes_survive_as_os_fsdecode_keeps_them():
    args, _ = decode_args(b"cat\0caf\xe9\0", 9)
    assert args == ("cat", "caf\udce9")


def test_bytes_past_the_size_are_never_decoded():
    # The kernel copies min(size, ARGS_LEN) bytes and the rest of the field is zeros, but a stale
    # tail must not become arguments either.
    assert decode_args(b"ls\0-l\0STALE\0", 6) == (("ls", "-l"), False)


def record_task(flags: int, exe: bytes, args: bytes, size: int) -> np.void:
    rec = np.zeros(1, dtype=records.RECORD)
    task = rec[0]["task"]
    task["tgid"] = task["pid"] = 42
    task["comm"], task["exe"] = b"forker", exe
    task["ctx_flags"], task["args_size"] = flags, size
    task["args"] = np.frombuffer(args[:ARGS_LEN].ljust(ARGS_LEN, b"\0"), dtype=f"V{ARGS_LEN}")[0]
    return rec[0]["task"]


def test_a_record_of_a_live_process_carries_its_resolved_path():
    t = records.task_context(record_task(CTX_EXE_EVENT | CTX_ARGS_EXEC, b"/usr/bin/python3.11",
                                         b"python3\0forker.py\0", 18))
    assert (t.exe, t.exe_source, t.cmdline_source) == ("/usr/bin/python3.11", "event", "exec")


def test_a_record_of_a_seen_exec_carries_its_path_and_arguments():
    t = records.task_context(record_task(CTX_EXE_EXEC | CTX_ARGS_EXEC, b"/usr/bin/python3",
                                         b"python3\0forker.py\0", 18))
    assert (t.exe, t.exe_source) == ("/usr/bin/python3", "exec")
    assert (t.cmdline, t.cmdline_source, t.cmdline_truncated) == (("python3", "forker.py"), "exec", False)


def test_a_record_without_a_seen_exec_has_the_basename_and_arguments_from_memory():
    t = records.task_context(record_task(CTX_ARGS_EVENT, b"python3.11", b"python3\0" + b"y" * 600, 608))
    assert (t.exe, t.exe_source) == ("python3.11", "exe_name")
    assert t.cmdline_source == "event" and t.cmdline_truncated and t.cmdline[0] == "python3"


def test_a_record_without_arguments_has_none():
    t = records.task_context(record_task(0, b"", b"", 0))
    assert (t.exe, t.exe_source, t.cmdline, t.cmdline_source) == ("", None, None, None)
