"""Screenshots of the real Prefect UI showing Burrow's runs, artifacts, events and deployments,
taken with headless Chromium, so the README's pictures can be refreshed from a live server.

    .venv/bin/python scripts/screenshots.py [--api-url URL] [--out docs/screenshots]

The server at ``--api-url`` (default: $PREFECT_API_URL) must hold some Burrow history: run
the demo, or ``BURROW_SCREENSHOTS=docs/screenshots .venv/bin/python -m pytest -q
tests/test_orchestrator.py``, which calls this script against the test's server once its
deployments, workers, fleet, failovers and automations have run.

Needs a Chromium: ``apt-get install -y chromium-headless-shell`` (or ``chromium``). Each page is
loaded with ``--virtual-time-budget`` so the single-page app has fetched and drawn its data
before the picture is taken. Nothing secret is on these pages: Burrow's parameters name blocks,
and its logs, artifacts and events carry no values or credentials.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    """The first Chromium on PATH (or $BURROW_CHROMIUM)."""
    for name in (os.environ.get("BURROW_CHROMIUM"), *BROWSERS):
        if name and (path := shutil.which(name)):
            return path
    raise SystemExit("no Chromium found: apt-get install -y chromium-headless-shell (or set BURROW_CHROMIUM)")


def shoot(chrome: str, url: str, out: Path, *, width: int = 1440, height: int = 900, budget_ms: int = 30000) -> None:
    """One screenshot of ``url`` into ``out`` (PNG)."""
    with tempfile.TemporaryDirectory(prefix="burrow-chrome-") as profile:
        cmd = [
            chrome, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--no-first-run", "--no-default-browser-check", "--force-prefers-reduced-motion",
            "--run-all-compositor-stages-before-draw", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not out.is_file() or out.stat().st_size < 5000:
        raise SystemExit(f"screenshot of {url} failed ({proc.returncode}): {proc.stderr[-800:]}")
    print(f"{out}  <-  {url}", flush=True)


def pages(api_url: str) -> list[tuple[str, str]]:
    """(file name, UI path) of the pages worth showing, picked from the server's history."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.events.filters import EventFilter, EventNameFilter

    found: list[tuple[str, str]] = [("runs.png", "/runs"), ("deployments.png", "/deployments"),
                                    ("work-pool.png", "/work-pools/work-pool/burrow"),
                                    ("automations.png", "/automations"),
                                    ("concurrency.png", "/concurrency-limits")]
    with get_client(sync_client=True) as c:
        def newest(flow: str, state: StateType | None = None) -> Any:
            runs = c.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state])))
                if state else None,
                sort=FlowRunSort.START_TIME_DESC, limit=1,
            )
            return runs[0] if runs else None

        fleet = newest("backup-fleet", StateType.COMPLETED)
        if fleet:
            found.append(("fleet-run.png", f"/runs/flow-run/{fleet.id}"))
        for flow, name in (("backup", "backup-run.png"), ("failover", "failover-run.png")):
            run = newest(flow, StateType.COMPLETED)
            if run:
                found.append((name, f"/runs/flow-run/{run.id}"))
                arts = [a for a in c.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))) if a.type == "markdown"]
                if arts:
                    found.append((name.replace("-run", "-artifact"), f"/artifacts/artifact/{arts[0].id}"))
        failed = newest("backup", StateType.FAILED)
        if failed:
            found.append(("backup-failed-run.png", f"/runs/flow-run/{failed.id}"))
        page = c.read_events(filter=EventFilter(event=EventNameFilter(prefix=["burrow."])), limit=1)
        found.append(("events.png", "/events"))
        if page.events:
            ev = page.events[0]
            # the Raw tab: the whole event, resource, related resources and payload, as JSON
            found.append(("event.png", f"/events/event/{ev.occurred.date().isoformat()}/{ev.id}?tab=Raw"))
    return found


def main(argv: list[str] | None = None) -> int:
    """Take every screenshot; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--api-url", default=os.environ.get("PREFECT_API_URL"), help="the Prefect API (…/api)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "screenshots"))
    args = p.parse_args(argv)
    if not args.api_url:
        raise SystemExit("give --api-url or set PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = args.api_url
    ui = args.api_url.rstrip("/").removesuffix("/api")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chrome = browser()
    for name, path in pages(args.api_url):
        shoot(chrome, ui + path, out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
