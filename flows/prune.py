"""The prune flow: apply a retention policy to a store."""

from __future__ import annotations

from typing import Any

from prefect.runtime import flow_run

from blocks.resolve import store_from_ref
from burrow import naming, report
from burrow.runlog import logger
from flows.common import Ref, burrow_flow
from tasks.catalog import catalog
from tasks.retention import delete_archive, select_expired


def _run_name() -> str:
    return f"prune-{naming.slug(str(flow_run.parameters.get('store', 'store')))}-{naming.stamp()}"


@burrow_flow(name="prune", flow_run_name=_run_name, persist_result=False)
def prune(
    store: Ref,
    keep_last: int = 24,
    max_age_days: float | None = None,
    source: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Delete archives beyond the newest ``keep_last`` per source (and older than
    ``max_age_days`` when given). Returns the run summary."""
    log = logger()
    summary: dict[str, Any] = {"status": "failed", "store": store, "dry_run": dry_run}
    deleted: list[str] = []
    unreadable: list[str] = []

    def _publish() -> None:
        summary["deleted_urls"] = deleted
        report.publish(
            f"prune-{naming.slug(store)}",
            f"Burrow prune of {store}: {summary['status']}",
            {k: v for k, v in summary.items() if k != "deleted_urls"},
            {("Would delete" if dry_run else "Deleted"): deleted, "Unreadable (kept)": unreadable},
        )

    with report.recorded(summary, _publish):
        st = store_from_ref(store)
        rows = catalog(st)
        unreadable = [r["url"] for r in rows if r.get("error")]
        for url in unreadable:
            log.warning("prune: %s has an unreadable manifest and is left alone", url)
        expired = select_expired(rows, keep_last=keep_last, max_age_days=max_age_days, source=source)
        for row in expired:
            if not dry_run:
                delete_archive(st, row["name"])
            deleted.append(row["url"])
        summary.update(
            status="ok", archives=len(rows), deleted=len(deleted), kept=len(rows) - len(deleted),
            keep_last=keep_last, max_age_days=max_age_days, unreadable=len(unreadable),
        )
        return summary
