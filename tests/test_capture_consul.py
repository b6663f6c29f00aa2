"""Point-in-time recovery for Consul (issue 19): ``burrow capture`` follows a prefix with
blocking queries while a steady writer creates, updates (with flags) and deletes keys; a
capture SIGKILLed and started again resyncs; ``burrow restore --at`` each instant the test
recorded with Consul's HTTP API equals that state key by key, values and flags."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kvutil import consul_client, consul_snapshot, unique
from test_capture_etcd import Capture, _backup, _restore, _segments, _wait_for

from burrow.keys import keygen


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "capture.key"
    keygen(path, x25519=False)
    return path


def _covered(store: Path, source: str, index: int) -> bool:
    return any(m["last_position"] >= index and not m.get("catching_up") for m in _segments(store, source))


class Writer:
    """About ``rate`` changes a second under ``prefix``: creates, updates with flags, deletes."""

    def __init__(self, url: str, prefix: str, rate: float = 50.0) -> None:
        self.c = consul_client(url)
        self.prefix, self.rate = prefix, rate
        self.run, self.idle, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.run.set()
        self.changes = 0
        self.rng = random.Random(19)
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        live: list[str] = []
        n = 0
        while not self.stop.is_set():
            if not self.run.is_set():
                self.idle.set()
                self.run.wait(0.1)
                continue
            self.idle.clear()
            started = time.monotonic()
            roll = self.rng.random()
            if live and roll < 0.2:
                self.c.kv.delete(live.pop(self.rng.randrange(len(live))))
            elif live and roll < 0.6:
                self.c.kv.put(self.rng.choice(live), f"u{n}", flags=n % 7)
            else:
                k = f"{self.prefix}/k{n:06d}"
                self.c.kv.put(k, f"c{n}", flags=n % 5)
                live.append(k)
            n += 1
            self.changes += 1
            time.sleep(max(0.0, 1.0 / self.rate - (time.monotonic() - started)))
        self.idle.set()

    def pause(self) -> None:
        self.run.clear()
        _wait_for("the writer to pause", self.idle.is_set)


@pytest.mark.timeout(1800)  # a hang guard: many CLI runs, each a flow, on a busy machine
def test_restore_at_each_instant_equals_the_source_across_a_killed_capture(consul_a, store, key) -> None:
    c = consul_client(consul_a.url)
    prefix = unique("pitr")
    for i in range(20):
        c.kv.put(f"{prefix}/seed{i:02d}", f"s{i}", flags=i)
    url = f"consul://{consul_a.host}:{consul_a.port}/{prefix}"
    name = unique("src")
    _backup(url, store, name, key)
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
        _wait_for(f"a sealed segment up to index {index}", lambda index=index: _covered(store, name, int(index)),
                  cap.proc)
        recorded.append((datetime.now(UTC).isoformat().replace("+00:00", "Z"), state))
        writer.run.set()
    writer.stop.set()
    writer.thread.join()
    c.kv.put(f"{prefix}/last", "the window reaches past every recorded instant")
    index, _ = c.kv.get(prefix + "/", recurse=True)
    _wait_for("the last sealed segment", lambda: _covered(store, name, int(index)), cap.proc)
    cap.kill()
    assert writer.changes > 200

    manifests = _segments(store, name)
    assert sum(1 for m in manifests if m.get("resync")) >= 2, "the restarted capture did not resync"
    assert not any(m.get("gap") for m in manifests)

    for i, (at, state) in enumerate(recorded):
        target = unique(f"at{i}")
        r = _restore(store, name, key, f"consul://{consul_a.host}:{consul_a.port}/{target}", "--at", at)
        assert r.returncode == 0, (at, r.stderr[-3000:])
        got = {k[len(target):]: v for k, v in consul_snapshot(c, target + "/").items()}
        want = {k[len(prefix):]: v for k, v in state.items()}
        assert got == want, f"restore --at {at} differs: {len(got)} keys against {len(want)}"
