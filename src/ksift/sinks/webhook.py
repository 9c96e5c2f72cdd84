"""Generic webhook sink: each alert is POSTed as the JSON object every sink receives.

The body is exactly the alert documented in docs/alerts.md (one object per
request, Content-Type application/json); delivery, retries and counters are
the shared core's (ksift.sinks.delivery).
"""

from __future__ import annotations

from ksift.sinks.delivery import DeliverySink


class WebhookSink(DeliverySink):
    kind = "webhook"
