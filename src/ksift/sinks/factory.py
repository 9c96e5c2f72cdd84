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
    # Network delivery: Alertmanager, webhooks, Slack ([sinks]; ksift.sinks.settings).
    from ksift.sinks.settings import build_sinks

    sinks += build_sinks(config.section("sinks"))
    # HTTP API, SSE, /metrics and the dashboard ([api]; ksift.interfaces); others add routes via route_providers.
    if config.section("api").enabled:
        from ksift.interfaces.api import ApiServer

        sinks.append(ApiServer(config.section("api"), store))
    # Remediation (per-rule policies + [remediation]; ksift.remediation): only when a policy is active.
    # Its decisions reach the API as "action" events and approve/reject routes.
    if not any(r.policy is not None for r in rules.rules):
        return sinks  # monitor only: remediation's modules are never imported
    from ksift.remediation.engine import build_remediation

    remediation = build_remediation(config, rules, store)
    if remediation is not None:
        from ksift.remediation.api import route_provider

        for sink in sinks:
            if hasattr(sink, "route_providers") and hasattr(sink, "publish"):
                sink.route_providers.append(route_provider(remediation, bool(getattr(sink.settings, "token", None))))
                remediation.listeners.append(sink.publish)
        sinks.append(remediation)
    return sinks
