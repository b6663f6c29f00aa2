"""Point-in-time recovery for etcd (issue 19, "Correctness"): one run, built once for the module,
where a steady writer creates, updates and deletes keys at 100 changes/s for 60 s of writing while
``burrow capture`` follows the prefix; it pauses every 10 s and the test records the prefix then
through etcd's own API (its JSON gateway). The capture is SIGKILLed at a random point (seeded,
printed) and started again at once; after the run, with capture stopped, etcd is compacted past
the chain's end and capture started again.

The tests read that run: ``burrow restore --at`` each recorded instant, into an empty prefix of
another server, equals the recorded state key by key; ``--at-revision R`` equals ``get --prefix
--rev=R`` at random revisions (one made while no capture ran); the killed capture resumed with no
gap; the compaction is a recorded gap followed by a full backup, and a point inside it is refused
with one line naming the restorable window; a tampered, reordered, missing or foreign segment is
refused before anything is written."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from captureutil import (  # capture_key: the key fixture
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
    capture_key,  # noqa: F401
    chain_of,
    check_writer_run,
    cli,
    covered,
    error_lines,
    full_archives,
    make_key,
    now_iso,
    restore,
    seeded,
    segments,
    show_ms,
    to_us,
    wait_for,
    writer_run,
)
from kvutil import Etcd, unique

from burrow.testing.servers import start_etcd


def _relative(snapshot: dict[bytes, bytes], prefix: bytes) -> dict[bytes, bytes]:
    return {k[len(prefix):]: v for k, v in snapshot.items()}


#: A hang guard for the module: its first test waits for the one writer run (several minutes on a
#: busy machine), then many CLI runs, each a flow.
pytestmark = pytest.mark.timeout(1500)


class Writer(SteadyWriter):
    """A steady writer at about ``rate`` changes a second: creates, updates and deletes under
    ``prefix``, pausable."""

    def __init__(self, url: str, prefix: bytes, rate: float = RATE, rng: random.Random | None = None) -> None:
        super().__init__(rate, rng)
        self.e = Etcd(url)
        self.prefix = prefix
        self.live: list[bytes] = []

    def change(self, n: int) -> None:
        roll = self.rng.random()
        if self.live and roll < 0.2:
            self.e.delete(self.live.pop(self.rng.randrange(len(self.live))))
        elif self.live and roll < 0.6:
            self.e.put(self.rng.choice(self.live), b"u%d" % n)
        else:
            key = self.prefix + b"/k%06d" % n
            self.e.put(key, bytes([n % 256]) * (n % 50) + b"c%d" % n)
            self.live.append(key)


@pytest.fixture(scope="module")
def etcd_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """The module's one writer run (see the module's docstring), on a private etcd: its
    compaction is cluster-wide."""
    rng, seed = seeded("etcd capture run")
    work = tmp_path_factory.mktemp("etcd-run")
    etcd = start_etcd(work / "etcd")
    try:
        key = make_key(work / "key")
        store = work / "store"
        store.mkdir()
        e = Etcd(etcd.url)
        prefix = "/" + unique("pitr")
        p = prefix.encode()
        e.put_many({p + b"/seed%03d" % i: b"s%d" % i for i in range(50)})
        url = f"etcd://{etcd.host}:{etcd.port}{prefix}"
        name = unique("src")
        backup(url, store, name, key)
        run = Run(store, name, key, seed, base=full_archives(store, name)[0])
        first_rev = e.revision()
        follow = Following(url, store, name, key)
        writer = Writer(etcd.url, p, rng=random.Random(rng.random()))
        try:
            writer_run(run, follow, writer, read_state=lambda: _relative(e.snapshot(p + b"/"), p),
                       position=e.revision, rng=rng)
            e.put(p + b"/last", b"the window reaches past every recorded instant")
            last_rev = e.revision()
            follow.wait("the last sealed segment", lambda: covered(store, name, last_rev))
            follow.cap.stop()  # capture stopped (its lock released), for the compaction
        finally:
            follow.cap.kill()
        # random revisions, read now: the compaction below takes their history away
        down = range(run.extra["position_at_kill"] + 1, run.extra["position_at_restart"] + 1)
        assert len(down) > 0, "the writer made no change while the capture was down"
        revisions = sorted(rng.sample(range(first_rev, last_rev + 1), 3)) + [rng.choice(down)]
        print(f"{name}: revisions {first_rev} to {last_rev}; checked at {revisions} (the last while no capture ran)")
        run.extra.update(revisions={r: _relative(e.snapshot(p + b"/", r), p) for r in revisions}, down=down)

        # a compaction past the chain's end while capture is stopped
        end = max(m["last_position"] for m in chain_of(store, name, run.base))
        for i in range(20):
            e.put(p + b"/lost%02d" % i, b"x")
        in_gap = now_iso()
        compacted = e.revision()
        e._post("/v3/kv/compaction", {"revision": str(compacted), "physical": True})
        fulls = full_archives(store, name)
        cap = Capture(url, store, name, key)
        try:
            wait_for("a gap segment", lambda: any(m.get("gap") for m in segments(store, name)), cap.proc)
            wait_for("a full backup after the gap", lambda: len(full_archives(store, name)) > len(fulls), cap.proc)
            e.put(p + b"/after", b"a")
            after = e.revision()
            wait_for("the new chain", lambda: covered(store, name, after), cap.proc)
        finally:
            cap.kill()
        run.extra.update(end=end, in_gap=in_gap, compacted=compacted, fulls=fulls,
                         now=_relative(e.snapshot(p + b"/"), p))
        yield run
    finally:
        etcd.stop()


def _target(etcd_b: Any, label: str) -> tuple[str, bytes]:
    path = "/" + unique(label)
    return f"etcd://{etcd_b.host}:{etcd_b.port}{path}", path.encode()


def _restored(etcd_b: Any, path: bytes) -> dict[bytes, bytes]:
    return _relative(Etcd(etcd_b.url).snapshot(path + b"/"), path)


def test_the_writer_made_its_changes(etcd_run: Run) -> None:
    check_writer_run(etcd_run)


@pytest.mark.parametrize("pause", range(PAUSES))
def test_restore_at_each_recorded_instant_equals_the_source_then(etcd_run: Run, etcd_b: Any, pause: int) -> None:
    instant = etcd_run.instants[pause]
    url, path = _target(etcd_b, f"at{pause}")
    r = restore(etcd_run.store, etcd_run.name, etcd_run.key, url, "--at", instant.at)
    assert r.returncode == 0, (instant.at, etcd_run.seed, r.stderr[-3000:])
    got = _restored(etcd_b, path)
    assert got == instant.state, (f"restore --at {instant.at} (revision {instant.position}, seed {etcd_run.seed}) "
                                  f"differs: {len(got)} keys against {len(instant.state)}")


def test_restore_at_random_revisions_equals_get_at_that_revision(etcd_run: Run, etcd_b: Any) -> None:
    for rev, want in etcd_run.extra["revisions"].items():
        url, path = _target(etcd_b, f"rev{rev}")
        r = restore(etcd_run.store, etcd_run.name, etcd_run.key, url, "--at-revision", str(rev))
        assert r.returncode == 0, (rev, etcd_run.seed, r.stderr[-3000:])
        got = _restored(etcd_b, path)
        assert got == want, f"restore --at-revision {rev} (seed {etcd_run.seed}) differs from get --prefix --rev={rev}"


def test_the_capture_killed_at_a_random_point_resumed_with_no_gap(etcd_run: Run) -> None:
    """The chain from the run's full archive is whole, position after position, from the archive
    to the compaction's gap: the SIGKILLed capture left no gap, and the one started again caught
    up from its last sealed revision (``catching_up`` segments after the kill)."""
    chain = chain_of(etcd_run.store, etcd_run.name, etcd_run.base)
    gaps = [m for m in chain if m.get("gap")]
    assert [m["gap"]["from_position"] for m in gaps] == [etcd_run.extra["end"] + 1], "a gap other than the compaction's"
    assert chain[-1] is gaps[0]
    assert chain[0]["first_position"] == chain[0]["base"]["position"] + 1
    for a, b in zip(chain, chain[1:], strict=False):
        assert b["first_position"] == a["last_position"] + 1, (a["_path"].name, b["_path"].name)
        assert b["prev"]["name"].endswith(a["_path"].name)
    down = etcd_run.extra["down"]  # revisions made while no capture ran: in the chain, exact (the revisions test)
    # every revision is in it: on this private server each revision after the archive's is one
    # change of the writer's (a resumed capture that skipped some would still link up by position)
    live = chain[:-1]
    assert sum(m["keys"] for m in live) == live[-1]["last_position"] - chain[0]["base"]["position"], (
        "the chain holds fewer changes than the revisions it spans")
    assert chain[0]["first_position"] <= down.start and down.stop - 1 <= chain[-2]["last_position"]


def test_a_compaction_past_the_chain_end_is_a_recorded_gap_then_a_full_backup(etcd_run: Run) -> None:
    """The capture started after the compaction recorded the lost revisions as a gap closing
    the chain, took a full backup at once, and went on in a new chain from it."""
    x = etcd_run.extra
    gap = chain_of(etcd_run.store, etcd_run.name, etcd_run.base)[-1]["gap"]
    assert (gap["from_position"], gap["to_position"]) == (x["end"] + 1, x["compacted"] - 1), gap
    new_fulls = [f for f in full_archives(etcd_run.store, etcd_run.name) if f not in x["fulls"]]
    assert len(new_fulls) == 1, new_fulls
    new_chain = chain_of(etcd_run.store, etcd_run.name, new_fulls[0])
    assert new_chain and not any(m.get("gap") for m in new_chain)
    assert new_chain[0]["base"]["position"] >= x["compacted"]
    assert new_chain[0]["first_position"] == new_chain[0]["base"]["position"] + 1


def test_a_point_inside_the_gap_is_refused_with_one_line_naming_the_window(etcd_run: Run, etcd_b: Any) -> None:
    x = etcd_run.extra
    r = cli("status", str(etcd_run.store), "--source", etcd_run.name, "--json", "--no-verify", "--key-file",
            str(etcd_run.key), "--max-age", "1h")
    assert r.returncode == 0, r.stderr[-2000:]
    window = json.loads(r.stdout)["sources"][0]["restorable"]
    assert to_us(window["from"]) < to_us(x["in_gap"]) < to_us(window["to"]), window
    assert any(to_us(a) <= to_us(x["in_gap"]) <= to_us(b) for a, b in window["gaps"]), window
    url, path = _target(etcd_b, "gap")
    for point in (["--at", x["in_gap"]], ["--at-revision", str(x["end"] + 5)]):
        r = restore(etcd_run.store, etcd_run.name, etcd_run.key, url, *point)
        assert r.returncode == 1, (point, r.stderr[-2000:])
        errors = error_lines(r)
        assert len(errors) == 1, r.stderr[-2000:]
        line = errors[0]
        assert "restorable window is" in line and show_ms(window["from"]) in line and show_ms(window["to"]) in line, line
        assert any(show_ms(a) in line and show_ms(b) in line for a, b in window["gaps"]), line
    assert _restored(etcd_b, path) == {}, "a refused restore wrote keys"


def test_latest_after_the_gap_restores_the_source_as_it_is(etcd_run: Run, etcd_b: Any) -> None:
    """The new chain starts from the full backup the gap took: the keys written while capture
    was stopped, lost to the chain, are in it."""
    url, path = _target(etcd_b, "latest")
    r = restore(etcd_run.store, etcd_run.name, etcd_run.key, url, "--at", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    got = _restored(etcd_b, path)
    assert got == etcd_run.extra["now"] and b"/lost00" in got and b"/after" in got


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_broken_chain_is_refused_before_any_write(etcd_run: Run, etcd_b: Any, tmp_path: Path, attack: str) -> None:
    """A segment of the chain a restore to one of the run's instants reads is tampered with,
    swapped with its successor, removed, or replaced by a segment of the source's other chain
    (the one after the gap): the restore exits 1 naming it, and the target stays empty."""
    others = [m for m in segments(etcd_run.store, etcd_run.name) if m["base"]["name"] != etcd_run.base]
    copy, instant, names = break_chain(etcd_run, attack, others[0]["_path"], tmp_path)
    url, path = _target(etcd_b, "broken")
    r = restore(copy, etcd_run.name, etcd_run.key, url, "--at", instant.at)
    assert_refused_before_any_write(r, attack, names, lambda: _restored(etcd_b, path))


def _stopped_chain(etcd: Any, store: Path, key: Path, changes: int = 60) -> tuple[str, str, str, Etcd]:
    """A source with a full archive and a chain of several segments, its capture stopped."""
    e = Etcd(etcd.url)
    prefix = "/" + unique("chain")
    p = prefix.encode()
    e.put_many({p + b"/seed%03d" % i: b"s" for i in range(10)})
    url = f"etcd://{etcd.host}:{etcd.port}{prefix}"
    name = unique("src")
    backup(url, store, name, key)
    cap = Capture(url, store, name, key, seal="1s")
    for i in range(changes):
        e.put(p + b"/c%03d" % i, b"v%d" % i)
        if i % 15 == 14:
            rev = e.revision()
            wait_for("a segment", lambda rev=rev: covered(store, name, rev), cap.proc)
            # the capture lowered its CPU priority (--nice, default 10): a shared host serves the source first
            assert os.getpriority(os.PRIO_PROCESS, cap.proc.pid) == 10
    rev = e.revision()
    wait_for("the last segment", lambda: covered(store, name, rev), cap.proc)
    cap.stop()  # Ctrl-C: its lock is free at once for the next capture
    return url, prefix, name, e


@pytest.mark.timeout(1800)  # a hang guard: many CLI runs, each a flow, on a busy machine
def test_prune_lets_go_of_the_chain_of_an_archive_it_deletes(etcd_a, store, key) -> None:
    """A capture after a newer full archive starts a new chain; prune deleting the older archive
    deletes its chain too (a dry run deletes nothing), and the newer chain still restores."""
    url, prefix, name, e = _stopped_chain(etcd_a, store, key, changes=20)
    old_chain = {m["_path"].name for m in segments(store, name)}
    backup(url, store, name, key)
    cap = Capture(url, store, name, key)
    e.put(prefix.encode() + b"/second", b"2")
    rev = e.revision()
    wait_for("the new chain", lambda: any(m["_path"].name not in old_chain and m["last_position"] >= rev
                                           and not m.get("catching_up") for m in segments(store, name)), cap.proc)
    cap.kill()
    new = [m for m in segments(store, name) if m["_path"].name not in old_chain]
    assert all("prev" not in m or m["prev"]["name"] not in {f"{name}/changes/{n}" for n in old_chain} for m in new)
    r = cli("prune", str(store), "--keep-last", "1", "--source", name, "--key-file", str(key), "--dry-run", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["changes_deleted"] == len(old_chain)
    assert {m["_path"].name for m in segments(store, name)} >= old_chain, "a dry run deleted segments"
    r = cli("prune", str(store), "--keep-last", "1", "--source", name, "--key-file", str(key), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["changes_deleted"] == len(old_chain)
    assert {m["_path"].name for m in segments(store, name)} == {m["_path"].name for m in new}
    tpath = "/" + unique("pruned")
    r = restore(store, name, key, f"etcd://{etcd_a.host}:{etcd_a.port}{tpath}", "--at", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _relative(e.snapshot(tpath.encode() + b"/"), tpath.encode()) == _relative(
        e.snapshot(prefix.encode() + b"/"), prefix.encode())


@pytest.mark.timeout(1800)  # a hang guard: many CLI runs, each a flow, on a busy machine
def test_failover_restores_the_chain_end_by_default_and_the_archive_alone_with_full_only(etcd_a, store, key) -> None:
    url, prefix, name, e = _stopped_chain(etcd_a, store, key, changes=20)
    want = _relative(e.snapshot(prefix.encode() + b"/"), prefix.encode())
    assert len(want) == 30  # 10 seeds in the archive, 20 changes in the chain
    host = f"etcd://{etcd_a.host}:{etcd_a.port}"
    latest_target, full_target = "/" + unique("fo"), "/" + unique("full")
    r = cli("failover", name, "--from", str(store), "--into", host + latest_target, "--primary", "etcd://127.0.0.1:1",
             "--key-file", str(key))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "--at latest" in r.stdout + r.stderr
    assert _relative(e.snapshot(latest_target.encode() + b"/"), latest_target.encode()) == want
    r = cli("failover", name, "--from", str(store), "--into", host + full_target, "--primary", "etcd://127.0.0.1:1",
             "--key-file", str(key), "--full-only", "--no-resume")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = _relative(e.snapshot(full_target.encode() + b"/"), full_target.encode())
    assert got == {k: v for k, v in want.items() if k.startswith(b"/seed")}


@pytest.mark.timeout(1800)  # a hang guard: many CLI runs, each a flow, on a busy machine
def test_rehearse_at_latest_restores_and_compares_the_chain_end(etcd_a, store, key) -> None:
    url, prefix, name, e = _stopped_chain(etcd_a, store, key, changes=20)
    scratch = f"etcd://{etcd_a.host}:{etcd_a.port}/" + unique("scratch")
    r = cli("rehearse", str(store), "--source", name, "--scratch", scratch, "--at", "latest", "--key-file", str(key),
             "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["at"] == "latest" and summary["segments"] >= 1
    assert summary["compared"] == 30 and summary["keys"] == 30  # 10 seeds in the archive, 20 changes in the chain
    assert summary["cleanup_deleted"] == 30
