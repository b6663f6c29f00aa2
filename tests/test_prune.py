"""Retention: prune keeps the newest archives per source and never the last one."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from blocks.local import LocalStore
from burrow.archive import ArchiveWriter
from burrow.errors import UsageError
from burrow.records import Record
from flows.prune import prune
from tasks.retention import select_expired


def make_archive(store: LocalStore, tmp: Path, source: str, created: str, n: int) -> str:
    name = f"{source}/{source}-{n:03d}.burrow"
    buf = io.BytesIO()
    w = ArchiveWriter(buf, service="zookeeper")
    w.add(Record(b"/k", b"v"))
    w.finish({"source": source, "created": created, "service": "zookeeper", "object_name": name})
    path = tmp / f"a{n}.burrow"
    path.write_bytes(buf.getvalue())
    store.put(name, path)
    return name


def iso(days_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_select_expired_keeps_newest_per_source_and_respects_age():
    rows = [
        {"source": "a", "created": iso(d), "url": f"a{d}", "name": f"a{d}"} for d in (0, 1, 2, 10)
    ] + [{"source": "b", "created": iso(30), "url": "b30", "name": "b30"}, {"url": "bad", "error": "corrupt"}]
    assert {r["url"] for r in select_expired(rows, keep_last=2)} == {"a2", "a10"}
    assert {r["url"] for r in select_expired(rows, keep_last=1, max_age_days=5)} == {"a10"}
    assert select_expired(rows, keep_last=1, source="b") == []  # the only archive of b is kept
    with pytest.raises(UsageError):
        select_expired(rows, keep_last=0)


def test_prune_flow_deletes_old_archives_only(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    store = LocalStore(path=str(root))
    names = [make_archive(store, tmp_path, "dc-us", iso(d), i) for i, d in enumerate((3, 2, 1, 0))]
    other = make_archive(store, tmp_path, "dc-eu", iso(9), 9)
    (root / "junk.burrow").write_bytes(b"not an archive")  # unreadable: reported, kept

    dry = prune(store=str(root), keep_last=2, dry_run=True)
    assert dry["deleted"] == 2 and len(store.list()) == 6

    summary = prune(store=str(root), keep_last=2)
    assert summary["deleted"] == 2 and summary["unreadable"] == 1
    left = {a.name for a in store.list()}
    assert left == {names[2], names[3], other, "junk.burrow"}
