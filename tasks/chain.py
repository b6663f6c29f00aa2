"""Chain: read a source's change segments (authenticated, bound to their names), link them into
chains, choose what a point in time needs, and materialize the state at that point as a
private archive that the restore's plan reads like any other (burrow/segments.py holds the
rules; docs/FORMAT.md, "Change segments").

Nothing here writes to a cluster. Every segment a point needs is read whole, every check of an
archive plus the chain's links passing, before the state archive is finished: a tampered,
reordered, missing or foreign segment stops the restore before its plan starts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from blocks.store import ArchiveStore, open_stored
from burrow import segments
from burrow.archive import ArchiveReader, ArchiveWriter
from burrow.crypto import ArchiveKeys, StreamEncryptor
from burrow.errors import ArchiveError, StoreError, should_retry
from burrow.keys import SymmetricKey, WriteKeys
from burrow.records import Record
from burrow.runlog import logger
from burrow.segments import Chain, Point, Segment
from burrow.staging import scratch_writes
from tasks import task
from tasks.catalog import describe_archives, select_archives


@dataclass
class Chains:
    """A source's segments as chains, the problems found linking them, and the segments that
    could not be read or authenticated (``bad``: url and why)."""

    chains: list[Chain]
    problems: list[str]
    bad: list[tuple[str, str]]

    def window(self) -> segments.Window:
        return segments.window(self.chains)


def read_segment(store: ArchiveStore, name: str, keys: ArchiveKeys | None, *, authenticate: bool,
                 allow_unencrypted: bool = False) -> Segment:
    """One segment's chain fields from its manifest (a ranged read): the archive's framing and
    manifest checksum, its binding to ``name`` and, when ``authenticate``, its manifest MAC
    under ``keys`` (an unencrypted segment is refused then, unless ``allow_unencrypted``)."""
    with open_stored(store, name) as reader:
        if authenticate:
            reader.check_downgrade(keys, allow_unencrypted=allow_unencrypted)
            reader.check_metadata(keys)
        if reader.check_binding(name) is not True:
            raise ArchiveError(f"{store.url(name)} is not bound to its name")
        return Segment.from_manifest(name, store.url(name), reader.manifest)


def read_chains(store: ArchiveStore, source_name: str, keys: ArchiveKeys | None, *,
                allow_unencrypted: bool = False) -> Chains:
    """Every segment of ``source_name`` in ``store``, linked. Segments are authenticated when
    ``keys`` hold a key (a capture writing to public keys only reads them unauthenticated: it
    only continues the chain, and every restore authenticates it again)."""
    authenticate = bool(keys is not None and keys.keyring)
    infos = store.list(segments.segments_prefix(source_name))

    def one(name: str) -> Segment | tuple[str, str]:
        try:
            seg = read_segment(store, name, keys, authenticate=authenticate, allow_unencrypted=allow_unencrypted)
        except (ArchiveError, StoreError) as exc:
            return store.url(name), str(exc)
        if seg.source != source_name:
            return seg.url, f"a segment of source {seg.source!r}, not of {source_name!r} (moved in)"
        return seg

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="burrow-chain") as pool:
        got = list(pool.map(one, [i.name for i in infos if segments.is_segment_name(i.name)]))
    good = [g for g in got if isinstance(g, Segment)]
    bad = [g for g in got if not isinstance(g, Segment)]
    chains, problems = segments.build_chains(good)
    return Chains(chains, problems, bad)


def trusted_fulls(store: ArchiveStore, source_name: str, keys: ArchiveKeys, *,
                  allow_unencrypted: bool = False) -> list[dict[str, Any]]:
    """The source's full archives whose claims can be trusted (the one selector,
    tasks/catalog.py ``select_archives``), each with the ``position`` its manifest records."""
    rows = describe_archives(store, keys if keys.keyring else None)
    sel = select_archives(rows, source_name, keyed=bool(keys.keyring), allow_unencrypted=allow_unencrypted)
    out = []
    for row in sel.trusted:
        try:
            with open_stored(store, str(row["name"])) as reader:
                row = {**row, "position": segments.base_position(reader.manifest)}
        except (ArchiveError, StoreError):
            continue
        out.append(row)
    return out


def resolve_point(
    store: ArchiveStore, source_name: str, keys: ArchiveKeys, *, at_time: int | None = None,
    at_position: int | None = None, latest: bool = False, allow_unencrypted: bool = False,
) -> Point:
    """What restoring ``source_name`` to the point takes (burrow/segments.py ``choose``). A
    segment that cannot be read, is not bound to its name or is not authenticated refuses the
    restore: a chain with a hole in it has no trustworthy state after the hole."""
    found = read_chains(store, source_name, keys, allow_unencrypted=allow_unencrypted)
    if found.bad:
        url, why = found.bad[0]
        more = f" (and {len(found.bad) - 1} more)" if len(found.bad) > 1 else ""
        raise ArchiveError(f"the change chain of {source_name!r} holds a segment that is damaged, forged or "
                           f"moved in: {url}: {why}{more}; nothing was written")
    fulls = trusted_fulls(store, source_name, keys, allow_unencrypted=allow_unencrypted)
    point = segments.choose(found.chains, found.problems, fulls, source=source_name, at_time=at_time,
                            at_position=at_position, latest=latest)
    start = store.url(point.start_name) if point.start_name else "a resync"
    logger().info("point in time: %s + %d change segments; %s", start, len(point.segments), found.window().describe())
    return point


@task(name="resolve-point", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def resolve_point_task(
    store: ArchiveStore, source_name: str, keys: ArchiveKeys, at_time: int | None = None,
    at_position: int | None = None, latest: bool = False, allow_unencrypted: bool = False,
) -> Point:
    """Prefect task wrapper of :func:`resolve_point`."""
    return resolve_point(store, source_name, keys, at_time=at_time, at_position=at_position, latest=latest,
                         allow_unencrypted=allow_unencrypted)


def _segment_records(store: ArchiveStore, point: Point, keys: ArchiveKeys, workdir: Path,
                     allow_unencrypted: bool) -> Iterator[Record]:
    """The change records of the point's segments, in chain order, each segment downloaded and
    checked again as it is read (the manifest read now must be the one the chain was linked by)."""
    for i, seg in enumerate(point.segments):
        local = workdir / f"segment-{i:06d}.burrow"
        store.get(seg.name, local)
        try:
            with open(local, "rb") as f:
                reader = ArchiveReader(f, label=seg.url)
                reader.check_downgrade(keys, allow_unencrypted=allow_unencrypted)
                if reader.manifest.get("manifest_sha256") != seg.sha or reader.check_binding(seg.name) is not True:
                    raise ArchiveError(f"{seg.url} changed after its chain was checked (replaced meanwhile)")
                yield from reader.records(keys)
        finally:
            local.unlink(missing_ok=True)


def materialize_point(
    store: ArchiveStore, point: Point, base_path: Path | None, keys: ArchiveKeys, workdir: Path, *,
    allow_unencrypted: bool = False,
) -> tuple[str, ArchiveKeys, dict[str, Any]]:
    """Write the state at ``point`` (the start archive at ``base_path``, already validated, or
    none when the point starts from a resync segment, plus the point's changes) as a private
    archive in ``workdir``, encrypted under a key that lives only in this process. Returns its
    path, the keys that open it (for the plan) and its manifest. Any failed check of any
    segment raises before the archive is finished."""
    ephemeral = WriteKeys(mode="symmetric", recipients=[SymmetricKey.generate()], origin="point-in-time")
    state_keys = ArchiveKeys(ephemeral.keyring())
    out_path = workdir / "point-in-time.burrow"
    with contextlib.ExitStack() as stack:
        if base_path is not None:
            base = ArchiveReader(stack.enter_context(open(base_path, "rb")), label="the start archive")
            m, records = base.manifest, base.records(keys)
        else:
            first = point.segments[0]
            with open_stored(store, first.name) as reader:
                m, records = reader.manifest, iter(())
        with scratch_writes("point-in-time state", workdir):
            fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                writer = ArchiveWriter(out, service=m["service"], encryptor=StreamEncryptor(ephemeral))
                changes = _segment_records(store, point, keys, workdir, allow_unencrypted)
                for record in segments.materialize(records, changes, point, workdir):
                    writer.add(record)
                manifest = writer.finish({
                    "service": m["service"], "source": m.get("source"), "source_url": m.get("source_url"),
                    "root": m.get("root", "/"), "point_in_time": True,
                    "service_info": {"start_archive": point.start_name, "segments": len(point.segments)},
                })
    logger().info("point in time: the state holds %d keys", manifest["keys"])
    return str(out_path), state_keys, manifest


@task(name="materialize-point")
def materialize(
    store: ArchiveStore, point: Point, base_path: str | None, keys: ArchiveKeys, workdir: str,
    allow_unencrypted: bool = False,
) -> tuple[str, ArchiveKeys, dict[str, Any]]:
    """Prefect task wrapper of :func:`materialize_point`."""
    return materialize_point(store, point, Path(base_path) if base_path else None, keys, Path(workdir),
                             allow_unencrypted=allow_unencrypted)


def prune_chains(
    store: ArchiveStore, sources: list[str], remaining: set[str], keys: ArchiveKeys | None, keep_within: timedelta,
    *, dry_run: bool = False, now: datetime | None = None,
) -> list[tuple[str, str]]:
    """Delete the change segments no kept full archive needs (``prune --keep-changes-within``):
    per source, every chain but the newest (which a capture may be continuing) whose base
    archive is not among ``remaining`` (the archives this prune keeps) or whose end is older than
    ``keep_within``. A chain goes from its last segment back to its first, so one a delete
    refused (Object Lock) or that an interruption stopped is still a whole chain from its start.
    Without a key nothing is deleted: a segment's manifest must be authenticated first, as an
    archive's is. Returns ``(url, reason)`` of each segment deleted (or, with ``dry_run``, that
    would be)."""
    log = logger()
    now = now or datetime.now(UTC)
    cutoff = int((now - keep_within).timestamp() * 1_000_000)
    out: list[tuple[str, str]] = []
    for source in sources:
        found = read_chains(store, source, keys)
        if len(found.chains) < 2:
            continue
        if keys is None or not keys.keyring:
            log.warning("prune: the change segments of %s are kept: no read key to authenticate them", source)
            continue
        newest = max(found.chains, key=lambda c: (c.last.last_time, c.last.name))
        for chain in found.chains:
            if chain is newest:
                continue
            if chain.first.base_name not in remaining:
                why = f"change segment of a chain whose base archive {chain.first.base_name} is not kept"
            elif chain.last.last_time < cutoff:
                why = "change segment older than --keep-changes-within"
            else:
                continue
            for seg in reversed(chain.segments):
                if not dry_run:
                    try:
                        store.delete(seg.name)
                    except StoreError as exc:
                        log.warning("prune: keeping %s: %s", seg.url, exc)
                        break
                log.info("prune: %s %s: %s", "would delete" if dry_run else "deleted", seg.url, why)
                out.append((seg.url, why))
    return out


@task(name="prune-changes", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def prune_changes(
    store: ArchiveStore, sources: list[str], remaining: set[str], keys: ArchiveKeys | None, keep_within: str = "7d",
    dry_run: bool = False,
) -> list[tuple[str, str]]:
    """Prefect task wrapper of :func:`prune_chains` (``keep_within``: a duration, ``7d``)."""
    from burrow.naming import parse_duration

    return prune_chains(store, sources, remaining, keys, parse_duration(keep_within, "--keep-changes-within"),
                        dry_run=dry_run)
