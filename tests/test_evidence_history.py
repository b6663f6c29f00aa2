"""The auditor's end to end: a history made by real runs on a real Prefect server with two
process workers, and the evidence report (``burrow evidence``) checked number by number
against that history, counted here independently from the Prefect API, the schedules and the
store.

The history (built once by the module's ``history`` fixture, a few minutes):

* three sources backed up by deployments on interval schedules of 40 seconds (anchored at
  a fixed time, so that every slot is known here): ``zk`` (a ZooKeeper chroot) completes,
  ``dead`` (a ZooKeeper whose server is gone) fails every time, ``consul`` (a Consul prefix)
  completes its first backup and then has its deployment paused: its later slots are missed;
* two rehearsals through deployments: ``zk``'s into an empty scratch chroot passes,
  ``consul``'s into a scratch prefix that holds a key fails;
* a failover of ``zk`` into a DR chroot holding one of its keys differently: it pauses on the
  conflict and is approved through the API with a name and a comment;
* a prune (``keep_last=1``) of the store;
* the daily full verify (``verify-daily``, with the read keys) of each source's newest archive.

The period the report covers, [since, until), starts before the deployments exist (the report
counts a deployment's slots from its creation) and ends after everything above, at a moment that
is no slot. The schedules are then paused as the UI pauses them (runs not yet started are deleted:
their slots are missed, on a busy machine too) and the store is read once every started run has
ended. So each count is exact, and the counts here and the report's come from the same facts.

The HTML report and two artifacts (the failover's and a backup's) are opened in headless
Chromium over the DevTools protocol: no console error, and their pictures go to
docs/screenshots/ (README, "For auditors").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import BURROW, REPO, SESSION_DIR
from kvutil import consul_client, unique
from pydantic import SecretStr
from test_orchestrator import _client, logs_of, runs_by_id, wait_final, wait_for
from zkutil import kazoo, snapshot, unique_root

from blocks.consul import ConsulCluster
from blocks.keys import EncryptionKeys
from blocks.local import LocalStore
from blocks.zookeeper import ZooKeeperCluster
from burrow.keys import X25519Identity
from burrow.testing.fleet import stop_workers
from burrow.testing.servers import free_port

#: Seconds between two slots of every backup schedule; each source's slots are offset within it.
INTERVAL = 40
OFFSETS = {"zk": 0, "dead": 13, "consul": 26}
ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)
#: How many completed (zk) and failed (dead) scheduled backups the history holds at least.
ZK_BACKUPS, DEAD_BACKUPS = 3, 2
#: The RPO target of the report's targets (seconds).
RPO_TARGET = 60
APPROVER, COMMENT = "A. Auditor", "conflict on /app/config checked with the app team"
SCREENSHOTS = REPO / "docs" / "screenshots"


# ------------------------------------------------------------------------------------ the schedule


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def slots(source: str, since: datetime, until: datetime) -> list[datetime]:
    """The slots of ``source``'s schedule in [since, until): anchor + offset + k * INTERVAL."""
    first = ANCHOR + timedelta(seconds=OFFSETS[source])
    k = max(0, int((since - first).total_seconds() // INTERVAL))
    found = []
    t = first + timedelta(seconds=k * INTERVAL)
    while t < until:
        if t >= since:
            found.append(t)
        t += timedelta(seconds=INTERVAL)
    return found


def clear_of_slots(t: datetime, margin: float = 1.5) -> datetime:
    """``t``, or the first moment after it that is at least ``margin`` seconds from every slot
    (a period's bounds never fall on a slot: whether it counts is then never a question)."""
    t = t.replace(microsecond=0)  # (a whole second: the report's times are written to the second or finer)
    while any(abs((s - t).total_seconds()) < margin
              for src in OFFSETS for s in slots(src, t - timedelta(seconds=5), t + timedelta(seconds=5))):
        t += timedelta(seconds=1)
    return t


# ------------------------------------------------------------------------------------ helpers


def runs_of(deployment_id: Any) -> list[Any]:
    """Every flow run of the deployment (all pages)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    found, offset = [], 0
    with _client() as c:
        while True:
            page = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                    limit=200, offset=offset)
            found += page
            if len(page) < 200:
                return found
            offset += 200


def state_of(run: Any) -> str:
    return run.state.type.value if run.state else "NONE"


def archives_in(store: Path, source: str) -> set[str]:
    """The archive objects of ``source`` in the local store, by name (read from disk)."""
    d = store / source
    return {f"{source}/{p.name}" for p in d.glob("*.burrow")} if d.is_dir() else set()


def pause(deployment_id: Any) -> None:
    """Pause the deployment as the UI's toggle does (``POST /deployments/{id}/pause_deployment``):
    its runs of slots to come, and of slots past that no worker has taken yet, are deleted. (The
    client's ``pause_deployment`` PATCHes ``paused`` instead, which leaves those runs to run.)"""
    with _client() as c:
        c._client.post(f"/deployments/{deployment_id}/pause_deployment").raise_for_status()


def stay_paused(deployment_id: Any) -> bool:
    """Pause the deployment again if auto-scheduled runs are back in it; True when none are. The
    server's scheduler looks at every interval deployment on each pass (a 40 s schedule's 90 runs
    never reach its hour ahead), and a pass that read the deployment before the pause inserts its
    runs after the pause deleted them: the deleted slots would run after all."""
    back = [r for r in runs_of(deployment_id) if r.auto_scheduled and state_of(r) == "SCHEDULED"]
    if back:
        pause(deployment_id)
    return not back


def run_deployment_now(name: str, **parameters: Any) -> Any:
    from prefect.deployments import run_deployment

    return run_deployment(name, parameters=parameters or None, timeout=0)


# ------------------------------------------------------------------------------------ the history


@pytest.fixture(scope="module")
def history(zk_a, zk_b, consul_a, consul_b, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Build the history (see the module docstring) with two process workers of a pool of its own,
    over blocks and deployments of names of its own (the session's server holds other tests')."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import StateType

    from flows.common import process_pool_template

    tag = uuid.uuid4().hex[:6]
    pool = f"burrow-ev-{tag}"
    store_dir = tmp_path_factory.mktemp("ev-store")
    work = tmp_path_factory.mktemp("ev-work")
    src = {s: f"ev-{s}-{tag}" for s in OFFSETS}
    store, pub, priv = f"ev-store-{tag}", f"ev-backup-keys-{tag}", f"ev-restore-keys-{tag}"
    scratch_zk, scratch_consul, dr = f"ev-scratch-zk-{tag}", f"ev-scratch-consul-{tag}", f"ev-dr-{tag}"

    # the clusters: zk's tree, consul's key, a dead ZooKeeper, scratch targets, the DR chroot
    zk_root, scratch_root, dr_root = unique_root(), unique_root(), unique_root()
    zk_tree = {"/app/config": b"us-config", "/app/feature": b"on", "/svc/a": b"1"}
    with kazoo(zk_a.url) as c:
        for path, value in zk_tree.items():
            c.create(zk_root + path, value, makepath=True)
    with kazoo(zk_b.url) as c:
        c.create(dr_root + "/app/config", b"dr-local-edit", makepath=True)  # the failover's conflict
    consul_prefix, scratch_prefix = unique("ev"), unique("ev-scratch")
    consul_client(consul_a.url).kv.put(consul_prefix + "/k1", b"consul-value")
    consul_client(consul_b.url).kv.put(scratch_prefix + "/left-over", b"x")  # the failing rehearsal's scratch
    dead = f"127.0.0.1:{free_port()}"

    identity = X25519Identity.generate()
    ZooKeeperCluster(hosts=[zk_a.url], chroot=zk_root).save(src["zk"], overwrite=True)
    ZooKeeperCluster(hosts=[dead], connect_timeout=1.0).save(src["dead"], overwrite=True)
    ConsulCluster(address=f"127.0.0.1:{consul_a.port}", prefix=consul_prefix).save(src["consul"], overwrite=True)
    ZooKeeperCluster(hosts=[zk_b.url], chroot=scratch_root).save(scratch_zk, overwrite=True)
    ConsulCluster(address=f"127.0.0.1:{consul_b.port}", prefix=scratch_prefix).save(scratch_consul, overwrite=True)
    ZooKeeperCluster(hosts=[zk_b.url], chroot=dr_root).save(dr, overwrite=True)
    LocalStore(path=str(store_dir)).save(store, overwrite=True)
    EncryptionKeys(recipients=[identity.recipient.to_text()]).save(pub, overwrite=True)
    EncryptionKeys(identities=[SecretStr(identity.to_text())]).save(priv, overwrite=True)

    # the deployments, as prefect.yaml writes them (applied by setup.py), with schedules of INTERVAL seconds
    work_pool = {"name": pool, "work_queue_name": "default"}

    def backup(s: str) -> dict[str, Any]:
        return {"name": f"backup-{src[s]}", "entrypoint": "flows/backup.py:backup", "tags": ["burrow", "backup"],
                "enforce_parameter_schema": True, "work_pool": work_pool,
                "parameters": {"store": store, "key_block": pub, "root": "/", "source": src[s], "name": src[s]},
                "schedules": [{"interval": INTERVAL, "timezone": "UTC", "active": True,
                               "anchor_date": (ANCHOR + timedelta(seconds=OFFSETS[s])).isoformat()}]}

    def rehearse(s: str, scratch: str) -> dict[str, Any]:
        return {"name": f"rehearse-{src[s]}", "entrypoint": "flows/rehearse.py:rehearse",
                "tags": ["burrow", "rehearsal"], "enforce_parameter_schema": True, "work_pool": work_pool,
                "parameters": {"store": store, "key_block": priv, "source": src[s], "scratch": scratch}}

    spec = {
        "name": "burrow-evidence-test", "prefect-version": "3.8.8", "build": None, "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $BURROW_CHECKOUT }}"}}],
        "definitions": {"clusters": [*src.values(), scratch_zk, scratch_consul, dr]},
        "deployments": [
            *(backup(s) for s in OFFSETS),
            rehearse("zk", scratch_zk), rehearse("consul", scratch_consul),
            {"name": f"failover-{tag}", "entrypoint": "flows/failover.py:failover", "tags": ["burrow", "failover"],
             "enforce_parameter_schema": True, "work_pool": work_pool,
             "parameters": {"store": store, "key_block": priv, "max_age": "26h"}},
            {"name": f"prune-{tag}", "entrypoint": "flows/prune.py:prune", "tags": ["burrow", "prune"],
             "enforce_parameter_schema": True, "work_pool": work_pool,
             "parameters": {"store": store, "key_block": priv, "keep_last": 1}},
            {"name": f"verify-daily-{tag}", "entrypoint": "flows/verify_newest.py:verify_newest",
             "tags": ["burrow", "verify"], "enforce_parameter_schema": True, "work_pool": work_pool,
             "parameters": {"store": store, "key_block": priv}},
        ],
    }
    prefect_file = work / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))

    env = {**os.environ, "BURROW_CHECKOUT": str(REPO)}
    # the period starts before the deployments exist (the report counts slots from their creation)
    since = clear_of_slots(datetime.now(UTC) - timedelta(seconds=2))
    with _client() as c:
        c.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=process_pool_template()))
    worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    procs = []
    for n in ("a", "b"):  # two workers, as on two machines, started as the README starts them
        log = open(SESSION_DIR / f"burrow-ev-worker-{n}.log", "wb")
        procs.append(subprocess.Popen(
            [BURROW, "worker", "start", "--pool", pool, "--name", f"{pool}-{n}", "--limit", "6"],
            cwd=REPO, env=worker_env, stdout=log, stderr=subprocess.STDOUT,
        ))
    try:
        setup = subprocess.run([sys.executable, "deployments/setup.py", "--prefect-file", str(prefect_file)],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
        with _client() as c:
            deps = {s: c.read_deployment_by_name(f"backup/backup-{src[s]}") for s in OFFSETS}
        h: dict[str, Any] = {"tag": tag, "src": src, "store": store, "store_dir": store_dir, "deps": deps,
                             "dr_root": dr_root, "zk_tree": zk_tree, "work": work, "env": env, "priv": priv,
                             "dr": dr, "recipient": identity.recipient, "secret": identity.to_text()}
        seen: dict[str, dict[str, Any]] = {}  # every archive ever in the store: its manifest (pruned ones too)
        markers: dict[str, dict[str, Any]] = {}  # every rehearsal marker ever in the store

        def scheduled(s: str) -> list[Any]:
            return [r for r in runs_of(deps[s].id) if r.auto_scheduled]

        def final(s: str, state: str) -> list[Any]:
            return [r for r in scheduled(s) if state_of(r) == state]

        # consul's deployment is paused once its first scheduled backup has started (that one goes
        # on): every later slot of its schedule is a run that never happened
        wait_for("consul's first scheduled backup to start", lambda: [
            r for r in scheduled("consul") if r.start_time is not None])
        pause(deps["consul"].id)
        first = wait_for("consul's started backups to end", lambda: stay_paused(deps["consul"].id) and (
            runs := [r for r in scheduled("consul") if r.start_time is not None]) and all(
            r.state.is_final() for r in runs) and runs)
        assert [state_of(r) for r in first] == ["COMPLETED"] * len(first), [logs_of(r.id)[-5:] for r in first]

        # the rehearsals, once zk has an archive: zk's passes, consul's (its scratch holds a key) fails
        wait_for("zk's first completed backup", lambda: final("zk", "COMPLETED"))
        h["rehearsals"] = {"zk": run_deployment_now(f"rehearse/rehearse-{src['zk']}").id,
                           "consul": run_deployment_now(f"rehearse/rehearse-{src['consul']}").id}

        # the failover: pauses on the conflict, approved through the API with a name and a comment
        fo = run_deployment_now(f"failover/failover-{tag}", source=src["zk"], into=dr, primary=src["dead"])
        h["failover"] = fo.id
        wait_for("the failover to pause for approval",
                 lambda: (st := runs_by_id([fo.id])[fo.id].state) and st.type == StateType.PAUSED)
        with kazoo(zk_b.url) as c:  # nothing written while it waits
            assert snapshot(c, dr_root) == {dr_root: b"", dr_root + "/app": b"", dr_root + "/app/config": b"dr-local-edit"}
        with _client() as c:
            paused = runs_by_id([fo.id])[fo.id].state.timestamp
            c.resume_flow_run(fo.id, run_input={"approve": True, "approver": APPROVER, "comment": COMMENT})
            h["paused_s"] = (datetime.now(UTC) - paused).total_seconds()
        runs = wait_final([fo.id, *h["rehearsals"].values()])
        assert state_of(runs[fo.id]) == "COMPLETED", (runs[fo.id].state, logs_of(fo.id)[-10:])
        with kazoo(zk_b.url) as c:  # what it created: the archive's nodes the DR chroot did not hold
            h["dr_created"] = len(snapshot(c, dr_root)) - 3
        assert state_of(runs[h["rehearsals"]["zk"]]) == "COMPLETED", logs_of(h["rehearsals"]["zk"])[-10:]
        assert state_of(runs[h["rehearsals"]["consul"]]) == "FAILED", runs[h["rehearsals"]["consul"]].state

        # enough scheduled backups of zk (completed) and dead (failed), then the prune
        wait_for(f"{ZK_BACKUPS} completed zk backups and {DEAD_BACKUPS} failed dead ones", lambda: (
            len(final("zk", "COMPLETED")) >= ZK_BACKUPS and len(final("dead", "FAILED")) >= DEAD_BACKUPS))
        h["before_prune"] = {s: archives_in(store_dir, src[s]) for s in OFFSETS}
        look(store_dir, seen, markers)
        pr = run_deployment_now(f"prune/prune-{tag}")
        h["prune"] = pr.id
        assert state_of(wait_final([pr.id])[pr.id]) == "COMPLETED", logs_of(pr.id)[-10:]
        h["after_prune"] = {s: archives_in(store_dir, src[s]) for s in OFFSETS}
        # the daily full verify, where the read keys are: each source's newest archive
        vd = run_deployment_now(f"verify-newest/verify-daily-{tag}")
        h["verify_daily"] = vd.id
        assert state_of(wait_final([vd.id])[vd.id]) == "COMPLETED", logs_of(vd.id)[-10:]
        h["verify_daily_logs"] = [m for m in logs_of(vd.id) if m.startswith("verify:")]

        # the period ends now, at no slot; then the other schedules are paused too (a run of a slot
        # of the period that no worker has started yet is deleted: on a busy machine some are, and
        # those slots are missed), and the store is read once every started run has ended
        until = clear_of_slots(datetime.now(UTC))
        for s in ("zk", "dead"):
            pause(deps[s].id)
        # (every run a worker took, started or still pending, ends; pausing left no other)
        wait_for("every backup run a worker took to end", lambda: all([stay_paused(deps[s].id) for s in OFFSETS]) and all(
            r.state.is_final() or r.state.type == StateType.SCHEDULED for s in OFFSETS for r in runs_of(deps[s].id)))
        look(store_dir, seen, markers)
        h.update(since=since, until=until, runs={s: runs_of(deps[s].id) for s in OFFSETS},
                 archives={s: archives_in(store_dir, src[s]) for s in OFFSETS}, seen=seen, markers=markers)
        yield h
    finally:
        # burrow worker's clean stop: Prefect's own worker, sent SIGTERM, took 30 s each to exit
        stop_workers(procs)


def look(store_dir: Path, seen: dict[str, dict[str, Any]], markers: dict[str, dict[str, Any]]) -> None:
    """Read every archive's manifest, rehearsal marker and verification record the store holds
    now (from disk; the records are kept in ``markers`` too, by name)."""
    from burrow.archive import ArchiveReader

    for path in store_dir.glob("*/*.burrow"):
        name = f"{path.parent.name}/{path.name}"
        if name not in seen:
            with open(path, "rb") as f:
                seen[name] = ArchiveReader(f, label=name).manifest
    for pattern in ("*/*.rehearsal-*.burrow-meta", "*/*.verified-*.burrow-meta"):
        for path in store_dir.glob(pattern):
            markers.setdefault(f"{path.parent.name}/{path.name}", json.loads(path.read_bytes()))


def controls_file(work: Path) -> Path:
    """The shipped burrow/controls.toml with this history's targets: a slot is run only by a run
    of that very slot (the schedules' slots are seconds apart), an RPO of a minute."""
    import tomllib

    text = (REPO / "burrow" / "controls.toml").read_text()
    data = tomllib.loads(text)
    out = work / "controls.toml"
    text = text.replace(f"slot_tolerance_s = {data['targets']['slot_tolerance_s']}", "slot_tolerance_s = 2")
    text = text.replace(f"default = {data['targets']['rpo_s']['default']}", f"default = {RPO_TARGET}")
    out.write_text(text)
    assert tomllib.loads(text)["targets"]["slot_tolerance_s"] == 2
    assert tomllib.loads(text)["targets"]["rpo_s"]["default"] == RPO_TARGET
    return out


def evidence(h: dict[str, Any]) -> dict[str, Any]:
    """``burrow evidence`` over the period, as an auditor runs it: its JSON (stdout) and HTML page."""
    html = h["work"] / "evidence.html"
    h["controls"] = controls_file(h["work"])
    argv = [BURROW, "evidence", "-v", "--since", iso(h["since"]), "--until", iso(h["until"]),
            *(x for s in OFFSETS for x in ("--source", h["src"][s])), "--controls", str(h["controls"]),
            "--store", h["store"], "--key-block", h["priv"], "--json", "--html", str(html)]
    proc = subprocess.run(argv, cwd=REPO, env=h["env"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"burrow evidence exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {"json": json.loads(proc.stdout), "html": html, "stdout": proc.stdout}


@pytest.fixture(scope="module")
def report(history: dict[str, Any]) -> dict[str, Any]:
    """The evidence report over the history's period (run once for the module)."""
    return evidence(history)


# ------------------------------------------------------------------------------------ counted here


def period_runs(h: dict[str, Any], s: str) -> list[Any]:
    """The backup runs of source ``s`` in the period: those whose slot (expected start) is in it."""
    return sorted((r for r in h["runs"][s] if h["since"] <= r.expected_start_time < h["until"]),
                  key=lambda r: r.expected_start_time)


def counted(h: dict[str, Any], s: str) -> dict[str, Any]:
    """The backup counts of source ``s`` over the period, from the Prefect API and the schedule:
    ``scheduled`` is the schedule's slots from its creation (or the period's start)
    to the period's end, paused or not (a slot with no run is a run that never happened),
    ``missed`` those that no run of that slot started, the others the runs by final state."""
    dep = h["deps"][s]
    (schedule,) = dep.schedules
    want = slots(s, max(h["since"], dep.created, schedule.created or dep.created), h["until"])
    runs = period_runs(h, s)
    started = {r.expected_start_time for r in runs if r.auto_scheduled and r.start_time is not None}
    assert all(r.auto_scheduled for r in runs), "a backup run that no schedule made"
    states = [state_of(r) for r in runs]
    missed = [t for t in want if t not in started]
    return {
        "scheduled": len(want), "runs": len(runs),
        "started": sum(1 for r in runs if r.start_time is not None),
        "completed": states.count("COMPLETED"), "failed": states.count("FAILED"),
        "crashed": states.count("CRASHED"), "cancelled": states.count("CANCELLED"),
        "other": sum(1 for x in states if x not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")),
        "missed": len(missed), "missed_slots": [iso(t) for t in missed],
    }


def backups_made(h: dict[str, Any], s: str) -> list[datetime]:
    """When each of source ``s``'s archives was made (its manifest's ``created``), oldest first:
    every archive the store ever held during the history, pruned ones included."""
    return sorted(when(m["created"]) for n, m in h["seen"].items() if n.startswith(h["src"][s] + "/"))


def rpo(h: dict[str, Any], s: str) -> dict[str, Any]:
    """The achieved RPO of ``s`` in the period: the worst gap between consecutive successful
    backups, and from the last one to the period's end (none of these sources had a backup
    before the period, so the lead from its start to the first does not count)."""
    made = [t for t in backups_made(h, s) if h["since"] <= t < h["until"]]
    if not made:
        return {"achieved_s": None, "lead_s": None, "successful_backups": 0, "worst_gap": None}
    edges = [*made, h["until"]]
    gaps = [(b - a, a, b) for a, b in zip(edges, edges[1:], strict=False)]
    worst = max(gaps, key=lambda g: g[0])
    return {"achieved_s": worst[0].total_seconds(), "lead_s": (made[0] - h["since"]).total_seconds(),
            "successful_backups": len(made), "worst_gap": {"from": worst[1], "to": worst[2]}}


def signed_verifies(h: dict[str, Any], s: str) -> list[datetime]:
    """When the archives of ``s`` were fully verified by a holder of the read keys (the signed
    records beside them in the store: ``<archive>.verified-full-<time>.burrow-meta``)."""
    return sorted(when(m["at"]) for n, m in h["markers"].items()
                  if n.startswith(h["src"][s] + "/") and ".verified-full-" in n and m.get("mac"))


def source_of(report: dict[str, Any], h: dict[str, Any], s: str) -> dict[str, Any]:
    (row,) = [x for x in report["json"]["sources"] if x["name"] == h["src"][s]]
    return row


# ------------------------------------------------------------------------------------ tests


@pytest.mark.timeout(1500)  # includes the module fixture: the history takes minutes on a busy machine
def test_the_history_holds_what_the_auditor_asks_about(history):
    """The fixture made the history the report is checked against: completed, failed and
    missed scheduled backups, and each run of the period ended."""
    zk, dead, consul = (counted(history, s) for s in ("zk", "dead", "consul"))
    # (a slot with no started run is missed: between a deployment's creation and the scheduler's
    # first look at it, or on a busy machine a run still waiting for a worker when its schedule stopped)
    assert zk["completed"] >= ZK_BACKUPS and zk["failed"] == 0, zk
    assert dead["failed"] >= DEAD_BACKUPS and dead["completed"] == 0, dead
    assert consul["completed"] >= 1 and consul["missed"] >= 1, consul
    for s in OFFSETS:
        assert all(r.state.is_final() for r in period_runs(history, s)), s
    # the prune deleted older zk archives, and kept the newest and the rehearsed one (keep-rehearsed;
    # a backup may have completed while it ran: the newest is the newest it saw)
    deleted = history["before_prune"]["zk"] - history["after_prune"]["zk"]
    assert deleted and max(history["after_prune"]["zk"]) not in deleted
    (rehearsed,) = {m["archive"] for n, m in history["markers"].items()
                    if ".rehearsal-" in n and m["source"] == history["src"]["zk"]}
    assert rehearsed in history["after_prune"]["zk"] and rehearsed not in deleted
    # the daily verify fully verified the newest archive of each source that has one, and signed that
    for s in ("zk", "consul"):
        assert signed_verifies(history, s), (s, history["verify_daily_logs"])


@pytest.mark.timeout(1200)  # runs the report (a flow run reading the history and the store)
def test_backups_scheduled_run_and_missed_are_counted_exactly(history, report):
    rep = report["json"]
    assert rep["format"] == "burrow-evidence/1"
    assert when(rep["period"]["since"]) == history["since"] and when(rep["period"]["until"]) == history["until"]
    assert [x["name"] for x in rep["sources"]] == sorted(history["src"].values())
    for s in OFFSETS:
        got, want = source_of(report, history, s), counted(history, s)
        assert {k: got["backups"][k] for k in want} == want, s
        (dep,) = got["deployments"]
        assert dep["name"] == f"backup/backup-{history['src'][s]}" and dep["id"] == str(history["deps"][s].id)
        assert [(x["kind"], x["spec"]) for x in dep["schedules"]] == [("interval", f"{INTERVAL}s")]
        # one row per run of the period and one per missed slot, each linked to its evidence
        runs = period_runs(history, s)
        rows = got["backups"]["rows"]
        assert [r["flow_run_id"] for r in rows if r["kind"] == "run"] == [str(r.id) for r in runs], s
        assert [r["scheduled_for"] for r in rows if r["kind"] == "missed"] == want["missed_slots"], s
        for row, run in zip([r for r in rows if r["kind"] == "run"], runs, strict=True):
            assert row["state"] == state_of(run) and when(row["scheduled_for"]) == run.expected_start_time
            assert row["status"] == ("pass" if state_of(run) == "COMPLETED" else "fail")
            assert row["ui_url"].endswith(f"/runs/flow-run/{run.id}")
            assert row["trigger"] == {"kind": "schedule", "by": f"backup/backup-{history['src'][s]}",
                                      "deployment": f"backup/backup-{history['src'][s]}"}


def test_rpo_is_the_worst_gap_between_successful_backups(history, report):
    for s in OFFSETS:
        got, want = source_of(report, history, s)["rpo"], rpo(history, s)
        assert got["target_s"] == RPO_TARGET
        assert got["successful_backups"] == want["successful_backups"], s
        if want["achieved_s"] is None:
            assert got["achieved_s"] is None and got["status"] in ("fail", "n/a"), (s, got)
            continue
        assert got["achieved_s"] == pytest.approx(want["achieved_s"], abs=1e-3), (s, got, want)
        assert got["lead_s"] == pytest.approx(want["lead_s"], abs=1e-3), (s, got, want)
        assert when(got["worst_gap"]["from"]) == want["worst_gap"]["from"], s
        assert when(got["worst_gap"]["to"]) == want["worst_gap"]["to"], s
        assert got["status"] == ("pass" if want["achieved_s"] <= RPO_TARGET else "fail"), (s, got)


def test_archives_encryption_verification_and_prune_deletions(history, report):
    pruned = set().union(*(history["before_prune"][s] - history["after_prune"][s] for s in OFFSETS))
    fp = history["recipient"].fingerprint
    for s in OFFSETS:
        rows = source_of(report, history, s)["archives"]
        names = sorted((n for n in history["seen"] if n.startswith(history["src"][s] + "/")),
                       key=lambda n: (history["seen"][n]["created"], n))
        assert [r["name"] for r in rows] == names, s
        for row in rows:
            manifest = history["seen"][row["name"]]
            assert when(row["created"]) == when(manifest["created"]) and row["keys"] == manifest["keys"]
            assert row["encryption"] == {"mode": "x25519", "fingerprints": [fp]}
            # backup workers hold public keys only (structure-only); the daily verify holds the read
            # keys: its plain record says full, and only its signed one counts (full_verified_at)
            plain = {n.rpartition(".verified-")[2].removesuffix(".burrow-meta") for n in history["markers"]
                     if n.startswith(row["name"] + ".verified-")}
            assert row["verification"] == ("full" if "full" in plain else "structure-only" if plain else None), row
            signed = [m["at"] for n, m in history["markers"].items()
                      if n.startswith(row["name"] + ".verified-full-") and m.get("mac")]
            assert when(row["full_verified_at"]) == (when(max(signed)) if signed else None), row
            assert row["object_lock"] is None  # a local store has none
            if row["name"] in pruned:
                assert row["state"] == "deleted-by-prune", row
                assert row["deleted_by"]["flow_run_id"] == str(history["prune"]) and row["deleted_by"]["rule"]
            else:
                assert row["state"] == "present" and row["deleted_by"] is None, row
                assert row["name"] in history["archives"][s]
    assert pruned, "the prune deleted nothing: the history proves nothing about deletions"


def test_rehearsals_with_archive_result_and_restore_time(history, report):
    rto = report["json"]["targets"]["rto_s"]
    zk = source_of(report, history, "zk")["rehearsals"]
    (row,) = zk
    (marker,) = [m for n, m in history["markers"].items() if ".rehearsal-" in n and m["source"] == history["src"]["zk"]]
    assert row["flow_run_id"] == str(history["rehearsals"]["zk"])
    assert row["result"] == "passed" and row["status"] == "pass"
    assert row["archive"].endswith(marker["archive"]) and row["keys"] == marker["keys"]
    assert row["restore_s"] == marker["restore_s"] and row["within_rto"] is (marker["restore_s"] <= rto)
    assert row["marker_authenticated"] is True and "mac" in marker
    (row,) = source_of(report, history, "consul")["rehearsals"]
    assert row["flow_run_id"] == str(history["rehearsals"]["consul"])
    assert row["result"] == "failed" and row["status"] == "fail" and row["reason"]
    assert source_of(report, history, "dead")["rehearsals"] == []


def test_the_failover_names_its_trigger_approver_and_comment(history, report):
    (row,) = source_of(report, history, "zk")["recoveries"]
    run = runs_by_id([history["failover"]])[history["failover"]]
    assert row["kind"] == "failover" and row["outcome"] == "completed" and row["status"] == "pass"
    assert row["flow_run_id"] == str(run.id) and row["ui_url"].endswith(f"/runs/flow-run/{run.id}")
    assert row["approver"] == APPROVER and row["comment"] == COMMENT and row["approved"] is True
    name = f"failover/failover-{history['tag']}"
    assert row["trigger"] == {"kind": "manual", "by": name, "deployment": name}
    # created and conflicting counts, against what the DR chroot holds (read with kazoo)
    assert row["created"] == history["dr_created"] and row["conflicts"] == 1
    # the RTO is machine time: the approval wait is beside it, and both fit in the run's wall time
    wall = (run.end_time - run.start_time).total_seconds()
    assert row["approval_wait_s"] >= history["paused_s"] - 1 and row["rto_s"] + row["approval_wait_s"] <= wall + 1
    # the RPO is the archive's age at the failover: between its start and its end, less the archive's signed time
    (name,) = [n for n in history["seen"] if row["archive"].endswith(n)]
    made = when(history["seen"][name]["created"])
    assert (run.start_time - made).total_seconds() - 1 <= row["rpo_s"] <= (run.end_time - made).total_seconds() + 1
    assert source_of(report, history, "consul")["recoveries"] == []


def test_controls_follow_the_checks_per_source(history, report):
    """Each source's checks, and the controls they feed (burrow/controls.toml), from the
    numbers counted here."""
    import tomllib

    rep = report["json"]
    window = timedelta(days=rep["targets"]["verification_window_days"])

    def integrity(s: str) -> str:
        """Pass when one of the source's archives had a signed full verify (the daily verify's) within
        the window before the period's end (every archive here is intact: present, or deleted by the
        prune, as test_archives_encryption_verification_and_prune_deletions checks)."""
        until = history["until"]
        return "pass" if any(until - window <= t < until for t in signed_verifies(history, s)) else "fail"

    mapping = {c["id"]: c["checks"] for c in tomllib.loads(history["controls"].read_text())["controls"]}
    want_checks = {
        "zk": {"backup-schedule": "pass" if counted(history, "zk")["missed"] == 0 else "fail",
               "rpo": "pass" if rpo(history, "zk")["achieved_s"] <= RPO_TARGET else "fail",
               "archive-encrypted": "pass", "rehearsal": "pass", "recovery": "pass",
               "archive-integrity": integrity("zk")},
        "dead": {"backup-schedule": "fail", "rehearsal": "fail", "recovery": "n/a"},
        "consul": {"backup-schedule": "fail", "rpo": "pass" if rpo(history, "consul")["achieved_s"] <= RPO_TARGET
                   else "fail", "archive-encrypted": "pass", "rehearsal": "fail", "recovery": "n/a",
                   "archive-integrity": integrity("consul")},
    }
    overall: dict[str, set[str]] = {}
    for s, checks in want_checks.items():
        got = source_of(report, history, s)
        assert {k: got["checks"][k]["status"] for k in checks} == checks, (s, got["checks"])
        for control, needs in mapping.items():
            statuses = [got["checks"][c]["status"] for c in needs]
            want = "fail" if "fail" in statuses else "pass" if "pass" in statuses else "n/a"
            assert got["controls"][control] == want, (s, control)
            overall.setdefault(control, set()).add(want)
    assert [c["id"] for c in rep["controls"]] == list(mapping)
    for c in rep["controls"]:
        statuses = overall[c["id"]]
        assert c["status"] == ("fail" if "fail" in statuses else "pass" if "pass" in statuses else "n/a")
        assert c["failing_sources"] == sorted(history["src"][s] for s in OFFSETS
                                              if source_of(report, history, s)["controls"][c["id"]] == "fail")


def test_the_report_is_kept_in_the_store_and_its_chain_verifies(history, report):
    """The JSON and HTML are written to the store as the first link of its chain (create-only
    objects under _evidence/, read from disk), and ``burrow evidence verify`` finds it intact."""
    chain = report["json"]["chain"]
    assert chain["seq"] == 1 and chain["previous"] is None
    for key in ("record", "json", "html"):
        assert (history["store_dir"] / chain[key]).is_file(), chain[key]
    kept = json.loads((history["store_dir"] / chain["json"]).read_bytes())
    assert kept["sources"] == report["json"]["sources"] and kept["controls"] == report["json"]["controls"]
    proc = subprocess.run([BURROW, "evidence", "verify", history["store"], "--key-block", history["priv"]],
                          cwd=REPO, env=history["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_the_report_holds_no_value_key_or_secret(history, report):
    """Names, counts, times, fingerprints and run ids only: no stored value, no key material."""
    html = report["html"].read_text()
    for text in (report["stdout"], html):
        for value in (*(v.decode() for v in history["zk_tree"].values() if len(v) > 2), "consul-value",
                      "dr-local-edit"):
            assert value not in text, value
        assert history["secret"] not in text and "BURROW-X25519-SECRET-KEY" not in text


def artifact_of(run_id: Any, key_prefix: str) -> Any:
    """The run's markdown artifact whose key starts with ``key_prefix``."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    (art,) = [a for a in arts if a.type == "markdown" and (a.key or "").startswith(key_prefix)]
    return art


def outcome_line(markdown: str) -> str:
    """The artifact's first line of text, as the page shows it (no markdown marks)."""
    first = next(ln for ln in markdown.splitlines() if ln.strip())
    return first.lstrip("#").strip().replace("**", "").replace("`", "")


@pytest.mark.timeout(900)  # a browser on a busy machine
def test_the_report_and_two_artifacts_open_in_chromium_without_console_errors(history, report, tmp_path):
    """The HTML report (a local file: self-contained) and the failover's and a backup's artifacts
    (in the Prefect UI), each opened in headless Chromium: nothing at error level in the
    console, each page shows its outcome; their pictures go to $BURROW_SCREENSHOTS (set it to
    docs/screenshots to refresh the README's)."""
    import re

    sys.path.insert(0, str(REPO / "scripts"))
    from screenshots import Browser

    out = Path(os.environ.get("BURROW_SCREENSHOTS") or tmp_path)
    html = report["html"].read_text()
    # self-contained: no script, no external asset (stylesheets, images, fonts, frames)
    assert "<script" not in html.lower()
    # (links to the runs' pages are links, not assets: only what a browser would fetch to draw the page counts)
    assert not re.search(r"""\bsrc\s*=\s*(?!["']?data:)""", html, re.I), "an image, frame or script from elsewhere"
    assert not re.search(r"<link\b", html, re.I), "a stylesheet or icon from elsewhere"
    assert not re.search(r"<(iframe|object|embed)\b", html, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", html, re.I) and "@import" not in html
    ui = os.environ["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
    failover = artifact_of(history["failover"], f"failover-{history['src']['zk']}")
    zk_run = next(r for r in reversed(period_runs(history, "zk")) if state_of(r) == "COMPLETED")
    backup = artifact_of(zk_run.id, f"backup-{history['src']['zk']}")
    assert "approved by " + APPROVER in failover.data, failover.data[:500]

    with Browser(width=1280, height=900) as b:
        text = b.open(report["html"].as_uri(), shows=history["src"]["zk"])
        for s in OFFSETS:
            assert history["src"][s] in text
        b.screenshot(out / "evidence-report.png")  # its head: the period, the controls, the targets
        b.screenshot(out / "evidence-report-full.png", full_page=True)
        assert b.errors() == [], b.errors()
        for art, name in ((failover, "audit-failover-artifact.png"), (backup, "audit-backup-artifact.png")):
            line = outcome_line(art.data)
            b.open(f"{ui}/artifacts/artifact/{art.id}", shows=line[:40])
            b.screenshot(out / name, full_page=True)
            assert b.errors() == [], (name, b.errors())
    for name in ("evidence-report.png", "evidence-report-full.png", "audit-failover-artifact.png",
                 "audit-backup-artifact.png"):
        assert (out / name).stat().st_size > 5000, name
