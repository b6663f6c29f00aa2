"""Point-in-time recovery for ZooKeeper (issue 19): ``burrow capture`` follows a chroot with a
persistent recursive watch (Burrow's own wire client) while a steady writer creates, sets and
deletes nodes (and keeps an ephemeral one, which is skipped); a capture SIGKILLed and started
again resyncs; ``burrow restore --at`` each instant the test recorded with kazoo equals that
state node by node, data and ACL."""

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
from kazoo.client import KazooClient
from zkutil import kazoo, unique_root


def _state(c: KazooClient, root: str) -> dict[str, tuple[bytes, tuple]]:
    """Every persistent node below ``root`` (not ``root`` itself): data and ACL."""
    out: dict[str, tuple[bytes, tuple]] = {}

    def walk(p: str) -> None:
        for child in c.get_children(p):
            q = p + "/" + child
            data, stat = c.get(q)
            if not stat.ephemeralOwner:
                acl, _ = c.get_acls(q)
                out[q[len(root):]] = (data or b"", tuple(sorted((a.perms, a.id.scheme, a.id.id) for a in acl)))
            walk(q)

    walk(root)
    return out


class Writer(SteadyWriter):
    """About ``rate`` changes a second below ``root``: creates (some nested), sets, deletes of
    leaves, beside an ephemeral node (skipped by capture). ``zxid``: the zxid of its last change."""

    def __init__(self, hosts: str, root: str, rate: float = 50.0) -> None:
        super().__init__(rate)
        self.c = KazooClient(hosts=hosts)
        self.c.start(timeout=15)
        self.root = root
        self.zxid = 0
        self.leaves: list[str] = []

    def before(self) -> None:
        self.c.create(self.root + "/eph", b"ephemeral", ephemeral=True)

    def change(self, n: int) -> None:
        leaves = self.leaves
        roll = self.rng.random()
        if leaves and roll < 0.2:
            p = leaves.pop(self.rng.randrange(len(leaves)))
            self.c.delete(p)
            self.zxid = self.c.exists(p.rsplit("/", 1)[0]).pzxid
        elif leaves and roll < 0.6:
            self.zxid = self.c.set(self.rng.choice(leaves), b"u%d" % n).mzxid
        else:
            parent = self.rng.choice([p for p in leaves[-5:] if p.count("/") < self.root.count("/") + 2] or [self.root])
            if parent != self.root:
                leaves.remove(parent)  # it gets a child: no longer deleted as a leaf
            path = f"{parent}/n{n:06d}"
            _, stat = self.c.create(path, b"c%d" % n, include_data=True)
            self.zxid = stat.czxid
            leaves.append(path)

    def close(self) -> None:
        self.c.stop()
        self.c.close()


@pytest.mark.timeout(1800)  # a hang guard: many CLI runs, each a flow, on a busy machine
def test_restore_at_each_instant_equals_the_source_across_a_killed_capture(zk_a, store, key) -> None:
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root, b"")
        for i in range(20):
            c.create(f"{root}/seed{i:02d}", b"s%d" % i)
        url = f"zk://{zk_a.url}{root}"
        name = "src-" + root.strip("/")
        backup(url, store, name, key)
        cap = Capture(url, store, name, key)
        writer = Writer(zk_a.url, root)
        writer.thread.start()
        recorded: list[tuple[str, dict]] = []
        try:
            for i in range(4):
                time.sleep(3.0)
                if i == 2:
                    cap.kill()  # the writer running
                    cap = Capture(url, store, name, key)
                writer.pause()
                state = _state(c, root)
                zxid = writer.zxid
                wait_for(f"a sealed segment up to zxid {zxid}", lambda zxid=zxid: covered(store, name, zxid), cap.proc)
                recorded.append((datetime.now(UTC).isoformat().replace("+00:00", "Z"), state))
                writer.run.set()
            writer.stop.set()
            writer.thread.join()
            last = c.create(f"{root}/last", b"the window reaches past every recorded instant", include_data=True)[1]
            wait_for("the last sealed segment", lambda: covered(store, name, last.czxid), cap.proc)
        finally:
            cap.kill()
            writer.close()
        assert writer.changes > 200
        manifests = segments(store, name)
        assert sum(1 for m in manifests if m.get("resync")) >= 2, "the restarted capture did not resync"
        assert not any(m.get("gap") for m in manifests)

        for at, state in recorded:
            target = unique_root()
            r = restore(store, name, key, f"zk://{zk_a.url}{target}", "--at", at)
            assert r.returncode == 0, (at, r.stderr[-3000:])
            got = _state(c, target)
            assert got == state, f"restore --at {at} differs: {len(got)} nodes against {len(state)}"
            assert "/eph" not in got


@pytest.mark.timeout(1800)  # a hang guard: many CLI runs, each a flow, on a busy machine
def test_a_lost_connection_is_resynced_and_the_changes_made_meanwhile_are_caught(tmp_path, store, key) -> None:
    """The server is killed mid-capture and started again; changes made as soon as it is back
    (before or after the capture reconnects) are in the chain: the reconnection resyncs, and the
    state restored at an instant after it equals the recorded one."""
    from burrow.testing.servers import start_zookeeper

    zk = start_zookeeper(tmp_path / "zk")
    port = zk.port
    try:
        root = unique_root()
        with kazoo(zk.url) as c:
            c.create(root, b"")
            for i in range(10):
                c.create(f"{root}/seed{i:02d}", b"s%d" % i)
        url = f"zk://{zk.url}{root}"
        name = "src-" + root.strip("/")
        backup(url, store, name, key)
        cap = Capture(url, store, name, key)
        try:
            with kazoo(zk.url) as c:
                for i in range(10):
                    c.set(f"{root}/seed{i:02d}", b"before")
                zxid = c.create(f"{root}/before", b"x", include_data=True)[1].czxid
                wait_for("a segment before the loss", lambda: covered(store, name, zxid), cap.proc)
            resyncs = sum(1 for m in segments(store, name) if m.get("resync"))
            zk.kill()
            zk = start_zookeeper(tmp_path / "zk", port=port)
            with kazoo(zk.url) as c:
                c.delete(f"{root}/seed00")
                c.set(f"{root}/seed01", b"meanwhile")
                zxid = c.create(f"{root}/meanwhile", b"m", include_data=True)[1].czxid
                state = _state(c, root)
                wait_for("a resync after the reconnection",
                          lambda: sum(1 for m in segments(store, name) if m.get("resync")) > resyncs, cap.proc)
                wait_for("the changes made meanwhile", lambda: covered(store, name, zxid), cap.proc)
                at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
                time.sleep(0.2)
                zxid = c.create(f"{root}/after", b"a", include_data=True)[1].czxid
                wait_for("the window past the instant", lambda: covered(store, name, zxid), cap.proc)
        finally:
            cap.kill()
        target = unique_root()
        r = restore(store, name, key, f"zk://{zk.url}{target}", "--at", at)
        assert r.returncode == 0, r.stderr[-3000:]
        with kazoo(zk.url) as c:
            got = _state(c, target)
        assert got == state and "/meanwhile" in got and "/seed00" not in got and got["/seed01"][0] == b"meanwhile"
    finally:
        zk.stop()
