"""Consul's change feed (blocks/consul.py ``ConsulWatch``) when the agent's index goes backwards:
the cluster behind the address was rebuilt (here: a dev agent restarted empty on the same port)
between two reads. The next answer is a resync, the whole prefix as it is now, and the positions
keep growing along the chain, so the chain's order and the restore's "up to position" still hold.

The feed is a generator: it reads only when asked for its next batch, so the test restarts the
agent between two batches, with no timing involved."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kvutil import consul_client

from blocks.consul import ConsulCluster, ConsulWatch
from blocks.source import ChangeBatch
from burrow.testing.servers import start_consul

pytestmark = pytest.mark.timeout(300)  # a hang guard: two agent starts on a busy machine


def _whole(feed: Iterator[ChangeBatch]) -> tuple[list[ChangeBatch], dict[bytes, bytes]]:
    """The next batches up to a whole resync, or one batch of changes: ``(batches, puts)``."""
    batches = [next(feed)]
    while batches[-1].more:
        batches.append(next(feed))
    puts = {k: v for b in batches for op, k, v, _, _ in b.changes if op == "put"}
    return batches, puts


def _next_with_changes(feed: Iterator[ChangeBatch]) -> ChangeBatch:
    """The next batch that carries changes (progress reports in between are passed by)."""
    while True:
        b = next(feed)
        if b.changes or b.resync:
            return b


def test_an_index_that_goes_backwards_is_a_resync_and_positions_keep_growing(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(ConsulWatch, "MIN_INTERVAL", 0.0)
    first = start_consul(tmp_path / "first")
    port = first.port
    second = None
    try:
        c = consul_client(first.url)
        for i in range(40):  # raise the first agent's index well above a fresh agent's
            c.kv.put(f"app/k{i:02d}", f"v{i}")
        session = ConsulCluster(address=f"127.0.0.1:{port}", prefix="app").connect()
        try:
            feed = iter(session.watch(0))
            batches, puts = _whole(feed)
            assert all(b.resync for b in batches), "the first answer is a resync"
            assert puts == {f"k{i:02d}".encode(): f"v{i}".encode() for i in range(40)}
            before = batches[-1].position

            c.kv.put("app/k00", "changed")
            b = _next_with_changes(feed)
            assert not b.resync
            assert [(op, k, v) for op, k, v, _, _ in b.changes] == [("put", b"k00", b"changed")]
            assert b.position > before
            before = max([b.position] + [pos for *_, pos, _ in b.changes])
            old_index = int(c.kv.get("app/", recurse=True)[0])

            # the agent is rebuilt between two reads: empty, then two keys, one of them an old name
            first.stop()
            second = start_consul(tmp_path / "second", port=port)
            c2 = consul_client(second.url)
            c2.kv.put("app/k01", "rebuilt")
            c2.kv.put("app/fresh", "new")
            assert int(c2.kv.get("app/", recurse=True)[0]) < old_index, "the rebuilt agent's index is lower"

            batches, puts = _whole(feed)
            assert batches[0].resync and not batches[0].continued, "a lower index starts a resync"
            assert all(b.resync for b in batches)
            # the whole prefix as it is now: the 39 keys the rebuilt agent lacks are gone with it
            assert puts == {b"k01": b"rebuilt", b"fresh": b"new"}
            assert {op for b in batches for op, *_ in b.changes} == {"put"}
            positions = [b.position for b in batches] + [pos for b in batches for *_, pos, _ in b.changes]
            assert min(positions) > before, "positions keep growing past the index that went back"

            # and the feed goes on from the rebuilt agent's index: a change there is a change
            c2.kv.put("app/fresh", "newer")
            b = _next_with_changes(feed)
            assert not b.resync
            assert [(op, k, v) for op, k, v, _, _ in b.changes] == [("put", b"fresh", b"newer")]
            assert b.position > max(positions)
        finally:
            session.close()
    finally:
        first.stop()
        if second is not None:
            second.stop()
