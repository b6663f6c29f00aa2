"""The evidence report: what Prefect's history and the archive store prove about a period's
backups, mapped to audit controls, and the signed chain that keeps the reports once Prefect's
history has expired. docs/EVIDENCE.md is its specification (the JSON schema, the checks, the
chain); this module is pure (no Prefect, no store): the tasks read the history and the store
into the plain shapes below, and everything after that (counting, gaps, verdicts, rendering,
the chain record and its verification) happens here, where tests can feed it exact inputs.

Nothing here is a secret or a stored value: sources, deployments, archive names and URLs
without credentials, counts, times, key fingerprints, flow run ids, and the approver names and
comments people typed.
"""

from __future__ import annotations

import bisect
import hashlib
import html
import re
import secrets
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from burrow.crypto import ArchiveKeys
from burrow.errors import UsageError
from burrow.naming import parse_duration, slug

FORMAT = "burrow-evidence/1"
CHECKS = ("backup-schedule", "rpo", "archive-encrypted", "archive-integrity", "rehearsal", "recovery")
#: The data file shipped with Burrow: targets and the control mapping.
DEFAULT_CONTROLS = Path(__file__).with_name("controls.toml")

#: Which checks each kind of row feeds.
ROW_CHECKS = {
    "backup": ("backup-schedule",),
    "archive": ("archive-encrypted", "archive-integrity"),
    "rehearsal": ("rehearsal",),
    "recovery": ("recovery",),
}

PASS, FAIL, NA = "pass", "fail", "n/a"


# ------------------------------------------------------------------------------ the data file


@dataclass(frozen=True)
class Control:
    id: str
    framework: str
    ref: str
    title: str
    checks: tuple[str, ...]


@dataclass(frozen=True)
class Controls:
    """The targets and the control mapping of ``controls.toml``."""

    rpo_s: dict[str, float]
    rto_s: float
    rehearsal_window_days: float
    slot_tolerance_s: float
    controls: tuple[Control, ...]
    verification_window_days: float = 2

    def rpo_target(self, source: str) -> float:
        return float(self.rpo_s.get(source, self.rpo_s["default"]))

    def targets(self) -> dict[str, Any]:
        return {"rpo_s": dict(self.rpo_s), "rto_s": self.rto_s,
                "rehearsal_window_days": self.rehearsal_window_days, "slot_tolerance_s": self.slot_tolerance_s,
                "verification_window_days": self.verification_window_days}

    def controls_of(self, checks: Iterable[str]) -> list[str]:
        wanted = set(checks)
        return [c.id for c in self.controls if wanted & set(c.checks)]


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UsageError(f"the controls file: {what} must be a number of seconds (or days) of at least 0")
    return float(value)


def load_controls(path: str | Path | None = None) -> Controls:
    """The targets and controls of ``path`` (default: the shipped ``burrow/controls.toml``);
    a malformed file is a usage error naming what is wrong."""
    p = Path(path) if path else DEFAULT_CONTROLS
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no controls file {p}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"the controls file {p} cannot be read: {exc}") from None
    t = data.get("targets") or {}
    rpo = t.get("rpo_s")
    if not isinstance(rpo, dict) or "default" not in rpo:
        raise UsageError("the controls file: [targets.rpo_s] needs a default")
    controls = []
    for i, c in enumerate(data.get("controls") or []):
        checks = c.get("checks") if isinstance(c, dict) else None
        if not isinstance(checks, list) or not checks or any(ch not in CHECKS for ch in checks):
            raise UsageError(f"the controls file: control {i + 1} needs checks, each one of {', '.join(CHECKS)}")
        if not isinstance(c.get("id"), str) or not c["id"]:
            raise UsageError(f"the controls file: control {i + 1} needs an id")
        controls.append(Control(c["id"], str(c.get("framework", "")), str(c.get("ref", "")), str(c.get("title", "")),
                                tuple(checks)))
    if not controls:
        raise UsageError("the controls file maps no control")
    return Controls(
        rpo_s={str(k): _number(v, f"rpo_s.{k}") for k, v in rpo.items()},
        rto_s=_number(t.get("rto_s", 900), "rto_s"),
        rehearsal_window_days=_number(t.get("rehearsal_window_days", 7), "rehearsal_window_days"),
        slot_tolerance_s=_number(t.get("slot_tolerance_s", 300), "slot_tolerance_s"),
        controls=tuple(controls),
        verification_window_days=_number(t.get("verification_window_days", 2), "verification_window_days"),
    )


# ------------------------------------------------------------------------------ times and periods


def utc_text(when: datetime | None) -> str | None:
    """A UTC time as the report writes it: ISO 8601 ending in ``Z``."""
    if when is None:
        return None
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def std_utc(when: datetime) -> datetime:
    """``when`` as a plain ``datetime`` in UTC (a time without a zone is UTC). Prefect's client
    hands out pendulum DateTimes, whose arithmetic with a stdlib ``timezone.utc`` loses the zone
    (``slot - tolerance`` came back naive): everything here is stdlib."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    u = when.astimezone(UTC)
    return datetime(u.year, u.month, u.day, u.hour, u.minute, u.second, u.microsecond, tzinfo=UTC)


def parse_time(value: Any) -> datetime | None:
    """A datetime from an ISO 8601 string (a time without a zone is UTC), or None."""
    if isinstance(value, datetime):
        return std_utc(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Period:
    since: datetime
    until: datetime
    label: str

    def to_dict(self) -> dict[str, Any]:
        return {"since": utc_text(self.since), "until": utc_text(self.until), "label": self.label}


def _month(year: int, month: int) -> tuple[datetime, datetime]:
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def period_label(since: datetime, until: datetime) -> str:
    """``2026-11`` for a calendar month (UTC), else ``<since date>-<until date>``."""
    s, u = since.astimezone(UTC), until.astimezone(UTC)
    if (s.day, s.hour, s.minute, s.second, s.microsecond) == (1, 0, 0, 0, 0) and _month(s.year, s.month)[1] == u:
        return f"{s:%Y-%m}"
    return f"{s:%Y-%m-%d}-{u:%Y-%m-%d}"


def parse_period(since: str | None = "30d", until: str | None = None, month: str | None = None,
                 now: datetime | None = None) -> Period:
    """The period of a report: ``month`` (``YYYY-MM`` or ``previous``: a UTC calendar month), or
    ``since`` (a duration back from ``until``, or a time) to ``until`` (a time; default now)."""
    now = now or datetime.now(UTC)
    if month:
        if month == "previous":
            first = now.astimezone(UTC).replace(day=1)
            year, mon = (first.year - 1, 12) if first.month == 1 else (first.year, first.month - 1)
        else:
            m = re.fullmatch(r"(\d{4})-(\d{2})", month)
            if not m or not 1 <= int(m.group(2)) <= 12:
                raise UsageError("--month takes YYYY-MM (2026-11) or previous")
            year, mon = int(m.group(1)), int(m.group(2))
        start, end = _month(year, mon)
        return Period(start, end, f"{start:%Y-%m}")
    end = parse_time(until) if until else now
    if end is None:
        raise UsageError("--until takes a UTC time: 2026-12-01 or 2026-12-01T00:00:00Z")
    start = parse_time(since) if since and since[0].isdigit() and "-" in since else None
    if start is None:
        start = end - parse_duration(since or "30d", "--since")
    if start >= end:
        raise UsageError("the period is empty: --since must be before --until")
    return Period(start, end, period_label(start, end))


# ------------------------------------------------------------------------------ the inputs


@dataclass
class HistoryRun:
    """One flow run as the tasks read it from Prefect (``facts``: its decoded run facts, None
    when it published none)."""

    id: str
    name: str
    flow: str
    state: str | None
    expected_start: datetime | None = None
    start: datetime | None = None
    end: datetime | None = None
    created: datetime | None = None
    deployment: str | None = None
    deployment_id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] | None = None
    auto_scheduled: bool = False
    created_by: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("expected_start", "start", "end", "created"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, std_utc(value))

    @property
    def when(self) -> datetime | None:
        return self.expected_start or self.start or self.created


@dataclass
class HistorySchedule:
    kind: str
    spec: str
    timezone: str | None
    active: bool
    #: Every slot of the schedule in the window the report expects runs for.
    slots: list[datetime] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slots = [std_utc(s) for s in self.slots]


@dataclass
class HistoryDeployment:
    id: str
    name: str  # "<flow>/<deployment>"
    flow: str
    source: str | None
    schedules: list[HistorySchedule] = field(default_factory=list)


@dataclass
class StoreView:
    """What the tasks read from the store: ``rows`` are catalog rows (tasks/catalog.py) with
    ``distrust`` (why not to act on it, or None), ``verification`` (tasks/verify.py) and
    ``object_lock`` ({mode, until} or None); ``markers`` the rehearsal markers by name, each
    ``{archive, at, ok, restore_s, keys, authenticated}``."""

    describe: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    markers: dict[str, dict[str, Any]] = field(default_factory=dict)


# ------------------------------------------------------------------------------ small helpers


def ui_link(ui_url: str | None, run_id: str | None) -> str | None:
    """``<PREFECT_UI_URL>/runs/flow-run/<id>``."""
    if not ui_url or not run_id:
        return None
    return f"{ui_url.rstrip('/')}/runs/flow-run/{run_id}"


def archive_key(url_or_name: Any) -> str | None:
    """The last two segments of an archive's URL or name (``dc-us/dc-us-<time>-<rand>.burrow``):
    how a run's archive URL and a store's row are matched, whichever way the store was opened."""
    if not isinstance(url_or_name, str) or not url_or_name.endswith(".burrow"):
        return None
    return "/".join(url_or_name.rstrip("/").split("/")[-2:])


_OUTCOME = {"COMPLETED": "completed", "FAILED": "failed", "CRASHED": "crashed", "CANCELLED": "cancelled",
            "CANCELLING": "cancelled"}


def outcome_of(state: str | None) -> str:
    return _OUTCOME.get(str(state or "").upper(), "running")


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _worst(statuses: Iterable[str]) -> str:
    s = list(statuses)
    if FAIL in s:
        return FAIL
    return PASS if PASS in s else NA


def run_source(run: HistoryRun) -> str | None:
    """The source a run is about: its facts' ``source``, else the parameter that names it."""
    facts = run.facts or {}
    if _str(facts.get("source")) and facts.get("source") != "all":
        return str(facts["source"])
    p = run.parameters
    if run.flow == "backup":
        return _str(p.get("name")) or _str(p.get("source"))
    if run.flow in ("rehearse", "failover"):
        return _str(p.get("source"))
    if run.flow == "restore":
        key = archive_key(p.get("archive"))
        return key.split("/")[0] if key else None
    return None


def trigger_of(run: HistoryRun) -> dict[str, Any] | None:
    """The run's trigger from its facts (flows/common.py ``run_trigger``), else from its record."""
    t = (run.facts or {}).get("trigger")
    if isinstance(t, dict) and _str(t.get("kind")):
        return {"kind": str(t["kind"]), "by": _str(t.get("by")), "deployment": _str(t.get("deployment"))}
    if not run.deployment:
        return None
    by = (run.created_by or {}) if isinstance(run.created_by, dict) else {}
    if str(by.get("type") or "").upper() == "AUTOMATION":
        return {"kind": "automation", "by": _str(by.get("display_value")) or _str(by.get("id")),
                "deployment": run.deployment}
    if run.auto_scheduled:
        return {"kind": "schedule", "by": run.deployment, "deployment": run.deployment}
    return {"kind": "manual", "by": _str(by.get("display_value")) or run.deployment, "deployment": run.deployment}


def _row(status: str, reason: str | None, checks: tuple[str, ...], controls: Controls, run_id: str | None,
         ui_url: str | None) -> dict[str, Any]:
    return {"status": status, "reason": reason, "controls": controls.controls_of(checks),
            "flow_run_id": run_id, "ui_url": ui_link(ui_url, run_id)}


def match_slots(slots: list[datetime], runs: list[HistoryRun], tolerance_s: float) -> tuple[list[datetime], set[str]]:
    """The slots no started run covers (a run covers the slot its expected start time is within
    ``tolerance_s`` of, nearest first; each run covers one slot), and the ids of the runs that
    covered one."""
    started = sorted((r for r in runs if r.start is not None and r.expected_start is not None),
                     key=lambda r: r.expected_start)  # type: ignore[arg-type, return-value]
    times = [r.expected_start for r in started]
    used: set[int] = set()
    missed: list[datetime] = []
    tol = timedelta(seconds=tolerance_s)
    # a scheduled run's expected start is its slot exactly: those pair first, so a slot with no
    # run never borrows a neighbour's run (and moves the miss onto it) when slots are closer
    # together than the tolerance
    exact: set[datetime] = set()
    for slot in sorted(slots):
        i = bisect.bisect_left(times, slot)  # type: ignore[arg-type]
        while i < len(times) and times[i] == slot and i in used:
            i += 1
        if i < len(times) and times[i] == slot:
            used.add(i)
            exact.add(slot)
    for slot in sorted(slots):
        if slot in exact:
            continue
        i = bisect.bisect_left(times, slot - tol)  # type: ignore[arg-type]
        best: int | None = None
        while i < len(times) and times[i] <= slot + tol:  # type: ignore[operator]
            if i not in used and (best is None or abs(times[i] - slot) < abs(times[best] - slot)):  # type: ignore[operator]
                best = i
            i += 1
        if best is None:
            missed.append(slot)
        else:
            used.add(best)
    return missed, {started[i].id for i in used}


# ------------------------------------------------------------------------------ building the report


def build_report(
    *, period: Period, controls: Controls, runs: list[HistoryRun], deployments: list[HistoryDeployment],
    store: StoreView | None, generated_at: datetime, ui_url: str | None = None, api_url: str | None = None,
    sources: list[str] | None = None, burrow_version: str = "",
) -> dict[str, Any]:
    """The report (docs/EVIDENCE.md, format ``burrow-evidence/1``) of ``period`` from the runs,
    deployments and store view the tasks read."""
    in_period = [r for r in runs if r.when is not None and period.since <= r.when < period.until]
    names: set[str] = set()
    for d in deployments:
        if d.source and d.flow in ("backup", "rehearse"):
            names.add(d.source)
    for r in in_period:
        if r.flow in ("backup", "rehearse", "restore", "failover"):
            s = run_source(r)
            if s:
                names.add(s)
    for row in (store.rows if store else []):
        if _str(row.get("source")):
            names.add(str(row["source"]))
    if sources:
        names = set(sources)
    by_slug = {slug(n): n for n in names}
    prunes = [r for r in runs if r.flow == "prune" and r.when is not None and r.when <= period.until]
    deleted = _deletions(prunes, ui_url)
    out_sources = []
    for name in sorted(names):
        out_sources.append(_source(name, period, controls, runs, in_period, deployments, store, deleted, by_slug,
                                   generated_at, ui_url))
    verdicts = []
    for c in controls.controls:
        per = {s["name"]: s["controls"][c.id] for s in out_sources}
        failing = sorted(n for n, v in per.items() if v == FAIL)
        verdicts.append({"id": c.id, "framework": c.framework, "ref": c.ref, "title": c.title,
                         "checks": list(c.checks), "status": _worst(per.values()), "failing_sources": failing})
    return {
        "format": FORMAT,
        "generated_at": utc_text(generated_at),
        "burrow_version": burrow_version,
        "period": period.to_dict(),
        "prefect": {"api_url": api_url, "ui_url": ui_url},
        "store": store.describe if store else None,
        "targets": controls.targets(),
        "controls": verdicts,
        "sources": out_sources,
        "chain": None,
    }


def _deletions(prunes: list[HistoryRun], ui_url: str | None) -> dict[str, dict[str, Any]]:
    """``{archive key: deleted_by}`` from the prune runs' facts (``deleted_because``: URL -> rule)."""
    out: dict[str, dict[str, Any]] = {}
    for r in sorted(prunes, key=lambda r: r.when or datetime.min.replace(tzinfo=UTC)):
        facts = r.facts or {}
        if facts.get("dry_run") is True:  # (a prune that failed part way still names what it deleted)
            continue
        because = facts.get("deleted_because")
        if isinstance(because, dict):
            for url, rule in because.items():
                key = archive_key(url)
                if key and key not in out:
                    out[key] = {"flow_run_id": r.id, "ui_url": ui_link(ui_url, r.id), "rule": str(rule),
                                "at": utc_text(r.end or r.start)}
    return out


def _source(
    name: str, period: Period, controls: Controls, runs: list[HistoryRun], in_period: list[HistoryRun],
    deployments: list[HistoryDeployment], store: StoreView | None, deleted: dict[str, dict[str, Any]],
    by_slug: dict[str, str], now: datetime, ui_url: str | None,
) -> dict[str, Any]:
    mine = [r for r in in_period if run_source(r) == name]
    deps = [d for d in deployments if d.source == name and d.flow == "backup"]
    store_rows = [row for row in (store.rows if store else []) if _row_source(row, by_slug) == name]
    backups, backup_rows = _backups(name, controls, mine, deps, ui_url)
    archives = _archives(name, controls, mine, store_rows, store, deleted, ui_url)
    rpo = _rpo(name, period, controls, mine, store_rows, now)
    rehearsals = _rehearsals(controls, mine, store, store_rows, period, ui_url)
    recoveries = _recoveries(controls, mine, ui_url)
    backups["rows"] = backup_rows
    keys = {archive_key(row.get("name")) for row in store_rows}
    marks = [m for m in (store.markers.values() if store else []) if archive_key(m.get("archive")) in keys]
    checks = _source_checks(controls, backups, rpo, archives, rehearsals, recoveries, period, store is not None,
                            marks)
    verdicts = {c.id: _worst(checks[ch]["status"] for ch in c.checks) for c in controls.controls}
    return {
        "name": name,
        "deployments": [{"name": d.name, "id": d.id, "schedules": [
            {"kind": s.kind, "spec": s.spec, "timezone": s.timezone, "active": s.active} for s in d.schedules]}
            for d in sorted(deps, key=lambda d: d.name)],
        "backups": backups,
        "rpo": rpo,
        "archives": archives,
        "rehearsals": rehearsals,
        "recoveries": recoveries,
        "checks": checks,
        "controls": verdicts,
    }


def _row_source(row: dict[str, Any], by_slug: dict[str, str]) -> str | None:
    if _str(row.get("source")):
        return str(row["source"])
    key = archive_key(row.get("name"))
    return by_slug.get(key.split("/")[0]) if key else None


def _backups(name: str, controls: Controls, mine: list[HistoryRun], deps: list[HistoryDeployment],
             ui_url: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    runs = sorted((r for r in mine if r.flow == "backup"), key=lambda r: r.when)  # type: ignore[arg-type, return-value]
    counts = {k: 0 for k in ("scheduled", "runs", "started", "completed", "failed", "crashed", "cancelled", "other",
                             "missed")}
    counts["runs"] = len(runs)
    missed_slots: list[datetime] = []
    for d in deps:
        if d.flow != "backup":
            continue
        slots = sorted({s for sch in d.schedules for s in sch.slots})
        counts["scheduled"] += len(slots)
        missed, _ = match_slots(slots, [r for r in runs if r.deployment_id == d.id], controls.slot_tolerance_s)
        missed_slots += missed
    rows = []
    for r in runs:
        outcome = outcome_of(r.state)
        counts["started"] += r.start is not None
        counts[outcome if outcome != "running" else "other"] += 1
        if outcome == "completed":
            status, reason = PASS, None
        elif outcome == "running":
            status, reason = NA, "not finished when the report was made"
        else:
            err = _str((r.facts or {}).get("error"))
            status, reason = FAIL, f"the backup {outcome}" + (f": {err}" if err else "")
        facts = r.facts or {}
        rows.append({**_row(status, reason, ROW_CHECKS["backup"], controls, r.id, ui_url),
                     "kind": "run", "flow_run_name": r.name, "deployment": r.deployment,
                     "scheduled_for": utc_text(r.expected_start), "started": utc_text(r.start),
                     "ended": utc_text(r.end), "state": r.state, "trigger": trigger_of(r),
                     "archive": _str(facts.get("url")) if outcome == "completed" else None,
                     "facts": r.facts is not None})
    missed_slots.sort()
    counts["missed"] = len(missed_slots)
    for slot in missed_slots:
        rows.append({**_row(FAIL, "a scheduled backup that never started", ROW_CHECKS["backup"], controls, None,
                            ui_url),
                     "kind": "missed", "flow_run_name": None, "deployment": None, "scheduled_for": utc_text(slot),
                     "started": None, "ended": None, "state": None, "trigger": None, "archive": None,
                     "facts": False})
    rows.sort(key=lambda row: str(row["scheduled_for"] or row["started"] or ""))
    return {**counts, "missed_slots": [utc_text(s) for s in missed_slots]}, rows


def _archives(name: str, controls: Controls, mine: list[HistoryRun], store_rows: list[dict[str, Any]],
              store: StoreView | None, deleted: dict[str, dict[str, Any]], ui_url: str | None) -> list[dict[str, Any]]:
    made: dict[str, HistoryRun] = {}
    for r in mine:
        key = archive_key((r.facts or {}).get("url")) if r.flow == "backup" and outcome_of(r.state) == "completed" else None
        if key:
            made[key] = r
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in store_rows:
        key = archive_key(row.get("name")) or str(row.get("name"))
        seen.add(key)
        run = made.get(key)
        enc = {"mode": str(row["encryption_mode"]), "fingerprints": list(row.get("fingerprints") or [])} \
            if row.get("encrypted") and row.get("encryption_mode") else None
        state = "unreadable" if row.get("error") else "present"
        out.append(_archive_row(controls, ui_url, name=str(row.get("name")), url=_str(row.get("url")),
                                created=_str(row.get("created")), keys=_int(row.get("keys")),
                                stored_bytes=_int(row.get("size")), encryption=enc,
                                encrypted=row.get("encrypted") if not row.get("error") else None,
                                verification=row.get("verification"), object_lock=row.get("object_lock"),
                                full_verified_at=_str(row.get("full_verified_at")),
                                state=state, deleted_by=None, run=run, distrust=_str(row.get("distrust"))))
    # archives the history knows of that the store no longer holds
    gone = {k: r for k, r in made.items() if k not in seen}
    for key in sorted(set(gone) | {k for k in deleted if k.split("/")[0] == slug(name)} - seen):
        run = gone.get(key)
        facts = (run.facts or {}) if run else {}
        by = deleted.get(key)
        if store is None:
            state = "unknown"
        else:
            state = "deleted-by-prune" if by else "deleted-outside-prune"
        enc = {"mode": str(facts["encryption"]), "fingerprints": list(facts.get("key_fingerprints") or [])} \
            if facts.get("encrypted") and _str(facts.get("encryption")) else None
        out.append(_archive_row(controls, ui_url, name=key, url=_str(facts.get("url")),
                                created=_str(facts.get("archive_created")) or utc_text(run.end if run else None),
                                keys=_int(facts.get("keys")), stored_bytes=_int(facts.get("stored_bytes")),
                                encryption=enc, encrypted=facts.get("encrypted") if run else None,
                                verification=_str(facts.get("verified")) if _str(facts.get("verified")) in (
                                    "full", "structure-only") else None,
                                full_verified_at=None, object_lock=None, state=state, deleted_by=by, run=run, distrust=None))
    out.sort(key=lambda a: (str(a["created"] or ""), a["name"]))
    return out


def _archive_row(controls: Controls, ui_url: str | None, *, name: str, url: str | None, created: str | None,
                 keys: int | None, stored_bytes: int | None, encryption: dict[str, Any] | None, encrypted: Any,
                 verification: Any, full_verified_at: str | None, object_lock: Any, state: str, deleted_by: dict[str, Any] | None,
                 run: HistoryRun | None, distrust: str | None) -> dict[str, Any]:
    reasons = []
    enc_status = NA if encrypted is None else (PASS if encrypted else FAIL)
    if enc_status == FAIL:
        reasons.append("not encrypted")
    if state == "present" and not distrust:
        integrity = PASS
    elif state in ("deleted-by-prune", "unknown"):
        integrity = NA
    else:
        integrity = FAIL
        reasons.append("deleted outside prune" if state == "deleted-outside-prune" else
                       distrust or "unreadable" if state == "unreadable" else f"not trusted: {distrust}")
    status = _worst([enc_status, integrity])
    row = _row(status, "; ".join(r for r in reasons if r) or None, ROW_CHECKS["archive"], controls,
               run.id if run else None, ui_url)
    return {**row, "name": name, "url": url, "created": created, "keys": keys, "stored_bytes": stored_bytes,
            "encryption": encryption,
            "verification": verification if verification in ("full", "structure-only") else None,
            "full_verified_at": full_verified_at,
            "object_lock": object_lock if isinstance(object_lock, dict) else None,
            "state": state, "deleted_by": deleted_by, "backup_flow_run_id": run.id if run else None,
            "checks": {"archive-encrypted": enc_status, "archive-integrity": integrity}}


def _rpo(name: str, period: Period, controls: Controls, mine: list[HistoryRun], store_rows: list[dict[str, Any]],
         now: datetime) -> dict[str, Any]:
    """The largest data-loss window in the period: the time since the last successful backup,
    just before each successful backup of the period and at the period's end (or now)."""
    created_of = {archive_key(r.get("name")): parse_time(r.get("created")) for r in store_rows
                  if not r.get("error") and not r.get("distrust")}
    points: dict[str, datetime] = {}
    for r in mine:
        if r.flow == "backup" and outcome_of(r.state) == "completed":
            key = archive_key((r.facts or {}).get("url"))
            when = created_of.get(key) if key else None
            when = when or parse_time((r.facts or {}).get("archive_created")) or r.end
            if when is not None:
                points[key or f"run:{r.id}"] = when
    for key, when in created_of.items():
        if key and when is not None and key not in points:
            points[key] = when
    target = controls.rpo_target(name)
    end = min(period.until, now)
    times = sorted(t for t in points.values() if t <= end and t < period.until)
    before = [t for t in times if t < period.since]
    inside = [t for t in times if t >= period.since]
    prev = before[-1] if before else None
    worst: tuple[float, datetime, datetime] | None = None
    lead = (inside[0] - period.since).total_seconds() if inside and prev is None else None
    for t in [*inside, end]:  # the window just before each backup of the period, and at its end
        if prev is not None:
            gap = (t - prev).total_seconds()
            if worst is None or gap > worst[0]:
                worst = (gap, prev, t)
        prev = t
    achieved = round(worst[0], 3) if worst else None
    status = FAIL if achieved is None or achieved > target else PASS
    return {"target_s": target, "achieved_s": achieved, "lead_s": round(lead, 3) if lead is not None else None,
            "worst_gap": {"from": utc_text(worst[1]), "to": utc_text(worst[2])} if worst else None,
            "successful_backups": len(inside), "status": status}


def _rehearsals(controls: Controls, mine: list[HistoryRun], store: StoreView | None,
                store_rows: list[dict[str, Any]], period: Period, ui_url: str | None) -> list[dict[str, Any]]:
    out = []
    markers = store.markers if store else {}
    named: set[str] = set()
    for r in sorted((r for r in mine if r.flow == "rehearse"), key=lambda r: r.when):  # type: ignore[arg-type, return-value]
        facts = r.facts or {}
        outcome = outcome_of(r.state)
        marker = markers.get(str(facts.get("marker"))) if _str(facts.get("marker")) else None
        if marker is not None:
            named.add(str(facts["marker"]))
        result = {"completed": "passed", "failed": "failed"}.get(outcome, outcome)
        restore_s = _num(marker.get("restore_s")) if marker else None
        restore_s = restore_s if restore_s is not None else _num(facts.get("restore_s"))
        # (None: no store read, no marker written, or the marker went with its pruned archive)
        auth = bool(marker.get("authenticated")) if marker else None
        out.append(_rehearsal_row(controls, ui_url, run_id=r.id, at=utc_text(r.start or r.when),
                                  archive=_str(facts.get("archive")), result=result, keys=_int(facts.get("keys")),
                                  restore_s=restore_s, authenticated=auth,
                                  error=_str(facts.get("error"))))
    # markers of the period no run of the history names (a CLI rehearsal whose run expired, ...)
    for mname, m in sorted(markers.items()):
        at = parse_time(m.get("at"))
        if mname in named or at is None or not period.since <= at < period.until:
            continue
        if not any(archive_key(m.get("archive")) == archive_key(row.get("name")) for row in store_rows):
            continue
        out.append(_rehearsal_row(controls, ui_url, run_id=None, at=utc_text(at), archive=_str(m.get("url")) or
                                  _str(m.get("archive")), result="passed" if m.get("ok") else "failed",
                                  keys=_int(m.get("keys")), restore_s=_num(m.get("restore_s")),
                                  authenticated=bool(m.get("authenticated")), error=None))
    out.sort(key=lambda r: str(r["at"] or ""))
    return out


def _rehearsal_row(controls: Controls, ui_url: str | None, *, run_id: str | None, at: str | None,
                   archive: str | None, result: str, keys: int | None, restore_s: float | None,
                   authenticated: bool | None, error: str | None) -> dict[str, Any]:
    within = None if restore_s is None else restore_s <= controls.rto_s
    if result == "running":
        status, reason = NA, "not finished when the report was made"
    elif result != "passed":
        status, reason = FAIL, f"the rehearsal {result}" + (f": {error}" if error else "")
    elif within is False:
        status, reason = FAIL, f"the restore took {restore_s:.1f} s, above the RTO target of {controls.rto_s:g} s"
    elif authenticated is False:
        status, reason = FAIL, "its marker is not authenticated (not signed with a configured read key)"
    else:
        status, reason = PASS, None
    return {**_row(status, reason, ROW_CHECKS["rehearsal"], controls, run_id, ui_url),
            "at": at, "archive": archive, "result": result, "keys": keys, "restore_s": restore_s,
            "rto_target_s": controls.rto_s, "within_rto": within, "marker_authenticated": authenticated}


def _recoveries(controls: Controls, mine: list[HistoryRun], ui_url: str | None) -> list[dict[str, Any]]:
    out = []
    for r in sorted((r for r in mine if r.flow in ("restore", "failover")), key=lambda r: r.when):  # type: ignore[arg-type, return-value]
        facts = r.facts or {}
        if r.parameters.get("dry_run") is True or facts.get("dry_run") is True:
            continue
        outcome = outcome_of(r.state)
        approval = facts.get("approval") if isinstance(facts.get("approval"), dict) else {}
        rto = _num(facts.get("rto_s"))
        if rto is None and r.flow == "restore":
            rto = _num(facts.get("duration_s"))
        wait = _num(facts.get("approval_wait_s"))
        approver, comment = _str(approval.get("approver")), _str(approval.get("comment"))
        reasons = []
        if outcome == "running":
            status = NA
            reasons.append("not finished when the report was made")
        else:
            if outcome != "completed":
                err = _str(facts.get("error"))
                reasons.append(f"the {r.flow} {outcome}" + (f": {err}" if err else ""))
            if rto is not None and rto > controls.rto_s:
                reasons.append(f"RTO {rto:.1f} s is above the target of {controls.rto_s:g} s")
            if r.flow == "failover" and (approval or (wait or 0) > 0) and not (approver and comment):
                reasons.append("approved without an approver's name and comment")
            status = FAIL if reasons else PASS
        out.append({**_row(status, "; ".join(reasons) or None, ROW_CHECKS["recovery"], controls, r.id, ui_url),
                    "kind": r.flow, "at": utc_text(r.start or r.when), "outcome": outcome,
                    "target": _str(facts.get("target_block")) or _str(facts.get("target")) or _str(r.parameters.get("into")),
                    "archive": _str(facts.get("url")) or _str(facts.get("archive")),
                    "trigger": trigger_of(r), "approver": approver, "comment": comment,
                    "approved": approval.get("approved") if isinstance(approval.get("approved"), bool) else None,
                    "created": _int(facts.get("created")), "conflicts": _int(facts.get("conflicts")),
                    "rpo_s": _num(facts.get("rpo_s")) if _num(facts.get("rpo_s")) is not None else _age(facts, r),
                    "rto_s": rto, "approval_wait_s": wait,
                    "rto_target_s": controls.rto_s})
    return out


def _age(facts: dict[str, Any], run: HistoryRun) -> float | None:
    """A restore's RPO: how old its archive (signed ``archive_created``) was when the run started."""
    made, start = parse_time(facts.get("archive_created")), run.start or run.when
    return round((start - made).total_seconds(), 3) if made and start else None


def _source_checks(controls: Controls, backups: dict[str, Any], rpo: dict[str, Any], archives: list[dict[str, Any]],
                   rehearsals: list[dict[str, Any]], recoveries: list[dict[str, Any]], period: Period,
                   store_read: bool, markers: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    def verdict(status: str, reason: str) -> dict[str, str]:
        return {"status": status, "reason": reason}

    out: dict[str, dict[str, str]] = {}
    bad = backups["failed"] + backups["crashed"] + backups["cancelled"]
    if backups["missed"] or bad:
        out["backup-schedule"] = verdict(FAIL, f"{backups['missed']} missed, {backups['failed']} failed, "
                                               f"{backups['crashed']} crashed, {backups['cancelled']} cancelled "
                                               f"of {backups['scheduled']} scheduled")
    elif not backups["completed"]:
        out["backup-schedule"] = verdict(FAIL, "no backup completed in the period")
    else:
        out["backup-schedule"] = verdict(PASS, f"{backups['completed']} completed, none missed or failed "
                                               f"({backups['scheduled']} scheduled)")
    if rpo["achieved_s"] is None:
        out["rpo"] = verdict(FAIL, "no successful backup to measure the RPO from")
    else:
        out["rpo"] = verdict(rpo["status"], f"worst {_secs(rpo['achieved_s'])} against a target of {_secs(rpo['target_s'])}")
    enc = [a["checks"]["archive-encrypted"] for a in archives]
    out["archive-encrypted"] = verdict(_worst(enc), f"{enc.count(FAIL)} of {len(enc)} archives not encrypted"
                                       if FAIL in enc else f"{enc.count(PASS)} encrypted archives")
    integ = [a["checks"]["archive-integrity"] for a in archives]
    present = [a for a in archives if a["state"] == "present"]
    newest = max(present, key=lambda a: str(a["created"] or ""), default=None)
    if FAIL in integ:
        bad_rows = [a for a in archives if a["checks"]["archive-integrity"] == FAIL]
        out["archive-integrity"] = verdict(FAIL, f"{len(bad_rows)} archive(s): " + "; ".join(
            f"{a['name']}: {a['reason']}" for a in bad_rows[:3]))
    elif not store_read:
        out["archive-integrity"] = verdict(NA, "no store was read")
    elif newest is None:
        out["archive-integrity"] = verdict(FAIL, "the store holds no archive of this source")
    else:
        # a full verify (decrypted, every record checked against the authenticated manifest) by the
        # read keys' holder, signed by them, recently: verify-daily's, of each day's newest archive
        since = period.until - timedelta(days=controls.verification_window_days)
        full = [t for a in archives if (t := parse_time(a["full_verified_at"])) and since <= t < period.until]
        days = f"{controls.verification_window_days:g}"
        if not full:
            out["archive-integrity"] = verdict(FAIL, f"no archive fully verified (a signed full verify) within {days} "
                                                     f"days of the period's end; the newest {newest['name']} is "
                                                     f"verified {newest['verification'] or 'not at all'}")
        else:
            out["archive-integrity"] = verdict(PASS, f"{len(present)} archives present; the last signed full verify "
                                                     f"{utc_text(max(full))}")
    window_start = period.until - timedelta(days=controls.rehearsal_window_days)
    good = [r for r in rehearsals if r["status"] == PASS and (parse_time(r["at"]) or period.since) >= window_start]
    # the store's markers also prove a rehearsal of the window (one that ran before the period, or
    # whose run history expired)
    marked = [m for m in markers if m.get("ok") and m.get("authenticated")
              and window_start <= (parse_time(m.get("at")) or window_start - timedelta(1)) <= period.until
              and (_num(m.get("restore_s")) or 0) <= controls.rto_s]
    failing = [r for r in rehearsals if r["status"] == FAIL]
    days = f"{controls.rehearsal_window_days:g}"
    if not good and not marked:
        out["rehearsal"] = verdict(FAIL, f"no passing rehearsal within {days} days of the period's end"
                                   + (f" ({len(failing)} failed)" if failing else ""))
    else:
        out["rehearsal"] = verdict(PASS, f"{len(good)} passing rehearsal(s) and {len(marked)} authenticated passing "
                                         f"marker(s) within {days} days" + (f"; {len(failing)} failed" if failing else ""))
    rec = [r["status"] for r in recoveries]
    out["recovery"] = verdict(_worst(rec), "no restore or failover in the period" if not rec else
                              f"{rec.count(PASS)} passed, {rec.count(FAIL)} failed")
    return out


# ------------------------------------------------------------------------------ JSON


def to_json(report: dict[str, Any]) -> bytes:
    """The report's JSON bytes (sorted keys, indented: the same report, the same bytes)."""
    return orjson.dumps(report, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"


# ------------------------------------------------------------------------------ markdown


def _md(text: Any) -> str:
    return str("" if text is None else text).replace("|", "\\|").replace("\n", " ")


def _link(text: str, url: str | None) -> str:
    return f"[{_md(text)}]({url})" if url else _md(text)


def _secs(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.1f} h"


def _status(s: str) -> str:
    return {PASS: "pass", FAIL: "**FAIL**", NA: "n/a"}.get(s, s)


def headline(report: dict[str, Any]) -> str:
    """One line: the period, the sources and how many controls pass."""
    c = report["controls"]
    failing = [v["id"] for v in c if v["status"] == FAIL]
    sources = len(report["sources"])
    verdict = (f"{len(failing)} of {len(c)} controls fail ({', '.join(failing)})" if failing
               else f"all {sum(v['status'] == PASS for v in c)} controls with evidence pass")
    return f"evidence for {report['period']['label']}: {sources} source{'s' if sources != 1 else ''}, {verdict}"


def render_markdown(report: dict[str, Any]) -> str:
    """The markdown artifact: the headline, the controls, and per source its sections."""
    p = report["period"]
    lines = [f"# Burrow evidence {p['label']}", "", headline(report), "",
             f"Period {p['since']} to {p['until']}; generated {report['generated_at']}"
             + (f"; store `{report['store']}`" if report["store"] else "; no store read")
             + (f"; chain report {report['chain']['seq']}" if report.get("chain") else ""), "",
             "| control | framework | status | failing sources |", "|---|---|---|---|"]
    for c in report["controls"]:
        lines.append(f"| {_md(c['id'])} | {_md(c['framework'])} {_md(c['ref'])} | {_status(c['status'])} | "
                     f"{_md(', '.join(c['failing_sources']) or '-')} |")
    for s in report["sources"]:
        b, r = s["backups"], s["rpo"]
        lines += ["", f"## {_md(s['name'])}", "",
                  "| check | status | why |", "|---|---|---|"]
        lines += [f"| {ch} | {_status(v['status'])} | {_md(v['reason'])} |" for ch, v in s["checks"].items()]
        lines += ["", f"Backups: {b['scheduled']} scheduled, {b['runs']} runs, {b['started']} started, "
                      f"{b['completed']} completed, {b['failed']} failed, {b['crashed']} crashed, "
                      f"{b['cancelled']} cancelled, **{b['missed']} missed**. "
                      f"RPO: worst {_secs(r['achieved_s'])} against {_secs(r['target_s'])}."]
        if s["archives"]:
            lines += ["", "| archive | created | encryption | verified | lock | state |", "|---|---|---|---|---|---|"]
            for a in s["archives"][-50:]:
                enc = a["encryption"]["mode"] if a["encryption"] else "none"
                lock = a["object_lock"]["until"] if a["object_lock"] else "-"
                state = a["state"] + (f" ({_link('prune', a['deleted_by']['ui_url'])})" if a["deleted_by"] else "")
                lines.append(f"| `{_md(a['name'])}` | {_md(a['created'])} | {_md(enc)} | {_md(a['verification'] or '-')} "
                             f"| {_md(lock)} | {state} |")
            if len(s["archives"]) > 50:
                lines.append(f"\n{len(s['archives']) - 50} older archives are in the JSON and HTML reports.")
        if s["rehearsals"]:
            lines += ["", "| rehearsal | result | restore | status |", "|---|---|---|---|"]
            for h in s["rehearsals"]:
                lines.append(f"| {_link(str(h['at']), h['ui_url'])} | {h['result']} | {_secs(h['restore_s'])} | "
                             f"{_status(h['status'])} |")
        if s["recoveries"]:
            lines += ["", "| recovery | outcome | approver | created | conflicts | RTO |", "|---|---|---|---|---|---|"]
            for v in s["recoveries"]:
                lines.append(f"| {_link(v['kind'] + ' ' + str(v['at']), v['ui_url'])} | {v['outcome']} | "
                             f"{_md(v['approver'] or '-')} | {v['created'] if v['created'] is not None else '-'} | "
                             f"{v['conflicts'] if v['conflicts'] is not None else '-'} | {_secs(v['rto_s'])} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ HTML

_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 72rem; padding: 0 1rem; color: #1b1f24; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 2px solid #d0d7de; padding-bottom: .2rem; }
h3 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
.meta { color: #57606a; }
.headline { font-size: 1.05rem; font-weight: 600; }
table { border-collapse: collapse; width: 100%; margin: .4rem 0 1rem; table-layout: auto; }
th, td { border: 1px solid #d0d7de; padding: .25rem .45rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td { overflow-wrap: anywhere; word-break: break-word; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
.pass { color: #116329; font-weight: 600; }
.fail { color: #b3261e; font-weight: 700; }
.na { color: #57606a; }
a { color: #0b57d0; }
.counts td, .counts th { text-align: right; }
@media print {
  body { margin: 0; max-width: none; font-size: 10pt; }
  a { color: inherit; text-decoration: none; }
  h2 { break-before: page; page-break-before: always; }
  h2, h3 { break-after: avoid; page-break-after: avoid; }
  thead { display: table-header-group; }
  tr, td, th { break-inside: avoid; page-break-inside: avoid; }
  .first h2 { break-before: auto; page-break-before: auto; }
}
"""


def _h(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _a(text: Any, url: str | None) -> str:
    if url and url.startswith(("http://", "https://")):
        return f'<a href="{_h(url)}">{_h(text)}</a>'
    return _h(text)


def _st(status: str) -> str:
    cls = {PASS: "pass", FAIL: "fail"}.get(status, "na")
    return f'<span class="{cls}">{_h(status.upper() if status == FAIL else status)}</span>'


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    out = [f'<table{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}><thead><tr>'
           + "".join(f"<th>{_h(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows]
    return "".join(out) + "</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    """The self-contained HTML page: inline CSS, no script, no external asset; prints well
    (every source starts a page, table headers repeat, rows do not break)."""
    p = report["period"]
    chain = report.get("chain")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Burrow evidence {_h(p['label'])}</title>",
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<style>{_CSS}</style></head><body>",
             '<div class="first">',
             f"<h1>Burrow evidence {_h(p['label'])}</h1>",
             f'<p class="headline">{_h(headline(report))}</p>',
             f'<p class="meta">Period {_h(p["since"])} to {_h(p["until"])}; generated {_h(report["generated_at"])} '
             f'by Burrow {_h(report["burrow_version"])}; store {("<code>" + _h(report["store"]) + "</code>") if report["store"] else "not read"}'
             + (f"; chain report {_h(chain['seq'])}, record <code>{_h(chain['record'])}</code>" if chain else "")
             + "</p>",
             "<h3>Controls</h3>",
             _table(["control", "framework", "checks", "status", "failing sources"], [
                 [_h(c["id"]) + f'<br><span class="meta">{_h(c["title"])}</span>', _h(f"{c['framework']} {c['ref']}"),
                  _h(", ".join(c["checks"])), _st(c["status"]), _h(", ".join(c["failing_sources"]) or "-")]
                 for c in report["controls"]]),
             "<h3>Targets</h3>",
             _table(["target", "value"], [
                 ["RPO (default)", _h(_secs(report["targets"]["rpo_s"]["default"]))],
                 ["RTO", _h(_secs(report["targets"]["rto_s"]))],
                 ["rehearsal window", _h(f"{report['targets']['rehearsal_window_days']:g} days")],
                 ["slot tolerance", _h(_secs(report["targets"]["slot_tolerance_s"]))]]),
             "</div>"]
    for s in report["sources"]:
        b, r = s["backups"], s["rpo"]
        parts.append(f"<section><h2>{_h(s['name'])}</h2>")
        parts.append(_table(["control", "status"], [[_h(k), _st(v)] for k, v in s["controls"].items()]))
        parts.append("<h3>Checks</h3>" + _table(["check", "status", "why"], [
            [_h(k), _st(v["status"]), _h(v["reason"])] for k, v in s["checks"].items()]))
        sched = "; ".join(f"{d['name']}: " + ", ".join(
            f"{x['kind']} {x['spec']}{'' if x['active'] else ' (paused)'}" for x in d["schedules"]) for d in s["deployments"])
        parts.append("<h3>Backups</h3>" + (f'<p class="meta">{_h(sched)}</p>' if sched else "")
                     + _table(["scheduled", "runs", "started", "completed", "failed", "crashed", "cancelled", "missed"],
                              [[_h(b[k]) for k in ("scheduled", "runs", "started", "completed", "failed", "crashed",
                                                   "cancelled", "missed")]], "counts"))
        parts.append(f"<p>RPO: worst {_h(_secs(r['achieved_s']))} "
                     + (f"(from {_h(r['worst_gap']['from'])} to {_h(r['worst_gap']['to'])}) " if r["worst_gap"] else "")
                     + f"against a target of {_h(_secs(r['target_s']))}: {_st(r['status'])}; "
                     f"{_h(r['successful_backups'])} successful backups in the period.</p>")
        failed_rows = [x for x in b["rows"] if x["status"] == FAIL]
        if failed_rows:
            parts.append("<h3>Missed and failed backups</h3>" + _table(["scheduled for", "what", "run", "why"], [
                [_h(x["scheduled_for"] or x["started"]), _h(x["kind"] if x["kind"] == "missed" else x["state"]),
                 _a(x["flow_run_name"] or x["flow_run_id"] or "-", x["ui_url"]), _h(x["reason"])] for x in failed_rows]))
        if s["archives"]:
            parts.append("<h3>Archives</h3>" + _table(
                ["archive", "created", "encryption", "verified", "Object Lock", "state", "status"],
                [[f"<code>{_h(a['name'])}</code>", _h(a["created"]),
                  _h(a["encryption"]["mode"] + ": " + ", ".join(a["encryption"]["fingerprints"])) if a["encryption"] else "none",
                  _h(a["verification"] or "-"),
                  _h(f"{a['object_lock']['mode'] or ''} until {a['object_lock']['until']}") if a["object_lock"] else "-",
                  _h(a["state"]) + (f"<br>by {_a('prune run', a['deleted_by']['ui_url'])}: {_h(a['deleted_by']['rule'])}"
                                    if a["deleted_by"] else ""),
                  _st(a["status"]) + (f"<br>{_h(a['reason'])}" if a["reason"] else "")] for a in s["archives"]]))
        if s["rehearsals"]:
            parts.append("<h3>Rehearsals</h3>" + _table(
                ["at", "archive", "result", "restore time", "RTO target", "marker", "status"],
                [[_a(h["at"], h["ui_url"]), f"<code>{_h(archive_key(h['archive']) or h['archive'] or '-')}</code>",
                  _h(h["result"]), _h(_secs(h["restore_s"])), _h(_secs(h["rto_target_s"])),
                  _h({True: "authenticated", False: "not authenticated", None: "-"}[h["marker_authenticated"]]),
                  _st(h["status"]) + (f"<br>{_h(h['reason'])}" if h["reason"] else "")] for h in s["rehearsals"]]))
        if s["recoveries"]:
            parts.append("<h3>Restores and failovers</h3>" + _table(
                ["run", "trigger", "approver", "comment", "archive", "created", "conflicts", "RPO", "RTO",
                 "approval wait", "status"],
                [[_a(f"{v['kind']} {v['at']}", v["ui_url"]),
                  _h(f"{v['trigger']['kind']}: {v['trigger']['by']}" if v["trigger"] else "-"),
                  _h(v["approver"] or "-"), _h(v["comment"] or "-"),
                  f"<code>{_h(archive_key(v['archive']) or v['archive'] or '-')}</code>",
                  _h(v["created"] if v["created"] is not None else "-"),
                  _h(v["conflicts"] if v["conflicts"] is not None else "-"), _h(_secs(v["rpo_s"])),
                  _h(_secs(v["rto_s"])), _h(_secs(v["approval_wait_s"])),
                  _st(v["status"]) + (f"<br>{_h(v['reason'])}" if v["reason"] else "")] for v in s["recoveries"]]))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------ the chain

EVIDENCE_PREFIX = "_evidence/"
RECORD_KIND = "burrow-evidence-record"
RECORD_VERSION = 1
#: Domain separation of the chain record's MAC (never a marker's or a journal record's).
RECORD_MAC_DOMAIN = b"burrow/v1/evidence-record\x00"
RECORD_SUFFIX = ".record.burrow-meta"
JSON_SUFFIX = ".json.burrow-meta"
HTML_SUFFIX = ".html.burrow-meta"
#: The largest record read back (a record is well under a kilobyte).
MAX_RECORD_BYTES = 64 * 1024
_OBJECT_RE = re.compile(r"^_evidence/(\d{8})-([a-z0-9-]+)-([0-9a-f]{12})\.(record|json|html)\.burrow-meta$")


def object_names(seq: int, label: str, nonce: str | None = None) -> dict[str, str]:
    """The three objects of report ``seq``: ``_evidence/<seq>-<label>-<random>.{record,json,html}.burrow-meta``
    (the random part: a name planted in advance cannot block the next report)."""
    base = f"{EVIDENCE_PREFIX}{seq:08d}-{slug(label).lower()}-{nonce or secrets.token_hex(6)}"
    return {"record": base + RECORD_SUFFIX, "json": base + JSON_SUFFIX, "html": base + HTML_SUFFIX}


def parse_object(name: str) -> tuple[int, str] | None:
    """``(seq, "record" | "json" | "html")`` of an evidence object's name, or None."""
    m = _OBJECT_RE.match(name)
    return (int(m.group(1)), m.group(4)) if m else None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_record(*, keys: ArchiveKeys, chain: str, seq: int, names: dict[str, str], store: str, period: dict[str, Any],
                 generated_at: str, json_bytes: bytes, html_bytes: bytes,
                 previous: tuple[str, bytes] | None) -> dict[str, Any]:
    """The chain record of one report, MACed with the read key (``keys.reader_sign``):
    ``previous`` is the previous record's name and bytes."""
    body = {
        "kind": RECORD_KIND, "version": RECORD_VERSION, "chain": chain, "seq": seq, "name": names["record"],
        "store": store, "period": period, "generated_at": generated_at,
        "json": {"name": names["json"], "sha256": sha256(json_bytes), "size": len(json_bytes)},
        "html": {"name": names["html"], "sha256": sha256(html_bytes), "size": len(html_bytes)},
        "previous": {"name": previous[0], "sha256": sha256(previous[1])} if previous else None,
    }
    return keys.reader_sign(RECORD_MAC_DOMAIN, body)


def record_bytes(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


@dataclass
class Finding:
    kind: str  # "removed" | "edited" | "foreign"
    seq: int | None
    object: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "object": self.object, "message": self.message}


@dataclass
class ChainCheck:
    """What :func:`check_chain` found: the authentic records of the chain (by seq) and every finding."""

    records: list[tuple[str, bytes, dict[str, Any]]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    chain: str | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def newest(self) -> tuple[str, bytes, dict[str, Any]] | None:
        return self.records[-1] if self.records else None

    def to_dict(self) -> dict[str, Any]:
        newest = self.newest
        return {"ok": self.ok, "reports": len(self.records), "chain": self.chain,
                "newest": {"seq": newest[2]["seq"], "record": newest[0], "sha256": sha256(newest[1]),
                           "period": newest[2].get("period")} if newest else None,
                "findings": [f.to_dict() for f in self.findings]}


def _load_record(data: bytes | None) -> dict[str, Any] | None:
    if data is None or len(data) > MAX_RECORD_BYTES:
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def check_chain(names: list[str], read: Callable[[str], bytes | None], keys: ArchiveKeys, store: str,
                *, objects: bool = True) -> ChainCheck:
    """Walk the evidence chain of a store: ``names`` are the store's objects under ``_evidence/``,
    ``read(name)`` their bytes (None: not there), ``keys`` the read keys, ``store`` the store as
    its records must name it. ``objects``: also check each report's JSON and HTML (the writer
    skips that, it only needs the chain's tail). Findings: ``removed`` (a sequence number, a
    linked record or a report object missing), ``edited`` (a MAC, size or sha256 that does not
    match), ``foreign`` (another key, another chain, another store, or a record under another
    name)."""
    out = ChainCheck()
    present = set(names)
    authentic: list[tuple[str, bytes, dict[str, Any]]] = []
    for name in sorted(n for n in names if n.endswith(RECORD_SUFFIX)):
        parsed = parse_object(name)
        data = read(name)
        rec = _load_record(data)
        if data is None:
            out.findings.append(Finding("removed", parsed[0] if parsed else None, name, f"{name} is listed but cannot be read"))
            continue
        if rec is None or rec.get("kind") != RECORD_KIND:
            out.findings.append(Finding("edited", parsed[0] if parsed else None, name,
                                        f"{name} is not an evidence record (edited or corrupt)"))
            continue
        ok, why = keys.reader_verify(RECORD_MAC_DOMAIN, rec)
        seq = rec.get("seq") if isinstance(rec.get("seq"), int) else (parsed[0] if parsed else None)
        if not ok:
            kind = "foreign" if why and ("not configured" in why or "no reader MAC" in why) else "edited"
            out.findings.append(Finding(kind, seq, name, f"report {seq} ({name}): {why}"))
            continue
        if rec.get("name") != name or parsed is None or parsed[0] != rec.get("seq"):
            out.findings.append(Finding("foreign", seq, name, f"report {seq} ({name}) was signed as {rec.get('name')}: "
                                        "copied or renamed from elsewhere"))
            continue
        if rec.get("store") != store:
            out.findings.append(Finding("foreign", seq, name, f"report {seq} ({name}) was written to another store "
                                        f"({rec.get('store')})"))
            continue
        authentic.append((name, data, rec))  # type: ignore[arg-type]
    if not authentic:
        return out
    chains: dict[str, list[tuple[str, bytes, dict[str, Any]]]] = {}
    for item in authentic:
        chains.setdefault(str(item[2].get("chain")), []).append(item)
    main = max(chains, key=lambda c: (len(chains[c]), max(i[2]["seq"] for i in chains[c])))
    out.chain = main
    for c, items in chains.items():
        if c != main:
            for name, _, rec in items:
                out.findings.append(Finding("foreign", rec["seq"], name, f"report {rec['seq']} ({name}) belongs to "
                                            "another chain"))
    records = sorted(chains[main], key=lambda i: (i[2]["seq"], i[0]))
    by_seq: dict[int, tuple[str, bytes, dict[str, Any]]] = {}
    for item in records:
        if item[2]["seq"] in by_seq:
            out.findings.append(Finding("foreign", item[2]["seq"], item[0], f"a second report {item[2]['seq']} "
                                        f"({item[0]}) in the chain"))
            continue
        by_seq[item[2]["seq"]] = item
    out.records = [by_seq[s] for s in sorted(by_seq)]
    top = max(by_seq)
    for s in range(1, top + 1):
        if s not in by_seq:
            after = next((by_seq[n][0] for n in range(s + 1, top + 1) if n in by_seq), None)
            out.findings.append(Finding("removed", s, "", f"report {s} is missing from the chain"
                                        + (f" ({after} follows a gap)" if after else "")))
    for s, (name, _, rec) in sorted(by_seq.items()):
        prev = rec.get("previous")
        if s == 1:
            if prev is not None:
                out.findings.append(Finding("edited", s, name, f"report 1 ({name}) links to a previous report"))
        elif not isinstance(prev, dict):
            out.findings.append(Finding("edited", s, name, f"report {s} ({name}) links to no previous report"))
        elif prev.get("name") not in present:
            if s - 1 in by_seq:  # the gap itself is reported above otherwise
                out.findings.append(Finding("removed", s - 1, str(prev.get("name")), f"report {s} ({name}) links to "
                                            f"{prev.get('name')}, which is not in the store"))
        elif s - 1 in by_seq and (prev.get("name") != by_seq[s - 1][0] or prev.get("sha256") != sha256(by_seq[s - 1][1])):
            out.findings.append(Finding("edited", s - 1, str(prev.get("name")), f"report {s} ({name}) links to "
                                        f"{prev.get('name')} by a sha256 its bytes no longer have (edited)"))
        if not objects:
            continue
        for part in ("json", "html"):
            ref = rec.get(part) if isinstance(rec.get(part), dict) else {}
            obj = str(ref.get("name"))
            data = read(obj) if obj in present else None
            if data is None:
                out.findings.append(Finding("removed", s, obj, f"report {s}'s {part.upper()} ({obj}) is not in the store"))
            elif len(data) != ref.get("size") or sha256(data) != ref.get("sha256"):
                out.findings.append(Finding("edited", s, obj, f"report {s}'s {part.upper()} ({obj}) is not what its "
                                            "record signed (edited)"))
    if objects:
        named = {str((rec.get(p) or {}).get("name")) for _, _, rec in out.records for p in ("json", "html")}
        for name in sorted(present):
            parsed = parse_object(name)
            if parsed and parsed[1] != "record" and name not in named:
                out.findings.append(Finding("foreign", parsed[0], name, f"{name} is named by no authentic record"))
    out.findings.sort(key=lambda f: (f.seq if f.seq is not None else 0, f.kind, f.object))
    return out


def new_chain_id() -> str:
    return secrets.token_hex(16)
