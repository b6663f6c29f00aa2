"""Replay's pipeline into ZooKeeper (issue 20, item 6): the plan's spool is decoded one batch
ahead on a thread of its own, the list of created keys is written on another while the next
batch is created, and a multi transaction that created every node is recognised from its
reply's length. Each test checks what the server holds with kazoo, key by key, across many
batches (BATCH is made small), and that a failure on either thread stops the replay with its
own error, with every key created so far on the undo list."""

from __future__ import annotations

from pathlib import Path

import pytest
from zkutil import kazoo, snapshot, unique_root

import tasks.replay
from blocks import zkwire
from blocks.zookeeper import ZooKeeperCluster
from burrow.staging import discard_spool
from tasks.compress import compress_spool
from tasks.extract import extract_records
from tasks.plan import plan_restore
from tasks.undo import CreatedLog, read_created


def _archive(hosts: str, root: str, tmp_path: Path) -> Path:
    work = tmp_path / "backup"
    work.mkdir(exist_ok=True)
    ex = extract_records(ZooKeeperCluster(hosts=[hosts]), root, work)
    comp = compress_spool(ex, work / "a.burrow", source_name="replay-pipeline", level=1)
    discard_spool(ex.spool)
    return Path(comp.path)


def _tree(hosts: str, root: str, parents: int = 6, children: int = 9) -> dict[str, bytes]:
    with kazoo(hosts) as c:
        c.create(root, b"top")
        for i in range(parents):
            c.create(f"{root}/p{i}", b"p%d" % i)
            for j in range(children):
                c.create(f"{root}/p{i}/c{j}", b"v%d-%d" % (i, j))
        return snapshot(c, root)


def _restore(source_root: str, chroot: str, zk_a, zk_b, tmp_path: Path) -> tasks.replay.Replayed:  # noqa: ANN001
    """Plan and replay ``source_root`` of A into ``chroot`` of B (4 creates per multi)."""
    archive = _archive(zk_a.url, source_root, tmp_path)
    target = ZooKeeperCluster(hosts=[zk_b.url], chroot=chroot, multi_ops=4)
    work = tmp_path / "restore"
    work.mkdir()
    plan = plan_restore(archive, target, work)
    return tasks.replay.replay_plan(plan, target)


def _held(hosts: str, chroot: str, root: str) -> dict[str, bytes]:
    """What B holds below ``root`` in ``chroot``, by archived path (kazoo)."""
    with kazoo(hosts) as c:
        if c.exists(chroot + root) is None:
            return {}
        return {p[len(chroot):]: v for p, v in snapshot(c, chroot + root).items()}


def test_many_batches_restore_every_node_with_its_creation_version(zk_a, zk_b, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tasks.replay, "BATCH", 7)  # 61 nodes: 9 batches, each of 2 multis (multi_ops=4)
    root, chroot = unique_root(), unique_root()
    source = _tree(zk_a.url, root)
    done = _restore(root, chroot, zk_a, zk_b, tmp_path)
    assert done.created == len(source) == 61
    assert _held(zk_b.url, chroot, root) == source
    listed = dict(read_created(Path(done.created_path or "")))
    assert sorted(listed) == sorted(p.encode() for p in source)
    with kazoo(zk_b.url) as c:
        for key, version in listed.items():  # the undo list's version is the node's czxid, for every node
            assert c.exists(chroot + key.decode()).czxid == version


def test_a_batch_holding_existing_nodes_still_creates_the_rest(zk_a, zk_b, tmp_path, monkeypatch) -> None:
    """A multi that hits an existing node fails as a whole (its reply is not a full list of
    creates): that batch falls back to one create per node, and the existing nodes stay as
    they are (a conflict), while every other node is created."""
    monkeypatch.setattr(tasks.replay, "BATCH", 7)
    root, chroot = unique_root(), unique_root()
    source = _tree(zk_a.url, root, parents=3, children=5)
    archive = _archive(zk_a.url, root, tmp_path)
    target = ZooKeeperCluster(hosts=[zk_b.url], chroot=chroot, multi_ops=4)
    work = tmp_path / "restore"
    work.mkdir()
    plan = plan_restore(archive, target, work)
    assert plan.to_create == len(source)  # the chroot did not exist yet
    with kazoo(zk_b.url) as c:  # after planning: replay finds these (they appeared meanwhile)
        c.create(chroot, b"")
        for path in (root, f"{root}/p1", f"{root}/p2", f"{root}/p2/c0"):
            c.create(chroot + path, source[path])
        c.create(f"{chroot}{root}/p1/c3", b"someone else's")
    done = tasks.replay.replay_plan(plan, target)
    assert (done.created, done.identical, done.conflicts) == (len(source) - 5, 4, 1)
    assert done.conflict_paths == [f"{root}/p1/c3"]
    assert _held(zk_b.url, chroot, root) == {**source, f"{root}/p1/c3": b"someone else's"}
    listed = {k.decode() for k, _ in read_created(Path(done.created_path or ""))}
    assert listed == set(source) - {root, f"{root}/p1", f"{root}/p2", f"{root}/p2/c0", f"{root}/p1/c3"}


def test_created_all_tells_a_full_success_from_a_failed_multi(zk_b) -> None:
    chroot = unique_root()
    with kazoo(zk_b.url) as c:
        c.create(chroot + "/x/taken", b"t", makepath=True)
    wire = zkwire.WireSession([zk_b.url], chroot=chroot)
    acl = ((31, "world", "anyone"),)
    try:
        ok = wire.multi_create([(b"/x/a", b"1", acl), (b"/x/a/b", b"2", acl), (b"/x/\xc3\xa9", b"3", acl)])
        frame, err, off = wire.reply()
        assert not err and zkwire.created_all(frame, off, ok)
        assert zkwire.parse_multi(frame, off) == [None, None, None]
        failed = wire.multi_create([(b"/x/c", b"1", acl), (b"/x/taken", b"2", acl), (b"/x/d", b"3", acl)])
        frame, err, off = wire.reply()
        assert not zkwire.created_all(frame, off, failed)
        codes = zkwire.parse_multi(frame, off)
        assert codes[1] == -110 and None not in codes  # NodeExists; the others rolled back or not run
    finally:
        wire.close()
    with kazoo(zk_b.url) as c:
        assert sorted(c.get_children(chroot + "/x")) == ["a", "taken", "é"]
        assert c.exists(chroot + "/x/c") is None and c.exists(chroot + "/x/d") is None


def test_an_error_reading_the_spool_stops_the_replay_with_what_it_created_listed(zk_a, zk_b, tmp_path,
                                                                                  monkeypatch) -> None:
    monkeypatch.setattr(tasks.replay, "BATCH", 7)
    root = unique_root()
    _tree(zk_a.url, root)
    original = tasks.replay.read_records

    def breaks(f):  # noqa: ANN001, ANN202 - the reading thread's record source
        for n, rec in enumerate(original(f)):
            if n == 30:
                raise OSError("the staging disk went away")
            yield rec

    monkeypatch.setattr(tasks.replay, "read_records", breaks)
    chroot = unique_root()
    with pytest.raises(OSError, match="staging disk"):
        _restore(root, chroot, zk_a, zk_b, tmp_path)
    listed = dict(read_created(tmp_path / "restore" / "created.jsonl"))
    assert len(listed) == 28  # the 4 whole batches of 7 handed over before the reader failed, no more
    held = _held(zk_b.url, chroot, root)
    assert {p.encode() for p in held} == set(listed)
    with kazoo(zk_b.url) as c:
        for key, version in listed.items():
            assert c.exists(chroot + key.decode()).czxid == version


def test_an_error_writing_the_created_list_stops_the_replay(zk_a, zk_b, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tasks.replay, "BATCH", 7)
    root = unique_root()
    _tree(zk_a.url, root)
    original = CreatedLog.add
    calls = []

    def add(self: CreatedLog, entries: list[tuple[bytes, int]]) -> None:
        calls.append(len(entries))
        if len(calls) == 3:
            raise OSError("no space left for the list")
        original(self, entries)

    monkeypatch.setattr(CreatedLog, "add", add)
    chroot = unique_root()
    with pytest.raises(OSError, match="no space left"):
        _restore(root, chroot, zk_a, zk_b, tmp_path)
    # the third batch's list failed to be written while the fourth was created: the replay stopped
    # there (the fourth batch, in flight, was listed on the way out)
    assert len(_held(zk_b.url, chroot, root)) == 28
    assert calls == [7, 7, 7, 7]
