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
