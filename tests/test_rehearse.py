"""Rehearsals: restore an archive into an empty scratch target, compare, time, clean up, and
record the result next to the archive as an authenticated marker that list and status show.

Everything is checked against real servers through independent clients (kazoo, etcd's JSON
gateway, py-consul), and the markers are read from the store's files directly."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kvutil import Etcd, consul_client, consul_snapshot, unique
from test_orchestrator import all_events, wait_for
from zkutil import kazoo, snapshot, unique_root

from blocks.resolve import source_from_ref
from burrow.archive import ArchiveReader
from burrow.errors import UsageError
from burrow.keys import keygen
from burrow.records import Record
from cli import main
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


def etcd_leases(e: Etcd) -> set[int]:
    """Every lease the etcd server holds (LeaseLeases, through the JSON gateway)."""
    return {int(x["ID"]) for x in e._post("/v3/lease/leases", {}).get("leases") or []}


def test_an_etcd_rehearsal_of_leased_keys_passes_and_leaves_no_lease_behind(etcd_a, etcd_b, store):
    """An archive taken with --include-leased: the rehearsal restores its leased keys with fresh
    leases, compares them like any other key (they are not "missing"), and its cleanup revokes
    the leases it granted: none is left in the scratch cluster."""
    src_prefix, scratch_prefix = unique("leased"), unique("scratch")
    e_a, e_b = Etcd(etcd_a.url), Etcd(etcd_b.url)
    try:
        plain = {f"/{src_prefix}/cfg/k{i}".encode(): f"v{i}".encode() for i in range(40)}
        sessions = {f"/{src_prefix}/svc/n{i}".encode(): f"10.0.0.{i}".encode() for i in range(25)}
        locks = {f"/{src_prefix}/locks/l{i}".encode(): b"held" for i in range(5)}
        e_a.put_many(plain)
        e_a.put_many(sessions, lease=e_a.grant(900))
        e_a.put_many(locks, lease=e_a.grant(600))
        host = etcd_a.url.split("://", 1)[1]
        made = backup(source=f"etcd://{host}/{src_prefix}", store=str(store), name="etcd-leased",
                      include_leased=True, encryption=False)
        assert made["keys"] == len(plain) + len(sessions) + len(locks)
        scratch = f"etcd://{etcd_b.url.split('://', 1)[1]}/{scratch_prefix}"
        before = etcd_leases(e_b)

        done = rehearse(store=str(store), source="etcd-leased", scratch=scratch)
        assert done["status"] == "ok", done
        assert done["compared"] == made["keys"] and done["scratch_missing"] == done["scratch_changed"] == 0
        assert done["cleanup_deleted"] == made["keys"] and done["cleanup_left"] == 0
        assert e_b.snapshot(f"/{scratch_prefix}".encode()) == {}
        assert etcd_leases(e_b) - before == set()  # the two leases it granted are revoked
        (found,) = markers(store)
        assert json.loads(found.read_bytes())["ok"] is True
    finally:
        e_a.close()
        e_b.close()


def rehearsal_events(source: str, since: datetime, want: int) -> list:
    """The ``burrow.rehearsal.*`` events about ``source`` since ``since``, once there are ``want``
    (events reach the API asynchronously: the server stores them a little after they are sent)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    flt = EventFilter(occurred=EventOccurredFilter(since=since), event=EventNameFilter(prefix=["burrow.rehearsal."]))

    def about() -> list:
        return [e for e in all_events(flt) if e.resource.id == f"burrow.source.{source}"]

    wait_for(f"{want} rehearsal event(s) of {source}", lambda: len(about()) >= want, timeout=30)
    return about()


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
    """Cleanup works from the list of keys the restore created, beside its plan spool (each with
    the version it was created at, tasks/undo.py): a key someone changed since, and a key someone
    added, are left alone (and so are their parents and the chroot), the rest is deleted."""
    from burrow.records import encode_record
    from burrow.staging import open_spool_writer
    from tasks.rehearse import Scratch, clean_scratch_target
    from tasks.undo import CreatedLog, created_spool

    top = f"/burrow-rehearsal-{uuid.uuid4().hex[:8]}"
    spool = tmp_path / "plan.jsonl"
    with open_spool_writer(spool) as out:
        for key, value in ((b"/a", b""), (b"/a/b", b"1"), (b"/a/c", b"2"), (b"/e", b"5")):
            out.write(encode_record(Record(key, value, {"acl": None})))
    with kazoo(zk_b.url) as c:
        c.create(top + "/a/b", b"1", makepath=True)
        c.create(top + "/a/c", b"2")
        c.create(top + "/e", b"5")
        created = CreatedLog(created_spool(spool))
        created.add([(k, c.exists(top + k.decode()).czxid) for k in (b"/a", b"/a/b", b"/a/c", b"/e")])
        created.close()
        c.set(top + "/a/c", b"changed meanwhile")
        c.create(top + "/a/d", b"someone else's")
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
    standby = unique_root()  # a private corner of the shared zk_b: the wrong-cluster guard refuses other tests' keys
    with kazoo(zk_b.url) as c:
        c.ensure_path(standby)
    plan = failover(source="dc-f", store=str(store), into=f"zk://{zk_b.url}{standby}", primary=dead, dry_run=True,
                    key_files=[str(key)])
    assert plan["archive"] == old["url"]
    assert plan["rehearsal"]["ok"] is True and plan["rehearsal"]["authenticated"] is True


# ---------------------------------------------------------------------------- markers under attack (issue 16)


def _store_archive(store: Path, key: Path, source: str, tag: str) -> str:
    """An encrypted, name-bound archive of ``source`` written straight into ``store``; its name."""
    import io

    from burrow import naming
    from burrow.archive import ArchiveWriter
    from burrow.crypto import StreamEncryptor
    from burrow.keys import WriteKeys, read_key_file

    enc = StreamEncryptor(WriteKeys("symmetric", [read_key_file(key)[0]], "test"))
    buf = io.BytesIO()
    w = ArchiveWriter(buf, service="zookeeper", encryptor=enc)
    w.add(Record(b"/m", tag.encode()))
    name = naming.archive_name(source)
    w.finish({"service": "zookeeper", "source": source, "root": "/", "object_name": name,
              "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "encryption": enc.summary()})
    (store / name).parent.mkdir(parents=True, exist_ok=True)
    (store / name).write_bytes(buf.getvalue())
    return name


def _annotated(store: Path, keys: Any) -> dict[str, dict]:
    from blocks.local import LocalStore
    from tasks.catalog import describe_archives
    from tasks.markers import annotate

    st = LocalStore(path=str(store))
    rows = describe_archives(st, keys)
    annotate(st, rows, keys)
    return {r["name"]: r for r in rows}


def test_markers_are_bound_to_their_archive_and_ordered_by_signed_time(store, tmp_path):
    """A marker copied next to another archive does not count there; a passing marker's bytes
    copied under a newer file name do not hide a newer FAILED rehearsal; a backup worker that
    holds public keys only (or a key of its own) cannot make an authenticated marker."""
    from datetime import timedelta

    from blocks.keys import archive_keys
    from blocks.local import LocalStore
    from burrow.crypto import ArchiveKeys
    from burrow.keys import Keyring, SymmetricKey, WriteKeys, X25519Identity
    from tasks.markers import build_marker, marker_name, rehearsal_text, write_marker_record

    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    keys = archive_keys([str(key)], None, None, None, None)
    st = LocalStore(path=str(store))
    a, b = _store_archive(store, key, "dc-mk", "a"), _store_archive(store, key, "dc-mk", "b")
    rows = _annotated(store, keys)
    t0 = datetime.now(UTC) - timedelta(hours=2)

    def mark(name: str, at: datetime, ok: bool, signer: Any = keys) -> dict:
        m = build_marker(name, rows[name], at=at, ok=ok, keys=1, restore_s=0.5, scratch="zk://scratch",
                         error=None if ok else "the scratch restore differs from the archive: 1 archived keys missing",
                         signer=signer)
        write_marker_record(st, name, m)
        return m

    passing = mark(a, t0, True)
    assert passing["signer"] and passing["mac"] and passing["archive"] == a
    assert passing["manifest_sha256"] == rows[a]["manifest_sha256"]
    assert _annotated(store, keys)[a]["rehearsal"]["authenticated"] is True

    # 1. the passing marker of a, copied next to b (under b's name, byte for byte)
    (store / marker_name(b, t0)).write_bytes((store / marker_name(a, t0)).read_bytes())
    got = _annotated(store, keys)[b]["rehearsal"]
    assert got["authenticated"] is False and "another archive" in got["unauthenticated_reason"], got
    # ... even with its archive field edited to b's (the MAC then fails)
    (store / marker_name(b, t0)).write_bytes(json.dumps(dict(passing, archive=b)).encode())
    got = _annotated(store, keys)[b]["rehearsal"]
    assert got["authenticated"] is False and "MAC" in got["unauthenticated_reason"], got

    # 2. a newer rehearsal of a FAILED; the older passing marker's bytes are copied under a
    # newer file name than the failed one: the failed one (newest by signed time) still shows
    mark(a, t0 + timedelta(hours=1), False)
    renamed = store / marker_name(a, t0 + timedelta(hours=1, minutes=30))
    renamed.write_bytes((store / marker_name(a, t0)).read_bytes())
    got = _annotated(store, keys)[a]["rehearsal"]
    assert got["authenticated"] is True and got["ok"] is False, got
    assert got["marker"] == marker_name(a, t0 + timedelta(hours=1))
    assert any(i["marker"].endswith(renamed.name) and i["reason"].startswith("renamed") for i in got["ignored"]), got
    text = rehearsal_text(got)
    assert text.startswith("rehearsal FAILED at ") and "1 other marker ignored (renamed" in text, text

    # 3. a public-key backup worker: nothing to sign with, so its marker is unauthenticated ...
    ident = X25519Identity.generate()
    worker = ArchiveKeys(WriteKeys("x25519", [ident.recipient], "test").keyring())
    later = t0 + timedelta(hours=1, minutes=45)
    forged = mark(a, later, True, signer=worker)
    assert "mac" not in forged
    got = _annotated(store, keys)[a]["rehearsal"]
    assert got["ok"] is False and got["marker"] == marker_name(a, t0 + timedelta(hours=1)), got
    # ... and one MACed with a key the worker made up is signed by a key the readers do not hold
    (store / marker_name(a, later)).unlink()
    mark(a, later, True, signer=ArchiveKeys(Keyring([SymmetricKey.generate()])))
    got = _annotated(store, keys)[a]["rehearsal"]
    assert got["ok"] is False and got["authenticated"] is True, got
    reasons = [i["reason"] for i in got["ignored"]]
    assert any("not configured here" in r for r in reasons), reasons
    # ... and a legacy (version 1) marker is read but never authenticated
    legacy = {k: v for k, v in passing.items() if k not in ("signer", "mac_scheme", "mac")}
    (store / marker_name(b, t0)).write_bytes(json.dumps(dict(legacy, archive=b, version=1, manifest_sha256=rows[b][
        "manifest_sha256"], mac_scheme="hmac-sha256:burrow/v1/rehearsal-marker", mac="00" * 32)).encode())
    got = _annotated(store, keys)[b]["rehearsal"]
    assert got["authenticated"] is False and got["unauthenticated_reason"].startswith("legacy marker"), got
    # without a key nothing is authenticated
    assert _annotated(store, None)[a]["rehearsal"]["authenticated"] is False


def test_a_failed_rehearsal_names_no_key_path_in_its_marker_artifact_or_event(cli, zk_b, store, tmp_path):
    """The issue's example: an archived key ZooKeeper refuses (``/./customer-acme/db-password``).
    The run fails at planning; the marker, the CLI's error line, the artifact and the
    ``burrow.rehearsal.failed`` event say what kind of failure and how many keys, never the path."""
    import io

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from burrow import naming
    from burrow.archive import ArchiveWriter
    from burrow.crypto import StreamEncryptor
    from burrow.keys import WriteKeys, read_key_file
    from burrow.report import artifact_key

    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    enc = StreamEncryptor(WriteKeys("symmetric", [read_key_file(key)[0]], "test"))
    buf = io.BytesIO()
    w = ArchiveWriter(buf, service="zookeeper", encryptor=enc)
    for k in (b"/customer-acme", b"/./customer-acme/db-password"):
        w.add(Record(k, b"v"))
    name = naming.archive_name("dc-path")
    w.finish({"service": "zookeeper", "source": "dc-path", "root": "/", "object_name": name,
              "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "encryption": enc.summary()})
    (store / name).parent.mkdir(parents=True)
    (store / name).write_bytes(buf.getvalue())
    since = datetime.now(UTC)

    r = cli("rehearse", str(store), "--source", "dc-path", "--scratch",
            f"zk://{zk_b.url}/burrow-rehearsal-{uuid.uuid4().hex[:8]}", "--key-file", str(key))
    assert r.code == 1, r
    assert "1 key could not be restored (the scratch target refused it)" in r.error_line, r
    assert "customer-acme" not in r.error_line
    (found,) = markers(store)
    marker = json.loads(found.read_bytes())
    assert marker["ok"] is False and marker["mac"] and "1 key could not be restored" in marker["error"], marker
    assert b"customer-acme" not in found.read_bytes()

    (event,) = rehearsal_events("dc-path", since, 1)
    assert event.event == "burrow.rehearsal.failed" and "1 key could not be restored" in event.payload["error"]
    assert "customer-acme" not in json.dumps(event.payload)
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[artifact_key("rehearsal", naming.slug("dc-path"))])))
    assert arts and all("customer-acme" not in str(a.data) for a in arts), [a.data for a in arts]
    assert "1 key could not be restored" in str(arts[0].data)
