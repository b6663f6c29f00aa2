"""Progress reporting for long steps: a bar on a terminal, nothing elsewhere.

Tasks wrap a long stage (walk, upload, download, plan, replay) in ``progress.stage(...)`` and
call the ``advance(n)`` it yields as work gets done. What that shows is up to the process:

* by default (a flow run by a worker, a test, a library call) nothing: ``advance`` is a no-op;
* the CLI installs a terminal reporter when stderr is a terminal: one bar per stage with the
  count done (of the total when known), the rate, the elapsed time and, with a total, the ETA.
  A finished bar stays on screen at its final count.

Off a terminal (CI, cron) there are no bars: the stage's own log lines say what happened.

Inside a long flow run (backup, restore, failover, rehearse: ``run_progress``), a Prefect
progress artifact follows the stages too: created once a stage has run for
``BURROW_PROGRESS_ARTIFACT_INTERVAL`` seconds (default 2; a short run makes none), then updated at
most that often with the stage's count of its total ("plan: 5,000 of 10,421 keys"), and set to
100 when the run's stages are done. It is fed from the same ``advance`` calls, so the tasks that
report progress need nothing more; ``advance`` stays a counter and a clock read.

The bar redraws at most every ``BURROW_PROGRESS_INTERVAL`` seconds (default 0.1) on
``advance`` and also from rich's refresh thread; 0 redraws on every call (the tests use it).
Only counts and descriptions are shown, never keys or values.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_reporter: Any = None
_artifact: Any = None


class _TerminalReporter:
    """rich progress bars on stderr, one per stage, left on screen when done."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        class _Rate(TextColumn):
            """Items per second over the stage so far."""

            def __init__(self) -> None:
                super().__init__("")

            def render(self, task: Any) -> Any:  # noqa: ANN401 - rich's Text
                from rich.text import Text

                elapsed = task.finished_time if task.finished else task.elapsed
                rate = task.completed / elapsed if elapsed else 0.0
                return Text(f"{rate:,.0f}/s", style="progress.data.speed")

        class _Count(MofNCompleteColumn):
            """``done/total``, or just ``done`` while the total is unknown."""

            def render(self, task: Any) -> Any:  # noqa: ANN401 - rich's Text
                from rich.text import Text

                if task.total is None:
                    return Text(f"{int(task.completed):,}", style="progress.download")
                return Text(f"{int(task.completed):,}/{int(task.total):,}", style="progress.download")

        try:
            self.interval = float(os.environ.get("BURROW_PROGRESS_INTERVAL", "0.1"))
        except ValueError:
            self.interval = 0.1
        self.progress = Progress(
            SpinnerColumn(finished_text="✓"),
            TextColumn("{task.description}"),
            BarColumn(),
            _Count(),
            TaskProgressColumn(),
            _Rate(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
            refresh_per_second=10,
        )
        self.last = 0.0

    @contextmanager
    def stage(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        p = self.progress
        tid = p.add_task(description, total=total)
        p.start()

        def advance(n: int) -> None:
            p.advance(tid, n)
            now = time.monotonic()
            if now - self.last >= self.interval:
                self.last = now
                p.refresh()

        try:
            yield advance
        finally:
            done = next(t.completed for t in p.tasks if t.id == tid)
            p.update(tid, total=done if total is None or done > total else total, completed=done)
            p.stop_task(tid)
            p.stop()  # the last frame stays on screen (transient=False)
            p.remove_task(tid)  # so the next stage's bar does not draw this one again


def install_terminal_reporter() -> None:
    """Show progress bars on stderr for the rest of this process."""
    global _reporter
    _reporter = _TerminalReporter()


def uninstall() -> None:
    """Back to no progress output."""
    global _reporter
    _reporter = None


def active() -> bool:
    """True while a terminal reporter is installed."""
    return _reporter is not None


@contextmanager
def stage(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """Report progress of one step; yields ``advance(n)`` (a no-op without a reporter)."""
    art = _artifact
    if _reporter is None and art is None:
        yield lambda n: None
        return
    if art is None:
        with _reporter.stage(description, total) as advance:
            yield advance
        return
    with art.stage(description, total) as counted:
        if _reporter is None:
            yield counted
            return
        with _reporter.stage(description, total) as shown:

            def both(n: int) -> None:
                counted(n)
                shown(n)

            yield both


#: Items between two looks at the clock of the progress artifact's ``advance``.
_CHECK_EVERY = 256


class _ArtifactReporter:
    """A Prefect progress artifact for one flow run: created lazily, updated at most every
    ``interval`` seconds, never failing the run (a failed call is logged once at DEBUG)."""

    def __init__(self, title: str, interval: float) -> None:
        self.title = title
        self.interval = interval
        self.id: Any = None
        self.broken = False
        self.last = 0.0

    def _send(self, percent: float, text: str) -> None:
        if self.broken:
            return
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            percent = max(0.0, min(100.0, percent))
            if self.id is None:
                self.id = create_progress_artifact(progress=percent, description=f"{self.title}: {text}")
            else:
                update_progress_artifact(artifact_id=self.id, progress=percent, description=f"{self.title}: {text}")
        except Exception:  # noqa: BLE001 - progress must never fail the run it shows
            import logging

            self.broken = True
            logging.getLogger("burrow").debug("the progress artifact could not be updated", exc_info=True)

    @contextmanager
    def stage(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        label = description.split(" ", 1)[0]  # "restore into zk://..." -> "restore": no location in it
        done = [0]
        started = time.monotonic()
        if not self.last:
            self.last = started

        def report() -> None:
            n = done[0]
            if total:
                self._send(100.0 * n / total, f"{label}: {n:,} of {total:,} keys")
            else:
                self._send(0.0, f"{label}: {n:,} keys")

        due = [0]  # the clock is read once per _CHECK_EVERY items, not on every call (plan calls per key)

        def advance(n: int) -> None:
            done[0] += n
            if done[0] < due[0]:
                return
            due[0] = done[0] + _CHECK_EVERY
            now = time.monotonic()
            if now - self.last >= self.interval:
                self.last = now
                report()

        try:
            yield advance
        finally:
            if self.id is not None:  # a stage that finished: its final count
                report()

    def finish(self, ok: bool) -> None:
        if self.id is not None:
            self._send(100.0, "done" if ok else "stopped")


@contextmanager
def run_progress(title: str) -> Iterator[None]:
    """Show this flow run's stages in a Prefect progress artifact (see the module's text).
    ``title`` names the run ("backup of dc-us"): no key, value or credential."""
    global _artifact
    try:
        interval = float(os.environ.get("BURROW_PROGRESS_ARTIFACT_INTERVAL", "2"))
    except ValueError:
        interval = 2.0
    previous, _artifact = _artifact, _ArtifactReporter(title, interval)
    art = _artifact
    ok = False
    try:
        yield
        ok = True
    finally:
        _artifact = previous
        art.finish(ok)
