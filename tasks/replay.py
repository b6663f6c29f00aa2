"""Replay: create the planned keys in the target, each create atomic and create-if-absent.

A key that appeared since planning is never overwritten: it is compared and counted as
identical or as a conflict."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from blocks.source import SourceBlock
from burrow import progress
from burrow.perf import gc_paused
from burrow.records import Record, display_key, read_records
from burrow.runlog import logger
from burrow.staging import open_spool_reader
from tasks import task
from tasks.plan import LIST_LIMIT, Plan

BATCH = 20_000  # records handed to the target at once (it pipelines them in transactions)
BATCH_BYTES = 32 * 1024 * 1024  # ... unless their values add up to this first


@dataclass
class Replayed:
    """What replay did."""

    created: int = 0
    intermediate_created: int = 0
    identical: int = 0
    conflicts: int = 0
    conflict_paths: list[str] = field(default_factory=list)
    target_report: dict[str, Any] = field(default_factory=dict)  # e.g. ZooKeeper's ACL counts and lists
    seconds: float = 0.0


@gc_paused
def replay_plan(plan: Plan, target: SourceBlock) -> Replayed:
    """Execute the creates of ``plan`` against ``target``."""
    log = logger()
    started = time.monotonic()
    done = Replayed()
    session = target.connect()
    try:
        session.ensure_root()
        total = plan.to_create + plan.intermediate
        with open_spool_reader(plan.ops_path) as f, progress.stage(f"restore into {plan.target}", total=total) as advance:
            batch: list[Record] = []
            size = 0
            for rec in read_records(f):
                batch.append(rec)
                size += len(rec.value)
                if len(batch) >= BATCH or size >= BATCH_BYTES:
                    _apply(session, batch, done)
                    advance(len(batch))
                    batch, size = [], 0
            if batch:
                _apply(session, batch, done)
                advance(len(batch))
        finish = getattr(session, "finish", None)  # ZooKeeper: archived ACLs set once the children exist
        if finish is not None:
            done.target_report = finish()
    finally:
        session.close()
    done.seconds = time.monotonic() - started
    log.info(
        "replay: created %d (+%d intermediate); %d appeared meanwhile identical, %d conflicts; %.2fs",
        done.created, done.intermediate_created, done.identical, done.conflicts, done.seconds,
    )
    return done


def _apply(session, batch: list[Record], done: Replayed) -> None:  # noqa: ANN001 - a SourceSession
    outcome = session.create(batch)
    existed = [r for r, ok in zip(batch, outcome, strict=True) if not ok and not r.meta.get("intermediate")]
    for r, ok in zip(batch, outcome, strict=True):
        if ok:
            if r.meta.get("intermediate"):
                done.intermediate_created += 1
            else:
                done.created += 1
    if existed:
        current = session.lookup([r.key for r in existed])
        for r, value in zip(existed, current, strict=True):
            if value == r.value:
                done.identical += 1
            else:
                done.conflicts += 1
                if len(done.conflict_paths) < LIST_LIMIT:
                    done.conflict_paths.append(display_key(r.key))


@task(name="replay")
def replay(plan: Plan, target: SourceBlock) -> Replayed:
    """Prefect task wrapper of :func:`replay_plan`. Not retried: a half-done replay is safe to
    run again by hand (it only creates what is missing), but not blindly."""
    return replay_plan(plan, target)

