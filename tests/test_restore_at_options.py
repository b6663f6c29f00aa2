"""``burrow restore --at`` with the options of any restore (README, "Restore to a point in time":
"conflicts, ``--dry-run``, ``--subtree``, ``--map`` ... work the same"), and ``--at-revision``
refused for a source that is not etcd.

Real servers throughout: one small etcd chain, built once for the module (a full backup, a
capture, changes before and after a recorded instant, the state at that instant read with etcd's
own API), restored to that instant into fresh prefixes of another etcd and compared key by key
with the recorded state through etcd's own API; and a small ZooKeeper chain for the refusal."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from captureutil import (
    Capture,
    backup,
    cli,
    covered,
    error_lines,
    full_archives,
    make_key,
    now_iso,
    sealed_past,
    segments,
    wait_for,
)
from kvutil import Etcd, unique
from zkutil import kazoo, unique_root

from burrow.errors import EXIT_CONFLICTS, EXIT_OK, EXIT_USAGE, ArchiveError, UsageError
from burrow.segments import Segment, build_chains, choose

#: A hang guard for the module: a capture to wait for, then a handful of CLI runs, each a flow.
pytestmark = pytest.mark.timeout(900)


@dataclass
class Instant:
    """The module's chain and the instant its tests restore: the source's state then (relative
    keys, as an independent client read it) and the state at the chain's end (which differs)."""

    store: Path
    name: str
    key: Path
    at: str
    state: dict[bytes, bytes]
    later: dict[bytes, bytes]

    def __repr__(self) -> str:
        return f"<the chain of {self.name}, restored at {self.at}>"


def _relative(snapshot: dict[bytes, bytes], prefix: bytes) -> dict[bytes, bytes]:
    return {k[len(prefix):]: v for k, v in snapshot.items()}


def _caught_up(store: Path, name: str) -> bool:
    return any(not m.get("catching_up") and not m.get("gap") for m in segments(store, name))


@pytest.fixture(scope="module")
def instant(etcd_a: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instant]:
    """A source prefix on the shared etcd with keys in ``/a`` and ``/b``, its full archive, and a
    capture that saw changes in both (creates, updates, deletes) before the recorded instant and
    more after it; the capture is stopped once a sealed segment reaches past the instant."""
    work = tmp_path_factory.mktemp("at-options")
    key = make_key(work / "key")
    store = work / "store"
    store.mkdir()
    e = Etcd(etcd_a.url)
    prefix = "/" + unique("atopt")
    p = prefix.encode()
    e.put_many({p + b"/a/%d" % i: b"a%d" % i for i in range(1, 4)} | {p + b"/b/%d" % i: b"b%d" % i for i in range(1, 4)}
               | {p + b"/c": b"c"})
    url = f"etcd://{etcd_a.host}:{etcd_a.port}{prefix}"
    name = unique("atopt")
    backup(url, store, name, key)
    cap = Capture(url, store, name, key, seal="1s")
    try:
        wait_for("the capture to catch up", lambda: _caught_up(store, name), cap.proc)
        # before the instant: what a restore to it must carry
        e.put(p + b"/a/1", b"a1 updated")
        e.delete(p + b"/a/2")
        e.put(p + b"/a/4", b"a4 created")
        e.put(p + b"/b/4", b"b4 created")
        e.delete(p + b"/b/1")
        rev = e.revision()
        state = _relative(e.snapshot(p + b"/"), p)
        wait_for(f"a sealed segment up to revision {rev}", lambda: covered(store, name, rev), cap.proc)
        at = now_iso()
        # after it: what a restore to it must not carry
        e.put(p + b"/a/1", b"a1 after the instant")
        e.put(p + b"/a/5", b"a5 after the instant")
        e.delete(p + b"/a/3")
        e.put(p + b"/b/5", b"b5 after the instant")
        later_rev = e.revision()
        later = _relative(e.snapshot(p + b"/"), p)
        wait_for(f"a sealed segment up to revision {later_rev}, past {at}",
                 lambda: covered(store, name, later_rev) and sealed_past(store, name, at), cap.proc)
        cap.stop()
    finally:
        cap.kill()
    assert state != later
    yield Instant(store, name, key, at, state, later)


def _target(etcd_b: Any, label: str) -> tuple[str, bytes]:
    path = "/" + unique(label)
    return f"etcd://{etcd_b.host}:{etcd_b.port}{path}", path.encode()


def _in_target(etcd_b: Any, path: bytes) -> dict[bytes, bytes]:
    """Every key at or below the target prefix (an independent client: etcd's own API), relative."""
    return _relative(Etcd(etcd_b.url).snapshot(path), path)


def _restore_at(i: Instant, into: str, *options: str) -> subprocess.CompletedProcess:
    return cli("restore", str(i.store), "--source", i.name, "--at", i.at, "--into", into,
               "--key-file", str(i.key), *options)


def _counts(r: subprocess.CompletedProcess) -> dict[str, int]:
    """The summary line's counts (``planned_create=N, ..., conflicts=N``; its other fields left out)."""
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(("planned_create=", "created=")))
    pairs = (kv.split("=", 1) for kv in line.split(", "))
    return {k: int(v) for k, v in pairs if v.isdigit()}


def test_dry_run_at_prints_the_plan_and_writes_nothing(instant: Instant, etcd_b: Any) -> None:
    url, path = _target(etcd_b, "dry")
    r = _restore_at(instant, url, "--dry-run", "--list")
    assert r.returncode == EXIT_OK, r.stderr[-3000:]
    out = r.stdout.splitlines()
    assert out[0].startswith("dry run: nothing was written to "), r.stdout[-2000:]
    counts = _counts(r)
    assert counts["planned_create"] == len(instant.state) and counts["conflicts"] == 0, r.stdout[-2000:]
    listed = {ln.split(None, 1)[1] for ln in out if ln.startswith("create ")}
    assert listed == {k.decode() for k in instant.state}, r.stdout[-3000:]  # (relative to the target prefix)
    assert _in_target(etcd_b, path) == {}, "a dry run wrote keys"


def test_subtree_and_map_at_restore_only_that_subtree_where_mapped(instant: Instant, etcd_b: Any) -> None:
    url, path = _target(etcd_b, "subtree")
    r = _restore_at(instant, url, "--subtree", "/a", "--map", "/a=/moved")
    assert r.returncode == EXIT_OK, r.stderr[-3000:]
    want = {b"/moved" + k[2:]: v for k, v in instant.state.items() if k.startswith(b"/a/")}
    assert len(want) == 3  # /a/1 (updated), /a/3, /a/4 (created): /a/2 deleted before the instant
    got = _in_target(etcd_b, path)
    assert got == want, f"restore --at {instant.at} --subtree /a --map /a=/moved: {sorted(got)} against {sorted(want)}"
    counts = _counts(r)
    assert counts["created"] == len(want) and counts["outside_subtree"] == len(instant.state) - len(want), r.stdout


def test_map_at_renames_and_keeps_the_rest(instant: Instant, etcd_b: Any) -> None:
    url, path = _target(etcd_b, "map")
    r = _restore_at(instant, url, "--map", "/b=/bee")
    assert r.returncode == EXIT_OK, r.stderr[-3000:]
    want = {(b"/bee" + k[2:] if k.startswith(b"/b/") else k): v for k, v in instant.state.items()}
    assert _in_target(etcd_b, path) == want


def test_conflict_at_is_kept_reported_and_exits_3(instant: Instant, etcd_b: Any) -> None:
    url, path = _target(etcd_b, "conflict")
    e = Etcd(etcd_b.url)
    assert instant.state[b"/a/1"] == b"a1 updated"
    e.put(path + b"/a/1", b"the target's own")  # differs from the state at the instant: a conflict
    e.put(path + b"/b/2", instant.state[b"/b/2"])  # the same value: identical, not a conflict
    r = _restore_at(instant, url)
    assert r.returncode == EXIT_CONFLICTS, (r.returncode, r.stderr[-3000:])
    counts = _counts(r)
    assert counts["conflicts"] == 1 and counts["identical"] == 1, r.stdout
    assert counts["created"] == len(instant.state) - 2, r.stdout
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("conflict ")] == ["conflict /a/1"]
    assert "1 existing keys differ from the archive and were left as they are" in r.stderr
    assert _in_target(etcd_b, path) == {**instant.state, b"/a/1": b"the target's own"}


def test_at_revision_is_refused_for_a_zookeeper_chain(zk_a: Any, zk_b: Any, tmp_path: Path) -> None:
    """A ZooKeeper chain's positions are zxids, not revisions: ``--at-revision`` is a usage error
    (exit 2, one line), before anything is written; and for a ZooKeeper source with only a full
    archive (no chain) too."""
    key = make_key(tmp_path / "key")
    store = tmp_path / "store"
    store.mkdir()
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root, b"")
        for i in range(3):
            c.create(f"{root}/n{i}", b"v%d" % i)
        url = f"zk://{zk_a.url}{root}"
        name = "zk-" + root.strip("/")
        backup(url, store, name, key)
        cap = Capture(url, store, name, key, seal="1s")
        try:
            wait_for("the capture to catch up (its resync sealed)", lambda: _caught_up(store, name), cap.proc)
            zxid = c.create(f"{root}/after", b"a", include_data=True)[1].czxid
            wait_for(f"a sealed segment up to zxid {zxid}", lambda: covered(store, name, zxid), cap.proc)
            cap.stop()
        finally:
            cap.kill()
        bare = "zk-bare-" + root.strip("/")  # the same tree under another name: a full archive, no chain
        backup(url, store, bare, key)
    assert full_archives(store, name)
    target_root = unique_root()
    for source in (name, bare):
        r = cli("restore", str(store), "--source", source, "--at-revision", str(zxid),
                "--into", f"zk://{zk_b.url}{target_root}", "--key-file", str(key))
        assert r.returncode == EXIT_USAGE, (source, r.returncode, r.stderr[-3000:])
        errors = error_lines(r)
        assert len(errors) == 1, r.stderr[-3000:]
        assert "--at-revision applies to etcd only" in errors[0] and "zookeeper" in errors[0], errors[0]
    with kazoo(zk_b.url) as c:
        assert c.exists(target_root) is None, "a refused restore wrote to the target"


def _segment(name: str, service: str | None, prev: Segment | None = None) -> Segment:
    first = 11 if prev is None else prev.last_position + 1
    return Segment(name=name, url=f"file:///{name}", sha=f"sha-{name}", source="s", base_name="base", base_sha="bsha",
                   base_position=10, prev_name=prev.name if prev else None, prev_sha=prev.sha if prev else None,
                   first_position=first, last_position=first + 9, first_time=first * 100, last_time=(first + 9) * 100,
                   gap=None, changes=1, catching_up=False, service=service)


@pytest.mark.parametrize("service", ["zookeeper", "consul"])
def test_a_revision_is_a_usage_error_for_any_service_but_etcd(service: str) -> None:
    """The rule itself (burrow/segments.py ``choose``), for both services whose positions are not
    revisions, from the chain's manifests or, without a chain, the full archives' catalog rows;
    an etcd chain (or a hand-built segment naming no service) is looked up as before."""
    fulls = [{"name": "base", "manifest_sha256": "bsha", "position": 10, "url": "file:///base", "service": service}]
    s1 = _segment("s1", service)
    chains, problems = build_chains([s1, _segment("s2", service, s1)])
    with pytest.raises(UsageError, match=f"--at-revision applies to etcd only: source 's' is {service}"):
        choose(chains, problems, fulls, source="s", at_position=15)
    with pytest.raises(UsageError, match="--at-revision applies to etcd only"):
        choose([], [], fulls, source="s", at_position=15)
    assert choose(chains, problems, fulls, source="s", at_time=1500).segments  # --at TIME still restores it
    for other in ("etcd", None):
        e1 = _segment("e1", other)
        chains, problems = build_chains([e1, _segment("e2", other, e1)])
        etcd_fulls = [{**fulls[0], "service": "etcd"}]
        assert [s.name for s in choose(chains, problems, etcd_fulls, source="s", at_position=15).segments] == ["e1"]
    with pytest.raises(ArchiveError, match="no change segments"):
        choose([], [], [{**fulls[0], "service": "etcd"}], source="s", at_position=15)
