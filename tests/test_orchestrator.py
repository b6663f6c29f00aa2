"""Burrow through the real orchestrator: the session's Prefect server, two real process workers
on the ``burrow`` pool, the shipped deployments/prefect.yaml applied by deployments/setup.py,
runs triggered through the API, and run history, artifacts and events read back through the
Prefect client. Every cluster is a real server (ZooKeeper, etcd, Consul), checked afterwards
with an independent client.

The module's tests share one deployment and one pair of workers (starting them is what costs).
Runs that one test starts early so that they overlap another's work (the store-down backup's
retries overlap the fleet; setup.py's re-run overlaps a failover) are kept in the module's state,
``orch``; a test that reads one another test did not start (run alone, or after that test
failed) gets it started then by the state's own builder (``OrchState``), so no test depends on
another having run, and a builder that cannot build fails with its own cause.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import BURROW, REPO, SESSION_DIR
from kvutil import Etcd, consul_client, unique
from pydantic import SecretStr
from zkutil import kazoo, snapshot, unique_root

from blocks.consul import ConsulCluster
from blocks.etcd import EtcdCluster
from blocks.keys import EncryptionKeys
from blocks.local import LocalStore
from blocks.zookeeper import ZooKeeperCluster
from burrow.keys import X25519Identity
from burrow.testing.fleet import stop_workers
from burrow.testing.servers import free_port

PREFECT = str(Path(sys.executable).parent / "prefect")
WORKERS = ("burrow-orch-a", "burrow-orch-b")
#: The digest password of the dc-us block: it must never show up in history, logs or events.
ZK_PASSWORD = "orch-" + uuid.uuid4().hex
SETUP = [sys.executable, "deployments/setup.py", "--notify-block", "custom-webhook/orch-oncall",
         "--cluster", "orch-dr", "--cluster", "orch-dr-conflict", "--cluster", "orch-dead"]


# ------------------------------------------------------------------------------------ helpers


def _client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def server_progress() -> tuple:
    """What the orchestrator has done lately: every flow run's state and the newest log's time.
    Any state change of any run (a worker picking it up, the engine starting, a task finishing)
    or any new log moves it."""
    from prefect.client.schemas.sorting import LogSort

    with _client() as c:
        runs = c.read_flow_runs(limit=200)
        newest = c.read_logs(limit=1, sort=LogSort.TIMESTAMP_DESC)
    return (frozenset((r.id, r.state_type, r.state_name) for r in runs), newest[0].timestamp if newest else None)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 150, every: float = 0.5,
             progress: Callable[[], Any] | None = server_progress, ceiling: float = 1800) -> Any:
    """Poll ``check`` until it returns something truthy. Waits follow progress, not the clock: the
    ``timeout`` counts only while ``progress`` (by default the orchestrator's runs and logs) stands
    still, so a busy machine that is slow but moving never fails a test; a stuck one fails after
    ``timeout`` seconds without progress, naming ``what`` (``ceiling`` bounds the whole wait)."""
    start = time.monotonic()
    deadline = start + timeout
    seen = progress() if progress else None
    looked = start
    while True:
        got = check()
        if got:
            return got
        now = time.monotonic()
        if progress is not None and now - looked >= 5:  # look at the orchestrator every few seconds
            looked, current = now, progress()
            if current != seen:
                seen, deadline = current, now + timeout
        if now > deadline or now - start > ceiling:
            raise AssertionError(f"timed out waiting for {what} ({timeout:.0f} s without progress)")
        time.sleep(every)


def runs_by_id(ids: list[Any]) -> dict[Any, Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as c:
        return {r.id: r for r in c.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(ids))))}


def wait_final(ids: list[Any], timeout: float = 180) -> dict[Any, Any]:
    def done() -> dict[Any, Any] | None:
        runs = runs_by_id(ids)
        ok = len(runs) == len(ids) and all(r.state and r.state.is_final() for r in runs.values())
        return runs if ok else None

    return wait_for(f"runs {ids} to finish", done, timeout)


def _delete_all_deployments() -> None:
    with _client() as c:
        while deployments := c.read_deployments(limit=200):
            for d in deployments:
                c.delete_deployment(d.id)


def children_of(parent_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with _client() as c:
        return c.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )


def logs_of(run_id: Any) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with _client() as c:
        return [lg.message for lg in c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]


def task_runs_of(run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as c:
        return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


def artifacts_of(run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))


def all_events(flt: Any) -> list[Any]:
    """Every event the server holds that matches the EventFilter ``flt``: all of its pages (the
    API answers a page at a time, with a link to the next)."""
    with _client() as c:
        page = c.read_events(filter=flt, limit=50)
        found = list(page.events)
        while page.next_page:
            page = c.read_events_page(page.next_page)
            found += page.events
    return found


def events_since(since: datetime, prefixes: list[str]) -> list[Any]:
    """Every event whose name starts with one of ``prefixes``, since ``since`` (all pages)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    return all_events(EventFilter(occurred=EventOccurredFilter(since=since), event=EventNameFilter(prefix=prefixes)))


def burrow_event(since: datetime, name: str, run_id: Any) -> Any:
    """The ``name`` event (``burrow.backup.completed``...) emitted by flow run ``run_id``."""
    def find() -> Any:
        for ev in events_since(since, [name]):
            if ev.event == name and any(r.id == f"prefect.flow-run.{run_id}" for r in ev.related):
                return ev
        return None

    return wait_for(f"the {name} event of run {run_id}", find, timeout=180)


def run_deployment_now(name: str, **parameters: Any) -> Any:
    from prefect.deployments import run_deployment

    return run_deployment(name, parameters=parameters or None, timeout=0)


class Webhook:
    """A local HTTP endpoint standing in for the on-call's pager: a CustomWebhook notification
    block posts the automations' notifications here (no network needed)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    hook.received.append(json.loads(body))
                except ValueError:
                    hook.received.append({"raw": body.decode(errors="replace")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


# ------------------------------------------------------------------------------------ fixture


def newest_archive(store: Path, source: str) -> Path:
    """The newest archive of ``source`` in the module's store, backing it up first (through its
    deployment, on the workers) when there is none yet."""
    if not archives_of(store, source):
        run_id = run_deployment_now(f"backup/backup-{source}").id
        run = wait_final([run_id])[run_id]
        assert run.state.type.value == "COMPLETED", (f"the backup of {source} that this test needs ended "
                                                     f"{run.state.type.value}", logs_of(run_id)[-5:])
    found = archives_of(store, source)
    assert found, f"no archive of {source} in the store after its backup completed"
    return found[-1]


class OrchState(dict):
    """The module's shared state. A run some test starts early, for overlap, is stored under its
    name; reading one that was never started starts it here (``__missing__``), as that test
    would have, so a test never depends on another test having run."""

    def _down_run(self) -> Any:
        return run_deployment_now("backup/backup-consul-us", store="orch-store-down").id

    def _dead_target_run(self) -> Any:
        return run_deployment_now("failover/failover", source="dc-us", into="orch-dead", primary="orch-dead").id

    def _primary_up_run(self) -> Any:
        newest_archive(self["store"], "dc-eu")
        wait_final([self["dead_target_run"]])  # the failover deployment runs one at a time
        return run_deployment_now("failover/failover", source="dc-eu", into="orch-dr", primary="dc-eu").id

    def _verify_run(self) -> Any:
        return run_deployment_now("verify/verify", archive=str(newest_archive(self["store"], "etcd-us"))).id

    def _rerun(self) -> subprocess.Popen:
        return subprocess.Popen([*SETUP, "--skip-deploy"], cwd=REPO, env=self["env"], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def __missing__(self, key: str) -> Any:
        build = getattr(self, f"_{key}", None)
        if build is None:
            raise KeyError(key)
        self[key] = value = build()
        return value


@pytest.fixture(scope="module")
def orch(zk_a, zk_b, etcd_a, consul_a, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The shipped deployments, applied by setup.py, over blocks saved under the names
    prefect.yaml expects (pointing at the session's real servers), and two process workers."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect_aws import MinIOCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    from blocks.s3 import S3Store

    # The session's server may hold other modules' backup deployments (their modules are done:
    # each test process has a server of its own and runs one file at a time). backup-fleet starts
    # every backup deployment carrying its tags, so this module starts from a server holding none
    # but the ones its setup.py applies.
    _delete_all_deployments()
    store_dir = tmp_path_factory.mktemp("orch-store")
    identity = X25519Identity.generate()
    roots = {"dc-us": unique_root(), "dc-eu": unique_root(), "etcd-us": "/" + unique("orch"), "consul-us": unique("orch")}
    trees = {
        "dc-us": {"/app/config": b"us-config", "/app/feature": b"on", "/locks/leader": b"node-1"},
        "dc-eu": {"/app/config": b"eu-config", "/svc/a": b"1"},
    }
    with kazoo(zk_a.url, auth=("burrow", ZK_PASSWORD)) as c:
        for name in ("dc-us", "dc-eu"):
            for path, value in trees[name].items():
                c.create(roots[name] + path, value, makepath=True)
    e = Etcd(etcd_a.url)
    try:
        e.put(roots["etcd-us"].encode() + b"/k1", b"etcd-value")
    finally:
        e.close()
    consul_client(consul_a.url).kv.put(roots["consul-us"] + "/k1", b"consul-value")

    dr_root, conflict_root = unique_root(), unique_root()
    with kazoo(zk_b.url) as c:  # the conflict target already holds one of dc-us's keys, differently
        c.create(conflict_root + "/app/config", b"local-edit", makepath=True)
    dead = f"127.0.0.1:{free_port()}"

    ZooKeeperCluster(hosts=[zk_a.url], chroot=roots["dc-us"], digest_user="burrow",
                     digest_password=SecretStr(ZK_PASSWORD)).save("dc-us", overwrite=True)
    ZooKeeperCluster(hosts=[zk_a.url], chroot=roots["dc-eu"]).save("dc-eu", overwrite=True)
    EtcdCluster(endpoints=[f"127.0.0.1:{etcd_a.port}"], prefix=roots["etcd-us"]).save("etcd-us", overwrite=True)
    ConsulCluster(address=f"127.0.0.1:{consul_a.port}", prefix=roots["consul-us"]).save("consul-us", overwrite=True)
    ZooKeeperCluster(hosts=[zk_b.url], chroot=dr_root).save("orch-dr", overwrite=True)
    ZooKeeperCluster(hosts=[zk_b.url], chroot=conflict_root).save("orch-dr-conflict", overwrite=True)
    ZooKeeperCluster(hosts=[dead], connect_timeout=2.0).save("orch-dead", overwrite=True)
    LocalStore(path=str(store_dir)).save("burrow-archives", overwrite=True)
    creds = MinIOCredentials(minio_root_user="orch", minio_root_password=SecretStr("orch-secret"),
                             aws_client_parameters=AwsClientParameters(endpoint_url=f"http://{dead}"))
    S3Store(bucket="down", credentials=creds, addressing_style="path").save("orch-store-down", overwrite=True)
    EncryptionKeys(recipients=[identity.recipient.to_text()]).save("burrow-backup-keys", overwrite=True)
    EncryptionKeys(identities=[SecretStr(identity.to_text())]).save("burrow-restore-keys", overwrite=True)
    hook = Webhook()
    CustomWebhookNotificationBlock(
        name="burrow-oncall", url=hook.url, json_data={"subject": "{{subject}}", "body": "{{body}}"},
    ).save("orch-oncall", overwrite=True)

    # Two workers, as on two machines, started first (they create the pool if setup has not yet):
    # each takes at most 4 runs at a time, so a burst of runs cannot all land on whichever polls first.
    since = datetime.now(UTC)
    env = {**os.environ, "BURROW_CHECKOUT": str(REPO)}
    worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    procs = []
    for name in WORKERS:
        log = open(SESSION_DIR / f"{name}.log", "wb")
        procs.append(subprocess.Popen(
            [BURROW, "worker", "start", "--pool", "burrow", "--name", name, "--limit", "4"],
            cwd=REPO, env=worker_env, stdout=log, stderr=subprocess.STDOUT,
        ))
    state = OrchState({
        "store": store_dir, "roots": roots, "trees": trees, "dr_root": dr_root, "conflict_root": conflict_root,
        "hook": hook, "since": since, "env": env, "dead": dead, "zk_b": zk_b.url,
    })
    try:  # (the timeouts here are hang guards, not budgets: setup.py takes seconds)
        setup = subprocess.run(SETUP, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
        yield state
        if os.environ.get("BURROW_SCREENSHOTS"):  # refresh the README's pictures from this history
            shots = subprocess.run([sys.executable, "scripts/screenshots.py", "--out", os.environ["BURROW_SCREENSHOTS"]],
                                   cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert shots.returncode == 0, shots.stdout[-2000:] + shots.stderr[-2000:]
    finally:
        stop_workers(procs)
        rerun = state.get("rerun")
        if rerun is not None and rerun.poll() is None:
            rerun.kill()
        hook.close()


def archives_of(store: Path, source: str) -> list[Path]:
    return sorted((store / source).glob("*.burrow")) if (store / source).is_dir() else []


def no_secret_in(*texts: str) -> None:
    for text in texts:
        assert ZK_PASSWORD not in text
        assert "orch-secret" not in text
        assert "BURROW-X25519-SECRET-KEY" not in text


# ------------------------------------------------------------------------------------ tests


@pytest.mark.timeout(900)  # includes the module fixture: setup.py and the workers' start, slow on a busy machine
def test_fleet_spreads_over_both_workers_and_each_cluster_is_locked(orch):
    """The backup-fleet deployment starts a backup of each of the four clusters; one more
    backup of dc-eu is started at the same moment. Meanwhile the test itself holds dc-us's
    per-cluster slot: dc-us's backup must wait for it while everything else completes."""
    from prefect.concurrency.sync import concurrency

    store, since = orch["store"], orch["since"]
    # the store-down backup goes first: its retries overlap the fleet's work (checked in its test)
    orch["down_run"]
    # so does a failover into an unreachable target (refused before any archive is read)
    orch["dead_target_run"]

    with concurrency("burrow-source-dc-us", occupy=1, strict=True):
        fleet = run_deployment_now("backup-fleet/backup-fleet", poll_s=1.0)
        extra = [run_deployment_now("backup/backup-dc-eu").id]
        kids = wait_for("the fleet's four backups", lambda: (k := children_of(fleet.id)) and len(k) >= 4 and k)
        assert len(kids) == 4
        by_source = {k.parameters["name"]: k for k in kids}
        assert set(by_source) == {"dc-us", "dc-eu", "etcd-us", "consul-us"}
        us = by_source["dc-us"].id
        wait_for("dc-us's backup to wait for its lock",
                 lambda: any("waiting for the per-cluster lock burrow-source-dc-us" in m for m in logs_of(us)))
        others = [k.id for k in kids if k.id != us] + extra
        done = wait_final(others)
        assert {r.state.type.value for r in done.values()} == {"COMPLETED"}, [(r.name, r.state) for r in done.values()]
        # dc-eu has an archive now: a failover of it while its primary is up (checked in its test)
        orch["primary_up_run"]
        # while its slot was held, four other backups finished and dc-us's never touched its cluster
        assert runs_by_id([us])[us].state.type.value == "RUNNING"
        assert not any("holding the per-cluster lock" in m for m in logs_of(us))
        assert not [t for t in task_runs_of(us) if t.name.startswith("extract")]
        assert archives_of(store, "dc-us") == []
    runs = wait_final([fleet.id, us])
    assert runs[fleet.id].state.type.value == "COMPLETED", runs[fleet.id].state
    assert runs[us].state.type.value == "COMPLETED", runs[us].state
    # (at least: a shipped hourly schedule may come due during the test and add one)
    assert len(archives_of(store, "dc-us")) >= 1 and len(archives_of(store, "dc-eu")) >= 2
    assert len(archives_of(store, "etcd-us")) >= 1 and len(archives_of(store, "consul-us")) >= 1

    # the two dc-eu backups read their cluster one at a time
    windows = []
    for run_id in [by_source["dc-eu"].id, *extra]:
        (ex,) = [t for t in task_runs_of(run_id) if t.name.startswith("extract")]
        assert ex.state.type.value == "COMPLETED"
        windows.append((ex.start_time, ex.end_time))
    windows.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(windows, windows[1:], strict=False)), windows

    # both workers ran some of them (the worker's own submitted-flow-run events say which)
    all_ids = {str(k.id) for k in kids} | {str(i) for i in extra} | {str(fleet.id)}
    ran_by: dict[str, set[str]] = {}
    for ev in events_since(since, ["prefect.worker.submitted-flow-run"]):
        for r in ev.related:
            run_id = r.id.removeprefix("prefect.flow-run.")
            if r.role == "flow-run" and run_id in all_ids:
                ran_by.setdefault(ev.resource.name, set()).add(run_id)
    assert set(ran_by) == set(WORKERS), ran_by
    assert set().union(*ran_by.values()) == all_ids

    # run history: names, parameters (block names only), artifacts, events; no secret anywhere
    for name, kid in by_source.items():
        kid = runs_by_id([kid.id])[kid.id]
        assert kid.name.startswith("backup-block-" + name), kid.name
        assert kid.parameters["source"] == name and kid.parameters["key_block"] == "burrow-backup-keys"
        (art,) = [a for a in artifacts_of(kid.id) if a.type == "markdown"]
        assert art.key == f"backup-{name}"
        assert art.data.startswith(f"# backup of {name}: done, ") and "| encryption | x25519 |" in art.data
        ev = burrow_event(since, "burrow.backup.completed", kid.id)
        assert ev.resource.id == f"burrow.source.{name}"
        assert ev.payload["status"] == "ok" and ev.payload["keys"] >= 1
        assert {r.role for r in ev.related} >= {"store", "archive"}
        no_secret_in(art.data, json.dumps(kid.parameters), ev.model_dump_json(), "\n".join(logs_of(kid.id)))
    fleet_art = [a for a in artifacts_of(fleet.id) if a.type == "markdown"]
    assert fleet_art and re.match(r"# backup fleet: done, (\d+) of \1 backups completed\n", fleet_art[0].data)
    (runs,) = [a for a in artifacts_of(fleet.id) if a.key == "backup-fleet-runs"]  # each child run, as a table
    assert all(f"backup/backup-{n}" in str(runs.data) for n in by_source)


def test_a_backup_whose_store_is_down_fails_after_its_retries_and_pages(orch):
    run_id = orch["down_run"]
    run = wait_final([run_id], timeout=240)[run_id]
    assert run.state.type.value == "FAILED", run.state
    (check,) = [t for t in task_runs_of(run_id) if t.name.startswith("check-store")]
    assert check.state.type.value == "FAILED" and check.run_count == 3  # the first try and 2 retries
    assert not [t for t in task_runs_of(run_id) if t.name.startswith("extract")]  # the cluster was not touched
    ev = burrow_event(orch["since"], "burrow.backup.failed", run_id)
    assert ev.resource.id == "burrow.source.consul-us"
    assert "cannot reach the endpoint" in ev.payload["error"]
    # the burrow-backup-failed automation fired (setup.py armed consul-us, so its first failure
    # pages): its action ran and the pager got the notification
    page = wait_for("the on-call notification", lambda: [
        m for m in orch["hook"].received if m.get("subject") == "Burrow: burrow.backup.failed for consul-us"
    ], timeout=90)
    assert "cannot reach the endpoint" in page[0]["body"]
    executed = wait_for("the automation's action event", lambda: [
        e for e in events_since(orch["since"], ["prefect.automation.action.executed"])
        if e.resource.get("prefect.resource.name") == "burrow-backup-failed"
    ], timeout=60)
    assert executed
    no_secret_in(json.dumps(orch["hook"].received))


def test_failover_refusals_fail_the_run_and_page(orch):
    """Two failovers that must not write: into an unreachable target, and with the primary
    still up and no force. (Both were started during the fleet test, one after the other: the
    failover deployment runs one at a time and cancels a second.)"""
    from prefect.client.schemas.objects import StateType

    since, dead, up = orch["since"], orch["dead_target_run"], orch["primary_up_run"]
    runs = wait_final([dead, up])
    assert runs[dead].state.type == StateType.FAILED, runs[dead].state
    ev = burrow_event(since, "burrow.failover.failed", dead)
    assert orch["dead"] in ev.payload["error"] and "concurrency limit" not in ev.payload["error"]
    assert runs[up].state.type == StateType.FAILED, runs[up].state
    ev = burrow_event(since, "burrow.failover.failed", up)
    assert ev.resource.id == "burrow.source.dc-eu" and "split-brain guard" in ev.payload["error"]
    with kazoo(orch["zk_b"]) as c:  # the refused failover wrote nothing into its target
        assert not c.exists(orch["dr_root"])
    # both paged the on-call through the burrow-run-failed automation
    for source in ("dc-us", "dc-eu"):
        wait_for(f"the failover notification for {source}", lambda s=source: [
            m for m in orch["hook"].received if m.get("subject") == f"Burrow: burrow.failover.failed for {s}"
        ], timeout=90)


def test_failover_deployment_run_pauses_on_conflicts_and_rebuilds_once_approved(orch, zk_b):
    """A failover deployment run of dc-us (its primary is down) from the archive the fleet wrote
    (encrypted to a recipient, opened by the deployment's key block) into a DR ensemble that
    already holds one of its keys, differently: the run pauses for the on-call, writes nothing
    while paused, is approved through the API, and then creates everything but the conflict.
    Before it pauses it publishes the conflicts (path and kind, never values) as a table artifact
    linked from the pause's description; an answer without the approver's name or a comment is
    refused by the API (the run stays paused); the name and comment reach the event, the
    artifact's outcome line and the run's facts."""
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus

    from burrow.report import FACTS_DESCRIPTION, facts_from_table

    since = datetime.now(UTC)
    # setup.py's re-run and the verify deployment run alongside (checked in their own tests)
    orch["rerun"] = subprocess.Popen([*SETUP, "--skip-deploy"], cwd=REPO, env=orch["env"], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    orch["verify_run"] = run_deployment_now("verify/verify", archive=str(archives_of(orch["store"], "etcd-us")[0])).id
    wait_final([orch["dead_target_run"], orch["primary_up_run"]])  # one failover at a time
    run = run_deployment_now("failover/failover", source="dc-us", into="orch-dr-conflict", primary="orch-dead")
    wait_for("the failover to pause for approval",
             lambda: (s := runs_by_id([run.id])[run.id].state) and s.type == StateType.PAUSED)
    root = orch["conflict_root"]
    with kazoo(zk_b.url) as c:  # nothing written while it waits
        assert snapshot(c, root) == {root: b"", root + "/app": b"", root + "/app/config": b"local-edit"}
    key = "failover-dc-us-to-orch-dr-conflict"  # the source's and the target block's names
    (table,) = [a for a in artifacts_of(run.id) if a.key == f"{key}-conflicts"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and rows == [{"path": "/app/config", "kind": "exists with another value (kept)"}]
    assert "local-edit" not in str(rows) and "us-config" not in str(rows)
    with _client() as c:
        paused = c.read_flow_run(run.id).state
        description = c.read_flow_run_input(run.id, paused.state_details.run_input_keyset["description"])
        assert f"/artifacts/artifact/{table.id}" in description, description
        for answer in ({"approve": True, "comment": "no name"}, {"approve": True, "approver": "", "comment": "x"},
                       {"approve": True, "approver": "A. Tester"}):
            refused = c.resume_flow_run(run.id, run_input=answer)
            assert refused.status == SetStateStatus.REJECT, (answer, refused)
        assert c.read_flow_run(run.id).state.type == StateType.PAUSED  # still waiting for a named answer
        ok = c.resume_flow_run(run.id, run_input={"approve": True, "approver": "A. Tester",
                                                  "comment": "checked by the test"})
        assert ok.status == SetStateStatus.ACCEPT, ok
    done = wait_final([run.id])[run.id]
    assert done.state.type == StateType.COMPLETED, (done.state, logs_of(run.id)[-10:])
    with kazoo(zk_b.url) as c:
        got = snapshot(c, root)
    want = {root + p: v for p, v in orch["trees"]["dc-us"].items()}
    want[root + "/app/config"] = b"local-edit"  # the conflict is kept as it was
    assert {k: v for k, v in got.items() if k in want} == want
    ev = burrow_event(since, "burrow.failover.completed", run.id)
    assert ev.resource.id == "burrow.source.dc-us"
    assert ev.payload["conflicts"] == 1 and ev.payload["created"] >= 2
    assert {r.role for r in ev.related} >= {"target", "store", "archive"}
    assert any(r.id == "burrow.target.orch-dr-conflict" for r in ev.related), ev.related
    approval = {"approved": True, "approver": "A. Tester", "comment": "checked by the test"}
    trigger = {"kind": "manual", "by": "failover/failover", "deployment": "failover/failover"}
    assert ev.payload["approval"] == approval and ev.payload["trigger"] == trigger
    arts = artifacts_of(run.id)
    (md,) = [a for a in arts if a.type == "markdown"]
    assert md.key == key and re.match(r"# failover of dc-us into orch-dr-conflict: done, RPO .+, RTO .+, "
                                      r"1 conflict left, approved by A\. Tester$", md.data.splitlines()[0]), md.data
    (facts,) = [facts_from_table(a.data) for a in arts if a.description == FACTS_DESCRIPTION]
    assert facts["approval"] == approval and facts["trigger"] == trigger and facts["kind"] == "failover"
    assert facts["rto_s"] < facts["duration_s"] and facts["approval_wait_s"] > 0
    no_secret_in(md.data, ev.model_dump_json(), "\n".join(logs_of(run.id)), json.dumps(done.parameters))


def test_verify_deployment_opens_recipient_encrypted_archives(orch):
    """The shipped verify deployment carries the identities: it opens an archive encrypted to
    a recipient (it could not before it carried a key block)."""
    run_id = orch["verify_run"]
    done = wait_final([run_id])[run_id]
    assert done.state.type.value == "COMPLETED", (done.state, logs_of(run_id)[-5:])
    arts = [a for a in artifacts_of(run_id) if a.type == "markdown"]
    assert arts and "| verified | full |" in arts[0].data


@pytest.mark.timeout(900)  # its teardown stops the workers (and takes the screenshots when asked)
def test_setup_applied_the_shipped_configuration_and_reruns_cleanly(orch):
    """What setup.py left on the server: the pool, one limit per cluster, every deployment of
    prefect.yaml as shipped, the automations; and a second run (started earlier, so that it
    overlaps a failover run) updated them without duplicating any."""
    import yaml

    from flows.common import source_limit_name

    out, err = orch["rerun"].communicate(timeout=1200)  # started by the failover test, to overlap its run
    assert orch["rerun"].returncode == 0, out[-3000:] + err[-3000:]
    assert "updated automation burrow-backup-missing" in out and "created automation" not in out

    with _client() as client:
        pools = client.read_work_pools()
        by_name = {d.name: d for d in client.read_deployments()}
        automations = client.read_automations()
        block_types = {b.slug for b in client.read_block_types()}
        limits = {g.name: g for g in client.read_global_concurrency_limits(limit=200)}
    assert "burrow" in {p.name for p in pools}
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    for entry in spec["deployments"]:
        d = by_name[entry["name"]]
        assert d.work_pool_name == "burrow" and d.enforce_parameter_schema, d.name
        assert d.parameters == entry.get("parameters", {}), d.name
        assert [s.schedule.cron for s in d.schedules] == [s["cron"] for s in entry.get("schedules", [])], d.name
        assert d.entrypoint == entry["entrypoint"]
    fo = by_name["failover"]
    assert fo.global_concurrency_limit is not None and fo.global_concurrency_limit.limit == 1
    assert fo.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    for cluster in [*spec["definitions"]["clusters"], "orch-dr", "orch-dr-conflict", "orch-dead"]:
        lim = limits.get(source_limit_name(cluster))
        assert lim is not None and lim.limit == 1 and lim.active, cluster
    names = [a.name for a in automations]
    wanted = {"burrow-run-failed", "burrow-backup-failed", "burrow-run-crashed", "burrow-rehearsal-failed",
              "burrow-backup-missing"}
    assert all(names.count(n) == 1 for n in wanted), names
    missing = {a.name: a for a in automations}["burrow-backup-missing"].trigger
    assert missing.posture.value == "Proactive" and missing.within.total_seconds() == 26 * 3600
    assert set(missing.for_each) == {"prefect.resource.id"} and set(missing.expect) == {"burrow.backup.completed"}
    assert {
        "burrow-zookeeper-cluster", "burrow-etcd-cluster", "burrow-consul-cluster", "burrow-local-store",
        "burrow-s3-store", "burrow-encryption-keys", "burrow-retention-policy",
    } <= block_types
