"""Plan: decide, for every archived key, whether the target needs it created, already has
it identical, or holds something different (a conflict). Writes the creates, parents first,
to a private spool for replay. Writes nothing to the cluster; --dry-run stops here."""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.source import SourceBlock, SourceSession
from burrow import progress
from burrow.archive import ArchiveReader, BodyDecryptor
from burrow.errors import should_retry
from burrow.paths import KeyMapper, folded_folder, translate
from burrow.perf import gc_paused
from burrow.records import Record, display_key, encode_record
from burrow.runlog import logger

BATCH = 1000
KNOWN_LIMIT = 200_000
LIST_LIMIT = 1000
MISSING, PRESENT = 0, 1


@dataclass
class Plan:
    """The outcome of planning a restore."""

    ops_path: str
    target: str
    to_create: int = 0
    intermediate: int = 0
    identical: int = 0
    conflicts: int = 0
    outside_subtree: int = 0
    conflict_paths: list[str] = field(default_factory=list)
    create_paths: list[str] = field(default_factory=list)
    dropped_metadata: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class _Known:
    """A bounded memory of which target keys exist (or will be created)."""

    def __init__(self, limit: int = KNOWN_LIMIT) -> None:
        self.limit = limit
        self.data: OrderedDict[bytes, int] = OrderedDict()

    def get(self, key: bytes) -> int | None:
        return self.data.get(key)

    def set(self, key: bytes, state: int) -> None:
        self.data[key] = state
        self.data.move_to_end(key)
        if len(self.data) > self.limit:
            self.data.popitem(last=False)


class Planner:
    """Streams archived records against a live target in batches."""

    def __init__(self, session: SourceSession, source_service: str, out: Any, plan: Plan) -> None:
        self.session = session
        self.source_service = source_service
        self.out = out
        self.plan = plan
        self.known = _Known()

    def _ancestors(self, key: bytes, batch_keys: set[bytes]) -> list[bytes]:
        """Missing-or-unknown ancestors of ``key`` not in this batch, top-down."""
        chain = []
        parent = self.session.parent_key(key)
        while parent is not None and parent not in batch_keys and self.known.get(parent) is None:
            chain.append(parent)
            parent = self.session.parent_key(parent)
        chain.reverse()
        return chain

    def run_batch(self, records: list[Record]) -> None:
        batch_keys = {r.key for r in records}
        items: list[tuple[Record, bool]] = []  # (record, is_intermediate)
        seen_intermediate: set[bytes] = set()
        seen: set[bytes] = set()
        for r in records:
            # A record marked intermediate (a folder key folded onto its directory's node)
            # only needs its key to exist: skip it when the key is already planned or known.
            marked = bool(r.meta.get("intermediate"))
            if marked and (r.key in seen or r.key in seen_intermediate or self.known.get(r.key) is not None):
                continue
            for a in self._ancestors(r.key, batch_keys):
                if a not in seen_intermediate:
                    seen_intermediate.add(a)
                    items.append((Record(a, b"", {"intermediate": True}), True))
            seen.add(r.key)
            items.append((r, marked))
        # A key whose parent is known to be missing is missing too: no need to ask.
        need = []
        for r, _ in items:
            parent = self.session.parent_key(r.key)
            if parent is None or self.known.get(parent) != MISSING:
                need.append(r.key)
        found = dict(zip(need, self.session.lookup(need), strict=True)) if need else {}
        plan = self.plan
        for r, intermediate in items:
            current = found.get(r.key)  # keys not looked up sit below a missing parent
            if current is None:
                self.known.set(r.key, MISSING)
                if intermediate:
                    plan.intermediate += 1
                else:
                    plan.to_create += 1
                if len(plan.create_paths) < LIST_LIMIT:
                    plan.create_paths.append(display_key(r.key) + (" (intermediate)" if intermediate else ""))
                self.out.write(encode_record(r))
            else:
                self.known.set(r.key, PRESENT)
                if intermediate:
                    continue
                if current == r.value:
                    plan.identical += 1
                else:
                    plan.conflicts += 1
                    if len(plan.conflict_paths) < LIST_LIMIT:
                        plan.conflict_paths.append(display_key(r.key))


@gc_paused
def plan_restore(
    archive_path: Path,
    target: SourceBlock,
    workdir: Path,
    *,
    subtree: str | None = None,
    maps: list[str] | None = None,
    decryptor: BodyDecryptor | None = None,
) -> Plan:
    """Classify every archived key against ``target``; write the creates to a spool."""
    log = logger()
    started = time.monotonic()
    mapper = KeyMapper(subtree, maps)
    ops_path = workdir / "plan.jsonl"
    plan = Plan(ops_path=str(ops_path), target=target.describe())
    session = target.connect()
    try:
        fd = os.open(ops_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(archive_path, "rb") as f, os.fdopen(fd, "wb") as out:
            reader = ArchiveReader(f)
            source_service = reader.manifest["service"]
            planner = Planner(session, source_service, out, plan)
            batch: list[Record] = []
            with progress.stage("plan", total=reader.manifest.get("keys")) as advance:
                for rec in reader.records(decryptor):
                    advance(1)
                    key = mapper(rec.key)
                    if key is None:
                        plan.outside_subtree += 1
                        continue
                    mapped, key = key, translate(key, source_service, target.service)
                    prepared, dropped = session.prepare(Record(key, rec.value, rec.meta), source_service)
                    if not prepared.value and folded_folder(mapped, key):
                        prepared.meta["intermediate"] = True
                    for d in dropped:
                        plan.dropped_metadata[d] = plan.dropped_metadata.get(d, 0) + 1
                    batch.append(prepared)
                    if len(batch) >= BATCH:
                        planner.run_batch(batch)
                        batch = []
                if batch:
                    planner.run_batch(batch)
    finally:
        session.close()
    plan.seconds = time.monotonic() - started
    log.info(
        "plan: %d to create (+%d intermediate), %d identical, %d conflicts, %d outside subtree, in %.2fs",
        plan.to_create, plan.intermediate, plan.identical, plan.conflicts, plan.outside_subtree, plan.seconds,
    )
    for name, n in sorted(plan.dropped_metadata.items()):
        log.warning("plan: %s cannot be carried over to %s for %d keys", name, target.service, n)
    return plan


@task(name="plan", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry, cache_policy=NO_CACHE)
def plan(
    archive_path: str,
    target: SourceBlock,
    workdir: str,
    subtree: str | None = None,
    maps: list[str] | None = None,
    decryptor: BodyDecryptor | None = None,
) -> Plan:
    """Prefect task wrapper of :func:`plan_restore`."""
    return plan_restore(Path(archive_path), target, Path(workdir), subtree=subtree, maps=maps, decryptor=decryptor)
