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


def test_the_kernel_side_is_planned_and_loaded_without_numpy():
    code = (
        "import sys\n"
        "import ksift.kernel_side, ksift.loader.libbpf, ksift.compose\n"
        "print('numpy' in sys.modules, 'ksift.sensors.base' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_plans_from_the_child_are_the_sensors_own(tmp_path):
    from ksift.config import AgentConfig
    from ksift.kernel_side import plans_from_child, sensor_plans
    from ksift.rules.parse import load_rules

    rules = load_rules(None)  # the packaged rules: every sensor with a BPF object
    config = AgentConfig()
    urgent = frozenset({"fork_bomb"})
    child = plans_from_child(tmp_path, config, rules, 4242, urgent)
    here = sensor_plans(tmp_path, config, rules, 4242, urgent)
    assert child == here
    assert {p.object_file for p in here} >= {"process.bpf.o", "cpu.bpf.o", "lifecycle.bpf.o", "memory.bpf.o"}
    process = next(p for p in here if p.object_file == "process.bpf.o")
    assert process.rodata["bomb_crossing_wakeup"] == 1 and process.rodata["fork_crossing_wakeup"] == 0


def test_a_child_that_fails_leaves_the_loading_to_the_sensors(tmp_path, monkeypatch):
    import ksift.kernel_side as kernel_side
    from ksift.config import AgentConfig
    from ksift.rules.parse import load_rules

    def broken(*args, **kwargs):
        raise RuntimeError("no plans")

    monkeypatch.setattr(kernel_side, "sensor_plans", broken)
    assert kernel_side.plans_from_child(tmp_path, AgentConfig(), load_rules(None), 4242) is None


class _Obj:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_an_object_loaded_for_another_plan_is_closed_not_taken():
    from ksift.kernel_side import ObjectPlan, Preloaded

    plan = ObjectPlan("process.bpf.o", {"fork_threshold": 50}, ("ks_fork", "ks_exit"))
    same, other, core = _Obj(), _Obj(), _Obj()
    preloaded = Preloaded(core, {"process.bpf.o": (plan, same), "cpu.bpf.o": (plan, other)})
    assert preloaded.take(ObjectPlan("process.bpf.o", {"fork_threshold": 50}, ("ks_fork", "ks_exit"))) is same
    assert preloaded.take(plan) is None  # taken once
    assert preloaded.take(ObjectPlan("cpu.bpf.o", {}, ("ks_cpu_sample",))) is None and other.closed
    assert preloaded.take_core() is core
    preloaded.close()
    assert not same.closed and not core.closed  # taken: their owners close them
