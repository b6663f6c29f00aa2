"""Parents before children, whatever --map, --subtree or the translation between services do
to the archive's order; and a parent that a restore has to create gets its archived value and
ACL whenever the archive holds it, so a later restore never counts it as a conflict.

Each tree is seeded and read back with independent clients (kazoo, etcd's JSON gateway) and
compared key by key, byte by byte (and ACL by ACL)."""

from __future__ import annotations

from kazoo.security import make_acl
from kvutil import Etcd, backup_kwargs, unique
from zkutil import full_snapshot, kazoo, snapshot, unique_root

import tasks.plan
from flows.backup import backup
from flows.restore import restore

# A restrictive but workable ACL: everything except DELETE, for anyone.
NO_DELETE = [make_acl("world", "anyone", read=True, write=True, create=True, admin=True)]


def _acls(c, path: str) -> tuple:
    return tuple((a.perms, a.id.scheme, a.id.id) for a in c.get_acls(path)[0])


def test_map_below_a_key_the_archive_also_holds(zk_a, zk_b, tmp_path, monkeypatch) -> None:
    """``--map /app=/services/app`` on an archive that also holds ``/services``: the mapped
    keys sort ahead of ``/services`` in archive order."""
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root, b"root")
        c.create(root + "/app", b"app")
        c.create(root + "/app/x", b"x")
        c.create(root + "/app/x/deep", b"\x00deep\xff")
        c.create(root + "/services", b"services", acl=NO_DELETE)
        c.create(root + "/services/other", b"other")
        archived_acl = _acls(c, root + "/services")
    s = backup(source=f"zk://{zk_a.url}", store=str(tmp_path), root=root, **backup_kwargs())
    # Tiny sort runs and lookup batches: the external merge and the state kept across
    # batches are exercised too (raising=False: the names are new with the fix).
    monkeypatch.setattr(tasks.plan, "RUN_BYTES", 200, raising=False)
    monkeypatch.setattr(tasks.plan, "BATCH", 2)

    r = restore(archive=s["url"], into=f"zk://{zk_b.url}", maps=[f"{root}/app={root}/services/app"])
    assert r["status"] == "ok" and r["conflicts"] == 0, r
    assert r["created"] == 6 and r["intermediate_created"] == 0
    want = {
        root: b"root",
        root + "/services": b"services",
        root + "/services/other": b"other",
        root + "/services/app": b"app",
        root + "/services/app/x": b"x",
        root + "/services/app/x/deep": b"\x00deep\xff",
    }
    with kazoo(zk_b.url) as c:
        assert snapshot(c, root) == want
        assert _acls(c, root + "/services") == archived_acl

    again = restore(archive=s["url"], into=f"zk://{zk_b.url}", maps=[f"{root}/app={root}/services/app"])
    assert again["created"] == 0 and again["conflicts"] == 0 and again["identical"] == 6, again


def test_etcd_key_and_its_slash_child_into_zookeeper(etcd_a, zk_b, tmp_path) -> None:
    """etcd ``x`` and ``/x/y`` are ZooKeeper ``/x`` and ``/x/y``, but in etcd's byte order
    ``/x/y`` comes first: ``/x`` must still be created first, with the value of ``x``."""
    name = unique("x")
    tree = {
        f"/{name}/y".encode(): b"child",
        f"/{name}/y/z".encode(): b"\xffgrandchild",
        name.encode(): b"top",
        f"{name}/w".encode(): b"",
    }
    e = Etcd(etcd_a.url)
    try:
        for k, v in tree.items():
            e.put(k, v)
    finally:
        e.close()
    s = backup(source=f"etcd://{etcd_a.host}:{etcd_a.port}", store=str(tmp_path), **backup_kwargs())

    r = restore(archive=s["url"], into=f"zk://{zk_b.url}", subtree="/" + name)
    assert r["status"] == "ok" and r["conflicts"] == 0, r
    assert r["created"] == 4 and r["intermediate_created"] == 0
    with kazoo(zk_b.url) as c:
        assert snapshot(c, "/" + name) == {
            f"/{name}": b"top", f"/{name}/y": b"child", f"/{name}/y/z": b"\xffgrandchild", f"/{name}/w": b"",
        }
    again = restore(archive=s["url"], into=f"zk://{zk_b.url}", subtree=name)
    assert again["status"] == "ok" and again["created"] == 0 and again["conflicts"] == 0
    assert again["identical"] == 4


def test_subtree_creates_missing_parents_with_their_archived_value_and_acl(zk_a, zk_b, tmp_path) -> None:
    """``--subtree /big/g0000`` creates ``/big`` as archived, so a later full restore finds it
    identical (not a conflict); with --map the renamed parent gets the archived value too."""
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root, b"big-root", acl=NO_DELETE)
        for g in ("g0000", "g0001"):
            c.create(f"{root}/{g}", g.encode())
            c.create(f"{root}/{g}/k", b"value of " + g.encode())
        source = full_snapshot(c, root)
    s = backup(source=f"zk://{zk_a.url}", store=str(tmp_path), root=root, **backup_kwargs())

    part = restore(archive=s["url"], into=f"zk://{zk_b.url}", subtree=root + "/g0000")
    assert part["status"] == "ok" and part["conflicts"] == 0
    assert part["created"] == 2 and part["intermediate_created"] == 1 and part["outside_subtree"] == 3
    with kazoo(zk_b.url) as c:
        got = full_snapshot(c, root)
    assert set(got) == {root, root + "/g0000", root + "/g0000/k"}
    for path, node in got.items():
        assert node[:2] == source[path][:2], path  # data and ACL as archived

    full = restore(archive=s["url"], into=f"zk://{zk_b.url}")
    assert full["status"] == "ok" and full["conflicts"] == 0 and full["conflict_paths"] == []
    assert full["created"] == 2 and full["identical"] == 3
    with kazoo(zk_b.url) as c:
        got = full_snapshot(c, root)
    assert {p: n[:2] for p, n in got.items()} == {p: n[:2] for p, n in source.items()}

    moved = root + "-moved"
    m = restore(archive=s["url"], into=f"zk://{zk_b.url}", subtree=root + "/g0001", maps=[f"{root}={moved}"])
    assert m["status"] == "ok" and m["created"] == 2 and m["intermediate_created"] == 1
    with kazoo(zk_b.url) as c:
        assert snapshot(c, moved) == {moved: b"big-root", moved + "/g0001": b"g0001", moved + "/g0001/k": b"value of g0001"}
        assert _acls(c, moved) == source[root][1]
