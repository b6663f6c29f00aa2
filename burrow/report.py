"""Run summaries: the markdown artifact every flow run leaves, and the CLI's text.

Summaries hold counts, sizes, checksums, locations and paths: never values or secrets.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from burrow.errors import BurrowError
from burrow.runlog import logger

_KEY_RE = re.compile(r"[^a-z0-9-]+")


def artifact_key(*parts: str) -> str:
    """An artifact key: lowercase letters, digits and dashes only."""
    return _KEY_RE.sub("-", "-".join(parts).lower()).strip("-")[:100] or "burrow"


def ratio(raw: int, stored: int) -> str:
    return f"{raw / stored:.2f}x" if stored else "n/a"


def to_markdown(title: str, rows: dict[str, Any], lists: dict[str, list[str]] | None = None) -> str:
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    for k, v in rows.items():
        lines.append(f"| {k} | {_cell(v)} |")
    for heading, items in (lists or {}).items():
        if items:
            lines += ["", f"### {heading}", ""]
            lines += [f"- `{_cell(i)}`" for i in items[:100]]
            if len(items) > 100:
                lines.append(f"- ... and {len(items) - 100} more")
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ").replace("`", "'")


def publish(key: str, title: str, rows: dict[str, Any], lists: dict[str, list[str]] | None = None) -> None:
    """Create the run's markdown artifact (a no-op outside a Prefect run)."""
    md = to_markdown(title, rows, lists)
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:
            return
        create_markdown_artifact(markdown=md, key=artifact_key(key), description=title)
    except Exception as exc:  # noqa: BLE001 - a summary must never fail the run it describes
        logger().warning("could not publish the run summary artifact: %s", type(exc).__name__)


@contextmanager
def recorded(summary: dict[str, Any], publish_summary: Callable[[], None]) -> Iterator[None]:
    """Run a flow body: time it, note a BurrowError's one-line message in ``summary``, and
    always publish the run's artifact (failed runs leave one too)."""
    started = time.monotonic()
    try:
        yield
    except BurrowError as exc:
        summary["error"] = str(exc)
        raise
    finally:
        summary["duration_s"] = round(time.monotonic() - started, 3)
        publish_summary()
