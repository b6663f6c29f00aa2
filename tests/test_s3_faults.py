"""Backups leave the machine through a bad network: a fault-injecting proxy in front of the S3
server answers 500/503, resets connections (before the request, and after it succeeded), and
stalls a share of the requests, with a fixed seed. Backup, list, restore and prune still
succeed through retries with nothing corrupted; a backup whose retries run out fails cleanly,
with no archive visible and no multipart upload left open."""

from __future__ import annotations

import uuid

import pytest
from pydantic import SecretStr
from test_stores import KEY, SECRET, new_bucket, raw_client
from zkutil import kazoo, snapshot, unique_root

from blocks.resolve import store_from_ref
from burrow.errors import BurrowError
from burrow.testing.faultproxy import FaultProxy


@pytest.fixture(scope="module")
def creds_name(moto) -> str:
    from prefect_aws import MinIOCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    name = f"moto-faults-{uuid.uuid4().hex[:6]}"
    MinIOCredentials(minio_root_user=KEY, minio_root_password=SecretStr(SECRET),
                     aws_client_parameters=AwsClientParameters(endpoint_url=moto.url)).save(name)
    return name


def seeded_tree(zk_url: str, n: int = 300) -> str:
    root = unique_root()
    with kazoo(zk_url) as c:
        c.create(root, b"root")
        tx = c.transaction()
        for i in range(n):
            tx.create(f"{root}/n{i:04d}", f"value-{i}".encode() * 40)
        tx.commit()
    return root


def test_backup_list_restore_prune_through_a_faulty_network(zk_a, zk_b, moto, creds_name, tmp_path):
    from flows.backup import backup
    from flows.prune import prune
    from flows.restore import restore

    root = seeded_tree(zk_a.url)
    bucket = new_bucket(moto)
    key_file = tmp_path / "k.key"
    from burrow.keys import keygen

    keygen(key_file, x25519=False)
    with FaultProxy(moto.url, rate=0.2, seed=20261125, stall_seconds=0.5) as proxy:
        url = f"s3://{bucket}/dc-eu?endpoint={proxy.url}&addressing=path&credentials={creds_name}"
        summaries = [
            backup(source=f"zk://{zk_a.url}", store=url, root=root, name="dc-us", key_file=str(key_file))
            for _ in range(3)
        ]
        rows = store_from_ref(url).list()
        assert len(rows) == 3
        target = unique_root()
        restored = restore(archive=summaries[-1]["url"], into=f"zk://{zk_b.url}", maps=[f"{root}={target}"],
                           key_files=[str(key_file)])
        pruned = prune(store=url, keep_last=1, key_files=[str(key_file)])
        assert sum(proxy.counts[f] for f in ("error", "reset", "lost", "stall")) > 0, proxy.counts
    assert restored["status"] == "ok" and restored["conflicts"] == 0
    assert pruned["deleted"] == 2
    with kazoo(zk_a.url) as a, kazoo(zk_b.url) as b:
        src, dst = snapshot(a, root), snapshot(b, target)
    assert {k.replace(root, target, 1): v for k, v in src.items()} == dst
    left = raw_client(moto).list_objects_v2(Bucket=bucket).get("Contents", [])
    # besides sidecars (the catalog index, its verification record: never archives), one archive is left
    kept = summaries[-1]["url"].split("?")[0].split(f"{bucket}/", 1)[1]
    assert [o["Key"] for o in left if not o["Key"].endswith(".burrow-meta")] == [kept]
    assert [o["Key"] for o in left if ".verified-" in o["Key"]] == [kept + ".verified-full.burrow-meta"]
    assert raw_client(moto).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_backup_whose_retries_run_out_fails_cleanly(zk_a, moto, creds_name):
    from flows.backup import backup

    root = seeded_tree(zk_a.url, 20)
    bucket = new_bucket(moto)
    with FaultProxy(moto.url, rate=1.0, seed=3, faults=("error", "reset")) as proxy:
        url = f"s3://{bucket}/x?endpoint={proxy.url}&addressing=path&credentials={creds_name}"
        # the bucket check passes (faults off), then every upload request fails
        proxy.enabled = False
        store_from_ref(url).check(writable=True)
        proxy.enabled = True
        with pytest.raises(BurrowError):
            backup(source=f"zk://{zk_a.url}", store=url, root=root, encryption=False)
    c = raw_client(moto)
    assert c.list_objects_v2(Bucket=bucket).get("Contents", []) == []
    assert c.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
