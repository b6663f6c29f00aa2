"""The evidence report's stages: read Prefect's history (flow runs, their states and facts,
deployments and their schedules), read the archive store (catalog, verification records,
rehearsal markers, Object Lock), and write or check the signed chain of reports in the store.

The counting, the verdicts and the rendering are burrow/evidence.py's (pure); these stages only
turn what Prefect and the store answer into its plain inputs. docs/EVIDENCE.md says what each
number means.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import orjson

from blocks.store import SIDECAR_SUFFIX, ArchiveStore
from burrow import evidence as ev
from burrow.crypto import ArchiveKeys
from burrow.errors import ArchiveNotFound, StoreError, UsageError, should_retry
from burrow.naming import redact_url
from burrow.report import FACTS_DESCRIPTION, facts_from_table
from burrow.runlog import logger
from tasks import task
from tasks.catalog import describe_archives, distrust
from tasks.markers import MARKER_KIND, archive_of, check_marker, same_archive
from tasks.verify import verification_levels, verification_of

#: The flows whose runs the report reads.
BURROW_FLOWS = ("backup", "rehearse", "restore", "failover", "prune")
#: Flow runs and artifacts read per API request.
PAGE = 200
#: Most slots one schedule may expand to in a report (a 1-second interval over a month is a mistake).
MAX_SLOTS = 200_000


# ------------------------------------------------------------------------------ Prefect's history


def _utc(when: Any) -> datetime | None:
    if when is None:
        return None
    if isinstance(when, datetime):
        return ev.std_utc(when)
    return ev.parse_time(str(when))


def ui_url() -> str | None:
    """Prefect's UI URL (``PREFECT_UI_URL``, derived from the API URL when not set), or None."""
    try:
        from prefect.settings import PREFECT_UI_URL

        value = PREFECT_UI_URL.value()
    except Exception:  # noqa: BLE001 - no UI URL is a report without links, not a failure
        return None
    return redact_url(str(value)).rstrip("/") if value else None


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    value = PREFECT_API_URL.value()
    return redact_url(str(value)) if value else None


def schedule_slots(schedule: Any, start: datetime, end: datetime) -> list[datetime]:
    """Every time ``schedule`` (a Prefect cron, interval or rrule schedule, as the client reads
    it) fires in ``[start, end]``, enumerated by Prefect's own schedule classes (the server's,
    which the scheduler uses: same timezone and DST rules)."""
    from prefect.server.schemas import schedules as server

    kinds = {"CronSchedule": server.CronSchedule, "IntervalSchedule": server.IntervalSchedule,
             "RRuleSchedule": server.RRuleSchedule}
    cls = kinds.get(type(schedule).__name__)
    if cls is None or start > end:
        return []
    sched = cls.model_validate(schedule.model_dump())
    out: list[datetime] = []
    cursor = start
    while len(out) < MAX_SLOTS:
        batch = [_utc(d) for d in sched._get_dates_generator(n=1000, start=cursor, end=end)]
        batch = [d for d in batch if d is not None and start <= d <= end]
        out += [d for d in batch if not out or d > out[-1]]
        if len(batch) < 1000:
            break
        cursor = batch[-1] + timedelta(microseconds=1)
    return sorted(set(out))


def describe_schedule(schedule: Any) -> tuple[str, str, str | None]:
    """``(kind, spec, timezone)`` of a Prefect schedule, as the report shows it."""
    name = type(schedule).__name__
    tz = getattr(schedule, "timezone", None)
    if name == "CronSchedule":
        return "cron", str(schedule.cron), tz
    if name == "IntervalSchedule":
        return "interval", f"{schedule.interval.total_seconds():g}s", tz
    if name == "RRuleSchedule":
        return "rrule", str(schedule.rrule), tz
    return name, "", tz


def read_history(since: datetime, until: datetime, *, now: datetime | None = None,
                 slot_tolerance_s: float = 300) -> tuple[list[ev.HistoryRun], list[ev.HistoryDeployment]]:
    """Burrow's flow runs whose expected start time is from ``since`` on (to now: a prune after
    the period still tells what became of the period's archives), each with its decoded run
    facts, and Burrow's deployments with every slot of their schedules (active or paused) from
    ``max(since, created)`` to ``until`` (excluded) or ``now - slot_tolerance_s``, whichever is first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    now = now or datetime.now(UTC)
    flow_filter = FlowFilter(name=FlowFilterName(any_=list(BURROW_FLOWS)))
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows(flow_filter=flow_filter)}
        deployments = client.read_deployments(flow_filter=flow_filter) if flows else []
        dep_names = {d.id: f"{flows.get(d.flow_id, '?')}/{d.name}" for d in deployments}
        raw = []
        while flows:
            page = client.read_flow_runs(
                flow_filter=flow_filter,
                flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(after_=since)),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=PAGE, offset=len(raw),
            )
            raw += page
            if len(page) < PAGE:
                break
        facts: dict[UUID, dict[str, Any]] = {}
        ids = [r.id for r in raw]
        for i in range(0, len(ids), 100):
            offset = 0
            while True:
                page = client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids[i:i + 100]),
                                                   type=ArtifactFilterType(any_=["table"])),
                    limit=PAGE, offset=offset,
                )
                for a in page:
                    if a.description == FACTS_DESCRIPTION and a.flow_run_id is not None:
                        try:
                            facts[a.flow_run_id] = facts_from_table(a.data)  # type: ignore[arg-type]
                        except (TypeError, ValueError, KeyError) as exc:
                            logger().warning("evidence: the facts of flow run %s do not read (%s): counted from its "
                                             "state", a.flow_run_id, type(exc).__name__)
                offset += len(page)
                if len(page) < PAGE:
                    break
    runs = []
    for r in raw:
        by = r.created_by.model_dump(mode="json") if r.created_by else None
        runs.append(ev.HistoryRun(
            id=str(r.id), name=r.name, flow=flows.get(r.flow_id, "?"),
            state=r.state_type.value if r.state_type else None,
            expected_start=_utc(r.expected_start_time), start=_utc(r.start_time), end=_utc(r.end_time),
            created=_utc(r.created), deployment=dep_names.get(r.deployment_id) if r.deployment_id else None,
            deployment_id=str(r.deployment_id) if r.deployment_id else None,
            parameters=dict(r.parameters or {}), facts=facts.get(r.id), auto_scheduled=bool(r.auto_scheduled),
            created_by=by,
        ))
    horizon = min(until, now - timedelta(seconds=slot_tolerance_s))
    out_deps = []
    for d in deployments:
        flow = flows.get(d.flow_id, "?")
        params = dict(d.parameters or {})
        source = params.get("source") if flow == "rehearse" else (params.get("name") or params.get("source"))
        schedules = []
        for s in d.schedules:
            kind, spec, tz = describe_schedule(s.schedule)
            start = max(since, _utc(d.created) or since, _utc(getattr(s, "created", None)) or since)
            slots = schedule_slots(s.schedule, start, horizon) if flow == "backup" else []
            slots = [x for x in slots if x < until]  # the period is [since, until)
            schedules.append(ev.HistorySchedule(kind=kind, spec=spec, timezone=tz, active=bool(s.active), slots=slots))
        out_deps.append(ev.HistoryDeployment(id=str(d.id), name=dep_names[d.id], flow=flow,
                                             source=str(source) if isinstance(source, str) else None,
                                             schedules=schedules))
    return runs, out_deps


@task(name="read-history", retries=2, retry_delay_seconds=[2, 10])
def read_history_task(since: datetime, until: datetime, slot_tolerance_s: float = 300,
                      now: datetime | None = None) -> dict[str, Any]:
    """Prefect task wrapper of :func:`read_history` (``{"runs": [...], "deployments": [...]}``)."""
    runs, deps = read_history(since, until, now=now, slot_tolerance_s=slot_tolerance_s)
    logger().info("evidence: %d flow runs and %d deployments read from Prefect", len(runs), len(deps))
    return {"runs": runs, "deployments": deps}


# ------------------------------------------------------------------------------ signed full verifications

#: ``<archive>.verified-full-<UTC time>.burrow-meta``: a full verify by a holder of the read keys,
#: signed with the reader key and bound to the archive's name and manifest checksum and to its
#: time. The plain ``<archive>.verified-full.burrow-meta`` (tasks/verify.py) is what ``list`` and
#: ``status`` show; anyone who can write to the store could write that one, so the evidence report
#: counts only these. Prune removes them with their archive (they carry the ``.verified-`` infix).
SIGNED_INFIX = ".verified-full-"
VERIFICATION_KIND = "burrow-full-verification"
VERIFICATION_MAC_DOMAIN = b"burrow/v1/full-verification\x00"
_STAMP = "%Y%m%dT%H%M%S%fZ"


def record_full_verification(store: ArchiveStore, keys: ArchiveKeys, archive_name: str, manifest: dict[str, Any],
                             at: datetime | None = None) -> str:
    """Write the signed record of a full verify of ``archive_name`` (create-only); returns its name."""
    at = (at or datetime.now(UTC)).astimezone(UTC)
    body = keys.reader_sign(VERIFICATION_MAC_DOMAIN, {
        "kind": VERIFICATION_KIND, "version": 1, "archive": archive_name,
        "manifest_sha256": manifest.get("manifest_sha256"), "content_sha256": manifest.get("content_sha256"),
        "keys": manifest.get("keys"), "at": ev.utc_text(at),
    })
    name = f"{archive_name}{SIGNED_INFIX}{at.strftime(_STAMP)}{SIDECAR_SUFFIX}"
    store.put_sidecar(name, orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    return name


@task(name="record-full-verification", retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=should_retry)
def record_full_verification_task(store: ArchiveStore, keys: ArchiveKeys, archive_name: str,
                                  manifest: dict[str, Any]) -> str:
    """Prefect task wrapper of :func:`record_full_verification`."""
    return record_full_verification(store, keys, archive_name, manifest)


def full_verified_at(record: Any, sidecar: str, row: dict[str, Any], keys: ArchiveKeys | None) -> datetime | None:
    """The signed time of a full-verification record when it is authentic and bound to the
    archive of ``row`` (its name, its manifest checksum, and the time in its own name), else None."""
    if keys is None or not keys.can_reader_sign() or not isinstance(record, dict):
        return None
    if record.get("kind") != VERIFICATION_KIND or not same_archive(str(record.get("archive")), str(row["name"])):
        return None
    if not keys.reader_verify(VERIFICATION_MAC_DOMAIN, record)[0]:
        return None
    if not row.get("manifest_sha256") or record.get("manifest_sha256") != row.get("manifest_sha256"):
        return None
    at = ev.parse_time(record.get("at"))
    stamp = sidecar[: -len(SIDECAR_SUFFIX)].rpartition(SIGNED_INFIX)[2]
    if at is None or stamp != at.strftime(_STAMP):
        return None
    return at


# ------------------------------------------------------------------------------ the store


def read_store(store: ArchiveStore, keys: ArchiveKeys | None) -> ev.StoreView:
    """The store's archives (catalog rows, each with ``distrust``, ``verification``,
    ``full_verified_at`` and ``object_lock``) and its rehearsal markers (each checked against its archive with the read
    keys), as burrow/evidence.py reads them."""
    keyed = keys is not None and bool(keys.keyring)
    rows = describe_archives(store, keys if keyed else None)
    levels = verification_levels(store)
    locked_until = getattr(store, "locked_until", None)
    mode = getattr(store, "object_lock_mode", None)
    by_name = {}
    for row in rows:
        row["distrust"] = distrust(row, keyed=keyed)
        row["verification"] = verification_of(str(row["name"]), levels)
        row["object_lock"] = None
        row["full_verified_at"] = None  # set below from the signed full-verification records
        if locked_until is not None and not row.get("error"):
            try:
                until = locked_until(row["name"])
            except (StoreError, ArchiveNotFound):
                until = None
            if until is not None:
                row["object_lock"] = {"mode": mode, "until": ev.utc_text(until)}
        by_name[str(row["name"])] = row
    markers: dict[str, dict[str, Any]] = {}
    for name in store.list_sidecars():
        if SIGNED_INFIX in name and name.endswith(SIDECAR_SUFFIX):
            row = by_name.get(name.rpartition(SIGNED_INFIX)[0])
            try:
                at = full_verified_at(orjson.loads(store.get_sidecar(name)), name, row, keys if keyed else None) \
                    if row is not None else None
            except (StoreError, ValueError):
                at = None
            if at is not None and row is not None and (row.get("full_verified_at") or "") < (ev.utc_text(at) or ""):
                row["full_verified_at"] = ev.utc_text(at)
            continue
        archive = archive_of(name)
        row = by_name.get(archive) if archive else None
        if row is None:
            continue
        try:
            marker = orjson.loads(store.get_sidecar(name))
        except (StoreError, ValueError):
            continue
        if not isinstance(marker, dict) or marker.get("kind") != MARKER_KIND:
            continue
        ok, _ = check_marker(marker, str(row["name"]), row.get("manifest_sha256"), keys if keyed else None, name)
        markers[name] = {"archive": str(row["name"]), "url": row.get("url"), "at": marker.get("at"),
                         "ok": marker.get("ok") is True, "keys": marker.get("keys"),
                         "restore_s": marker.get("restore_s"), "authenticated": ok}
    return ev.StoreView(describe=store.describe(), rows=rows, markers=markers)


@task(name="read-store", retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=should_retry)
def read_store_task(store: ArchiveStore, keys: ArchiveKeys | None) -> ev.StoreView:
    """Prefect task wrapper of :func:`read_store`."""
    view = read_store(store, keys)
    logger().info("evidence: %d archives and %d rehearsal markers read from %s", len(view.rows), len(view.markers),
                  view.describe)
    return view


# ------------------------------------------------------------------------------ the chain


def _reader(store: ArchiveStore) -> Any:
    def read(name: str) -> bytes | None:
        try:
            return store.get_sidecar(name)
        except ArchiveNotFound:
            return None

    return read


def check_store_chain(store: ArchiveStore, keys: ArchiveKeys, *, objects: bool = True) -> ev.ChainCheck:
    """The evidence chain of ``store``, walked and checked (burrow/evidence.py ``check_chain``)."""
    if not keys.can_reader_sign():
        raise UsageError("checking the evidence chain needs the read key (--key-file, --identity, --passphrase-env, "
                         "--key-env or --key-block): its records are MACed with it")
    names = store.list_sidecars(ev.EVIDENCE_PREFIX)
    return ev.check_chain(names, _reader(store), keys, store.describe(), objects=objects)


def lock_objects(store: ArchiveStore, names: list[str]) -> dict[str, Any] | None:
    """Put ``names`` under the store's Object Lock retention, where it has one (blocks/s3.py
    ``lock_sidecar``); returns ``{mode, until}`` or None."""
    lock = getattr(store, "lock_sidecar", None)
    if lock is None or not getattr(store, "object_lock_mode", None):
        return None
    until = None
    for name in names:
        until = lock(name)
    return {"mode": store.object_lock_mode, "until": ev.utc_text(until)} if until else None  # type: ignore[attr-defined]


def write_report(store: ArchiveStore, keys: ArchiveKeys, report: dict[str, Any]) -> dict[str, Any]:
    """Write ``report`` to the store as the next link of its evidence chain: the JSON and the
    HTML (create-only), then the record naming them by sha256 and the previous record by hash,
    MACed with the read key; all three under Object Lock where the store has it. Sets
    ``report["chain"]`` and returns it. Findings in the existing chain are logged (the new report
    links to the newest authentic record; ``burrow evidence verify`` reports them)."""
    if not keys.can_reader_sign():
        raise UsageError("writing evidence to a store needs the read key: its chain records are MACed with it, "
                         "and an unsigned report proves nothing")
    log = logger()
    check = check_store_chain(store, keys, objects=False)
    for f in check.findings:
        log.warning("evidence chain of %s: %s", store.describe(), f.message)
    tail = check.newest
    seq = tail[2]["seq"] + 1 if tail else 1
    chain = check.chain or ev.new_chain_id()
    names = ev.object_names(seq, report["period"]["label"])
    report["chain"] = {"seq": seq, "record": names["record"], "json": names["json"], "html": names["html"],
                       "previous": {"record": tail[0], "sha256": ev.sha256(tail[1])} if tail else None}
    json_bytes = ev.to_json(report)
    html_bytes = ev.render_html(report).encode("utf-8")
    record = ev.build_record(keys=keys, chain=chain, seq=seq, names=names, store=store.describe(),
                             period=report["period"], generated_at=report["generated_at"], json_bytes=json_bytes,
                             html_bytes=html_bytes, previous=(tail[0], tail[1]) if tail else None)
    store.put_sidecar(names["json"], json_bytes)
    store.put_sidecar(names["html"], html_bytes)
    store.put_sidecar(names["record"], ev.record_bytes(record))
    lock = lock_objects(store, [names["json"], names["html"], names["record"]])
    log.info("evidence report %d written to %s as %s%s", seq, store.describe(), names["record"],
             f" (Object Lock until {lock['until']})" if lock else "")
    return report["chain"]


# no retries: a retry would write its objects under new names, beside the ones a failed attempt left
@task(name="write-evidence")
def write_report_task(store: ArchiveStore, keys: ArchiveKeys, report: dict[str, Any]) -> dict[str, Any]:
    """Prefect task wrapper of :func:`write_report`; returns the report with its chain link."""
    write_report(store, keys, report)
    return report
