"""``burrow-backup-missing`` made to fire against the session's real Prefect server.

The automation is built by deployments/setup.py's own code (``automations_of`` and ``apply``),
from the shipped automations.yaml, with a 30 s window instead of 26 hours and a name of its own
(so it neither replaces nor is replaced by the one test_orchestrator applies). Two sources,
through ``flows.common.emit_run_event`` as the backup flow emits them:

* ``quiet`` completes one backup, then none: the trigger fires for it once its window has run
  out after that backup, and pages the on-call (a local webhook) naming the source, once;
* ``steady`` completes a backup every few seconds, each inside the window, for longer than a
  window: the trigger does not fire for it while they keep coming, and fires (once) after the
  last one.

Whether the trigger fired, and when, is read from the server's ``prefect.automation.triggered``
events (``triggering_labels`` name the source) and the notifications the webhook received.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import REPO

from burrow.testing.servers import free_port

#: The test's window (Prefect's minimum for a proactive trigger is 10 s).
WINDOW = 30.0
#: Seconds between the steady source's completed backups: well inside the window.
STEADY_EVERY = 5.0
#: How many: they span more than a window, so without them the trigger would have fired.
STEADY_COUNT = 9


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
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
        return [m for m in self.received if f"no backup of {source} " in str(m.get("subject"))]

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def missing_backup_automation() -> Iterator[tuple[Any, Pager]]:
    """burrow-backup-missing as setup.py creates it, with a WINDOW-second window and a name of
    its own, wired to a notification block that posts to a local :class:`Pager`; deleted after."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client

    sys.path.insert(0, str(REPO / "deployments"))
    from setup import BACKUP_MISSING, apply, automations_of, notify_block_id

    pager = Pager()
    block = "missing-" + uuid.uuid4().hex[:8]
    CustomWebhookNotificationBlock(
        name="burrow-oncall", url=pager.url, json_data={"subject": "{{subject}}", "body": "{{body}}"},
    ).save(block, overwrite=True)
    shipped = automations_of(REPO / "deployments" / "automations.yaml",
                             notify_block_id(f"custom-webhook/{block}"), backup_missing_within=WINDOW)
    (auto,) = [a for a in shipped if a.name == BACKUP_MISSING]
    auto = auto.model_copy(update={"name": f"{BACKUP_MISSING}-{uuid.uuid4().hex[:8]}"})
    asyncio.run(apply([], [auto]))
    with get_client(sync_client=True) as c:
        (created,) = c.read_automations_by_name(auto.name)
    try:
        yield created, pager
    finally:
        with get_client(sync_client=True) as c:
            c.delete_automation(created.id)
        pager.close()


def firings(automation_id: Any, since: datetime) -> dict[str, list[datetime]]:
    """When the automation fired since ``since``, per source resource id (its triggering label)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    flt = EventFilter(occurred=EventOccurredFilter(since=since),
                      event=EventNameFilter(name=["prefect.automation.triggered"]),
                      resource=EventResourceFilter(id=[f"prefect.automation.{automation_id}"]))
    found: dict[str, list[datetime]] = {}
    with get_client(sync_client=True) as c:
        page = c.read_events(filter=flt, limit=50)
        events = list(page.events)
        while page.next_page:
            page = c.read_events_page(page.next_page)
            events += page.events
    for ev in events:
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
    quiet, steady = f"quiet-{run}", f"steady-{run}"
    quiet_id, steady_id = f"burrow.source.{quiet}", f"burrow.source.{steady}"
    window = timedelta(seconds=WINDOW)

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
    (page,) = wait_for(f"the page for {quiet}", lambda: pager.pages_for(quiet), timeout=60)
    assert page["subject"].startswith(f"Burrow: no backup of {quiet} since ")
    assert quiet_id in page["body"] and "{{" not in page["body"] and "0:00:30" in page["body"], page

    # the steady source's backups stopped too: it fires once, after its last backup's window
    fired = wait_for(f"burrow-backup-missing to fire for {steady}",
                     lambda: firings(automation.id, since).get(steady_id), timeout=WINDOW + 120)
    assert len(fired) == 1 and fired[0] >= steady_last + window - timedelta(seconds=1), (fired, steady_last)
    wait_for(f"the page for {steady}", lambda: pager.pages_for(steady), timeout=60)
    # one outage, one page: by now, about a window after its firing, the quiet source has not fired again
    assert len(firings(automation.id, since)[quiet_id]) == 1
    assert len(pager.pages_for(quiet)) == 1 and len(pager.pages_for(steady)) == 1, pager.received
