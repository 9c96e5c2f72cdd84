"""Drive the real agent and real workloads for the kernel tests."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ksift.rules.parse import default_rules_text

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = REPO / "tests" / "workloads"
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() \
    else Path("/sys/fs/cgroup")


@dataclass
class AgentRun:
    proc: subprocess.Popen
    workdir: Path

    @property
    def stdout_path(self) -> Path:
        return self.workdir / "stdout.jsonl"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "stderr.log"

    @property
    def stats_path(self) -> Path:
        return self.workdir / "stats.json"

    @property
    def db_path(self) -> Path:
        return self.workdir / "alerts.db"

    @property
    def api_token(self) -> str:
        """The API token the agent made next to its store at start (when no [api] token is configured)."""
        return (self.workdir / "api.token").read_text().strip()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "watching the host" in self.stderr_path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited early ({self.proc.returncode}):\n{self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"agent not ready after {timeout}s:\n{self.stderr()}")

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout)

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alerts(self) -> list[dict]:
        lines = self.stdout_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text())

    def alerts_of(self, rule: str, pid: int) -> list[dict]:
        """The alerts of one rule whose subject is pid (other agents' workloads may alert too)."""
        return [a for a in self.alerts() if a["rule"] == rule and a["subject"]["pid"] == pid]


def start_agent(workdir: Path, *args: str, duration: float | None = None, api: str = "off") -> AgentRun:
    """`ksift run --json` with its stdout, stderr, store and stats under workdir.

    The HTTP API is off unless a test passes api="127.0.0.1:PORT" (or --api in args):
    agents of concurrent tests would otherwise all want the default port.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ksift", "run", "--json", "--db", str(workdir / "alerts.db"),
           "--stats", str(workdir / "stats.json"), *args]
    if "--api" not in args:
        cmd += ["--api", api]
    if duration is not None:
        cmd += ["--for", str(duration)]
    out = open(workdir / "stdout.jsonl", "w")
    err = open(workdir / "stderr.log", "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
    out.close()
    err.close()
    return AgentRun(proc, workdir)


def workload_command(script: str, *args: object) -> list[str]:
    """The command line that runs tests/workloads/<script> with this interpreter."""
    return [sys.executable, str(WORKLOADS / script), *map(str, args)]


@contextmanager
def workloads_for_others(*names: str) -> Iterator[Path]:
    """A copy of these tests/workloads files (and workload_common.py, which they import) in a fresh folder
    every user can read, for a workload run as another user (nobody): the checkout may sit in a folder
    only root can enter (a clone in `mktemp -d` is 0700), so its own files are out of that user's reach.
    Removed on exit."""
    folder = Path(tempfile.mkdtemp(prefix="ksift-workloads-"))
    try:
        folder.chmod(0o755)
        for name in {*names, "workload_common.py"}:
            copy = folder / name
            shutil.copyfile(WORKLOADS / name, copy)
            copy.chmod(0o644)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def last_json_line(stdout: str) -> dict:
    """The report a workload prints as its last line of output."""
    return json.loads(stdout.strip().splitlines()[-1])


def run_workload_script(script: str, *args: object, timeout: float) -> dict:
    """Run a workload to its end (a non-zero exit fails the test) and return its JSON report."""
    done = subprocess.run(workload_command(script, *args), capture_output=True, text=True, timeout=timeout,
                          check=True)
    return last_json_line(done.stdout)


def run_forker(rate: float, seconds: float, comm: str = "ks-forker", cgroup: Path | None = None,
               threads: bool = False) -> dict:
    args: list[object] = ["--rate", rate, "--seconds", seconds, "--comm", comm]
    if cgroup is not None:
        args += ["--cgroup", cgroup]
    if threads:
        args.append("--threads")
    return run_workload_script("forker.py", *args, timeout=seconds + 60)


def run_forker_retried(**kwargs) -> dict:
    """run_forker, tried again if something else on this shared host SIGKILLs the workload.

    Other agents under test may run remediation that kills fork storms it judged; that is
    not what the callers test, so a killed workload is simply run again.
    """
    for attempt in range(3):
        try:
            return run_forker(**kwargs)
        except subprocess.CalledProcessError as exc:
            if exc.returncode != -signal.SIGKILL or attempt == 2:
                raise
    raise AssertionError("unreachable")


def packaged_rule(name: str, **overrides) -> dict:
    """The packaged rule `name` as its TOML table, with these fields replaced or added."""
    rule = next(r for r in tomllib.loads(default_rules_text())["rule"] if r["name"] == name)
    return {**rule, **overrides}


def _toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, integers, floats and booleans are spelled alike in TOML


def rules_toml(*rules: dict) -> str:
    """A rules file's text: one [[rule]] table per dict (as packaged_rule returns them)."""
    return "\n".join("[[rule]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in rule.items())
                     for rule in rules)


def write_rules(path: Path, *rules: dict) -> Path:
    """Write a rules file holding just these rules; returns its path."""
    path.write_text(rules_toml(*rules))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 60.0, proc: subprocess.Popen | None = None,
             log: Path | None = None, interval: float = 0.2):
    """Poll check() until it returns something true and return that; fail naming `what` after timeout.

    An OSError from check (a server not listening yet) counts as not yet. With proc, fail at
    once if that process exits, with the end of its log.
    """
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited ({proc.returncode}):\n"
                                 f"{log.read_text(errors='replace')[-3000:] if log else ''}")
        try:
            last = check()
        except OSError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not true after {timeout}s (last: {last!r})")


def wait_http_ok(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None,
                 log: Path | None = None) -> None:
    """Wait until GET url answers 200 (refused connections and error statuses count as not yet)."""
    def answers_200() -> bool:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200

    wait_for(f"{url} answering 200", answers_200, timeout, proc=proc, log=log)


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM proc if it still runs and reap it; SIGKILL it if it is not gone within timeout."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ServerProcess:
    """A server program a test runs on a free loopback port (self.port, self.url), its output in a log file."""

    def __init__(self, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log

    def start(self, cmd: list[str]) -> None:
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, path: str, timeout: float = 60.0) -> None:
        """Wait until GET path answers 200; fail at once if the program exits."""
        wait_http_ok(self.url + path, timeout, proc=self.proc, log=self.log)

    def stop(self) -> None:
        stop_process(self.proc)


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that keeps the test's output free of access logs."""

    def log_message(self, *args) -> None:
        pass


class LoopbackHttpServer:
    """An HTTP server on 127.0.0.1 (a port the kernel picks), serving in a daemon thread until close()."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def remove_cgroup(path: Path, root: Path, attempts: int = 50) -> None:
    """Remove a cgroup directory: its stragglers move to root's cgroup.procs, then rmdir while it is busy."""
    try:
        pids = (path / "cgroup.procs").read_text().split()
    except OSError:
        pids = []
    for pid in pids:
        try:
            (root / "cgroup.procs").write_text(pid)
        except OSError:
            pass
    for _ in range(attempts):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


class ScratchCgroup:
    """A real cgroup v2 directory for one test, removed afterwards."""

    def __init__(self, name: str | None = None):
        self.path = CGROUP2_ROOT / (name or f"ksift-test-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> "ScratchCgroup":
        self.path.mkdir()
        return self

    @property
    def id(self) -> int:
        return os.stat(self.path).st_ino

    @property
    def rel(self) -> str:
        return "/" + str(self.path.relative_to(CGROUP2_ROOT))

    def __exit__(self, *exc) -> None:
        remove_cgroup(self.path, CGROUP2_ROOT)


PIDS_V1_ROOT = Path("/sys/fs/cgroup/pids")


class BombCgroups:
    """A v1 pids cgroup (pids.max = pids_max) and a v2 scratch cgroup of the same name, for one bomb.

    The workload joins both (bombs.py and forkbomb.c take them as --cgroup). kill() kills
    everything in them (cgroup.kill, then SIGKILL to whatever is left) and waits until
    they are empty; on exit that is done and both are removed, even when the test failed
    half-way: a bomb must never outlive its test. With deadline_s, a watchdog kills them
    that many seconds after entry whatever the test is doing (a test stuck waiting).
    """

    def __init__(self, pids_max: int, deadline_s: float | None = None):
        name = f"ksift-bomb-{uuid.uuid4().hex[:8]}"
        self.pids = PIDS_V1_ROOT / name
        self.v2 = CGROUP2_ROOT / name
        self.pids_max = pids_max
        self.deadline_s = deadline_s
        self._watchdog: threading.Timer | None = None

    def __enter__(self) -> "BombCgroups":
        if not (PIDS_V1_ROOT / "cgroup.procs").exists():
            raise RuntimeError(f"no cgroup v1 pids controller at {PIDS_V1_ROOT}: the bomb cannot be bounded")
        self.pids.mkdir()
        try:
            (self.pids / "pids.max").write_text(str(self.pids_max))
            self.v2.mkdir()
        except BaseException:
            self.pids.rmdir()
            raise
        if self.deadline_s is not None:
            self._watchdog = threading.Timer(self.deadline_s, self.kill)
            self._watchdog.daemon = True
            self._watchdog.start()
        return self

    @property
    def rel(self) -> str:
        """The v2 cgroup's path, as alerts name it (subject.cgroup)."""
        return "/" + self.v2.name

    @property
    def join_args(self) -> list[str]:
        """--cgroup arguments that put a workload (bombs.py, forkbomb.c) in both cgroups."""
        return ["--cgroup", str(self.pids), "--cgroup", str(self.v2)]

    def peak(self) -> int:
        return int((self.pids / "pids.peak").read_text())

    def current(self) -> int:
        return int((self.pids / "pids.current").read_text())

    def refused(self) -> int:
        """Forks the pids limit refused so far (pids.events "max")."""
        for line in (self.pids / "pids.events").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "max":
                return int(value)
        return 0

    def procs(self) -> set[int]:
        out: set[int] = set()
        for d in (self.pids, self.v2):
            try:
                out |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return out

    def kill(self, timeout: float = 30.0) -> bool:
        """Kill everything in both cgroups and wait until they are empty; whether they are."""
        # cgroup.kill (v2) kills the whole cgroup at once, bombs included; then sweep what is left.
        try:
            (self.v2 / "cgroup.kill").write_text("1")
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = self.procs()
            if not left:
                return True
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)
        return not self.procs()

    def __exit__(self, *exc) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.kill()
        for d in (self.v2, self.pids):
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


MEMCG_V1_ROOT = Path("/sys/fs/cgroup/memory")


def _v2_has_memory() -> bool:
    try:
        return "memory" in (CGROUP2_ROOT / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False


class MemoryLimitedCgroup:
    """A cgroup of its own with a memory limit, for a test that grows memory; removed afterwards.

    cgroup v2 memory.max where the unified hierarchy runs the memory controller, else
    a cgroup v1 memory directory with memory.limit_in_bytes (and memory+swap capped too,
    or the workload swaps instead of stopping at the limit). A workload joins it by
    writing its pid to `path`/cgroup.procs (allocator.py --memcg, stepper.py --memcg).
    """

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.v2 = _v2_has_memory()
        self.root = CGROUP2_ROOT if self.v2 else MEMCG_V1_ROOT
        self.path = self.root / f"ksift-test-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "MemoryLimitedCgroup":
        if not self.v2 and not (self.root / "memory.limit_in_bytes").exists():
            raise AssertionError("no memory controller: neither cgroup v2 memory nor v1 at /sys/fs/cgroup/memory")
        self.path.mkdir()
        try:
            if self.v2:
                (self.path / "memory.max").write_text(str(self.limit))
                (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
                memsw = self.path / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    memsw.write_text(str(self.limit))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        remove_cgroup(self.path, self.root, attempts=100)


def owned_bpf_ids(pid: int) -> tuple[set[int], set[int]]:
    """(program ids, link ids) a running process holds, read from its fdinfo."""
    progs, links = set(), set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if "link_id" in fields:
            links.add(int(fields["link_id"]))
        elif "prog_id" in fields:
            progs.add(int(fields["prog_id"]))
    return progs, links


def program_names(ids: set[int]) -> set[str]:
    """The names of these BPF programs, as bpftool shows them (ids gone meanwhile are left out)."""
    names = set()
    for prog_id in ids:
        out = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True, text=True)
        if out.returncode == 0:
            names.add(json.loads(out.stdout).get("name", ""))
    return names


def bpf_ids_in_kernel() -> tuple[set[int], set[int]]:
    def ids(kind: str) -> set[int]:
        out = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True, check=True).stdout
        return {item["id"] for item in json.loads(out or "[]")}

    return ids("prog"), ids("link")


def assert_released(held: tuple[set[int], set[int]]) -> None:
    """Nothing the agent held is still in the kernel (other agents on the host do not matter).

    The kernel frees a closed program after an RCU grace period, so allow it a moment.
    """
    for _ in range(50):
        progs, links = bpf_ids_in_kernel()
        if not (held[0] & progs or held[1] & links):
            return
        time.sleep(0.1)
    assert not (held[0] & progs), f"programs left in the kernel: {sorted(held[0] & progs)}"
    assert not (held[1] & links), f"links left in the kernel: {sorted(held[1] & links)}"


def get_json(url: str, token: str | None = None) -> dict:
    """GET a JSON document (a test's own loopback servers: Prometheus, the agent's API with its token)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
        return json.loads(response.read())


def remediation_agent_config(path: Path, extra: str = "") -> Path:
    """An agent config for remediation tests: no HTTP API (several agents run on this host at once
    and would fight over its port), answers to ask mode picked up every 200 ms."""
    path.write_text(f'[api]\nenabled = false\n\n[remediation]\npoll_interval = "200ms"\n{extra}')
    return path


def stored_decisions(db: Path) -> list[dict]:
    """Every remediation decision an agent stored in its database (none before it made one)."""
    from ksift.remediation.decisions import DecisionStore

    if not db.exists():
        return []
    store = DecisionStore(db)
    try:
        return [d.as_dict() for d in store.list(limit=1000)]
    finally:
        store.close()
