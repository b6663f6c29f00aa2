"""The safety rule on real servers: a restore only creates what is missing, never changes an
existing byte, reports conflicts by path, and --dry-run writes nothing."""

from __future__ import annotations

import json

import pytest
from kazoo.security import make_acl
from zkutil import full_snapshot, kazoo, snapshot, unique_root

from blocks.zookeeper import ZooKeeperCluster
from burrow.records import Record
from flows.backup import backup
from flows.restore import restore

CONFLICT_VALUE = b"target-side-value-never-to-be-overwritten"
SOURCE_VALUE = b"source-side-value-of-b"


def seed_source(url: str, root: str) -> dict[str, bytes]:
    with kazoo(url) as c:
        c.create(root, b"root")
        c.create(root + "/a", b"alpha")
        c.create(root + "/a/x", b"x-data")
        c.create(root + "/a/x/deep", b"\x00\xff")
        c.create(root + "/b", SOURCE_VALUE)
        c.create(root + "/c", b"")
        c.create(root + "/c/seq-", b"s", sequence=True)
        c.create(root + "/ro", b"read-only", acl=[make_acl("world", "anyone", read=True, create=True)])
        return snapshot(c, root)


@pytest.fixture(scope="module")
def archive(zk_a, tmp_path_factory) -> tuple[str, str, dict[str, bytes]]:
    """One archive shared by this module's tests: (url, root, source snapshot)."""
    root = unique_root()
    before = seed_source(zk_a.url, root)
    store = tmp_path_factory.mktemp("store")
    s = backup(source=f"zk://{zk_a.url}", store=str(store), root=root, encryption=False)
    return s["url"], root, before


def test_restore_into_populated_tree_changes_no_existing_byte(archive, zk_b):
    url, root, source = archive
    with kazoo(zk_b.url) as c:
        c.create(root, b"root")  # identical
        c.create(root + "/a", b"alpha")  # identical
        c.create(root + "/b", b"first")
        c.set(root + "/b", CONFLICT_VALUE)  # conflict, version 1
        c.create(root + "/c", b"", acl=[make_acl("world", "anyone", all=True)])  # identical
        c.create(root + "/only-in-target", b"mine")
        c.set_acls(root + "/only-in-target", [make_acl("world", "anyone", read=True, write=True)])
        pre = full_snapshot(c, root)

        dry = restore(archive=url, into=f"zk://{zk_b.url}", dry_run=True)
        assert full_snapshot(c, root) == pre  # dry run: not a single write
        assert dry["created"] == 0 and dry["dry_run"] is True
        assert dry["planned_create"] == 4 and dry["identical"] == 3 and dry["conflicts"] == 1
        assert sorted(p.split(" ")[0] for p in dry["planned_paths"]) == sorted(
            p for p in source if p not in pre
        )

        s = restore(archive=url, into=f"zk://{zk_b.url}")
        after = full_snapshot(c, root)
        # every node that existed before is byte-for-byte, ACL and version the same
        assert {p: after[p] for p in pre} == pre
        assert c.get(root + "/b")[0] == CONFLICT_VALUE
        # missing nodes were created with the archived data (and ACL)
        assert {p: after[p][0] for p in source} == {p: source[p] if p not in pre else after[p][0] for p in source}
        for p in source:
            if p not in pre:
                assert after[p][0] == source[p]
        assert after[root + "/ro"][1] == ((1 | 4, "world", "anyone"),)
        assert set(after) == set(pre) | set(source)

    assert s["created"] == 4 and s["identical"] == 3 and s["conflicts"] == 1
    assert s["conflict_paths"] == [root + "/b"]
    assert s["status"] == "ok-with-conflicts"
    text = json.dumps(s)
    assert CONFLICT_VALUE.decode() not in text and SOURCE_VALUE.decode() not in text

    # Restoring again creates nothing and still changes nothing.
    with kazoo(zk_b.url) as c:
        again_before = full_snapshot(c, root)
        s2 = restore(archive=url, into=f"zk://{zk_b.url}")
        assert full_snapshot(c, root) == again_before
    assert s2["created"] == 0 and s2["identical"] == 4 + 3 and s2["conflicts"] == 1


def test_subtree_and_map(archive, zk_b):
    url, root, source = archive
    s = restore(archive=url, into=f"zk://{zk_b.url}", subtree=root + "/a", maps=[f"{root}={root}-mapped"])
    assert s["created"] == 3 and s["outside_subtree"] == len(source) - 3
    assert s["intermediate_created"] == 1  # the mapped root, so /a has a parent: with its archived value
    with kazoo(zk_b.url) as c:
        got = snapshot(c, root + "-mapped")
    assert got == {
        root + "-mapped": b"root",
        root + "-mapped/a": b"alpha",
        root + "-mapped/a/x": b"x-data",
        root + "-mapped/a/x/deep": b"\x00\xff",
    }


def test_restore_into_a_chroot_that_does_not_exist_yet(archive, zk_b):
    url, root, source = archive
    chroot = unique_root() + "/nested/chroot"
    s = restore(archive=url, into=f"zk://{zk_b.url}{chroot}", maps=[f"{root}=/restored"])
    assert s["created"] == len(source) and s["conflicts"] == 0
    with kazoo(zk_b.url) as c:
        got = snapshot(c, chroot + "/restored")
    assert {p.removeprefix(chroot + "/restored"): v for p, v in got.items()} == {
        p.removeprefix(root): v for p, v in source.items()
    }


def test_dry_run_into_an_empty_target_writes_nothing(archive, zk_b):
    url, root, source = archive
    chroot = unique_root()
    s = restore(archive=url, into=f"zk://{zk_b.url}{chroot}", dry_run=True)
    assert s["planned_create"] == len(source) and s["created"] == 0
    with kazoo(zk_b.url) as c:
        assert c.exists(chroot) is None  # not even the chroot


def session_for(url: str, **kw):
    return ZooKeeperCluster(hosts=[url], **kw).connect()


def test_multi_batch_falls_back_when_a_node_exists(zk_b):
    root = unique_root()
    with kazoo(zk_b.url) as c:
        c.create(root, b"")
        c.create(root + "/n3", b"existing")
        c.create(root + "/p", b"existing-parent")
        pre = full_snapshot(c, root + "/n3")
    s = session_for(zk_b.url, multi_ops=4)
    try:
        recs = [Record(f"{root}/n{i}".encode(), f"v{i}".encode(), {}) for i in range(7)]
        # batches of 4: [n0 n1 n2 n3] fails on n3 and falls back; [n4 n5 n6] commits
        assert s.create(recs) == [True, True, True, False, True, True, True]
        # an existing parent in the middle of a batch, its new child after it
        assert s.create([
            Record(f"{root}/q".encode(), b"q", {}),
            Record(f"{root}/p".encode(), b"archived-parent", {}),
            Record(f"{root}/p/c".encode(), b"child", {}),
        ]) == [True, False, True]
        # a single record goes the simple way
        assert s.create([Record(f"{root}/n3".encode(), b"again", {})]) == [False]
    finally:
        s.close()
    with kazoo(zk_b.url) as c:
        assert full_snapshot(c, root + "/n3") == pre
        assert c.get(root + "/p")[0] == b"existing-parent"
        assert snapshot(c, root) == {
            root: b"", **{f"{root}/n{i}": f"v{i}".encode() for i in range(7) if i != 3},
            root + "/n3": b"existing", root + "/q": b"q", root + "/p": b"existing-parent", root + "/p/c": b"child",
        }


def test_lookup_reports_missing_and_present(zk_b):
    root = unique_root()
    with kazoo(zk_b.url) as c:
        c.create(root + "/here", b"v", makepath=True)
        c.create(root + "/empty", b"")
    s = session_for(zk_b.url)
    try:
        assert s.lookup([f"{root}/here".encode(), f"{root}/gone".encode(), f"{root}/empty".encode()]) == [
            b"v", None, b""
        ]
    finally:
        s.close()
