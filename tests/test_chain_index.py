"""Reading a change chain at scale (issue 19): a chain is read as the catalog reads archives (one
LIST of the segments, the source's index objects, which the capture writes as it seals), never
with a read per segment; its window authenticates each chain's end, whose links vouch for the
rest; a restore to a point authenticates only the segments it relies on (none before the start
archive's position) and downloads only those. The index is an untrusted cache: a stale, swapped
or forged entry changes neither the window, nor the point, nor what the restore writes.

The chain is real: a real etcd, real ``burrow backup`` and ``burrow capture`` runs (one second
seals, so a few dozen segments), into the moto S3 store and into a local store. Requests are
counted by wrapping the store's methods."""

from __future__ import annotations

import base64
import json
import re
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard
from captureutil import HANG_GUARD, wait_for
from conftest import run_cli, start_burrow
from kvutil import Etcd, unique
from test_stores import KEY, SECRET, minio_store, new_bucket

from blocks.local import LocalStore
from blocks.s3 import S3Store
from blocks.store import open_stored
from burrow import segments
from burrow.archive import canonical_json, manifest_digest
from burrow.crypto import ArchiveKeys
from burrow.keys import Keyring, keygen, read_key_file
from tasks import catalog as cat
from tasks import chain

#: Changes before and after the second full archive; each waits for a segment of its own.
BEFORE, AFTER = 14, 10


def aws_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


class Requests:
    """Counts what a store is asked: per method of the store's class (S3: each is a request)."""

    METHODS = ("list", "list_sidecars", "get_sidecar", "read_range", "get", "head", "open_read", "put_sidecar")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
        self.n: Counter[str] = Counter()
        for method in self.METHODS:
            real = getattr(cls, method, None)
            if real is None:
                continue

            def counted(store: Any, *a: Any, _real: Any = real, _m: str = method, **kw: Any) -> Any:
                self.n[_m] += 1
                return _real(store, *a, **kw)

            monkeypatch.setattr(cls, method, counted)

    def reset(self) -> None:
        self.n.clear()


class Authenticated:
    """Counts the segment manifests whose MAC tasks/chain.py checks, by segment name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        real = chain._authenticate

        def counted(reader: Any, keys: Any, allow_unencrypted: bool) -> None:
            self.names.append(str(reader.label))
            real(reader, keys, allow_unencrypted)

        monkeypatch.setattr(chain, "_authenticate", counted)


def _keys(path: Path) -> ArchiveKeys:
    ring = Keyring()
    ring.add(read_key_file(path))
    return ArchiveKeys(ring)


def _manifests(store: Any, name: str, seen: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The source's sealed segments' manifests (read directly, cached by name)."""
    for info in store.list(segments.segments_prefix(name)):
        if info.name not in seen:
            with open_stored(store, info.name, info.size) as reader:
                seen[info.name] = {**reader.manifest, "_name": info.name}
    return list(seen.values())


def _covered(store: Any, name: str, position: int, seen: dict[str, dict[str, Any]]) -> bool:
    return any(m["last_position"] >= position and not m.get("catching_up") for m in _manifests(store, name, seen))


@pytest.fixture(scope="module")
def world(etcd_a, moto, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """One real chain per store kind: a full archive, a capture sealing every second, a second
    full archive half way (the capture goes on with its chain), more changes; the capture killed."""
    tmp = tmp_path_factory.mktemp("chain-index")
    key = tmp / "k.key"
    keygen(key, x25519=False)
    bucket = new_bucket(moto)
    local = tmp / "store"
    local.mkdir()
    kinds = {
        "s3": (f"s3://{bucket}/ci?endpoint={moto.url}&addressing=path&checksum=when_required",
               minio_store(moto, bucket, prefix="ci")),
        "local": (str(local), LocalStore(path=str(local))),
    }
    out: dict[str, Any] = {"key": key}
    for kind, (url, store) in kinds.items():
        out[kind] = _make_chain(etcd_a, url, store, key)
    yield out


def _make_chain(etcd: Any, url: str, store: Any, key: Path) -> dict[str, Any]:
    e = Etcd(etcd.url)
    prefix = "/" + unique("ci")
    p = prefix.encode()
    e.put_many({p + b"/seed%02d" % i: b"s" for i in range(5)})
    source = f"etcd://{etcd.host}:{etcd.port}{prefix}"
    name = unique("chained")
    env = aws_env()

    def backup() -> str:
        r = run_cli("backup", source, "--to", url, "--name", name, "--key-file", str(key), env=env)
        assert r.code == 0, r
        return r.last_line.split("?", 1)[0].rsplit("/", 1)[1]

    full0 = backup()
    proc = start_burrow("capture", source, "--to", url, "--name", name, "--key-file", str(key), "--seal-every",
                        "1s", "--for", "30m", env=env)
    seen: dict[str, dict[str, Any]] = {}
    try:
        for i in range(BEFORE + AFTER):
            if i == BEFORE:
                full1 = backup()  # the chain goes on past it: a later point starts from this archive
            e.put(p + b"/c%03d" % i, b"v%d" % i)
            rev = e.revision()
            wait_for(f"a segment covering revision {rev}", lambda rev=rev: _covered(store, name, rev, seen), proc)
    finally:
        # stopped as a user stops it (Ctrl-C: it seals and indexes what it saw); a SIGKILL could land
        # between a segment's put and its index entry, which is only a cache, but this test counts it
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=HANG_GUARD)
        finally:
            proc.kill()
    return {"store": store, "url": url, "name": name, "prefix": prefix, "etcd": e, "source": source,
            "full0": full0, "full1": full1, "want": e.snapshot(p + b"/"), "host": f"etcd://{etcd.host}:{etcd.port}"}


def _relative(snapshot: dict[bytes, bytes], prefix: bytes) -> dict[bytes, bytes]:
    return {k[len(prefix):]: v for k, v in snapshot.items()}


def _restore_latest(w: dict[str, Any], key: Path) -> dict[bytes, bytes]:
    """``burrow restore --at latest`` into a fresh prefix; what it wrote, read with etcd's API."""
    target = "/" + unique("to")
    r = run_cli("restore", w["url"], "--source", w["name"], "--at", "latest", "--into", w["host"] + target,
                "--key-file", str(key), env=aws_env())
    assert r.code == 0, r
    return _relative(w["etcd"].snapshot(target.encode() + b"/"), target.encode())


def test_the_capture_indexes_each_segment_and_a_chain_reads_without_a_read_per_segment(world, monkeypatch) -> None:
    w, keys = world["s3"], _keys(world["key"])
    store, name = w["store"], w["name"]
    infos = [i for i in store.list(segments.segments_prefix(name)) if segments.is_segment_name(i.name)]
    assert len(infos) >= BEFORE + AFTER, len(infos)
    # the capture indexed every segment as it sealed it, in the source's own index, in a few objects
    prefix = cat.index_prefix(infos[0].name)
    assert prefix == f"_catalog/{segments.segments_prefix(name)}"
    objects, entries = cat._read_index(store, prefix=prefix)
    assert {i.name for i in infos} <= set(entries), "a sealed segment is missing from the index"
    assert 1 <= len(objects) <= 2 * cat.INDEX_MERGE_FANOUT, objects
    assert not any(n.startswith(prefix) for n in cat._index_names(store)), "the catalog's index lists the chain's"

    asked, macs = Requests(monkeypatch, S3Store), Authenticated(monkeypatch)
    found = chain.read_chains(store, name, keys)
    assert not found.bad and not found.problems and len(found.chains) == 1
    assert sum(len(c.segments) for c in found.chains) == len(infos)
    # one LIST of the segments, one of the index, one GET per index object: no ranged read at all
    assert asked.n["read_range"] == 0 and asked.n["get"] == 0, asked.n
    assert asked.n["list"] == 1 and asked.n["list_sidecars"] == 1 and asked.n["get_sidecar"] == len(objects), asked.n
    # one MAC: the chain's end, whose links (manifest checksums) vouch for every segment before it
    assert len(macs.names) == 1 and found.chains[0].last.name in macs.names[0], macs.names
    last = max(segments.iso_to_us(m["last_time"]) for m in _manifests(store, name, {}))
    assert found.window().end == last

    # status and list show that window, from the same code
    r = run_cli("status", w["url"], "--source", name, "--json", "--no-verify", "--key-file", str(world["key"]),
                env=aws_env())
    assert r.code == 0, r
    assert json.loads(r.out)["sources"][0]["restorable"]["to"] == segments.us_to_iso(last)


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_a_restore_to_a_point_authenticates_and_reads_only_the_segments_it_needs(world, kind, monkeypatch,
                                                                                  tmp_path) -> None:
    w, keys = world[kind], _keys(world["key"])
    store, name = w["store"], w["name"]
    total = len(store.list(segments.segments_prefix(name)))
    asked, macs = Requests(monkeypatch, type(store)), Authenticated(monkeypatch)
    point = chain.resolve_point(store, name, keys, latest=True)
    # the newest full archive the chain covers is the start: the segments before it are not needed
    assert point.start_name is not None and point.start_name.endswith(w["full1"]), point.start_name
    assert 1 <= len(point.segments) < total and point.segments[-1].last_position == max(
        s.last_position for s in point.chain.segments)
    relied = [s.name for s in point.segments] + [point.chain.live()[-1].name]
    assert all(any(n in label for n in relied) for label in macs.names), "a segment the point does not rely on " \
        "was authenticated"
    assert len(point.segments) <= len(macs.names) <= len(point.segments) + 1, macs.names
    if kind == "s3":
        # the chain and the start archive's position from the indexes: no ranged read per segment
        assert asked.n["read_range"] == 0 and asked.n["get"] == 0, asked.n
        assert sum(asked.n.values()) <= 30, asked.n
    else:
        # no index on a local store (a file opened in place is no request), and no MAC per segment
        assert asked.n["get"] == 0, asked.n

    asked.reset()
    local_base = tmp_path / "base.burrow"
    store.get(point.start_name, local_base)
    work = tmp_path / "work"
    work.mkdir()
    state, state_keys, manifest = chain.materialize_point(store, point, local_base, keys, work)
    assert asked.n["get"] == 1 + len(point.segments), asked.n  # the start archive, then each needed segment
    assert manifest["keys"] == len(w["want"])
    # and the restore of that point writes exactly the source's state, key by key (etcd's own API)
    want = _relative(w["want"], w["prefix"].encode())
    assert _restore_latest(w, world["key"]) == want


def _entry_with(entry: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of an index ``entry`` whose manifest says ``changes`` (same length, canonical form,
    its checksum recomputed: what a store writer without the key can make)."""
    tail = base64.b64decode(entry["tail"])
    start, end = tail.index(b"\n{") + 1, tail.rindex(b"}\n") + 1
    m = orjson.loads(tail[start:end])
    for k, v in changes.items():
        assert len(str(v)) == len(str(m[k])), (k, v, m[k])
        m[k] = v
    m["manifest_sha256"] = manifest_digest(m)
    body = canonical_json(m)
    assert len(body) == end - start
    return {**entry, "tail": base64.b64encode(tail[:start] + body + tail[end:]).decode()}


def _later(iso: str) -> str:
    """``iso`` a year later (same length)."""
    return re.sub(r"^(\d{4})", lambda g: str(int(g.group(1)) + 1), iso)


def test_a_stale_swapped_or_forged_index_entry_steers_nothing(world, monkeypatch) -> None:
    w, keys = world["s3"], _keys(world["key"])
    store, name = w["store"], w["name"]
    genuine = chain.read_chains(store, name, keys)
    genuine_point = chain.resolve_point(store, name, keys, latest=True)
    segs = genuine.chains[0].segments
    prefix = cat.index_prefix(segs[0].name)
    _, entries = cat._read_index(store, prefix=prefix)
    infos = {i.name: i for i in store.list(segments.segments_prefix(name))}
    last, before = segs[-1], segs[-2]
    planted = [
        # stale: the entry of another version of the object (its tag differs from the listing's)
        {**entries[segs[1].name], "etag": '"0123456789abcdef0123456789abcdef"'},
        # swapped: another segment's genuine bytes under this one's name, size and tag
        {**entries[segs[2].name], "name": segs[3].name, "size": infos[segs[3].name].size,
         "etag": infos[segs[3].name].etag},
        # forged: the chain's end says it reaches a year later (checksum recomputed; no key for the MAC)
        _entry_with(entries[last.name], last_time=_later(segments.us_to_iso(last.last_time))),
        # forged: the segment before it claims to hold changes up to a later time too
        _entry_with(entries[before.name], last_time=_later(segments.us_to_iso(before.last_time))),
    ]

    def plant() -> None:
        """The forged index object, named to win over every genuine one (a far-future stamp);
        planted again before each reader, as a reader that saw through it rewrites the index."""
        data = zstandard.ZstdCompressor().compress(canonical_json({"format": cat.INDEX_FORMAT, "entries": planted}))
        store.put_sidecar(f"{prefix}99991231T235959999999Z-{uuid.uuid4().hex[:8]}-n{len(planted)}{cat.INDEX_SUFFIX}",
                          data)
        assert cat._read_index(store, prefix=prefix)[1][last.name]["tail"] != entries[last.name]["tail"]

    plant()
    found = chain.read_chains(store, name, keys)
    assert [s.name for s in found.chains[0].segments] == [s.name for s in segs]
    assert found.window().intervals == genuine.window().intervals and not found.bad
    plant()
    point = chain.resolve_point(store, name, keys, latest=True)
    assert (point.start_name, [s.name for s in point.segments], point.at_position) == (
        genuine_point.start_name, [s.name for s in genuine_point.segments], genuine_point.at_position)
    plant()
    r = run_cli("status", w["url"], "--source", name, "--json", "--no-verify", "--key-file", str(world["key"]),
                env=aws_env())
    assert r.code == 0, r
    assert json.loads(r.out)["sources"][0]["restorable"] == genuine.window().to_json()
    plant()
    assert _restore_latest(w, world["key"]) == _relative(w["want"], w["prefix"].encode())
