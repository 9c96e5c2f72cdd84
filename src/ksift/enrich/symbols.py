"""Stack addresses to function names: user frames through /proc/<pid>/maps and the
ELF symbol tables of the mapped files, kernel frames through /proc/kallsyms.

User space: an address falls in one executable mapping of the process; the
mapping gives the file and the file offset, the file's PT_LOAD segments turn
that offset into the ELF virtual address, and the symbol table (.symtab, else
.dynsym, else the .symtab of a separate debug file found by build-id) names
the function there. The same arithmetic serves PIE executables, shared
libraries and non-PIE executables (mapped at their link address). Parsed files
are cached, bounded, by build-id (by device + inode + mtime when a file has
none), so one library shared by many processes, or by several containers, is
read once.

A process may be gone when its stack is symbolized: its maps are remembered
(bounded) from the last time it was seen alive, and what cannot be resolved
stays a raw address. Unknown symbols become "file+0xADDR", where ADDR is the
ELF virtual address (what `addr2line -e file` takes), or the file offset when
the file itself could not be read.

Kernel: /proc/kallsyms read once, on first use, and searched by bisection. As
non-root (or with kptr_restrict) it shows zero addresses; frames then stay raw.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ksift.enrich.procfs import ProcFS
from ksift.errors import AccessDenied, ProcessGone

log = logging.getLogger("ksift.enrich.symbols")

_FUNCTION_TYPES = ("STT_FUNC", "STT_GNU_IFUNC")
# "address type name [module]": text symbols only (t, T; w, W are weak ones).
_KALLSYMS_TEXT_RE = re.compile(rb"^([0-9a-fA-F]+) [tTwW] (\S+)", re.M)
# A kernel address this far past the nearest symbol is in no function we know.
_KERNEL_MAX_DISTANCE = 1 << 20
# Symbols of size 0 (hand-written assembly) cover up to the next symbol, within reason.
_SIZELESS_MAX_SPAN = 1 << 16
_DELETED_SUFFIX = " (deleted)"


# -- /proc/<pid>/maps ------------------------------------------------------


@dataclass(frozen=True)
class Mapping:
    """One executable mapping of a process."""

    start: int
    end: int
    offset: int  # file offset of start
    dev: tuple[int, int]  # (major, minor) of the file's device
    inode: int
    path: str  # file path in the process's mount namespace, or "[vdso]", or "" (anonymous)

    @property
    def is_file(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")


def parse_maps(text: str) -> list[Mapping]:
    """The executable mappings of a /proc/<pid>/maps text, sorted by address.

    Lines that do not parse are skipped (maps is written by the kernel; a bad
    line means a format we do not know, not a reason to lose the rest).
    """
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5 or "x" not in parts[1]:
            continue
        try:
            lo, _, hi = parts[0].partition("-")
            major, _, minor = parts[3].partition(":")
            path = parts[5].strip() if len(parts) > 5 else ""
            if path.endswith(_DELETED_SUFFIX):
                path = path[: -len(_DELETED_SUFFIX)]
            out.append(Mapping(int(lo, 16), int(hi, 16), int(parts[2], 16), (int(major, 16), int(minor, 16)),
                               int(parts[4]), path))
        except ValueError:
            continue
    out.sort(key=lambda m: m.start)
    return out


def find_mapping(maps: Sequence[Mapping], starts: Sequence[int], address: int) -> Mapping | None:
    """The mapping holding address; starts[i] is maps[i].start."""
    i = bisect.bisect_right(starts, address) - 1
    if i >= 0 and maps[i].start <= address < maps[i].end:
        return maps[i]
    return None


# -- ELF files -------------------------------------------------------------


@dataclass(frozen=True)
class ElfSymbols:
    """The function symbols and loadable segments of one ELF file."""

    path: str
    build_id: str | None
    segments: tuple[tuple[int, int, int], ...]  # (p_offset, p_filesz, p_vaddr) of each PT_LOAD
    starts: tuple[int, ...]  # sorted function start addresses
    ends: tuple[int, ...]  # start + size (size 0: up to the next symbol)
    names: tuple[str, ...]
    table: str  # where the names came from: ".symtab", ".dynsym", "debug .symtab" or "none"

    def vaddr_of(self, file_offset: int) -> int | None:
        """The ELF virtual address of a file offset, through the PT_LOAD segment holding it."""
        for p_offset, p_filesz, p_vaddr in self.segments:
            if p_offset <= file_offset < p_offset + p_filesz:
                return p_vaddr + file_offset - p_offset
        return None

    def lookup(self, vaddr: int) -> str | None:
        """The function containing vaddr, or None."""
        i = bisect.bisect_right(self.starts, vaddr) - 1
        # Aliases and nested symbols share starts: look back a little for one that covers vaddr.
        for j in range(i, max(i - 4, -1), -1):
            if self.starts[j] <= vaddr < self.ends[j]:
                return self.names[j]
        return None


def read_build_id(elf) -> str | None:
    """The GNU build-id (hex) from an open pyelftools ELFFile, or None."""
    for section in elf.iter_sections():
        if section["sh_type"] != "SHT_NOTE":
            continue
        for note in section.iter_notes():
            if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                return str(note["n_desc"])
    return None


# Elf64_Sym as it sits in a little-endian file: decoded as one array, not one
# pyelftools object per symbol (a large binary has 100k+ of them: that cost
# the agent tens of MiB and half a second per file).
_ELF64_SYM = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                       ("value", "<u8"), ("size", "<u8")])
_STT_FUNC, _STT_GNU_IFUNC = 2, 10


def _functions(elf, section_name: str, max_symbols: int) -> list[tuple[int, int, str]]:
    section = elf.get_section_by_name(section_name)
    if section is None or not hasattr(section, "iter_symbols"):
        return []
    if elf.elfclass == 64 and elf.little_endian and section["sh_entsize"] == _ELF64_SYM.itemsize:
        return _functions_array(elf, section, section_name, max_symbols)
    out = []
    for i, sym in enumerate(section.iter_symbols()):
        if i >= max_symbols:
            log.warning("%s: more than %d symbols in %s, the rest ignored", elf.stream.name, max_symbols,
                        section_name)
            break
        if sym["st_info"]["type"] in _FUNCTION_TYPES and sym["st_value"] and sym["st_shndx"] != "SHN_UNDEF":
            if sym.name:
                out.append((int(sym["st_value"]), int(sym["st_size"]), sym.name))
    return out


def _functions_array(elf, section, section_name: str, max_symbols: int) -> list[tuple[int, int, str]]:
    """The function symbols of a 64-bit little-endian symbol table, decoded in bulk."""
    raw = section.data()
    syms = np.frombuffer(raw, dtype=_ELF64_SYM, count=len(raw) // _ELF64_SYM.itemsize)
    if len(syms) > max_symbols:
        log.warning("%s: more than %d symbols in %s, the rest ignored", elf.stream.name, max_symbols, section_name)
        syms = syms[:max_symbols]
    kind = syms["info"] & 0xF
    funcs = syms[((kind == _STT_FUNC) | (kind == _STT_GNU_IFUNC)) & (syms["value"] != 0) & (syms["shndx"] != 0)
                 & (syms["name"] != 0)]
    strtab = elf.get_section(section["sh_link"]).data()
    out = []
    for offset, value, size in zip(funcs["name"].tolist(), funcs["value"].tolist(), funcs["size"].tolist()):
        end = strtab.find(b"\0", offset)
        name = strtab[offset:end if end >= 0 else len(strtab)].decode("utf-8", "replace")
        if name:
            out.append((value, size, name))
    return out


def _symbol_arrays(funcs: list[tuple[int, int, str]]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...]]:
    # One entry per start address (the first name wins: versioned aliases add nothing).
    funcs.sort(key=lambda f: (f[0], -f[1]))
    starts, sizes, names = [], [], []
    for start, size, name in funcs:
        if starts and starts[-1] == start:
            continue
        starts.append(start)
        sizes.append(size)
        names.append(name)
    ends = []
    for i, (start, size) in enumerate(zip(starts, sizes)):
        if size > 0:
            ends.append(start + size)
        else:
            following = starts[i + 1] if i + 1 < len(starts) else start + _SIZELESS_MAX_SPAN
            ends.append(min(following, start + _SIZELESS_MAX_SPAN))
    return tuple(starts), tuple(ends), tuple(names)


def load_elf_symbols(path: str, build_id: str | None = None, elf=None, debug_root: str | None = None,
                     max_symbols: int = 500_000) -> ElfSymbols:
    """Read one ELF file's segments and function symbols.

    Raises OSError if the file cannot be read and ValueError if it is not a usable ELF file.
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    fh = None
    try:
        if elf is None:
            fh = open(path, "rb")
            elf = ELFFile(fh)
        if build_id is None:
            build_id = read_build_id(elf)
        segments = tuple((int(s["p_offset"]), int(s["p_filesz"]), int(s["p_vaddr"]))
                         for s in elf.iter_segments() if s["p_type"] == "PT_LOAD")
        funcs, table = _functions(elf, ".symtab", max_symbols), ".symtab"
        if not funcs and build_id and debug_root:
            funcs, table = _debug_file_functions(debug_root, build_id, max_symbols), "debug .symtab"
        if not funcs:
            funcs, table = _functions(elf, ".dynsym", max_symbols), ".dynsym"
        if not funcs:
            table = "none"
    except ELFError as exc:
        raise ValueError(f"{path}: not a usable ELF file: {exc}") from exc
    finally:
        if fh is not None:
            fh.close()
    starts, ends, names = _symbol_arrays(funcs)
    return ElfSymbols(path, build_id, segments, starts, ends, names, table)


def _debug_file_functions(debug_root: str, build_id: str, max_symbols: int) -> list[tuple[int, int, str]]:
    """The .symtab of /usr/lib/debug/.build-id/xx/yyyy.debug (distro -dbg/-dbgsym packages), if installed."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    path = os.path.join(debug_root, ".build-id", build_id[:2], build_id[2:] + ".debug")
    try:
        with open(path, "rb") as fh:
            return _functions(ELFFile(fh), ".symtab", max_symbols)
    except (OSError, ELFError):
        return []


class ElfCache:
    """Parsed ELF files, bounded (least recently used first out).

    Keyed by build-id, or by (device, inode, mtime) for files without one; an
    index from the file's identity to that key spares re-reading a file we
    already know. Files that are not usable ELF are remembered as such.
    """

    def __init__(self, max_files: int = 64, debug_root: str | None = "/usr/lib/debug"):
        if max_files < 1:
            raise ValueError("max_files must be at least 1")
        self.max_files = max_files
        self.debug_root = debug_root
        self._by_file: OrderedDict[tuple[int, int, int], str | None] = OrderedDict()
        self._symbols: OrderedDict[str, ElfSymbols] = OrderedDict()
        self.loads = 0  # files parsed (a cache miss each)

    def __len__(self) -> int:
        return len(self._symbols)

    def get(self, path: str) -> ElfSymbols | None:
        """The symbols of the file at path, or None if it cannot be read or is not ELF."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        identity = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if identity in self._by_file:
            self._by_file.move_to_end(identity)
            key = self._by_file[identity]
            if key is None:
                return None
            cached = self._symbols.get(key)
            if cached is not None:
                self._symbols.move_to_end(key)
                return cached
        return self._load(path, identity)

    def _load(self, path: str, identity: tuple[int, int, int]) -> ElfSymbols | None:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile

        try:
            with open(path, "rb") as fh:
                elf = ELFFile(fh)
                build_id = read_build_id(elf)
                key = f"build-id:{build_id}" if build_id else "file:{}:{}:{}".format(*identity)
                symbols = self._symbols.get(key)
                if symbols is None:
                    symbols = load_elf_symbols(path, build_id, elf, self.debug_root)
                    self.loads += 1
        except (OSError, ELFError, ValueError) as exc:
            log.debug("cannot read symbols of %s: %s", path, exc)
            self._remember(identity, None)
            return None
        self._symbols[key] = symbols
        self._symbols.move_to_end(key)
        while len(self._symbols) > self.max_files:
            self._symbols.popitem(last=False)
        self._remember(identity, key)
        return symbols

    def _remember(self, identity: tuple[int, int, int], key: str | None) -> None:
        self._by_file[identity] = key
        self._by_file.move_to_end(identity)
        while len(self._by_file) > 4 * self.max_files:
            self._by_file.popitem(last=False)


# -- kernel ----------------------------------------------------------------


class KernelSymbols:
    """/proc/kallsyms text symbols, read once on first use (about half a second, ~5 MB kept)."""

    def __init__(self, path: str = "/proc/kallsyms"):
        self.path = path
        self._starts: np.ndarray | None = None  # sorted addresses
        self._offsets: np.ndarray | None = None  # where each name starts in _blob
        self._blob = b""

    @property
    def available(self) -> bool:
        self._ensure()
        return self._starts is not None and len(self._starts) > 0

    def _ensure(self) -> None:
        if self._starts is not None:
            return
        try:
            with open(self.path, "rb") as fh:
                text = fh.read()
        except OSError as exc:
            log.warning("cannot read kernel symbols from %s: %s; kernel frames stay addresses", self.path, exc)
            text = b""
        # One regex pass in C instead of a Python loop over ~120k lines.
        pairs = [(int(a, 16), n) for a, n in _KALLSYMS_TEXT_RE.findall(text)]
        pairs = [p for p in pairs if p[0]]
        if not pairs:
            log.info("%s shows no addresses (not root, or kptr_restrict): kernel frames stay addresses", self.path)
        pairs.sort()
        self._starts = np.fromiter((a for a, _ in pairs), dtype=np.uint64, count=len(pairs))
        lengths = np.fromiter((len(n) + 1 for _, n in pairs), dtype=np.int64, count=len(pairs))
        self._offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(pairs) else lengths
        self._blob = b"\n".join(n for _, n in pairs)

    def name(self, address: int) -> str | None:
        self._ensure()
        starts = self._starts
        if starts is None or not len(starts) or not 0 <= address < 1 << 64:
            return None
        i = int(np.searchsorted(starts, np.uint64(address), side="right")) - 1
        if i < 0 or address - int(starts[i]) > _KERNEL_MAX_DISTANCE:
            return None
        begin = int(self._offsets[i])
        end = self._blob.find(b"\n", begin)
        return self._blob[begin: end if end >= 0 else len(self._blob)].decode("utf-8", "replace")

    def frames(self, addresses: Iterable[int]) -> list[str]:
        return [self.name(a) or f"0x{a:x}" for a in addresses]


# -- processes -------------------------------------------------------------


@dataclass
class _ProcessMaps:
    start_boottime_ns: int | None
    maps: list[Mapping]
    starts: list[int]


class Symbolizer:
    """User and kernel stack frames as names, for the processes ksift alerts on.

    procfs: the /proc to read maps and mapped files from (injectable for tests).
    max_processes: how many processes' maps are remembered for when they are gone.
    """

    def __init__(self, procfs: ProcFS | None = None, kernel: KernelSymbols | None = None,
                 elf_cache: ElfCache | None = None, max_processes: int = 256):
        self.procfs = procfs or ProcFS()
        self.kernel_symbols = kernel or KernelSymbols()
        self.elf = elf_cache or ElfCache()
        self.max_processes = max_processes
        self._maps: OrderedDict[int, _ProcessMaps] = OrderedDict()

    # -- maps ---------------------------------------------------------------

    def remember(self, pid: int, start_boottime_ns: int | None = None) -> bool:
        """Read the process's maps now, while it lives; False if it is gone (or not the same process)."""
        if start_boottime_ns is not None and not self._same(pid, start_boottime_ns):
            return False
        try:
            with open(os.path.join(self.procfs.root, str(int(pid)), "maps"), encoding="utf-8",
                      errors="surrogateescape") as fh:
                maps = parse_maps(fh.read())
        except OSError:
            return False
        # A recycled pid may have been read between the check and the read: check again.
        if start_boottime_ns is not None and not self._same(pid, start_boottime_ns):
            return False
        self._maps[pid] = _ProcessMaps(start_boottime_ns, maps, [m.start for m in maps])
        self._maps.move_to_end(pid)
        while len(self._maps) > self.max_processes:
            self._maps.popitem(last=False)
        return True

    def forget(self, pid: int) -> None:
        self._maps.pop(pid, None)

    def _same(self, pid: int, start_boottime_ns: int) -> bool:
        try:
            return self.procfs.same_process(pid, start_boottime_ns)
        except (ProcessGone, AccessDenied):
            return False

    def _known(self, pid: int, start_boottime_ns: int | None) -> _ProcessMaps | None:
        known = self._maps.get(pid)
        if known is not None and start_boottime_ns is not None and known.start_boottime_ns is not None \
                and known.start_boottime_ns != start_boottime_ns:
            return None  # the maps of an earlier process with this pid
        return known

    # -- frames -------------------------------------------------------------

    def user_frames(self, pid: int, addresses: Sequence[int], start_boottime_ns: int | None = None) -> list[str]:
        """Names for a user stack (innermost first), as precise as what is still knowable."""
        known = self._known(pid, start_boottime_ns)
        if known is None or any(find_mapping(known.maps, known.starts, a) is None for a in addresses):
            # Unknown process, or code mapped since we last looked: read again if it lives.
            if self.remember(pid, start_boottime_ns):
                known = self._maps[pid]
        frames = []
        for i, address in enumerate(addresses):
            # A return address points after its call; the call itself is one byte back.
            lookup = address if i == 0 else address - 1
            mapping = find_mapping(known.maps, known.starts, lookup) if known else None
            frames.append(self._frame(pid, mapping, lookup) if mapping else f"0x{address:x}")
        return frames

    def kernel_frames(self, addresses: Sequence[int]) -> list[str]:
        """Names for a kernel stack; the first address is exact, the rest are return addresses."""
        return [self.kernel_symbols.name(a if i == 0 else a - 1) or f"0x{a:x}" for i, a in enumerate(addresses)]

    def _frame(self, pid: int, mapping: Mapping, address: int) -> str:
        file_offset = address - mapping.start + mapping.offset
        if not mapping.is_file:
            label = mapping.path or "anon"
            return f"{label}+0x{address - mapping.start:x}"
        name = os.path.basename(mapping.path)
        symbols = self._symbols_for(pid, mapping)
        if symbols is None:
            return f"{name}+0x{file_offset:x}"
        vaddr = symbols.vaddr_of(file_offset)
        if vaddr is None:
            return f"{name}+0x{file_offset:x}"
        return symbols.lookup(vaddr) or f"{name}+0x{vaddr:x}"

    def _symbols_for(self, pid: int, mapping: Mapping) -> ElfSymbols | None:
        """The mapped file itself: through map_files (exact, even if replaced on disk), the
        process's root (its mount namespace), else the host path if it is the same inode."""
        base = os.path.join(self.procfs.root, str(int(pid)))
        for path in (os.path.join(base, "map_files", f"{mapping.start:x}-{mapping.end:x}"),
                     base + "/root" + mapping.path):
            symbols = self.elf.get(path)
            if symbols is not None:
                return symbols
        try:
            st = os.stat(mapping.path)
        except OSError:
            return None
        if st.st_ino != mapping.inode or (os.major(st.st_dev), os.minor(st.st_dev)) != mapping.dev:
            return None  # a different file now has that path
        return self.elf.get(mapping.path)
