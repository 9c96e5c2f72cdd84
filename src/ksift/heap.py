"""glibc malloc, set and trimmed for a long-lived agent whose peak memory is what users budget for.

Process-wide: `tune` is called once, by the composition root of `ksift run` (ksift.compose),
never at import. Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes

# mallopt(3) parameters (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# Blocks this large or larger are mapped on their own, and unmapped when freed: glibc's default,
# fixed (see tune).
MMAP_THRESHOLD = 128 << 10


def _libc():
    """The C library this interpreter runs on (dlopen(NULL)); ctypes.util.find_library would
    import subprocess and shutil (~1 MiB resident) to find the same one."""
    return ctypes.CDLL(None)


def tune(arena_max: int = 1, mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Set glibc's malloc for ksift's agent; False where that is not possible (not glibc).

    - one arena (M_ARENA_MAX): by default every thread that mallocs gets an arena of its own,
      which keeps that thread's peak resident once freed; the agent's threads (store writer,
      symbolizer, pressure) allocate little and rarely, so they lose nothing by sharing one;
    - big blocks always mapped (M_MMAP_THRESHOLD set, which fixes it): glibc otherwise raises
      the threshold to the largest block freed so far (up to 32 MiB), after which big transient
      buffers (libbpf's copies of the kernel BTF, a symbol table being read) come from the heap
      and stay resident once freed.
    """
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_ARENA_MAX, arena_max)) and bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))


def release_free() -> None:
    """Hand the free memory of the heap back to the system (malloc_trim(3)): after work that
    allocated much for a moment (BPF objects loaded, a symbol table read)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
