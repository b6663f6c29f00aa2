"""Retention: decide which archives a prune removes (a GFS policy, see blocks.retention.RetentionPolicy), and
remove them.

Per source the newest trusted archive is always kept. Archives whose manifest cannot be read,
is dated in the future or (with a key configured) is not authenticated are reported and never
deleted or counted; archives under Object Lock are skipped with their retain-until date.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from blocks.retention import RetentionPolicy
from blocks.store import ArchiveStore
from burrow.errors import ArchiveNotFound, UsageError, should_retry
from burrow.runlog import logger
from tasks import task
from tasks.catalog import created_at, distrust

_PERIODS = {
    "keep_hourly": "%Y-%m-%d %H",
    "keep_daily": "%Y-%m-%d",
    "keep_weekly": "%G-W%V",
    "keep_monthly": "%Y-%m",
    "keep_yearly": "%Y",
}


@dataclass
class Decision:
    """What a prune does with every archive of the store, and why."""

    keep: dict[str, list[str]] = field(default_factory=dict)  # url -> the rules that keep it
    delete: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # row, reason
    left_alone: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # row, why it is not touched


def plan_retention(
    rows: list[dict[str, Any]],
    policy: RetentionPolicy,
    *,
    keyed: bool,
    source: str | None = None,
    max_age_days: float | None = None,
    now: datetime | None = None,
    locked: Any = None,
) -> Decision:
    """Decide, per source, which archives ``policy`` keeps and which it deletes.

    Never deleted, and never counted toward any rule: an archive whose manifest is unreadable,
    dated in the future, or (with a read key configured) not authenticated; and an archive
    under Object Lock (``locked(row)`` returns the reason). Always kept: the newest archive of
    each source that can be trusted (every archive in a store passed verification when it was
    written; a later failure makes it unreadable or unauthenticated, and so not the newest)."""
    now = now or datetime.now(UTC)
    within = policy.within()
    d = Decision()
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if source is not None and row.get("source") != source:
            continue
        why = distrust(row, keyed=keyed, now=now)
        if why is not None:
            d.left_alone.append((row, why))
            continue
        groups[str(row["source"])].append(row)
    for group in groups.values():
        group.sort(key=lambda r: (created_at(r), r["name"]), reverse=True)
        keep: dict[str, list[str]] = defaultdict(list)
        keep[group[0]["url"]].append("newest archive of its source")
        for rule, n in policy.rules():
            if rule == "keep_last":
                for r in group[:n]:
                    keep[r["url"]].append(f"keep-last {n}")
                continue
            seen: list[str] = []
            for r in group:
                bucket = created_at(r).strftime(_PERIODS[rule])  # type: ignore[union-attr]
                if bucket in seen:
                    continue
                if len(seen) == n:
                    break
                seen.append(bucket)
                keep[r["url"]].append(f"{rule.replace('_', '-')} {n} ({bucket})")
        if within is not None:
            newest = created_at(group[0])
            for r in group:
                if newest - created_at(r) <= within:  # type: ignore[operator]
                    keep[r["url"]].append(f"keep-within {policy.keep_within}")
        for r in group:
            if r["url"] in keep:
                d.keep[r["url"]] = keep[r["url"]]
                continue
            if policy.empty():
                d.keep[r["url"]] = ["no retention rule given"]
                continue
            if max_age_days is not None and now - created_at(r) <= timedelta(days=max_age_days):  # type: ignore[operator]
                d.keep[r["url"]] = [f"younger than {max_age_days:g} days"]
                continue
            lock = locked(r) if locked is not None else None
            if lock:
                d.left_alone.append((r, lock))
                continue
            d.delete.append((r, f"kept by no rule ({policy.describe()})"))
    return d


def select_expired(
    rows: list[dict[str, Any]],
    *,
    keep_last: int,
    max_age_days: float | None = None,
    source: str | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """The catalog rows that a keep-last policy removes (see :func:`plan_retention`)."""
    if keep_last < 1:
        raise UsageError("keep_last must be at least 1: a prune never removes a source's newest archive")
    d = plan_retention(rows, RetentionPolicy(keep_last=keep_last), keyed=False, source=source,
                       max_age_days=max_age_days, now=now)
    return [r for r, _ in d.delete]


@task(name="delete-archive", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def delete_archive(store: ArchiveStore, name: str) -> None:
    """Remove one archive from its store (a transient StoreUnavailable is retried)."""
    from prefect.runtime import task_run  # a task run is under way: Prefect is loaded

    try:
        store.delete(name)
    except ArchiveNotFound:
        if task_run.get_run_count() <= 1:
            raise
        # A retry after a transient failure: the failed attempt's delete went through after all.
        logger().info("prune: %s is gone (removed by the attempt that reported an error)", store.url(name))
        return
    logger().info("prune: deleted %s", store.url(name))
