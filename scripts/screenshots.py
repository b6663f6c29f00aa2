"""Screenshots of the real Prefect UI showing Burrow's runs, artifacts, events and deployments,
taken with headless Chromium, so the README's pictures can be refreshed from a live server.

    .venv/bin/python scripts/screenshots.py [--api-url URL] [--out docs/screenshots]

The server at ``--api-url`` (default: $PREFECT_API_URL) must hold some Burrow history: run
the demo, or ``BURROW_SCREENSHOTS=docs/screenshots .venv/bin/python -m pytest -q
tests/test_orchestrator.py``, which calls this script against the test's server once its
deployments, workers, fleet, failovers and automations have run.

:class:`Browser` drives Chromium over the DevTools protocol and reports what a page said at
error level: tests/test_evidence_history.py opens the evidence report and two artifacts with it
(no console error allowed) and saves the README's "For auditors" pictures.

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


def _console_arg(arg: dict[str, Any]) -> str:
    """One argument of a console call as text: its value, else how the console describes it
    (an Error's message and stack, an object's class), with a short preview of its properties."""
    if "value" in arg:
        return str(arg["value"])
    text = str(arg.get("description") or arg.get("className") or arg.get("type", "?"))
    props = (arg.get("preview") or {}).get("properties") or []
    if props:
        text += " {" + ", ".join(f"{p.get('name')}: {p.get('value')}" for p in props[:8]) + "}"
    return text


def _as_fds_3_and_4(read_end: int, write_end: int) -> None:
    """In the browser's process, before it starts: its ends of the pipes as fds 3 and 4 (copied
    out of the way first, so that neither overwrites the other)."""
    r, w = os.dup(read_end), os.dup(write_end)
    os.dup2(r, 3)
    os.dup2(w, 4)


class Browser:
    """A headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    no port to find, nothing listening): open a page, wait until it has drawn what it should,
    take its picture, and report what its console said at error level. ``--screenshot`` alone
    cannot say whether the page logged an error, and Chromium's own log (``--enable-logging``)
    prints every console message at one level, so a log line and an error look alike there."""

    def __init__(self, chrome: str | None = None, *, width: int = 1440, height: int = 900) -> None:
        self.width, self.height = width, height
        self._profile = tempfile.TemporaryDirectory(prefix="burrow-chrome-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the protocol's pipe is the child's fds 3 (it reads) and 4 (it writes)
        self._proc = subprocess.Popen(
            [chrome or browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars", "--no-first-run", "--no-default-browser-check", "--force-prefers-reduced-motion",
             f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}",
             "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False,  # (os.pipe's ends are not inheritable: only the fds 3 and 4 made here are)
            preexec_fn=lambda: _as_fds_3_and_4(to_chrome_r, from_chrome_w),
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next = 0
        self._events: list[dict[str, Any]] = []
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self._session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            self.call(method, session=True)
        self.call("Page.setLifecycleEventsEnabled", session=True, enabled=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _read(self, timeout: float) -> dict[str, Any] | None:
        import json
        import select

        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._from_chrome], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def call(self, method: str, *, session: bool = False, timeout: float = 120, **params: Any) -> dict[str, Any]:
        """Send one protocol command and wait for its answer (events that arrive meanwhile are kept)."""
        import json

        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            msg["sessionId"] = self._session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        import time

        deadline = time.monotonic() + timeout
        while True:
            got = self._read(max(0.1, deadline - time.monotonic()))
            if got is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Chromium did not answer {method}")
                continue
            if got.get("id") == self._next:
                if "error" in got:
                    raise RuntimeError(f"{method}: {got['error'].get('message')}")
                return got.get("result", {})
            self._events.append(got)

    def _pump(self, seconds: float) -> None:
        got = self._read(seconds)
        if got is not None:
            self._events.append(got)

    def errors(self) -> list[str]:
        """What the pages said at error level so far: console errors, uncaught exceptions, and
        the browser's own error entries (a resource that failed to load, a blocked request)."""
        found = []
        for ev in self._events:
            method, params = ev.get("method"), ev.get("params") or {}
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(" ".join(_console_arg(a) for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                d = params.get("exceptionDetails") or {}
                found.append((d.get("exception") or {}).get("description") or d.get("text", "exception"))
            elif method == "Log.entryAdded" and (params.get("entry") or {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"{entry.get('text')} ({entry.get('url', '')})")
        return found

    def open(self, url: str, *, shows: str | None = None, timeout: float = 300) -> str:
        """Load ``url`` and wait until it has loaded, its network went quiet and (when given) its text
        holds ``shows``; returns the page's visible text. A page that never gets there fails after
        ``timeout`` seconds, a hang guard only: every wait ends as soon as the page is ready."""
        import time

        self._events = [e for e in self._events if e.get("method") != "Page.lifecycleEvent"]
        nav = self.call("Page.navigate", session=True, url=url)
        if nav.get("errorText"):
            raise RuntimeError(f"{url} did not load: {nav['errorText']}")
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            idle = any(e.get("method") == "Page.lifecycleEvent" and e["params"].get("name") == "networkIdle"
                       for e in self._events)
            if idle:
                got = self.call("Runtime.evaluate", session=True, expression="document.body ? document.body.innerText : ''",
                                returnByValue=True)
                text = str((got.get("result") or {}).get("value") or "")
                if shows is None or shows in text:
                    return text
            self._pump(0.5)
        raise TimeoutError(f"{url} did not show {shows!r} (it showed: {text[:300]!r})")

    def screenshot(self, out: Path, *, full_page: bool = False) -> None:
        """The page as it is now, into ``out`` (PNG); ``full_page`` takes all of its height."""
        import base64

        clip = None
        if full_page:
            size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": self.width, "height": max(self.height, int(size["height"])), "scale": 1}
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        if clip:
            params["clip"] = clip
        data = self.call("Page.captureScreenshot", session=True, **params)["data"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        print(f"{out}", flush=True)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
