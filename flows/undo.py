"""The undo flow: delete exactly the keys a restore or failover created, each only if unchanged
since (tasks/undo.py). A flow like the others, so an undo has its run history, its artifact and
its ``burrow.undo.completed`` / ``burrow.undo.failed`` event."""

from __future__ import annotations

from typing import Any

from prefect.runtime import flow_run

from blocks.keys import archive_keys
from blocks.resolve import source_from_ref, store_from_ref
from burrow import naming, report
from burrow.errors import UsageError
from burrow.staging import staging_dir
from flows.common import Ref, burrow_flow, recorded_run, source_lock
from flows.restore import target_lock_name
from tasks.undo import LIST_LIMIT, load_undo, undo_task


def _run_name() -> str:
    p = flow_run.parameters
    kind = "undo-dry-run" if p.get("dry_run") else "undo"
    return f"{kind}-{naming.slug(str(p.get('run', 'run')))}-{naming.stamp()}"


@burrow_flow(name="undo", flow_run_name=_run_name, persist_result=False)
def undo(
    run: str,
    store: Ref,
    into: Ref | None = None,
    dry_run: bool = False,
    key_files: list[str] | None = None,
    identity_files: list[str] | None = None,
    passphrase_env: str | None = None,
    key_env: str | None = None,
    key_block: str | None = None,
) -> dict[str, Any]:
    """Undo the restore or failover ``run`` (its flow run name or id): delete, deepest first,
    the keys it created and that are unchanged since (their version is the one they were created
    with; a ZooKeeper node that gained children is kept too), from the list it sealed into
    ``store``. The list opens with the run's secret key (the key flags, else the BURROW_*
    environment). ``into``: the target, by URL with credentials or saved block name, when the
    recorded URL (without credentials) is not enough to connect; it must be the same cluster.
    ``dry_run`` deletes nothing and says what would be deleted.

    Returns the run summary: ``deleted`` and ``kept`` (> 0: keys changed since, kept as they are)."""
    summary: dict[str, Any] = {"status": "failed", "run": run, "dry_run": dry_run}
    lists: dict[str, list[str]] = {}

    def _publish() -> None:
        rows = {k: v for k, v in summary.items() if not k.endswith("_paths") and k not in ("status", "error")}
        outcome = f"undo of {summary.get('undone_run', run)}: {report.done_word(summary)}"
        if summary.get("status") != "failed":
            outcome += (f", {report.count(summary.get('deleted'), 'key')} {'to delete' if dry_run else 'deleted'}, "
                        f"{summary.get('kept', 0):,} kept (changed since)")
        report.publish(f"undo-{naming.slug(run)}", outcome, rows, lists=lists)

    with recorded_run("undo", summary, _publish):
        st = store_from_ref(store)
        summary["store"] = st.describe()
        keys = archive_keys(key_files, identity_files, passphrase_env, key_env, key_block)
        with staging_dir() as work:
            found = load_undo(st, run, keys if keys.keyring else None, str(work))
            summary.update(undone_run=found.run_name, undone_run_id=found.run_id, undone_kind=found.run_kind,
                           target=found.target, source=found.target, listed=found.keys)
            if found.warnings:
                summary["warnings"] = found.warnings
            target = source_from_ref(into or found.target, role="target")
            if target.describe() != found.target:
                raise UsageError(
                    f"run {found.run_name} created its keys in {found.target}, not in {target.describe()}: give "
                    "--into that cluster (a URL with credentials or a saved block of it), or leave --into out"
                )
            # As a restore, under the target's lock: a backup or restore of it on any worker waits.
            with source_lock(target_lock_name(into or found.target, target)):
                done = undo_task(found, target, dry_run=dry_run)
        summary.update(status="ok" if not done.kept else "ok-with-kept", deleted=done.deleted, kept=done.kept,
                       kept_paths=done.kept_paths)
        lists["Kept: changed since the run created them (first 1000)"] = done.kept_paths[:LIST_LIMIT]
        return summary

