from ksift.rules.windows import KeyedWindows

S = 1_000_000_000


def test_consecutive_hot_windows_form_one_run():
    w = KeyedWindows(window_ns=S)
    w.add(7, start_ns=0, seen_ns=100, count=60)
    w.add(7, start_ns=S, seen_ns=S + 100, count=70)
    w.add(7, start_ns=2 * S + 5, seen_ns=2 * S + 200, count=55)
    assert w.run_start_ns(7) == 0
    assert w.sustained_ns(7) == 2 * S + 200


def test_a_quiet_window_breaks_the_run():
    w = KeyedWindows(window_ns=S)
    w.add(7, start_ns=0, seen_ns=10, count=60)
    w.add(7, start_ns=int(3.5 * S), seen_ns=int(3.5 * S) + 10, count=60)
    assert w.run_start_ns(7) == int(3.5 * S)
    assert w.sustained_ns(7) == 10


def test_same_window_reported_twice_keeps_one_entry_with_max_count():
    w = KeyedWindows(window_ns=S)
    w.add(1, start_ns=0, seen_ns=10, count=51)
    w.add(1, start_ns=0, seen_ns=20, count=53)
    assert w.last(1).count == 53 and w.last(1).seen_ns == 20
    assert w.run_start_ns(1) == 0


def test_quiet_since_needs_a_whole_window_after_the_last_hot_one():
    w = KeyedWindows(window_ns=S)
    w.add(1, start_ns=0, seen_ns=10, count=60)
    assert not w.quiet_since(1, int(1.9 * S))
    assert w.quiet_since(1, 2 * S)
    assert w.quiet_since(99, 0)  # never hot


def test_keys_are_bounded_and_least_recent_goes_first():
    w = KeyedWindows(window_ns=S, max_keys=2)
    w.add(1, 0, 1, 60)
    w.add(2, 0, 2, 60)
    w.add(1, S, S + 1, 60)  # 1 is now the most recent
    w.add(3, 0, 3, 60)
    assert w.last(2) is None and w.last(1) is not None and w.last(3) is not None
    assert len(w) == 2 and w.evicted == 1


def test_windows_per_key_are_bounded():
    w = KeyedWindows(window_ns=S, per_key=3)
    for i in range(10):
        w.add(1, i * S, i * S + 1, 60)
    assert w.run_start_ns(1) == 7 * S  # only the newest 3 are remembered


def test_idle_keys_are_evicted():
    w = KeyedWindows(window_ns=S, idle_ns=5 * S)
    w.add(1, 0, 10, 60)
    w.add(2, 4 * S, 4 * S, 60)
    assert w.evict_idle(6 * S) == 1
    assert w.last(1) is None and w.last(2) is not None
