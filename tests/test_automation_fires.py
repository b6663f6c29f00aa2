"""Burrow's automations made to fire against the session's real Prefect server, as
deployments/setup.py creates them (its own ``automations_of``, ``apply`` and ``arm``), each under
a name of its own (so it neither replaces nor is replaced by the one test_orchestrator applies),
wired to a notification block that posts to a local :class:`Pager`. What is asserted is what the
pager received and the server's ``prefect.automation.triggered`` events.

* ``burrow-backup-missing`` with a short window: a backup deployment on an interval schedule,
  run by a real process worker, completes backups; its schedule is paused; the page arrives, naming
  the source and the last completed backup's flow run with its UI link. And, with events as the
  backup flow emits them: a source whose backups keep arriving inside the window is not paged,
  each source that stops is paged once, and so is one that setup.py armed and never backed up.
* ``burrow-backup-failed``: real backup flow runs that fail (their store is a file) and complete.
  An outage of several failed runs of one source pages once; a completed backup, then failures
  again, page once more; another source's failure pages on its own. Every page names the
  source, the run's one-line error, the flow run and its UI link.
* ``burrow-capture-gap-or-failed``: a gap event, as the capture flow emits it inside its run, and
  real capture runs that fail (their store is a file; their source does not answer), each with a
  digest password in its source URL. Each pages, with what its own event carries (the gap's
  positions, times and reason; the run's error), never the password or the key.
* ``burrow-capture-silent`` with a short window, with sealed events as the capture emits them: a
  source that keeps sealing is not paged, one that stops is paged once; a source whose capture
  failed (a real run) is not paged again by it, until its next sealed segment re-arms it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import BURROW, REPO, SESSION_DIR
from prefect import flow
from test_orchestrator import all_events
from test_orchestrator import wait_for as wait_progress
from zkutil import kazoo, unique_root

from burrow.testing.fleet import stop_workers
from burrow.testing.servers import free_port

sys.path.insert(0, str(REPO / "deployments"))
from setup import (  # noqa: E402
    BACKUP_FAILED,
    BACKUP_MISSING,
    CAPTURE_GAP_OR_FAILED,
    CAPTURE_SILENT,
    apply,
    arm,
    automations_of,
    notify_block_id,
)

#: The test's window (Prefect's minimum for a proactive trigger is 10 s).
WINDOW = 30.0
#: Seconds between the steady source's completed backups: well inside the window.
STEADY_EVERY = 5.0
#: How many: they span more than a window, so without them the trigger would have fired.
STEADY_COUNT = 9
#: The scheduled backup deployment's interval, and the window its missing-backup automation gets.
SERVED_EVERY = 10
SERVED_WINDOW = 45.0


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``
    (for what the server does on its own clock: a proactive trigger's window running out)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


class Pager:
    """A local HTTP endpoint standing in for the on-call's pager (a CustomWebhook block posts here)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        pager = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    pager.received.append(json.loads(body))
                except ValueError:
                    pager.received.append({"raw": body.decode(errors="replace")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def pages_for(self, source: str) -> list[dict[str, Any]]:
        """The missing-backup pages of ``source``."""
        return [m for m in self.received if f"no backup of {source} " in str(m.get("subject"))]

    def failure_pages_for(self, source: str) -> list[dict[str, Any]]:
        """The backup-failure pages of ``source``."""
        return [m for m in self.received if m.get("subject") == f"Burrow: burrow.backup.failed for {source}"]

    def close(self) -> None:
        self.server.shutdown()


def shipped_automation(name: str, pager: Pager, **options: Any) -> Any:
    """The automation ``name`` of the shipped automations.yaml, as setup.py builds it (``options``
    go to ``automations_of``), under a name of its own, wired to a notification block posting to
    ``pager``, and created on the server by setup.py's ``apply``. Returns it as the server has it."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client

    block = "oncall-" + uuid.uuid4().hex[:8]
    CustomWebhookNotificationBlock(
        name="burrow-oncall", url=pager.url, json_data={"subject": "{{subject}}", "body": "{{body}}"},
    ).save(block, overwrite=True)
    shipped = automations_of(REPO / "deployments" / "automations.yaml",
                             notify_block_id(f"custom-webhook/{block}"), **options)
    (auto,) = [a for a in shipped if a.name == name]
    auto = auto.model_copy(update={"name": f"{name}-{uuid.uuid4().hex[:8]}"})
    asyncio.run(apply([], [auto]))
    with get_client(sync_client=True) as c:
        (created,) = c.read_automations_by_name(auto.name)
    return created


def delete_automation(automation: Any) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        c.delete_automation(automation.id)


@pytest.fixture
def missing_backup_automation() -> Iterator[tuple[Any, Pager]]:
    """burrow-backup-missing with a WINDOW-second window (deleted after)."""
    pager = Pager()
    created = shipped_automation(BACKUP_MISSING, pager, backup_missing_within=WINDOW)
    try:
        yield created, pager
    finally:
        delete_automation(created)
        pager.close()


def firings(automation_id: Any, since: datetime) -> dict[str, list[datetime]]:
    """When the automation fired since ``since``, per source resource id (its triggering label)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    flt = EventFilter(occurred=EventOccurredFilter(since=since),
                      event=EventNameFilter(name=["prefect.automation.triggered"]),
                      resource=EventResourceFilter(id=[f"prefect.automation.{automation_id}"]))
    found: dict[str, list[datetime]] = {}
    for ev in all_events(flt):
        label = (ev.payload.get("triggering_labels") or {}).get("prefect.resource.id")
        found.setdefault(str(label), []).append(ev.occurred)
    return found


def completed_backup(source: str) -> datetime:
    """Emit ``burrow.backup.completed`` for ``source`` as the backup flow does; when it occurred
    (at the latest: the event is stamped as it is created, just before)."""
    from flows.common import emit_run_event

    emit_run_event("backup", "completed", {"source": source, "status": "done", "keys": 3, "duration_s": 0.1})
    return datetime.now(UTC)


def test_backup_missing_fires_when_backups_stop_and_not_while_they_arrive(missing_backup_automation):
    automation, pager = missing_backup_automation
    assert automation.trigger.within == timedelta(seconds=WINDOW) and automation.trigger.after
    since = datetime.now(UTC) - timedelta(seconds=5)
    run = uuid.uuid4().hex[:8]
    quiet, steady, never = f"quiet-{run}", f"steady-{run}", f"never-{run}"
    quiet_id, steady_id = f"burrow.source.{quiet}", f"burrow.source.{steady}"
    window = timedelta(seconds=WINDOW)

    asyncio.run(arm([never]))  # as setup.py arms a backup deployment's source: it never backs up
    armed_at = datetime.now(UTC)
    quiet_last = None
    steady_last = completed_backup(steady)
    for i in range(1, STEADY_COUNT):
        time.sleep(STEADY_EVERY)
        if i == 1:
            quiet_last = completed_backup(quiet)  # its only backup
        steady_last = completed_backup(steady)
        # while the steady source's backups keep arriving inside the window, it is never paged
        fired = firings(automation.id, since)
        assert not fired.get(steady_id), f"fired for {steady} while its backups kept coming: {fired}"
        assert not pager.pages_for(steady), pager.received
    assert quiet_last is not None

    # the quiet source completed one backup, then none: its window ran out, and it was paged
    fired = wait_for(f"burrow-backup-missing to fire for {quiet}",
                     lambda: firings(automation.id, since).get(quiet_id), timeout=WINDOW + 120)
    assert len(fired) == 1 and fired[0] >= quiet_last + window - timedelta(seconds=1), (fired, quiet_last)
    (page,) = wait_for(f"the page for {quiet}", lambda: pager.pages_for(quiet), timeout=180)
    assert page["subject"].startswith(f"Burrow: no backup of {quiet} since ")
    assert quiet_id in page["body"] and "{{" not in page["body"] and "0:00:30" in page["body"], page

    # the steady source's backups stopped too: it fires once, after its last backup's window
    fired = wait_for(f"burrow-backup-missing to fire for {steady}",
                     lambda: firings(automation.id, since).get(steady_id), timeout=WINDOW + 120)
    assert len(fired) == 1 and fired[0] >= steady_last + window - timedelta(seconds=1), (fired, steady_last)
    wait_for(f"the page for {steady}", lambda: pager.pages_for(steady), timeout=180)
    # one outage, one page: by now, about a window after its firing, the quiet source has not fired again
    assert len(firings(automation.id, since)[quiet_id]) == 1
    assert len(pager.pages_for(quiet)) == 1 and len(pager.pages_for(steady)) == 1, pager.received

    # the source that was armed and never backed up was paged a window after its arming, once
    fired = wait_for(f"burrow-backup-missing to fire for {never}",
                     lambda: firings(automation.id, since).get(f"burrow.source.{never}"), timeout=WINDOW + 120)
    assert len(fired) == 1 and fired[0] >= armed_at + window - timedelta(seconds=5), (fired, armed_at)
    (page,) = wait_for(f"the page for {never}", lambda: pager.pages_for(never), timeout=180)
    assert f"burrow.source.{never}" in page["body"] and "{{" not in page["body"], page


# ------------------------------------------------------------------ a paused schedule, really


def source_events(source: str, name: str, since: datetime) -> list[Any]:
    """Every ``name`` event about ``burrow.source.<source>`` since ``since``, oldest first."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    flt = EventFilter(occurred=EventOccurredFilter(since=since), event=EventNameFilter(name=[name]),
                      resource=EventResourceFilter(id=[f"burrow.source.{source}"]))
    return sorted(all_events(flt), key=lambda e: e.occurred)


def run_of(event: Any) -> str:
    """The id of the flow run that emitted ``event`` (its related ``prefect.flow-run``)."""
    (run,) = [r.id.removeprefix("prefect.flow-run.") for r in event.related if r.id.startswith("prefect.flow-run.")]
    return run


def ui_link(run_id: str) -> str:
    """The flow run's page in the UI, as Prefect's ``ui_url`` filter writes it on this server."""
    return os.environ["PREFECT_API_URL"].removesuffix("/api") + f"/runs/flow-run/{run_id}"


@pytest.mark.timeout(900)
def test_backup_missing_pages_when_a_deployments_schedule_is_paused(zk_a, tmp_path):
    """A backup deployment on a SERVED_EVERY-second interval schedule, run by a real process
    worker on a pool of its own, backs up a ZooKeeper subtree; once two backups have completed,
    its schedule is paused through the API, and burrow-backup-missing (with a SERVED_WINDOW
    window) pages: after the window has run out since the last completed backup, naming the
    source and that backup's flow run with its UI link."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.schedules import IntervalSchedule

    from burrow.keys import keygen
    from flows.common import process_pool_template

    run = uuid.uuid4().hex[:8]
    source, deployment, pool = f"served-{run}", f"backup-served-{run}", f"burrow-missing-{run}"
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/app/config", b"v1", makepath=True)
    store = tmp_path / "store"
    store.mkdir()
    keygen(tmp_path / "k.key", x25519=False)
    asyncio.run(apply([source], []))  # the per-cluster limit a run under a deployment must hold
    pager = Pager()
    automation = shipped_automation(BACKUP_MISSING, pager, backup_missing_within=SERVED_WINDOW)
    since = datetime.now(UTC)
    params = {"source": f"zk://{zk_a.url}", "store": str(store), "name": source, "root": root,
              "key_file": str(tmp_path / "k.key")}
    with get_client(sync_client=True) as c:
        c.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=process_pool_template()))
        dep_id = c.create_deployment(
            c.create_flow_from_name("backup"), deployment, entrypoint="flows/backup.py:backup",
            work_pool_name=pool, parameters=params,
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}],
            schedules=[DeploymentScheduleCreate(schedule=IntervalSchedule(interval=timedelta(seconds=SERVED_EVERY)),
                                                active=True)],
        )
    env = {**os.environ, "BURROW_CHECKOUT": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    log = open(SESSION_DIR / f"{pool}.log", "wb")
    worker = subprocess.Popen([BURROW, "worker", "start", "--pool", pool, "--name", f"{pool}-1"],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def completed() -> list[Any]:
            assert worker.poll() is None, (SESSION_DIR / f"{pool}.log").read_text()[-3000:]
            return source_events(source, "burrow.backup.completed", since)

        wait_progress("two scheduled backups to complete", lambda: len(completed()) >= 2 and completed(), timeout=180)
        with get_client(sync_client=True) as c:
            (schedule,) = c.read_deployment_schedules(dep_id)
            c.update_deployment_schedule(dep_id, schedule.id, active=False)  # the schedule is paused
        paused_at = datetime.now(UTC)
        states: dict[str, str] = {}

        def settled() -> list[Any]:
            """Pausing deletes the runs scheduled ahead; those already due (late, on a busy
            machine) and those under way still run: the outage starts after the last of them.
            Their events are stored a little after the runs end: every completed run's event.
            A pass of Prefect's scheduler that read the schedule before the pause can insert runs
            after it: they are deleted here, as the pause deletes the ones it finds, but only those
            due well after now. The worker takes a run up to PREFETCH (2 s) before it is due, so a
            run due sooner may be under way by the time the delete lands; deleted under the
            worker, it would still back up and emit its completed event, then fail to record its
            end (ObjectNotFound), and the page's flow-run line, looked up from that event, would be
            empty (a stress run lost a page that way). Those due sooner run, and are waited for."""
            horizon = datetime.now(UTC) + timedelta(seconds=30)
            with get_client(sync_client=True) as c:
                runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))
                ahead = [r for r in runs if r.state.is_scheduled() and r.expected_start_time
                         and r.expected_start_time > max(paused_at, horizon)]
                for r in ahead:
                    c.delete_flow_run(r.id)
            runs = [r for r in runs if r not in ahead]
            states.clear()
            states.update({str(r.id): r.state.name for r in runs if not r.state.is_final()})
            if ahead or states:
                return []
            done = {str(r.id) for r in runs if r.state.is_completed()}
            events = completed()
            return events if {run_of(e) for e in events} >= done else []

        try:
            last = wait_progress("the runs under way when the schedule was paused to finish", settled, timeout=180,
                                 ceiling=600)[-1]
        except AssertionError as exc:
            raise AssertionError(f"{exc}; runs not final: {states}") from None
        last_run = run_of(last)

        def paged() -> list[dict[str, Any]]:
            return [m for m in pager.pages_for(source) if f"/runs/flow-run/{last_run}" in str(m.get("body"))]

        try:
            (page,) = wait_for(f"burrow-backup-missing to page for {source}", paged, timeout=SERVED_WINDOW + 180)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the pager got: {pager.received}") from None
        # nothing completed after that backup: it is the one the page names, the schedule stayed paused
        assert completed()[-1].id == last.id
        with get_client(sync_client=True) as c:
            assert not [s for s in c.read_deployment_schedules(dep_id) if s.active]
            run_name = c.read_flow_run(uuid.UUID(last_run)).name
        # the server's record of the firing (stored a little after it paged): once, after that backup
        after_last = wait_progress("the firing's event", lambda: [
            t for t in firings(automation.id, since).get(f"burrow.source.{source}") or [] if t > last.occurred],
            timeout=180)
        assert len(after_last) == 1, (after_last, last.occurred)
        assert after_last[0] >= last.occurred + timedelta(seconds=SERVED_WINDOW) - timedelta(seconds=1)
        assert page["subject"].startswith(f"Burrow: no backup of {source} since ")
        body = page["body"]
        assert f"source {source} (burrow.source.{source})" in body and "0:00:45" in body, body
        assert f"flow run {run_name} ({last_run}): {ui_link(last_run)}" in body, body
        assert "{{" not in body and "None" not in body, body
    finally:
        stop_workers([worker])  # burrow worker's clean stop (Prefect's own worker took 30 s on SIGTERM)
        log.close()
        with get_client(sync_client=True) as c:
            c.delete_deployment(dep_id)
            c.delete_work_pool(pool)
        delete_automation(automation)
        pager.close()


# ------------------------------------------------------------------ failure pages: one per outage


@pytest.mark.timeout(900)
def test_backup_failures_page_once_per_outage_per_source(zk_a, tmp_path):
    """burrow-backup-failed, with real backup runs: ``a`` fails three times (one page, for the
    first failed run), ``b`` fails once (its own page); ``a`` completes a backup, then fails twice
    (one more page, for the first of those); ``c`` fails once. The sources are armed as setup.py
    arms them, so a source that never completed a backup pages on its first failure.

    Each source's page, once received, shows the server has evaluated the events emitted before
    that source's failure: the counts of the others' pages are read then."""
    from burrow.keys import keygen
    from flows.backup import backup

    run = uuid.uuid4().hex[:8]
    a, b, c = (f"grp-{x}-{run}" for x in "abc")
    root = unique_root()
    with kazoo(zk_a.url) as zk:
        zk.create(root + "/app/config", b"v1", makepath=True)
    store = tmp_path / "store"
    store.mkdir()
    broken = tmp_path / "store-is-a-file"
    broken.write_text("not a directory")
    keygen(tmp_path / "k.key", x25519=False)
    since = datetime.now(UTC) - timedelta(seconds=5)
    pager = Pager()
    automation = shipped_automation(BACKUP_FAILED, pager)
    asyncio.run(arm([a, b, c]))

    def backup_of(source: str, ok: bool) -> str:
        state = backup(source=f"zk://{zk_a.url}", store=str(store if ok else broken), name=source, root=root,
                       key_file=str(tmp_path / "k.key"), return_state=True)
        assert state.is_completed() if ok else state.is_failed(), state
        return str(state.state_details.flow_run_id)

    def page_of(source: str, n: int) -> list[dict[str, Any]]:
        return wait_progress(f"page {n} for {source}", lambda: len(pager.failure_pages_for(source)) >= n
                             and pager.failure_pages_for(source), timeout=120)

    def assert_names_its_run(page: dict[str, Any], source: str, run_id: str) -> None:
        # the server stores events a little after its triggers have seen them
        (ev,) = wait_progress(f"the failed event of run {run_id}", lambda: [
            e for e in source_events(source, "burrow.backup.failed", since) if run_of(e) == run_id], timeout=180)
        error = ev.payload["error"]
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as cl:
            name = cl.read_flow_run(uuid.UUID(run_id)).name
        body = page["body"]
        assert body.startswith(f"The backups of source {source} are failing: {error}\n"), body
        assert f"Flow run {name} ({run_id}): {ui_link(run_id)}" in body, body
        assert "{{" not in body, body

    try:
        first_outage = [backup_of(a, ok=False) for _ in range(3)]
        b_run = backup_of(b, ok=False)
        (b_page,) = page_of(b, 1)
        assert_names_its_run(b_page, b, b_run)
        (a_page,) = pager.failure_pages_for(a)  # three failed runs, one page: the first run's
        assert_names_its_run(a_page, a, first_outage[0])

        backup_of(a, ok=True)  # a recovers: the outage is over
        second_outage = [backup_of(a, ok=False) for _ in range(2)]
        c_run = backup_of(c, ok=False)
        (c_page,) = page_of(c, 1)
        assert_names_its_run(c_page, c, c_run)
        pages = page_of(a, 2)
        assert len(pages) == 2, pages  # the second outage paged once, for its first failed run
        assert_names_its_run(pages[1], a, second_outage[0])
        assert len(pager.failure_pages_for(b)) == 1
        # the server's own record agrees (its events are stored a little after the pages went out):
        # the automation fired twice for a, once for b and c
        want = {f"burrow.source.{a}": 2, f"burrow.source.{b}": 1, f"burrow.source.{c}": 1}
        fired = wait_progress("the firings' events", lambda: (
            f := {k: len(v) for k, v in firings(automation.id, since).items()}) and sum(f.values()) >= 4 and f,
            timeout=180)
        assert fired == want, fired
    finally:
        delete_automation(automation)
        pager.close()


# ------------------------------------------------------------------ capture pages


@flow(name="capture", persist_result=False)
def gap_in_a_run(source: str, gap: dict[str, Any]) -> None:
    """Emit ``burrow.capture.gap`` inside a flow run, as flows/capture.py does when its capture
    meets a gap (a real gap needs a compacted etcd: tests/test_capture_engine.py makes one)."""
    from flows.common import emit_run_event

    summary = {"status": "failed", "source": source, "service": "etcd", "store": "/srv/burrow-archives",
               "last_position": gap["from_position"] - 1}  # the run's summary so far
    emit_run_event("capture", "gap", {**summary, "gap": gap})


def secret_free(password: str, key_text: str, *texts: str) -> None:
    for text in texts:
        assert password not in text and key_text not in text, text


def key_secret(path: Any) -> str:
    """The key material of a key file (its one line that is not a comment)."""
    (line,) = [x for x in path.read_text().splitlines() if x and not x.startswith("#")]
    return line


@pytest.mark.timeout(900)
def test_capture_gaps_and_failures_page_with_what_their_events_carry(zk_a, tmp_path):
    """burrow-capture-gap-or-failed: a gap event (emitted in a flow run, as the capture flow emits
    it), a capture run whose store is a file and one whose source does not answer each page once.
    The gap's page gives its first and last positions and times and why; a failure's page the
    run's one-line error, as its ``burrow.capture.failed`` event carries it. Both name the flow
    run with its UI link. The failed runs' sources are saved blocks with a digest password, as a
    deployment names them: neither it nor the key is in the events or the pages."""
    from prefect.client.orchestration import get_client
    from pydantic import SecretStr

    from blocks.zookeeper import ZooKeeperCluster
    from burrow.keys import keygen
    from flows.backup import backup
    from flows.capture import capture

    run = uuid.uuid4().hex[:8]
    gapped, no_store, no_source = (f"cap-{x}-{run}" for x in ("gap", "store", "down"))
    password = "pw-" + uuid.uuid4().hex
    keygen(tmp_path / "k.key", x25519=False)
    key_text = key_secret(tmp_path / "k.key")
    store = tmp_path / "store"
    store.mkdir()
    broken = tmp_path / "store-is-a-file"
    broken.write_text("not a directory")
    since = datetime.now(UTC) - timedelta(seconds=5)
    pager = Pager()
    automation = shipped_automation(CAPTURE_GAP_OR_FAILED, pager)

    def failed_capture(name: str, hosts: list[str], to: Any) -> str:
        ZooKeeperCluster(hosts=hosts, digest_user="burrow", digest_password=SecretStr(password), connect_timeout=2,
                         session_timeout=4).save(name, overwrite=True)
        state = capture(source=name, store=str(to), name=name, key_file=str(tmp_path / "k.key"), duration_s=30,
                        seal_every_s=1, nice=0, return_state=True)
        assert state.is_failed(), state
        return str(state.state_details.flow_run_id)

    def page_of(source: str, event: str) -> dict[str, Any]:
        (page,) = wait_progress(f"the {event} page for {source}", lambda: [
            m for m in pager.received if m.get("subject") == f"Burrow: {event} for {source}"], timeout=120)
        return page

    def run_name(run_id: str) -> str:
        with get_client(sync_client=True) as c:
            return c.read_flow_run(uuid.UUID(run_id)).name

    try:
        gap = {"from_position": 1041, "to_position": 1999, "from_time": "2026-03-01T10:00:00.250000Z",
               "to_time": "2026-03-01T10:05:00.500000Z",
               "reason": "etcd no longer holds the history from position 1041 (compacted up to 2000)"}
        gap_state = gap_in_a_run(gapped, gap, return_state=True)
        assert gap_state.is_completed(), gap_state
        gap_run = str(gap_state.state_details.flow_run_id)
        # a store that is a file: the run fails before it reads the source
        store_run = failed_capture(no_store, [zk_a.url], broken)
        # a source that does not answer (nothing listens on the port), with a full archive to
        # continue from (backed up while it answered)
        root = unique_root()
        with kazoo(zk_a.url) as zk:
            zk.create(root + "/app/config", b"v1", makepath=True)
        done = backup(source=f"zk://{zk_a.url}", store=str(store), name=no_source, root=root,
                      key_file=str(tmp_path / "k.key"), return_state=True)
        assert done.is_completed(), done
        down_run = failed_capture(no_source, [f"127.0.0.1:{free_port()}"], store)

        page = page_of(gapped, "burrow.capture.gap")
        body = page["body"]
        assert body.startswith(f"The change capture of source {gapped} found a gap in its chain: nothing is recorded "
                               f"from {gap['from_time']} (position 1041) to {gap['to_time']} (position 1999)"), body
        assert f"Why: {gap['reason']}." in body, body
        assert f"Flow run {run_name(gap_run)} ({gap_run}): {ui_link(gap_run)}" in body, body
        assert "{{" not in body and "None" not in body, body

        for source, run_id, why in ((no_store, store_run, "store directory"),
                                    (no_source, down_run, "cannot connect to ZooKeeper")):
            (ev,) = wait_progress(f"the failed event of {source}", lambda s=source: source_events(
                s, "burrow.capture.failed", since), timeout=180)
            assert run_of(ev) == run_id and ev.payload["status"] == "failed", ev
            error = ev.payload["error"]
            assert why in error and "gap" not in ev.payload, ev.payload
            body = page_of(source, "burrow.capture.failed")["body"]
            assert body.startswith(f"The change capture of source {source} failed: {error}\n"), body
            assert f"Flow run {run_name(run_id)} ({run_id}): {ui_link(run_id)}" in body, body
            assert "{{" not in body and "None" not in body, body
            secret_free(password, key_text, ev.model_dump_json(), json.dumps(pager.received))

        # the server's own record: three firings (no for_each: they carry no source label), three pages
        fired = wait_progress("the firings' events", lambda: (
            f := sum(len(v) for v in firings(automation.id, since).values())) >= 3 and f, timeout=180)
        assert fired == 3 and len(pager.received) == 3, pager.received
    finally:
        delete_automation(automation)
        pager.close()


#: burrow-capture-silent's window in the test (the shipped one is 300 s), and the steady source's
#: seconds between sealed events (well inside it) and how many (they span more than a window).
SILENT_WINDOW = 30.0
SEAL_EVERY = 5.0
SEAL_COUNT = 9


def sealed(source: str, position: int) -> tuple[datetime, str]:
    """Emit ``burrow.capture.sealed`` for ``source`` as the capture does (tasks/capture.py); when
    it occurred (at the latest) and the window's end it announces."""
    from burrow import segments
    from tasks.capture import _emit_sealed

    last_time = segments.us_to_iso(segments.now_us())
    _emit_sealed(source, {"segments_since_last": 6, "changes_since_last": 40, "segments": position // 10,
                          "changes": position, "last_position": position, "last_time": last_time, "lag_s": 0.2,
                          "catching_up": False})
    return datetime.now(UTC), last_time


@pytest.mark.timeout(900)
def test_capture_silent_pages_once_when_sealing_stops_but_not_after_a_failed_capture(tmp_path):
    from burrow.keys import keygen
    from flows.capture import capture

    pager = Pager()
    automation = shipped_automation(CAPTURE_SILENT, pager, capture_silent_within=SILENT_WINDOW)
    assert automation.trigger.within == timedelta(seconds=SILENT_WINDOW)
    run = uuid.uuid4().hex[:8]
    quiet, steady, failing = (f"seal-{x}-{run}" for x in ("quiet", "steady", "failed"))
    window = timedelta(seconds=SILENT_WINDOW)
    since = datetime.now(UTC) - timedelta(seconds=5)
    keygen(tmp_path / "k.key", x25519=False)
    broken = tmp_path / "store-is-a-file"
    broken.write_text("not a directory")

    def pages_for(source: str) -> list[dict[str, Any]]:
        return [m for m in pager.received
                if str(m.get("subject")).startswith(f"Burrow: no change segment sealed for {source} since ")]

    def fired_for(source: str) -> list[datetime]:
        return firings(automation.id, since).get(f"burrow.source.{source}") or []

    try:
        sealed(failing, 10)
        # the sealed event is in: its window is open when the capture's failure comes
        wait_progress("the failing source's sealed event", lambda: source_events(
            failing, "burrow.capture.sealed", since), timeout=120)
        state = capture(source="zk://127.0.0.1:1", store=str(broken), name=failing, key_file=str(tmp_path / "k.key"),
                        nice=0, return_state=True)
        assert state.is_failed(), state
        wait_progress("the failed capture's event", lambda: source_events(
            failing, "burrow.capture.failed", since), timeout=120)

        steady_last, _ = sealed(steady, 100)
        quiet_last = quiet_end = None
        for i in range(1, SEAL_COUNT):
            time.sleep(SEAL_EVERY)  # the steady source's cadence (not a wait for the server)
            if i == 1:
                quiet_last, quiet_end = sealed(quiet, 50)  # its last sealed segment
            steady_last, _ = sealed(steady, 100 + i)
            # while its segments keep coming inside the window, the steady source is never paged
            assert not fired_for(steady) and not pages_for(steady), (firings(automation.id, since), pager.received)
        assert quiet_last is not None

        # the quiet source stopped sealing: paged once, a window after its last sealed segment
        fired = wait_for(f"burrow-capture-silent to fire for {quiet}", lambda: fired_for(quiet),
                         timeout=SILENT_WINDOW + 120)
        assert len(fired) == 1 and fired[0] >= quiet_last + window - timedelta(seconds=1), (fired, quiet_last)
        (page,) = wait_for(f"the page for {quiet}", lambda: pages_for(quiet), timeout=180)
        body = page["body"]
        assert f"The capture of source {quiet} (burrow.source.{quiet}) sealed no change segment within 0:00:30" in body
        assert f"stopped growing at {quiet_end} (position 50)" in body and "{{" not in body, body
        # the failing source's window closed before the quiet one's: once the quiet source has
        # fired, the server has evaluated it, and the failed capture had filled it: no page
        assert not fired_for(failing) and not pages_for(failing), pager.received

        # the steady source stopped too: paged once, a window after its last sealed segment
        fired = wait_for(f"burrow-capture-silent to fire for {steady}", lambda: fired_for(steady),
                         timeout=SILENT_WINDOW + 120)
        assert len(fired) == 1 and fired[0] >= steady_last + window - timedelta(seconds=1), (fired, steady_last)
        wait_for(f"the page for {steady}", lambda: pages_for(steady), timeout=180)

        # the failing source's next sealed segment re-arms it; when sealing stops again, it pages once
        rearmed, _ = sealed(failing, 20)
        fired = wait_for(f"burrow-capture-silent to fire for {failing}", lambda: fired_for(failing),
                         timeout=SILENT_WINDOW + 120)
        assert len(fired) == 1 and fired[0] >= rearmed + window - timedelta(seconds=1), (fired, rearmed)
        wait_for(f"the page for {failing}", lambda: pages_for(failing), timeout=180)
        # one outage, one page each
        assert [len(pages_for(s)) for s in (quiet, steady, failing)] == [1, 1, 1], pager.received
        assert {k: len(v) for k, v in firings(automation.id, since).items()} == {
            f"burrow.source.{s}": 1 for s in (quiet, steady, failing)}
    finally:
        delete_automation(automation)
        pager.close()
