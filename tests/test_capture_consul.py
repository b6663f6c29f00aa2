"""Point-in-time recovery for Consul (issue 19, "Correctness"): one run, built once for the
module, where a steady writer creates, updates (with flags) and deletes keys at 100 changes/s for
60 s of writing while ``burrow capture`` follows the prefix with blocking queries; it pauses every
10 s and the test records the prefix then through Consul's HTTP API (values and flags). The
capture is SIGKILLed at a random point (seeded, printed) and started again at once: it resyncs.
After the run a new full backup and a short capture make the source's second chain.

The tests read that run: ``burrow restore --at`` each recorded instant, into an empty prefix of
another server, equals the recorded state key by key, values and flags, the instants after the
kill included; the restarted capture resynced; a tampered, reordered, missing or foreign segment
is refused before anything is written."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from captureutil import (
    ATTACKS,
    PAUSES,
    RATE,
    Capture,
    Following,
    Run,
    SteadyWriter,
    assert_refused_before_any_write,
    backup,
    break_chain,
    chain_of,
    check_writer_run,
    covered,
    full_archives,
    make_key,
    restore,
    resyncs,
    seeded,
    to_us,
    wait_for,
    writer_run,
)
from kvutil import consul_client, consul_snapshot, unique

#: A hang guard for the module: its first test waits for the one writer run (several minutes on a
#: busy machine), then many CLI runs, each a flow.
pytestmark = pytest.mark.timeout(1500)


class Writer(SteadyWriter):
    """About ``rate`` changes a second under ``prefix``: creates, updates with flags, deletes."""

    def __init__(self, url: str, prefix: str, rate: float = RATE, rng: random.Random | None = None) -> None:
        super().__init__(rate, rng)
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


def _relative(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items()}


@pytest.fixture(scope="module")
def consul_run(consul_a: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """The module's one writer run (see the module's docstring)."""
    rng, seed = seeded("Consul capture run")
    work = tmp_path_factory.mktemp("consul-run")
    key = make_key(work / "key")
    store = work / "store"
    store.mkdir()
    c = consul_client(consul_a.url)
    prefix = unique("pitr")
    for i in range(20):
        c.kv.put(f"{prefix}/seed{i:02d}", f"s{i}", flags=i)
    url = f"consul://{consul_a.host}:{consul_a.port}/{prefix}"
    name = unique("src")
    backup(url, store, name, key)
    run = Run(store, name, key, seed, base=full_archives(store, name)[0])

    def index() -> int:
        return int(c.kv.get(prefix + "/", recurse=True)[0])

    follow = Following(url, store, name, key)
    writer = Writer(consul_a.url, prefix, rng=random.Random(rng.random()))
    try:
        writer_run(run, follow, writer, read_state=lambda: _relative(consul_snapshot(c, prefix + "/"), prefix),
                   position=index, rng=rng)
        c.kv.put(f"{prefix}/last", "the window reaches past every recorded instant")
        last = index()
        follow.wait("the last sealed segment", lambda: covered(store, name, last))
        follow.cap.stop()
    finally:
        follow.cap.kill()
    # the source's second chain, after a newer full archive: where the foreign segment comes from
    backup(url, store, name, key)
    cap = Capture(url, store, name, key)
    try:
        c.kv.put(f"{prefix}/second", "2")
        second = index()
        wait_for("the second chain", lambda: covered(store, name, second) and any(
            m["base"]["name"] != run.base for m in chain_of(store, name, full_archives(store, name)[-1])), cap.proc)
    finally:
        cap.kill()
    yield run


def _target(consul_b: Any, label: str) -> tuple[str, str]:
    prefix = unique(label)
    return f"consul://{consul_b.host}:{consul_b.port}/{prefix}", prefix


def _restored(consul_b: Any, prefix: str) -> dict[str, Any]:
    return _relative(consul_snapshot(consul_client(consul_b.url), prefix + "/"), prefix)


def test_the_writer_made_its_changes(consul_run: Run) -> None:
    check_writer_run(consul_run)


@pytest.mark.parametrize("pause", range(PAUSES))
def test_restore_at_each_recorded_instant_equals_the_source_then(consul_run: Run, consul_b: Any, pause: int) -> None:
    instant = consul_run.instants[pause]
    url, prefix = _target(consul_b, f"at{pause}")
    r = restore(consul_run.store, consul_run.name, consul_run.key, url, "--at", instant.at)
    assert r.returncode == 0, (instant.at, consul_run.seed, r.stderr[-3000:])
    got = _restored(consul_b, prefix)
    assert got == instant.state, (f"restore --at {instant.at} (index {instant.position}, seed {consul_run.seed}) "
                                  f"differs: {len(got)} keys against {len(instant.state)}")
    assert any(flags for _, flags, _ in got.values()), "no key with flags to compare"


def test_the_capture_killed_at_a_random_point_resynced(consul_run: Run) -> None:
    """The capture started again after the SIGKILL continued the chain with a resync (the whole
    prefix as it was then): no gap, and the chain whole from its base to its end."""
    chain = chain_of(consul_run.store, consul_run.name, consul_run.base)
    assert not any(m.get("gap") for m in chain)
    for a, b in zip(chain, chain[1:], strict=False):
        assert b["first_position"] == a["last_position"] + 1 and b["prev"]["name"].endswith(a["_path"].name)
    killed = to_us(consul_run.killed_at)
    found = resyncs(chain)
    assert found and to_us(found[0]["first_time"]) < killed, "the first capture did not start with a resync"
    assert any(to_us(m["first_time"]) > killed for m in found), "the capture started again did not resync"
    assert any(to_us(i.at) > killed for i in consul_run.instants), "no instant recorded after the kill"


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_broken_chain_is_refused_before_any_write(consul_run: Run, consul_b: Any, tmp_path: Path,
                                                    attack: str) -> None:
    """A segment of the chain a restore to one of the run's instants reads is tampered with,
    swapped with its successor, removed, or replaced by a segment of the source's second chain:
    the restore exits 1 naming it, and the target stays empty."""
    foreign = chain_of(consul_run.store, consul_run.name, full_archives(consul_run.store, consul_run.name)[-1])[-1]
    copy, instant, names = break_chain(consul_run, attack, foreign["_path"], tmp_path)
    url, prefix = _target(consul_b, "broken")
    r = restore(copy, consul_run.name, consul_run.key, url, "--at", instant.at)
    assert_refused_before_any_write(r, attack, names, lambda: _restored(consul_b, prefix))
