"""The agent's loop wakes for what it owns (housekeeping, an incident's resolution), not on a short fixed tick."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from agent_helpers import fork_storm_crossing, fork_storm_rules, plain_enricher

from ksift.agent import Agent
from ksift.config import AgentConfig
from ksift.rules.incidents import NS, IncidentEngine
from ksift.rules.parse import parse_rules


class Collect:
    name = "collect"
    delivered = failed = 0

    def __init__(self):
        self.alerts = []

    def emit(self, alert):
        self.alerts.append(alert)

    def close(self):
        pass


def short_window_rules():
    text = ('[[rule]]\nname = "fork_storm"\nseverity = "warning"\nsignal = "process.fork"\nkey = "tgid"\n'
            'threshold = 50\nwindow = "200ms"\n')
    return parse_rules(text, "rules.toml")


def test_no_open_incident_means_no_deadline():
    engine = IncidentEngine(fork_storm_rules().enabled(), grace_ns=5)
    assert engine.next_deadline_ns() is None


def test_the_deadline_is_when_the_incident_may_resolve():
    rules = fork_storm_rules()
    engine = IncidentEngine(rules.enabled(), grace_ns=7)
    crossing = fork_storm_crossing(4242, 80)
    assert [t.kind for t in engine.observe(crossing)] == ["open"]
    due = engine.next_deadline_ns()
    # a whole quiet window after the hot one, plus the grace
    assert due == crossing.window_start_ns + 2 * NS + 7
    assert engine.tick(due - 1) == []
    assert [t.kind for t in engine.tick(due)] == ["resolved"]
    assert engine.next_deadline_ns() is None


def test_an_idle_agent_wakes_about_once_per_tick():
    config = replace(AgentConfig(), tick_s=0.5)
    agent = Agent(config, fork_storm_rules(), [], plain_enricher(), [Collect()])
    asyncio.run(agent.run(1.6))
    # the first housekeeping, one per 0.5 s, and the last at stop: never one per 100 ms
    assert 3 <= agent.funnel.ticks <= 6, agent.funnel.ticks


def test_an_open_incident_resolves_at_its_deadline_not_at_the_next_tick():
    config = replace(AgentConfig(), tick_s=5.0)  # housekeeping alone would come far too late
    sink = Collect()
    agent = Agent(config, short_window_rules(), [], plain_enricher(), [sink])

    async def scenario():
        loop = asyncio.get_running_loop()
        # A crossing arrives a moment after the loop started (as a drained record would).
        loop.call_later(0.05, lambda: (agent._emit(agent.engine.observe(fork_storm_crossing(4242, 80))),
                                       agent._schedule()))
        started = time.monotonic()
        await agent.run(1.5)
        return time.monotonic() - started

    asyncio.run(scenario())
    kinds = [a["status"] for a in sink.alerts]
    assert kinds == ["open", "resolved"], kinds
    assert agent.funnel.ticks <= 2  # the first housekeeping and the one at stop: the resolution had its own wake-up


def test_alerts_carry_the_remediation_decision_and_its_changes_reach_every_sink():
    """Once remediation decided on an incident, every alert of it carries the decision, and each change
    of the decision sends the incident's last alert again (same id) to every sink but remediation."""
    sink, remediation = Collect(), Collect()
    remediation.name = "remediation"
    agent = Agent(AgentConfig(), fork_storm_rules(), [], plain_enricher(), [sink, remediation])
    crossing = fork_storm_crossing(4242, 80)
    agent._emit(agent.engine.observe(crossing))
    [opened] = sink.alerts
    assert "remediation" not in opened and remediation.alerts == [opened]  # no decision yet
    incident = opened["incident_id"]
    done = {"decision_id": "d1", "status": "done", "summary": "done: kill_tree", "outcome": None}
    agent.view.remediation_changed(incident, done, source=remediation)
    assert [a["id"] for a in sink.alerts] == [opened["id"]] * 2 and sink.alerts[1]["remediation"] == done
    assert sink.alerts[1]["status"] == "open" and "remediation" not in opened  # a new dict, the first untouched
    assert len(remediation.alerts) == 1  # never told of its own decision as an alert
    agent.view.remediation_changed(incident, done, source=remediation)
    assert len(sink.alerts) == 2  # nothing changed: nothing sent
    # The resolved alert, built after the decision, carries it.
    agent._emit(agent.engine.tick(crossing.window_start_ns + 10 * NS))
    resolved = sink.alerts[2]
    assert resolved["status"] == "resolved" and resolved["remediation"] == done
    assert remediation.alerts[-1]["remediation"] == done
    # The outcome arrives after the incident resolved: its last alert (the resolved one) goes again.
    helped = dict(done, outcome={"resolved": True, "text": "resolved 0.1s after the action"})
    agent.view.remediation_changed(incident, helped, source=remediation)
    assert sink.alerts[3]["id"] == resolved["id"] and sink.alerts[3]["remediation"] == helped
    assert agent.funnel.alert_updates == 2 and len(remediation.alerts) == 2
    # An incident whose alert has not left the agent yet only remembers the decision.
    agent.view.remediation_changed("unknown-incident", done, source=remediation)
    assert len(sink.alerts) == 4
