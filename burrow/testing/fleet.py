"""A fleet of small clusters on the local test servers, set up on a Prefect server as a platform
team would (for tests/test_fleet.py and bench/bench_fleet.py).

``seed_fleet`` writes a few keys into each of N clusters, a third each on ZooKeeper (chroots),
etcd (prefixes) and Consul (key prefixes). ``deploy_fleet`` saves one source block per cluster,
a local store and a key block, creates the per-cluster global concurrency limit of each (as
deployments/setup.py does) and one backup deployment per cluster plus a ``backup-fleet``
deployment, all on a work pool of their own, through the API (hundreds of deployments through
``prefect deploy`` would take minutes). ``start_workers`` starts ``burrow worker start``
processes on that pool. Everything is named after a tag, so fleets never share anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from burrow.testing.servers import REPO_ROOT


@dataclass
class Cluster:
    name: str
    block: Any
    keys: dict[str, bytes]


@dataclass
class Fleet:
    tag: str
    pool: str
    store: Path
    identity: Any
    clusters: list[Cluster]
    deployments: dict[str, Any] = field(default_factory=dict)  # cluster name -> deployment id
    fleet_deployment: Any = None

    def names(self) -> list[str]:
        """The backup deployments, as the fleet flow takes them."""
        return [f"backup/backup-{c.name}" for c in self.clusters]


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def seed_fleet(n: int, zk: str, etcd: str, consul: str, tag: str | None = None, keys: int = 3) -> tuple[str, list[Cluster]]:
    """``n`` clusters with ``keys`` keys each, spread over ZooKeeper ``zk`` (host:port), etcd
    ``etcd`` and Consul ``consul`` (both http://host:port). Returns the tag and the clusters
    (their blocks not saved yet)."""
    import base64

    import consul as consul_lib
    import httpx
    from kazoo.client import KazooClient

    from blocks.consul import ConsulCluster
    from blocks.etcd import EtcdCluster
    from blocks.zookeeper import ZooKeeperCluster

    tag = tag or "fl" + uuid.uuid4().hex[:6]
    etcd_host, etcd_port = etcd.removeprefix("http://").split(":")
    consul_host, consul_port = consul.removeprefix("http://").split(":")
    e = httpx.Client(base_url=etcd, timeout=60, trust_env=False)  # etcd's JSON gateway

    def etcd_put(key: str, value: bytes) -> None:
        e.post("/v3/kv/put", json={"key": base64.b64encode(key.encode()).decode(),
                                   "value": base64.b64encode(value).decode()}).raise_for_status()

    kv = consul_lib.Consul(host=consul_host, port=int(consul_port)).kv
    zkc = KazooClient(hosts=zk)
    zkc.start(timeout=30)
    clusters: list[Cluster] = []
    try:
        for i in range(n):
            name = f"{tag}-{i:03d}"
            written = {f"/app/k{j}": f"{name}-v{j}".encode() for j in range(keys)}
            if i % 3 == 0:
                root = "/" + _unique("fleet")
                for path, value in written.items():
                    zkc.create(root + path, value, makepath=True)
                block: Any = ZooKeeperCluster(hosts=[zk], chroot=root)
            elif i % 3 == 1:
                prefix = "/" + _unique("fleet")
                for path, value in written.items():
                    etcd_put(prefix + path, value)
                block = EtcdCluster(endpoints=[f"{etcd_host}:{etcd_port}"], prefix=prefix)
            else:
                prefix = _unique("fleet")
                for path, value in written.items():
                    kv.put(prefix + path, value)
                block = ConsulCluster(address=f"{consul_host}:{consul_port}", prefix=prefix)
            clusters.append(Cluster(name, block, written))
    finally:
        zkc.stop()
        zkc.close()
        e.close()
    return tag, clusters


def deploy_fleet(tag: str, clusters: list[Cluster], store: Path) -> Fleet:
    """Save the blocks, limits, backup deployments and the fleet deployment (see the module)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate

    from blocks.keys import EncryptionKeys
    from blocks.local import LocalStore
    from burrow.keys import X25519Identity
    from flows.common import process_pool_template, source_limit_name

    pool = f"fleet-{tag}"
    identity = X25519Identity.generate()
    LocalStore(path=str(store)).save(f"{tag}-store", overwrite=True)
    EncryptionKeys(recipients=[identity.recipient.to_text()]).save(f"{tag}-keys", overwrite=True)
    _save_blocks([(c.name, c.block) for c in clusters])
    fleet = Fleet(tag=tag, pool=pool, store=store, identity=identity, clusters=clusters)
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}]
    with get_client(sync_client=True) as client:
        # the pool deployments/setup.py makes: its runs start the engine directly
        client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=process_pool_template()),
                                overwrite=True)
        backup_flow = client.create_flow_from_name("backup")
        fleet_flow = client.create_flow_from_name("backup-fleet")
        for c in clusters:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=source_limit_name(c.name), limit=1))
            fleet.deployments[c.name] = client.create_deployment(
                flow_id=backup_flow, name=f"backup-{c.name}", entrypoint="flows/backup.py:backup",
                work_pool_name=pool, tags=["burrow", "backup", tag], pull_steps=pull,
                parameters={"source": c.name, "name": c.name, "store": f"{tag}-store", "key_block": f"{tag}-keys"},
            )
        fleet.fleet_deployment = client.create_deployment(
            flow_id=fleet_flow, name=f"fleet-{tag}", entrypoint="flows/fleet.py:backup_fleet",
            work_pool_name=pool, tags=["burrow", tag], pull_steps=pull,
        )
    return fleet


def _save_blocks(blocks: list[tuple[str, Any]]) -> None:
    """Save many blocks at one API call each. ``Block.save`` registers the block's type and schema
    on every call (several requests: about 2 s a block on a loaded machine); that is done once
    per block class here, by saving its first block, and the rest are created as documents of
    the schema that registered."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentCreate

    registered: set[type] = set()
    with get_client(sync_client=True) as client:
        for name, block in blocks:
            twin = block.as_prefect_block()
            if type(twin) not in registered:
                twin.save(name, overwrite=True)
                registered.add(type(twin))
                continue
            doc = twin._to_block_document(name=name, include_secrets=True)
            client.create_block_document(BlockDocumentCreate(**doc.model_dump(
                include={"name", "block_schema_id", "block_type_id", "data", "is_anonymous"})))


def start_workers(fleet: Fleet, count: int, limit: int, log_dir: Path) -> list[subprocess.Popen]:
    """``count`` ``burrow worker start --limit LIMIT`` processes on the fleet's pool, logging
    into ``log_dir``."""
    burrow = str(Path(sys.executable).parent / "burrow")
    env = {**os.environ, "BURROW_CHECKOUT": str(REPO_ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    procs = []
    for w in range(count):
        log = open(log_dir / f"{fleet.pool}-w{w}.log", "wb")
        procs.append(subprocess.Popen(
            [burrow, "worker", "start", "--pool", fleet.pool, "--name", f"{fleet.pool}-w{w}", "--limit", str(limit)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        ))
        log.close()
    return procs


def stop_workers(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every worker (burrow worker ends its runs, then itself); SIGKILL what has not
    exited after 60 s."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
