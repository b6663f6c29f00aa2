"""Retention: decide which archives a prune removes, and remove them.

Per source, the newest ``keep_last`` archives are always kept (never fewer than one), and of the
rest only those older than ``max_age_days`` (when given) are removed. Archives whose manifest
cannot be read are reported and never deleted automatically.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from blocks.store import ArchiveStore
from burrow.errors import ArchiveNotFound, UsageError, should_retry
from burrow.runlog import logger


def _created(row: dict[str, Any]) -> datetime:
    text = row.get("created") or row.get("modified") or "1970-01-01T00:00:00Z"
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def select_expired(
    rows: list[dict[str, Any]],
    *,
    keep_last: int,
    max_age_days: float | None = None,
    source: str | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """The catalog rows (from tasks.catalog.describe_archives) that retention removes."""
    if keep_last < 1:
        raise UsageError("keep_last must be at least 1: a prune never removes a source's newest archive")
    now = now or datetime.now(UTC)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("error") or not row.get("source"):
            continue
        if source is not None and row["source"] != source:
            continue
        groups[row["source"]].append(row)
    expired = []
    for group in groups.values():
        group.sort(key=_created, reverse=True)
        for row in group[keep_last:]:
            if max_age_days is None or now - _created(row) > timedelta(days=max_age_days):
                expired.append(row)
    return expired


@task(name="delete-archive", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry, cache_policy=NO_CACHE)
def delete_archive(store: ArchiveStore, name: str) -> None:
    """Remove one archive from its store (a transient StoreUnavailable is retried)."""
    try:
        store.delete(name)
    except ArchiveNotFound:
        if task_run.get_run_count() <= 1:
            raise
        # A retry after a transient failure: the failed attempt's delete went through after all.
        logger().info("prune: %s is gone (removed by the attempt that reported an error)", store.url(name))
        return
    logger().info("prune: deleted %s", store.url(name))
