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

Kernel: /proc/kallsyms, one pass over it for each batch of addresses not seen
before (never held whole), the names found remembered, bounded. As non-root (or
with kptr_restrict) it shows zero addresses; frames then stay raw.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ksift import heap
from ksift.enrich.procfs import ProcFS
from ksift.errors import AccessDenied, ProcessGone

log = logging.getLogger("ksift.enrich.symbols")

_FUNCTION_TYPES = ("STT_FUNC", "STT_GNU_IFUNC")
# kallsyms lines "address type name[\tmodule]": text symbols only (t, T; w, W are weak ones).
_KALLSYMS_TEXT_TYPES = np.frombuffer(b"tTwW", dtype=np.uint8)
_KALLSYMS_BLOCK = 256 << 10  # bytes of /proc/kallsyms parsed at a time
_NL, _TAB, _SPACE = ord("\n"), ord("\t"), ord(" ")
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


@dataclass(frozen=True, eq=False)
class SymbolTable:
    """Sorted function symbols as arrays, not one Python object per symbol: a large binary or
    /proc/kallsyms has 100k+ of them, which as tuples and strings cost tens of MiB (and, while
    being built, more than that again)."""

    starts: np.ndarray  # uint64, sorted start addresses, one per address
    ends: np.ndarray  # uint64, start + size (size 0: up to the next symbol, within _SIZELESS_MAX_SPAN)
    name_offsets: np.ndarray  # uint32, where each name starts in blob
    blob: bytes  # the names, each ended by a NUL (an ELF file's string table as it is)

    @classmethod
    def empty(cls) -> SymbolTable:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.uint32), b"")

    def __len__(self) -> int:
        return len(self.starts)

    def name_at(self, i: int) -> str:
        begin = int(self.name_offsets[i])
        end = self.blob.find(b"\0", begin)
        return self.blob[begin: end if end >= 0 else len(self.blob)].decode("utf-8", "replace")

    def names(self) -> list[str]:
        return [self.name_at(i) for i in range(len(self))]

    def index(self, address: int) -> int:
        """The index of the last symbol starting at or before address, or -1."""
        if not 0 <= address < 1 << 64 or not len(self.starts):
            return -1
        return int(np.searchsorted(self.starts, np.uint64(address), side="right")) - 1


def symbol_table(starts: np.ndarray, sizes: np.ndarray, names: np.ndarray, blob: bytes,
                 max_span: int = _SIZELESS_MAX_SPAN) -> SymbolTable:
    """A SymbolTable from unsorted symbols: start addresses, sizes, and where their names
    start in blob (each ended by a NUL). At one start address the largest size wins, then
    the first name (versioned aliases add nothing); a symbol of size 0 ends at the next one,
    or max_span after its start."""
    if sizes.any():
        order = np.lexsort((np.arange(len(starts)), -sizes.astype(np.int64), starts))
    else:  # kallsyms: no sizes, so the order of the file among equal starts
        order = np.argsort(starts, kind="stable")
    starts, sizes = starts[order].astype(np.uint64), sizes[order].astype(np.uint64)
    keep = np.ones(len(starts), dtype=bool)
    keep[1:] = starts[1:] != starts[:-1]
    order, starts, sizes = order[keep], starts[keep], sizes[keep]
    span = np.uint64(max_span)
    following = np.empty_like(starts)
    following[:-1] = starts[1:]
    following[-1:] = starts[-1:] + span
    ends = np.where(sizes > 0, starts + sizes, np.minimum(following, starts + span))
    return SymbolTable(starts, ends, names[order].astype(np.uint32), blob)


@dataclass(frozen=True)
class ElfSymbols:
    """The function symbols and loadable segments of one ELF file."""

    path: str
    build_id: str | None
    segments: tuple[tuple[int, int, int], ...]  # (p_offset, p_filesz, p_vaddr) of each PT_LOAD
    symbols: SymbolTable
    table: str  # where the names came from: ".symtab", ".dynsym", "debug .symtab" or "none"

    @property
    def names(self) -> list[str]:
        return self.symbols.names()

    def vaddr_of(self, file_offset: int) -> int | None:
        """The ELF virtual address of a file offset, through the PT_LOAD segment holding it."""
        for p_offset, p_filesz, p_vaddr in self.segments:
            if p_offset <= file_offset < p_offset + p_filesz:
                return p_vaddr + file_offset - p_offset
        return None

    def lookup(self, vaddr: int) -> str | None:
        """The function containing vaddr, or None."""
        table = self.symbols
        i = table.index(vaddr)
        # Aliases and nested symbols share starts: look back a little for one that covers vaddr.
        for j in range(i, max(i - 4, -1), -1):
            if int(table.starts[j]) <= vaddr < int(table.ends[j]):
                return table.name_at(j)
        return None


# -- reading ELF files -------------------------------------------------------
#
# 64-bit little-endian files (every binary on the x86-64 hosts ksift runs on) are read here, a
# few preads each: their headers, the PT_LOAD segments, the build-id note and one symbol table as
# numpy arrays. pyelftools reads the rest (32-bit, big-endian), imported only then: it costs
# ~2.7 MiB resident with what it imports (its DWARF readers, construct, even pdb), which the
# agent would otherwise keep from its first symbolized stack on.

_EHDR64 = np.dtype([("ident", "V16"), ("type", "<u2"), ("machine", "<u2"), ("version", "<u4"), ("entry", "<u8"),
                    ("phoff", "<u8"), ("shoff", "<u8"), ("flags", "<u4"), ("ehsize", "<u2"), ("phentsize", "<u2"),
                    ("phnum", "<u2"), ("shentsize", "<u2"), ("shnum", "<u2"), ("shstrndx", "<u2")])
_PHDR64 = np.dtype([("type", "<u4"), ("flags", "<u4"), ("offset", "<u8"), ("vaddr", "<u8"), ("paddr", "<u8"),
                    ("filesz", "<u8"), ("memsz", "<u8"), ("align", "<u8")])
_SHDR64 = np.dtype([("name", "<u4"), ("type", "<u4"), ("flags", "<u8"), ("addr", "<u8"), ("offset", "<u8"),
                    ("size", "<u8"), ("link", "<u4"), ("info", "<u4"), ("addralign", "<u8"), ("entsize", "<u8")])
_PT_LOAD, _SHT_NOTE, _SHT_NOBITS, _NT_GNU_BUILD_ID = 1, 7, 8, 3
_SHN_XINDEX = 0xFFFF
_MAX_SECTION_BYTES = 1 << 30  # a section claiming more is a corrupt header, not one to read


class ElfFile:
    """The parts of a 64-bit little-endian ELF file that symbolization needs.

    Raises ValueError for anything else (NotElf64 for another ELF class or byte order)."""

    def __init__(self, fh):
        self.fh = fh
        self.name = getattr(fh, "name", "?")
        raw = self._read(0, _EHDR64.itemsize)
        if len(raw) < _EHDR64.itemsize or raw[:4] != b"\x7fELF":
            raise ValueError("no ELF header")
        if raw[4:6] != b"\x02\x01":
            raise NotElf64("not a 64-bit little-endian ELF file")
        hdr = np.frombuffer(raw, dtype=_EHDR64)[0]
        self.segments: tuple[tuple[int, int, int], ...] = ()
        if int(hdr["phnum"]) and int(hdr["phentsize"]) == _PHDR64.itemsize:
            ph = self._table(int(hdr["phoff"]), int(hdr["phnum"]), _PHDR64)
            self.segments = tuple((int(p["offset"]), int(p["filesz"]), int(p["vaddr"]))
                                  for p in ph[ph["type"] == _PT_LOAD])
        self.sections = np.zeros(0, dtype=_SHDR64)
        self.section_names: list[bytes] = []
        if int(hdr["shoff"]) and int(hdr["shentsize"]) == _SHDR64.itemsize:
            count, names_at = int(hdr["shnum"]), int(hdr["shstrndx"])
            first = self._table(int(hdr["shoff"]), 1, _SHDR64)
            if count == 0 and len(first):  # more sections than e_shnum holds: the count is in section 0
                count = int(first[0]["size"])
            if names_at == _SHN_XINDEX and len(first):
                names_at = int(first[0]["link"])
            self.sections = self._table(int(hdr["shoff"]), count, _SHDR64)
            names = self.data(names_at) if names_at < len(self.sections) else b""
            self.section_names = [names[n:names.find(b"\0", n)] if names.find(b"\0", n) >= 0 else names[n:]
                                  for n in self.sections["name"].tolist()]

    def _read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fh.fileno(), size, offset)

    def _table(self, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
        if count * dtype.itemsize > _MAX_SECTION_BYTES:
            raise ValueError(f"a table of {count} entries")
        raw = self._read(offset, count * dtype.itemsize)
        return np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)

    def section(self, name: bytes) -> int | None:
        """The index of the first section of that name, or None."""
        try:
            return self.section_names.index(name)
        except ValueError:
            return None

    def data(self, index: int) -> bytes:
        sh = self.sections[index]
        if int(sh["type"]) == _SHT_NOBITS:
            return b""
        size = int(sh["size"])
        if size > _MAX_SECTION_BYTES:
            raise ValueError(f"section {index} claims {size} bytes")
        return self._read(int(sh["offset"]), size)

    def build_id(self) -> str | None:
        """The GNU build-id (hex) from the note sections, or None."""
        for i in np.flatnonzero(self.sections["type"] == _SHT_NOTE).tolist():
            notes, at = self.data(i), 0
            while at + 12 <= len(notes):
                namesz, descsz, kind = np.frombuffer(notes, dtype="<u4", count=3, offset=at).tolist()
                name_at = at + 12
                desc_at = name_at + (namesz + 3) // 4 * 4
                if kind == _NT_GNU_BUILD_ID and notes[name_at:name_at + namesz] == b"GNU\0":
                    return notes[desc_at:desc_at + descsz].hex() or None
                at = desc_at + (descsz + 3) // 4 * 4
        return None

    def functions(self, section_name: str, max_symbols: int) -> _Functions | None:
        """The function symbols of one symbol table (.symtab, .dynsym), or None if it has none."""
        index = self.section(section_name.encode())
        if index is None or int(self.sections[index]["entsize"]) != _ELF64_SYM.itemsize:
            return None
        link = int(self.sections[index]["link"])
        if not 0 < link < len(self.sections):
            return None
        found = _function_symbols(self.name, self.data(index), self.data(link), section_name, max_symbols)
        return found if len(found[0]) else None


class NotElf64(ValueError):
    """An ELF file of another class or byte order: pyelftools reads it."""


class _ElfToolsFile:
    """The same interface as ElfFile, through pyelftools (32-bit and big-endian files)."""

    def __init__(self, fh):
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile

        try:
            self.elf = ELFFile(fh)
            self.segments = tuple((int(s["p_offset"]), int(s["p_filesz"]), int(s["p_vaddr"]))
                                  for s in self.elf.iter_segments() if s["p_type"] == "PT_LOAD")
        except ELFError as exc:
            raise ValueError(str(exc)) from exc

    def build_id(self) -> str | None:
        for section in self.elf.iter_sections():
            if section["sh_type"] != "SHT_NOTE":
                continue
            for note in section.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                    return str(note["n_desc"])
        return None

    def functions(self, section_name: str, max_symbols: int) -> _Functions | None:
        section = self.elf.get_section_by_name(section_name)
        if section is None or not hasattr(section, "iter_symbols"):
            return None
        starts, sizes, names, strings = [], [], [], bytearray()
        for i, sym in enumerate(section.iter_symbols()):
            if i >= max_symbols:
                log.warning("%s: more than %d symbols in %s, the rest ignored", self.elf.stream.name, max_symbols,
                            section_name)
                break
            if sym["st_info"]["type"] in _FUNCTION_TYPES and sym["st_value"] and sym["st_shndx"] != "SHN_UNDEF":
                if sym.name:
                    starts.append(int(sym["st_value"]))
                    sizes.append(int(sym["st_size"]))
                    names.append(len(strings))
                    strings += sym.name.encode("utf-8", "surrogateescape") + b"\0"
        if not starts:
            return None
        return (np.array(starts, dtype=np.uint64), np.array(sizes, dtype=np.uint64), np.array(names, dtype=np.int64),
                bytes(strings))


def open_elf(fh) -> ElfFile | _ElfToolsFile:
    """An ELF file's reader: ElfFile, or pyelftools for what it does not read. ValueError if not ELF."""
    try:
        return ElfFile(fh)
    except NotElf64:
        fh.seek(0)
        return _ElfToolsFile(fh)


# Elf64_Sym as it sits in a little-endian file: decoded as one array, not one
# object per symbol (a large binary has 100k+ of them: that cost the agent tens
# of MiB and half a second per file).
_ELF64_SYM = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                       ("value", "<u8"), ("size", "<u8")])
_STT_FUNC, _STT_GNU_IFUNC = 2, 10

# Function symbols of one table: start addresses, sizes, and where their names start in the
# string table (NUL-ended), with that string table: symbol_table's input.
_Functions = tuple[np.ndarray, np.ndarray, np.ndarray, bytes]


def _function_symbols(path: str, raw: bytes, strtab: bytes, section_name: str, max_symbols: int) -> _Functions:
    """The function symbols of a 64-bit little-endian symbol table, decoded in bulk."""
    syms = np.frombuffer(raw, dtype=_ELF64_SYM, count=len(raw) // _ELF64_SYM.itemsize)
    if len(syms) > max_symbols:
        log.warning("%s: more than %d symbols in %s, the rest ignored", path, max_symbols, section_name)
        syms = syms[:max_symbols]
    kind = syms["info"] & 0xF
    funcs = syms[((kind == _STT_FUNC) | (kind == _STT_GNU_IFUNC)) & (syms["value"] != 0) & (syms["shndx"] != 0)
                 & (syms["name"] != 0) & (syms["name"] < len(strtab))]
    if strtab[-1:] != b"\0":
        strtab += b"\0"  # every name NUL-ended, even the last of a table cut short
    return (funcs["value"].astype(np.uint64), funcs["size"].astype(np.uint64), funcs["name"].astype(np.int64),
            strtab)


def load_elf_symbols(path: str, build_id: str | None = None, elf=None, debug_root: str | None = None,
                     max_symbols: int = 500_000) -> ElfSymbols:
    """Read one ELF file's segments and function symbols (elf: the file already open with open_elf).

    Raises OSError if the file cannot be read and ValueError if it is not a usable ELF file.
    """
    fh = None
    try:
        if elf is None:
            fh = open(path, "rb")
            elf = open_elf(fh)
        if build_id is None:
            build_id = elf.build_id()
        funcs, table = elf.functions(".symtab", max_symbols), ".symtab"
        if funcs is None and build_id and debug_root:
            funcs, table = _debug_file_functions(debug_root, build_id, max_symbols), "debug .symtab"
        if funcs is None:
            funcs, table = elf.functions(".dynsym", max_symbols), ".dynsym"
        if funcs is None:
            table = "none"
    except ValueError as exc:
        raise ValueError(f"{path}: not a usable ELF file: {exc}") from exc
    finally:
        if fh is not None:
            fh.close()
    return ElfSymbols(path, build_id, elf.segments, symbol_table(*funcs) if funcs else SymbolTable.empty(), table)


def _debug_file_functions(debug_root: str, build_id: str, max_symbols: int) -> _Functions | None:
    """The .symtab of /usr/lib/debug/.build-id/xx/yyyy.debug (distro -dbg/-dbgsym packages), if installed."""
    path = os.path.join(debug_root, ".build-id", build_id[:2], build_id[2:] + ".debug")
    try:
        with open(path, "rb") as fh:
            return open_elf(fh).functions(".symtab", max_symbols)
    except (OSError, ValueError):
        return None


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
        try:
            with open(path, "rb") as fh:
                elf = open_elf(fh)
                build_id = elf.build_id()
                key = f"build-id:{build_id}" if build_id else "file:{}:{}:{}".format(*identity)
                symbols = self._symbols.get(key)
                if symbols is None:
                    symbols = load_elf_symbols(path, build_id, elf, self.debug_root)
                    self.loads += 1
                    heap.release_free()  # the section data read to build it
        except (OSError, ValueError) as exc:
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
    """Kernel addresses to names, from /proc/kallsyms's text symbols (t, T, w, W).

    The file is never held: it is ~5 MB and ~120k lines here, and held as a table (even as
    arrays) it kept ~5 MiB in the agent from its first kernel stack on, and reading it whole
    took ~7 MiB more for a moment. Instead each batch of addresses not seen before is looked
    up in one pass over the file, a 256 KiB block at a time, parsed with numpy (~0.1 s), and
    the names found are remembered (bounded): a hot process's kernel stacks repeat, so a pass
    is needed only when new code shows up in them.
    """

    def __init__(self, path: str = "/proc/kallsyms", max_cached: int = 4096):
        self.path = path
        self.max_cached = max_cached
        self.passes = 0  # passes over the file
        self._names: OrderedDict[int, str | None] = OrderedDict()
        self._available: bool | None = None

    @property
    def available(self) -> bool:
        """Whether the file shows addresses (root, no kptr_restrict); read once."""
        if self._available is None:
            self._available = False
            try:
                with open(self.path, "rb") as fh:
                    block = fh.read(_KALLSYMS_BLOCK)
                block = block[:block.rfind(b"\n") + 1] or block
                self._available = bool(len(_kallsyms_block(block)[0]))
            except (OSError, ValueError) as exc:
                log.warning("cannot read kernel symbols from %s: %s; kernel frames stay addresses", self.path, exc)
                return False
            if not self._available:
                log.info("%s shows no addresses (not root, or kptr_restrict): kernel frames stay addresses",
                         self.path)
        return self._available

    def resolve(self, addresses: Iterable[int]) -> None:
        """Look up, in one pass, every address not looked up before."""
        wanted = sorted({a for a in addresses if 0 <= a < 1 << 64 and a not in self._names})
        if not wanted or not self.available:
            return
        try:
            found = _kallsyms_lookup(self.path, np.array(wanted, dtype=np.uint64))
        except (OSError, ValueError) as exc:
            log.warning("cannot read kernel symbols from %s: %s; kernel frames stay addresses", self.path, exc)
            return
        finally:
            self.passes += 1
        for address, name in zip(wanted, found):
            self._names[address] = name
        while len(self._names) > self.max_cached:
            self._names.popitem(last=False)

    def name(self, address: int) -> str | None:
        if address not in self._names:
            self.resolve([address])
        name = self._names.get(address)
        if address in self._names:
            self._names.move_to_end(address)
        return name

    def frames(self, addresses: Iterable[int]) -> list[str]:
        addresses = list(addresses)
        self.resolve(addresses)
        return [self.name(a) or f"0x{a:x}" for a in addresses]


def _kallsyms_lookup(path: str, wanted: np.ndarray) -> list[str | None]:
    """For each address (uint64, sorted), the text symbol it falls in: the last one starting at or
    before it (the first in the file among symbols at one address), within _KERNEL_MAX_DISTANCE."""
    best = np.zeros(len(wanted), dtype=np.uint64)  # the best start so far (found: one was)
    found = np.zeros(len(wanted), dtype=bool)
    names: list[bytes | None] = [None] * len(wanted)
    rest = b""
    with open(path, "rb") as fh:
        while True:
            data = fh.read(_KALLSYMS_BLOCK)
            block = rest + data
            cut = block.rfind(b"\n") + 1 if data else len(block)
            rest = block[cut:]
            if cut:
                block = block[:cut]
                starts, begins, ends = _kallsyms_block(block)
                if len(starts):
                    order = np.argsort(starts, kind="stable")
                    ordered = starts[order]
                    at = np.searchsorted(ordered, wanted, side="right") - 1
                    hit = at >= 0
                    start = np.where(hit, ordered[np.maximum(at, 0)], 0)
                    # A later symbol at the same start does not replace an earlier one.
                    better = hit & (~found | (start > best))
                    for i in np.flatnonzero(better).tolist():
                        first = order[int(np.searchsorted(ordered, start[i], side="left"))]
                        names[i] = block[int(begins[first]):int(ends[first])]
                        best[i], found[i] = start[i], True
            if not data:
                break
    near = found & (wanted - best <= np.uint64(_KERNEL_MAX_DISTANCE))
    return [n.decode("utf-8", "replace") if ok and n is not None else None for n, ok in zip(names, near.tolist())]


def _kallsyms_block(block: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole lines "ADDRESS TYPE NAME[\tMODULE]": the text symbols with a non-zero address, as
    (addresses, where each name begins and ends in the block)."""
    buf = np.frombuffer(block, dtype=np.uint8)
    line_ends = np.flatnonzero(buf == _NL)
    if block[-1:] != b"\n":
        line_ends = np.append(line_ends, len(buf))
    starts = np.zeros(len(line_ends), dtype=np.int64)
    starts[1:] = line_ends[:-1] + 1
    width = block.find(b" ")  # hex digits of an address: 16 on a 64-bit kernel
    if width not in (8, 16):
        raise ValueError(f"not a kallsyms line: {block[:80]!r}")
    whole = line_ends - starts > width + 3
    starts, line_ends = starts[whole], line_ends[whole]
    text = ((buf[starts + width] == _SPACE) & (buf[starts + width + 2] == _SPACE)
            & np.isin(buf[starts + width + 1], _KALLSYMS_TEXT_TYPES))
    starts, line_ends = starts[text], line_ends[text]
    digits = buf[starts[:, None] + np.arange(width)].tobytes().decode("ascii")  # ValueError if not ASCII
    addresses = np.frombuffer(bytes.fromhex(digits), dtype=f">u{width // 2}").astype(np.uint64)
    named = addresses != 0
    begins = starts[named] + width + 3
    # A module's symbol is followed by a tab and [module].
    tabs = np.flatnonzero(buf == _TAB)
    ends = line_ends[named]
    if len(tabs):
        after = np.searchsorted(tabs, begins)
        ends = np.minimum(ends, np.where(after < len(tabs), tabs[np.minimum(after, len(tabs) - 1)], len(buf)))
    return addresses[named], begins, ends


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
        lookups = [a if i == 0 else a - 1 for i, a in enumerate(addresses)]
        self.kernel_symbols.resolve(lookups)
        return [self.kernel_symbols.name(k) or f"0x{a:x}" for k, a in zip(lookups, addresses)]

    def prepare_kernel(self, stacks: Iterable[Sequence[int]]) -> None:
        """Look up every frame of these kernel stacks at once (one pass over /proc/kallsyms), so
        that kernel_frames() of each finds them known."""
        self.kernel_symbols.resolve(a if i == 0 else a - 1 for stack in stacks for i, a in enumerate(stack))

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
