"""Retention: prune keeps the newest archives per source and never the last one."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from zkutil import kazoo, unique_root

from blocks.local import LocalStore
from burrow.archive import ArchiveReader, ArchiveWriter
from burrow.errors import UsageError
from burrow.keys import keygen
from burrow.records import Record
from flows.backup import backup
from flows.prune import prune
from flows.rehearse import rehearse
from tasks.retention import KEEP_REHEARSED, select_expired


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


def test_prune_keeps_the_newest_archive_whose_rehearsal_passed(zk_a, zk_b, tmp_path):
    """GFS alone (keep-last 1) would keep only the newest archive; a source's newest archive
    whose rehearsal passed, by an authenticated marker, is kept too (``keep-rehearsed``), and
    an archive that is deleted takes its markers with it. A rehearsal that FAILED, newer than
    the archive's passing one, makes it no longer the proof. Real backups, real rehearsals."""
    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/cfg/a", b"1", makepath=True)
    store = tmp_path / "store"
    store.mkdir()
    source = "dc-kr-" + uuid.uuid4().hex[:6]
    made = [backup(source=f"zk://{zk_a.url}", store=str(store), name=source, root=root, key_file=str(key))["url"]
            for _ in range(3)]
    oldest, middle, newest = made
    files = {u: Path(u.removeprefix("file://")) for u in made}

    def rehearse_(url: str, ok: bool = True) -> None:
        state = rehearse(store=str(store), source=source, archive=url, key_files=[str(key)],
                         scratch=f"zk://{zk_b.url}/burrow-rehearsal-{uuid.uuid4().hex[:8]}/scratch", return_state=True)
        assert state.is_completed() if ok else state.is_failed(), state

    def markers_of(url: str) -> list[Path]:
        return sorted(files[url].parent.glob(files[url].name + ".rehearsal-*.burrow-meta"))

    def prune_(dry_run: bool) -> dict:
        return prune(store=str(store), keep_last=1, source=source, key_files=[str(key)], dry_run=dry_run)

    rehearse_(oldest)
    s = prune_(dry_run=True)  # the oldest is the proof: kept; only the middle one would go
    assert set(s["deleted_because"]) == {middle}, s["deleted_because"]
    assert any(r.startswith(f"{KEEP_REHEARSED} (rehearsal passed at ") for r in s["kept_because"][oldest]), s
    assert s["kept_because"][newest] == ["newest archive of its source", "keep-last 1"]
    assert all(f.exists() for f in files.values())

    rehearse_(middle)  # a newer proof: the oldest archive goes now, and its marker with it
    assert len(markers_of(oldest)) == 1 and len(markers_of(middle)) == 1
    # its sidecars: the rehearsal marker and the backup's verification record
    sidecars = sorted(files[oldest].parent.glob(files[oldest].name + ".*"))
    assert markers_of(oldest)[0] in sidecars
    s = prune_(dry_run=False)
    assert set(s["deleted_because"]) == {oldest} and s["markers_deleted"] == len(sidecars), (s, sidecars)
    assert not [p for p in sidecars if p.exists()]
    assert any(r.startswith(KEEP_REHEARSED) for r in s["kept_because"][middle]), s["kept_because"]
    assert not files[oldest].exists() and markers_of(oldest) == []
    assert files[middle].exists() and files[newest].exists() and len(markers_of(middle)) == 1

    # the middle archive's newest rehearsal fails (its body is damaged): it proves nothing now
    with open(files[middle], "rb") as f:
        reader = ArchiveReader(f)
        at = reader.body_start + reader.body_length // 2
    data = bytearray(files[middle].read_bytes())
    data[at] ^= 0x01
    files[middle].write_bytes(bytes(data))
    rehearse_(middle, ok=False)
    s = prune_(dry_run=True)
    assert set(s["deleted_because"]) == {middle}, s
    assert not any(KEEP_REHEARSED in r for rules in s["kept_because"].values() for r in rules)
