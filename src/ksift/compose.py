"""The composition root: builds the agent, its kernel side, store and sinks, under one teardown.

Everything `ksift run` owns is made here and registered on one ExitStack as it
is made, so whatever fails half-way (a store that will not open, a sink's bad
address, a BPF object the kernel refuses) releases exactly what was already
made, in reverse order, and a normal exit does the same.

The kernel side is loaded first, before numpy, the sensors' modules, asyncio, the
alert store and the interfaces' libraries are imported (ksift.kernel_side): libbpf
parses the kernel's BTF (~11 MiB for a moment) for each object, and that moment is
the process's peak memory unless it comes while the process is still small. What
libbpf freed is handed back to the system, and modules of sinks and interfaces
are imported only when configured.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TextIO

from ksift import heap
from ksift.config import AgentConfig
from ksift.errors import BpfError
from ksift.outfile import write_replacing
from ksift.rules.model import RuleSet

log = logging.getLogger("ksift")


@contextmanager
def running_agent(config: AgentConfig, rules: RuleSet, *, db_path: str, json_lines: bool,
                  stdout: TextIO = sys.stdout, stats_path: str | None = None) -> Iterator:
    """An Agent with every part attached and started; everything released on the way out.

    At exit (normal or not) the funnel report is logged, and written to stats_path when given.
    """
    from ksift.kernel_side import default_objects_dir, preload
    from ksift.loader.libbpf import Libbpf

    raise_open_file_limit()  # before anything opens files: the API sizes its connections from it
    heap.tune()  # before the first big allocation: libbpf's copies of the kernel BTF
    with ExitStack() as stack:
        try:
            lib = Libbpf()
        except OSError as exc:
            raise BpfError(str(exc)) from exc
        objects = default_objects_dir()
        urgent = _urgent_rules(config, rules)
        # Every object loaded now, before numpy and the sensors' modules (ksift.kernel_side).
        preloaded = preload(lib, objects, config, rules, os.getpid(), urgent)
        stack.callback(preloaded.close)  # what no sensor took
        heap.release_free()  # libbpf's copies of the kernel BTF

        from ksift.sensors.registry import build_sensors, start_kernel_side
        from ksift.transport.core import CoreObject

        core = CoreObject(lib, objects, config, os.getpid())
        sensors = build_sensors(lib, objects, config, rules, urgent_rules=urgent)
        start_kernel_side(core, sensors, preloaded)  # all or nothing
        stack.callback(_close_kernel_side, core, sensors)
        heap.release_free()

        from ksift.agent import Agent
        from ksift.enrich.cgroup import CgroupResolver, find_cgroup2_mount
        from ksift.enrich.context import Enricher
        from ksift.enrich.procfs import ProcFS

        store = _open_store(db_path)
        stack.callback(store.close)
        # No [api] token configured: one made at first start next to the store, root only (docs/api.md).
        from ksift.interfaces.settings import with_generated_token

        config = with_generated_token(config, db_path)
        sinks = _build_sinks(config, rules, store, json_lines, stdout)
        for sink in reversed(sinks):
            stack.callback(_closer(sink))
        pods = None
        if config.section("kubernetes").enabled:
            from ksift.enrich.kubernetes import build_pod_resolver

            pods = build_pod_resolver(config.section("kubernetes"))
        if pods is not None:
            pods.start()  # fetches in its own thread: an alert never waits for the API server
            stack.callback(pods.close)
            stack.callback(lambda: log.info("kubernetes: %s", json.dumps(pods.stats(), sort_keys=True)))
        enricher = Enricher(ProcFS(), CgroupResolver(find_cgroup2_mount()), pods=pods)
        agent = Agent(config, rules, sensors, enricher, sinks, core=core)
        stack.callback(agent.close)
        stack.callback(_report, agent, stats_path)
        yield agent


def raise_open_file_limit(nr_open_path: str = "/proc/sys/fs/nr_open") -> tuple[int, int]:
    """RLIMIT_NOFILE's soft limit raised to the hard limit: (before, after).

    systemd's default soft limit is 1024: few enough for a flood of API clients to leave the funnel
    without fds for BPF objects and /proc reads. The API keeps a reserve below whatever this gives
    ([api] fd_reserve). An unlimited hard limit is capped at fs.nr_open, the most the kernel allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open(nr_open_path, encoding="ascii") as fh:
                target = int(fh.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == target:
        log.info("open files: soft limit %d (the hard limit)", soft)
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("open files: cannot raise the soft limit %d to %d: %s", soft, target, exc)
        return soft, soft
    log.info("open files: soft limit %d raised to %d (the hard limit)", soft, target)
    return soft, target


def _urgent_rules(config: AgentConfig, rules: RuleSet) -> frozenset[str]:
    """Rules a remediation policy may act on (ask or enforce): each of their crossings wakes the
    agent at once. The sensors obey (Sensor.urgent_rules) without knowing why: they never
    import remediation."""
    if not any(r.policy is not None for r in rules.rules):
        return frozenset()  # monitor only: remediation's modules are never imported
    from ksift.remediation.policy import acting_rules

    return acting_rules(rules, config.section("remediation"))


def _open_store(db_path: str):
    from ksift.store.sqlite import AlertStore

    store = AlertStore(db_path)
    log.info("alert store: %s", db_path)
    return store


def _build_sinks(config: AgentConfig, rules: RuleSet, store, json_lines: bool, stdout: TextIO) -> list:
    from ksift.sinks.console import ConsoleSink
    from ksift.sinks.factory import configured_sinks
    from ksift.sinks.store import StoreSink

    sinks = [ConsoleSink(stdout, json_lines=json_lines or config.json_output), StoreSink(store)]
    return sinks + configured_sinks(config, rules, store)


def _close_kernel_side(core, sensors) -> None:
    """After a failed start-up (Agent.close() does this once the agent exists; closing twice is harmless)."""
    for sensor in reversed(sensors):
        try:
            sensor.close()
        except Exception:
            log.exception("closing sensor %s failed", sensor.name)
    core.close()


def _closer(sink):
    def close() -> None:
        try:
            sink.close()
        except Exception:  # keep closing the others
            log.exception("closing sink %s failed", sink.name)
    return close


def _report(agent, stats_path: str | None) -> None:
    """The funnel counters at exit (read before the kernel side closes: this runs first)."""
    report = agent.funnel_report()
    log.info("funnel: %s", json.dumps(report, sort_keys=True))
    if stats_path:
        # Checked at start (cmd_run), so this fails only if the folder changed since. A KsiftError
        # here still lets the ExitStack run every later callback (the agent, sinks, store close):
        # then it reaches the user as one line and exit status 1.
        write_replacing(stats_path, json.dumps(report, indent=2, sort_keys=True), "--stats")
