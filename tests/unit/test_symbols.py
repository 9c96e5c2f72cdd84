"""Symbolization against real ELF files built here with gcc, and against real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ksift.enrich.procfs import ProcFS
from ksift.enrich.symbols import ElfCache, KernelSymbols, Mapping, Symbolizer, load_elf_symbols, parse_maps

PROGRAM = r"""
#include <stdio.h>
#include <unistd.h>

volatile int sink;

__attribute__((noinline)) int known_function(int x)
{
    for (int i = 0; i < x; i++)
        sink += i * 7;
    return sink;
}

int main(void)
{
    printf("%lx\n", (unsigned long)(void *)known_function);
    fflush(stdout);
    char buf[1];
    (void)read(0, buf, 1);  /* live until the test closes stdin */
    return known_function(3) & 0;
}
"""

LIBRARY = r"""
__attribute__((noinline)) int exported_function(int x) { return x * 3 + 1; }
"""

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the test binaries")


def _build(tmp_path: Path, name: str, source: str, *flags: str) -> Path:
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    out = tmp_path / name
    subprocess.run(["gcc", "-O1", "-g", "-o", str(out), str(src), *flags], check=True, capture_output=True)
    return out


def _nm(path: Path, symbol: str) -> int:
    out = subprocess.run(["nm", str(path)], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == symbol:
            return int(parts[0], 16)
    raise AssertionError(f"{symbol} not in nm {path}")


class _Running:
    """A built test program, alive until the context ends; knows where known_function is mapped."""

    def __init__(self, path: Path):
        self.proc = subprocess.Popen([str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.address = int(self.proc.stdout.readline(), 16)

    def __enter__(self) -> "_Running":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.communicate("x", timeout=10)


# -- ELF files --------------------------------------------------------------


@pytest.mark.parametrize("flags", [("-fPIE", "-pie"), ("-fno-pie", "-no-pie")], ids=["pie", "non-pie"])
def test_symbol_table_names_a_known_function_at_its_address(tmp_path, flags):
    binary = _build(tmp_path, "prog", PROGRAM, *flags)
    symbols = load_elf_symbols(str(binary))
    address = _nm(binary, "known_function")
    assert symbols.table == ".symtab"
    assert symbols.lookup(address) == "known_function"
    assert symbols.lookup(address + 3) == "known_function"  # inside, not just at the start
    assert symbols.lookup(_nm(binary, "main")) == "main"
    assert symbols.build_id and len(symbols.build_id) >= 16  # gcc on Debian links with --build-id
    # File offset <-> virtual address through PT_LOAD: identity-like for PIE, +0x400000 without.
    text = next(seg for seg in symbols.segments if seg[0] <= address - seg[2] + seg[0] < seg[0] + seg[1])
    assert symbols.vaddr_of(address - text[2] + text[0]) == address


def test_stripped_library_falls_back_to_dynsym(tmp_path):
    lib = _build(tmp_path, "libks.so", LIBRARY, "-shared", "-fPIC")
    address = _nm(lib, "exported_function")
    subprocess.run(["strip", "--strip-all", str(lib)], check=True)
    symbols = load_elf_symbols(str(lib))
    assert symbols.table == ".dynsym"
    assert symbols.lookup(address) == "exported_function"


def test_not_an_elf_file_is_refused_and_remembered(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"#!/bin/sh\necho not elf\n")
    with pytest.raises(ValueError, match="not a usable ELF"):
        load_elf_symbols(str(junk))
    cache = ElfCache()
    assert cache.get(str(junk)) is None and cache.get(str(junk)) is None
    assert cache.loads == 0 and cache.get(str(tmp_path / "missing")) is None


def test_cache_shares_one_parse_per_build_id_and_is_bounded(tmp_path):
    binary = _build(tmp_path, "prog", PROGRAM)
    copy = tmp_path / "copy"
    shutil.copy(binary, copy)  # another inode, same build-id: one parse
    cache = ElfCache(max_files=1)
    first = cache.get(str(binary))
    assert first is not None and cache.get(str(copy)) is first and cache.loads == 1

    other = _build(tmp_path, "lib.so", LIBRARY, "-shared", "-fPIC")
    assert cache.get(str(other)) is not None
    assert len(cache) == 1  # the bound held: the least recently used file went
    again = cache.get(str(binary))
    assert again is not None and again is not first and cache.loads == 3


def test_file_without_build_id_is_keyed_by_inode_and_mtime(tmp_path):
    binary = _build(tmp_path, "prog", PROGRAM, "-Wl,--build-id=none")
    cache = ElfCache()
    first = cache.get(str(binary))
    assert first is not None and first.build_id is None
    assert cache.get(str(binary)) is first and cache.loads == 1
    # Rebuilt in place: another inode or mtime is another file, read again.
    _build(tmp_path, "prog", PROGRAM + "int added_later(void) { return 1; }\n", "-Wl,--build-id=none")
    rebuilt = cache.get(str(binary))
    assert rebuilt is not first and cache.loads == 2 and "added_later" in rebuilt.names


# -- /proc/<pid>/maps and real processes ------------------------------------


def test_parse_maps_keeps_executable_mappings():
    text = (
        "55d0c0de0000-55d0c0de1000 r--p 00000000 fd:01 1234 /usr/bin/my prog\n"
        "55d0c0de1000-55d0c0de2000 r-xp 00001000 fd:01 1234 /usr/bin/my prog\n"
        "7f0000000000-7f0000001000 r-xp 00002000 08:03 99 /tmp/gone.so (deleted)\n"
        "7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]\n"
        "7ffe00000000-7ffe00001000 rwxp 00000000 00:00 0\n"
        "garbage line\n"
    )
    maps = parse_maps(text)
    assert [m.path for m in maps] == ["/usr/bin/my prog", "/tmp/gone.so", "[vdso]", ""]
    first = maps[0]
    assert first == Mapping(0x55D0C0DE1000, 0x55D0C0DE2000, 0x1000, (0xFD, 0x01), 1234, "/usr/bin/my prog")
    assert first.is_file and not maps[2].is_file and not maps[3].is_file


@pytest.mark.parametrize("flags", [("-fPIE", "-pie"), ("-fno-pie", "-no-pie")], ids=["pie", "non-pie"])
def test_live_process_address_resolves_to_its_function(tmp_path, flags):
    binary = _build(tmp_path, "prog", PROGRAM, *flags)
    with _Running(binary) as run:
        sym = Symbolizer(ProcFS())
        # Innermost frame exact; a return address just past known_function's start is still in it.
        frames = sym.user_frames(run.proc.pid, [run.address, run.address + 1])
        assert frames == ["known_function", "known_function"]


def test_unknown_symbol_is_file_plus_address(tmp_path):
    binary = _build(tmp_path, "prog", PROGRAM, "-fPIE", "-pie")
    vaddr = _nm(binary, "known_function")
    subprocess.run(["strip", "--strip-all", str(binary)], check=True)  # no .symtab; .dynsym has only imports
    with _Running(binary) as run:
        frames = Symbolizer(ProcFS()).user_frames(run.proc.pid, [run.address])
    assert frames == [f"prog+0x{vaddr:x}"]  # what `addr2line -e prog` takes


def test_gone_process_uses_maps_seen_while_alive_else_raw_addresses(tmp_path):
    binary = _build(tmp_path, "prog", PROGRAM)
    sym = Symbolizer(ProcFS())
    with _Running(binary) as run:
        pid, address = run.proc.pid, run.address
        start = ProcFS().start_boottime_ns(pid)
        assert sym.remember(pid, start)
    # Gone now: the remembered maps still name the function (the file is unchanged on disk).
    assert sym.user_frames(pid, [address], start) == ["known_function"]
    # Another process with that pid would not be mistaken for it, and a never-seen one stays raw.
    assert sym.user_frames(pid, [address], start + 10**12) == [f"0x{address:x}"]
    assert Symbolizer(ProcFS()).user_frames(pid, [address]) == [f"0x{address:x}"]


def test_fake_proc_root_resolves_through_the_process_root(tmp_path):
    binary = _build(tmp_path, "prog", PROGRAM, "-fno-pie", "-no-pie")
    vaddr = _nm(binary, "known_function")
    symbols = load_elf_symbols(str(binary))
    seg_offset, _, seg_vaddr = next(s for s in symbols.segments if s[2] <= vaddr < s[2] + s[1])
    st = os.stat(binary)
    # A process that mapped the text segment somewhere else entirely (as if relocated).
    base, file_offset = 0x7F0000000000, seg_offset
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "maps").write_text(
        f"{base:x}-{base + 0x10000:x} r-xp {file_offset:08x} {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x} "
        f"{st.st_ino} {binary}\n")
    os.symlink("/", proc / "4242" / "root")
    sym = Symbolizer(ProcFS(root=str(proc), clock_ticks=100))
    address = base + (vaddr - seg_vaddr)
    assert sym.user_frames(4242, [address, base + 0x20000]) == ["known_function", f"0x{base + 0x20000:x}"]


# -- kernel -------------------------------------------------------------------


def _kallsyms(tmp_path: Path, text: str) -> KernelSymbols:
    path = tmp_path / "kallsyms"
    path.write_text(text)
    return KernelSymbols(str(path))


def test_kernel_symbols_by_bisection(tmp_path):
    ks = _kallsyms(tmp_path, (
        "ffffffff81000000 T _stext\n"
        "ffffffff81001000 t helper_local\n"
        "ffffffff81000800 T vfs_read\n"           # out of order: sorted on load
        "ffffffff81002000 D some_data\n"          # not text: ignored
        "ffffffffc0000000 t mod_func\t[somemod]\n"
    ))
    assert ks.available
    assert ks.name(0xFFFFFFFF81000800) == "vfs_read"
    assert ks.name(0xFFFFFFFF81000FFF) == "vfs_read"
    assert ks.name(0xFFFFFFFF81001004) == "helper_local"
    assert ks.name(0xFFFFFFFFC0000010) == "mod_func"
    assert ks.name(0xFFFFFFFF80000000) is None  # below every symbol
    assert ks.name(0xFFFFFFFFC0000000 + (4 << 20)) is None  # far past the last one
    # Return addresses are looked up one byte back: a call that ends vfs_read returns to helper_local's start.
    sym = Symbolizer(ProcFS(root=str(tmp_path)), kernel=ks)
    assert sym.kernel_frames([0xFFFFFFFF81001004, 0xFFFFFFFF81001000]) == ["helper_local", "vfs_read"]


def test_kernel_symbols_without_addresses_stay_raw(tmp_path):
    ks = _kallsyms(tmp_path, "0000000000000000 T _stext\n0000000000000000 T vfs_read\n")
    assert not ks.available
    assert ks.frames([0xFFFFFFFF81000800]) == ["0xffffffff81000800"]
    assert not KernelSymbols(str(tmp_path / "missing")).available


@pytest.mark.skipif(os.geteuid() != 0, reason="/proc/kallsyms shows addresses to root only")
def test_real_kallsyms_names_vfs_read():
    ks = KernelSymbols()
    with open("/proc/kallsyms") as fh:
        address = next(int(line.split()[0], 16) for line in fh if line.split()[2:3] == ["vfs_read"])
    assert ks.name(address + 4) == "vfs_read"


def test_kallsyms_read_in_blocks_matches_a_line_by_line_read(tmp_path, monkeypatch):
    """Lines cut by a block boundary, module symbols, data symbols and zero addresses: the
    block-wise numpy parse names every address exactly as reading the file line by line does."""
    import ksift.enrich.symbols as symbols

    lines, expected = [], {}
    for i in range(3000):
        address = 0xFFFFFFFF81000000 + i * 0x40
        kind = "TtWwDdB"[i % 7]
        name = f"fn_{i}_{'x' * (i % 23)}"
        module = f"\t[mod{i % 5}]" if i % 11 == 0 else ""
        lines.append(f"{address:016x} {kind} {name}{module}\n")
        if kind in "tTwW":
            expected[address] = name
    lines.append("0000000000000000 T hidden\n")  # no address (kptr_restrict): never a match
    path = tmp_path / "kallsyms"
    path.write_text("".join(lines[:1500]) + "".join(reversed(lines[1500:])))  # out of order too
    monkeypatch.setattr(symbols, "_KALLSYMS_BLOCK", 4096)  # many blocks, most ending mid-line
    ks = KernelSymbols(str(path), max_cached=10_000)
    assert ks.frames(list(expected)) == list(expected.values())
    assert ks.frames([a + 3 for a in expected]) == list(expected.values())
    assert ks.passes == 2  # one pass over the file for each batch of new addresses
    assert ks.name(0xFFFFFFFF81000000 + 0x40 + 3) == expected[0xFFFFFFFF81000000 + 0x40] and ks.passes == 2
    # A data symbol's address falls in the text symbol before it.
    assert ks.name(0xFFFFFFFF81000000 + 4 * 0x40) == expected[0xFFFFFFFF81000000 + 3 * 0x40]


def test_kernel_names_are_remembered_bounded_and_the_first_of_aliases_wins(tmp_path):
    ks = _kallsyms(tmp_path, (
        "ffffffff81000000 T first_name\n"
        "ffffffff81000000 T alias_name\n"
        "ffffffff81000100 T other\n"
    ))
    ks.max_cached = 2
    sym = Symbolizer(ProcFS(root=str(tmp_path)), kernel=ks)
    sym.prepare_kernel([[0xFFFFFFFF81000010, 0xFFFFFFFF81000101], [0xFFFFFFFF81000105]])
    assert ks.passes == 1 and len(ks._names) == 2  # the bound held
    assert sym.kernel_frames([0xFFFFFFFF81000010]) == ["first_name"]


def test_kallsyms_in_another_format_is_refused_not_misread(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text("this is not kallsyms\n")
    assert not KernelSymbols(str(path)).available
