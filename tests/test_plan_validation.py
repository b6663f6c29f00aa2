"""Everything a restore would hand the target is checked while planning: a key ZooKeeper
cannot hold, a malformed or refused ACL, malformed metadata, or the planner's own
``intermediate`` mark smuggled into an archive stop the restore before its first write, with
one clear error naming the key (never a value), instead of failing halfway through replay.

The archives are crafted record by record (as a tampered or foreign archive could be); the
targets are real servers, read back with independent clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kvutil import Etcd, consul_client, consul_snapshot, unique
from zkutil import kazoo, unique_root

from blocks.resolve import source_from_ref
from blocks.zookeeper import ZooKeeperCluster
from burrow.archive import ArchiveWriter
from burrow.errors import PermanentError
from burrow.records import Record, display_key
from tasks.plan import plan_restore
from tasks.replay import replay_plan

CANARY = b"canary-value-that-no-message-may-show"


def craft(path: Path, service: str, records: list[tuple[bytes, bytes, dict[str, Any]]]) -> Path:
    with open(path, "wb") as f:
        w = ArchiveWriter(f, service=service)
        for key, value, meta in records:
            w.add(Record(key, value, meta))
        w.finish({"source": "crafted", "service": service})
    return path


def restore_fails(archive: Path, target: Any, work: Path) -> str:
    """Plan (and, should planning let the archive through, replay); return the error."""
    with pytest.raises(PermanentError) as caught:
        plan = plan_restore(archive, target, work)
        replay_plan(plan, target)  # only reached when planning let the archive through
    return str(caught.value)


def assert_names_only_the_key(message: str, bad_key: bytes) -> None:
    """One line that names the key and says that nothing was written; no value."""
    assert display_key(bad_key) in message and "nothing was written" in message, message
    assert CANARY.decode() not in message and "\n" not in message


ZK_CASES = {
    # ACLs ZooKeeper refuses, by its own rules or because no provider takes the scheme
    "world-id": (b"/bad", {"acl": [[31, "world", "nobody"]]}),
    "digest-id": (b"/bad", {"acl": [[1, "world", "anyone"], [31, "digest", "user-without-hash"]]}),
    "ip-id": (b"/bad", {"acl": [[31, "ip", "10.0.0.300/8"]]}),
    "scheme-not-enabled": (b"/bad", {"acl": [[31, "x509", "CN=someone"]]}),
    "auth": (b"/bad", {"acl": [[31, "auth", ""]]}),
    # malformed ACLs
    "not-a-triple": (b"/bad", {"acl": [[31, "world"]]}),
    "not-a-list": (b"/bad", {"acl": "world:anyone:cdrwa"}),
    "perms-beyond-int32": (b"/bad", {"acl": [[1 << 40, "world", "anyone"]]}),
    # keys ZooKeeper cannot hold
    "dot": (b"/a/./b", {}),
    "dotdot": (b"/a/..", {}),
    "empty-component": (b"/a//b", {}),
    "trailing-slash": (b"/a/", {}),
    "nul": (b"/a\x00b", {}),
    "control": (b"/a\x07b", {}),
    "beyond-bmp": ("/a\U0001f600".encode(), {}),
    # the planner's own mark
    "intermediate": (b"/bad", {"intermediate": True}),
}


@pytest.mark.parametrize("case", ZK_CASES)
def test_zookeeper_refuses_while_planning(case: str, zk_b, tmp_path: Path) -> None:
    root = unique_root().encode()
    suffix, meta = ZK_CASES[case]
    bad = root + suffix
    good = [(root, b"root", {}), (root + b"/a", b"a", {})] + [(root + b"/a/n%d" % i, CANARY, {}) for i in range(6)]
    archive = craft(tmp_path / "x.burrow", "zookeeper", [*good, (bad, CANARY, meta), (root + b"/z", b"z", {})])
    # two creates per multi: a failure halfway through replay would leave nodes behind
    target = ZooKeeperCluster(hosts=[zk_b.url], multi_ops=2)
    message = restore_fails(archive, target, tmp_path)
    with kazoo(zk_b.url) as c:
        assert c.exists(root.decode()) is None  # not a single node
    assert_names_only_the_key(message, bad)


def test_acls_zookeeper_takes_are_restored_as_archived(zk_b, tmp_path: Path) -> None:
    """What the checks let through is restored as archived, ACLs included, also on a parent
    that a --subtree restore has to create (and a full restore then finds it identical)."""
    root = unique_root()
    acls = {
        root: [[23, "world", "anyone"], [31, "ip", "127.0.0.1"]],  # anyone but DELETE
        # (ADMIN for anyone: ZooKeeper shows digest hashes only to readers with ADMIN)
        root + "/digest": [[17, "world", "anyone"], [31, "digest", "bob:p2aMQqK0ZLTcPqSJ9T3KPoi2c1w="]],
        root + "/ip": [[1, "world", "anyone"], [31, "ip", "127.0.0.1"], [3, "ip", "10.0.0.0/8"]],
        root + "/odd-perms": [[-1, "world", "anyone"]],
    }
    records = [(k.encode(), b"value of " + k.encode(), {"acl": a}) for k, a in acls.items()]
    archive = craft(tmp_path / "ok.burrow", "zookeeper", records)
    target = ZooKeeperCluster(hosts=[zk_b.url])
    part = replay_plan(plan_restore(archive, target, tmp_path, subtree=root + "/ip"), target)
    assert part.created == 1 and part.intermediate_created == 1 and part.conflicts == 0
    plan = plan_restore(archive, target, tmp_path)
    assert plan.identical == 2 and plan.conflicts == 0 and plan.to_create == 2
    assert replay_plan(plan, target).created == 2
    with kazoo(zk_b.url) as c:
        for key, value, meta in records:
            data, _ = c.get(key.decode())
            got = [[a.perms, a.id.scheme, a.id.id] for a in c.get_acls(key.decode())[0]]
            assert (data, got) == (value, meta["acl"]), key


def test_non_utf8_etcd_key_into_zookeeper(zk_b, tmp_path: Path) -> None:
    root = unique_root().encode()
    bad = root + b"/\xff\xfe"
    archive = craft(tmp_path / "e.burrow", "etcd", [(root + b"/a", b"a", {}), (bad, CANARY, {})])
    message = restore_fails(archive, ZooKeeperCluster(hosts=[zk_b.url], multi_ops=1), tmp_path)
    with kazoo(zk_b.url) as c:
        assert c.exists(root.decode()) is None
    assert_names_only_the_key(message, bad)


@pytest.mark.parametrize("case", ["intermediate", "lease"])
def test_etcd_metadata_is_checked_while_planning(case: str, etcd_b, tmp_path: Path) -> None:
    """A smuggled ``intermediate`` mark would hide a conflict (the key "only needs to exist")."""
    name = ("/" + unique("meta")).encode()
    e = Etcd(etcd_b.url)
    try:
        e.put(name + b"/theirs", b"their-value")
        meta = {"intermediate": True} if case == "intermediate" else {"lease": {"id": 7, "ttl": "soon"}}
        archive = craft(tmp_path / "e.burrow", "etcd", [
            (name + b"/new", b"new", {}), (name + b"/theirs", CANARY, meta), (name + b"/after", b"after", {}),
        ])
        target = source_from_ref(f"etcd://{etcd_b.host}:{etcd_b.port}")
        message = restore_fails(archive, target, tmp_path)
        assert e.snapshot(name) == {name + b"/theirs": b"their-value"}
        assert_names_only_the_key(message, name + b"/theirs")
    finally:
        e.close()


def test_consul_flags_are_checked_while_planning(consul_b, tmp_path: Path) -> None:
    name = unique("flags").encode()
    bad = name + b"/bad"
    archive = craft(tmp_path / "c.burrow", "consul", [(name + b"/ok", b"ok", {}), (bad, CANARY, {"flags": "lots"})])
    target = source_from_ref(f"consul://{consul_b.host}:{consul_b.port}")
    message = restore_fails(archive, target, tmp_path)
    assert consul_snapshot(consul_client(consul_b.url), name.decode()) == {}
    assert_names_only_the_key(message, bad)
