"""`ksift doctor`'s host checks that need no kernel: each failure says how to get what is missing."""

from __future__ import annotations

from pathlib import Path

from ksift.cli.doctor import LIBBPF_HOWTO, _mapped_path, check_bpf_side, seccomp_filtered


def test_a_missing_libbpf_says_which_package_gives_it():
    (check,) = check_bpf_side(soname="libksift-absent.so.1")
    assert check.status == "FAIL" and check.what == "libbpf"
    assert "libksift-absent.so.1 cannot be loaded" in check.detail and "cannot open shared object file" in check.detail
    assert check.detail.endswith(LIBBPF_HOWTO) and "apt install libbpf1" in LIBBPF_HOWTO


def test_seccomp_mode_comes_from_proc_status(tmp_path: Path):
    status = tmp_path / "status"
    status.write_text("Name:\tksift\nSeccomp:\t2\nSeccomp_filters:\t1\n")
    assert seccomp_filtered(str(status))
    status.write_text("Name:\tksift\nSeccomp:\t0\n")
    assert not seccomp_filtered(str(status))


def test_the_loaded_library_is_named_by_its_mapping(tmp_path: Path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f10 r--p 00000000 fe:00 123   /usr/lib/x86_64-linux-gnu/libc.so.6\n"
                    "7f20-7f30 r-xp 00001000 fe:00 456   /usr/lib/x86_64-linux-gnu/libbpf.so.1.1.2\n"
                    "7ff0-7ff1 rw-p 00000000 00:00 0\n")
    assert _mapped_path("libbpf.so", str(maps)) == "/usr/lib/x86_64-linux-gnu/libbpf.so.1.1.2"
    assert _mapped_path("libnothing", str(maps)) == "an unknown path"
