"""CPU sensor: processes that keep more than a share of a core busy (bpf/cpu.bpf.c).

The kernel samples every CPU with perf cpu-clock at `sample_hz` and counts the
samples of each process per window; a process over
    threshold% / 100 * sample_hz * window
samples in one window is shipped as a crossing, once per window. While a
process is over, its user and kernel stacks are counted in the kernel; each
batch of crossings drains those counts here, and the alert carries the hottest
stacks.

Symbolizing (maps, ELF files, kallsyms) is slow on a cache miss, so it runs in
a worker thread (ksift.worker) that owns the symbolizer and the StackBook: the
loop reads the counts and stack ids from the kernel (fast) and hands the
addresses over at once, while the process still lives. Under a StackGate
(ksift.enrich.stacks, `defer_stacks`) a crossing carries a PendingStack that the
gate completes before its alert reaches the sinks; without one, decode waits for
the worker, as long as symbolizing took on the loop before.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ksift.config import AgentConfig
from ksift.enrich.stacks import MAX_WAIT_S, PendingStack, settled
from ksift.enrich.symbols import Symbolizer
from ksift.loader.bpf_object import BpfMap, BpfObject
from ksift.loader.libbpf import Libbpf
from ksift.rules.incidents import NS, Crossing, Incident, KeyState
from ksift.rules.model import Rule, RuleSet, cpu_samples_threshold
from ksift.sensors.base import CROSSING, WINDOW, WINDOW_ABI, WINDOW_EXIT, Decoded, Sensor, tgid_key, window_crossing
from ksift.transport import records
from ksift.units import format_duration
from ksift.worker import BoundedWorker, Job

log = logging.getLogger("ksift.sensors.cpu")

CPU_SIGNAL = "cpu.usage"
SAMPLER = "ks_cpu_sample"
EXIT_HOOK = "ks_cpu_exit"

TOP_STACKS = 5
# A stack id nobody sampled for this long is deleted from the kernel's stack map.
STACK_ID_TTL_NS = 30 * NS
# Batches of stacks waiting for the symbolizing thread; beyond this the oldest is dropped (and counted).
MAX_SYMBOL_JOBS = 64

# Mirrors of bpf/cpu.h.
STACK_DEPTH = 64
REC_CPU_CROSSING = 51
REC_CPU_EXIT = 52
CPU_CROSSING = np.dtype([("head", CROSSING), ("run_start_ns", "<u8"), ("run_samples", "<u8")])
CPU_EXIT = WINDOW_EXIT  # exit_code: task->exit_code
CPU_STATE = np.dtype(
    [
        ("win", WINDOW),
        ("run_start_ns", "<u8"),
        ("run_samples", "<u8"),
        ("prev_window_count", "<u4"),
        ("_pad", "<u4"),
    ]
)
STACK_KEY = np.dtype(
    [("tgid", "<u4"), ("user_stack_id", "<i4"), ("kernel_stack_id", "<i4"), ("_pad", "<u4")]
)
LOST_FRAME = "[stack lost]"
# A drained stack count: (tgid, user addresses, kernel addresses, samples); () no such stack, None its id was lost.
RawStack = tuple[int, tuple[int, ...] | None, tuple[int, ...] | None, int]


def share_percent(samples: int, elapsed_ns: int, sample_hz: int) -> float:
    """Samples as a share of one core: a task on a CPU all the time gets one sample per
    period, the first at the start (so elapsed * hz + 1 of them)."""
    expected = max(elapsed_ns, 0) * sample_hz / NS + 1
    return 100.0 * samples / expected


def hot_frame(stacks: list[dict] | None) -> str | None:
    """Where the hottest stack spends its time: its innermost user frame, else its kernel one."""
    stacks = settled(stacks)  # a PendingStack (still being symbolized) shows nothing yet
    if not stacks:
        return None
    top = stacks[0]
    for frames in (top.get("user") or [], top.get("kernel") or []):
        if frames and frames[0] != LOST_FRAME:
            return frames[0]
    return None


def _as_call(frame: str) -> str:
    # "handle_batch" reads as a function; "worker+0x1a2" and "0x7f..." are places, not calls.
    return frame if "+0x" in frame or frame.startswith("0x") or frame.startswith("[") else f"{frame}()"


@dataclass
class _Book:
    start_boottime_ns: int | None
    last_window_ns: int
    counts: Counter = field(default_factory=Counter)
    other: int = 0  # samples of stacks beyond the per-process bound


class StackBook:
    """Samples per distinct (user frames, kernel frames) of each hot process, bounded.

    A process's book restarts when a new run of hot windows starts (a whole quiet
    window since its last crossing) or its pid names another process.
    """

    def __init__(self, max_processes: int = 256, max_stacks: int = 512):
        self.max_processes = max_processes
        self.max_stacks = max_stacks
        self._books: OrderedDict[int, _Book] = OrderedDict()

    def __len__(self) -> int:
        return len(self._books)

    def track(self, tgid: int, start_boottime_ns: int, window_start_ns: int, window_ns: int) -> None:
        """A crossing of tgid: keep its book, or start a new one for a new run or process."""
        book = self._books.get(tgid)
        if (book is None or book.start_boottime_ns not in (None, start_boottime_ns)
                or window_start_ns - book.last_window_ns > 2 * window_ns):
            book = _Book(start_boottime_ns, window_start_ns)
        book.start_boottime_ns = start_boottime_ns
        book.last_window_ns = max(book.last_window_ns, window_start_ns)
        self._put(tgid, book)

    def start_boottime_ns(self, tgid: int) -> int | None:
        book = self._books.get(tgid)
        return book.start_boottime_ns if book else None

    def add(self, tgid: int, user: tuple[str, ...], kernel: tuple[str, ...], samples: int) -> None:
        book = self._books.get(tgid)
        if book is None:  # samples of a process whose crossing we never saw (evicted, or raced)
            book = _Book(None, 0)
            self._put(tgid, book)
        key = (user, kernel)
        if key in book.counts or len(book.counts) < self.max_stacks:
            book.counts[key] += samples
        else:
            book.other += samples

    def top(self, tgid: int, n: int = TOP_STACKS) -> list[dict]:
        """The n stacks with the most samples, as the alert shows them."""
        book = self._books.get(tgid)
        if book is None:
            return []
        return [{"samples": count, "user": list(user), "kernel": list(kernel)}
                for (user, kernel), count in book.counts.most_common(n)]

    def _put(self, tgid: int, book: _Book) -> None:
        self._books[tgid] = book
        self._books.move_to_end(tgid)
        while len(self._books) > self.max_processes:
            self._books.popitem(last=False)


class CpuSensor(Sensor):
    name = "cpu"
    record_base = 50  # KSIFT_REC_CPU_BASE
    object_file = "cpu.bpf.o"
    signals = (CPU_SIGNAL,)
    counter_enum = "ksift_cpu_counter"
    counter_names = ("cpu_samples", "cpu_idle", "cpu_self", "cpu_aggregated", "cpu_crossings", "cpu_stacks",
                     "cpu_stack_collisions", "cpu_stack_errors", "cpu_exit_flagged")
    abi = {
        **WINDOW_ABI,
        "ksift_cpu_crossing": (CPU_CROSSING, {}),
        "ksift_cpu_state": (CPU_STATE, {}),
        "ksift_cpu_stack_key": (STACK_KEY, {}),
    }

    def __init__(self, lib: Libbpf, objects_dir: Path, config: AgentConfig, self_tgid: int, rules: RuleSet,
                 symbolizer: Symbolizer | None = None, clock_ns: Callable[[], int] = time.monotonic_ns):
        super().__init__(lib, objects_dir, config, self_tgid, rules)
        self.cpu_rule: Rule | None = self.enabled.get(CPU_SIGNAL)
        self.sample_hz = 0
        self.window_threshold = 0
        if self.cpu_rule is not None:
            rule = self.cpu_rule  # its window and sample rate were checked by the rules parser
            self.sample_hz = int(rule.param("sample_hz"))
            self.window_threshold = cpu_samples_threshold(rule.threshold, self.sample_hz, rule.window_s)
        # The symbolizer and the book belong to the symbolizing thread: only its jobs touch them.
        self.symbolizer = symbolizer or Symbolizer()
        self.book = StackBook()
        self._symbols = BoundedWorker("symbols", MAX_SYMBOL_JOBS, on_drop=self._symbol_job_dropped)
        # True under a StackGate (ksift.enrich.stacks), which completes PendingStacks; False: decode
        # waits up to symbol_wait_s for the thread, and crossings carry the frames.
        self.defer_stacks = False
        self.symbol_wait_s = MAX_WAIT_S
        self.symbol_jobs_dropped = 0
        self.clock_ns = clock_ns
        # Stack ids read from the kernel: their addresses, and when a sample last named them.
        # An id keeps its stack until we delete it (no BPF_F_REUSE_STACKID), so both stay valid till then.
        self._stack_addresses_by_id: dict[int, tuple[int, ...]] = {}
        self._stack_seen_ns: dict[int, int] = {}
        self.stack_stats = {"drained": 0, "lost": 0}  # stack-count entries read, stacks gone before we read them
        self._state: BpfMap | None = None
        self._stacks: BpfMap | None = None
        self._stack_counts: BpfMap | None = None

    def rodata(self) -> dict[str, int]:
        rule = self.cpu_rule
        if rule is None:
            return {}
        return {"cpu_threshold": self.window_threshold, "cpu_window_ns": round(rule.window_s * NS)}

    def programs(self) -> list[str]:
        # The exit hook ships the final totals of flagged processes and frees their state.
        return [SAMPLER, EXIT_HOOK] if self.cpu_rule is not None else []

    def attach(self, obj: BpfObject, prog: str) -> None:
        """The sampler goes on one cpu-clock event per CPU; the exit hook is a tracepoint."""
        if prog == SAMPLER:
            obj.attach_perf_event(prog, self.sample_hz)
        else:
            super().attach(obj, prog)

    def loaded(self) -> None:
        self._state = self.obj.map("ks_cpu_state")
        self._stacks = self.obj.map("ks_cpu_stacks")
        self._stack_counts = self.obj.map("ks_cpu_stack_counts")

    def close(self) -> None:
        self._state = self._stacks = self._stack_counts = None
        if not self._symbols.close(timeout=1.0):  # a daemon thread: it never holds the agent's exit
            log.info("the symbolizing thread is still busy at shutdown; left behind")
        super().close()

    def counters(self) -> dict[str, int]:
        """The kernel's counters, plus what became of the stacks in user space."""
        out = super().counters()
        if out:
            out.update(stacks_drained=self.stack_stats["drained"], stacks_lost=self.stack_stats["lost"],
                       stack_jobs_dropped=self.symbol_jobs_dropped)
        return out

    # -- records -------------------------------------------------------------

    def decode(self, batch: np.ndarray) -> Decoded:
        out = Decoded()
        rule = self.cpu_rule
        if rule is None or len(batch) == 0:
            return out
        window_ns = round(rule.window_s * NS)
        tracks: list[tuple[int, int, int, int]] = []

        def track(row: np.void, p: np.void) -> tuple:
            task = records.task_context(row["task"])
            tracks.append((task.tgid, task.start_boottime_ns, int(p["head"]["window_start_ns"]), window_ns))
            return row, p, task

        decoded = self.decode_records(batch, REC_CPU_CROSSING, CPU_CROSSING, track, out, "CPU crossing")
        stacks: dict[int, object] = {}
        if decoded:
            entries: list[RawStack] = []
            try:
                entries = self.drain_stacks()
            except Exception:  # stacks are context: the alert still goes out without them
                log.exception("could not read the stacks of hot processes")
            stacks = self.symbolize(tracks, entries)
        out.crossings += self.decode_each(
            decoded, lambda row, p, task: self._crossing(rule, row, p, task, stacks.get(task.tgid)), out,
            "CPU crossing")
        out.exits += self.window_exits(batch, REC_CPU_EXIT, rule.name)
        return out

    def _crossing(self, rule: Rule, row: np.void, p: np.void, task, stack: object) -> Crossing:
        ktime = int(row["ktime_ns"])
        run_ns = ktime - int(p["run_start_ns"])
        run_samples = int(p["run_samples"])
        details = {
            "cpu_share_percent": round(share_percent(run_samples, run_ns, self.sample_hz), 1),
            "hot_for_s": round(run_ns / NS, 1),
            "samples": run_samples,
            "sample_hz": self.sample_hz,
            "threshold_percent": rule.threshold,
            "window_samples_threshold": int(p["head"]["threshold"]),
        }
        return window_crossing(rule.name, row, p, task=task, details=details, stack=stack)

    def drain_stacks(self) -> list[RawStack]:
        """Read (and delete) the kernel's stack counts, as (tgid, user, kernel, samples) each.

        user and kernel are the stack's addresses, () when the sample had no such
        stack, None when its id was gone before we read it. The counts are read
        and deleted in one batch. Each stack id they name is read from the stack
        map once and remembered; an id no sample named for STACK_ID_TTL_NS is
        deleted from the kernel, so a count drained a moment after its id was
        read still finds it, and the map holds only live stacks.
        """
        if self._stack_counts is None or self._stacks is None:
            return []
        keys, values, n = self._stack_counts.lookup_batch(delete=True)
        now = self.clock_ns()
        out: list[RawStack] = []
        if n:
            entries = np.frombuffer(keys, dtype=STACK_KEY, count=n)
            samples = np.frombuffer(values, dtype="<u8", count=n)
            ids = {int(i) for i in np.concatenate([entries["user_stack_id"], entries["kernel_stack_id"]]) if i >= 0}
            for sid in ids:
                self._stack_seen_ns[sid] = now
                if sid not in self._stack_addresses_by_id:
                    found = self._read_stack(sid)
                    if found is not None:
                        self._stack_addresses_by_id[sid] = found
            for entry, count in zip(entries, samples):
                out.append((int(entry["tgid"]), self._addresses(int(entry["user_stack_id"])),
                            self._addresses(int(entry["kernel_stack_id"])), int(count)))
            self.stack_stats["drained"] += n
        for sid, seen in list(self._stack_seen_ns.items()):
            if now - seen > STACK_ID_TTL_NS:
                self._stacks.delete(sid.to_bytes(4, "little"))
                del self._stack_seen_ns[sid]
                self._stack_addresses_by_id.pop(sid, None)
        return out

    def _read_stack(self, stack_id: int) -> tuple[int, ...] | None:
        raw = self._stacks.lookup(stack_id.to_bytes(4, "little"))
        if raw is None:
            self.stack_stats["lost"] += 1
            return None
        # Frames fill the slot from the start; the rest is zero.
        return tuple(int(a) for a in np.frombuffer(raw[: STACK_DEPTH * 8], dtype="<u8") if a)

    def _addresses(self, stack_id: int) -> tuple[int, ...] | None:
        return () if stack_id < 0 else self._stack_addresses_by_id.get(stack_id)

    # -- symbolizing (in the worker thread) ------------------------------------

    def symbolize(self, tracks: list[tuple[int, int, int, int]], entries: list[RawStack]) -> dict[int, object]:
        """Hand a batch's crossings and stacks to the symbolizing thread: each crossing tgid's stacks.

        Under a StackGate, PendingStacks at once; else the frames, waited for (up to symbol_wait_s)."""
        try:
            future = self._symbols.submit(self._book_job, tracks, entries)
        except Exception:  # no thread to be had: the crossings still go out, without stacks
            log.exception("cannot hand stacks to the symbolizing thread")
            future = None
        wanted = {tgid for tgid, *_ in tracks}
        if self.defer_stacks:
            return {tgid: PendingStack(future, tgid) for tgid in wanted}
        pending = PendingStack(future, None)
        if not pending.wait(self.symbol_wait_s):
            log.warning("symbolizing stacks took more than %.1fs: the crossings go without them", self.symbol_wait_s)
        return {tgid: PendingStack(future, tgid).result() for tgid in wanted}

    def _book_job(self, tracks: list[tuple[int, int, int, int]], entries: list[RawStack]) -> dict[int, list | None]:
        """In the worker: the crossings' runs, the stacks symbolized into the book, each crossing's hottest."""
        for tgid, start_boottime_ns, window_start_ns, window_ns in tracks:
            self.book.track(tgid, start_boottime_ns, window_start_ns, window_ns)
        try:
            # Every kernel frame of the batch looked up at once: one pass over /proc/kallsyms.
            self.symbolizer.prepare_kernel(kernel for _, _, kernel, _ in entries if kernel)
            users: dict[tuple[int, tuple[int, ...] | None], tuple[str, ...]] = {}
            kernels: dict[tuple[int, ...] | None, tuple[str, ...]] = {}
            for tgid, user, kernel, samples in entries:
                if (tgid, user) not in users:
                    users[(tgid, user)] = self._user_frames(tgid, user)
                if kernel not in kernels:
                    kernels[kernel] = self._kernel_frames(kernel)
                self.book.add(tgid, users[(tgid, user)], kernels[kernel], samples)
        except Exception:  # stacks are context: the alert still goes out with what the book holds
            log.exception("could not symbolize the stacks of hot processes")
        return {tgid: self.book.top(tgid) or None for tgid, *_ in tracks}

    def _symbol_job_dropped(self, job: Job) -> None:
        self.symbol_jobs_dropped += 1
        if self.symbol_jobs_dropped == 1 or self.symbol_jobs_dropped % 100 == 0:
            log.warning("symbolizing falls behind: %d batch(es) of stacks waiting, dropped %d so far (their "
                        "samples are not counted, their crossings carry no stack)", MAX_SYMBOL_JOBS,
                        self.symbol_jobs_dropped)

    def _user_frames(self, tgid: int, addresses: tuple[int, ...] | None) -> tuple[str, ...]:
        if addresses is None:
            return (LOST_FRAME,)
        if not addresses:
            return ()
        start = self.book.start_boottime_ns(tgid)
        return tuple(self.symbolizer.user_frames(tgid, list(addresses), start))

    def _kernel_frames(self, addresses: tuple[int, ...] | None) -> tuple[str, ...]:
        if addresses is None:
            return (LOST_FRAME,)
        if not addresses:
            return ()
        return tuple(self.symbolizer.kernel_frames(list(addresses)))

    def current(self, rule: str, key: int) -> KeyState | None:
        """One process's live sample counters, straight from the kernel map."""
        return self.window_state(self._state, tgid_key(key), CPU_STATE)

    # -- alerts --------------------------------------------------------------

    def summarize(self, inc: Incident, status: str) -> str:
        who = f"PID {inc.task.tgid} ({inc.task.comm})"
        share = inc.details.get("cpu_share_percent")
        hot_for = inc.details.get("hot_for_s")
        used = (f"{share:.0f}% of a core for {format_duration(max(round(hot_for), 1))}"
                if share is not None and hot_for is not None else f"over {inc.rule.threshold}% of a core")
        if status == "open":
            frame = hot_frame(inc.stack)
            text = f"CPU high: {who} used {used}"
            if frame:
                text += f" in {_as_call(frame)}"
            text += f", parent PID {inc.task.ppid}"
            container = (inc.context.get("subject") or {}).get("container_id")
            if container:
                text += f", in container {container[:12]}"
            return text
        if inc.key_exited:
            return f"CPU high is over: {who} exited after using {used}"
        return f"CPU high is over: {who} is back under {inc.rule.threshold}% of a core (it used {used})"
