"""The capture engine (issue 19), against real servers: a resync streams in parts of bounded size
and still restores as one consistent step; one capture at a time per source (two real
processes, one chain, no fork); a leased etcd key is captured with its TTL and restored with a
lease; ``burrow.capture.gap`` names the gap's positions and times; ``burrow.capture.sealed`` is
throttled per source, with counts and lag; segments on an S3 store with Object Lock are locked
as full archives are."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from captureutil import (  # noqa: F401 - capture_key: the key fixture
    capture_key,
    covered,
    now_iso,
    restore,
    resyncs,
    sealed_past,
    segments,
    to_us,
    wait_for,
)
from conftest import run_burrow, start_burrow
from kvutil import Etcd, consul_client, consul_snapshot, unique
from zkutil import kazoo, snapshot, unique_root

from burrow import segments as seglib
from burrow.archive import ArchiveReader
from burrow.errors import ArchiveError
from burrow.naming import slug
from burrow.records import Record
from burrow.segments import Chain, Point, Segment, build_chains, change_record, choose
from tasks.capture import SealedEvents

# --------------------------------------------------------------------------- helpers


class Proc:
    """``burrow ARGS`` as a process of its own whose output goes to files, read while it runs."""

    def __init__(self, tmp: Path, label: str, *args: str) -> None:
        self.out, self.err = tmp / f"{label}.out", tmp / f"{label}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = start_burrow(*args, stdout=out, stderr=err)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def finish(self) -> int:
        return self.proc.wait(timeout=300)

    def wait_for(self, what: str, check: Any) -> Any:
        """``captureutil.wait_for`` while this process runs: it failing meanwhile fails the wait."""
        got = wait_for(what, lambda: check() or self.proc.poll() is not None)
        assert self.proc.poll() is None, f"exited ({self.proc.returncode}) waiting for {what}: {self.stderr()[-3000:]}"
        return got

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=60)


def capture_proc(tmp: Path, label: str, url: str, store: str, name: str, key: Path, *extra: str) -> Proc:
    return Proc(tmp, label, "capture", url, "--to", store, "--name", name, "--key-file", str(key),
                "--seal-every", "1s", "--for", "30m", *extra)


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_burrow(*args, timeout=300)


def source_events(source: str, name: str, since: datetime) -> list[Any]:
    """Every ``name`` event about ``burrow.source.<source>`` since ``since``, read back from the
    Prefect API (oldest first)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    flt = EventFilter(occurred=EventOccurredFilter(since=since), event=EventNameFilter(name=[name]),
                      resource=EventResourceFilter(id=[f"burrow.source.{source}"]))
    with get_client(sync_client=True) as c:
        page = c.read_events(filter=flt, limit=50)
        events = list(page.events)
        while page.next_page:
            page = c.read_events_page(page.next_page)
            events += page.events
    return sorted(events, key=lambda e: e.occurred)


def _keys(key: Path) -> tuple[Any, Any]:
    """The write keys of ``backup --key-file KEY`` and the archive keys that read them back."""
    from blocks.keys import backup_write_keys
    from burrow.crypto import ArchiveKeys
    from burrow.keys import KeyRefs

    write = backup_write_keys(True, KeyRefs(key_files=[str(key)]))
    return write, ArchiveKeys(write.keyring())


# --------------------------------------------------------------------------- sealed events (fake clock)


def _seg(name: str, prev: Segment | None, first: int, last: int, t0: int, t1: int, **kw: Any) -> Segment:
    return Segment(name=name, url=f"file:///{name}", sha=f"sha-{name}", source="s", base_name="base",
                   base_sha="bsha", base_position=first - 1 if prev is None else prev.base_position,
                   prev_name=prev.name if prev else None, prev_sha=prev.sha if prev else None,
                   first_position=first, last_position=last, first_time=t0, last_time=t1, gap=None, changes=1,
                   catching_up=bool(kw.get("catching_up")), resync=bool(kw.get("resync")),
                   resync_part=int(kw.get("part", 0)), resync_done=bool(kw.get("done", True)))


def test_sealed_events_are_throttled_per_source_with_counts_and_lag() -> None:
    now = [1000.0]
    sent: list[tuple[str, dict[str, Any]]] = []
    events = SealedEvents(every=60.0, clock=lambda: now[0], emit=lambda src, payload: sent.append((src, payload)))
    seg = _seg("a1", None, 1, 5, 1_000_000, 2_000_000)
    assert events.sealed("a", seg, 3, 0.25, {"segments": 1, "changes": 3})  # a source's first: at once
    assert events.sealed("b", seg, 7, 1.5, {"segments": 1, "changes": 7})  # A's event does not silence B
    now[0] += 10
    assert not events.sealed("b", seg, 1, 0.1, {"segments": 2, "changes": 8})  # B's own minute is not up
    assert not events.sealed("a", seg, 4, 0.5, {"segments": 2, "changes": 7})
    assert not events.sealed("a", seg, 5, 0.5, {"segments": 3, "changes": 12})
    now[0] += 49.9
    assert not events.sealed("a", seg, 1, 0.5, {"segments": 4, "changes": 13})  # 59.9 s: not yet
    now[0] += 0.2
    assert events.sealed("a", seg, 2, 2.0, {"segments": 5, "changes": 15})
    assert [s for s, _ in sent] == ["a", "b", "a"]
    first, last = sent[0][1], sent[2][1]
    assert (first["segments_since_last"], first["changes_since_last"], first["lag_s"]) == (1, 3, 0.25)
    # everything sealed since A's last event is counted, the run's totals and the last segment's lag
    assert (last["segments_since_last"], last["changes_since_last"]) == (4, 12)
    assert (last["segments"], last["changes"], last["lag_s"], last["last_position"]) == (5, 15, 2.0, 5)
    assert last["last_time"] == seglib.us_to_iso(2_000_000)
    # an event that cannot be sent never fails the capture
    broken = SealedEvents(clock=lambda: now[0], emit=lambda *a: 1 / 0)
    assert broken.sealed("c", seg, 1, 0.0, {}) is False


# --------------------------------------------------------------------------- a resync in parts (chain rules)


def test_a_resync_in_parts_is_one_step_of_the_chain(tmp_path: Path) -> None:
    """A resync sealed in three parts: no time before its last part is restorable, ``latest``
    stops before a resync the chain holds only part of, a part out of place is a broken chain,
    and the state restores the resync whole (parts read as one generation; an abandoned resync's
    keys are gone once the next one is whole)."""
    s1 = _seg("s1", None, 11, 20, 1000, 2000)
    r0 = _seg("r0", s1, 21, 30, 2000, 2500, resync=True, part=0, done=False)
    r1 = _seg("r1", r0, 31, 30, 2500, 2800, resync=True, part=1, done=False)
    r2 = _seg("r2", r1, 31, 32, 2900, 3000, resync=True, part=2, done=True)
    s2 = _seg("s2", r2, 33, 40, 3000, 4000)
    fulls = [{"name": "base", "manifest_sha256": "bsha", "position": 10, "url": "file:///base"}]
    chains, problems = build_chains([s2, r2, r1, r0, s1])
    assert problems == [] and [s.name for s in chains[0].segments] == ["s1", "r0", "r1", "r2", "s2"]
    assert chains[0].consistent() == [True, False, False, True, True]
    assert chains[0].intervals() == [(1000, 2000), (2900, 4000)]
    for inside in (2100, 2500, 2700, 2850):  # a point inside the half-written resync is refused
        with pytest.raises(ArchiveError, match="outside the restorable window"):
            choose(chains, problems, fulls, source="s", at_time=inside)
    p = choose(chains, problems, fulls, source="s", at_time=3500)
    assert [s.name for s in p.segments] == ["r0", "r1", "r2", "s2"] and p.start_name is None
    assert p.start_position == 20
    p = choose(chains, problems, fulls, source="s", at_time=1500)
    assert [s.name for s in p.segments] == ["s1"] and p.start_name == "base"

    # the chain ends inside a resync (a capture stopped mid-listing): latest is its last whole point
    cut, cut_problems = build_chains([s1, r0, r1])
    p = choose(cut, cut_problems, fulls, source="s", latest=True)
    assert [s.name for s in p.segments] == ["s1"] and p.at_position == 20

    # a part that does not follow the part before it (moved, or its predecessor replaced)
    stray = _seg("stray", s1, 21, 30, 2000, 2500, resync=True, part=1, done=True)
    _, bad = build_chains([s1, stray])
    assert bad and "continues a resync" in bad[0]

    # the records: one resync id across the parts is one generation; an abandoned resync (id 1)
    # followed by a whole one (id 2) keeps only what the whole one lists
    def changes() -> list[Record]:
        return [
            change_record("put", b"/old", b"o", 21, 1, {"resync": 1}),  # abandoned mid-listing
            change_record("put", b"/a", b"a", 25, 2, {"resync": 2}),  # part 0
            change_record("put", b"/b", b"b", 25, 2, {"resync": 2}),  # part 1 (same resync id)
            change_record("put", b"/c", b"c", 26, 3000),  # a change after the resync
        ]

    point = Point(chain=Chain(), segments=[], start_name=None, start_sha=None, start_position=20, at_time=5000,
                  at_position=None)
    state = {r.key: r.value for r in seglib.materialize(iter([]), iter(changes()), point, tmp_path)}
    assert state == {b"/a": b"a", b"/b": b"b", b"/c": b"c"}
    base = [Record(b"/gone", b"g")]  # a key of the base no resync listed is gone too
    state = {r.key: r.value for r in seglib.materialize(iter(base), iter(changes()), point, tmp_path)}
    assert b"/gone" not in state


# --------------------------------------------------------------------------- a large resync, real servers


def _follow_in_process(url: str, store: Path, name: str, key: Path, until: Any, monkeypatch: Any,
                       seal_bytes: int) -> list[tuple[str, dict[str, Any]]]:
    """Run :func:`tasks.capture.capture_changes` on a thread until ``until()`` holds (a hang
    guard in ``wait_for``), with ``seal_bytes`` and the sealed events collected."""
    import tasks.capture as tc
    from blocks.resolve import source_from_ref, store_from_ref

    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(tc, "SEALED_EVENTS", SealedEvents(emit=lambda s, p: sent.append((s, p))))
    write, _ = _keys(key)
    stop = threading.Event()
    failed: list[BaseException] = []
    work = store.parent / f"work-{name}"
    work.mkdir()

    def run() -> None:
        try:
            tc.capture_changes(source_from_ref(url), store_from_ref(str(store)), name, write, work,
                               seal_every=1.0, seal_bytes=seal_bytes, stop=stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failed.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        wait_for("the capture to get there", lambda: failed or until())
    finally:
        stop.set()
        t.join(timeout=300)
    assert not failed, failed
    assert not t.is_alive(), "the capture did not stop"
    return sent


def _check_resync_parts(store: Path, name: str, key: Path, seal_bytes: int, per_key: int) -> list[Segment]:
    """The source's first resync was sealed in parts of bounded size, numbered in chain order,
    only the last one whole; the restorable window starts when it was whole, never inside it."""
    from blocks.resolve import store_from_ref
    from tasks.chain import read_chains, resolve_point

    _, keys = _keys(key)
    st = store_from_ref(str(store))
    found = read_chains(st, name, keys)
    assert found.problems == [] and found.bad == [] and len(found.chains) == 1, (found.problems, found.bad)
    parts = [s for s in found.chains[0].segments if s.resync]
    first_done = next(i for i, s in enumerate(parts) if s.resync_done)
    resync = parts[: first_done + 1]
    assert len(resync) >= 3, [(s.resync_part, s.changes) for s in parts]
    assert [s.resync_part for s in resync] == list(range(len(resync)))
    assert [s.resync_done for s in resync] == [False] * (len(resync) - 1) + [True]
    # bounded: a part holds what reaches seal_bytes and not more than one key beyond it
    assert all(s.changes <= seal_bytes // per_key + 2 for s in resync), [s.changes for s in resync]
    win = found.window()
    done_at = resync[-1].first_time
    assert win.start is not None and win.start >= done_at, (win.describe(), seglib.show_time(done_at))
    inside = resync[0].last_time
    assert inside < done_at
    with pytest.raises(ArchiveError, match="outside the restorable window"):
        resolve_point(st, name, keys, at_time=inside)
    return resync


@pytest.mark.timeout(1200)  # a hang guard: a capture and a restore on a busy machine
def test_a_large_zookeeper_resync_is_sealed_in_parts_and_restores_whole(zk_a, store, key, monkeypatch) -> None:
    from blocks.zookeeper import ZkWatch

    monkeypatch.setattr(ZkWatch, "RESYNC_PIECE", 16 * 1024)
    seal_bytes, value = 64 * 1024, 1000
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root, b"")
        for i in range(300):
            c.create(f"{root}/n{i:04d}", b"%04d" % i + b"v" * (value - 4))
        url = f"zk://{zk_a.url}{root}"
        name = "src-" + root.strip("/")
        r = cli("backup", url, "--to", str(store), "--name", name, "--key-file", str(key))
        assert r.returncode == 0, r.stderr[-3000:]
        c.delete(f"{root}/n0000")  # after the base: the resync is the state, not the base
        state: dict[str, Any] = {}

        def after_resync() -> bool:
            if not any(m.get("resync_done") for m in segments(store, name)):
                return False
            if not state:  # the resync is whole: one more change, followed live
                last = c.create(f"{root}/after", b"a", include_data=True)[1]
                state.update(zxid=last.czxid)
            return covered(store, name, state["zxid"])

        _follow_in_process(url, store, name, key, after_resync, monkeypatch, seal_bytes)
        _check_resync_parts(store, name, key, seal_bytes, value + 64)
        want = {p[len(root):]: v for p, v in snapshot(c, root).items()}
        target = unique_root()
        r = restore(store, name, key, f"zk://{zk_a.url}{target}", "--at", "latest")
        assert r.returncode == 0, r.stderr[-3000:]
        got = {p[len(target):]: v for p, v in snapshot(c, target).items()}
        assert got == want, f"{len(got)} nodes against {len(want)}"
        assert "/n0000" not in got and "/after" in got


@pytest.mark.timeout(1200)  # a hang guard: a capture and a restore on a busy machine
def test_a_large_consul_resync_is_sealed_in_parts_and_restores_whole(consul_a, consul_b, store, key,
                                                                      monkeypatch) -> None:
    from blocks.consul import ConsulWatch

    monkeypatch.setattr(ConsulWatch, "RESYNC_PIECE", 16 * 1024)
    seal_bytes, value = 64 * 1024, 1000
    c = consul_client(consul_a.url)
    prefix = unique("resync")
    for i in range(300):
        c.kv.put(f"{prefix}/n{i:04d}", f"{i:04d}" + "v" * (value - 4), flags=i % 3)
    url = f"consul://{consul_a.host}:{consul_a.port}/{prefix}"
    name = unique("src")
    r = cli("backup", url, "--to", str(store), "--name", name, "--key-file", str(key))
    assert r.returncode == 0, r.stderr[-3000:]
    c.kv.delete(f"{prefix}/n0000")
    state: dict[str, Any] = {}

    def after_resync() -> bool:
        if not any(m.get("resync_done") for m in segments(store, name)):
            return False
        if not state:
            c.kv.put(f"{prefix}/after", "a")
            state.update(index=int(c.kv.get(prefix + "/", recurse=True)[0]))
        return covered(store, name, state["index"])

    _follow_in_process(url, store, name, key, after_resync, monkeypatch, seal_bytes)
    _check_resync_parts(store, name, key, seal_bytes, value + 64)
    want = {k[len(prefix):]: v for k, v in consul_snapshot(c, prefix + "/").items()}
    target = unique("into")
    r = restore(store, name, key, f"consul://{consul_b.host}:{consul_b.port}/{target}", "--at", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    got = {k[len(target):]: v for k, v in consul_snapshot(consul_client(consul_b.url), target + "/").items()}
    assert got == want, f"{len(got)} keys against {len(want)}"
    assert "/n0000" not in got and "/after" in got


# --------------------------------------------------------------------------- one capture per source


def _backed_up_prefix(etcd: Any, store: Path, key: Path, label: str) -> tuple[Etcd, str, str, str]:
    """A new etcd prefix holding one key, and its full backup: ``(client, prefix, url, source name)``."""
    e = Etcd(etcd.url)
    prefix = "/" + unique(label)
    e.put(prefix.encode() + b"/seed", b"s")
    url = f"etcd://{etcd.host}:{etcd.port}{prefix}"
    name = unique("src")
    r = cli("backup", url, "--to", str(store), "--name", name, "--key-file", str(key))
    assert r.returncode == 0, r.stderr[-3000:]
    return e, prefix, url, name


@pytest.mark.timeout(1200)  # a hang guard: two captures and a restore on a busy machine
def test_a_second_capture_of_a_source_waits_for_the_first_and_the_chain_does_not_fork(
        etcd_a, etcd_b, store, key, tmp_path) -> None:
    """The second capture waits for the first's lock and continues its chain. While it waits it
    follows etcd ahead of the lock, so it is caught up when the first stops: the window runs on
    without a break across the hand-over, and a point just after the first stopped (before the
    second held the lock) restores exactly."""
    from blocks.resolve import store_from_ref
    from tasks.chain import read_chains

    e, prefix, url, name = _backed_up_prefix(etcd_a, store, key, "lock")
    first = capture_proc(tmp_path, "first", url, str(store), name, key)
    second = None
    try:
        rev = e.put(prefix.encode() + b"/one", b"1")
        first.wait_for("the first capture's segment", lambda: covered(store, name, rev))
        second = capture_proc(tmp_path, "second", url, str(store), name, key)
        wait_for("the second capture to catch up while it waits for the lock",
                 lambda: CAUGHT_UP in second.stderr() or second.proc.poll() is not None)
        assert second.proc.poll() is None, second.stderr()[-3000:]
        rev = e.put(prefix.encode() + b"/two", b"2")  # the first still follows, alone (the second sees it too)
        first.wait_for("the first capture's next segment", lambda: covered(store, name, rev))
        before = {m["_path"].name for m in segments(store, name)}
        first.proc.send_signal(signal.SIGINT)  # the first stops (seals what it saw): the lock is free
        first.finish()
        # a point in the hand-over: the first has stopped, the second may not hold the lock yet
        # (Prefect's retry of a held limit waits up to 30 s), and without following ahead it
        # would not have caught up by then: a gap in the window
        handover = now_iso()
        then = e.snapshot(prefix.encode() + b"/")
        rev = e.put(prefix.encode() + b"/three", b"3")
        second.wait_for("the second capture's segment", lambda: covered(store, name, rev))
    finally:
        first.kill()
        if second is not None:
            second.kill()
    err = second.stderr()
    waits = [line for line in err.splitlines() if "waiting for the per-cluster lock" in line]
    assert len(waits) == 1 and f"capture-{name}" in waits[0], waits
    assert "caught up ahead of the lock" in err, err[-3000:]
    window = _restorable(store, name, key)
    assert window["gaps"] == [], window
    assert to_us(window["from"]) < to_us(handover) < to_us(window["to"]), (handover, window)
    target = "/" + unique("handover")
    r = restore(store, name, key, f"etcd://{etcd_b.host}:{etcd_b.port}{target}", "--at", handover)
    assert r.returncode == 0, r.stderr[-3000:]
    got = Etcd(etcd_b.url).snapshot(target.encode() + b"/")
    assert {k[len(target):]: v for k, v in got.items()} == {k[len(prefix):]: v for k, v in then.items()}
    assert set(then) == {prefix.encode() + b"/" + k for k in (b"seed", b"one", b"two")}
    _, keys = _keys(key)
    found = read_chains(store_from_ref(str(store)), name, keys)
    assert found.problems == [] and found.bad == [], (found.problems, found.bad)
    assert len(found.chains) == 1, "two chains: the second capture did not continue the first's"
    names = [s.name.rsplit("/", 1)[-1] for s in found.chains[0].segments]
    assert set(names) >= before and len(names) > len(before)


def _restorable(store: Path, name: str, key: Path) -> dict[str, Any]:
    """The source's restorable window as ``burrow status --json`` shows it."""
    status = run_burrow("status", str(store), "--source", name, "--key-file", str(key), "--json")
    assert status.returncode == 0, status.stderr[-3000:]
    (entry,) = [x for x in json.loads(status.stdout)["sources"] if x["source"] == name]
    return entry["restorable"]


#: What a capture that waits for the lock says once it has caught up with the source.
CAUGHT_UP = "caught up with the source while waiting for the lock"


class _Tree:
    """A small tree of one service, written and read with the service's own client."""

    def __init__(self, service: str, server: Any) -> None:
        self.service, self.server = service, server
        if service == "zookeeper":
            self._kz = kazoo(server.url)
            self.c = self._kz.__enter__()
            self.root = unique_root()
            self.url = f"zk://{server.host}:{server.port}{self.root}"
        else:
            self.c = consul_client(server.url)
            self.root = unique("handover")
            self.url = f"consul://{server.host}:{server.port}/{self.root}"

    def put(self, rel: str, value: bytes) -> int:
        """Write ``rel`` (created or updated); its position: a zxid or a Consul index."""
        if self.service == "zookeeper":
            path = f"{self.root}/{rel}"
            if self.c.exists(path):
                return self.c.set(path, value).mzxid
            self.c.create(path, value, makepath=True)
            return self.c.exists(path).mzxid
        self.c.kv.put(f"{self.root}/{rel}", value)
        return int(self.c.kv.get(f"{self.root}/{rel}")[0])

    def delete(self, rel: str) -> None:
        if self.service == "zookeeper":
            self.c.delete(f"{self.root}/{rel}")
        else:
            self.c.kv.delete(f"{self.root}/{rel}")

    def state(self) -> dict[str, bytes]:
        """Every key below the root, relative to it, with its value."""
        if self.service == "zookeeper":
            return {k[len(self.root):]: v for k, v in snapshot(self.c, self.root).items() if k != self.root}
        return {k[len(self.root):]: v[0] for k, v in consul_snapshot(self.c, self.root + "/").items()}

    def close(self) -> None:
        if self.service == "zookeeper":
            self._kz.__exit__(None, None, None)


@pytest.mark.timeout(1200)  # a hang guard: two captures and a restore on a busy machine
@pytest.mark.parametrize("service", ["zookeeper", "consul"])
def test_a_capture_waiting_for_the_lock_resyncs_ahead_and_the_window_does_not_break(
        service, request, store, key, tmp_path) -> None:
    """ZooKeeper and Consul begin every capture with a resync (the whole tree). A capture that
    waits for the lock does it while it waits, and follows the changes after it; once it holds the
    lock it goes on from the chain's end: no gap in the window at the hand-over, and points in it
    (a change made while both followed, then one made after the first stopped) restore exactly."""
    prefix = "zk" if service == "zookeeper" else "consul"
    src, into = request.getfixturevalue(f"{prefix}_a"), request.getfixturevalue(f"{prefix}_b")
    tree = _Tree(service, src)
    try:
        tree.put("seed", b"s")
        tree.put("gone", b"g")
        name = unique("src")
        r = cli("backup", tree.url, "--to", str(store), "--name", name, "--key-file", str(key))
        assert r.returncode == 0, r.stderr[-3000:]
        first = capture_proc(tmp_path, "first", tree.url, str(store), name, key)
        second = None
        try:
            pos = tree.put("one", b"1")
            first.wait_for("the first capture's segment", lambda: covered(store, name, pos))
            second = capture_proc(tmp_path, "second", tree.url, str(store), name, key)
            wait_for("the second capture to resync while it waits for the lock",
                     lambda: CAUGHT_UP in second.stderr() or second.proc.poll() is not None)
            assert second.proc.poll() is None, second.stderr()[-3000:]
            # changes both captures see: the first seals them, the second keeps them past its resync
            tree.put("one", b"1-updated")
            tree.delete("gone")
            pos = tree.put("two", b"2")
            first.wait_for("the first capture's segment", lambda: covered(store, name, pos))
            both = now_iso()
            at_both = tree.state()
            first.proc.send_signal(signal.SIGINT)  # the first stops: the lock is free
            first.finish()
            handover = now_iso()  # the second may not hold the lock yet (Prefect retries in up to 30 s)
            at_handover = tree.state()
            tree.put("three", b"3")
            # its positions are the second's own past the chain's end, not the source's: wait on time,
            # from once the second has sealed its resync: a segment that ends after a change made
            # then ("four") saw it, and "three" before it
            second.wait_for("the second capture's resync", lambda: len(resyncs(segments(store, name))) == 2)
            tree.put("four", b"4")
            after = now_iso()
            second.wait_for("the second capture's segment", lambda: sealed_past(store, name, after))
        finally:
            first.kill()
            if second is not None:
                second.kill()
        err = second.stderr()
        assert "caught up ahead of the lock" in err and "following afresh" not in err, err[-3000:]
        window = _restorable(store, name, key)
        chain = [{k: m.get(k) for k in ("first_position", "last_position", "first_time", "last_time", "resync",
                                        "resync_part", "resync_done", "catching_up")} for m in segments(store, name)]
        assert window["gaps"] == [], (window, chain)
        assert to_us(window["from"]) < to_us(both) < to_us(handover) < to_us(window["to"]), (both, handover, window, chain)
        assert at_both == at_handover == {"/seed": b"s", "/one": b"1-updated", "/two": b"2"}, at_handover
        for label, point, want in (("both", both, at_both), ("handover", handover, at_handover),
                                   ("latest", "latest", {**at_handover, "/three": b"3", "/four": b"4"})):
            target = _Tree(service, into)
            try:
                r = restore(store, name, key, target.url, "--at", point)
                assert r.returncode == 0, (label, r.stderr[-3000:])
                assert target.state() == want, label
            finally:
                target.close()
    finally:
        tree.close()


def test_a_capture_killed_outright_frees_its_lock_for_the_next_on_this_host_at_once(
        etcd_a, store, key, tmp_path) -> None:
    """The first capture is SIGKILLed (it cannot release its lock; its lease would hold the slot
    a minute). The next capture on the same host finds its recorded holder gone, releases that
    lease, and continues the chain without waiting for the lease to run out."""
    from blocks.resolve import store_from_ref
    from tasks.chain import read_chains

    e, prefix, url, name = _backed_up_prefix(etcd_a, store, key, "lockgone")
    first = capture_proc(tmp_path, "first", url, str(store), name, key)
    second = None
    try:
        rev = e.put(prefix.encode() + b"/one", b"1")
        first.wait_for("the first capture's segment", lambda: covered(store, name, rev))
        pid = first.proc.pid
        first.kill()
        second = capture_proc(tmp_path, "second", url, str(store), name, key)
        rev = e.put(prefix.encode() + b"/two", b"2")
        second.wait_for("the second capture's segment", lambda: covered(store, name, rev))
    finally:
        first.kill()
        if second is not None:
            second.kill()
    err = second.stderr()
    assert "waiting for" not in err, err[-3000:]
    (freed,) = [line for line in err.splitlines() if "which has ended" in line]
    assert f"capture-{name}" in freed and f"process {pid} " in freed, freed
    _, keys = _keys(key)
    found = read_chains(store_from_ref(str(store)), name, keys)
    assert found.problems == [] and found.bad == [] and len(found.chains) == 1, (found.problems, found.bad)


# --------------------------------------------------------------------------- leased keys


@pytest.mark.timeout(1200)  # a hang guard: a capture and two restores on a busy machine
def test_a_captured_leased_key_is_restored_with_a_lease(etcd_a, etcd_b, store, key, tmp_path) -> None:
    """With ``--include-leased``, a leased put is captured with its lease's TTL and ``restore --at``
    grants the key a fresh lease, as a restore of ``backup --include-leased`` does; a key without
    a lease stays without. The capture's ``burrow.capture.sealed`` event carries counts and lag."""
    e = Etcd(etcd_a.url)
    prefix = "/" + unique("lease")
    p = prefix.encode()
    e.put(p + b"/plain0", b"p")
    url = f"etcd://{etcd_a.host}:{etcd_a.port}{prefix}"
    name = unique("src")
    since = datetime.now(UTC) - timedelta(seconds=5)
    r = cli("backup", url, "--to", str(store), "--name", name, "--key-file", str(key), "--include-leased")
    assert r.returncode == 0, r.stderr[-3000:]
    cap = capture_proc(tmp_path, "cap", url, str(store), name, key, "--include-leased")
    try:
        lease = e.grant(600)
        e.put(p + b"/leased", b"L", lease=lease)
        rev = e.put(p + b"/plain1", b"q")
        cap.wait_for("the leased put sealed", lambda: covered(store, name, rev))
        sealed = wait_for("a burrow.capture.sealed event", lambda: source_events(name, "burrow.capture.sealed", since))
    finally:
        cap.kill()
    payload = sealed[0].payload
    assert payload["segments"] >= 1 and payload["lag_s"] >= 0 and "changes_since_last" in payload, payload
    assert prefix not in json.dumps(payload) and "leased" not in json.dumps(payload)

    b = Etcd(etcd_b.url)
    for point in (("--at", "latest"), ("--at-revision", str(rev))):
        target = "/" + unique("into")
        r = restore(store, name, key, f"etcd://{etcd_b.host}:{etcd_b.port}{target}", *point)
        assert r.returncode == 0, r.stderr[-3000:]
        got = b.snapshot(target.encode() + b"/", with_meta=True)
        t = target.encode()
        assert {k[len(t):]: v["value"] for k, v in got.items()} == {b"/plain0": b"p", b"/leased": b"L",
                                                                     b"/plain1": b"q"}
        leased = got[t + b"/leased"]["lease"]
        assert leased and leased != lease, "the restored key holds no lease (or the source's own)"
        assert 0 < b.ttl(leased) <= 600
        assert got[t + b"/plain1"]["lease"] == 0 and got[t + b"/plain0"]["lease"] == 0


# --------------------------------------------------------------------------- the gap event


@pytest.mark.timeout(1200)  # a hang guard: a capture, a backup inside it, on a busy machine
def test_the_gap_event_carries_its_first_and_last_positions_and_times(tmp_path, store, key) -> None:
    """etcd compacted past the base archive's revision before capture starts: the capture records
    a gap and ``burrow.capture.gap``, read back from the Prefect API, names the gap's first and
    last revisions and times (no key, no value)."""
    from burrow.testing.servers import start_etcd

    etcd = start_etcd(tmp_path / "etcd")  # a private server: a compaction is cluster-wide
    try:
        e = Etcd(etcd.url)
        prefix = "/" + unique("gap")
        p = prefix.encode()
        e.put(p + b"/seed", b"secret-value-0")
        url = f"etcd://{etcd.host}:{etcd.port}{prefix}"
        name = unique("src")
        r = cli("backup", url, "--to", str(store), "--name", name, "--key-file", str(key))
        assert r.returncode == 0, r.stderr[-3000:]
        base_rev = e.revision()
        for i in range(10):
            e.put(p + b"/lost%02d" % i, b"secret-value-%d" % i)
        compacted = e.revision()
        e._post("/v3/kv/compaction", {"revision": str(compacted), "physical": True})
        before_capture = datetime.now(UTC)
        since = before_capture - timedelta(seconds=5)
        cap = capture_proc(tmp_path, "cap", url, str(store), name, key)
        try:
            (event,) = cap.wait_for("the burrow.capture.gap event",
                                    lambda: source_events(name, "burrow.capture.gap", since))
        finally:
            cap.kill()
    finally:
        etcd.stop()
    gap = event.payload["gap"]
    assert (gap["from_position"], gap["to_position"]) == (base_rev + 1, compacted - 1), gap
    start, end = seglib.iso_to_us(gap["from_time"]), seglib.iso_to_us(gap["to_time"])
    assert start <= end and end >= int(before_capture.timestamp() * 1e6) - 1_000_000, gap
    text = json.dumps(event.payload)
    assert "secret-value" not in text and prefix not in text and "lost" not in text, text
    (seg,) = [m for m in segments(store, name) if m.get("gap")]
    assert (seg["gap"]["from_time"], seg["gap"]["to_time"]) == (gap["from_time"], gap["to_time"])


# --------------------------------------------------------------------------- Object Lock


@pytest.mark.timeout(1200)  # a hang guard: a backup, a capture and S3 calls on a busy machine
def test_segments_on_s3_carry_the_stores_object_lock_as_archives_do(moto, etcd_a, key, tmp_path) -> None:
    from test_stores import minio_store, new_bucket, raw_client

    bucket = new_bucket(moto, lock=True)
    locked = minio_store(moto, bucket, prefix="pitr", object_lock_mode="GOVERNANCE", retain_days=2)
    store_url = locked.describe() + "&object_lock=GOVERNANCE&retain_days=2"
    e = Etcd(etcd_a.url)
    prefix = "/" + unique("lock")
    e.put(prefix.encode() + b"/seed", b"s")
    url = f"etcd://{etcd_a.host}:{etcd_a.port}{prefix}"
    name = unique("src")
    r = cli("backup", url, "--to", store_url, "--name", name, "--key-file", str(key))
    assert r.returncode == 0, r.stderr[-3000:]
    cap = capture_proc(tmp_path, "cap", url, store_url, name, key)
    try:
        e.put(prefix.encode() + b"/one", b"1")
        # sealed: stored and the store's put returned (the lock is part of it; moto applies it
        # after the upload, as S3-compatible servers that ignore the upload's lock headers do)
        cap.wait_for("a sealed segment on S3", lambda: "capture: sealed " in cap.stderr())
    finally:
        cap.kill()
    segs = [a.name for a in locked.list(seglib.segments_prefix(name))]
    fulls = [a.name for a in locked.list(slug(name) + "/") if not seglib.is_segment_name(a.name)]
    assert segs and fulls
    soon = datetime.now(UTC) + timedelta(days=1)
    for n in fulls + segs:  # each segment is locked as the full archive is
        until = locked.locked_until(n)
        assert until is not None and until > soon, (n, until)
    c = raw_client(moto)
    key_name = f"pitr/{segs[0]}"
    version = c.head_object(Bucket=bucket, Key=key_name)["VersionId"]
    with pytest.raises(Exception, match="AccessDenied"):
        c.delete_object(Bucket=bucket, Key=key_name, VersionId=version)


# --------------------------------------------------------------------------- Ctrl-C inside a put


@pytest.mark.parametrize("stored", [True, False], ids=["after-the-object-is-stored", "before-it-is"])
def test_a_ctrl_c_inside_the_stores_put_neither_forks_the_chain_nor_loses_changes(
        etcd_a, etcd_b, store, key, monkeypatch, stored: bool) -> None:
    """A Ctrl-C lands inside the store's put of a segment: after the object is visible (a local
    store fsyncs its directory then; S3 answers late), or before it is written. The interrupted
    capture seals what it saw and ends: one chain, no fork, and ``restore --at latest`` holds
    every key written before the interrupt."""
    import tasks.capture as tc
    from blocks.local import LocalStore
    from blocks.resolve import source_from_ref, store_from_ref
    from tasks.chain import read_chains

    e = Etcd(etcd_a.url)
    prefix = "/" + unique("intr")
    p = prefix.encode()
    e.put(p + b"/seed", b"s")
    url = f"etcd://{etcd_a.host}:{etcd_a.port}{prefix}"
    name = unique("src")
    r = cli("backup", url, "--to", str(store), "--name", name, "--key-file", str(key))
    assert r.returncode == 0, r.stderr[-3000:]
    monkeypatch.setattr(tc, "SEALED_EVENTS", SealedEvents(emit=lambda s, p: None))
    real_put = LocalStore.put
    puts: list[str] = []
    last_rev = [float("inf")]

    def put(self: Any, obj: str, path: Path) -> Any:
        """The put of the segment that reaches the last write is interrupted (once)."""
        if "/changes/" in obj and not puts:
            with open(path, "rb") as f:
                reaches = ArchiveReader(f).manifest["last_position"] >= last_rev[0]
            if reaches:
                puts.append(obj)
                if stored:
                    real_put(self, obj, path)
                raise KeyboardInterrupt
        return real_put(self, obj, path)

    monkeypatch.setattr(LocalStore, "put", put)
    write, keys = _keys(key)
    work = store.parent / f"work-{name}"
    work.mkdir()
    ended: list[BaseException] = []

    def run() -> None:
        try:
            tc.capture_changes(source_from_ref(url), store_from_ref(str(store)), name, write, work, seal_every=0.2)
        except BaseException as exc:  # noqa: BLE001 - the interrupt, reported to the test
            ended.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wanted = {b"/seed": b"s"}
    try:
        last_rev[0] = e.revision() + 20  # (the capture may seal the last write before its put answers)
        for i in range(20):
            e.put(p + b"/k%02d" % i, b"v%d" % i)
            wanted[b"/k%02d" % i] = b"v%d" % i
        wait_for("the interrupted put", lambda: ended or puts)
    finally:
        t.join(timeout=300)
    assert not t.is_alive(), "the capture did not end on the interrupt"
    assert len(ended) == 1 and isinstance(ended[0], KeyboardInterrupt), ended
    found = read_chains(store_from_ref(str(store)), name, keys)
    assert found.problems == [] and found.bad == [] and len(found.chains) == 1, (found.problems, found.bad)
    names = [s.name for s in found.chains[0].segments]
    assert (puts[0].rsplit("/", 1)[-1] in " ".join(names)) is stored, (puts, names)
    target = "/" + unique("into")
    r = restore(store, name, key, f"etcd://{etcd_b.host}:{etcd_b.port}{target}", "--at", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    t_ = target.encode()
    got = {k[len(t_):]: v for k, v in Etcd(etcd_b.url).snapshot(t_ + b"/").items()}
    assert got == wanted
