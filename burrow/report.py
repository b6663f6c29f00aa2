"""Run summaries made for people: the artifacts every flow run leaves, and the machine-readable
facts table the evidence report reads.

A run's markdown artifact opens with one line of outcome ("backup of dc-us: done, 10,421 keys,
1.2 MiB stored (3.4x), 8.1 s"), then a table of steps (step, outcome, seconds), the preflight as
a list and the other facts as a short key/value table with units. Nothing in it is a Python
repr: nested values are written out (``plan 0.4 s, replay 1.2 s``), long values (URLs) are
shortened in the table and given whole, in a code span, below it. Lists of items a person may
want to sort or search (conflicts, deletions, skipped archives) are table artifacts of their own.

Beside it, every run publishes an unkeyed table artifact described ``burrow run facts``: one row
per summary leaf (``{"field": "approval.approver", "value": "\\"A. Name\\""}``), values JSON-encoded,
plus ``kind`` and ``outcome``. :func:`facts_table` writes it, :func:`facts_from_table` reads it
back into the summary's shape.

Summaries hold counts, sizes, checksums, locations and paths: never values or secrets.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from burrow.errors import BurrowError
from burrow.runlog import logger

_KEY_RE = re.compile(r"[^a-z0-9-]+")

#: The description of the facts table artifact (the evidence report finds it by it).
FACTS_DESCRIPTION = "burrow run facts"

#: A summary key that may be flattened into a dotted field name (URLs and paths as keys are not).
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

#: Longest value shown whole in a facts cell; longer ones are shortened, given whole below.
CELL_MAX = 60


def artifact_key(*parts: str) -> str:
    """An artifact key: lowercase letters, digits and dashes only."""
    return _KEY_RE.sub("-", "-".join(parts).lower()).strip("-")[:100] or "burrow"


def ratio(raw: int, stored: int) -> str:
    return f"{raw / stored:.2f}x" if stored else "n/a"


# ------------------------------------------------------------------------------- words and units


def count(n: Any, one: str, many: str | None = None) -> str:
    """``1 conflict``, ``10,421 keys``."""
    try:
        v = int(n or 0)
    except (TypeError, ValueError):
        return f"{n} {many or one + 's'}"
    return f"{v:,} {one if v == 1 else (many or one + 's')}"


def size(n: Any) -> str:
    """Bytes for a person: ``812 B``, ``1.2 MiB``."""
    try:
        v = float(n)
    except (TypeError, ValueError):
        return str(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{int(v)} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"  # pragma: no cover - the loop returns


def seconds(s: Any) -> str:
    """A duration for a person: ``0.42 s``, ``8.1 s``, ``12 m``, ``3.1 h``, ``2.0 d``."""
    try:
        v = float(s)
    except (TypeError, ValueError):
        return str(s)
    if v < 1:
        return f"{v:.2f} s"
    if v < 120:
        return f"{v:.1f} s"
    if v < 2 * 3600:
        return f"{v / 60:.0f} m"
    if v < 2 * 86400:
        return f"{v / 3600:.1f} h"
    return f"{v / 86400:.1f} d"


def trigger_text(trigger: dict[str, Any]) -> str:
    """Who or what started a run, as a phrase: "cli, by ops@host", "schedule of backup/backup-dc-us",
    "automation burrow-rehearse-on-backup (rehearse/rehearse-dc-us)", "manual run of ..."."""
    kind, by, dep = trigger.get("kind"), trigger.get("by") or "-", trigger.get("deployment")
    if kind == "schedule":
        return f"schedule of {dep or by}"
    if kind == "automation":
        return f"automation {by}" + (f" ({dep})" if dep else "")
    if kind == "manual":
        return f"manual run of {dep}" + (f", by {by}" if by != dep else "") if dep else f"manual run, by {by}"
    return f"{kind}, by {by}"


def value_text(key: str, value: Any) -> str:
    """A summary value as words with units, by its key (``*_s``: seconds, ``*_bytes``: bytes):
    never a Python repr. Nested values are written out, ``name value, name value``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "trigger" and isinstance(value, dict) and "kind" in value:
        return trigger_text(value)
    if isinstance(value, dict):
        if not value:
            return "-"
        return ", ".join(f"{k} {value_text(str(k) if not key.endswith('_s') else str(k) + '_s', v)}"
                         for k, v in value.items())
    if isinstance(value, (list, tuple)):
        if not value:
            return "-"
        shown = [value_text(key, v) for v in value[:10]]
        return "; ".join(shown) + (f"; and {len(value) - 10} more" if len(value) > 10 else "")
    if isinstance(value, (int, float)):
        if key.endswith("_s") or key in ("rpo", "rto"):
            return seconds(value)
        if key.endswith("_bytes"):
            return size(value)
        if isinstance(value, int):
            return f"{value:,}"
        return f"{value:g}"
    return str(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").replace("`", "'")


def _code(text: str) -> str:
    return "`" + str(text).replace("`", "'").replace("\n", " ") + "`"


def _short(text: str, limit: int = CELL_MAX) -> str:
    if len(text) <= limit:
        return text
    keep = (limit - 1) // 2
    return text[:keep] + "…" + text[-keep:]


# ----------------------------------------------------------------------------- the run's artifact


@dataclass
class Steps:
    """Each step's time and outcome, in the order they ran (the artifact's table of steps;
    ``seconds`` is the summary's ``steps_s``)."""

    seconds: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
            self.outcomes.setdefault(name, "ok")
        except BaseException:
            self.outcomes[name] = "failed"
            raise
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - t0, 3)

    def rows(self) -> list[tuple[str, str, float]]:
        return [(n, self.outcomes.get(n, "interrupted"), s) for n, s in self.seconds.items()]


def done_word(summary: dict[str, Any]) -> str:
    """``done``, ``dry run done``, or ``failed: <the one-line error>``."""
    status = str(summary.get("status") or "failed")
    if status == "failed":
        err = str(summary.get("error") or "see the run's logs").replace("\n", " ")
        return f"failed: {err}"
    if summary.get("dry_run"):
        return "dry run done"
    return "done"


def to_markdown(outcome: str, facts: dict[str, Any], *, steps: list[tuple[str, str, float]] | None = None,
                preflight: list[str] | None = None, lists: dict[str, list[str]] | None = None,
                notes: dict[str, str] | None = None) -> str:
    """The run's markdown: the outcome line, the steps, the preflight, the facts, then lists."""
    lines = [f"# {_cell(outcome)}", ""]
    for heading, text in (notes or {}).items():
        lines += [f"**{heading}:** {text}", ""]
    if steps:
        lines += ["### Steps", "", "| step | outcome | seconds |", "|---|---|---:|"]
        lines += [f"| {_cell(n)} | {_cell(o)} | {s:.2f} |" for n, o, s in steps]
        lines.append("")
    if preflight:
        lines += ["### Preflight", ""]
        lines += [f"- {_cell(p)}" for p in preflight]
        lines.append("")
    full: list[tuple[str, str]] = []
    if facts:
        lines += ["### Facts", "", "| fact | value |", "|---|---|"]
        for k, v in facts.items():
            text = value_text(k, v)
            # a long unbroken value (a URL, a checksum) would not wrap: shortened, given whole below
            unbroken = len(text) > CELL_MAX and any(len(word) > CELL_MAX // 2 for word in text.split())
            if unbroken:
                full.append((k, text))
                text = _code(_short(text))
            elif "://" in text:
                text = _code(text)
            else:
                text = _cell(text)
            lines.append(f"| {_cell(k)} | {text} |")
        lines.append("")
    if full:
        lines += ["### Full values", ""]
        for k, text in full:
            lines += [f"{_cell(k)}:", "", _code(text), ""]
    for heading, items in (lists or {}).items():
        if items:
            lines += [f"### {heading}", ""]
            lines += [f"- {_code(i)}" for i in items[:100]]
            if len(items) > 100:
                lines.append(f"- ... and {len(items) - 100:,} more")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _in_run() -> bool:
    try:
        from prefect.context import FlowRunContext
    except ImportError:  # pragma: no cover - Prefect is a dependency
        return False
    return FlowRunContext.get() is not None


def publish(key: str, outcome: str, facts: dict[str, Any], *, steps: list[tuple[str, str, float]] | None = None,
            preflight: list[str] | None = None, lists: dict[str, list[str]] | None = None,
            tables: dict[str, tuple[str, list[dict[str, Any]]]] | None = None,
            notes: dict[str, str] | None = None) -> None:
    """Create the run's markdown artifact (keyed ``key``, described by the outcome line) and its
    table artifacts (``tables``: ``{key suffix: (description, rows)}``, an empty one is not
    published). A no-op outside a Prefect run; a failure is a warning, never fails the run."""
    if not _in_run():
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        md = to_markdown(outcome, facts, steps=steps, preflight=preflight, lists=lists, notes=notes)
        create_markdown_artifact(markdown=md, key=artifact_key(key), description=outcome[:500])
        for suffix, (description, rows) in (tables or {}).items():
            if rows:
                publish_table(f"{key}-{suffix}", description, rows)
    except Exception as exc:  # noqa: BLE001 - a summary must never fail the run it describes
        logger().warning("could not publish the run summary artifact: %s", type(exc).__name__)


def publish_table(key: str | None, description: str, rows: list[dict[str, Any]]) -> Any:
    """A table artifact (``key`` None: unkeyed); returns its id (None outside a run)."""
    if not _in_run():
        return None
    from prefect.artifacts import create_table_artifact

    return create_table_artifact(table=rows, key=artifact_key(key) if key else None, description=description)


def artifact_url(artifact_id: Any) -> str | None:
    """The artifact's page in Prefect's UI (``<PREFECT_UI_URL>/artifacts/artifact/<id>``)."""
    if not artifact_id:
        return None
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value()
    return f"{str(base).rstrip('/')}/artifacts/artifact/{artifact_id}" if base else None


# ---------------------------------------------------------------------------- machine-readable facts


def _flatten(prefix: str, value: Any, out: list[dict[str, str]]) -> None:
    if isinstance(value, dict) and value and all(isinstance(k, str) and _FIELD_RE.match(k) for k in value):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
        return
    out.append({"field": prefix, "value": json.dumps(value, sort_keys=True, default=str)})


def facts_table(kind: str, outcome: str, summary: dict[str, Any]) -> list[dict[str, str]]:
    """The rows of the ``burrow run facts`` table: ``kind``, ``outcome``, then one row per summary
    leaf (nested dicts with plain keys flattened with dots; lists, and dicts keyed by URLs or
    paths, JSON-encoded whole). Values are JSON strings."""
    rows = [{"field": "kind", "value": json.dumps(kind)}, {"field": "outcome", "value": json.dumps(outcome)}]
    for k, v in summary.items():
        if k in ("kind", "outcome"):
            continue
        _flatten(k, v, rows)
    return rows


def facts_from_table(rows: list[dict[str, Any]] | list[list[Any]] | dict[str, list[Any]]) -> dict[str, Any]:
    """The summary a facts table was made from (dotted fields nested again), with ``kind`` and
    ``outcome``. Takes the rows as :func:`facts_table` made them, or as Prefect's API gives a
    table artifact's data back (a JSON string of them)."""
    if isinstance(rows, str):
        rows = json.loads(rows)
    if isinstance(rows, dict):  # {"field": [...], "value": [...]}
        rows = [{"field": f, "value": v} for f, v in zip(rows["field"], rows["value"], strict=True)]
    out: dict[str, Any] = {}
    for row in rows:
        name, raw = (row["field"], row["value"]) if isinstance(row, dict) else (row[0], row[1])
        try:
            value = json.loads(raw)
        except (TypeError, ValueError):
            value = raw
        parts = str(name).split(".")
        here = out
        for p in parts[:-1]:
            nxt = here.get(p)
            if not isinstance(nxt, dict):
                nxt = here[p] = {}
            here = nxt
        here[parts[-1]] = value
    return out


# ------------------------------------------------------------------------------ running a flow body


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
    except Exception as exc:  # not one of Burrow's: its message may quote anything, its class does not
        summary.setdefault("error", f"unexpected {type(exc).__name__} (see the run's logs)")
        raise
    finally:
        summary["duration_s"] = round(time.monotonic() - started, 3)
        publish_summary()
