"""What `ksift run` makes resident before it loads the kernel side, and the malloc settings.

libbpf parses the kernel's BTF (~11 MiB for a moment) for each BPF object it loads, so that
moment is the agent's peak memory unless the process is still small then (ksift.compose).
"""

from __future__ import annotations

import subprocess
import sys

from ksift import heap

# Modules `ksift run` needs only after the kernel side is loaded, each a MiB or more resident
# with what it pulls in: the store (sqlite3), the API token's `secrets` (hmac, OpenSSL's
# libcrypto), importlib.metadata (the email package), ctypes.util (subprocess, shutil), asyncio (ssl).
LATER = ("sqlite3", "secrets", "hmac", "_hashlib", "importlib.metadata", "email", "ctypes.util", "asyncio",
         "ssl", "ksift.store.sqlite", "ksift.remediation.decisions")


def test_run_reads_its_inputs_without_the_modules_it_needs_only_later(tmp_path):
    code = (
        "import sys\n"
        "from ksift.cli import main\n"
        f"args = main._parser().parse_args(['run', '--db', {str(tmp_path / 'a.db')!r}, '--api', '127.0.0.1:0'])\n"
        "main._run_inputs(args.config, args.rules, args.db, args.api)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(out.split())
    assert "ksift.rules.parse" in loaded  # it did read the rules
    assert sorted(m for m in LATER if m in loaded) == []


def test_malloc_tuned_and_trimmed():
    # In a child: mallopt is process-wide, and the test process's allocator is not ours to set.
    code = "from ksift import heap; assert heap.tune(); heap.release_free(); print(bytearray(1 << 20)[-1])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "0"
    assert heap.MMAP_THRESHOLD == 128 << 10  # glibc's default, made fixed
