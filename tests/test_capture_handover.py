"""The pieces of a capture's hand-over (tasks/capture.py): what a run that waits for the capture
lock keeps of its feed, and how what it kept goes on from the chain's end once it holds the lock.
The hand-over itself, against real servers, is in tests/test_capture_engine.py."""

from __future__ import annotations

from typing import Any

import pytest

from blocks.source import ChangeBatch
from tasks import capture as tc


def _changes(*positions: int, size: int = 0) -> list[tuple[str, bytes, bytes, int, dict[str, Any]]]:
    return [("put", b"k%d" % p, b"v" * size, p, {}) for p in positions]


def test_a_waiting_run_keeps_at_most_its_budget_dropping_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tc, "AHEAD_BYTES", 1000)
    b = tc._Batches(bounded=True)
    for p in range(1, 11):  # ten batches of ~264 bytes: about four fit
        b.put(ChangeBatch(_changes(p, size=200), p))
    assert b.dropped_to > 0 and b.bytes <= 1000 + 264
    kept = []
    while True:
        try:
            kept.append(b.get(timeout=0)[1].position)
        except Exception:  # noqa: BLE001 - queue.Empty: all taken
            break
    assert kept == list(range(b.dropped_to + 1, 11)), kept  # the newest, in order, nothing skipped
    assert b.bytes == 0


def test_one_batch_over_the_budget_is_kept_and_an_unbounded_buffer_drops_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tc, "AHEAD_BYTES", 100)
    b = tc._Batches(bounded=True)
    b.put(ChangeBatch(_changes(1, size=500), 1))
    assert b.dropped_to == 0 and b.get(timeout=0)[1].position == 1
    u = tc._Batches(bounded=False)
    for p in range(1, 6):
        u.put(ChangeBatch(_changes(p, size=500), p))
    assert u.dropped_to == 0 and [u.get(timeout=0)[1].position for _ in range(5)] == [1, 2, 3, 4, 5]


def test_the_feeds_end_and_its_catching_up_are_noted() -> None:
    b = tc._Batches(bounded=True)
    b.put(ChangeBatch(_changes(1), 1, resync=True, more=True))
    assert not b.synced and not b.ended
    b.put(ChangeBatch(_changes(2), 2, resync=True, continued=True))
    assert b.synced
    e = tc._Batches(bounded=True)
    e.put(ChangeBatch([], 5, progress=True))
    assert e.synced
    e.put(RuntimeError("lost"))
    assert e.ended


def test_an_exact_feed_drops_what_the_chain_holds() -> None:
    b = ChangeBatch(_changes(8, 9, 10, 11), 11)
    got = tc._past(b, 9)
    assert [c[3] for c in got.changes] == [10, 11] and got.position == 11 and not got.progress
    assert tc._past(ChangeBatch(_changes(4, 5), 5), 9).changes == []
    assert tc._past(b, 7) is b  # nothing held: as it came
    p = ChangeBatch([], 6, progress=True)
    assert tc._past(p, 9) is p


def test_a_resync_feed_keeps_everything_past_the_chains_end_in_order() -> None:
    held = 20
    lift = tc._Lift(held)
    progress = ChangeBatch([], 10, progress=True)
    assert lift(progress) is progress
    resync = lift(ChangeBatch(_changes(12, 12, 12), 12, resync=True, more=True))
    assert [c[3] for c in resync.changes] == [21, 21, 21] and resync.resync and resync.more
    last = lift(ChangeBatch(_changes(12), 15, resync=True, continued=True))
    assert [c[3] for c in last.changes] == [21] and last.position == 21 and last.continued and not last.more
    # seen after the resync: none dropped, each batch above the one before (a change seen later
    # never shares a position a segment sealed before it covered)
    seen = lift(ChangeBatch(_changes(16, 19, 21), 21))
    assert [c[3] for c in seen.changes] == [22, 22, 22] and seen.position == 22
    then = lift(ChangeBatch(_changes(22), 22))
    assert [c[3] for c in then.changes] == [23] and then.position == 23
    later = ChangeBatch(_changes(30, 31), 31)
    assert lift(later) is later  # the feed's own positions are past them: as they come from now on
    assert lift(ChangeBatch(_changes(24), 24)).changes[0][3] == 24  # (no longer lifted)


def test_a_resync_past_the_chains_end_is_not_lifted_and_an_empty_one_is() -> None:
    lift = tc._Lift(20)
    ahead = ChangeBatch(_changes(25, 25), 25, resync=True)
    assert lift(ahead) is ahead
    after = ChangeBatch(_changes(25), 25)
    assert lift(after) is after  # (a killed run's successor: nothing to lift)
    empty = tc._Lift(20)(ChangeBatch([], 15, resync=True))
    assert empty.position == 21 and empty.resync
    ident = tc._adjust(None, exact=False)
    assert ident(later := ChangeBatch(_changes(3), 3)) is later
