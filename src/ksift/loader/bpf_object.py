"""One BPF object's lifecycle: open -> configure -> load -> attach -> run -> close.

`BpfObject` is a context manager with exactly one teardown path (`close`):
links are destroyed, then the object is closed, whether we leave normally, on
an exception or because SIGTERM stopped the event loop. Links are fd-based, so
even a SIGKILL'd agent leaves nothing attached once the kernel closes its fds.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import logging
import os
from pathlib import Path

from ksift.errors import BpfError, BpfLoadError
from ksift.loader.libbpf import Libbpf

log = logging.getLogger("ksift.loader")

BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
_PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}

ONLINE_CPUS_PATH = "/sys/devices/system/cpu/online"
# SEC("perf_event") names no event: attach() samples cpu-clock at this rate (a prime,
# so the samples do not beat with timers that run at round rates).
DEFAULT_SAMPLE_HZ = 49
_PERF_ERRNO_HINTS = {
    errno_mod.EACCES: " (needs root, or CAP_PERFMON; see sysctl kernel.perf_event_paranoid)",
    errno_mod.EPERM: " (needs root, or CAP_PERFMON; see sysctl kernel.perf_event_paranoid)",
    errno_mod.EINVAL: " (is the rate above sysctl kernel.perf_event_max_sample_rate?)",
    errno_mod.ENOENT: " (this kernel has no cpu-clock perf event)",
    errno_mod.ENODEV: " (the CPU is offline, or this kernel has no cpu-clock perf event)",
}


def parse_cpu_list(text: str) -> list[int]:
    """The kernel's CPU list format ("0-3,5,7-8") as sorted CPU numbers; ValueError if malformed."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"bad CPU range {part!r} in {text.strip()!r}")
        lo, hi = int(first), int(last) if dash else int(first)
        if hi < lo:
            raise ValueError(f"bad CPU range {part!r} in {text.strip()!r}")
        cpus.update(range(lo, hi + 1))
    if not cpus:
        raise ValueError(f"no CPUs in {text.strip()!r}")
    return sorted(cpus)


def online_cpus(path: str = ONLINE_CPUS_PATH) -> list[int]:
    """The CPUs online now (a CPU brought online later is not sampled until the agent restarts)."""
    try:
        with open(path, encoding="ascii") as fh:
            return parse_cpu_list(fh.read())
    except (OSError, ValueError) as exc:
        raise BpfError(f"cannot read the online CPUs from {path}: {exc}") from exc


class BpfMap:
    """A loaded map addressed by fd; keys and values are bytes-like."""

    def __init__(self, lib: Libbpf, name: str, fd: int, map_type: int, key_size: int, value_size: int,
                 max_entries: int):
        self.lib, self.name, self.fd, self.type = lib, name, fd, map_type
        self.key_size, self.value_size, self.max_entries = key_size, value_size, max_entries
        self.percpu = map_type in _PERCPU_TYPES
        # Per-CPU lookups return one value per possible CPU, each rounded up to 8 bytes.
        self.ncpus = lib.num_possible_cpus() if self.percpu else 1
        self.slot_size = (value_size + 7) // 8 * 8 if self.percpu else value_size

    def lookup(self, key: bytes) -> bytes | None:
        """The value for key (for per-CPU maps: all CPUs' slots concatenated), or None."""
        kbuf = ctypes.create_string_buffer(bytes(key), self.key_size)
        vbuf = ctypes.create_string_buffer(self.slot_size * self.ncpus)
        ret = self.lib.so.bpf_map_lookup_elem(self.fd, kbuf, vbuf)
        if ret < 0:
            if ctypes.get_errno() == errno_mod.ENOENT or ret == -errno_mod.ENOENT:
                return None
            self.lib.check_int(ret, f"lookup in map {self.name}")
        return vbuf.raw

    def update(self, key: bytes, value: bytes, flags: int = 0) -> bool:
        """Set key to value (flags: BPF_ANY 0, BPF_NOEXIST 1, BPF_EXIST 2). False if the kernel refused."""
        kbuf = ctypes.create_string_buffer(bytes(key), self.key_size)
        vbuf = ctypes.create_string_buffer(bytes(value), self.value_size)
        return self.lib.so.bpf_map_update_elem(self.fd, kbuf, vbuf, flags) == 0

    def delete(self, key: bytes) -> bool:
        kbuf = ctypes.create_string_buffer(bytes(key), self.key_size)
        return self.lib.so.bpf_map_delete_elem(self.fd, kbuf) == 0

    def lookup_batch(self, delete: bool = False, chunk: int = 4096) -> tuple[bytes, bytes, int]:
        """Read (and optionally delete) every entry with batch calls.

        Returns (keys, values, n): n entries packed back to back. One batch
        syscall per `chunk` entries instead of one get_next_key + lookup per entry.
        """
        call = self.lib.so.bpf_map_lookup_and_delete_batch if delete else self.lib.so.bpf_map_lookup_batch
        vsize = self.slot_size * self.ncpus
        keys_out, vals_out, total = [], [], 0
        token_in = ctypes.create_string_buffer(8)
        token_out = ctypes.create_string_buffer(8)
        first = True
        while True:
            kbuf = ctypes.create_string_buffer(self.key_size * chunk)
            vbuf = ctypes.create_string_buffer(vsize * chunk)
            count = ctypes.c_uint32(chunk)
            ret = call(self.fd, None if first else token_in, token_out, kbuf, vbuf, ctypes.byref(count), None)
            err = ctypes.get_errno() if ret < 0 else 0
            n = count.value
            if n:
                keys_out.append(kbuf.raw[: n * self.key_size])
                vals_out.append(vbuf.raw[: n * vsize])
                total += n
            if ret < 0:
                if err == errno_mod.ENOENT or ret == -errno_mod.ENOENT:
                    break  # no more entries
                self.lib.check_int(ret, f"batch lookup in map {self.name}")
            ctypes.memmove(token_in, token_out, 8)
            first = False
        return b"".join(keys_out), b"".join(vals_out), total


class BpfObject:
    """Owns one libbpf bpf_object and its links."""

    def __init__(self, path: str | Path, lib: Libbpf):
        self.path = Path(path)
        self.lib = lib
        self._obj: int | None = None
        self._links: dict[str, int] = {}
        self._perf_fds: dict[str, int] = {}  # link name -> the perf event fd that link owns
        self._loaded = False

    # -- lifecycle -----------------------------------------------------------

    def open(self) -> "BpfObject":
        if not self.path.is_file():
            raise BpfError(f"BPF object {self.path} not found: run `make build` (or `make run`) to compile it")
        try:
            self._obj = self.lib.check_ptr(self.lib.so.bpf_object__open_file(str(self.path).encode(), None),
                                           f"open {self.path}")
        except OSError as exc:
            raise BpfLoadError(f"cannot open BPF object {self.path}: {exc.strerror}", self.lib.take_log()) from exc
        return self

    def __enter__(self) -> "BpfObject":
        if self._obj is None:
            self.open()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """The one teardown path: detach every link, then free the object. Idempotent.

        A perf event's fd belongs to its link: libbpf disables and closes it when
        the link is destroyed, so it is never closed twice here.
        """
        for name, link in list(self._links.items()):
            ret = self.lib.so.bpf_link__destroy(link)
            if ret < 0:
                log.warning("detaching %s from %s failed: %d", name, self.path.name, ret)
        self._links.clear()
        self._perf_fds.clear()
        if self._obj is not None:
            self.lib.so.bpf_object__close(self._obj)
            self._obj = None
            self._loaded = False

    # -- configure (between open and load) -----------------------------------

    def _require(self, opened: bool = True, loaded: bool | None = None) -> int:
        if self._obj is None and opened:
            raise BpfError(f"{self.path.name}: object is not open")
        if loaded is not None and self._loaded != loaded:
            raise BpfError(f"{self.path.name}: only allowed {'after' if loaded else 'before'} load")
        return self._obj  # type: ignore[return-value]

    def _find_map(self, name: str) -> int:
        obj = self._require()
        for m in self.lib.iter_maps(obj):
            if self.lib.so.bpf_map__name(m).decode() == name:
                return m
        raise BpfError(f"{self.path.name}: no map named {name!r}")

    def set_rodata(self, **values: int) -> None:
        """Set `const volatile` globals (ints/bools) before load; names must exist."""
        obj = self._require(loaded=False)
        layout = self.lib.datasec_vars(obj, ".rodata")
        rodata = next((m for m in self.lib.iter_maps(obj)
                       if self.lib.so.bpf_map__name(m).decode().endswith(".rodata")), None)
        if rodata is None:
            raise BpfError(f"{self.path.name}: has no .rodata section")
        size = ctypes.c_size_t()
        base = self.lib.check_ptr(self.lib.so.bpf_map__initial_value(rodata, ctypes.byref(size)), "rodata")
        for name, value in values.items():
            if name not in layout:
                raise BpfError(f"{self.path.name}: no rodata variable {name!r} (have: {', '.join(sorted(layout))})")
            offset, width = layout[name]
            data = int(value).to_bytes(width, "little", signed=int(value) < 0)
            ctypes.memmove(base + offset, data, width)

    def set_autoload(self, program: str, enabled: bool) -> None:
        self._require(loaded=False)
        self.lib.check_int(self.lib.so.bpf_program__set_autoload(self._program(program), enabled),
                           f"autoload {program}")

    def resize_map(self, name: str, max_entries: int) -> None:
        self._require(loaded=False)
        self.lib.check_int(self.lib.so.bpf_map__set_max_entries(self._find_map(name), max_entries),
                           f"resize map {name}")

    def map_names(self) -> list[str]:
        return [self.lib.so.bpf_map__name(m).decode() for m in self.lib.iter_maps(self._require())]

    def reuse_map(self, name: str, fd: int) -> None:
        """Make the object's map `name` the already-loaded map behind fd (one map shared
        by several objects: the ring buffer, the transport counters, exec paths)."""
        self._require(loaded=False)
        self.lib.check_int(self.lib.so.bpf_map__reuse_fd(self._find_map(name), fd), f"reuse map {name}")

    # -- load and attach -----------------------------------------------------

    def load(self) -> None:
        obj = self._require(loaded=False)
        self.lib.take_log()  # only this load's log should reach the error
        ret = self.lib.so.bpf_object__load(obj)
        if ret < 0:
            err = -ret if ret != -1 else ctypes.get_errno()
            # EPERM with the capabilities present: a seccomp profile refusing bpf() (a container's).
            hint = (" (loading BPF needs root, or CAP_BPF and CAP_PERFMON, and no seccomp filter refusing bpf(): "
                    "`ksift doctor` says which)") if err == errno_mod.EPERM else ""
            raise BpfLoadError(f"kernel refused BPF object {self.path.name}: {errno_mod.errorcode.get(err, err)} "
                               f"({_strerror(err)}){hint}", self.lib.take_log())
        self._loaded = True

    def program_names(self) -> list[str]:
        return [self.lib.so.bpf_program__name(p).decode() for p in self.lib.iter_programs(self._require())]

    def section_name(self, program: str) -> str:
        return self.lib.so.bpf_program__section_name(self._program(program)).decode()

    def _program(self, name: str) -> int:
        for prog in self.lib.iter_programs(self._require()):
            if self.lib.so.bpf_program__name(prog).decode() == name:
                return prog
        raise BpfError(f"{self.path.name}: no program named {name!r}")

    def attach(self, program: str) -> None:
        """Attach one program where its SEC() says; raises BpfError naming it on failure."""
        self._require(loaded=True)
        if program in self._links:
            return
        prog = self._program(program)
        section = self.lib.so.bpf_program__section_name(prog).decode()
        if section == "perf_event":
            # libbpf cannot attach it from the section name: it needs events to sample.
            self.attach_perf_event(program, DEFAULT_SAMPLE_HZ)
            return
        if _is_iter(section):
            # An iterator link runs nothing by itself: run_iter() runs one pass.
            link = self.lib.so.bpf_program__attach_iter(prog, None)
        else:
            link = self.lib.so.bpf_program__attach(prog)
        if not link:
            err = ctypes.get_errno()
            raise BpfError(f"cannot attach {program} ({section}): {_strerror(err)}\n{self.lib.take_log()}")
        self._links[program] = link

    def run_iter(self, program: str, max_bytes: int = 1 << 20) -> bytes:
        """One pass of an attached SEC("iter/...") program over every object of its kind.

        A new iterator fd from the program's link (bpf_iter_create), read to EOF: each
        read runs the program over the next objects. Returns what the program wrote
        to its seq_file (at most max_bytes kept; the pass always runs to its end),
        and closes the fd whatever happens.
        """
        self._require(loaded=True)
        link = self._links.get(program)
        if link is None or not _is_iter(self.section_name(program)):
            raise BpfError(f"{self.path.name}: {program} is not an attached iterator")
        try:
            fd = self.lib.check_int(self.lib.so.bpf_iter_create(self.lib.so.bpf_link__fd(link)),
                                    f"create an iterator of {program}")
        except OSError as exc:
            raise BpfError(f"cannot run {program}: {exc.strerror}") from exc
        out: list[bytes] = []
        kept = 0
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except InterruptedError:
                    continue
                except BlockingIOError:
                    # -EAGAIN: the pass stopped after a million objects with nothing written; go on.
                    continue
                except OSError as exc:
                    raise BpfError(f"iterator {program} failed: {exc.strerror}") from exc
                if not chunk:
                    return b"".join(out)
                if kept < max_bytes:
                    out.append(chunk[: max_bytes - kept])
                    kept += len(out[-1])
        finally:
            os.close(fd)

    def attach_perf_event(self, program: str, sample_hz: int, cpus: list[int] | None = None) -> None:
        """Run a SEC("perf_event") program on cpu-clock samples, sample_hz per CPU.

        One perf event and one link per CPU (default: every online CPU), named
        "<program>@cpu<N>". On failure the links made so far stay in the object,
        so close() releases them with everything else.
        """
        self._require(loaded=True)
        prog = self._program(program)
        section = self.lib.so.bpf_program__section_name(prog).decode()
        if section != "perf_event":
            raise BpfError(f"cannot attach {program} ({section}) to perf events: it is not SEC(\"perf_event\")")
        if not 1 <= sample_hz <= 100_000:
            raise BpfError(f"cannot attach {program}: sample rate {sample_hz} Hz is outside 1..100000")
        for cpu in online_cpus() if cpus is None else cpus:
            name = f"{program}@cpu{cpu}"
            if name in self._links:
                continue
            try:
                pfd = self.lib.perf_event_open_cpu_clock(cpu, sample_hz)
            except OSError as exc:
                raise BpfError(f"cannot attach {program} (perf_event): {exc.strerror}"
                               f"{_PERF_ERRNO_HINTS.get(exc.errno, '')}") from exc
            link = self.lib.so.bpf_program__attach_perf_event(prog, pfd)
            if not link:
                err = ctypes.get_errno()
                os.close(pfd)  # never attached, so still ours to close
                raise BpfError(f"cannot attach {program} to the cpu-clock event of CPU {cpu}: {_strerror(err)}\n"
                               f"{self.lib.take_log()}")
            self._links[name] = link
            self._perf_fds[name] = pfd

    @property
    def attached(self) -> list[str]:
        return list(self._links)

    @property
    def perf_fds(self) -> dict[str, int]:
        """The perf event fds held through links, by link name."""
        return dict(self._perf_fds)

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """(run_time_ns, run_cnt) of each loaded program, from the kernel's bpf_prog_info.

        The kernel counts these only while kernel.bpf_stats_enabled is on (it
        costs every program run a clock read); ksift never turns it on itself.
        """
        out: dict[str, tuple[int, int]] = {}
        obj = self._require(loaded=True)
        for prog in self.lib.iter_programs(obj):
            fd = self.lib.so.bpf_program__fd(prog)
            if fd < 0:
                continue  # not loaded (autoload off): no rule needs it
            info = BpfProgInfoHead()
            size = ctypes.c_uint32(ctypes.sizeof(info))
            self.lib.check_int(self.lib.so.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
                               "read program info")
            out[self.lib.so.bpf_program__name(prog).decode()] = (info.run_time_ns, info.run_cnt)
        return out

    def map(self, name: str) -> BpfMap:
        self._require(loaded=True)
        m = self._find_map(name)
        so = self.lib.so
        return BpfMap(self.lib, name, so.bpf_map__fd(m), so.bpf_map__type(m), so.bpf_map__key_size(m),
                      so.bpf_map__value_size(m), so.bpf_map__max_entries(m))


class BpfProgInfoHead(ctypes.Structure):
    """struct bpf_prog_info (uapi/linux/bpf.h) up to run_cnt; a shorter info_len is allowed.

    Every pointer/length pair stays zero, so the kernel copies no arrays back.
    """

    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64), ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32), ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32), ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
    ]


def _is_iter(section: str) -> bool:
    """SEC("iter/<kind>") or its sleepable form SEC("iter.s/<kind>")."""
    return section.startswith(("iter/", "iter.s/"))


def _strerror(err: int) -> str:
    return os.strerror(err) if err else "unknown error"
