"""Retention: decide which archives a prune removes (a GFS policy, see blocks.retention.RetentionPolicy), and
remove them.

Per source the newest trusted archive is always kept, and so is the newest one whose rehearsal
passed (``keep-rehearsed``): the archive that proves the source restores, which a GFS rule left to
itself would delete once newer hourlies push it out (the prune flow annotates the catalog rows
with their authenticated rehearsal markers first: tasks/markers.py ``annotate``; a marker that is
not authenticated, or whose newest rehearsal FAILED, keeps nothing). Archives whose manifest cannot be read,
is not bound to its object name, is dated in the future or after it was stored, or (with a key
configured) is not authenticated are reported and never deleted or counted; archives under
Object Lock are skipped with their retain-until date.

The catalog a prune starts from may come from the catalog index, which anyone who can write to
the store can write. So a prune decides from bytes it authenticated itself, in this run
(:func:`reauthenticate`): before deleting, it re-reads by range the manifest of every archive it
would delete and of each source's newest, authenticates it with the read keys, checks its
binding to the object name and its time against the object's, and checks that it is the
manifest the catalog row described. An archive that fails is kept and reported; when a
source's newest fails, nothing of that source is deleted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from blocks.retention import RetentionPolicy
from blocks.store import ArchiveStore, open_stored
from burrow.archive import ArchiveReader
from burrow.crypto import ArchiveKeys
from burrow.errors import ArchiveError, ArchiveNotFound, StoreError, UsageError, should_retry
from burrow.runlog import logger
from tasks import task
from tasks.catalog import STORED_SKEW, UNBOUND, created_at, distrust, rehearsed, signed_order

#: The rule that keeps a source's newest archive whose rehearsal passed (and is authenticated).
KEEP_REHEARSED = "keep-rehearsed"

#: Manifests re-read at once (object stores answer one request at a time per connection).
REREAD_WORKERS = 8

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
    newest: dict[str, dict[str, Any]] = field(default_factory=dict)  # source -> its newest trusted row


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
    written; a later failure makes it unreadable or unauthenticated, and so not the newest), and
    the newest trusted archive of each source whose rehearsal passed, by an authenticated marker
    (``row["rehearsal"]``, set by tasks/markers.py ``annotate``; :data:`KEEP_REHEARSED`)."""
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
    for src, group in groups.items():
        group.sort(key=signed_order, reverse=True)
        d.newest[src] = group[0]
        keep: dict[str, list[str]] = defaultdict(list)
        keep[group[0]["url"]].append("newest archive of its source")
        proven = next((r for r in group if rehearsed(r)), None)
        if proven is not None:
            keep[proven["url"]].append(f"{KEEP_REHEARSED} (rehearsal passed at {proven['rehearsal'].get('at')})")
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


def lock_reason(store: Any, name: str) -> str | None:
    """Why the object ``name`` of ``store`` cannot be deleted now: it is under Object Lock until
    its retain-until date (None: it is not, or the store has no Object Lock). The one rule prune
    applies to archives and change segments alike: what it names is left alone, never deleted."""
    locked_until = getattr(store, "locked_until", None)
    if locked_until is None:
        return None
    until = locked_until(name)
    return f"under Object Lock until {until:%Y-%m-%dT%H:%M:%SZ}" if until else None


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


def reauthenticate(store: ArchiveStore, rows: list[dict[str, Any]], keys: ArchiveKeys | None) -> dict[str, str | None]:
    """Re-read the manifest of every row's archive by range, now, and say per URL why it may
    not be acted on (None: it may). With ``keys`` the manifest must be encrypted and its MAC
    must check; without, an encrypted archive cannot be checked at all (the caller refuses
    before), an unencrypted one is checked for integrity only. Either way the manifest must be
    bound to the row's object name, not be dated after the object was stored, and be the one
    the row (perhaps from the catalog index) described: same manifest_sha256, source, created.

    A transient StoreUnavailable is raised (the task retries); any other failure to read is a
    reason to keep the archive."""
    unique = list({r["url"]: r for r in rows}.values())
    return {row["url"]: why for row, _, why in iter_reauthenticated(store, [(r, "") for r in unique], keys)}


def iter_reauthenticated(
    store: ArchiveStore, items: list[tuple[dict[str, Any], str]], keys: ArchiveKeys | None
) -> Iterator[tuple[dict[str, Any], str, str | None]]:
    """``(row, reason, why)`` for every ``(row, reason)`` of ``items``, in order, with ``why``
    as :func:`reauthenticate` says it. The re-reads run REREAD_WORKERS at a time ahead of the
    consumer, so a prune deleting each archive as its verdict comes in pays for the re-reads
    little more than the first one."""

    def check(item: tuple[dict[str, Any], str]) -> tuple[dict[str, Any], str, str | None]:
        row, reason = item
        try:
            with open_stored(store, row["name"], row.get("size")) as reader:
                return row, reason, _recheck(reader, row, keys)
        except (ArchiveError, StoreError) as exc:
            return row, reason, f"cannot be re-read and authenticated: {exc}"

    if not items:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(REREAD_WORKERS, len(items))),
                            thread_name_prefix="burrow-reauth") as pool:
        yield from pool.map(check, items)


def _recheck(reader: ArchiveReader, row: dict[str, Any], keys: ArchiveKeys | None) -> str | None:
    if keys is not None and not reader.encrypted:
        return "unencrypted: its manifest cannot be authenticated"
    reader.check_metadata(keys)  # with a key: the MAC; without: the keyless checks (an encrypted one raises)
    bound = reader.check_binding(row["name"])  # raises when bound to another name
    if bound is False:
        return UNBOUND
    m = reader.manifest
    for name in ("manifest_sha256", "source", "created"):
        if m.get(name) != row.get(name):
            return f"its manifest's {name} is not the one the catalog listed (a stale or forged catalog index entry)"
    when = created_at(m)
    try:
        stored = datetime.fromisoformat(str(row.get("modified")).replace("Z", "+00:00"))
    except ValueError:
        stored = None
    if when is None or (stored is not None and when > stored + STORED_SKEW):
        return "dated after it was stored (its manifest is later than its object: replayed or forged)"
    return None


@task(name="reauthenticate", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def reauthenticate_task(store: ArchiveStore, rows: list[dict[str, Any]], keys: ArchiveKeys | None) -> dict[str, str | None]:
    """Prefect task wrapper of :func:`reauthenticate`."""
    return reauthenticate(store, rows, keys)


def block_sources(d: Decision, verdicts: dict[str, str | None]) -> list[tuple[dict[str, Any], str]]:
    """Move out of ``d.delete`` every archive of a source whose newest archive failed
    :func:`reauthenticate` (``verdicts`` by URL) into ``d.left_alone``: if the catalog's
    newest cannot be trusted, neither can its picture of what is older. Returns what is kept
    this way (the failed newest archives included, though they stay in ``d.keep``), with why."""
    moved: list[tuple[dict[str, Any], str]] = []
    blocked: dict[str, str] = {}
    for src, newest in d.newest.items():
        why = verdicts.get(newest["url"])
        if why is not None:
            blocked[src] = newest["url"]
            moved.append((newest, f"the newest archive of its source failed re-authentication: {why}"))
    keep: list[tuple[dict[str, Any], str]] = []
    for row, reason in d.delete:
        src = str(row.get("source"))
        if src in blocked:
            moved.append((row, f"nothing of source {src!r} is deleted: its newest archive by the catalog, "
                               f"{blocked[src]}, failed re-authentication"))
        else:
            keep.append((row, reason))
    d.delete = keep
    d.left_alone.extend((r, why) for r, why in moved if r["url"] not in d.keep)
    return moved


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
