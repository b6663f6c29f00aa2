"""Rehearsals: restore an archive into an empty scratch target, compare, time, clean up, and
record the result next to the archive as an authenticated marker that list and status show.

Everything is checked against real servers through independent clients (kazoo, etcd's JSON
gateway, py-consul), and the markers are read from the store's files directly."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kvutil import Etcd, consul_client, consul_snapshot, unique
from zkutil import kazoo, snapshot, unique_root

from blocks.resolve import source_from_ref
from burrow.archive import ArchiveReader
from burrow.cli import main
from burrow.errors import UsageError
from burrow.keys import keygen
from burrow.records import Record
from flows.backup import backup
from flows.rehearse import rehearse

SECRET = b"rehearsal-canary-value-5d1e"


def markers(store: Path) -> list[Path]:
    return sorted(store.rglob("*.rehearsal-*.burrow-meta"))


def flip_body_byte(path: Path) -> None:
    """Damage the archive's body (header and manifest stay intact, and authenticated)."""
    with open(path, "rb") as f:
        reader = ArchiveReader(f)
        at = reader.body_start + reader.body_length // 2
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def seed_zk(url: str, root: str) -> dict[str, bytes]:
    with kazoo(url) as c:
        c.create(root + "/cfg/a", b"1", makepath=True)
        c.create(root + "/cfg/b", SECRET)
        c.create(root + "/cfg/b/deep", b"")
        c.create(root + "/other", b"x" * 3000)
        return snapshot(c, root)


def test_zookeeper_rehearsal_marker_list_status_and_tampering(cli, capsys, zk_a, zk_b, store, tmp_path):
    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    root = unique_root()
    expected = seed_zk(zk_a.url, root)
    made = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-r", root=root, key_file=str(key))
    top = f"/burrow-rehearsal-{uuid.uuid4().hex[:8]}"
    scratch = f"zk://{zk_b.url}{top}/scratch"

    r = cli("rehearse", str(store), "--source", "dc-r", "--scratch", scratch, "--key-file", str(key))
    assert r.code == 0, r
    assert f"rehearsed {made['url']}: {len(expected)} keys restored" in r.out
    assert "(authenticated)" in r.out
    assert SECRET.decode() not in r.out + r.err

    # the scratch chroot, both levels of which the rehearsal created, is gone again
    with kazoo(zk_b.url) as c:
        assert c.exists(top) is None

    # one marker, next to the archive, naming it; no value, no key path
    (found,) = markers(store)
    archive_file = Path(made["url"].removeprefix("file://"))
    assert found.name.startswith(archive_file.name + ".rehearsal-") and found.parent == archive_file.parent
    marker = json.loads(found.read_bytes())
    assert marker["ok"] is True and marker["keys"] == len(expected) and marker["restore_s"] > 0
    assert marker["archive"] == archive_file.relative_to(store).as_posix()
    assert marker["content_sha256"] == made["content_sha256"] and marker["mac"]
    assert marker["scratch"] == f"zk://{zk_b.url}{top}/scratch"
    assert SECRET not in found.read_bytes() and root.encode() not in found.read_bytes()

    ls = cli("list", str(store), "--key-file", str(key))  # the real command once; in-process below (cheaper)
    assert ls.code == 0, ls
    assert f"rehearsed at {marker['at']}, {len(expected)} keys, restore took" in ls.out
    assert "UNAUTHENTICATED marker" not in ls.out
    (entry,) = run_json(capsys, "status", str(store), "--key-file", str(key), "--no-verify", "--json")["sources"]
    assert entry["rehearsal"]["ok"] is True and entry["rehearsal"]["authenticated"] is True
    assert entry["rehearsal"]["archive"] == made["url"] and entry["rehearsal"]["keys"] == len(expected)
    assert f"rehearsed at {marker['at']}, {len(expected)} keys" in run(capsys, "status", str(store), "--key-file",
                                                                         str(key), "--no-verify")

    # A planted newer marker (no key, so no valid MAC) does not replace the authentic one ...
    forged = dict(marker, at="2099-01-01T00:00:00Z", keys=999, mac="00" * 32)
    planted = found.with_name(archive_file.name + ".rehearsal-20990101T000000000000Z.burrow-meta")
    planted.write_bytes(json.dumps(forged).encode())
    rows = run_json(capsys, "list", str(store), "--key-file", str(key), "--json")
    assert rows[0]["rehearsal"]["authenticated"] is True and rows[0]["rehearsal"]["keys"] == len(expected)
    # ... and once the authentic one is edited too, the newest marker shows, unauthenticated
    found.write_bytes(json.dumps(dict(marker, restore_s=0.001)).encode())
    out = run(capsys, "list", str(store), "--key-file", str(key))
    assert "rehearsed at 2099-01-01T00:00:00Z, 999 keys" in out and "(UNAUTHENTICATED marker)" in out, out
    rows = run_json(capsys, "list", str(store), "--key-file", str(key), "--json")
    assert rows[0]["rehearsal"]["authenticated"] is False
    assert "MAC" in rows[0]["rehearsal"]["unauthenticated_reason"]
    # without a key nothing can be authenticated
    rows = run_json(capsys, "list", str(store), "--json")
    assert rows[0]["rehearsal"]["authenticated"] is False


def run(capsys, *argv: str) -> str:
    """``burrow ARGV`` in-process; its stdout (the exit code must be 0)."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    return out


def run_json(capsys, *argv: str) -> Any:
    return json.loads(run(capsys, *argv))


def test_a_corrupt_archive_is_recorded_as_a_failed_rehearsal_and_nothing_is_written(cli, capsys, zk_a, zk_b, store,
                                                                                     tmp_path):
    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    root = unique_root()
    seed_zk(zk_a.url, root)
    made = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-bad", root=root, key_file=str(key))
    flip_body_byte(Path(made["url"].removeprefix("file://")))
    top = f"/burrow-rehearsal-{uuid.uuid4().hex[:8]}"

    r = cli("rehearse", str(store), "--source", "dc-bad", "--scratch", f"zk://{zk_b.url}{top}", "--key-file", str(key))
    assert r.code == 1, r
    assert r.error_line.startswith("burrow: error: ") and "failed authentication" in r.error_line
    with kazoo(zk_b.url) as c:
        assert c.exists(top) is None  # rejected before any write
    (found,) = markers(store)
    marker = json.loads(found.read_bytes())
    assert marker["ok"] is False and "failed authentication" in marker["error"] and marker["mac"]
    assert f"rehearsal FAILED at {marker['at']}" in run(capsys, "list", str(store), "--key-file", str(key))
    rows = run_json(capsys, "list", str(store), "--key-file", str(key), "--json")
    assert rows[0]["rehearsal"] == {
        "at": marker["at"], "keys": 0, "restore_s": 0.0, "ok": False, "authenticated": True,
        "marker": found.relative_to(store).as_posix(), "error": marker["error"],
    }


def test_etcd_rehearsal_into_a_prefix_and_a_scratch_that_is_not_empty(etcd_a, etcd_b, store):
    src_prefix, scratch_prefix = unique("src"), unique("scratch")
    e_a, e_b = Etcd(etcd_a.url), Etcd(etcd_b.url)
    try:
        data = {f"/{src_prefix}/k{i}".encode(): f"v{i}".encode() for i in range(300)}
        data[f"/{src_prefix}/empty".encode()] = b""
        data[f"/{src_prefix}/bin".encode()] = bytes(range(256))
        e_a.put_many(data)
        host = etcd_a.url.split("://", 1)[1]
        made = backup(source=f"etcd://{host}/{src_prefix}", store=str(store), name="etcd-r", encryption=False)
        scratch = f"etcd://{etcd_b.url.split('://', 1)[1]}/{scratch_prefix}"
        since = datetime.now(UTC)

        done = rehearse(store=str(store), source="etcd-r", scratch=scratch)
        assert done["status"] == "ok" and done["archive"] == made["url"]
        assert done["compared"] == len(data) and done["scratch_missing"] == done["scratch_changed"] == 0
        assert done["cleanup_deleted"] == len(data) and done["cleanup_left"] == 0
        assert done["marker_authenticated"] is False  # an unencrypted archive has no key
        assert e_b.snapshot(f"/{scratch_prefix}".encode()) == {}
        (found,) = markers(store)
        marker = json.loads(found.read_bytes())
        assert marker["ok"] is True and marker["keys"] == len(data) and "mac" not in marker

        # a scratch target that holds a key is refused before anything is written, and no marker
        e_b.put(f"/{scratch_prefix}/someone-elses".encode(), b"keep")
        with pytest.raises(UsageError, match="already holds keys"):
            rehearse(store=str(store), source="etcd-r", scratch=scratch)
        assert e_b.snapshot(f"/{scratch_prefix}".encode()) == {f"/{scratch_prefix}/someone-elses".encode(): b"keep"}
        assert len(markers(store)) == 1
    finally:
        e_a.close()
        e_b.close()

    # each run emitted its event about the source, with the RTO and the scratch target
    events = rehearsal_events("etcd-r", since, 2)
    assert sorted(e.event for e in events) == ["burrow.rehearsal.completed", "burrow.rehearsal.failed"], events
    ok = next(e for e in events if e.event == "burrow.rehearsal.completed")
    assert ok.payload["rto_s"] > 0 and ok.payload["keys"] == len(data) and ok.payload["status"] == "ok"
    related = {r.role: r.id for r in ok.related}
    assert related["scratch"] == f"burrow.scratch.{scratch}" and related["archive"] == f"burrow.archive.{made['url']}"


def rehearsal_events(source: str, since: datetime, want: int) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    flt = EventFilter(occurred=EventOccurredFilter(since=since), event=EventNameFilter(prefix=["burrow.rehearsal."]))
    deadline = time.monotonic() + 30
    while True:  # events reach the API asynchronously: wait for them (a bound, never an assertion)
        with get_client(sync_client=True) as c:
            events = [e for e in c.read_events(filter=flt, limit=50).events if e.resource.id == f"burrow.source.{source}"]
        if len(events) >= want or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_delete_if_unchanged_deletes_only_keys_that_still_hold_the_restored_value(zk_b, etcd_b, consul_b):
    """The cleanup primitive of every source: a key whose value changed since (or that has
    children, in ZooKeeper) is left alone; a missing one is simply not deleted."""
    root = unique_root()
    with kazoo(zk_b.url) as c:
        c.create(root + "/same", b"s", makepath=True)
        c.create(root + "/changed", b"now")
        c.create(root + "/parent/child", b"c", makepath=True)
    session = source_from_ref(f"zk://{zk_b.url}").connect()
    try:
        got = session.delete_if_unchanged([
            Record(f"{root}/same".encode(), b"s"), Record(f"{root}/changed".encode(), b"before"),
            Record(f"{root}/parent".encode(), b""), Record(f"{root}/gone".encode(), b""),
        ])
    finally:
        session.close()
    assert got == [True, False, False, False]
    with kazoo(zk_b.url) as c:
        assert snapshot(c, root) == {root: b"", root + "/changed": b"now", root + "/parent": b"",
                                     root + "/parent/child": b"c"}

    prefix = unique("del")
    e = Etcd(etcd_b.url)
    try:
        e.put_many({f"/{prefix}/same".encode(): b"s", f"/{prefix}/changed".encode(): b"now"})
        session = source_from_ref(f"etcd://{etcd_b.url.split('://', 1)[1]}/{prefix}").connect()
        try:
            got = session.delete_if_unchanged([Record(b"/same", b"s"), Record(b"/changed", b"before"),
                                               Record(b"/gone", b"")])
        finally:
            session.close()
        assert got == [True, False, False]
        assert e.snapshot(f"/{prefix}/".encode()) == {f"/{prefix}/changed".encode(): b"now"}
    finally:
        e.close()

    c = consul_client(consul_b.url)
    c.kv.put(f"{prefix}/same", b"s")
    c.kv.put(f"{prefix}/changed", b"now")
    session = source_from_ref(f"consul://{consul_b.url.split('://', 1)[1]}/{prefix}").connect()
    try:
        got = session.delete_if_unchanged([Record(b"same", b"s"), Record(b"changed", b"before"),
                                           Record(b"gone", b"")])
    finally:
        session.close()
    assert got == [True, False, False]
    assert consul_snapshot(c, prefix + "/") == {f"{prefix}/changed": (b"now", 0, None)}


def test_public_key_backup_is_fully_verified_by_a_consul_rehearsal_where_the_identity_lives(consul_a, consul_b, moto,
                                                                                              tmp_path):
    """The backup worker holds only the recipient's public key (structure-only verify); the
    rehearsal, run with the identity, restores, compares and authenticates its marker. The
    store is S3 (moto): the marker is a sidecar object, authenticated through ranged reads."""
    from test_stores import minio_store, new_bucket

    store = minio_store(moto, new_bucket(moto), prefix="rh").describe()
    from blocks.keys import archive_keys
    from blocks.resolve import store_from_ref
    from tasks.catalog import describe_archives
    from tasks.markers import annotate

    ident = tmp_path / "id.key"
    keygen(ident, x25519=True)
    prefix, scratch_prefix = unique("pk"), unique("scratch")
    a = consul_client(consul_a.url)
    for i in range(50):
        a.kv.put(f"{prefix}/k{i}", f"v{i}")
    a.kv.put(f"{prefix}/folder/", b"")
    a.kv.put(f"{prefix}/flagged", b"f", flags=7)
    made = backup(source=f"consul://{consul_a.url.split('://', 1)[1]}/{prefix}", store=store, name="consul-pk",
                  recipients=[str(ident) + ".pub"])
    assert made["verified"] == "structure-only"

    done = rehearse(store=store, source="consul-pk", scratch=f"consul://{consul_b.url.split('://', 1)[1]}/"
                    f"{scratch_prefix}", identity_files=[str(ident)])
    assert done["status"] == "ok" and done["compared"] == 52 and done["marker_authenticated"] is True
    assert done["cleanup_deleted"] == 52 and done["cleanup_left"] == 0
    assert consul_snapshot(consul_client(consul_b.url), scratch_prefix + "/") == {}

    st = store_from_ref(store)
    keys = archive_keys(identity_files=[str(ident)])
    rows = describe_archives(st, keys)
    (marker,) = [n for n in st.list_sidecars() if ".rehearsal-" in n]
    assert rows[0]["url"] == made["url"] and marker.startswith(rows[0]["name"] + ".rehearsal-")
    annotate(st, rows, keys)
    assert rows[0]["rehearsal"]["ok"] is True and rows[0]["rehearsal"]["authenticated"] is True
    assert rows[0]["rehearsal"]["keys"] == 52
    rows = describe_archives(st)
    annotate(st, rows, None)  # the backup worker's view: no identity, so not authenticated
    assert rows[0]["rehearsal"]["authenticated"] is False


def test_the_rehearse_flow_refuses_credentials_in_its_parameters(tmp_path):
    """Flow parameters are kept in the run history: a URL with credentials is refused, and the
    message quotes nothing of it."""
    with pytest.raises(UsageError) as err:
        rehearse(store=str(tmp_path), source="x", scratch="zk://admin:CANARY-pw@127.0.0.1:1/scratch")
    assert "CANARY" not in str(err.value) and "scratch" in str(err.value)


def test_cleanup_deletes_only_what_the_restore_created_and_still_holds_its_value(zk_b, tmp_path):
    """Cleanup works from the restore's plan spool: a key someone changed, and a key someone
    added, are left alone (and so are their parents and the chroot), the rest is deleted."""
    from burrow.records import encode_record
    from burrow.staging import open_spool_writer
    from tasks.rehearse import Scratch, clean_scratch_target

    top = f"/burrow-rehearsal-{uuid.uuid4().hex[:8]}"
    spool = tmp_path / "plan.jsonl"
    with open_spool_writer(spool) as out:
        for key, value in ((b"/a", b""), (b"/a/b", b"1"), (b"/a/c", b"2"), (b"/e", b"5")):
            out.write(encode_record(Record(key, value, {"acl": None})))
    with kazoo(zk_b.url) as c:
        c.create(top + "/a/b", b"1", makepath=True)
        c.create(top + "/a/c", b"changed meanwhile")
        c.create(top + "/a/d", b"someone else's")
        c.create(top + "/e", b"5")
    target = source_from_ref(f"zk://{zk_b.url}{top}")
    got = clean_scratch_target(target, Scratch(target.describe(), [top]), tmp_path, spool)
    assert got["deleted"] == 2 and got["left"] == 3 and sorted(got["left_paths"]) == ["/a", "/a/c", "/a/d"]
    with kazoo(zk_b.url) as c:
        assert snapshot(c, top) == {top: b"", top + "/a": b"", top + "/a/c": b"changed meanwhile",
                                    top + "/a/d": b"someone else's"}
        c.delete(top, recursive=True)


def test_failover_prefers_the_rehearsed_archive_over_a_newer_unrehearsed_one(zk_a, zk_b, store, tmp_path):
    """The marker a rehearsal writes is what failover reads (``row["rehearsal"]``): the older,
    rehearsed archive is chosen over the newest, never-rehearsed one."""
    from flows.failover import failover

    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    root = unique_root()
    seed_zk(zk_a.url, root)
    old = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-f", root=root, key_file=str(key))
    done = rehearse(store=str(store), source="dc-f", scratch=f"zk://{zk_b.url}/burrow-rehearsal-{uuid.uuid4().hex[:8]}",
                    archive=old["url"], key_files=[str(key)])
    assert done["archive"] == old["url"] and done["marker_authenticated"] is True
    new = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-f", root=root, key_file=str(key))
    assert new["url"] != old["url"]
    from burrow.testing.servers import free_port

    dead = f"zk://127.0.0.1:{free_port()}"  # the failed primary (the split-brain guard probes it)
    plan = failover(source="dc-f", store=str(store), into=f"zk://{zk_b.url}", primary=dead, dry_run=True,
                    key_files=[str(key)])
    assert plan["archive"] == old["url"]
    assert plan["rehearsal"]["ok"] is True and plan["rehearsal"]["authenticated"] is True
