"""A ZooKeeper failover restores the change chain's end by default (issue 19: ``failover --at
latest`` is the default when a chain exists). A ZooKeeper (or Consul) capture lists the whole state
afresh on every (re)connection, so the chain's latest point starts from that resync, not from the
full archive: the failover must still restore it, and fall back to the archive alone only when the
chain ends before the archive was taken. The daily rehearsal asks for ``latest`` too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from captureutil import Capture, backup, capture_key, cli, covered, segments, wait_for  # noqa: F401 - the key fixture
from kvutil import Etcd, unique
from zkutil import kazoo, snapshot, unique_root


def _relative(snap: dict, root: str) -> dict:
    return {p[len(root):]: v for p, v in snap.items()}


@pytest.mark.timeout(1800)  # a hang guard: several CLI runs, each a flow, on a busy machine
def test_zookeeper_failover_restores_the_chain_end_from_its_resync(zk_a, zk_b, store: Path, key: Path) -> None:
    root = unique_root()
    url, name = f"zk://{zk_a.url}{root}", "src-" + root.strip("/")
    with kazoo(zk_a.url) as c:
        c.create(root, b"")
        for i in range(10):
            c.create(f"{root}/seed{i:02d}", b"s%d" % i)
        backup(url, store, name, key)
        archived = _relative(snapshot(c, root), root)
        cap = Capture(url, store, name, key)
        wait_for("the capture's first resync", lambda: any(m.get("resync_done") for m in segments(store, name)),
                 cap.proc)
        c.delete(f"{root}/seed00")
        c.set(f"{root}/seed01", b"changed")
        last = None
        for i in range(20):
            last = c.create(f"{root}/c{i:02d}", b"v%d" % i, include_data=True)[1]
        wait_for("the last change sealed", lambda: covered(store, name, last.czxid), cap.proc)
        cap.stop()
        want = _relative(snapshot(c, root), root)
    assert want != archived and len(want) == len(archived) + 19

    primary = "zk://127.0.0.1:1"  # (the dead primary: the split-brain guard finds it down)
    target = unique_root()
    r = cli("failover", name, "--from", str(store), "--into", f"zk://{zk_b.url}{target}", "--primary", primary,
            "--key-file", str(key))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "--at latest" in r.stdout + r.stderr, r.stdout[-2000:]
    with kazoo(zk_b.url) as c:
        assert _relative(snapshot(c, target), target) == want

    # the daily rehearsal's `latest` while the chain continues the newest archive from its resync:
    # the archive, then the chain's end (what the failover above restored), each restored into the
    # scratch, compared key by key and cleaned up
    scratch = unique_root()
    r = cli("rehearse", str(store), "--source", name, "--scratch", f"zk://{zk_b.url}{scratch}", "--at", "latest",
            "--key-file", str(key), "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["compared"] == len(archived) - 1, summary  # (the chroot's root is no key)
    chain = summary["chain"]
    assert chain["compared"] == chain["keys"] == len(want) - 1 and chain["segments"] >= 1, summary
    assert chain["scratch_missing"] == chain["scratch_changed"] == chain["scratch_extra"] == 0, summary
    with kazoo(zk_b.url) as c:
        assert not c.exists(scratch) or c.get_children(scratch) == [], "the chain's end was not cleaned up"

    # a newer full archive than the chain's end: the archive alone, and the preflight says why
    with kazoo(zk_a.url) as c:
        c.create(f"{root}/after-the-chain", b"x")
        backup(url, store, name, key)
        newest = _relative(snapshot(c, root), root)
    target2 = unique_root()
    r = cli("failover", name, "--from", str(store), "--into", f"zk://{zk_b.url}{target2}", "--primary", primary,
            "--key-file", str(key), "--no-resume")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "the change chain ends before" in r.stdout + r.stderr, r.stdout[-2000:]
    with kazoo(zk_b.url) as c:
        assert _relative(snapshot(c, target2), target2) == newest

    # the daily rehearsal's `latest`: the chain ends before the newest archive, so the archive is
    # rehearsed (its marker is what the rehearsal writes), and the summary says no segment was applied
    scratch = unique_root()
    r = cli("rehearse", str(store), "--source", name, "--scratch", f"zk://{zk_b.url}{scratch}", "--at", "latest",
            "--key-file", str(key), "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["at"] == "latest" and summary["segments"] == 0
    assert summary["compared"] == summary["archive_keys"] == len(newest) - 1  # (the chroot's root is no key)


@pytest.mark.timeout(1800)  # a hang guard: several CLI runs, each a flow, on a busy machine
def test_a_rehearsed_older_archive_does_not_outrank_the_chain_that_continues_the_newest(
        etcd_a, etcd_b, store: Path, key: Path) -> None:
    """The older archive passed a rehearsal (within --prefer-rehearsed-within of the newest, so it
    would be tried first), but the change chain continues the newest: the failover restores the
    newest plus the chain, up to its end, not the rehearsed archive alone (hours of changes lost),
    and its preflight says why."""
    e = Etcd(etcd_a.url)
    prefix = "/" + unique("pref")
    p = prefix.encode()
    url, name = f"etcd://{etcd_a.host}:{etcd_a.port}{prefix}", unique("src")
    e.put_many({p + b"/seed%02d" % i: b"s" for i in range(5)})
    backup(url, store, name, key)
    r = cli("rehearse", str(store), "--source", name, "--scratch", f"etcd://{etcd_b.host}:{etcd_b.port}/"
            + unique("scratch"), "--key-file", str(key))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    e.put(p + b"/second", b"2")
    backup(url, store, name, key)
    cap = Capture(url, store, name, key)
    try:
        for i in range(5):
            e.put(p + b"/chained%02d" % i, b"c")
        e.delete(p + b"/seed00")
        rev = e.revision()
        wait_for("the chain's changes sealed", lambda: covered(store, name, rev), cap.proc)
    finally:
        cap.stop()
    want = {k[len(p):]: v for k, v in e.snapshot(p + b"/").items()}

    target = "/" + unique("into")
    r = cli("failover", name, "--from", str(store), "--into", f"etcd://{etcd_b.host}:{etcd_b.port}{target}",
            "--primary", "etcd://127.0.0.1:1", "--key-file", str(key))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "preferred over newest" in out and "tried before" in out and "--at latest" in out, out[-3000:]
    t = target.encode()
    assert {k[len(t):]: v for k, v in Etcd(etcd_b.url).snapshot(t + b"/").items()} == want
