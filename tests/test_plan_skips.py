"""The restore plan skips what the target cannot need (issue 20, item 6): no lookup below a
path the plan knows is absent, and none at all into a target that holds no key (a ZooKeeper
chroot that does not exist yet, an empty etcd or Consul prefix). The counts stay exactly
what the target holds: every expectation is computed from an independent client (kazoo,
etcd's JSON gateway, py-consul), key by key.

Lookups are counted by wrapping each session class's ``lookup``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kvutil import Etcd, consul_client, unique
from zkutil import kazoo, unique_root

import tasks.plan
from blocks.consul import ConsulCluster, ConsulSession
from blocks.etcd import EtcdCluster, EtcdSession
from blocks.source import SourceBlock
from blocks.zookeeper import ZooKeeperCluster, ZooKeeperSession
from burrow.staging import discard_spool
from tasks.compress import compress_spool
from tasks.extract import extract_records
from tasks.plan import Plan, plan_restore


def _archive(source: SourceBlock, root: str, tmp_path: Path) -> Path:
    work = tmp_path / "backup"
    work.mkdir(exist_ok=True)
    ex = extract_records(source, root, work)
    comp = compress_spool(ex, work / "a.burrow", source_name="plan-skips", level=1)
    discard_spool(ex.spool)
    return Path(comp.path)


def _counting(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[bytes]:
    """Every key handed to ``cls.lookup`` from now on."""
    asked: list[bytes] = []
    original = cls.lookup

    def lookup(self: Any, keys: list[bytes]) -> list[bytes | None]:
        asked.extend(keys)
        return original(self, keys)

    monkeypatch.setattr(cls, "lookup", lookup)
    return asked


def _plan(archive: Path, target: SourceBlock, tmp_path: Path, name: str) -> Plan:
    work = tmp_path / name
    work.mkdir()
    return plan_restore(archive, target, work)


def _expect(archived: dict[bytes, bytes], current: dict[bytes, bytes]) -> tuple[int, int, list[str]]:
    """(to create, identical, conflict paths) as the target holds it, from an independent read."""
    create = sum(1 for k in archived if k not in current)
    identical = sum(1 for k, v in archived.items() if current.get(k) == v)
    conflicts = sorted(k.decode() for k, v in archived.items() if k in current and current[k] != v)
    return create, identical, conflicts


# --------------------------------------------------------------------------- ZooKeeper


def _zk_seed(hosts: str, root: str) -> dict[bytes, bytes]:
    """A tree three levels below ``root``: 5 x 4 x 3 nodes (with root, 86 nodes)."""
    tree = {root.encode(): b"root"}
    with kazoo(hosts) as c:
        c.create(root, b"root")
        for i in range(5):
            a = f"{root}/a{i}"
            c.create(a, b"a%d" % i)
            tree[a.encode()] = b"a%d" % i
            for j in range(4):
                b = f"{a}/b{j}"
                c.create(b, b"b%d" % j)
                tree[b.encode()] = b"b%d" % j
                for k in range(3):
                    leaf = f"{b}/c{k}"
                    c.create(leaf, b"c%d" % k)
                    tree[leaf.encode()] = b"c%d" % k
    return tree


def _zk_present(hosts: str, chroot: str, keys: list[bytes]) -> dict[bytes, bytes]:
    """What the target holds of ``keys`` (paths inside ``chroot``), read with kazoo."""
    out: dict[bytes, bytes] = {}
    with kazoo(hosts) as c:
        for k in keys:
            got = c.exists(chroot + k.decode())
            if got is not None:
                out[k] = c.get(chroot + k.decode())[0] or b""
    return out


@pytest.mark.parametrize("batch", [1000, 3])
def test_zookeeper_missing_chroot_needs_no_lookup(zk_a, zk_b, tmp_path, monkeypatch, batch) -> None:
    root = unique_root()
    tree = _zk_seed(zk_a.url, root)
    archive = _archive(ZooKeeperCluster(hosts=[zk_a.url]), root, tmp_path)
    monkeypatch.setattr(tasks.plan, "BATCH", batch)
    asked = _counting(monkeypatch, ZooKeeperSession)
    chroot = unique_root()  # does not exist
    p = _plan(archive, ZooKeeperCluster(hosts=[zk_b.url], chroot=chroot), tmp_path, "plan")
    assert asked == []
    assert (p.to_create, p.intermediate, p.identical, p.conflicts) == (len(tree), 0, 0, 0)
    with kazoo(zk_b.url) as c:
        assert c.exists(chroot) is None  # planning wrote nothing


@pytest.mark.parametrize("batch", [1000, 3])
def test_zookeeper_empty_chroot_asks_only_the_top(zk_a, zk_b, tmp_path, monkeypatch, batch) -> None:
    """An existing but empty chroot: only the archive's top node is looked up (which also
    checks that this identity may create under the chroot), nothing below it."""
    root = unique_root()
    tree = _zk_seed(zk_a.url, root)
    archive = _archive(ZooKeeperCluster(hosts=[zk_a.url]), root, tmp_path)
    chroot = unique_root()
    with kazoo(zk_b.url) as c:
        c.create(chroot, b"")
    monkeypatch.setattr(tasks.plan, "BATCH", batch)
    asked = _counting(monkeypatch, ZooKeeperSession)
    p = _plan(archive, ZooKeeperCluster(hosts=[zk_b.url], chroot=chroot), tmp_path, "plan")
    assert asked == [root.encode()]
    assert (p.to_create, p.intermediate, p.identical, p.conflicts) == (len(tree), 0, 0, 0)
    assert p.warnings == []


@pytest.mark.parametrize("batch", [1000, 7, 1])
def test_zookeeper_partial_target_counts_exactly(zk_a, zk_b, tmp_path, monkeypatch, batch) -> None:
    """A target holding some of the keys (some identical, some different, some subtrees
    missing, one level missing below existing nodes): identical and conflicts exactly as
    kazoo reads the target, and no key below an absent node is ever looked up."""
    root = unique_root()
    tree = _zk_seed(zk_a.url, root)
    archive = _archive(ZooKeeperCluster(hosts=[zk_a.url]), root, tmp_path)
    chroot = unique_root()
    with kazoo(zk_b.url) as c:
        c.create(chroot + root, b"root", makepath=True)
        c.create(f"{chroot}{root}/a0", b"a0")  # identical, whole subtree below it missing
        c.create(f"{chroot}{root}/a1", b"other")  # conflict
        c.create(f"{chroot}{root}/a1/b0", b"b0")
        c.create(f"{chroot}{root}/a1/b0/c0", b"c0")
        c.create(f"{chroot}{root}/a1/b0/c1", b"changed")  # conflict
        c.create(f"{chroot}{root}/a2", b"a2")
        for j in range(4):  # a2's subtree complete: identical all through
            c.create(f"{chroot}{root}/a2/b{j}", b"b%d" % j)
            for k in range(3):
                c.create(f"{chroot}{root}/a2/b{j}/c{k}", b"c%d" % k)
        c.create(f"{chroot}{root}/a3/b2/c1", b"x", makepath=True)  # a3, a3/b2 exist empty: conflicts
        c.create(f"{chroot}{root}/a3/b2/c9", b"not archived")
    current = _zk_present(zk_b.url, chroot, list(tree))
    create, identical, conflicts = _expect(tree, current)
    assert conflicts and identical and create  # all three kinds are exercised

    monkeypatch.setattr(tasks.plan, "BATCH", batch)
    asked = _counting(monkeypatch, ZooKeeperSession)
    p = _plan(archive, ZooKeeperCluster(hosts=[zk_b.url], chroot=chroot), tmp_path, "plan")
    assert (p.to_create, p.intermediate, p.identical, p.conflicts) == (create, 0, identical, len(conflicts))
    assert sorted(p.conflict_paths) == conflicts
    for k in asked:  # no lookup below a node the target does not hold
        parent = k.rsplit(b"/", 1)[0]
        assert k == root.encode() or parent in current, k
    assert len(set(asked)) == len(asked)
    # everything the target holds was asked for, and of the missing only the tops of missing subtrees
    tops = {k for k in tree if k not in current and (k == root.encode() or k.rsplit(b"/", 1)[0] in current)}
    assert set(asked) == set(current) | tops


# --------------------------------------------------------------------------- etcd


def _etcd_block(server: Any, prefix: str) -> EtcdCluster:
    return EtcdCluster(endpoints=[f"127.0.0.1:{server.port}"], prefix=prefix)


def _etcd_seed(etcd: Etcd, prefix: str, n: int) -> dict[bytes, bytes]:
    keys = {b"/k%04d" % i: b"v%d" % i for i in range(n)}
    keys[b"/dir/x"] = b"x"
    etcd.put_many({prefix.encode() + k: v for k, v in keys.items()})
    return keys


@pytest.mark.parametrize("batch", [1000, 16])
def test_etcd_empty_prefix_needs_no_lookup(etcd_a, etcd_b, tmp_path, monkeypatch, batch) -> None:
    src, dst = "/" + unique("src"), "/" + unique("dst")
    a = Etcd(etcd_a.url)
    try:
        keys = _etcd_seed(a, src, 150)
    finally:
        a.close()
    archive = _archive(_etcd_block(etcd_a, src), "/", tmp_path)
    monkeypatch.setattr(tasks.plan, "BATCH", batch)
    asked = _counting(monkeypatch, EtcdSession)
    p = _plan(archive, _etcd_block(etcd_b, dst), tmp_path, "plan")
    assert asked == []
    assert (p.to_create, p.identical, p.conflicts) == (len(keys), 0, 0)


def test_etcd_partial_prefix_counts_exactly(etcd_a, etcd_b, tmp_path, monkeypatch) -> None:
    src, dst = "/" + unique("src"), "/" + unique("dst")
    a, b = Etcd(etcd_a.url), Etcd(etcd_b.url)
    try:
        keys = _etcd_seed(a, src, 150)
        b.put_many({dst.encode() + b"/k%04d" % i: b"v%d" % i for i in range(0, 150, 3)})  # identical
        b.put_many({dst.encode() + b"/k%04d" % i: b"changed" for i in range(1, 150, 10)})  # conflicts
        b.put(dst.encode() + b"/dir/x", b"x")
        b.put(dst.encode() + b"/not-archived", b"y")
        current = {k: got["value"] for k in keys if (got := b.get(dst.encode() + k)) is not None}
    finally:
        a.close()
        b.close()
    create, identical, conflicts = _expect(keys, current)
    assert conflicts and identical and create
    archive = _archive(_etcd_block(etcd_a, src), "/", tmp_path)
    monkeypatch.setattr(tasks.plan, "BATCH", 40)
    p = _plan(archive, _etcd_block(etcd_b, dst), tmp_path, "plan")
    assert (p.to_create, p.identical, p.conflicts) == (create, identical, len(conflicts))
    assert sorted(p.conflict_paths) == conflicts


# --------------------------------------------------------------------------- Consul


def _consul_block(server: Any, prefix: str) -> ConsulCluster:
    return ConsulCluster(address=f"127.0.0.1:{server.port}", prefix=prefix)


def _consul_seed(url: str, prefix: str, n: int) -> dict[bytes, bytes]:
    c = consul_client(url)
    keys = {b"k%04d" % i: b"v%d" % i for i in range(n)}
    keys[b"dir/x"] = b"x"
    for k, v in keys.items():
        c.kv.put(f"{prefix}/{k.decode()}", v)
    return keys


@pytest.mark.parametrize("batch", [1000, 16])
def test_consul_empty_prefix_needs_no_lookup(consul_a, consul_b, tmp_path, monkeypatch, batch) -> None:
    src, dst = unique("src"), unique("dst")
    keys = _consul_seed(consul_a.url, src, 60)
    archive = _archive(_consul_block(consul_a, src), "/", tmp_path)
    # another prefix sharing the name's start holds keys: not below dst/, so dst is still empty
    consul_client(consul_b.url).kv.put(dst + "-sibling/k", b"s")
    monkeypatch.setattr(tasks.plan, "BATCH", batch)
    asked = _counting(monkeypatch, ConsulSession)
    p = _plan(archive, _consul_block(consul_b, dst), tmp_path, "plan")
    assert asked == []
    assert (p.to_create, p.identical, p.conflicts) == (len(keys), 0, 0)


def test_consul_partial_prefix_counts_exactly(consul_a, consul_b, tmp_path, monkeypatch) -> None:
    src, dst = unique("src"), unique("dst")
    keys = _consul_seed(consul_a.url, src, 60)
    c = consul_client(consul_b.url)
    for i in range(0, 60, 3):
        c.kv.put(f"{dst}/k{i:04d}", b"v%d" % i)
    for i in range(1, 60, 10):
        c.kv.put(f"{dst}/k{i:04d}", b"changed")
    c.kv.put(f"{dst}/dir/x", b"x")
    current: dict[bytes, bytes] = {}
    for k in keys:
        _, e = c.kv.get(f"{dst}/{k.decode()}")
        if e is not None:
            current[k] = e["Value"] or b""
    create, identical, conflicts = _expect(keys, current)
    assert conflicts and identical and create
    archive = _archive(_consul_block(consul_a, src), "/", tmp_path)
    monkeypatch.setattr(tasks.plan, "BATCH", 16)
    p = _plan(archive, _consul_block(consul_b, dst), tmp_path, "plan")
    assert (p.to_create, p.identical, p.conflicts) == (create, identical, len(conflicts))
    assert sorted(p.conflict_paths) == conflicts


# --------------------------------------------------------------------------- the undo list's read-back


def test_zookeeper_created_versions_pipelined(zk_b) -> None:
    """Replay reads back each created node's creation zxid (for ``burrow undo``) on the
    pipelined wire connection: the czxid kazoo sees, None for a missing or ephemeral node,
    and no READ needed (a node whose ACL denies it still answers)."""
    from kazoo.security import make_acl

    chroot = unique_root()
    no_read = [make_acl("world", "anyone", create=True, write=True, delete=True, admin=True)]
    with kazoo(zk_b.url) as c:
        c.create(chroot + "/a", b"a", makepath=True)
        c.create(chroot + "/a/secret", b"s", acl=no_read)
        c.create(chroot + "/a/eph", b"e", ephemeral=True)
        for i in range(250):
            c.create(f"{chroot}/a/n{i}", b"n")
        want = {p: c.exists(chroot + p).czxid for p in ["/a", "/a/secret"] + [f"/a/n{i}" for i in range(250)]}
        keys = [p.encode() for p in want] + [b"/a/eph", b"/a/missing"]
        session = ZooKeeperCluster(hosts=[zk_b.url], chroot=chroot, read_window=64).connect()
        try:
            got = session.created_versions(keys)
        finally:
            session.close()
    assert got == [*want.values(), None, None]
