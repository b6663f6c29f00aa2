"""Post-verify checks what a restore carries besides values (issue 17, part 4), against real
servers: a ZooKeeper node's ACL, a Consul key's flags, an etcd key's lease. The differences are
made with independent clients (kazoo, py-consul, etcd's JSON gateway) after a restore, and a
failover whose target holds a node with the archived value but another ACL fails its run."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from kazoo.security import ACL, Id, Permissions, make_acl, make_digest_acl, make_digest_acl_credential
from kvutil import Etcd, consul_client, unique
from pydantic import SecretStr
from zkutil import kazoo, unique_root

from blocks.consul import ConsulCluster
from blocks.etcd import EtcdCluster
from blocks.zookeeper import ZooKeeperCluster
from burrow.testing.servers import free_port
from flows.backup import backup
from flows.failover import failover
from tasks.plan import plan_restore
from tasks.postverify import PostVerifyFailed, verify_target
from tasks.replay import replay_plan

OPS = ("pv-ops", "ops-pw")  # backs up and restores: reads and administers the protected nodes
KAFKA = ("pv-kafka", "kafka-pw")
DEAD = f"zk://127.0.0.1:{free_port()}"


def local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def restore_into(archive: Path, block, work: Path, **kw) -> None:  # noqa: ANN001 - a source block
    """Plan and replay, as the restore flow runs them (no run needed)."""
    work.mkdir(parents=True, exist_ok=True)
    replay_plan(plan_restore(archive, block, work, **kw), block)


@pytest.fixture(scope="module")
def zk_archive(zk_a, tmp_path_factory) -> tuple[Path, str]:
    kafka_acl = [make_acl("world", "anyone", read=True), make_digest_acl(*KAFKA, all=True),
                 ACL(Permissions.READ | Permissions.ADMIN, Id("digest", make_digest_acl_credential(*OPS)))]
    root = unique_root()
    with kazoo(zk_a.url, auth=KAFKA) as c:
        c.create(root, b"cluster", acl=kafka_acl)
        for p in ("/brokers", "/brokers/ids", "/brokers/ids/0", "/brokers/ids/1", "/config"):
            c.create(root + p, p.encode(), acl=kafka_acl)
        c.create(root + "/open", b"open leaf")
    block = ZooKeeperCluster(hosts=[zk_a.url], digest_user=OPS[0], digest_password=SecretStr(OPS[1]))
    name = "pv-src-" + uuid.uuid4().hex[:8]
    block.save(name)
    made = backup(source=name, store=str(tmp_path_factory.mktemp("pv-zk")), name="pv-kafka", root=root,
                  encryption=False)
    assert made["keys"] == 7 and made["redacted_acls"] == 0
    return local(made["url"]), root


def test_postverify_reports_a_node_whose_acl_is_not_the_archived_one(zk_archive, zk_b, tmp_path):
    archive, root = zk_archive
    target = unique_root()
    ops = ZooKeeperCluster(hosts=[zk_b.url], digest_user=OPS[0], digest_password=SecretStr(OPS[1]))
    restore_into(archive, ops, tmp_path / "r", maps=[f"{root}={target}"])
    maps = [f"{root}={target}"]
    # as restored: every value and ACL is the archive's, read as the restorer (who has ADMIN) and
    # as an anonymous reader (to whom ZooKeeper shows the digest entries as "user:x")
    anonymous = ZooKeeperCluster(hosts=[zk_b.url])
    for reader in (ops, anonymous):
        v = verify_target(archive, reader, maps=maps)
        assert v.ok and v.checked == v.matching == 7 and v.metadata_differing == {}, (reader, v)
        assert v.as_summary()["postverify_acl_differing"] == 0

    with kazoo(zk_b.url, auth=KAFKA) as c:  # an administrator widens one node's ACL by hand
        c.set_acls(target + "/brokers/ids/1", [make_acl("world", "anyone", all=True)])
    for reader in (ops, anonymous):
        v = verify_target(archive, reader, maps=maps)
        assert not v.ok and v.metadata_differing == {"acl": 1} and v.matching == 6, (reader, v)
        assert v.metadata_paths == [f"{target}/brokers/ids/1 (acl)"]
        assert v.missing == v.differing == 0
        assert v.as_summary()["postverify_acl_differing"] == 1
        assert "1 hold their value with an ACL other than the archive's" in v.problem()
    # the open leaf is not "owned" by anyone: restored world:anyone, checked like the rest
    with kazoo(zk_b.url) as c:
        c.set_acls(target + "/open", [make_acl("world", "anyone", read=True)])
    assert verify_target(archive, ops, maps=maps).metadata_differing == {"acl": 2}


def test_a_failover_fails_when_a_node_holds_its_value_under_another_acl(zk_archive, zk_b):
    """The restore never changes an existing node, even one with the archived value: when its
    ACL is not the archived one, the failover's post-verify fails the run."""
    archive, root = zk_archive
    chroot = unique_root()
    with kazoo(zk_b.url) as c:
        c.create(chroot + root + "/config", b"/config", makepath=True)  # the archived value, world:anyone
    into = "pv-into-" + uuid.uuid4().hex[:8]
    ZooKeeperCluster(hosts=[zk_b.url], chroot=chroot, digest_user=OPS[0],
                     digest_password=SecretStr(OPS[1])).save(into)
    with pytest.raises(PostVerifyFailed, match="1 hold their value with an ACL other than the archive's") as err:
        failover(source="pv-kafka", store=str(archive.parent.parent), into=into, primary=DEAD,
                 archive=f"file://{archive}")
    summary = err.value.failover_summary  # type: ignore[attr-defined]
    assert summary["identical"] == 1 and summary["postverify_acl_differing"] == 1
    assert summary["postverify_missing"] == summary["postverify_differing"] == 0


def test_postverify_reports_consul_flags_that_differ(consul_a, consul_b, tmp_path):
    src, dst = unique("pv-src"), unique("pv-dst")
    a, b = consul_client(consul_a.url), consul_client(consul_b.url)
    for i in range(30):
        a.kv.put(f"{src}/k{i:02d}", f"value-{i}", flags=i % 4)
    made = backup(source=f"consul://127.0.0.1:{consul_a.port}/{src}", store=str(tmp_path),
                  encryption=False)
    target = ConsulCluster(address=f"127.0.0.1:{consul_b.port}", prefix=dst)
    restore_into(local(made["url"]), target, tmp_path / "r")
    v = verify_target(local(made["url"]), target)
    assert v.ok and v.matching == 30 and v.metadata_differing == {}
    b.kv.put(f"{dst}/k05", "value-5", flags=9)  # same value, other flags
    b.kv.put(f"{dst}/k02", "value-2", flags=0)  # archived with flags 2
    v = verify_target(local(made["url"]), target)
    assert not v.ok and v.metadata_differing == {"flags": 2}
    assert sorted(v.metadata_paths) == ["k02 (flags)", "k05 (flags)"]
    assert v.as_summary()["postverify_flags_differing"] == 2


def test_postverify_reports_a_leased_etcd_key_that_holds_no_lease(etcd_a, etcd_b, tmp_path):
    src, dst = unique("pv-src"), unique("pv-dst")
    e_a, e_b = Etcd(etcd_a.url), Etcd(etcd_b.url)
    try:
        e_a.put_many({f"/{src}/plain{i}".encode(): b"p" for i in range(10)})
        e_a.put_many({f"/{src}/svc{i}".encode(): b"10.0.0.1" for i in range(10)}, lease=e_a.grant(900))
        host_a, host_b = etcd_a.url.split("://", 1)[1], etcd_b.url.split("://", 1)[1]
        made = backup(source=f"etcd://{host_a}/{src}", store=str(tmp_path), include_leased=True,
                      encryption=False)
        target = EtcdCluster(endpoints=[host_b], prefix=f"/{dst}")
        restore_into(local(made["url"]), target, tmp_path / "r")
        v = verify_target(local(made["url"]), target)
        assert v.ok and v.matching == 20 and v.metadata_differing == {}, v
        e_b.put(f"/{dst}/svc3".encode(), b"10.0.0.1")  # the same value, no lease any more
        e_b.put(f"/{dst}/plain4".encode(), b"p", lease=e_b.grant(900))  # archived without one
        v = verify_target(local(made["url"]), target)
        assert not v.ok and v.metadata_differing == {"lease": 2}
        assert sorted(v.metadata_paths) == ["/plain4 (lease)", "/svc3 (lease)"]
    finally:
        e_a.close()
        e_b.close()
