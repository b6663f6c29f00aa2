"""ZooKeeper ACLs on restore (issue 8, items 2 and 3), against real servers, checked with kazoo.

* A node whose archived ACL the source redacted, the empty parents and the chroot a restore
  creates are never world-writable: they go to the restoring identity only (``auth`` scheme,
  all permissions) and the report lists them. An anonymous restorer, who has no identity to
  give them, is refused for redacted nodes; the nodes it invents take the ACL of the existing
  node they are created under. ``default_acl="open"`` widens all this on purpose.
* A parent whose archived ACL denies the restorer CREATE (Kafka: ``world:anyone:r`` plus the
  broker's identity with every permission; the test servers have no SASL, so a digest user
  plays ``sasl:kafka``) is created restorer-only, gets its children, then its archived ACL.
* A dry run warns when the restorer lacks CREATE on an existing parent it would write under.
"""

from __future__ import annotations

import uuid

import pytest
from kazoo.client import KazooClient
from kazoo.security import make_acl, make_digest_acl, make_digest_acl_credential
from pydantic import SecretStr
from zkutil import full_snapshot, kazoo, snapshot, unique_root

from blocks.zookeeper import ZooKeeperCluster
from burrow.errors import AuthError
from flows.backup import backup
from flows.restore import restore

OWNER = ("acl-owner", "owner-pw")
READER = ("acl-reader", "reader-pw")  # may read the protected node, not administer it: its ACL comes back redacted
RESTORER = ("acl-restorer", "restorer-pw")
KAFKA = ("kafka", "kafka-pw")
OPEN = ((31, "world", "anyone"),)


def only(user: tuple[str, str]) -> tuple[tuple[int, str, str], ...]:
    return ((31, "digest", make_digest_acl_credential(*user)),)


def acl_of(c: KazooClient, path: str) -> tuple[tuple[int, str, str], ...]:
    acl, _ = c.get_acls(path)
    return tuple(sorted((a.perms, a.id.scheme, a.id.id) for a in acl))


def acls_below(c: KazooClient, top: str) -> dict[str, tuple]:
    return {p: acl_of(c, p) for p in snapshot(c, top)}


def zk(url: str, user: tuple[str, str] | None = None, **kw) -> str:
    """A saved ZooKeeperCluster block's name (flows take no credentials in URLs; a registered
    block would also answer for the plain URL of the same server in later tests)."""
    if user:
        kw.update(digest_user=user[0], digest_password=SecretStr(user[1]))
    name = "acl-safety-" + uuid.uuid4().hex[:10]
    ZooKeeperCluster(hosts=[url], **kw).save(name)
    return name


@pytest.fixture(scope="module")
def archives(zk_a, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """name -> (archive url, archived root): "redacted" (one node whose ACL the backup user
    may not see), "plain" (all open) and "kafka" (every node but one restrictive)."""
    store = tmp_path_factory.mktemp("acl-store")
    out = {}
    with kazoo(zk_a.url, auth=KAFKA) as c:
        root = unique_root()
        c.create(root, b"top")
        c.create(root + "/locked", b"locked-data",
                 acl=[make_digest_acl(*READER, read=True), make_digest_acl(*OWNER, all=True)])
        c.create(root + "/open", b"open-data")
        c.create(root + "/dir/leaf", b"leaf", makepath=True)
        s = backup(source=zk(zk_a.url, READER), store=str(store), root=root, encryption=False)
        assert s["redacted_acls"] == 1
        out["redacted"] = (s["url"], root)

        root = unique_root()
        c.create(root + "/x/y", b"y", makepath=True)
        c.create(root + "/z", b"z")
        s = backup(source=f"zk://{zk_a.url}", store=str(store), root=root, encryption=False)
        out["plain"] = (s["url"], root)

        root = unique_root()
        kafka = [make_acl("world", "anyone", read=True), make_digest_acl(*KAFKA, all=True)]
        c.create(root, b"kafka-root", acl=kafka)
        for p, v in [("/brokers", b""), ("/brokers/ids", b""), ("/brokers/ids/0", b'{"host":"b0"}'),
                     ("/brokers/topics", b""), ("/brokers/topics/t1", b'{"partitions":3}'), ("/config", b"")]:
            c.create(root + p, v, acl=kafka)
        c.create(root + "/config/changes", b"read-only leaf", acl=[make_acl("world", "anyone", read=True)])
        c.create(root + "/config/open", b"open leaf")
        s = backup(source=zk(zk_a.url, KAFKA), store=str(store), root=root, encryption=False)
        assert s["redacted_acls"] == 0  # the backup identity administers them: hashes visible
        out["kafka"] = (s["url"], root)
    return out


def test_redacted_nodes_empty_parents_and_chroot_go_to_the_restorer_only(archives, zk_b):
    url, root = archives["redacted"]
    top = unique_root()
    chroot = top + "/deep/chroot"
    r = restore(archive=url, into=zk(zk_b.url, RESTORER, chroot=chroot), maps=[f"{root}=/x/y/restored"])
    assert r["status"] == "ok" and r["created"] == 5 and r["intermediate_created"] == 2
    assert r["metadata_not_carried"] == {"acl (redacted by the source)": 1}
    mine = only(RESTORER)
    base = chroot + "/x/y/restored"
    with kazoo(zk_b.url, auth=RESTORER) as c:
        got = acls_below(c, top)
        assert c.get(base + "/locked")[0] == b"locked-data"
    assert got == {
        top: mine, top + "/deep": mine, chroot: mine,  # the chroot the restore created
        chroot + "/x": mine, chroot + "/x/y": mine,  # empty parents
        base + "/locked": mine,  # redacted by the source
        base: OPEN, base + "/open": OPEN, base + "/dir": OPEN, base + "/dir/leaf": OPEN,  # as archived
    }
    # the report lists every node an administrator may want to give its real ACL
    assert r["acl_restricted"] == 6
    assert sorted(r["acl_restricted_paths"]) == sorted([
        f"{top} (chroot)", f"{top}/deep (chroot)", f"{chroot} (chroot)",
        "/x (intermediate)", "/x/y (intermediate)", "/x/y/restored/locked (archived ACL redacted)",
    ])
    assert r["acl_set_after_children"] == 0 and r["acl_not_applied"] == 0


def test_an_anonymous_restorer_never_opens_a_protected_node(archives, zk_b):
    url, root = archives["redacted"]
    base = unique_root()
    # No identity to give a redacted node: refused while planning, dry run included.
    for dry_run in (True, False):
        with pytest.raises(AuthError) as err:
            restore(archive=url, into=f"zk://{zk_b.url}", maps=[f"{root}={base}"], dry_run=dry_run)
        message = str(err.value)
        assert message.startswith(base + "/locked: ") and "digest credentials" in message
        assert "default_acl" in message and "Nothing was written" in message
    with kazoo(zk_b.url) as c:
        assert c.exists(base) is None

    # Nodes it invents take the ACL of the existing node they hang under, never world:anyone.
    url, root = archives["plain"]
    parent = [make_acl("world", "anyone", read=True, create=True), make_digest_acl(*OWNER, all=True)]
    with kazoo(zk_b.url) as c:
        c.create(base, b"app-parent", acl=parent)
        inherited = acl_of(c, base)
    r = restore(archive=url, into=f"zk://{zk_b.url}", maps=[f"{root}={base}/a/b/r"])
    assert r["created"] == 4 and r["intermediate_created"] == 2 and r["acl_restricted"] == 0
    with kazoo(zk_b.url) as c:
        got = acls_below(c, base)
    assert got == {
        base: inherited, base + "/a": inherited, base + "/a/b": inherited,
        base + "/a/b/r": OPEN, base + "/a/b/r/x": OPEN, base + "/a/b/r/x/y": OPEN, base + "/a/b/r/z": OPEN,
    }

    # The target block may open them on purpose.
    url, root = archives["redacted"]
    r = restore(archive=url, into=zk(zk_b.url, default_acl="open"), maps=[f"{root}={base}-open"])
    assert r["created"] == 5 and r["acl_restricted"] == 0
    with kazoo(zk_b.url) as c:
        assert acl_of(c, base + "-open/locked") == OPEN


def test_restrictive_parents_get_their_children_then_their_acl(archives, zk_b):
    url, root = archives["kafka"]
    kafka = tuple(sorted([(1, "world", "anyone"), (31, "digest", make_digest_acl_credential(*KAFKA))]))
    want = {
        "": (b"kafka-root", kafka), "/brokers": (b"", kafka), "/brokers/ids": (b"", kafka),
        "/brokers/ids/0": (b'{"host":"b0"}', kafka), "/brokers/topics": (b"", kafka),
        "/brokers/topics/t1": (b'{"partitions":3}', kafka), "/config": (b"", kafka),
        "/config/changes": (b"read-only leaf", ((1, "world", "anyone"),)), "/config/open": (b"open leaf", OPEN),
    }
    admin = zk(zk_b.url, OWNER)  # not the identity the ACLs name: CREATE is denied to it everywhere

    # Into an empty target: the restore does not stop halfway on the first child.
    target = unique_root()
    r = restore(archive=url, into=admin, maps=[f"{root}={target}"])
    assert r["status"] == "ok" and r["created"] == len(want) and r["conflicts"] == 0
    assert r["acl_set_after_children"] == len(want) - 1 and r["acl_not_applied"] == 0
    assert r["acl_restricted"] == 0
    with kazoo(zk_b.url, auth=KAFKA) as c:  # (only an ADMIN of a node sees its digest hashes)
        got = {p[len(target):]: (c.get(p)[0], acl_of(c, p), c.exists(p).aversion) for p in snapshot(c, target)}
    assert {p: v[:2] for p, v in got.items()} == want
    # the archived ACL was set once, on nodes this run created; the open leaf never changed
    assert {p: v[2] for p, v in got.items()} == {p: 0 if p == "/config/open" else 1 for p in want}

    # Run again: every node exists, nothing changes.
    with kazoo(zk_b.url, auth=KAFKA) as c:
        before = full_snapshot(c, target)
        again = restore(archive=url, into=admin, maps=[f"{root}={target}"])
        assert full_snapshot(c, target) == before
    assert again["created"] == 0 and again["identical"] == len(want) and again["acl_set_after_children"] == 0

    # A node that exists already is never changed, even when the restore creates below it.
    target = unique_root()
    with kazoo(zk_b.url, auth=KAFKA) as c:
        c.create(target, b"kafka-root")  # the application's own, open
        r = restore(archive=url, into=admin, maps=[f"{root}={target}"])
        assert acl_of(c, target) == OPEN and c.exists(target).aversion == 0
        assert {p[len(target):]: acl_of(c, p) for p in snapshot(c, target)} == {
            p: OPEN if p == "" else acl for p, (_, acl) in want.items()
        }
    assert r["created"] == len(want) - 1 and r["identical"] == 1 and r["acl_set_after_children"] == len(want) - 2

    # Anonymous: no identity to hold the temporary ACL. Refused while planning, nothing written.
    target = unique_root()
    for dry_run in (True, False):
        with pytest.raises(AuthError, match="without an identity") as err:
            restore(archive=url, into=f"zk://{zk_b.url}", maps=[f"{root}={target}"], dry_run=dry_run)
        assert f"below {target} " in str(err.value) and "digest credentials" in str(err.value)
    with kazoo(zk_b.url) as c:
        assert c.exists(target) is None


def test_dry_run_warns_when_the_restorer_may_not_create_under_an_existing_parent(archives, zk_b):
    url, root = archives["plain"]
    guarded = unique_root()
    with kazoo(zk_b.url) as c:
        c.create(guarded, b"guarded", acl=[make_acl("world", "anyone", read=True), make_digest_acl(*OWNER, all=True)])
        c.create(guarded + "-open", b"")
        # CREATE without ADMIN: ZooKeeper shows the restorer its own entry as "acl-restorer:x"
        c.create(guarded + "-create-only", b"", acl=[make_digest_acl(*RESTORER, read=True, create=True)])
    restorer = zk(zk_b.url, RESTORER)
    dry = restore(archive=url, into=restorer, maps=[f"{root}={guarded}/r"], dry_run=True)
    assert dry["planned_create"] == 4 and dry["conflicts"] == 0
    assert len(dry["warnings"]) == 1
    assert "lacks CREATE on 1 existing" in dry["warnings"][0] and f"({guarded})" in dry["warnings"][0]
    # ... and rightly so: the real run is refused by ZooKeeper before it creates anything there
    with pytest.raises(AuthError, match="denied creating"):
        restore(archive=url, into=restorer, maps=[f"{root}={guarded}/r"])
    with kazoo(zk_b.url) as c:
        assert c.get_children(guarded) == []
    # where it may create, no warning
    for where in ("-open", "-create-only"):
        ok = restore(archive=url, into=restorer, maps=[f"{root}={guarded}{where}/r"], dry_run=True)
        assert "warnings" not in ok and ok["planned_create"] == 4, where
    # the chroot's parent counts too
    dry = restore(archive=url, into=zk(zk_b.url, RESTORER, chroot=guarded + "/chroot"), dry_run=True)
    assert f"{guarded} (to create the chroot {guarded}/chroot)" in dry["warnings"][0]
