"""Point-in-time recovery for ZooKeeper (issue 19, "Correctness"): one run, built once for the
module, on a private ZooKeeper server, where a steady writer creates (with several ACLs, some
nested), sets and deletes nodes at 100 changes/s for 60 s of writing, beside an ephemeral node
(which capture skips), while ``burrow capture`` follows the chroot with a persistent recursive
watch; it pauses every 10 s and the test records the tree then with kazoo (data and ACLs). The
capture is SIGKILLed at a random point (seeded, printed) and started again at once: it resyncs.
At another random point the server is killed and started again: the capture's connection drops
and, while it is down (the capture is held stopped until then), the writer goes on; the
reconnection resyncs. After the run a new full backup and a short capture make the source's
second chain.

The tests read that run: ``burrow restore --at`` each recorded instant, into an empty chroot of
another server, equals the recorded tree node by node, data and ACL, the instants after the kill
and the bounce included; both resyncs happened, the second one past the changes made while the
connection was down; a tampered, reordered, missing or foreign segment is refused before
anything is written."""

from __future__ import annotations

import os
import random
import signal
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
    now_iso,
    random_point,
    restore,
    resyncs,
    seeded,
    segments,
    to_us,
    wait_for,
    writer_run,
)
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError
from kazoo.security import ACL, OPEN_ACL_UNSAFE, Id, make_acl
from zkutil import unique_root

from burrow.testing.servers import start_zookeeper

#: The ACLs the writer creates nodes with: all keep CREATE, DELETE and READ for anyone (nested
#: nodes are created and deleted below them, and kazoo reads them back).
ACLS = [
    OPEN_ACL_UNSAFE,
    [make_acl("world", "anyone", read=True, write=True, create=True, delete=True)],
    [make_acl("world", "anyone", read=True, create=True, delete=True), ACL(31, Id("ip", "127.0.0.1"))],
]
#: How many changes the writer makes while the capture's connection is down.
MEANWHILE = 100


def _client(hosts: str) -> KazooClient:
    c = KazooClient(hosts=hosts, connection_retry={"max_tries": -1, "delay": 0.1, "max_delay": 1.0})
    c.start(timeout=30)
    return c


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


#: A hang guard for the module: its first test waits for the one writer run (several minutes on a
#: busy machine), then many CLI runs, each a flow.
pytestmark = pytest.mark.timeout(1500)


class Writer(SteadyWriter):
    """About ``rate`` changes a second below ``root``: creates (some nested, each with one of
    ACLS), sets, deletes of leaves, beside an ephemeral node (skipped by capture). ``zxid``: the
    zxid of its last change."""

    def __init__(self, hosts: str, root: str, rate: float = RATE, rng: random.Random | None = None) -> None:
        super().__init__(rate, rng)
        self.c = _client(hosts)
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
            _, stat = self.c.create(path, b"c%d" % n, acl=self.rng.choice(ACLS), include_data=True)
            self.zxid = stat.czxid
            leaves.append(path)

    def close(self) -> None:
        self.c.stop()
        self.c.close()


@pytest.fixture(scope="module")
def zk_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """The module's one writer run (see the module's docstring), on a private server: the test
    kills and restarts it."""
    rng, seed = seeded("ZooKeeper capture run")
    work = tmp_path_factory.mktemp("zk-run")
    servers = [start_zookeeper(work / "zk", lean=True)]
    port = servers[0].port
    try:
        key = make_key(work / "key")
        store = work / "store"
        store.mkdir()
        hosts = servers[0].url
        root = unique_root()
        c = _client(hosts)
        c.create(root, b"")
        for i in range(20):
            c.create(f"{root}/seed{i:02d}", b"s%d" % i, acl=ACLS[i % len(ACLS)])
        url = f"zk://{hosts}{root}"
        name = "src-" + root.strip("/")
        backup(url, store, name, key)
        run = Run(store, name, key, seed, base=full_archives(store, name)[0])
        follow = Following(url, store, name, key)
        writer = Writer(hosts, root, rng=random.Random(rng.random()))

        def bounce() -> None:
            """Kill the server and start it again, the capture held stopped (SIGSTOP) meanwhile:
            its connection drops, the writer makes MEANWHILE changes it cannot see, then it goes
            on and must resync."""
            writer.pause()
            zxid = writer.zxid
            follow.wait("the capture to follow before the bounce", lambda: covered(store, name, zxid))
            before_bounce = len(resyncs(segments(store, name)))
            os.kill(follow.cap.proc.pid, signal.SIGSTOP)
            try:
                run.extra["bounced_at"] = now_iso()
                servers[0].kill()
                servers[0] = start_zookeeper(work / "zk", port=port, lean=True)
                wait_for("the writer's and the reader's reconnection", lambda: writer.c.connected and c.connected)
                before = writer.changes
                writer.resume()
                wait_for(f"{MEANWHILE} changes while the capture is down", lambda: writer.changes >= before + MEANWHILE)
                writer.pause()
                run.extra.update(meanwhile=writer.changes - before, meanwhile_zxid=writer.zxid, resyncs_before=before_bounce)
            finally:
                os.kill(follow.cap.proc.pid, signal.SIGCONT)
            writer.resume()

        kill_at = random_point(rng)
        bounce_at = random_point(rng, other_than=kill_at)
        print(f"{name}: the server is bounced after {bounce_at:.2f} s of writing")
        run.extra["bounce_at_s"] = bounce_at

        def read_state() -> dict[str, Any]:
            wait_for("the reader's connection", lambda: c.connected)
            return _state(c, root)

        try:
            writer_run(run, follow, writer, read_state=read_state, position=lambda: writer.zxid, rng=rng,
                       events=[(bounce_at, bounce)], kill_at=kill_at)
            last = c.create(f"{root}/last", b"the window reaches past every recorded instant", include_data=True)[1]
            follow.wait("the last sealed segment", lambda: covered(store, name, last.czxid))
            follow.cap.stop()
        finally:
            follow.cap.kill()
            writer.close()
        # the source's second chain, after a newer full archive: where the foreign segment comes from
        backup(url, store, name, key)
        cap = Capture(url, store, name, key)
        try:
            second = c.create(f"{root}/second", b"2", include_data=True)[1].czxid
            wait_for("the second chain", lambda: covered(store, name, second) and chain_of(
                store, name, full_archives(store, name)[-1]), cap.proc)
        finally:
            cap.kill()
        c.stop()
        c.close()
        yield run
    finally:
        servers[0].stop()


def _restored(zk_b: Any, root: str) -> dict[str, Any]:
    c = _client(zk_b.url)
    try:
        return _state(c, root) if c.exists(root) else {}
    except NoNodeError:
        return {}
    finally:
        c.stop()
        c.close()


def test_the_writer_made_its_changes(zk_run: Run) -> None:
    check_writer_run(zk_run)


@pytest.mark.parametrize("pause", range(PAUSES))
def test_restore_at_each_recorded_instant_equals_the_source_then(zk_run: Run, zk_b: Any, pause: int) -> None:
    instant = zk_run.instants[pause]
    target = unique_root()
    r = restore(zk_run.store, zk_run.name, zk_run.key, f"zk://{zk_b.url}{target}", "--at", instant.at)
    assert r.returncode == 0, (instant.at, zk_run.seed, r.stderr[-3000:])
    got = _restored(zk_b, target)
    assert got == instant.state, (f"restore --at {instant.at} (zxid {instant.position:#x}, seed {zk_run.seed}) "
                                  f"differs: {len(got)} nodes against {len(instant.state)}")
    assert "/eph" not in got
    assert len({acl for _, acl in got.values()}) == len(ACLS), "not every ACL the writer uses is compared"


def test_the_capture_killed_at_a_random_point_resynced(zk_run: Run) -> None:
    """The capture started again after the SIGKILL continued the chain with a resync: no gap,
    and the chain whole from its base to its end."""
    chain = chain_of(zk_run.store, zk_run.name, zk_run.base)
    assert not any(m.get("gap") for m in chain)
    for a, b in zip(chain, chain[1:], strict=False):
        assert b["first_position"] == a["last_position"] + 1 and b["prev"]["name"].endswith(a["_path"].name)
    killed = to_us(zk_run.killed_at)
    found = resyncs(chain)
    assert found and to_us(found[0]["first_time"]) < killed, "the first capture did not start with a resync"
    restarted = [m for m in found if to_us(m["first_time"]) > killed]
    assert restarted, "the capture started again did not resync"
    assert any(to_us(i.at) > killed for i in zk_run.instants), "no instant recorded after the kill"


def test_the_dropped_connection_resynced_past_the_changes_made_meanwhile(zk_run: Run) -> None:
    """The server was killed and started again: the capture's reconnection resynced, and its
    resync reaches past every change the writer made while the connection was down (restoring
    the instants after it, above, proves it holds them)."""
    x = zk_run.extra
    assert x["meanwhile"] >= MEANWHILE
    bounced = to_us(x["bounced_at"])
    chain = chain_of(zk_run.store, zk_run.name, zk_run.base)
    after = [m for m in resyncs(chain) if to_us(m["first_time"]) > bounced]
    assert after, "no resync after the connection dropped"
    first = min(after, key=lambda m: m["first_position"])
    assert first["last_position"] >= x["meanwhile_zxid"], (
        f"the resync after the bounce ends at zxid {first['last_position']:#x}, before the changes made meanwhile "
        f"(up to {x['meanwhile_zxid']:#x})")
    assert any(to_us(i.at) > bounced for i in zk_run.instants), "no instant recorded after the bounce"


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_broken_chain_is_refused_before_any_write(zk_run: Run, zk_b: Any, tmp_path: Path, attack: str) -> None:
    """A segment of the chain a restore to one of the run's instants reads is tampered with,
    swapped with its successor, removed, or replaced by a segment of the source's second chain:
    the restore exits 1 naming it, and the target stays empty."""
    foreign = chain_of(zk_run.store, zk_run.name, full_archives(zk_run.store, zk_run.name)[-1])[-1]
    copy, instant, names = break_chain(zk_run, attack, foreign["_path"], tmp_path)
    target = unique_root()
    r = restore(copy, zk_run.name, zk_run.key, f"zk://{zk_b.url}{target}", "--at", instant.at)
    assert_refused_before_any_write(r, attack, names, lambda: _restored(zk_b, target))
