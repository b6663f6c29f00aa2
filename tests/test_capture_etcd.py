"""Point-in-time recovery for etcd (issue 19): ``burrow capture`` follows a prefix into change
segments while a steady writer creates, updates and deletes keys; ``burrow restore --at`` each
instant the test recorded with an independent client (etcd's JSON gateway) equals that state
key by key, and ``--at-revision R`` equals ``get --prefix --rev=R`` at random revisions. A
capture killed with SIGKILL and started again leaves no gap; a compaction past the chain's end
while capture is stopped is a recorded gap (and a full backup), and a point inside it is
refused naming the window; tampered, reordered, missing and foreign segments are refused
before anything is written."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from captureutil import (  # capture_key: the key fixture
    Capture,
    SteadyWriter,
    backup,
    capture_key,  # noqa: F401
    cli,
    covered,
    restore,
    segments,
    wait_for,
)
from kvutil import Etcd, unique

from burrow.testing.servers import start_etcd


def _relative(snapshot: dict[bytes, bytes], prefix: bytes) -> dict[bytes, bytes]:
    return {k[len(prefix):]: v for k, v in snapshot.items()}


class Writer(SteadyWriter):
    """A steady writer at about ``rate`` changes a second: creates, updates and deletes under
    ``prefix``, pausable."""

    def __init__(self, url: str, prefix: bytes, rate: float = 100.0) -> None:
        super().__init__(rate)
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


@pytest.mark.timeout(1800)  # a hang guard: many CLI runs, each a flow, on a busy machine
def test_restore_at_each_instant_and_revision_equals_the_source(etcd_a, store, key) -> None:
    """15 s of ~100 changes/s with a pause every few seconds; the capture is SIGKILLed at a random
    point and started again. Each recorded instant restores exactly, and so do random
    revisions, and the chain has no gap."""
    e = Etcd(etcd_a.url)
    prefix = "/" + unique("pitr")
    p = prefix.encode()
    e.put_many({p + b"/seed%03d" % i: b"s%d" % i for i in range(50)})
    url = f"etcd://{etcd_a.host}:{etcd_a.port}{prefix}"
    name = unique("src")
    backup(url, store, name, key)
    first_rev = e.revision()
    cap = Capture(url, store, name, key)
    writer = Writer(etcd_a.url, p)
    writer.thread.start()
    recorded: list[tuple[str, dict[bytes, bytes], int]] = []
    rng = random.Random()
    kill_at = rng.uniform(3.0, 9.0)
    started = time.monotonic()
    killed = False
    for _ in range(4):
        time.sleep(3.5)
        if not killed and time.monotonic() - started >= kill_at:
            cap.kill()  # at a random point, the writer running
            killed = True
            cap = Capture(url, store, name, key)
        writer.pause()
        rev = e.revision()
        state = _relative(e.snapshot(p + b"/", rev), p)
        wait_for(f"a sealed segment up to revision {rev}", lambda rev=rev: covered(store, name, rev), cap.proc)
        at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        recorded.append((at, state, rev))
        writer.resume()
    writer.stop.set()
    writer.thread.join()
    if not killed:
        cap.kill()
        cap = Capture(url, store, name, key)
    e.put(p + b"/last", b"the window reaches past every recorded instant")
    last_rev = e.revision()
    wait_for("the last sealed segment", lambda: covered(store, name, last_rev), cap.proc)
    cap.kill()
    assert writer.changes > 500

    manifests = segments(store, name)
    assert not any(m.get("gap") for m in manifests), "a SIGKILLed etcd capture resumed with a gap"
    assert any(m.get("changes", {}).get("del") for m in manifests) and any(m.get("changes", {}).get("put") for m in manifests)

    for i, (at, state, rev) in enumerate(recorded):
        target = "/" + unique(f"at{i}")
        r = restore(store, name, key, f"etcd://{etcd_a.host}:{etcd_a.port}{target}", "--at", at)
        assert r.returncode == 0, (at, r.stderr[-3000:])
        got = _relative(e.snapshot(target.encode() + b"/"), target.encode())
        assert got == state, f"restore --at {at} (revision {rev}) differs: {len(got)} keys against {len(state)}"

    for j, rev in enumerate(sorted(rng.sample(range(first_rev, last_rev + 1), 3))):
        target = "/" + unique(f"rev{j}")
        r = restore(store, name, key, f"etcd://{etcd_a.host}:{etcd_a.port}{target}", "--at-revision", str(rev))
        assert r.returncode == 0, (rev, r.stderr[-3000:])
        got = _relative(e.snapshot(target.encode() + b"/"), target.encode())
        want = _relative(e.snapshot(p + b"/", rev), p)
        assert got == want, f"restore --at-revision {rev} differs"


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
    rev = e.revision()
    wait_for("the last segment", lambda: covered(store, name, rev), cap.proc)
    cap.kill()
    return url, prefix, name, e


@pytest.mark.timeout(1800)  # a hang guard: many CLI runs, each a flow, on a busy machine
def test_a_compaction_past_the_chain_is_a_recorded_gap_and_a_point_inside_it_is_refused(tmp_path, store, key) -> None:
    """Compacting etcd past the chain's end while capture is stopped: the next capture records
    a gap segment, takes a full backup and continues from it; a point in the gap is refused with
    the restorable window named; nothing is written."""
    etcd = start_etcd(tmp_path / "etcd")  # a private server: compaction is cluster-wide
    try:
        url, prefix, name, e = _stopped_chain(etcd, store, key, changes=30)
        end = max(m["last_position"] for m in segments(store, name))
        in_gap = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        for i in range(20):
            e.put(prefix.encode() + b"/lost%02d" % i, b"x")
        rev = e.revision()
        e._post("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        fulls_before = len(list(store.glob(f"{name}/*.burrow")))
        cap = Capture(url, store, name, key, seal="1s")
        wait_for("a gap segment", lambda: any(m.get("gap") for m in segments(store, name)), cap.proc)
        wait_for("a full backup after the gap", lambda: len(list(store.glob(f"{name}/*.burrow"))) > fulls_before,
                  cap.proc)
        e.put(prefix.encode() + b"/after", b"a")
        after = e.revision()
        wait_for("the new chain", lambda: covered(store, name, after), cap.proc)
        cap.kill()
        gap = next(m["gap"] for m in segments(store, name) if m.get("gap"))
        assert gap["from_position"] == end + 1 and gap["to_position"] == rev - 1

        tpath = "/" + unique("gap")
        target = f"etcd://{etcd.host}:{etcd.port}{tpath}"
        r = restore(store, name, key, target, "--at", in_gap)
        assert r.returncode == 1, r.stderr[-2000:]
        assert "restorable window" in r.stderr and "gap" in r.stderr, r.stderr[-2000:]
        r = restore(store, name, key, target, "--at-revision", str(end + 5))
        assert r.returncode == 1 and "restorable window" in r.stderr, r.stderr[-2000:]
        assert e.snapshot(tpath.encode() + b"/") == {}, "a refused restore wrote keys"
        # the new chain restores: everything up to now, the lost keys included (the new full holds them)
        r = restore(store, name, key, target, "--at", "latest")
        assert r.returncode == 0, r.stderr[-3000:]
        tpath = tpath.encode()
        got = _relative(e.snapshot(tpath + b"/"), tpath)
        assert got == _relative(e.snapshot(prefix.encode() + b"/"), prefix.encode())
        # status shows the window with its gap, and --max-age checks the window's end
        r = cli("status", str(store), "--source", name, "--json", "--no-verify", "--key-file", str(key),
                 "--max-age", "10m")
        assert r.returncode == 0, r.stderr[-2000:]
        window = json.loads(r.stdout)["sources"][0]["restorable"]
        assert window["from"] < in_gap < window["to"] and len(window["gaps"]) >= 1
        assert any(a <= in_gap <= b for a, b in window["gaps"]), window
    finally:
        etcd.stop()


def _attack_copy(store: Path, tmp_path: Path, label: str) -> Path:
    copy = tmp_path / f"store-{label}"
    shutil.copytree(store, copy)
    return copy


@pytest.mark.timeout(1200)  # a hang guard: two captures and a restore on a busy machine
@pytest.mark.parametrize("attack", ["tampered", "reordered", "missing", "foreign"])
def test_a_broken_chain_is_refused_before_any_write(etcd_a, store, key, tmp_path, attack) -> None:
    url, prefix, name, e = _stopped_chain(etcd_a, store, key)
    segs = sorted(segments(store, name), key=lambda m: m["first_position"])
    assert len(segs) >= 3, [m["first_position"] for m in segs]
    victim, other = segs[1]["_path"], segs[2]["_path"]
    if attack == "tampered":
        data = bytearray(victim.read_bytes())
        data[len(data) // 3] ^= 0x40
        victim.write_bytes(bytes(data))
    elif attack == "reordered":
        tmp = victim.with_name("swap")
        os.rename(victim, tmp)
        os.rename(other, victim)
        os.rename(tmp, other)
    elif attack == "missing":
        victim.unlink()
    else:  # a segment of another chain, moved in under a name of this one
        _, _, other_name, _ = _stopped_chain(etcd_a, store, key, changes=20)
        foreign = sorted(segments(store, other_name), key=lambda m: m["first_position"])[-1]["_path"]
        shutil.copy(foreign, victim.with_name(victim.name.replace(victim.name[-13:-7], "f0f0f0")))
    target = "/" + unique("broken")
    r = restore(store, name, key, f"etcd://{etcd_a.host}:{etcd_a.port}{target}", "--at", "latest")
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    error = next(line for line in r.stderr.splitlines() if line.startswith("burrow: error:"))
    # the refusal names what is wrong: the segment itself, or the hole in the chain
    named = {"missing": ["missing from the store"], "reordered": [victim.name, other.name]}.get(attack, [victim.name, "f0f0f0"])
    assert any(n in error for n in named), error
    assert e.snapshot(target.encode() + b"/") == {}, "a refused restore wrote keys"


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
