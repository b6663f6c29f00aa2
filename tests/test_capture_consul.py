"""Point-in-time recovery for Consul (issue 19): ``burrow capture`` follows a prefix with
blocking queries while a steady writer creates, updates (with flags) and deletes keys; a
capture SIGKILLed and started again resyncs; ``burrow restore --at`` each instant the test
recorded with Consul's HTTP API equals that state key by key, values and flags."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from captureutil import (  # capture_key: the key fixture
    Capture,
    SteadyWriter,
    backup,
    capture_key,  # noqa: F401
    covered,
    restore,
    segments,
    wait_for,
)
from kvutil import consul_client, consul_snapshot, unique


class Writer(SteadyWriter):
    """About ``rate`` changes a second under ``prefix``: creates, updates with flags, deletes."""

    def __init__(self, url: str, prefix: str, rate: float = 50.0) -> None:
        super().__init__(rate)
        self.c = consul_client(url)
        self.prefix = prefix
        self.live: list[str] = []

    def change(self, n: int) -> None:
        roll = self.rng.random()
        if self.live and roll < 0.2:
            self.c.kv.delete(self.live.pop(self.rng.randrange(len(self.live))))
        elif self.live and roll < 0.6:
            self.c.kv.put(self.rng.choice(self.live), f"u{n}", flags=n % 7)
        else:
            k = f"{self.prefix}/k{n:06d}"
            self.c.kv.put(k, f"c{n}", flags=n % 5)
            self.live.append(k)


@pytest.mark.timeout(1800)  # a hang guard: many CLI runs, each a flow, on a busy machine
def test_restore_at_each_instant_equals_the_source_across_a_killed_capture(consul_a, store, key) -> None:
    c = consul_client(consul_a.url)
    prefix = unique("pitr")
    for i in range(20):
        c.kv.put(f"{prefix}/seed{i:02d}", f"s{i}", flags=i)
    url = f"consul://{consul_a.host}:{consul_a.port}/{prefix}"
    name = unique("src")
    backup(url, store, name, key)
    cap = Capture(url, store, name, key)
    writer = Writer(consul_a.url, prefix)
    writer.thread.start()
    recorded: list[tuple[str, dict]] = []
    for i in range(4):
        time.sleep(3.0)
        if i == 2:
            cap.kill()  # the writer running
            cap = Capture(url, store, name, key)
        writer.pause()
        index, _ = c.kv.get(prefix + "/", recurse=True)
        state = consul_snapshot(c, prefix + "/")
        wait_for(f"a sealed segment up to index {index}", lambda index=index: covered(store, name, int(index)),
                  cap.proc)
        recorded.append((datetime.now(UTC).isoformat().replace("+00:00", "Z"), state))
        writer.run.set()
    writer.stop.set()
    writer.thread.join()
    c.kv.put(f"{prefix}/last", "the window reaches past every recorded instant")
    index, _ = c.kv.get(prefix + "/", recurse=True)
    wait_for("the last sealed segment", lambda: covered(store, name, int(index)), cap.proc)
    cap.kill()
    assert writer.changes > 200

    manifests = segments(store, name)
    assert sum(1 for m in manifests if m.get("resync")) >= 2, "the restarted capture did not resync"
    assert not any(m.get("gap") for m in manifests)

    for i, (at, state) in enumerate(recorded):
        target = unique(f"at{i}")
        r = restore(store, name, key, f"consul://{consul_a.host}:{consul_a.port}/{target}", "--at", at)
        assert r.returncode == 0, (at, r.stderr[-3000:])
        got = {k[len(target):]: v for k, v in consul_snapshot(c, target + "/").items()}
        want = {k[len(prefix):]: v for k, v in state.items()}
        assert got == want, f"restore --at {at} differs: {len(got)} keys against {len(want)}"
