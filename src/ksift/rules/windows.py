"""Per-key windows in user space: bounded, evicted when idle, on kernel time.

The kernel counts events in fixed windows and reports a key only when a window
crosses the threshold. Here we remember, per key, the recent over-threshold
windows so rules can ask "has this key been over its threshold continuously
for `sustain`?" and "has it been quiet for a whole window?".
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Hashable


@dataclass(frozen=True)
class HotWindow:
    """One kernel window that went over the threshold."""

    start_ns: int
    seen_ns: int  # kernel time of the crossing report
    count: int


class KeyedWindows:
    """Recent hot windows per key, bounded in keys and in windows per key.

    `window_ns` is the rule's window; two hot windows belong to the same run
    when the second starts before the first one's following window ended.
    """

    def __init__(self, window_ns: int, max_keys: int = 10_000, per_key: int = 64, idle_ns: int | None = None):
        if window_ns <= 0:
            raise ValueError("window_ns must be positive")
        self.window_ns = window_ns
        self.max_keys = max_keys
        self.per_key = per_key
        self.idle_ns = idle_ns if idle_ns is not None else 10 * window_ns
        self._keys: OrderedDict[Hashable, deque[HotWindow]] = OrderedDict()
        self.evicted = 0  # keys dropped for room or idleness

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: Hashable, start_ns: int, seen_ns: int, count: int) -> None:
        hist = self._keys.get(key)
        if hist is None:
            if len(self._keys) >= self.max_keys:
                self._keys.popitem(last=False)  # least recently hot key
                self.evicted += 1
            hist = self._keys[key] = deque(maxlen=self.per_key)
        else:
            self._keys.move_to_end(key)
        if hist and hist[-1].start_ns == start_ns:
            # Same window reported again (two CPUs raced): keep the larger count.
            hist[-1] = HotWindow(start_ns, max(seen_ns, hist[-1].seen_ns), max(count, hist[-1].count))
        else:
            hist.append(HotWindow(start_ns, seen_ns, count))

    def run_start_ns(self, key: Hashable) -> int | None:
        """Start of the current unbroken run of hot windows for key."""
        hist = self._keys.get(key)
        if not hist:
            return None
        start = hist[-1].start_ns
        for older in reversed(list(hist)[:-1]):
            # A gap of a whole quiet window between them breaks the run.
            if start - older.start_ns > 2 * self.window_ns:
                break
            start = older.start_ns
        return start

    def sustained_ns(self, key: Hashable) -> int:
        """How long key has been over its threshold without a quiet window."""
        hist = self._keys.get(key)
        start = self.run_start_ns(key)
        if start is None or not hist:
            return 0
        return hist[-1].seen_ns - start

    def last(self, key: Hashable) -> HotWindow | None:
        hist = self._keys.get(key)
        return hist[-1] if hist else None

    def quiet_since(self, key: Hashable, now_ns: int) -> bool:
        """True when a whole window passed after the last hot window ended."""
        last = self.last(key)
        return last is None or now_ns >= last.start_ns + 2 * self.window_ns

    def forget(self, key: Hashable) -> None:
        self._keys.pop(key, None)

    def evict_idle(self, now_ns: int) -> int:
        """Drop keys with no hot window for idle_ns; returns how many."""
        stale = [k for k, h in self._keys.items() if not h or now_ns - h[-1].seen_ns > self.idle_ns]
        for key in stale:
            del self._keys[key]
        self.evicted += len(stale)
        return len(stale)
