"""Alertmanager sink: alerts POSTed to the v2 API (POST <url>/api/v2/alerts).

Each ksift alert becomes one postable alert:

  labels       alertname (the rule), severity, instance (this host), and when
               known pid, comm, container, namespace, pod; plus static labels
               from the config. Labels are the alert's identity in
               Alertmanager, so the open and the resolved alert of an incident
               carry the same set (its context is captured once).
  annotations  summary (the alert sentence), description (the text block the
               console prints), incident_id
  startsAt     when the incident's first hot window began
  endsAt       only on resolution: when it resolved. An open alert has none, so
               Alertmanager expires it after its resolve_timeout (5m by
               default) unless it is re-posted: the sink re-posts every open
               alert each resend_interval_s, as Prometheus does, and stops
               once the incident resolves.
  generatorURL optional, from the config ("{incident_id}" is replaced).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ksift.sinks.console import CONTAINER_ID_CHARS, format_alert_text
from ksift.sinks.delivery import DeliverySettings, DeliverySink

logger = logging.getLogger(__name__)

API_PATH = "/api/v2/alerts"
MAX_TRACKED_OPEN = 10_000  # open alerts remembered for re-posting; the oldest go first


class AlertmanagerSink(DeliverySink):
    kind = "alertmanager"

    def __init__(
        self,
        settings: DeliverySettings,
        instance: str,
        static_labels: Mapping[str, str] = MappingProxyType({}),
        generator_url: str | None = None,
        resend_interval_s: float = 60.0,
        **kwargs: Any,
    ):
        super().__init__(settings, **kwargs)
        self.instance = instance
        self.static_labels = dict(static_labels)
        self.generator_url = generator_url
        self.resend_interval_s = resend_interval_s
        self.resent = 0
        self._open: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._resender: asyncio.Task | None = None

    def render(self, alert: dict[str, Any]) -> dict[str, Any]:
        return postable_alert(alert, self.instance, self.static_labels, self.generator_url)

    def encode(self, payload: Any) -> bytes:
        return super().encode([payload])  # the API takes a list

    def on_queued(self, alert: dict[str, Any], payload: Any) -> None:
        incident = alert.get("incident_id")
        if not incident:
            return
        if alert.get("status") == "resolved":
            self._open.pop(incident, None)
            return
        self._open[incident] = payload
        self._open.move_to_end(incident)
        while len(self._open) > MAX_TRACKED_OPEN:
            self._open.popitem(last=False)

    async def start(self) -> None:
        await super().start()
        if self.resend_interval_s > 0 and self._resender is None:
            self._resender = asyncio.create_task(self._resend_loop(), name=f"ksift-sink-{self.name}-resend")

    async def stop(self) -> None:
        if self._resender is not None:
            self._resender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resender
            self._resender = None
        await super().stop()

    def counters(self) -> dict[str, int]:
        return dict(super().counters(), resent=self.resent, open_tracked=len(self._open))

    async def _resend_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resend_interval_s)
            self.resend_open()

    def resend_open(self) -> None:
        """Queue every open alert again so Alertmanager keeps it active."""
        for incident, payload in list(self._open.items()):
            # Re-posts are a keep-alive: never let them push new alerts out of a busy queue.
            if self._queue.qsize() >= max(1, self.settings.queue_size // 2):
                break
            self.resent += 1
            self.enqueue(incident, payload)


def alerts_url(base: str) -> str:
    """The v2 alerts endpoint for a configured Alertmanager URL (base or full path)."""
    base = base.rstrip("/")
    return base if base.endswith(API_PATH) else base + API_PATH


def postable_alert(alert: dict[str, Any], instance: str, static_labels: Mapping[str, str] | None = None,
                   generator_url: str | None = None) -> dict[str, Any]:
    """One ksift alert as an Alertmanager v2 postable alert."""
    subject = alert.get("subject") if isinstance(alert.get("subject"), dict) else {}
    labels: dict[str, str] = dict(static_labels or {})
    labels.update(alertname=str(alert.get("rule") or "ksift"), severity=str(alert.get("severity") or "info"))
    if instance:
        labels["instance"] = instance
    container = subject.get("container_name") or (str(subject["container_id"])[:CONTAINER_ID_CHARS]
                                                  if subject.get("container_id") else None)
    for name, value in (("pid", subject.get("pid")), ("comm", subject.get("comm")), ("container", container),
                        ("namespace", subject.get("pod_namespace")), ("pod", subject.get("pod_name"))):
        if value not in (None, ""):
            labels[name] = str(value)

    annotations = {"summary": str(alert.get("summary") or ""), "description": format_alert_text(alert).strip()}
    if alert.get("incident_id"):
        annotations["incident_id"] = str(alert["incident_id"])
    postable: dict[str, Any] = {"labels": labels, "annotations": annotations}
    if alert.get("started_at"):
        postable["startsAt"] = alert["started_at"]
    if alert.get("status") == "resolved":
        postable["endsAt"] = alert.get("resolved_at") or alert.get("ts")
    if generator_url:
        postable["generatorURL"] = generator_url.replace("{incident_id}", str(alert.get("incident_id") or ""))
    return postable
