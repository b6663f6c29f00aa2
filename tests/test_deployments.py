"""What deployments/ ships, checked without a server: the deployments' parameters name blocks
and never secrets or addresses, schemas are enforced, every deployment that reads archives
carries the key block that opens them, the schedules are what the issue asks for, and the
automations parse as Prefect automations with the triggers they promise.

Applying all of it to a real server (and re-applying it) and running it with real workers is
tests/test_orchestrator.py's job: one full setup serves both. Two parts are checked here against
the session's Prefect server: the per-cluster limit setup.py creates, whose "waiting" line only a
run that really waits logs; and (tests/test_automation_fires.py) burrow-backup-missing firing."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
BY_NAME = {d["name"]: d for d in SPEC["deployments"]}
#: Flows that read archives, so their deployments need the identities to open them.
READERS = ("flows/verify.py", "flows/restore.py", "flows/failover.py", "flows/prune.py", "flows/rehearse.py")


def test_every_deployment_names_blocks_and_enforces_its_schema():
    for name, d in BY_NAME.items():
        assert d.get("enforce_parameter_schema") is True, name
        assert d["work_pool"]["name"] == "burrow", name
        assert (REPO / d["entrypoint"].split(":")[0]).is_file(), d["entrypoint"]
        text = repr(d.get("parameters", {})).lower()
        for word in ("password", "token", "secret", "://", "identity", "passphrase"):
            assert word not in text, (name, word)
        if d["entrypoint"].split(":")[0] in READERS:
            assert d["parameters"].get("key_block") == "burrow-restore-keys", name


def test_the_schedules_and_on_demand_deployments_the_issue_asks_for():
    backups = {n: d for n, d in BY_NAME.items() if d["entrypoint"] == "flows/backup.py:backup"}
    assert len(backups) >= 4
    for name, d in backups.items():  # a scheduled backup per cluster, to the public keys only
        assert d["schedules"] and d["schedules"][0]["active"], name
        assert d["parameters"]["key_block"] == "burrow-backup-keys"
        assert d["parameters"]["name"] == d["parameters"]["source"]  # one name: manifests, events, lock
    crons = [d["schedules"][0]["cron"] for d in backups.values()]
    assert len(set(crons)) == len(crons)  # offset from each other
    daily = [n for n, d in BY_NAME.items() if d["entrypoint"].startswith(("flows/rehearse.py", "flows/prune.py"))]
    assert any(n.startswith("rehearse-") for n in daily) and "prune" in daily
    for name in daily:
        minute, hour, *rest = BY_NAME[name]["schedules"][0]["cron"].split()
        assert rest == ["*", "*", "*"] and hour.isdigit() and minute.isdigit(), name
    assert {"store", "keep_daily", "keep_weekly", "keep_monthly"} <= set(BY_NAME["prune"]["parameters"])
    fo = BY_NAME["failover"]
    assert "schedules" not in fo
    assert fo["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert "schedules" not in BY_NAME["verify"] and "schedules" not in BY_NAME["restore"]
    assert BY_NAME["restore"]["parameters"] == {"dry_run": True, "key_block": "burrow-restore-keys"}
    assert BY_NAME["backup-fleet"]["entrypoint"] == "flows/fleet.py:backup_fleet"
    # every cluster a backup names gets its per-cluster limit from setup.py
    sys.path.insert(0, str(REPO / "deployments"))
    from setup import clusters_of

    assert set(d["parameters"]["name"] for d in backups.values()) <= set(clusters_of(SPEC, []))
    assert "extra" in clusters_of(SPEC, ["extra"])


def test_every_backed_up_cluster_has_an_hourly_capture_deployment():
    """One ``capture-<cluster>`` per cluster a backup deployment backs up (restore --at needs its
    change chain), and none for anything else: the capture flow, with the backup's source and
    store, the backup's write keys (public only: a capture worker cannot read archives either),
    hourly, each run a little longer than the hour, two runs at once (ENQUEUE beyond): the next
    run starts while the last still follows, waits for the capture lock (never two captures
    writing one chain) following the source meanwhile, and goes on caught up, without a gap at
    the hand-over; and not tagged ``backup`` (the fleet would start it)."""
    import inspect

    from flows.capture import capture

    accepted = set(inspect.signature(capture.fn).parameters)
    backups = {d["parameters"]["name"]: d for d in BY_NAME.values() if d["entrypoint"] == "flows/backup.py:backup"}
    captures = {n for n, d in BY_NAME.items() if d["entrypoint"].split(":")[0] == "flows/capture.py"}
    assert len(backups) >= 4 and captures == {f"capture-{cluster}" for cluster in backups}, captures
    for cluster, backup in backups.items():
        d = BY_NAME[f"capture-{cluster}"]
        assert d["entrypoint"] == "flows/capture.py:capture", cluster
        params = d["parameters"]
        assert set(params) <= accepted, set(params) - accepted  # the enforced schema would refuse the rest
        assert params["name"] == cluster and params["source"] == backup["parameters"]["source"], params
        assert params["store"] == backup["parameters"]["store"], params  # segments beside the archives
        assert params["key_block"] == backup["parameters"]["key_block"] == "burrow-backup-keys", params
        assert 3600 < params["duration_s"] <= 3600 + 300, params  # overlaps the next hourly run
        (schedule,) = d["schedules"]
        minute, *every = schedule["cron"].split()
        assert schedule["active"] and minute.isdigit() and every == ["*"] * 4, schedule  # hourly
        assert schedule.get("timezone") == "UTC", schedule
        assert d["concurrency_limit"] == {"limit": 2, "collision_strategy": "ENQUEUE"}, cluster
        assert "capture" in d["tags"] and "backup" not in d["tags"], d["tags"]
        assert set(d["tags"]) - {"capture"} == set(backup["tags"]) - {"backup"}, d["tags"]  # the same service


def test_the_rehearsals_restore_what_a_failover_would():
    """Every rehearsal restores ``at: latest``: the newest archive and the change chain that
    continues it, as a failover does (the archive alone when there is no chain)."""
    import inspect

    from flows.rehearse import rehearse

    rehearsals = [d for d in BY_NAME.values() if d["entrypoint"] == "flows/rehearse.py:rehearse"]
    assert len(rehearsals) >= 4
    assert "at" in inspect.signature(rehearse.fn).parameters
    for d in rehearsals:
        assert d["parameters"].get("at") == "latest", d["name"]


def test_the_automations_parse_and_watch_what_they_promise():
    sys.path.insert(0, str(REPO / "deployments"))
    from setup import automations_of

    autos = {a.name: a for a in automations_of(REPO / "deployments" / "automations.yaml",
                                               "00000000-0000-0000-0000-000000000001")}
    failed = autos["burrow-run-failed"].trigger
    assert set(failed.expect) == {"burrow.failover.failed"} and failed.posture.value == "Reactive"
    # backup failures page once per outage per source (tests/test_automation_fires.py makes it fire)
    outage = autos["burrow-backup-failed"].trigger
    assert outage.posture.value == "Reactive" and set(outage.expect) == {"burrow.backup.failed"}
    assert set(outage.after) == {"burrow.backup.completed", "burrow.alerts.armed"}
    assert set(outage.for_each) == {"prefect.resource.id"} and outage.threshold == 1
    assert outage.within.days >= 3650  # an arming lasts until a failure uses it
    crashed = autos["burrow-run-crashed"].trigger
    assert set(crashed.for_each) == {"related:deployment:prefect.resource.id"} and crashed.within.total_seconds() == 3600
    # every page names the flow run and links to it
    for name in ("burrow-backup-failed", "burrow-run-failed", "burrow-rehearsal-failed", "burrow-backup-missing",
                 "burrow-run-crashed", "burrow-capture-gap-or-failed", "burrow-capture-silent"):
        (action,) = autos[name].actions
        assert "{{ flow_run|ui_url }}" in action.body and "{{ flow_run.name }}" in action.body, name
    assert set(autos["burrow-rehearsal-failed"].trigger.expect) == {"burrow.rehearsal.failed"}
    missing = autos["burrow-backup-missing"].trigger
    assert missing.posture.value == "Proactive" and set(missing.for_each) == {"prefect.resource.id"}
    assert missing.within.total_seconds() == 26 * 3600 and set(missing.expect) == {"burrow.backup.completed"}
    # each completed backup re-arms the window, so one that never comes lets it run out (issue 18);
    # setup.py's arming opens one for a source that has none
    assert set(missing.after) == {"burrow.backup.completed", "burrow.alerts.armed"}
    short = {a.name: a for a in automations_of(REPO / "deployments" / "automations.yaml",
                                               "00000000-0000-0000-0000-000000000001", backup_missing_within=20)}
    assert short["burrow-backup-missing"].trigger.within.total_seconds() == 20
    assert short["burrow-run-failed"].trigger == failed  # the others keep their own windows
    assert missing.match.get("prefect.resource.id") == ["burrow.source.*"]
    for a in autos.values():
        assert [str(x.block_document_id) for x in a.actions] == ["00000000-0000-0000-0000-000000000001"]


def test_the_capture_automations_watch_what_they_promise():
    """burrow-capture-gap-or-failed pages for every gap and every failed capture;
    burrow-capture-silent is a proactive window per source that each sealed segment re-arms,
    which a failed capture (already paged) fills so that it closes without a second page; a
    crashed capture pages through it, not through burrow-run-crashed as well
    (tests/test_automation_fires.py makes both fire)."""
    sys.path.insert(0, str(REPO / "deployments"))
    from setup import CAPTURE_GAP_OR_FAILED, CAPTURE_SILENT, automations_of

    path, block = REPO / "deployments" / "automations.yaml", "00000000-0000-0000-0000-000000000001"
    autos = {a.name: a for a in automations_of(path, block)}
    gap = autos[CAPTURE_GAP_OR_FAILED].trigger
    assert gap.posture.value == "Reactive" and set(gap.expect) == {"burrow.capture.gap", "burrow.capture.failed"}
    assert gap.threshold == 1 and gap.within.total_seconds() == 0 and not gap.after
    assert gap.match.get("prefect.resource.id") == ["burrow.source.*"]
    (action,) = autos[CAPTURE_GAP_OR_FAILED].actions
    # each event's own fields: a gap event carries no error, a failed one no gap
    assert "event.payload.gap.reason" in action.body and "event.payload.error" in action.body
    silent = autos[CAPTURE_SILENT].trigger
    assert silent.posture.value == "Proactive" and set(silent.for_each) == {"prefect.resource.id"}
    assert set(silent.after) == {"burrow.capture.sealed"}  # each sealed segment re-arms the window
    assert set(silent.expect) == {"burrow.capture.sealed", "burrow.capture.failed"}
    assert silent.threshold == 1 and silent.within.total_seconds() == 300
    assert silent.match.get("prefect.resource.id") == ["burrow.source.*"]
    short = {a.name: a for a in automations_of(path, block, capture_silent_within=20)}
    assert short[CAPTURE_SILENT].trigger.within.total_seconds() == 20
    assert short["burrow-backup-missing"].trigger == autos["burrow-backup-missing"].trigger
    crashed = autos["burrow-run-crashed"].trigger.match_related
    assert set(crashed.get("prefect.resource.name")) == {"backup", "rehearse", "failover", "backup-fleet"}


def test_setup_refuses_an_unknown_deployment_name():
    proc = subprocess.run(
        [sys.executable, "deployments/setup.py", "--only", "no-such-deployment"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "no deployment named no-such-deployment" in proc.stderr


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_per_cluster_lock_says_it_waits_only_when_it_does():
    """The limit setup.py creates for a cluster: a run that takes it uncontended logs no
    "waiting" line; one that finds it held by another run logs it once, then gets it."""
    sys.path.insert(0, str(REPO / "deployments"))
    from setup import apply

    from flows.common import source_lock

    cluster = "lock-" + uuid.uuid4().hex[:8]
    asyncio.run(apply([cluster], []))
    log, lines = logging.getLogger("burrow"), _Lines()  # outside a run, source_lock logs to "burrow"
    level = log.level
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    try:
        with source_lock(cluster):
            pass
        assert f"holding the per-cluster lock burrow-source-{cluster}" in lines.lines
        assert not [m for m in lines.lines if "waiting" in m], lines.lines

        held, release = threading.Event(), threading.Event()

        def other_run() -> None:
            with source_lock(cluster):
                held.set()
                release.wait(60)

        holder = threading.Thread(target=other_run, daemon=True)
        holder.start()
        assert held.wait(60)
        threading.Timer(2.0, release.set).start()  # the other run finishes while this one waits
        with source_lock(cluster, timeout_seconds=120):
            assert release.is_set()  # it really waited for the other run
        holder.join(30)
    finally:
        log.removeHandler(lines)
        log.setLevel(level)
    assert [m for m in lines.lines if "waiting" in m] == [
        f"waiting for the per-cluster lock burrow-source-{cluster} (another run holds it)"]


def test_a_failover_rto_is_machine_time_and_the_approval_wait_is_beside_it(monkeypatch):
    """Under a deployment a failover pauses for the on-call's approval: that wait is not part of
    the RTO. ``rto_s`` is the run's time less the approval step, reported as ``approval_wait_s``
    in the summary, the artifact and the ``burrow.failover.*`` event (a fake clock: no real pause)."""
    import types

    import prefect.events

    import burrow.report
    import flows.failover

    now = [1000.0]
    monkeypatch.setattr(flows.failover, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(burrow.report, "time", types.SimpleNamespace(monotonic=lambda: now[0]))  # the steps' clock
    published: list[dict] = []
    monkeypatch.setattr(flows.failover, "publish_summary",
                        lambda kind, summary, lists, dry_run, **shown: published.append(dict(summary)))
    emitted: list[dict] = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: emitted.append(kw))

    run = flows.failover._Run({"status": "done", "source": "dc-us"}, dry_run=False, started=now[0])
    for step, seconds in (("target", 1.5), ("plan", 2.0), ("approval", 86.6), ("replay", 4.0), ("postverify", 0.7)):
        with run.step(step):
            now[0] += seconds  # the approval step: the on-call reads the conflicts, then approves
    now[0] += 0.2  # the report itself
    run.publish()
    assert run.summary["rto_s"] == pytest.approx(8.4) and run.summary["approval_wait_s"] == pytest.approx(86.6)
    assert published[-1]["rto_s"] == pytest.approx(8.4) and published[-1]["approval_wait_s"] == pytest.approx(86.6)
    from flows.common import emit_run_event

    emit_run_event("failover", "completed", run.summary)
    (event,) = emitted
    assert event["event"] == "burrow.failover.completed"
    assert event["payload"]["rto_s"] == pytest.approx(8.4) and event["payload"]["approval_wait_s"] == pytest.approx(86.6)

    # without an approval (no conflicts, or a CLI run) the whole run is machine time
    run = flows.failover._Run({"status": "done", "source": "dc-us"}, dry_run=False, started=now[0])
    with run.step("replay"):
        now[0] += 3.0
    run.publish()
    assert run.summary["rto_s"] == pytest.approx(3.0) and run.summary["approval_wait_s"] == 0.0


def test_setup_arms_every_backup_source():
    sys.path.insert(0, str(REPO / "deployments"))
    from setup import backup_sources_of

    assert backup_sources_of(SPEC) == sorted(d["parameters"]["name"] for d in BY_NAME.values()
                                             if d["entrypoint"] == "flows/backup.py:backup")


def test_loading_a_burrow_block_adds_no_event_to_the_feed(tmp_path):
    """Prefect emits ``prefect.block.<slug>.loaded`` for every block load, and a run loads
    several: Burrow's blocks emit none (blocks/base.py). A Prefect block loaded right after
    does, so the feed is read after it has caught up with both loads."""
    from prefect.blocks.core import Block
    from prefect.blocks.system import Secret
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
    from test_orchestrator import all_events, wait_for

    from blocks.local import LocalStore
    from blocks.registry import register_twins

    register_twins()
    name = "feed-" + uuid.uuid4().hex[:8]
    since = datetime.now(UTC) - timedelta(seconds=5)
    LocalStore(path=str(tmp_path)).save(name)
    Secret(value="not-a-real-secret").save(name)
    assert LocalStore.load(name).path == str(tmp_path)
    assert Block.load(f"burrow-local-store/{name}").path == str(tmp_path)
    Secret.load(name)  # the control: a Prefect block's load is in the feed

    def loaded() -> list[str]:
        flt = EventFilter(occurred=EventOccurredFilter(since=since), event=EventNameFilter(prefix=["prefect.block."]))
        return [e.event for e in all_events(flt) if e.resource.get("prefect.resource.name") == name]

    wait_for("the control block's load event", lambda: "prefect.block.secret.loaded" in loaded(), timeout=120)
    assert loaded() == ["prefect.block.secret.loaded"]


def test_setup_makes_the_pools_runs_start_the_engine_directly(monkeypatch):
    """setup.py's work pool names the command its runs start with (flows.common.FLOW_RUN_COMMAND:
    the engine, without Prefect's per-run workspace supervisor); a pool made before that, with
    Prefect's default template, is updated; an operator's own command is left as it is. And
    ``burrow worker start`` puts its interpreter first on the worker's PATH, so that ``python`` is
    the one Burrow is installed in."""
    sys.path.insert(0, str(REPO / "deployments"))
    import setup
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.workers.process import ProcessWorker

    from flows.common import FLOW_RUN_COMMAND, pool_run_command, process_pool_template

    def command(pool: str) -> str | None:
        with get_client(sync_client=True) as c:
            return pool_run_command(c.read_work_pool(pool).base_job_template)

    pools = [f"setup-{n}-{uuid.uuid4().hex[:6]}" for n in ("new", "old", "own")]
    new, old, own = pools
    try:
        monkeypatch.setattr(setup, "POOL", new)
        asyncio.run(setup.apply([], []))
        assert command(new) == FLOW_RUN_COMMAND
        with get_client(sync_client=True) as c:  # made by an older setup: Prefect's template
            c.create_work_pool(WorkPoolCreate(name=old, type="process",
                                              base_job_template=ProcessWorker.get_default_base_job_template()))
            mine = process_pool_template()
            mine["variables"]["properties"]["command"]["default"] = "/opt/py/bin/python -m prefect.engine"
            c.create_work_pool(WorkPoolCreate(name=own, type="process", base_job_template=mine))
        assert command(old) is None
        monkeypatch.setattr(setup, "POOL", old)
        asyncio.run(setup.apply([], []))
        assert command(old) == FLOW_RUN_COMMAND
        monkeypatch.setattr(setup, "POOL", own)
        asyncio.run(setup.apply([], []))
        assert command(own) == "/opt/py/bin/python -m prefect.engine"
        with get_client(sync_client=True) as c:  # re-applied: nothing else about the pool changes
            c.update_work_pool(old, WorkPoolUpdate(concurrency_limit=7))
        monkeypatch.setattr(setup, "POOL", old)
        asyncio.run(setup.apply([], []))
        with get_client(sync_client=True) as c:
            assert c.read_work_pool(old).concurrency_limit == 7
    finally:
        with get_client(sync_client=True) as c:
            for pool in pools:
                c.delete_work_pool(pool)
    from cli.worker import worker_environment

    env = worker_environment({"PATH": "/usr/local/bin:/usr/bin:/bin", "BURROW_ORCHESTRATOR_TIMEOUT": "5"})
    found = shutil.which(FLOW_RUN_COMMAND.split()[0], path=env["PATH"])
    assert found and Path(found).parent == Path(sys.executable).parent, (found, env["PATH"])
    assert env["PATH"].endswith(os.pathsep + "/usr/local/bin:/usr/bin:/bin") and env["BURROW_ORCHESTRATOR_TIMEOUT"] == "5"
