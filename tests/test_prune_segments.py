"""prune and change segments (``--keep-changes-within``): prune keeps the segments a kept full
archive needs to reach its successor within the window, and lets the older ones go, with their
reasons in the summary and the artifact; it cuts a live chain at its start, up to a segment the
chain can start from without what went (a kept archive's revision), so the window's start moves
on and what is left restores from that archive; a dry run deletes nothing; a segment under Object
Lock is left alone and listed as an archive is, and the archive a chain still starts from stays.

The chains are cheap and exact: real etcd writes and real full backups, sealed into segments by
the capture's own writer (tasks/capture.py ``Capture``) in this process, on a clock set days back
(``burrow.segments.now_us``), so that a week-long window needs no week."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from captureutil import backup, capture_key, cli, error_lines, restore  # noqa: F401 - capture_key: the key fixture
from kvutil import Etcd, unique

from burrow import segments as seglib
from burrow.segments import Segment

#: A hang guard: a dozen CLI runs, each a flow, on a busy machine.
pytestmark = pytest.mark.timeout(1200)

NOW = datetime.now(UTC)


def ago(**delta: float) -> int:
    """A time ``delta`` before the module's start, in µs (a segment's clock)."""
    return int((NOW - timedelta(**delta)).timestamp() * 1_000_000)


def iso(us: int) -> str:
    return seglib.us_to_iso(us)


class Clock:
    """``burrow.segments.now_us`` for the writer: the time a test sets."""

    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        return self.t


@dataclass
class Source:
    """An etcd prefix with its full archives and one change chain, written as a capture writes it."""

    store: str  # the store, as the CLI takes it
    block: Any  # the store block
    name: str
    url: str
    prefix: bytes
    key: Path
    e: Etcd
    clock: Clock
    cap: Any = None
    n: int = 0
    segs: list[Segment] = field(default_factory=list)
    fulls: dict[str, str] = field(default_factory=dict)  # label -> object name
    revs: dict[str, int] = field(default_factory=dict)  # label -> the revision of that full archive

    def keys(self) -> tuple[Any, Any]:
        from blocks.keys import backup_write_keys
        from burrow.crypto import ArchiveKeys
        from burrow.keys import KeyRefs

        write = backup_write_keys(True, KeyRefs(key_files=[str(self.key)]))
        return write, ArchiveKeys(write.keyring())

    def backup(self, label: str) -> None:
        from blocks.store import open_stored

        before = set(self.block_names())
        backup(self.url, self.store, self.name, self.key)  # type: ignore[arg-type]
        (name,) = set(self.block_names()) - before
        self.fulls[label] = name
        with open_stored(self.block, name) as reader:
            self.revs[label] = int(reader.manifest["service_info"]["revision"])

    def block_names(self) -> list[str]:
        return [a.name for a in self.block.list() if not seglib.is_segment_name(a.name)
                and a.name.startswith(self.name + "/")]

    def follow(self, tmp: Path) -> None:
        """A capture run's writer, continuing the source's chain (or starting one after its newest
        full archive), as ``burrow capture`` would."""
        from blocks.resolve import source_from_ref
        from tasks.capture import Capture, SealedEvents, chain_head

        write, keys = self.keys()
        work = tmp / f"work-{len(self.segs)}"
        work.mkdir()
        self.cap = Capture(source_from_ref(self.url), self.block, self.name, write, work,
                           chain_head(self.block, self.name, keys))
        self.cap.events = SealedEvents(emit=lambda source, payload: None)

    def writes(self, count: int) -> list[tuple[str, bytes, bytes, int, dict[str, Any]]]:
        """``count`` real changes under the prefix (puts, an update, a delete), as the feed gives them."""
        out: list[tuple[str, bytes, bytes, int, dict[str, Any]]] = []
        for _ in range(count):
            self.n += 1
            key = b"/k%04d" % self.n
            if self.n % 5 == 0 and self.n > 2:  # an update of an older key
                key = b"/k%04d" % (self.n - 2)
            value = b"v%d" % self.n
            rev = self.e.put(self.prefix + key, value)
            out.append(("put", key, value, rev, {"mod_revision": rev}))
            if self.n % 7 == 0:  # and a delete
                gone = b"/k%04d" % (self.n - 1)
                self.e.delete(self.prefix + gone)
                out.append(("del", gone, b"", self.e.revision(), {}))
        return out

    def seal(self, at: int, changes: list[tuple[str, bytes, bytes, int, dict[str, Any]]], store: Any = None) -> Segment:
        """A segment holding ``changes``, sealed at ``at`` (µs), whole up to etcd's revision now."""
        from blocks.source import ChangeBatch

        self.clock.t = at
        self.cap.store = store or self.block
        if changes:
            self.cap.take(ChangeBatch(changes, changes[-1][3]))
        self.cap.take(ChangeBatch([], self.e.revision(), progress=True))
        seg = self.cap.seal()
        self.segs.append(seg)
        return seg

    def state(self, revision: int = 0) -> dict[bytes, bytes]:
        return {k[len(self.prefix):]: v for k, v in self.e.snapshot(self.prefix + b"/", revision).items()}

    def left(self) -> set[str]:
        return {a.name for a in self.block.list(seglib.segments_prefix(self.name))}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(seglib, "now_us", c)
    return c


def _source(etcd: Any, store: str, block: Any, key: Path, clock: Clock) -> Source:
    e = Etcd(etcd.url)
    prefix = "/" + unique("prune")
    p = prefix.encode()
    e.put_many({p + b"/seed%02d" % i: b"s%d" % i for i in range(5)})
    return Source(store, block, unique("src"), f"etcd://{etcd.host}:{etcd.port}{prefix}", p, key, e, clock)


def _chain(src: Source, tmp: Path, locked: Any = None) -> None:
    """Full archive A; s0 (10 days ago), s1 (9.5 days); s2 (9 days), holding full archive B's
    revision inside it; s3 (8 days), right after which full archive C is taken (C's revision is s3's
    end); s4 (6 days: inside a 7-day window), s5 (1 hour). One chain, from A, that a capture is
    still continuing. ``locked``: a store block under Object Lock that writes s2."""
    src.backup("A")
    src.follow(tmp)
    src.seal(ago(days=10), src.writes(4))
    src.seal(ago(days=9, hours=12), src.writes(4))
    before = src.writes(3)
    src.backup("B")
    src.seal(ago(days=9), before + src.writes(3), store=locked)
    src.seal(ago(days=8), src.writes(4))
    src.backup("C")
    src.seal(ago(days=6), src.writes(4))
    src.seal(ago(hours=1), src.writes(4))
    s = src.segs
    assert [x.prev_name for x in s[1:]] == [x.name for x in s[:-1]] and {x.base_name for x in s} == {src.fulls["A"]}
    assert s[2].first_position - 1 < src.revs["B"] < s[2].last_position, "B is not inside s2"
    assert src.revs["C"] == s[3].last_position == s[4].first_position - 1, "C is not right before s4"


def _window(src: Source) -> dict[str, Any]:
    r = cli("status", src.store, "--source", src.name, "--json", "--no-verify", "--key-file", str(src.key))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)["sources"][0]["restorable"]


def _restored(etcd_b: Any, label: str, src: Source, *point: str) -> dict[bytes, bytes]:
    path = "/" + unique(label)
    r = restore(Path(src.store), src.name, src.key, f"etcd://{etcd_b.host}:{etcd_b.port}{path}", *point)
    assert r.returncode == 0, (point, r.stderr[-3000:])
    t = path.encode()
    return {k[len(t):]: v for k, v in Etcd(etcd_b.url).snapshot(t + b"/").items()}


def _refused(etcd_b: Any, src: Source, *point: str) -> str:
    path = "/" + unique("refused")
    r = restore(Path(src.store), src.name, src.key, f"etcd://{etcd_b.host}:{etcd_b.port}{path}", *point)
    assert r.returncode == 1, (point, r.stdout[-1000:], r.stderr[-3000:])
    (line,) = error_lines(r)
    assert Etcd(etcd_b.url).snapshot(path.encode() + b"/") == {}, "a refused restore wrote keys"
    return line


def to_us(text: str) -> int:
    return seglib.iso_to_us(text)


def show(text: str) -> str:
    return seglib.show_time(seglib.iso_to_us(text))


def _local(store: Path) -> Any:
    from blocks.local import LocalStore

    return LocalStore(path=str(store))


def _prune_artifact(text_in: str) -> str:
    """The newest prune run artifact (markdown: its outcome and lists) whose text names ``text_in``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read() -> str:
        async with get_client() as client:
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="prune-%")),
                                               sort=ArtifactSort.CREATED_DESC, limit=50)
            mine = [a for a in arts if a.type == "markdown" and text_in in str(a.data)]
            assert mine, f"no recent prune artifact names {text_in}"
            return str(mine[0].data)

    return asyncio.run(read())


# --------------------------------------------------------------------------- the window moves on


def test_segments_older_than_the_window_go_up_to_a_kept_archive_and_the_rest_restores(
        etcd_a, etcd_b, store: Path, key: Path, clock: Clock, tmp_path: Path) -> None:
    """``--keep-last 3`` keeps A, B and C; ``--keep-changes-within 7d``: s0 to s3 ended before
    the window and go (the dry run first deletes nothing), each with its reason; s4 and s5 stay,
    and the chain, cut before s4, restores from C, which is right before it. The window's start
    moved from s0 to s4 (``status --json``); a point inside the kept window, a revision, and the
    chain's end restore exactly what etcd held then; a point before the new start is refused
    naming the window. A capture that goes on continues the cut chain."""
    src = _source(etcd_a, str(store), _local(store), key, clock)
    _chain(src, tmp_path)
    s = src.segs
    before = _window(src)
    assert before["from"] == iso(s[0].first_time) and before["to"] == iso(s[5].last_time), before
    names = {x.name for x in s}
    at_s3_end = src.state(s[3].last_position)

    args = ("--keep-last", "3", "--keep-changes-within", "7d")
    r = cli("prune", src.store, "--source", src.name, "--key-file", str(key), "--dry-run", "--json", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    dry = json.loads(r.stdout)
    assert src.left() == names, "a dry run deleted segments"
    assert dry["deleted"] == 0 and dry["changes_deleted"] == 4, dry

    r = cli("prune", src.store, "--source", src.name, "--key-file", str(key), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    old_line = "change segment older than --keep-changes-within 7d"
    assert f"deleted 4 change segments  ({old_line})" in r.stdout, r.stdout
    assert "deleted 0 of 3 archives; kept 3" in r.stdout, r.stdout  # every archive is kept
    assert set(dry["changes_deleted_because"]) == {x.url for x in s[:4]}, dry
    assert set(dry["changes_deleted_because"].values()) == {old_line}, dry
    assert dry["changes_left_alone"] == {} and dry["changes_locked"] == 0, dry
    assert src.left() == {s[4].name, s[5].name}
    text = _prune_artifact(s[0].url)  # the artifact lists each segment with its reason
    assert all(f"{x.url}: {old_line}" in text for x in s[:4]) and s[4].url not in text, text

    after = _window(src)
    # the chain starts at s4, from C (right before it: every instant of s4 is restorable)
    assert after == {"from": iso(s[4].first_time), "to": iso(s[5].last_time), "gaps": []}, after
    assert to_us(after["from"]) > to_us(before["from"])

    # a point inside the kept window before s4's changes were seen: C's state, the state at s3's end
    assert _restored(etcd_b, "mid", src, "--at", iso(ago(days=7))) == at_s3_end
    rev = (s[4].first_position + s[4].last_position) // 2
    assert _restored(etcd_b, "rev", src, "--at-revision", str(rev)) == src.state(rev)
    line = _refused(etcd_b, src, "--at", iso(ago(days=9, hours=6)))
    assert "restorable window is" in line and show(after["from"]) in line, line

    # a capture that goes on continues the cut chain (its base is now C, the newest archive)
    src.follow(tmp_path)
    assert src.cap.head.prev is not None and src.cap.head.prev.name == s[5].name
    s6 = src.seal(ago(minutes=30), src.writes(3))
    assert s6.prev_name == s[5].name and s6.base_name == src.fulls["C"]
    assert _restored(etcd_b, "latest", src, "--at", "latest") == src.state()


def test_a_chain_is_cut_at_the_kept_archive_inside_a_segment_and_restores_from_it(
        etcd_a, etcd_b, store: Path, key: Path, clock: Clock, tmp_path: Path) -> None:
    """``--keep-last 2`` deletes A (the chain's base) and keeps B and C; the window is 8 days
    12 hours. s0 and s1 come before any kept archive: no kept archive needs them, and they go
    with that reason. B's revision is inside s2: the chain is cut before s2 and restores from B,
    from s2's end (before it, s2 holds changes B's state already has, and instants B does not
    know how to undo); s3, which ended before the window, stays, for it is what leads B to the
    window. A revision after B's restores exactly; one before it, or a segment removed from the
    middle of what is left, is refused."""
    from burrow.errors import ArchiveError
    from tasks.chain import read_chains, resolve_point

    src = _source(etcd_a, str(store), _local(store), key, clock)
    _chain(src, tmp_path)
    s = src.segs
    r = cli("prune", src.store, "--source", src.name, "--key-file", str(key), "--json", "--keep-last", "2",
            "--keep-changes-within", "204h")  # 8 days 12 hours
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert list(summary["deleted_because"]) == [src.block.url(src.fulls["A"])], summary
    why = summary["changes_deleted_because"]
    assert set(why) == {s[0].url, s[1].url}, why
    assert all("no kept full archive needs" in w and src.fulls["A"] in w for w in why.values()), why
    assert src.left() == {x.name for x in s[2:]}
    assert set(src.block_names()) == {src.fulls["B"], src.fulls["C"]}

    _, keys = src.keys()
    found = read_chains(src.block, src.name, keys)
    assert found.problems == [] and len(found.chains) == 1 and found.trimmed == {s[2].name: src.fulls["B"]}
    assert _window(src)["from"] == iso(s[2].last_time)

    rev = src.revs["B"] + 1
    assert _restored(etcd_b, "afterb", src, "--at-revision", str(rev)) == src.state(rev)
    line = _refused(etcd_b, src, "--at-revision", str(src.revs["B"] - 1))
    assert str(src.revs["B"] - 1) in line, line

    # a segment removed from the middle of the kept part is a break, not a cut: refused
    src.block.delete(s[4].name)
    with pytest.raises(ArchiveError, match="missing from the store"):
        resolve_point(src.block, src.name, keys, latest=True)


# --------------------------------------------------------------------------- Object Lock


def test_a_segment_under_object_lock_is_left_alone_and_listed_and_the_archive_it_starts_from_stays(
        moto, etcd_a, key: Path, clock: Clock, tmp_path: Path) -> None:
    """On S3 with Object Lock, s2 is locked (the others are not). ``--keep-last 2`` (A goes) and
    a 7-day window would cut the chain before s4 (C's revision): s3 goes, s2 is refused by the
    lock, so it stays, listed in the artifact's "Left alone" with its retain-until date, as an
    archive is; the chain before it is cut back to s2 (B's revision is in it), so s0 and s1 go.
    Then ``--keep-last 1`` would delete B, but the chain left at s2 still starts from B: B is
    left alone (with why), not deleted, and s2 again with its lock. What is left restores."""
    from test_stores import minio_store, new_bucket

    from flows.prune import prune

    bucket = new_bucket(moto, lock=True)
    plain = minio_store(moto, bucket, prefix="pitr")
    locked = minio_store(moto, bucket, prefix="pitr", object_lock_mode="GOVERNANCE", retain_days=1)
    src = _source(etcd_a, plain.describe(), plain, key, clock)
    _chain(src, tmp_path, locked=locked)
    s = src.segs
    assert plain.locked_until(s[2].name) is not None and plain.locked_until(s[3].name) is None

    url = [plain.url(x.name) for x in s]  # (s2 was written through the locked store block: its URL names that)
    first = prune(store=src.store, keep_last=2, keep_changes_within="7d", source=src.name, key_files=[str(key)])
    assert first["deleted"] == 1 and src.fulls["A"] in next(iter(first["deleted_because"])), first
    assert set(first["changes_deleted_because"]) == {url[0], url[1], url[3]}, first
    assert first["changes_locked"] == 1 and list(first["changes_left_alone"]) == [url[2]], first
    assert "under Object Lock until" in first["changes_left_alone"][url[2]]
    assert src.left() == {s[2].name, s[4].name, s[5].name}
    text = _prune_artifact(url[2])
    assert "Left alone (never deleted)" in text and f"{url[2]}: under Object Lock until" in text, text
    assert url[3] in text and "older than --keep-changes-within 7d" in text, text

    second = prune(store=src.store, keep_last=1, keep_changes_within="7d", source=src.name, key_files=[str(key)])
    assert second["deleted"] == 0 and second["changes_deleted"] == 0, second
    assert second["changes_locked"] == 1 and list(second["changes_left_alone"]) == [url[2]], second
    assert set(src.block_names()) == {src.fulls["B"], src.fulls["C"]}, "the archive s2 starts from was deleted"
    text = _prune_artifact(src.fulls["B"])
    assert f"{url[2]}: under Object Lock until" in text and "starts from it" in text, text

    from tasks.chain import read_chains, resolve_point

    _, keys = src.keys()
    found = read_chains(plain, src.name, keys)
    assert found.problems == [] and found.trimmed == {s[2].name: src.fulls["B"], s[4].name: src.fulls["C"]}
    point = resolve_point(plain, src.name, keys, latest=True)
    assert point.start_name == src.fulls["C"] and [x.name for x in point.segments] == [s[4].name, s[5].name]


# --------------------------------------------------------------------------- how a cut chain reads


def _seg(name: str, prev: str | None, first: int, last: int, t0: int, t1: int, **kw: Any) -> Segment:
    return Segment(name=name, url=f"file:///{name}", sha=f"sha-{name}", source="s", base_name="base", base_sha="bsha",
                   base_position=kw.get("base_position", 0), prev_name=prev, prev_sha=f"sha-{prev}" if prev else None,
                   first_position=first, last_position=last, first_time=t0, last_time=t1, gap=None, changes=1,
                   catching_up=False, resync=bool(kw.get("resync")), resync_part=0, resync_done=True,
                   service=kw.get("service", "etcd"))


def test_a_cut_chain_starts_only_at_a_resync_or_a_trusted_archive_and_never_at_damage() -> None:
    """How the chain rules read a segment whose predecessor is gone (tasks/chain.py
    ``_trimmed_view``): at a resync (ZooKeeper, Consul) the chain starts from it; at a segment
    holding a trusted etcd archive's revision it starts from that archive, at its revision, from
    the segment's end (inside it, earlier instants are not restorable from the archive); anywhere
    else it stays a break, and so it does when the predecessor is in the store but did not read."""
    from burrow.segments import build_chains, window
    from tasks.chain import _trimmed_view

    def fulls() -> list[dict[str, Any]]:
        return [{"name": "F", "manifest_sha256": "fsha", "position": 25, "service": "etcd"}]

    # ZooKeeper: s1 (gone) -> s2, a resync's first part -> s3
    zk = [_seg("s2", "s1", 21, 30, 200, 300, resync=True, service="zookeeper"),
          _seg("s3", "s2", 31, 40, 300, 400, service="zookeeper")]
    view, trimmed = _trimmed_view(zk, lambda: [])
    chains, problems = build_chains(view)
    assert problems == [] and trimmed == {"s2": None} and [s.name for s in chains[0].segments] == ["s2", "s3"]
    assert window(chains).intervals == [(200, 400)]

    # etcd: F's revision 25 is inside s2 (21 to 30): the chain starts from F, s2 restorable from its end
    etcd = [_seg("s2", "s1", 21, 30, 200, 300), _seg("s3", "s2", 31, 40, 300, 400)]
    view, trimmed = _trimmed_view(etcd, fulls)
    chains, problems = build_chains(view)
    assert problems == [] and trimmed == {"s2": "F"}
    first = chains[0].first
    assert (first.base_name, first.base_position, first.first_position, first.first_time) == ("F", 25, 26, 300)
    assert {s.base_name for s in chains[0].segments} == {"F"} and window(chains).intervals == [(300, 400)]

    # no archive there (F is at 25, s3 starts at 31): a break, as before
    view, trimmed = _trimmed_view(etcd[1:], fulls)
    chains, problems = build_chains(view)
    assert trimmed == {} and chains == [] and any("missing from the store" in p for p in problems)
    # the predecessor is in the store but did not read: damage, not a cut
    view, trimmed = _trimmed_view(etcd, fulls, present={"s1", "s2", "s3"})
    assert trimmed == {} and build_chains(view)[1]
