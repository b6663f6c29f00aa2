"""Saved blocks work by name, for every block type, wherever a URL goes: on the command line
and as a deployment parameter run by a real process worker. And a deployment's schedule gets
runs from the real server's scheduler."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import REPO, run_cli
from kvutil import Etcd, consul_client, unique
from pydantic import SecretStr
from zkutil import kazoo, snapshot, unique_root

from blocks.consul import ConsulCluster
from blocks.etcd import EtcdCluster
from blocks.keys import EncryptionKeys
from blocks.local import LocalStore
from blocks.resolve import source_from_ref, store_from_ref
from blocks.zookeeper import ZooKeeperCluster
from burrow.keys import SymmetricKey

PREFECT = str(Path(sys.executable).parent / "prefect")


@pytest.fixture(scope="module")
def named(zk_a, etcd_a, consul_a, tmp_path_factory):
    """One saved block of every type, with a small tree in each source."""
    tag = uuid.uuid4().hex[:8]
    store_dir = tmp_path_factory.mktemp("named-store")
    zk_root, etcd_root, consul_root = unique_root(), "/" + unique("named"), unique("named")
    with kazoo(zk_a.url) as c:
        c.create(zk_root + "/a/b", b"zk-value", makepath=True)
    e = Etcd(etcd_a.url)
    try:
        e.put(etcd_root.encode() + b"/k", b"etcd-value")
    finally:
        e.close()
    consul_client(consul_a.url).kv.put(consul_root + "/k", b"consul-value")
    names = {
        "zk": f"zk-{tag}", "etcd": f"etcd-{tag}", "consul": f"consul-{tag}",
        "store": f"archives-{tag}", "keys": f"keys-{tag}",
    }
    ZooKeeperCluster(hosts=[zk_a.url], chroot=zk_root).save(names["zk"])
    EtcdCluster(endpoints=[f"127.0.0.1:{etcd_a.port}"], prefix=etcd_root).save(names["etcd"])
    ConsulCluster(address=f"127.0.0.1:{consul_a.port}", prefix=consul_root).save(names["consul"])
    LocalStore(path=str(store_dir)).save(names["store"])
    EncryptionKeys(key=SecretStr(SymmetricKey.generate().to_text())).save(names["keys"])
    return names, store_dir, {"zk": zk_root, "etcd": etcd_root, "consul": consul_root}


def test_names_resolve_to_their_blocks(named):
    names, store_dir, _ = named
    store = store_from_ref(names["store"])
    assert isinstance(store, LocalStore) and store.root == store_dir.resolve()
    assert isinstance(source_from_ref(names["zk"]), ZooKeeperCluster)
    assert isinstance(source_from_ref(names["etcd"]), EtcdCluster)
    assert isinstance(source_from_ref(names["consul"]), ConsulCluster)
    # the slug/name form too
    assert isinstance(store_from_ref(f"burrow-local-store/{names['store']}"), LocalStore)


def test_every_block_type_by_name_through_the_cli(named, zk_b):
    names, store_dir, roots = named
    from concurrent.futures import ThreadPoolExecutor

    kinds = ("zk", "etcd", "consul")
    with ThreadPoolExecutor(3) as pool:  # independent commands: run side by side to keep the suite fast
        results = list(pool.map(
            lambda kind: run_cli("backup", names[kind], "--to", names["store"], "--key-block", names["keys"]), kinds
        ))
    urls = {}
    for kind, r in zip(kinds, results, strict=True):
        assert r.code == 0, r
        assert r.last_line.startswith("file://" + str(store_dir.resolve())), r
        urls[kind] = r.last_line
    listed = run_cli("list", names["store"], "--json")
    assert listed.code == 0, listed
    import json

    rows = json.loads(listed.out)
    assert {r["source"] for r in rows} >= {names["zk"], names["etcd"], names["consul"]}
    assert all(r["encrypted"] for r in rows)
    # restore an etcd archive into a ZooKeeper block saved by name; compare with kazoo
    target_root = unique_root()
    ZooKeeperCluster(hosts=[zk_b.url], chroot=target_root).save(names["zk"] + "-target")
    r = run_cli("restore", urls["etcd"], "--into", names["zk"] + "-target", "--key-block", names["keys"])
    assert r.code == 0, r
    with kazoo(zk_b.url) as c:
        assert snapshot(c, target_root) == {target_root: b"", target_root + "/k": b"etcd-value"}


async def _deploy(flow_obj, name: str, pool: str, parameters: dict, schedules: list | None = None) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except Exception:  # noqa: BLE001 - already there
            pass
        # under a deployment the per-cluster lock is strict: the limit must exist (setup.py makes them)
        if parameters.get("name"):
            from flows.common import source_limit_name

            await client.upsert_global_concurrency_limit_by_name(source_limit_name(parameters["name"]), 1)
        flow_id = await client.create_flow(flow_obj)
        dep_id = await client.create_deployment(
            flow_id=flow_id, name=name, work_pool_name=pool, entrypoint="flows/backup.py:backup",
            path=str(REPO), parameters=parameters, enforce_parameter_schema=True,
            parameter_openapi_schema=flow_obj.parameters.model_dump(),
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}],
            schedules=schedules or [],
        )
        return str(dep_id)


def test_block_names_as_deployment_parameters_run_by_a_worker(named):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.backup import backup

    names, store_dir, _ = named
    pool = f"named-{uuid.uuid4().hex[:6]}"
    before = {p.name for p in store_dir.rglob("*.burrow")}
    run_ids = []
    for kind in ("zk", "etcd", "consul"):
        dep_name = f"backup-{names[kind]}"
        asyncio.run(_deploy(backup, dep_name, pool, {
            "source": names[kind], "store": names["store"], "key_block": names["keys"], "name": f"dep-{kind}",
        }))
        run = run_deployment(f"backup/{dep_name}", timeout=0)
        run_ids.append(run.id)
    worker = subprocess.run(
        [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--run-once", "--limit", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=240, env=os.environ.copy(),
    )
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]

    async def states():
        async with get_client() as client:
            return [await client.read_flow_run(i) for i in run_ids]

    deadline = time.monotonic() + 120
    while True:
        runs = asyncio.run(states())
        if all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert [r.state.type.value for r in runs] == ["COMPLETED"] * 3, [(r.name, r.state) for r in runs]
    new = {p for p in store_dir.rglob("*.burrow") if p.name not in before}
    assert {p.parent.name for p in new} == {"dep-zk", "dep-etcd", "dep-consul"}


def test_a_deployment_schedule_gets_runs_from_the_server_scheduler(named):
    """Prefect 3.8's scheduler fails on every pass with SQLAlchemy 2.1 (``Can't evaluate bulk
    DML statement``), so scheduled deployments never got runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.schedules import IntervalSchedule

    from flows.backup import backup

    names, _, _ = named
    dep_id = asyncio.run(_deploy(
        backup, f"scheduled-{uuid.uuid4().hex[:6]}", f"sched-{uuid.uuid4().hex[:6]}",
        {"source": names["zk"], "store": names["store"], "key_block": names["keys"]},
        schedules=[DeploymentScheduleCreate(schedule=IntervalSchedule(interval=timedelta(hours=1)), active=True)],
    ))

    async def scheduled() -> list:
        async with get_client() as client:
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[uuid.UUID(dep_id)]))
            )

    deadline = time.monotonic() + 90
    runs = []
    while time.monotonic() < deadline:
        runs = asyncio.run(scheduled())
        if runs:
            break
        time.sleep(1)
    assert runs, "the server's scheduler created no run for a deployment with an active schedule"
    assert all(r.state.type.value == "SCHEDULED" for r in runs)
    assert all(r.parameters["store"] == names["store"] for r in runs)


def test_the_shipped_deployment_parameters_resolve_as_blocks(named, tmp_path):
    """deployments/prefect.yaml names a LocalStore block `burrow-archives`: it must resolve to
    that block, not to a relative directory of that name."""
    import yaml

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    store_name = spec["definitions"]["backup_params"]["store"]
    LocalStore(path=str(tmp_path)).save(store_name, overwrite=True)
    resolved = store_from_ref(store_name)
    assert isinstance(resolved, LocalStore) and resolved.root == tmp_path.resolve()
    assert unquote(resolved.describe()) == "file://" + str(tmp_path.resolve())
