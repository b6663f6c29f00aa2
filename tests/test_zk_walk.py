"""The ZooKeeper walk against a real server: what a backup captures, and what it leaves out."""

from __future__ import annotations

import os

from kazoo.security import make_acl, make_digest_acl
from pydantic import SecretStr
from zkutil import kazoo, unique_root

from blocks.resolve import register
from blocks.source import WalkStats
from blocks.zookeeper import ZooKeeperCluster
from tasks.catalog import open_archive

UNUSUAL = [
    "with space", "ünïcødé-☃", "per%cent", "hash#tag", "q?mark", "star*", "colon:x", "eq=amp&plus+",
    "quote'\"", "(paren)[br]{cb}", "~tilde!@$^|", "dots..x", "-leading-dash", "日本語",
]
BIG = os.urandom(1024 * 1024)


def build_tree(c, root: str) -> None:
    c.create(root, b"root-data")
    c.create(root + "/parent", b"parent-data")
    c.create(root + "/parent/child", b"child-data")
    c.create(root + "/parent/child/grandchild", b"")
    c.create(root + "/parent/eph", b"gone", ephemeral=True)
    c.create(root + "/acl", b"acl-data", acl=[make_acl("world", "anyone", read=True, write=True)])
    c.create(root + "/bin", bytes(range(256)))
    c.create(root + "/empty", b"")
    c.create(root + "/big", BIG)
    c.create(root + "/seq", b"")
    for _ in range(3):
        c.create(root + "/seq/job-", b"j", sequence=True)
    c.delete(root + "/seq/job-0000000001")  # a gap: names must come back exactly
    c.create(root + "/odd", b"")
    for name in UNUSUAL:
        c.create(f"{root}/odd/{name}", name.encode())
    c.set(root + "/parent", b"parent-data-v2")  # version 1


def walk(url: str, root: str, **kw) -> tuple[list, WalkStats]:
    session = ZooKeeperCluster(hosts=[url], **kw).connect()
    stats = WalkStats()
    try:
        return list(session.walk(root.encode(), stats)), stats
    finally:
        session.close()


def test_walk_captures_data_acl_stat_and_skips_ephemerals(zk_a):
    root = unique_root()
    with kazoo(zk_a.url) as c:
        build_tree(c, root)
        recs, stats = walk(zk_a.url, root)
        by_key = {r.key.decode(): r for r in recs}
        expected = {}

        def visit(p):
            data, stat = c.get(p)
            if stat.ephemeralOwner:
                return
            acl, _ = c.get_acls(p)
            expected[p] = (data, stat, acl)
            for ch in c.get_children(p):
                visit(p + "/" + ch)

        visit(root)

    assert set(by_key) == set(expected)
    assert len(recs) == len(by_key)  # every node once
    assert root + "/parent/eph" not in by_key and stats.skipped_ephemeral == 1
    # data also on nodes that have children; binary, empty and 1 MB values exact
    assert by_key[root].value == b"root-data"
    assert by_key[root + "/parent"].value == b"parent-data-v2"
    assert by_key[root + "/parent/child"].value == b"child-data"
    assert by_key[root + "/bin"].value == bytes(range(256))
    assert by_key[root + "/empty"].value == b"" and by_key[root + "/parent/child/grandchild"].value == b""
    assert by_key[root + "/big"].value == BIG
    # sequential nodes keep their exact names (gap included)
    assert {k for k in by_key if k.startswith(root + "/seq/")} == {
        root + "/seq/job-0000000000", root + "/seq/job-0000000002"
    }
    # unusual characters round trip as exact UTF-8 keys
    assert {by_key[f"{root}/odd/{n}"].value.decode() for n in UNUSUAL} == set(UNUSUAL)
    # ACL and stat of every node, exactly as ZooKeeper reports them
    for path, (data, stat, acl) in expected.items():
        m = by_key[path].meta
        assert by_key[path].value == data
        assert m["acl"] == [[a.perms, a.id.scheme, a.id.id] for a in acl], path
        for f in ("ctime", "mtime", "version", "czxid", "mzxid", "pzxid"):
            assert m[f] == getattr(stat, f), (path, f)
    assert by_key[root + "/acl"].meta["acl"] == [[3, "world", "anyone"]]
    assert by_key[root + "/parent"].meta["version"] == 1
    # parents come before children
    index = {r.key: i for i, r in enumerate(recs)}
    for r in recs:
        parent = r.key.rsplit(b"/", 1)[0]
        if r.key != root.encode():
            assert index[parent] < index[r.key], r.key
    # the highest zxid seen
    assert stats.info["max_zxid"] == max(
        max(s.czxid, s.mzxid, s.pzxid) for _, s, _ in expected.values()
    )
    assert stats.redacted_acls == 0 and not stats.warnings


def test_walk_from_the_top_excludes_zookeeper_node(zk_a):
    assert ZooKeeperCluster().exclude == ["/zookeeper"]  # the default
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/x", b"1", makepath=True)
        # other tests' trees (some unreadable on purpose) are left out of this walk
        others = ["/" + ch for ch in c.get_children("/") if ch not in ("zookeeper", root[1:])]
    recs, stats = walk(zk_a.url, "/", exclude=["/zookeeper", *others])
    keys = [r.key for r in recs]
    assert not any(k == b"/zookeeper" or k.startswith(b"/zookeeper/") for k in keys)
    assert stats.skipped_excluded == 1 + len(others)
    assert keys == [root.encode(), (root + "/x").encode()]  # "/" itself is not a record
    # /zookeeper is there when not excluded
    recs, stats = walk(zk_a.url, "/", exclude=others)
    assert b"/zookeeper" in [r.key for r in recs] and stats.skipped_excluded == len(others)


def test_walk_of_a_missing_root_is_an_error(zk_a):
    import pytest

    from burrow.errors import SourceError

    with pytest.raises(SourceError, match="does not exist"):
        walk(zk_a.url, unique_root() + "/nope")


def test_backup_manifest_records_counts_zxid_and_name(zk_a, store):
    from flows.backup import backup

    root = unique_root()
    with kazoo(zk_a.url) as c:
        build_tree(c, root)
        s = backup(source=f"zk://{zk_a.url}", store=str(store), root=root, name="dc-test", encryption=False)
        zxids = []
        for p in [root, root + "/parent", root + "/big"]:
            st = c.exists(p)
            zxids += [st.czxid, st.mzxid, st.pzxid]
    with open_archive(s["url"]) as reader:
        m = reader.manifest
        recs = list(reader.records())
    assert m["service"] == "zookeeper" and m["source"] == "dc-test" and m["root"] == root
    assert m["keys"] == len(recs) == s["keys"] == 12 + len(UNUSUAL)
    assert m["skipped_ephemeral"] == s["skipped_ephemeral"] == 1
    assert m["service_info"]["max_zxid"] >= max(zxids)
    assert m["raw_bytes"] == sum(len(r.key) + len(r.value) for r in recs)
    assert m["content_bytes"] > m["raw_bytes"] > len(BIG)
    assert "/dc-test/" in s["url"] and s["url"].endswith(".burrow")


def test_redacted_acls_are_reported_and_never_restored_verbatim(zk_a, zk_b, store):
    """The backup user may READ the node but not ADMIN it: ZooKeeper hides the digest
    hashes (user:x). The backup warns; the restore gives the node to the restoring identity only."""
    from flows.backup import backup
    from flows.restore import restore

    root = unique_root()
    secret = b"only-for-backup-and-admin"
    with kazoo(zk_a.url) as c:
        c.create(root, b"")
        c.create(root + "/locked", secret, acl=[
            make_digest_acl("backup", "backup-pw", read=True),
            make_digest_acl("admin", "admin-pw", all=True),
        ])
        c.create(root + "/open", b"open")
        # where the backup user has ADMIN the hash is visible: that ACL is restored exactly
        full_acl = [make_digest_acl("backup", "backup-pw", all=True), make_acl("world", "anyone", read=True)]
        c.create(root + "/adminable", b"adm", acl=full_acl)
    ref = register(ZooKeeperCluster(hosts=[zk_a.url], digest_user="backup", digest_password=SecretStr("backup-pw")))
    assert "backup-pw" not in ref
    s = backup(source=ref, store=str(store), root=root, encryption=False)
    assert s["redacted_acls"] == 1
    assert any("redacted" in w and "user:x" in w for w in s["warnings"])
    with open_archive(s["url"]) as reader:
        assert reader.manifest["redacted_acls"] == 1
        assert reader.manifest["warnings"] == s["warnings"]
        locked = next(r for r in reader.records() if r.key == (root + "/locked").encode())
    assert locked.value == secret and locked.meta.get("acl_redacted") is True
    assert {e[2] for e in locked.meta["acl"]} == {"backup:x", "admin:x"}

    into = "walk-restorer-" + root.strip("/")  # saved, not registered: the plain zk_b URL stays anonymous
    ZooKeeperCluster(hosts=[zk_b.url], digest_user="backup", digest_password=SecretStr("backup-pw")).save(into)
    r = restore(archive=s["url"], into=into)
    assert r["created"] == 4 and r["conflicts"] == 0
    assert r["metadata_not_carried"] == {"acl (redacted by the source)": 1}
    assert r["acl_restricted_paths"] == [root + "/locked (archived ACL redacted)"]
    with kazoo(zk_b.url, auth=("backup", "backup-pw")) as c:
        data, _ = c.get(root + "/locked")
        acl, _ = c.get_acls(root + "/locked")
    assert data == secret
    # only the restoring identity: never the target's world:anyone, never "digest backup:x"
    assert list(acl) == [make_digest_acl("backup", "backup-pw", all=True)]
    with kazoo(zk_b.url, auth=("backup", "backup-pw")) as c:
        acl, _ = c.get_acls(root + "/adminable")
    assert sorted(acl) == sorted(full_acl)


def test_walk_modes_agree_on_a_larger_tree(zk_a):
    """multiRead or plain requests, one or several connections, tiny or large windows, with
    a chroot: the same records, parents first."""
    from zkutil import snapshot

    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root, b"top")
        t = c.transaction()
        for i in range(20):
            t.create(f"{root}/p{i:02d}", f"p{i}".encode())
        t.commit()
        for i in range(20):
            t = c.transaction()
            for j in range(100):
                t.create(f"{root}/p{i:02d}/c{j:03d}", os.urandom(40))
            assert all(r is not None and not isinstance(r, Exception) for r in t.commit())
        for k in range(4):
            c.create(f"{root}/big{k}", os.urandom(1024 * 1024 - 512))
        expected = snapshot(c, root)
    assert len(expected) == 1 + 20 + 2000 + 4
    for kw in ({}, {"multi_read": False, "read_connections": 1},
               {"read_group": 7, "read_window": 60, "read_connections": 3}):
        recs, stats = walk(zk_a.url, root, **kw)
        assert len(recs) == len(expected), kw
        assert {r.key.decode(): r.value for r in recs} == expected, kw
        seen = set()
        for r in recs:
            assert r.key == root.encode() or r.key.rsplit(b"/", 1)[0] in seen, (kw, r.key)
            seen.add(r.key)
    recs, _ = walk(zk_a.url, "/", chroot=root)
    assert {r.key.decode(): r.value for r in recs} == {
        p.removeprefix(root): v for p, v in expected.items() if p != root
    }
