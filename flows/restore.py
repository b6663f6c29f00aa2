"""The restore flow: download, validate, plan, replay. Never overwrites or deletes a key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.runtime import flow_run

from blocks.keys import archive_keys
from blocks.resolve import archive_from_ref, scheme_of, source_from_ref
from blocks.source import SourceBlock
from burrow import naming, report
from burrow.crypto import ArchiveKeys
from burrow.runlog import logger
from burrow.staging import staging_dir
from flows.common import Ref, burrow_flow, recorded_run, source_lock
from tasks.download import download
from tasks.plan import Plan, write_plan_list
from tasks.plan import plan as plan_task
from tasks.replay import Replayed, replay
from tasks.undo import UndoSink, undo_sink
from tasks.validate import validate


def _run_name() -> str:
    p = flow_run.parameters
    into = str(p.get("into", "target"))
    kind = "dry-run" if p.get("dry_run") else "restore"
    return f"{kind}-{naming.slug(into)}-{naming.stamp()}"


@burrow_flow(name="restore", flow_run_name=_run_name, persist_result=False)
def restore(
    archive: Ref,
    into: Ref,
    dry_run: bool = False,
    subtree: str | None = None,
    maps: list[str] | None = None,
    key_files: list[str] | None = None,
    identity_files: list[str] | None = None,
    passphrase_env: str | None = None,
    key_env: str | None = None,
    key_block: str | None = None,
    allow_unencrypted: bool = False,
    expect_manifest_sha256: str | None = None,
    list_file: str | None = None,
    list_sealed: bool = False,
    at: str | None = None,
    at_revision: int | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Restore ``archive`` into the cluster ``into``, creating only missing keys.

    ``at`` (an ISO 8601 time, or ``latest``) or ``at_revision`` (etcd only: for a ZooKeeper or
    Consul source it is a UsageError, raised from the chain's manifests before anything is
    downloaded or written): ``archive`` is then the store, and the restore is of ``source`` at
    that point: the newest full archive before it plus the change segments up to it
    (tasks/chain.py), materialized into a private archive that is planned and replayed like
    any other.

    An encrypted archive is opened with the keys named by ``key_files``/``identity_files``
    (paths), ``passphrase_env``/``key_env`` (environment variable names) or ``key_block``
    (a saved EncryptionKeys block), else by the BURROW_* environment, plus the retired keys
    of $BURROW_KEYRING. Every check (key, manifest MAC, every chunk, checksums, counts)
    passes before anything is written to the cluster. When any read key is configured, an
    unencrypted archive is refused unless ``allow_unencrypted`` (it could have been planted).

    ``expect_manifest_sha256`` (``restore --latest`` passes the catalog row's) refuses an
    archive whose manifest is not the one it was chosen by.

    ``list_file``: write every planned create's line there (``--list-file``), streamed from
    the plan's spool, after the replay (or the dry run's plan); ``list_sealed`` writes it as a
    spool only this process can read back (the CLI's ``--list``, printed after the summary).

    Returns the run summary; ``conflicts`` > 0 means existing keys differed and were kept.
    """
    summary: dict[str, Any] = {"status": "failed", "archive": archive, "dry_run": dry_run}
    lists: dict[str, list[str]] = {}
    steps = report.Steps()

    def _publish() -> None:
        summary["steps_s"] = dict(steps.seconds)
        publish_summary("restore", summary, lists, dry_run, steps=steps.rows())

    title = f"restore into {into if scheme_of(into) is None else naming.redact_url(into)}"
    with recorded_run("restore", summary, _publish, progress_title=title):
        if at is not None or at_revision is not None:  # a point in time: the store, a source, a point
            restore_point(archive, into, source, at, at_revision, summary, lists, dry_run=dry_run, subtree=subtree,
                          maps=maps, keys=archive_keys(key_files, identity_files, passphrase_env, key_env, key_block),
                          allow_unencrypted=allow_unencrypted, list_file=list_file, list_sealed=list_sealed)
            return summary
        store, name = archive_from_ref(archive)
        target = source_from_ref(into)
        summary.update(target=target.describe(), target_service=target.service)
        if scheme_of(into) is None:
            summary["target_block"] = into  # the artifact's key and the event's resource name it
        keys = archive_keys(key_files, identity_files, passphrase_env, key_env, key_block)
        with staging_dir() as work:
            with steps.step("download"):
                local = download(store, name, str(work))
            with steps.step("validate"):
                # the plan parses every record before anything is written: no second parse here
                manifest = validate(local, keys, label=store.url(name), allow_unencrypted=allow_unencrypted,
                                    expect_manifest_sha256=expect_manifest_sha256, parse_records=False)
            if keys.opened_by:
                summary["decrypted_with"] = keys.opened_by
            elif not manifest.get("encrypted"):
                logger().warning(
                    "%s is not encrypted: its checksums catch accidents, but nothing authenticates it",
                    store.url(name),
                )
            summary.update(
                service=manifest["service"], source=manifest.get("source"), archive_keys=manifest["keys"],
                content_sha256=manifest["content_sha256"],
                archive_created=manifest.get("created"),  # the evidence report's RPO of this restore
            )
            # The target cluster is locked from planning (its first read) to the last write: a backup or
            # another restore of the same cluster, on any worker, waits. A dry run reads it too.
            with source_lock(target_lock_name(into, target)), steps.step("plan and restore"):
                plan_and_replay(local, target, work, keys, summary, lists, dry_run=dry_run, subtree=subtree, maps=maps,
                                list_file=list_file, list_sealed=list_sealed, undo=undo_sink(store, keys, "restore"))
        return summary


def restore_point(
    store_ref: str, into: str, source: str | None, at: str | None, at_revision: int | None,
    summary: dict[str, Any], lists: dict[str, list[str]], *, dry_run: bool, subtree: str | None,
    maps: list[str] | None, keys: ArchiveKeys, allow_unencrypted: bool, list_file: str | None, list_sealed: bool,
) -> None:
    """A restore to a point in time (``--at`` / ``--at-revision``): resolve the chain, fetch and
    validate the start archive, materialize the state at the point, then the same plan and
    create-only replay as any restore. Every segment is checked before the plan starts."""
    from blocks.resolve import store_from_ref
    from burrow import segments
    from burrow.errors import UsageError
    from tasks.chain import materialize, resolve_point_task

    if not source:
        raise UsageError("a restore to a point needs the source's name (--source NAME)")
    store = store_from_ref(store_ref)
    target = source_from_ref(into)
    summary.update(target=target.describe(), target_service=target.service, source=source, store=store.describe())
    at_time = None if at in (None, "latest") else segments.parse_point(str(at))
    point = resolve_point_task(store, source, keys, at_time=at_time, at_position=at_revision, latest=at == "latest",
                               allow_unencrypted=allow_unencrypted)
    start = point.start_name  # None: the chain's resync before the point is the whole state
    summary.update(archive=store.url(start) if start else point.segments[0].url, segments=len(point.segments),
                   at=segments.us_to_iso(at_time) if at_time is not None else at,
                   at_position=point.at_position)
    with staging_dir() as work:
        local = None
        if start is not None:
            local = download(store, start, str(work))
            validate(local, keys, label=store.url(start), allow_unencrypted=allow_unencrypted,
                     expect_manifest_sha256=point.start_sha)
        state, state_keys, manifest = materialize(store, point, local, keys, str(work), allow_unencrypted)
        if local is not None:
            Path(local).unlink(missing_ok=True)
        summary.update(service=manifest["service"], archive_keys=manifest["keys"])
        with source_lock(target_lock_name(into, target)):
            plan_and_replay(state, target, work, state_keys, summary, lists, dry_run=dry_run, subtree=subtree,
                            maps=maps, list_file=list_file, list_sealed=list_sealed,
                            undo=undo_sink(store, keys, "restore"))


def target_lock_name(into: str, target: SourceBlock) -> str:
    """The name a restore target is locked under: the saved block's name when ``into`` names
    one (as a backup of that block records it), else the target's URL without credentials
    (as a backup of that URL names its source by default)."""
    return into if scheme_of(into) is None else target.describe()


def plan_and_replay(
    local: str,
    target: SourceBlock,
    work: Path,
    keys: ArchiveKeys,
    summary: dict[str, Any],
    lists: dict[str, list[str]],
    *,
    dry_run: bool,
    subtree: str | None,
    maps: list[str] | None,
    list_file: str | None = None,
    list_sealed: bool = False,
    undo: UndoSink | None = None,
) -> None:
    """The part of a restore after the archive passed validation: plan, then (unless a dry
    run) replay, then the list of creates when asked for. Fills ``summary`` and the artifact
    ``lists`` in place. ``undo``: where the replay seals the list of keys it created, for
    ``burrow undo`` (tasks/undo.py; a rehearsal, which cleans up itself, gives none)."""
    p = plan_task(local, target, str(work), subtree=subtree, maps=maps, decryptor=keys, listed=bool(list_file))
    plan_summary(p, summary, lists, dry_run=dry_run)
    if not dry_run:
        replay_summary(p, replay(p, target, undo), summary, lists)
    save_list(p, list_file, list_sealed, summary)


def plan_summary(p: Plan, summary: dict[str, Any], lists: dict[str, list[str]], *, dry_run: bool) -> None:
    """What the plan found, into a restore's or failover's summary and artifact ``lists`` (one
    helper for both flows); a dry run ends here, so its status is set too."""
    summary.update(
        planned_create=p.to_create, planned_intermediate=p.intermediate, identical=p.identical,
        conflicts=p.conflicts, outside_subtree=p.outside_subtree, metadata_not_carried=p.dropped_metadata,
    )
    if p.warnings:
        summary["warnings"] = p.warnings
    lists["Planned creates (first 1000)" if dry_run else "Created (first 1000)"] = p.create_paths
    lists["Conflicts (kept as they are)"] = list(p.conflict_paths)
    summary["conflict_paths"] = list(p.conflict_paths)
    summary["planned_paths"] = p.create_paths
    if dry_run:
        summary.update(status="ok", created=0)


def replay_summary(p: Plan, done: Replayed, summary: dict[str, Any], lists: dict[str, list[str]]) -> None:
    """What the replay did, on top of :func:`plan_summary`: its counts (a key that appeared
    meanwhile counts as identical or as a conflict), the target's report (ZooKeeper's ACLs)
    and every conflict, the plan's and the replay's."""
    conflict_paths = list(p.conflict_paths) + done.conflict_paths
    summary.update(
        status="ok" if not (p.conflicts + done.conflicts) else "ok-with-conflicts",
        created=done.created, intermediate_created=done.intermediate_created,
        identical=p.identical + done.identical, conflicts=p.conflicts + done.conflicts,
    )
    summary.update(done.target_report)
    summary.update(done.undo)  # undo_run, undo_run_id, undo_store, undo_keys: what `burrow undo` takes
    lists["Created with an ACL only the restorer holds (first 1000)"] = done.target_report.get(
        "acl_restricted_paths", []
    )
    lists["Archived ACL not applied (first 1000)"] = done.target_report.get("acl_not_applied_paths", [])
    lists["Conflicts (kept as they are)"] = conflict_paths
    summary["conflict_paths"] = list(conflict_paths)
    summary["replay_conflict_paths"] = list(done.conflict_paths)  # (their kind in the conflicts table)


def save_list(p: Plan, list_file: str | None, sealed: bool, summary: dict[str, Any]) -> None:
    """``--list`` / ``--list-file``: every planned create's line into ``list_file``, streamed
    from the plan's spool (tasks/plan.py ``write_plan_list``), and the count in the summary
    (``list_lines``). A list that cannot be written is a warning, not a failure: by then the
    run's writes are done, and they stand."""
    if not list_file:
        return
    try:
        summary["list_lines"] = write_plan_list(p, list_file, sealed=sealed)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        summary["list_error"] = f"could not write the list of creates to {list_file}: {why}"
        logger().warning("%s", summary["list_error"])


def target_name(summary: dict[str, Any]) -> str:
    """How a restore's or failover's target is named for people: the saved block's name when the
    run was given one, else its URL without credentials."""
    return str(summary.get("target_block") or summary.get("target") or "target")


def run_key(kind: str, summary: dict[str, Any]) -> str:
    """``restore-<source>-to-<target>`` / ``failover-<source>-to-<target>``: the source's name
    (as its backups record it) and the target's block name (else its URL, slugged), so the
    artifact page shows each pair's latest run."""
    return report.artifact_key(kind, naming.slug(str(summary.get("source") or "archive")), "to",
                               naming.slug(target_name(summary)))


def conflict_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """The conflicts table: each conflicting key's path and kind, never a value."""
    late = set(summary.get("replay_conflict_paths") or [])
    return [{"path": p, "kind": "appeared during the restore with another value (kept)" if p in late
             else "exists with another value (kept)"} for p in summary.get("conflict_paths") or []]


def outcome_line(kind: str, summary: dict[str, Any]) -> str:
    """The artifact's first line: ``failover of dc-us into dc-eu: done, RPO 12 m, RTO 18 s, 3
    conflicts left, approved by A. Name``."""
    source, target = summary.get("source") or "an archive", target_name(summary)
    line = f"{kind} of {source} into {target}: {report.done_word(summary)}"
    if summary.get("status") == "failed":
        return line
    if summary.get("dry_run"):
        return (line + f", {report.count(summary.get('planned_create'), 'key')} to create, "
                f"{report.count(summary.get('conflicts'), 'conflict')}")
    if kind == "failover":
        line += f", RPO {report.seconds(summary.get('rpo_s'))}, RTO {report.seconds(summary.get('rto_s'))}"
    else:
        line += f", {report.count(summary.get('created'), 'key')} created"
    line += f", {report.count(summary.get('conflicts'), 'conflict')} left"
    approval = summary.get("approval")
    if isinstance(approval, dict) and approval.get("approved"):
        line += f", approved by {approval.get('approver')}"
    if kind != "failover":
        line += f", {report.seconds(summary.get('duration_s'))}"
    return line


#: Summary fields the artifact shows elsewhere than in its facts table.
_SHOWN_APART = ("status", "error", "steps_s", "preflight", "skipped", "warnings", "list_error")


def publish_summary(kind: str, summary: dict[str, Any], lists: dict[str, list[str]], dry_run: bool, *,
                    steps: list[tuple[str, str, float]] | None = None, preflight: list[str] | None = None) -> None:
    """The artifacts of a restore or failover run: the markdown (outcome line, steps, preflight,
    facts, lists of paths), and the conflicts and skipped archives as table artifacts."""
    key = run_key(kind, summary)
    facts = {k: v for k, v in summary.items() if not k.endswith("_paths") and k not in _SHOWN_APART}
    skipped = [dict(zip(("archive", "reason"), s.split(": ", 1), strict=False)) for s in summary.get("skipped") or []]
    shown = {h: v for h, v in lists.items() if h not in ("Conflicts (kept as they are)", "Preflight", "Archives skipped")}
    notes = {}
    if summary.get("conflict_paths"):
        notes["Conflicts"] = (f"{report.count(summary.get('conflicts'), 'key')} kept as they are, by path and kind in "
                              f"the table artifact {key}-conflicts")
    if skipped:
        notes["Archives skipped"] = f"{len(skipped)}, with their reasons in the table artifact {key}-skipped"
    report.publish(
        key, outcome_line(kind, summary),
        facts, steps=steps, preflight=preflight, lists=shown, notes=notes,
        tables={"conflicts": (f"{kind}: conflicts left as they are (path and kind, never values)", conflict_rows(summary)),
                "skipped": (f"{kind}: archives skipped, and why", skipped)},
    )
