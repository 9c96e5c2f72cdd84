"""An exception inside the running agent still detaches everything."""

from __future__ import annotations

import asyncio
import io
import os

import pytest
from harness import assert_released, owned_bpf_ids

from ksift.agent import Agent
from ksift.config import AgentConfig
from ksift.enrich.cgroup import CgroupResolver
from ksift.enrich.context import Enricher
from ksift.enrich.procfs import ProcFS
from ksift.loader.libbpf import Libbpf
from ksift.rules.parse import load_rules
from ksift.sensors.base import default_objects_dir
from ksift.sensors.registry import build_sensors
from ksift.sinks.console import ConsoleSink


def test_exception_in_the_loop_leaves_nothing_attached():
    config, rules = AgentConfig(), load_rules()
    before = owned_bpf_ids(os.getpid())
    agent = Agent(config, rules, build_sensors(Libbpf(), default_objects_dir(), config, rules),
                  Enricher(ProcFS(), CgroupResolver(None)), [ConsoleSink(io.StringIO(), json_lines=True)])

    def boom():
        raise RuntimeError("injected failure in the tick")

    with pytest.raises(RuntimeError, match="injected"):
        with agent:
            held = owned_bpf_ids(os.getpid())
            # every enabled default rule's hooks: at least the three process hooks, each with its link
            assert len(held[1] - before[1]) >= len(held[0] - before[0]) >= 3
            agent.tick = boom
            asyncio.run(agent.run(5))
    assert_released((held[0] - before[0], held[1] - before[1]))
