"""The prune flow: apply a retention policy to a store."""

from __future__ import annotations

from typing import Any

from prefect.runtime import flow_run

from blocks.keys import archive_keys
from blocks.resolve import store_from_ref
from blocks.retention import RetentionPolicy
from burrow import naming, report
from burrow.errors import ArchiveNotFound, StoreError, StoreUnavailable, UsageError
from burrow.runlog import logger
from flows.common import Ref, burrow_flow, recorded_run, store_block_name
from tasks.catalog import catalog
from tasks.chain import prune_changes
from tasks.journal import stale_journal_records
from tasks.markers import annotate_task, archive_of
from tasks.retention import (
    block_sources,
    delete_archive,
    iter_reauthenticated,
    lock_reason,
    plan_retention,
    reauthenticate_task,
)
from tasks.verify import VERIFIED_INFIX


def _run_name() -> str:
    return f"prune-{naming.slug(str(flow_run.parameters.get('store', 'store')))}-{naming.stamp()}"


@burrow_flow(name="prune", flow_run_name=_run_name, persist_result=False)
def prune(
    store: Ref,
    keep_last: int | None = None,
    keep_hourly: int | None = None,
    keep_daily: int | None = None,
    keep_weekly: int | None = None,
    keep_monthly: int | None = None,
    keep_yearly: int | None = None,
    keep_within: str | None = None,
    policy_block: str | None = None,
    max_age_days: float | None = None,
    source: str | None = None,
    dry_run: bool = False,
    key_files: list[str] | None = None,
    identity_files: list[str] | None = None,
    passphrase_env: str | None = None,
    key_env: str | None = None,
    key_block: str | None = None,
    keep_changes_within: str = "7d",
) -> dict[str, Any]:
    """Apply a GFS retention policy to ``store``: the ``keep_*`` parameters, or a saved
    RetentionPolicy block (``policy_block``); with neither, ``keep_last=24``. Per source the
    newest trusted archive is always kept; unreadable, future-dated, unauthenticated (when a
    read key is configured) and Object-Locked archives are never deleted. Before deleting, the
    manifests of the archives to delete and of each source's newest are re-read and
    authenticated in this run (tasks/retention.py ``reauthenticate``): one that fails is kept and
    reported, and a source whose newest fails loses nothing. A source's newest archive whose
    rehearsal passed (by an authenticated marker) is kept too (``keep-rehearsed``). An archive's
    rehearsal markers go with it. Change segments (restore to a point) go when no kept archive
    needs them or they ended before ``keep_changes_within``, from the start of their chain up to
    a segment it can start from without them (tasks/chain.py ``prune_chains``); they are decided
    first, as if the archives to delete were gone, and an archive a chain still starts from is
    left alone. A segment under Object Lock is left alone, and listed, as an archive is.
    Returns the summary, with the rule(s) that kept every archive and the reason for
    every deletion."""
    log = logger()
    # the event's resource: the one source pruned, or every source of the store
    summary: dict[str, Any] = {"status": "failed", "source": source or "all", "store": store, "dry_run": dry_run}
    deleted: list[str] = []
    left_alone: list[str] = []
    kept: list[str] = []

    def _publish() -> None:
        summary["deleted_urls"] = [u.split(": ", 1)[0] for u in deleted]
        # a prune that failed part way still says what it deleted, and why (the evidence report
        # attributes those deletions to this run rather than to someone outside prune)
        summary.setdefault("deleted_because", dict(d.split(": ", 1) for d in deleted if ": " in d))
        outcome = f"prune of {naming.redact_url(store)}: {report.done_word(summary)}"
        if summary.get("status") != "failed":
            outcome += (f", {summary.get('deleted', 0):,} of {report.count(summary.get('archives'), 'archive')} "
                        f"{'would be deleted' if dry_run else 'deleted'}, {summary.get('kept', 0):,} kept, "
                        f"{summary.get('left_alone', 0):,} left alone")
            if summary.get("changes_deleted") or summary.get("changes_left_alone"):
                outcome += (f"; {report.count(summary.get('changes_deleted'), 'change segment')} "
                            f"{'would be deleted' if dry_run else 'deleted'}, "
                            f"{len(summary.get('changes_left_alone') or {}):,} left alone")
        report.publish(
            f"prune-{naming.slug(store_block_name(store) or naming.redact_url(store))}",
            outcome,
            {k: v for k, v in summary.items()
             if k not in ("deleted_urls", "kept_because", "deleted_because", "not_reauthenticated", "status", "error",
                          "changes_deleted_because", "changes_left_alone")},
            lists={("Would delete" if dry_run else "Deleted"): deleted, "Left alone (never deleted)": left_alone,
                   "Kept: could not be re-authenticated for this run": [
                       f"{u}: {why}" for u, why in (summary.get("not_reauthenticated") or {}).items()],
                   "Kept, and by which rule": kept},
            tables={"deletions": ("prune: archives " + ("that would be deleted" if dry_run else "deleted") + ", and why",
                                  [dict(zip(("archive", "reason"), d.split(": ", 1), strict=False)) for d in deleted])},
        )

    with recorded_run("prune", summary, _publish):
        st = store_from_ref(store)
        fields = dict(keep_last=keep_last, keep_hourly=keep_hourly, keep_daily=keep_daily, keep_weekly=keep_weekly,
                      keep_monthly=keep_monthly, keep_yearly=keep_yearly, keep_within=keep_within)
        if policy_block:
            if any(v is not None for v in fields.values()):
                raise UsageError("give either a retention policy block or keep-* rules, not both")
            try:
                policy = RetentionPolicy.load(policy_block)
            except (ValueError, RuntimeError):
                raise UsageError(f"no saved retention-policy block named {policy_block!r}") from None
        else:
            if all(v is None for v in fields.values()):
                fields["keep_last"] = 24
            policy = RetentionPolicy(**fields)
        policy.within()  # a malformed duration is a usage error before anything is read
        if keep_last is not None and keep_last < 1 and not policy_block:
            raise UsageError("keep_last must be at least 1: a prune never removes a source's newest archive")
        keys = archive_keys(key_files, identity_files, passphrase_env, key_env, key_block)
        keyed = bool(keys.keyring)
        rows = catalog(st, keys if keyed else None)
        # each archive's authenticated rehearsal: the newest that passed is kept (keep-rehearsed)
        rows = annotate_task(st, rows, keys if keyed else None)
        decision = plan_retention(rows, policy, keyed=keyed, source=source, max_age_days=max_age_days,
                                  locked=lambda row: lock_reason(st, row["name"]))
        not_reauthenticated: dict[str, str] = {}
        if decision.delete:
            targets = [r for r, _ in decision.delete] + list(decision.newest.values())
            if not keyed and any(r.get("encrypted") for r in targets):
                raise UsageError(
                    "prune deletes only archives whose manifests it authenticated, and these are encrypted: pass the "
                    "read key (--key-file, --identity, --passphrase-env or --key-block); nothing was deleted"
                )
            # each source's newest first: if it fails, nothing of that source is deleted
            verdicts = reauthenticate_task(st, list(decision.newest.values()), keys if keyed else None)
            for row, why in block_sources(decision, verdicts):
                log.warning("prune: keeping %s: %s", row["url"], why)
                not_reauthenticated[row["url"]] = why
            if not keyed:
                log.warning("prune: no read key: the manifests were re-read and checked against their names, "
                            "but an unencrypted archive's manifest cannot be authenticated")
        # change segments first, as if the archives planned for deletion were gone: a chain loses
        # what no kept archive needs and what ended before keep_changes_within (up to a segment
        # it can start from without them), and an archive a chain still starts from stays
        planned = {str(r["name"]) for r, _ in decision.delete}
        remaining = {str(r["name"]) for r in rows if not r.get("error")} - planned
        sources = sorted({str(r["source"]) for r in rows if r.get("source") and not r.get("error")
                          and (source is None or r.get("source") == source)})
        changes = prune_changes(st, sources, remaining, keys if keyed else None, keep_changes_within, dry_run, rows)
        if changes.protect:
            held = [(r, changes.protect[str(r["name"])]) for r, _ in decision.delete if str(r["name"]) in changes.protect]
            decision.delete = [(r, why) for r, why in decision.delete if str(r["name"]) not in changes.protect]
            decision.left_alone.extend(held)
        for row, why in decision.left_alone:
            log.warning("prune: leaving %s alone: %s", row["url"], why)
            left_alone.append(f"{row['url']}: {why}")
        for url, rules in decision.keep.items():
            kept.append(f"{url}: {'; '.join(rules)}")
        markers = _markers(st) if decision.delete and not dry_run else {}
        markers_deleted = 0
        done: list[tuple[dict[str, Any], str]] = []
        # every archive is re-read and authenticated just before it is deleted (the re-reads run
        # ahead of the deletes, several at once); one that fails is kept and reported
        for row, why, problem in iter_reauthenticated(st, decision.delete, keys if keyed else None):
            if problem is not None:
                log.warning("prune: keeping %s: %s", row["url"], problem)
                not_reauthenticated[row["url"]] = problem
                decision.left_alone.append((row, problem))
                left_alone.append(f"{row['url']}: {problem}")
                continue
            if not dry_run:
                delete_archive(st, row["name"])
                markers_deleted += _delete_markers(st, markers.get(row["name"], []))
            log.info("prune: %s %s: %s", "would delete" if dry_run else "deleted", row["url"], why)
            deleted.append(f"{row['url']}: {why}")
            done.append((row, why))
        decision.delete = done
        # stray uploads: engineer C (the sweep moves here from the backup path)
        aborted = []
        if not dry_run and hasattr(st, "abort_stray_uploads"):
            aborted = st.abort_stray_uploads()
        journal_removed = 0 if dry_run else _remove_stale_journal(st, keys if keyed else None)
        summary.update(
            status="ok", policy=policy.describe(), archives=len(rows), deleted=len(deleted), kept=len(decision.keep),
            left_alone=len(left_alone), unreadable=sum(1 for r in rows if r.get("error")),
            locked=sum(1 for _, why in decision.left_alone if "Object Lock" in why),
            stray_uploads_aborted=len(aborted), journal_records_removed=journal_removed, max_age_days=max_age_days, markers_deleted=markers_deleted,
            authenticated=keyed, not_reauthenticated=not_reauthenticated,
            kept_because={u: rules for u, rules in decision.keep.items()},
            deleted_because={r["url"]: why for r, why in decision.delete},
            changes_deleted=len(changes.deleted), changes_locked=changes.locked,
            changes_deleted_because=dict(changes.deleted), changes_left_alone=dict(changes.left_alone),
        )
        # the artifact lists the segments with their reasons, as it lists archives
        deleted.extend(f"{url}: {why}" for url, why in changes.deleted)
        left_alone.extend(f"{url}: {why}" for url, why in changes.left_alone)
        return summary


def _markers(st: Any) -> dict[str, list[str]]:
    """The rehearsal markers of the store by archive name (one listing for the whole prune)."""
    try:
        names = st.list_sidecars()
    except (StoreError, StoreUnavailable, NotImplementedError) as exc:
        logger().warning("prune: cannot list the rehearsal markers (%s); those of deleted archives are left", exc)
        return {}
    by: dict[str, list[str]] = {}
    for name in names:
        archive = archive_of(name)
        if archive is None and VERIFIED_INFIX in name:  # the backup's verification record goes with it too
            archive = name.rpartition(VERIFIED_INFIX)[0] or None
        if archive is not None:
            by.setdefault(archive, []).append(name)
    return by


def _delete_markers(st: Any, names: list[str]) -> int:
    """Remove a deleted archive's markers (a marker of no archive would only mislead); a
    failure is logged, never fails the prune."""
    n = 0
    for name in names:
        try:
            st.delete_sidecar(name)
            n += 1
        except ArchiveNotFound:
            pass
        except (StoreError, StoreUnavailable) as exc:
            logger().warning("prune: the rehearsal marker %s was not removed: %s", name, exc)
    return n


def _remove_stale_journal(st: Any, keys: Any) -> int:
    """Remove the failover journal records that no failover would resume: unauthenticated,
    bound elsewhere or expired (tasks/journal.py). Needs a secret key to tell them apart; a
    failure is logged, never fails the prune."""
    n = 0
    try:
        names = stale_journal_records(st, keys)
    except (StoreError, StoreUnavailable) as exc:
        logger().warning("prune: cannot list the failover journal (%s); stale records are left", exc)
        return 0
    for name in names:
        try:
            st.delete_sidecar(name)
            n += 1
        except (StoreError, StoreUnavailable, ArchiveNotFound) as exc:
            logger().warning("prune: a stale failover journal record was not removed: %s", exc)
    if n:
        logger().info("prune: removed %d stale failover journal record(s)", n)
    return n
