"""Sink that records alerts in the local SQLite history."""

from __future__ import annotations

import logging
from typing import Any

from ksift.errors import StoreError
from ksift.store.sqlite import AlertStore

logger = logging.getLogger(__name__)


class StoreSink:
    """Writes each alert to an AlertStore. Closing the sink closes the store."""

    name = "store"

    def __init__(self, store: AlertStore):
        self.store = store
        self.delivered = 0
        self.failed = 0

    def emit(self, alert: dict[str, Any]) -> None:
        try:
            self.store.add(alert)
        except StoreError as exc:
            self.failed += 1
            logger.warning("store sink: alert %s not saved: %s", _alert_id(alert), exc)
        except Exception:
            # A sink must never raise into the agent, even on a bug.
            self.failed += 1
            logger.exception("store sink: unexpected error saving alert %s", _alert_id(alert))
        else:
            self.delivered += 1

    def close(self) -> None:
        try:
            self.store.close()
        except Exception as exc:
            logger.warning("store sink: closing %s failed: %s", self.store.path, exc)


def _alert_id(alert: Any) -> str:
    return str(alert.get("id")) if isinstance(alert, dict) else "<not a dict>"
