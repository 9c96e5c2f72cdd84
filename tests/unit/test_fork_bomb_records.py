"""The fork_bomb side of the process sensor, without the kernel: a bomb crossing record decoded
to its tree and figures, the alert's sentence when it opens and when it is over, argv as the
kernel copied it, and whether a quiet bomb still holds its incident open (no root)."""

from __future__ import annotations

import numpy as np
import pytest
from records_helpers import FakeBpfMap, crossing_head, task_record, tgid_key, unstarted_sensor

from ksift.enrich.pids import PidsLimit
from ksift.rules.incidents import NS, IncidentEngine
from ksift.rules.parse import load_rules
from ksift.sensors import process
from ksift.sensors.process import BOMB_CROSSING, CMDLINE_LEN, REC_BOMB_CROSSING, TREE_STATE, decode_cmdline

TREE, FORKER, FORKER_START = 4242, 4300, 777_000
CGROUP = "/user.slice/session-4.scope"
SHELL_BOMB = [b"bash", b"-c", b":(){ :|:& };:"]


class GoneProcFS:
    """Every member of the bomb is gone by the time the alert is built: nobody to ask."""

    def same_process(self, pid: int, start_boottime_ns: int) -> bool:
        return False

    def session_members(self, session: int, limit: int = 100_000) -> list[int]:
        return []

    def cgroup_v2_path(self, pid: int) -> str | None:
        return None


class LimitByPath:
    """PidsLimits that knows one limited cgroup, found by its path only (no member left to ask)."""

    def __init__(self, limit: PidsLimit | None):
        self.limit = limit

    def of(self, pid: int) -> PidsLimit | None:
        return None

    def at_path(self, v2_path: str) -> PidsLimit | None:
        return self.limit if self.limit is not None and v2_path == self.limit.path else None


def bomb_rules():
    rules = load_rules()  # the packaged rules: fork_bomb's threshold 100 and min_live 100, fork_storm's 50
    return [rules.by_name("fork_bomb"), rules.by_name("fork_storm")]


def sensor(limit: PidsLimit | None = None, rules=None) -> process.ProcessSensor:
    return unstarted_sensor(process.ProcessSensor, rules or bomb_rules(), pids_limits=LimitByPath(limit),
                            procfs=GoneProcFS())


def argv_bytes(args: list[bytes]) -> bytes:
    """argv as it lies in a process's memory: each argument NUL-terminated."""
    return b"".join(arg + b"\0" for arg in args)


def bomb_record(*, argv: list[bytes] = SHELL_BOMB, window_count: int = 9100, total: int = 9150, live: int = 120,
                peak_live: int = 130) -> np.ndarray:
    """A bomb crossing as bpf/process.bpf.c's tree_fork() fills it: the tree, its members, the forker's argv."""
    raw = argv_bytes(argv)
    p = np.zeros(1, dtype=BOMB_CROSSING)
    p["head"] = crossing_head(window_start_ns=4 * NS, total=total, window_count=window_count, threshold=100)
    p["tree"], p["live"], p["peak_live"], p["min_live"] = TREE, live, peak_live, 100
    p["cmdline_len"] = len(raw)  # the whole argv's length; the record holds its first CMDLINE_LEN bytes
    p["cmdline"] = raw[:CMDLINE_LEN]
    return task_record(REC_BOMB_CROSSING, p, tgid=FORKER, ktime_ns=5 * NS, comm=b"bash", exe=b"/usr/bin/bash",
                       ppid=1, start_boottime_ns=FORKER_START, ancestry=((1, b"systemd"),))


def tree_state(live: int, peak_live: int) -> bytes:
    """A ks_tree_state value (struct ksift_tree_state)."""
    st = np.zeros(1, dtype=TREE_STATE)
    st["live"], st["peak_live"] = live, peak_live
    return st.tobytes()


def tree_map(live: int, peak_live: int | None = None, tree: int = TREE) -> FakeBpfMap:
    return FakeBpfMap({tgid_key(tree): tree_state(live, live if peak_live is None else peak_live)})


def opened(s: process.ProcessSensor, batch: np.ndarray, cgroup: str | None = CGROUP, exe: str | None = None):
    """The incident the batch's one crossing opens, with the context enrichment captured for it."""
    (crossing,) = s.decode(batch).crossings
    engine = IncidentEngine(s.rules())
    (transition,) = engine.observe(crossing)
    inc = transition.incident
    # The forker is gone: /proc could not name its exe (the kernel's exec path is in the task).
    inc.context = {"subject": {"exe": exe, "cgroup": cgroup}, "ancestry": []}
    return inc


# -- decoding ---------------------------------------------------------------------------


def test_a_bomb_crossing_is_keyed_by_its_tree_not_the_forker():
    (crossing,) = sensor().decode(bomb_record()).crossings
    assert crossing.rule == "fork_bomb"
    # the session id (with the cgroup: session ids come back), not the forking member's tgid
    assert crossing.key == (TREE, crossing.task.cgroup_id)
    assert crossing.task.tgid == FORKER and crossing.task.exe == "/usr/bin/bash"
    assert (crossing.window_count, crossing.total, crossing.window_start_ns, crossing.ktime_ns) == \
        (9100, 9150, 4 * NS, 5 * NS)
    assert crossing.details == {"tree": TREE, "live": 120, "peak_live": 130, "min_live": 100,
                                "cmdline": ["bash", "-c", ":(){ :|:& };:"], "cmdline_truncated": False}


def test_a_cut_argv_is_decoded_as_far_as_it_goes_and_says_so():
    script = b"import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    argv = [b"/work/main/.venv/bin/python", b"-c", script]
    assert len(argv_bytes(argv)) > CMDLINE_LEN
    (crossing,) = sensor().decode(bomb_record(argv=argv)).crossings
    cut = argv_bytes(argv)[:CMDLINE_LEN].split(b"\0")[2].decode()
    assert crossing.details["cmdline"] == ["/work/main/.venv/bin/python", "-c", cut]
    assert script.decode().startswith(cut) and len(cut) < len(script)
    assert crossing.details["cmdline_truncated"] is True


def test_bomb_records_are_ignored_while_the_rule_is_off():
    storm_only = sensor(rules=[load_rules().by_name("fork_storm")])
    assert storm_only.bomb_rule is None
    assert storm_only.decode(bomb_record()).crossings == []


@pytest.mark.parametrize("raw, length, args", [
    (b"bash\0-c\0:(){ :|:& };:\0", 22, ["bash", "-c", ":(){ :|:& };:"]),
    (b"bash\0-c\0:(){ :|:& };:\0".ljust(CMDLINE_LEN, b"\0"), 22, ["bash", "-c", ":(){ :|:& };:"]),  # padding
    (b"/usr/bin/python3\0-c\0import o", 300, ["/usr/bin/python3", "-c", "import o"]),  # cut: the length says more
    (b"make\0-j8\0all\0", 9, ["make", "-j8"]),  # the length says less than the buffer holds
    (b"bash\0\0x\0", 8, ["bash", "", "x"]),  # an empty argument stays
    (b"caf\xc3\xa9\0\xff\0", 8, ["caf\u00e9", "\ufffd"]),  # not UTF-8: replaced, not an error
    (b"bash\0", 0, []),
    (b"", 40, []),
    (b"bash\0", -1, []),
])
def test_decode_cmdline(raw, length, args):
    assert decode_cmdline(raw, length) == args


# -- the alert's sentence -----------------------------------------------------------------


LIMIT = PidsLimit(path=CGROUP, max=300, current=300, refused=54802)


def test_open_summary_names_the_tree_its_cgroup_rate_and_the_limit_it_hit():
    s = sensor(LIMIT)
    s._tree_state = tree_map(live=300, peak_live=300)  # the kernel map when the alert is built: it grew
    inc = opened(s, bomb_record(live=120, peak_live=130))
    assert s.summarize(inc, "open") == ("fork bomb: 300 live processes of /usr/bin/bash -c ':(){ :|:& };:' in "
                                        f"{CGROUP}, 9,100 forks/s, 54,802 forks refused by pids.max=300")
    assert s.details(inc, "open") == {
        "tree": TREE, "live": 120, "peak_live": 300, "min_live": 100, "cmdline": ["bash", "-c", ":(){ :|:& };:"],
        "cmdline_truncated": False, "forks_per_s": 9100,
        "pids_limit": {"cgroup": CGROUP, "max": 300, "current": 300, "refused": 54802}}


def test_an_open_alert_counts_the_members_the_kernel_judged_it_by():
    """The crossing had min_live members; one exited before the alert was built: live stays the judged 100."""
    s = sensor(LIMIT)
    s._tree_state = tree_map(live=99, peak_live=100)
    inc = opened(s, bomb_record(live=100, peak_live=100))
    assert s.summarize(inc, "open").startswith("fork bomb: 100 live processes of ")
    details = s.details(inc, "open")
    assert details["live"] == 100 >= details["min_live"] and details["peak_live"] == 100


def test_resolved_summary_says_it_is_over_with_its_totals():
    s = sensor(LIMIT)
    s._tree_state = tree_map(live=300, peak_live=300)
    inc = opened(s, bomb_record())
    s.summarize(inc, "open")
    # Killed: every member gone, the peak stays.
    s._tree_state = tree_map(live=0, peak_live=300)
    inc.status, inc.resolved_ns = "resolved", inc.first_window_ns + int(4.2 * NS)
    assert s.summarize(inc, "resolved") == (
        f"fork bomb of /usr/bin/bash -c ':(){{ :|:& }};:' in {CGROUP} is over: {inc.count:,} forks in 4.2s "
        "(peak 9,100 forks/s, 300 live at most), 54,802 forks refused by pids.max=300")
    assert inc.count == 9100
    assert s.details(inc, "resolved")["live"] == 0 and s.details(inc, "resolved")["peak_live"] == 300


def test_summary_without_a_limit_or_a_count_of_refused_forks():
    s = sensor(None)
    s._tree_state = tree_map(live=150)
    inc = opened(s, bomb_record(window_count=120, total=130))
    assert s.summarize(inc, "open") == ("fork bomb: 150 live processes of /usr/bin/bash -c ':(){ :|:& };:' in "
                                        f"{CGROUP}, 120 forks/s")
    assert "pids_limit" not in s.details(inc, "open")
    s = sensor(PidsLimit(path=CGROUP, max=4096, current=150, refused=None))
    s._tree_state = tree_map(live=150)
    inc = opened(s, bomb_record(window_count=120, total=130))
    assert s.summarize(inc, "open").endswith(", 120 forks/s, under pids.max=4096")


def test_summary_is_one_line_whatever_the_argv_holds():
    """A python bomb's argv is a script: its newlines are written as \\n, and a long one is cut."""
    script = b"import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    s = sensor(LIMIT)
    s._tree_state = tree_map(live=200)
    inc = opened(s, bomb_record(argv=[b"/usr/bin/python3", b"-c", script]), exe="/usr/bin/python3.11")
    text = s.summarize(inc, "open")
    assert "\n" not in text and "\t" not in text
    assert text.startswith("fork bomb: 200 live processes of /usr/bin/python3.11 -c 'import os\\nwhile True:\\n")
    program = text[len("fork bomb: 200 live processes of "):text.index(f" in {CGROUP}, ")]
    assert len(program) == process.PROGRAM_TEXT_MAX and program.endswith("\u2026")


def test_without_a_cgroup_or_an_exec_path_argv0_names_the_program():
    s = sensor(None)
    s._tree_state = tree_map(live=150)
    batch = bomb_record(argv=[b"/tmp/x/treebomb"])
    batch[0]["task"]["exe"] = b"treebomb"  # the kernel kept only a basename
    inc = opened(s, batch, cgroup=None)
    assert s.summarize(inc, "open") == "fork bomb: 150 live processes of /tmp/x/treebomb, 9,100 forks/s"


# -- a quiet bomb is not over while its members live ----------------------------------------


@pytest.mark.parametrize("live, held", [(300, True), (100, True), (99, False), (0, False), (-3, False)])
def test_holds_while_min_live_members_are_alive(live, held):
    s = sensor()
    s._tree_state = tree_map(live=live, peak_live=300)
    assert s.holds("fork_bomb", TREE) is held
    assert s.tree_live(TREE) == (max(live, 0), 300)


def test_holds_nothing_it_does_not_know():
    s = sensor()
    assert s.holds("fork_bomb", TREE) is False  # not started: no map
    s._tree_state = tree_map(live=300, tree=TREE + 1)
    assert s.holds("fork_bomb", TREE) is False  # this tree is not in the map (LRU-evicted, or never seen)
    assert s.holds("fork_storm", TREE + 1) is False  # a fork storm is over when its parent forks no more
    assert s.holds("fork_bomb", TREE + 1) is True
