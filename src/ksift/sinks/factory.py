"""The sinks a configured agent feeds, beyond the console and the store.

Each kind is built by the part of ksift that owns it, from its config section;
a sink that needs the running agent (the API, remediation) gets it through
`bind(agent)` when the agent is built.
"""

from __future__ import annotations

from ksift.config import AgentConfig
from ksift.rules.model import RuleSet
from ksift.sinks.base import Sink
from ksift.store.sqlite import AlertStore


def configured_sinks(config: AgentConfig, rules: RuleSet, store: AlertStore) -> list[Sink]:
    sinks: list[Sink] = []
    return sinks
