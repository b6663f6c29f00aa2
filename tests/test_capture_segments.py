"""The core of change segments without servers: materializing the state at a point (bases,
puts, deletes, resyncs, the cut by position and by time, in the external sort with spilled
runs), and the chain rules (links, forks, missing segments, windows and refusals)."""

from __future__ import annotations

from pathlib import Path

import pytest

from burrow import segments
from burrow.errors import ArchiveError
from burrow.records import Record
from burrow.segments import Chain, Point, Segment, build_chains, change_record, choose


def _point(start: int = 0, at_time: int | None = None, at_position: int | None = None) -> Point:
    return Point(chain=Chain(), segments=[], start_name="base", start_sha="x", start_position=start,
                 at_time=at_time, at_position=at_position)


def _state(base: list[Record], changes: list[Record], point: Point, tmp: Path) -> dict[bytes, tuple[bytes, dict]]:
    return {r.key: (r.value, r.meta) for r in segments.materialize(iter(base), iter(changes), point, tmp)}


def test_materialize_by_position_and_time_with_deletes_and_a_resync(tmp_path: Path, monkeypatch) -> None:
    base = [Record(b"/a", b"a0", {"mod_revision": 1}), Record(b"/b", b"b0"), Record(b"/ab", b"x")]
    changes = [
        change_record("put", b"/a", b"a1", 5, 100, {"mod_revision": 5}),
        change_record("del", b"/b", b"", 6, 100),
        change_record("put", b"/c", b"c1", 7, 200),
        change_record("put", b"/b", b"b2", 8, 300),
    ]
    assert _state(base, changes, _point(4, at_position=4), tmp_path) == {
        b"/a": (b"a0", {"mod_revision": 1}), b"/b": (b"b0", {}), b"/ab": (b"x", {})}
    assert _state(base, changes, _point(4, at_position=6), tmp_path) == {
        b"/a": (b"a1", {"mod_revision": 5}), b"/ab": (b"x", {})}
    assert _state(base, changes, _point(4, at_time=250), tmp_path) == {
        b"/a": (b"a1", {"mod_revision": 5}), b"/ab": (b"x", {}), b"/c": (b"c1", {})}
    # changes at or before the start archive's position are in it already
    assert _state(base, changes, _point(5, at_position=5), tmp_path)[b"/a"] == (b"a0", {"mod_revision": 1})
    # a resync is the whole state: a key it does not list is gone, later changes apply
    def resynced() -> list[Record]:
        return [*changes, change_record("put", b"/z", b"z", 9, 400, {"resync": True}),
                change_record("put", b"/a", b"ra", 9, 400, {"resync": True}), change_record("put", b"/y", b"y", 10, 500)]

    want = {b"/a": (b"ra", {}), b"/z": (b"z", {}), b"/y": (b"y", {})}
    assert _state(base, resynced(), _point(4, at_time=600), tmp_path) == want
    # the same in spilled runs of 64 bytes (bounded memory: every line goes through the sort)
    monkeypatch.setattr(segments, "ExternalSorter", _small_sorter)
    assert _state(base, resynced(), _point(4, at_time=600), tmp_path) == want
    assert list(tmp_path.iterdir()) == [], "sort runs left behind"


def _small_sorter(workdir: Path, what: str) -> object:
    from burrow.extsort import ExternalSorter

    return ExternalSorter(workdir, run_bytes=64, what=what)


def test_changes_out_of_position_order_are_refused(tmp_path: Path) -> None:
    changes = [change_record("put", b"/a", b"1", 7, 1), change_record("put", b"/b", b"2", 6, 1)]
    with pytest.raises(ArchiveError, match="out of position order"):
        _state([], changes, _point(0, at_position=10), tmp_path)


def _seg(name: str, prev: Segment | None, first: int, last: int, t0: int, t1: int, **kw: object) -> Segment:
    return Segment(name=name, url=f"file:///{name}", sha=f"sha-{name}", source="s", base_name="base",
                   base_sha="bsha", base_position=first - 1 if prev is None else prev.base_position,
                   prev_name=prev.name if prev else None, prev_sha=prev.sha if prev else None,
                   first_position=first, last_position=last, first_time=t0, last_time=t1,
                   gap=kw.get("gap"), changes=1, catching_up=bool(kw.get("catching_up")))  # type: ignore[arg-type]


def test_chains_windows_and_refusals() -> None:
    s1 = _seg("s1", None, 11, 20, 1000, 2000)
    s2 = _seg("s2", s1, 21, 30, 2000, 3000)
    s3 = _seg("s3", s2, 31, 40, 5000, 6000)  # resumed after the capture was down 3000..5000
    fulls = [{"name": "base", "manifest_sha256": "bsha", "position": 10, "url": "file:///base"}]
    chains, problems = build_chains([s3, s1, s2])
    assert problems == [] and [s.name for s in chains[0].segments] == ["s1", "s2", "s3"]
    win = segments.window(chains)
    assert win.intervals == [(1000, 3000), (5000, 6000)] and win.gaps() == [(3000, 5000)]
    p = choose(chains, problems, fulls, source="s", at_time=2500)
    assert [s.name for s in p.segments] == ["s1", "s2"] and p.start_name == "base"
    assert [s.name for s in choose(chains, problems, fulls, source="s", at_position=35).segments] == ["s1", "s2", "s3"]
    for bad in (dict(at_time=4000), dict(at_time=999), dict(at_time=7000), dict(at_position=41)):
        with pytest.raises(ArchiveError, match="restorable window is"):
            choose(chains, problems, fulls, source="s", **bad)  # type: ignore[arg-type]
    # a missing middle segment: the chain stops at s1 and a point past it is refused
    chains, problems = build_chains([s1, s3])
    assert any("missing from the store" in p for p in problems)
    with pytest.raises(ArchiveError, match="missing from the store"):
        choose(chains, problems, fulls, source="s", latest=True)
    # a point past the hole is outside every chain's window: the refusal names the hole, which
    # the window alone would show as a gap (as if the capture had stopped)
    with pytest.raises(ArchiveError, match="restorable window is .*missing from the store"):
        choose(chains, problems, fulls, source="s", at_time=5500)
    # a fork, and a base archive that is not the one the chain names
    fork = _seg("s2b", s1, 21, 25, 2000, 2500)
    chains, problems = build_chains([s1, s2, fork])
    assert any("fork" in p for p in problems)
    chains, problems = build_chains([s1, s2])
    with pytest.raises(ArchiveError, match="not the one the change chain"):
        choose(chains, problems, [{**fulls[0], "manifest_sha256": "other"}], source="s", latest=True)
