"""A thin ctypes layer over libbpf.so.1 (Debian's libbpf1).

Only what ksift needs: open, rodata, autoload, load, attach, map access
(including batch ops), and perf_event_open for the CPU sampler.
Pointer-returning libbpf 1.x calls return NULL and set errno; int-returning
ones return a negative errno. Both become OSError here, and the callers above
translate those into ksift.errors.
"""

from __future__ import annotations

import collections
import ctypes
import errno as errno_mod
import logging
import os

log = logging.getLogger("ksift.libbpf")

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2
BTF_KIND_VAR, BTF_KIND_DATASEC = 14, 15

# va_list on x86-64 is a pointer to one 24-byte __va_list_tag; copying those
# bytes is exactly what va_copy does there, so we can measure then format.
_VA_LIST_TAG_SIZE = 24

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

# perf_event_open(2) on x86-64 (no libc wrapper exists), and the values ksift uses.
SYS_PERF_EVENT_OPEN = 298
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_ATTR_FLAG_DISABLED = 1 << 0  # libbpf enables the event once the program is attached
PERF_ATTR_FLAG_FREQ = 1 << 10  # sample_freq is a rate in Hz, not a period


class BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr as of PERF_ATTR_SIZE_VER8 (136 bytes); older kernels accept it
    because every field they do not know is zero."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
        ("sample_period_or_freq", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32), ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64), ("config2", ctypes.c_uint64), ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64), ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32), ("sample_regs_intr", ctypes.c_uint64), ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16), ("reserved_2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32), ("reserved_3", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64), ("config3", ctypes.c_uint64),
    ]


def _sig(fn, restype, *argtypes):
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


class Libbpf:
    """Bindings to one loaded libbpf.so.1, with libbpf's log routed to logging.

    libbpf's print callback is process-wide; the last Libbpf created owns it.
    The most recent log lines are kept so a failed load can carry the verifier log.
    """

    def __init__(self, soname: str = "libbpf.so.1", log_lines: int = 4000):
        try:
            self.so = ctypes.CDLL(soname, use_errno=True)
        except OSError as exc:
            raise OSError(errno_mod.ENOENT, f"cannot load {soname} (apt install libbpf1): {exc}") from exc
        # The C library this interpreter runs on (dlopen(NULL)): ctypes.util.find_library would import
        # subprocess and shutil (~1 MiB resident) and may run ldconfig, to find the same library.
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
        self._libc.vsnprintf.restype = ctypes.c_int
        self._libc.syscall.restype = ctypes.c_long
        self.recent_log: collections.deque[str] = collections.deque(maxlen=log_lines)
        self._declare()
        self._print_cb = _PRINT_FN(self._on_print)  # keep a reference: libbpf holds the pointer
        self.so.libbpf_set_print(self._print_cb)

    def _declare(self) -> None:
        s, p = self.so, ctypes.c_void_p
        i, u32, sz = ctypes.c_int, ctypes.c_uint32, ctypes.c_size_t
        _sig(s.libbpf_set_print, p, _PRINT_FN)
        _sig(s.bpf_object__open_file, p, ctypes.c_char_p, p)
        _sig(s.bpf_object__load, i, p)
        _sig(s.bpf_object__close, None, p)
        _sig(s.bpf_object__btf, p, p)
        _sig(s.bpf_object__next_map, p, p, p)
        _sig(s.bpf_object__next_program, p, p, p)
        _sig(s.bpf_map__name, ctypes.c_char_p, p)
        _sig(s.bpf_map__fd, i, p)
        _sig(s.bpf_map__type, i, p)
        _sig(s.bpf_map__key_size, u32, p)
        _sig(s.bpf_map__value_size, u32, p)
        _sig(s.bpf_map__max_entries, u32, p)
        _sig(s.bpf_map__set_max_entries, i, p, u32)
        _sig(s.bpf_map__reuse_fd, i, p, i)
        _sig(s.bpf_map__initial_value, p, p, ctypes.POINTER(sz))
        _sig(s.bpf_program__name, ctypes.c_char_p, p)
        _sig(s.bpf_program__section_name, ctypes.c_char_p, p)
        _sig(s.bpf_program__set_autoload, i, p, ctypes.c_bool)
        _sig(s.bpf_program__attach, p, p)
        _sig(s.bpf_program__attach_perf_event, p, p, i)
        _sig(s.bpf_program__attach_iter, p, p, p)  # opts NULL: every object of the iterator's kind
        _sig(s.bpf_iter_create, i, i)  # link fd -> a new iterator's fd: reading it runs the program
        _sig(s.bpf_program__fd, i, p)
        _sig(s.bpf_link__destroy, i, p)
        _sig(s.bpf_link__fd, i, p)
        _sig(s.btf__find_by_name_kind, i, p, ctypes.c_char_p, u32)
        _sig(s.btf__type_by_id, ctypes.POINTER(BtfType), p, u32)
        _sig(s.btf__name_by_offset, ctypes.c_char_p, p, u32)
        _sig(s.bpf_map_lookup_elem, i, i, p, p)
        _sig(s.bpf_map_delete_elem, i, i, p)
        _sig(s.bpf_map_update_elem, i, i, p, p, ctypes.c_uint64)
        _sig(s.bpf_map_lookup_batch, i, i, p, p, p, p, ctypes.POINTER(u32), p)
        _sig(s.bpf_map_lookup_and_delete_batch, i, i, p, p, p, p, ctypes.POINTER(u32), p)
        _sig(s.libbpf_num_possible_cpus, i)
        _sig(s.libbpf_probe_bpf_map_type, i, i, p)
        _sig(s.libbpf_major_version, u32)
        _sig(s.libbpf_minor_version, u32)
        _sig(s.bpf_obj_get_info_by_fd, i, i, p, ctypes.POINTER(u32))  # libbpf 1.1 has no prog-specific one

    # -- logging -------------------------------------------------------------

    def _on_print(self, level: int, fmt: bytes, args: int) -> int:
        try:
            saved = ctypes.create_string_buffer(_VA_LIST_TAG_SIZE)
            ctypes.memmove(saved, args, _VA_LIST_TAG_SIZE)
            need = self._libc.vsnprintf(None, 0, fmt, ctypes.addressof(saved))
            buf = ctypes.create_string_buffer(max(need, 0) + 1)
            self._libc.vsnprintf(buf, len(buf), fmt, args)
            text = buf.value.decode("utf-8", "replace").rstrip("\n")
        except Exception:  # a logging failure must never unwind into C
            return 0
        for line in text.splitlines():
            self.recent_log.append(line)
        py_level = {LIBBPF_WARN: logging.WARNING, LIBBPF_INFO: logging.INFO}.get(level, logging.DEBUG)
        # libbpf's own "info" chatter is debug detail for a ksift user.
        log.log(logging.DEBUG if py_level == logging.INFO else py_level, "%s", text)
        return 0

    def take_log(self) -> str:
        text = "\n".join(self.recent_log)
        self.recent_log.clear()
        return text

    # -- helpers -------------------------------------------------------------

    @staticmethod
    def check_ptr(ptr: int | None, what: str) -> int:
        if not ptr:
            err = ctypes.get_errno() or errno_mod.EINVAL
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return ptr

    @staticmethod
    def check_int(ret: int, what: str) -> int:
        if ret < 0:
            err = -ret if ret != -1 else (ctypes.get_errno() or errno_mod.EINVAL)
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return ret

    def iter_maps(self, obj: int):
        m = self.so.bpf_object__next_map(obj, None)
        while m:
            yield m
            m = self.so.bpf_object__next_map(obj, m)

    def iter_programs(self, obj: int):
        prog = self.so.bpf_object__next_program(obj, None)
        while prog:
            yield prog
            prog = self.so.bpf_object__next_program(obj, prog)

    def datasec_vars(self, obj: int, section: str) -> dict[str, tuple[int, int]]:
        """Variables of one data section (e.g. .rodata) as name -> (offset, size), from BTF."""
        btf = self.so.bpf_object__btf(obj)
        if not btf:
            return {}
        type_id = self.so.btf__find_by_name_kind(btf, section.encode(), BTF_KIND_DATASEC)
        if type_id < 0:
            return {}
        sec = self.so.btf__type_by_id(btf, type_id)
        vlen = sec.contents.info & 0xFFFF
        base = ctypes.cast(sec, ctypes.c_void_p).value + ctypes.sizeof(BtfType)
        infos = (BtfVarSecinfo * vlen).from_address(base)
        out = {}
        for info in infos:
            var = self.so.btf__type_by_id(btf, info.type).contents
            if (var.info >> 24) & 0x1F != BTF_KIND_VAR:
                continue
            name = self.so.btf__name_by_offset(btf, var.name_off).decode()
            out[name] = (info.offset, info.size)
        return out

    def perf_event_open_cpu_clock(self, cpu: int, sample_hz: int) -> int:
        """A disabled cpu-clock sampling event on one CPU (every task on it), sample_hz per second.

        Returns the event's fd (close-on-exec); raises OSError naming the CPU and the rate.
        """
        attr = PerfEventAttr(type=PERF_TYPE_SOFTWARE, size=ctypes.sizeof(PerfEventAttr),
                             config=PERF_COUNT_SW_CPU_CLOCK, sample_period_or_freq=sample_hz,
                             flags=PERF_ATTR_FLAG_DISABLED | PERF_ATTR_FLAG_FREQ)
        fd = self._libc.syscall(ctypes.c_long(SYS_PERF_EVENT_OPEN), ctypes.byref(attr), ctypes.c_int(-1),
                                ctypes.c_int(cpu), ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno() or errno_mod.EINVAL
            raise OSError(err, f"perf_event_open(cpu-clock, cpu {cpu}, {sample_hz} Hz): {os.strerror(err)}")
        return fd

    def num_possible_cpus(self) -> int:
        return self.check_int(self.so.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")
