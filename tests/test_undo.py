"""Undo: every restore and failover keeps the exact list of keys it created (sealed in the store),
and ``burrow undo RUN --from STORE`` deletes exactly those, deepest first, each only if unchanged
since. Real servers; what is in the cluster is read back with independent clients (kazoo, etcd's
JSON gateway, Consul's HTTP API)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from kvutil import Etcd, consul_client, consul_snapshot, unique
from zkutil import full_snapshot, kazoo, snapshot, unique_root

from blocks.resolve import source_from_ref, store_from_ref
from blocks.zookeeper import ZooKeeperCluster
from burrow.crypto import ArchiveKeys
from burrow.errors import ArchiveError
from burrow.keys import Keyring, keygen, read_key_file
from burrow.staging import staging_dir
from burrow.testing.servers import free_port
from flows.backup import backup
from tasks.undo import UNDO_PREFIX, CreatedLog, UndoSink, load_undo_list, seal_created

DEAD_CONSUL = f"consul://127.0.0.1:{free_port()}"


def undo_line(err: str) -> tuple[str, str]:
    """The one ``to undo:`` line of a command's stderr, which must be its last line: (RUN, STORE)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    found = [ln for ln in lines if ln.startswith("to undo:")]
    assert len(found) == 1, err
    assert lines[-1] == found[0], err
    words = shlex.split(found[0])
    assert words[:4] == ["to", "undo:", "burrow", "undo"] and words[5] == "--from", found[0]
    return words[4], words[6]


def raw_sidecars(store_ref: str) -> dict[str, bytes]:
    """Every object of the run lists, raw, as the store holds them."""
    st = store_from_ref(store_ref)
    return {n: st.get_sidecar(n) for n in st.list_sidecars(UNDO_PREFIX)}


def test_the_version_guarded_delete_of_every_source(zk_b, etcd_b, consul_b):
    """``created_versions`` then ``delete_if_version``, the primitive undo and the rehearsal
    cleanup share: a key changed since it was created is kept, a missing one counts as gone, a
    ZooKeeper node that gained a child is kept, and a dry run deletes nothing."""
    root = unique_root()
    with kazoo(zk_b.url) as c:
        for p in ("/p", "/p/same", "/p/changed", "/q", "/q/kid"):
            c.create(root + p, b"v", makepath=True)
    session = source_from_ref(f"zk://{zk_b.url}").connect()
    try:
        keys = [f"{root}{p}".encode() for p in ("/p/same", "/p/changed", "/p", "/q/kid", "/q", "/gone")]
        versions = session.created_versions(keys)
        assert versions[-1] is None and all(isinstance(v, int) for v in versions[:-1])
        with kazoo(zk_b.url) as c:
            c.set(root + "/p/changed", b"changed since")
            c.create(root + "/q/added-since", b"")
        items = list(zip(keys[:-1], versions[:-1], strict=True)) + [(keys[-1], 1)]
        dry = session.delete_if_version(items, dry_run=True)
        with kazoo(zk_b.url) as c:
            assert len(snapshot(c, root)) == 7  # nothing deleted
        assert dry == [True, False, False, True, False, True]
        assert session.delete_if_version(items) == dry
    finally:
        session.close()
    with kazoo(zk_b.url) as c:
        assert set(snapshot(c, root)) == {root, root + "/p", root + "/p/changed", root + "/q", root + "/q/added-since"}

    prefix = unique("ver")
    e = Etcd(etcd_b.url)
    try:
        e.put_many({f"/{prefix}/same".encode(): b"s", f"/{prefix}/changed".encode(): b"c"})
        session = source_from_ref(f"etcd://{etcd_b.url.split('://', 1)[1]}/{prefix}").connect()
        try:
            versions = session.created_versions([b"/same", b"/changed", b"/gone"])
            assert versions[2] is None
            e.put(f"/{prefix}/changed".encode(), b"changed since")
            items = [(b"/same", versions[0]), (b"/changed", versions[1]), (b"/gone", 5)]
            assert session.delete_if_version(items, dry_run=True) == [True, False, True]
            assert e.snapshot(f"/{prefix}/".encode()) == {f"/{prefix}/same".encode(): b"s",
                                                           f"/{prefix}/changed".encode(): b"changed since"}
            assert session.delete_if_version(items) == [True, False, True]
        finally:
            session.close()
        assert e.snapshot(f"/{prefix}/".encode()) == {f"/{prefix}/changed".encode(): b"changed since"}
    finally:
        e.close()

    c = consul_client(consul_b.url)
    c.kv.put(f"{prefix}/same", b"s")
    c.kv.put(f"{prefix}/changed", b"c")
    session = source_from_ref(f"consul://{consul_b.url.split('://', 1)[1]}/{prefix}").connect()
    try:
        versions = session.created_versions([b"same", b"changed", b"gone"])
        assert versions[2] is None
        c.kv.put(f"{prefix}/changed", b"changed since")
        items = [(b"same", versions[0]), (b"changed", versions[1]), (b"gone", 5)]
        assert session.delete_if_version(items, dry_run=True) == [True, False, True]
        assert set(consul_snapshot(c, prefix + "/")) == {f"{prefix}/same", f"{prefix}/changed"}
        assert session.delete_if_version(items) == [True, False, True]
    finally:
        session.close()
    assert consul_snapshot(c, prefix + "/") == {f"{prefix}/changed": (b"changed since", 0, None)}


def test_zookeeper_restore_then_undo_removes_exactly_what_it_created(cli, zk_a, zk_b, store, tmp_path):
    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    root = unique_root()
    with kazoo(zk_a.url) as c:
        for p, v in (("/cfg/a", b"a"), ("/cfg/b", b"b"), ("/cfg/deep/x", b"x"), ("/cfg/deep/y", b"y"),
                     ("/svc/one", b"1"), ("/svc/two", b"2")):
            c.create(root + p, v, makepath=True)
    made = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-undo", root=root, key_file=str(key))

    # The target already holds part of the tree (one node identical, one different) and a node of its own.
    with kazoo(zk_b.url) as c:
        c.create(root + "/cfg/a", b"a", makepath=True)
        c.create(root + "/svc/two", b"the target's own value", makepath=True)
        c.create(root + "/mine", b"not in the archive")
        before = full_snapshot(c, root)

    r = cli("restore", made["url"], "--into", f"zk://{zk_b.url}", "--key-file", str(key))
    assert r.code == 3, r  # /svc/two is a conflict, kept as it is
    run, store_ref = undo_line(r.err)
    with kazoo(zk_b.url) as c:
        after = full_snapshot(c, root)
    created = set(after) - set(before)
    assert created == {root + p for p in ("/cfg/b", "/cfg/deep", "/cfg/deep/x", "/cfg/deep/y", "/svc/one")}

    # The sealed list names no key path in plaintext, anywhere in the store.
    objects = raw_sidecars(store_ref)
    assert objects and all(n.startswith(f"{UNDO_PREFIX}{run}/") for n in objects)
    needle = root.strip("/").encode()
    assert not any(needle in data for data in objects.values())
    assert not any(needle in p.read_bytes() for p in Path(store).rglob("*") if p.is_file() and "_undo" in p.parts)

    # Since the restore: one created node changed, another gained a child someone else made.
    with kazoo(zk_b.url) as c:
        c.set(root + "/cfg/b", b"changed since the restore")
        c.create(root + "/cfg/deep/added-since", b"")
        changed = full_snapshot(c, root)

    dry = cli("undo", run, "--from", store_ref, "--key-file", str(key), "--dry-run")
    assert dry.code == 0, dry
    assert dry.out.splitlines()[0] == f"dry run: nothing was deleted from zk://{zk_b.url}"
    assert "would_delete=3 would_keep=2 listed=5" in dry.out
    with kazoo(zk_b.url) as c:
        assert full_snapshot(c, root) == changed

    r = cli("undo", run, "--from", store_ref, "--key-file", str(key), "--list")
    assert r.code == 3, r
    assert "deleted=3 kept=2 listed=5" in r.out
    assert {ln.split(None, 1)[1] for ln in r.out.splitlines() if ln.startswith("kept ")} == {
        root + "/cfg/b", root + "/cfg/deep"}
    with kazoo(zk_b.url) as c:
        final = full_snapshot(c, root)
    # exactly the unchanged created nodes are gone; everything that was there before, untouched
    assert set(final) == set(before) | {root + "/cfg/b", root + "/cfg/deep", root + "/cfg/deep/added-since"}
    assert {p: final[p] for p in before} == before
    assert final[root + "/cfg/b"] == changed[root + "/cfg/b"]


def test_etcd_undo_by_run_id_keeps_a_key_changed_since(cli, etcd_a, etcd_b, store, tmp_path):
    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    prefix = unique("eu")
    src, dst = Etcd(etcd_a.url), Etcd(etcd_b.url)
    try:
        src.put_many({f"/{prefix}/{n}".encode(): n.encode() for n in ("a", "b", "c", "d")})
        made = backup(source=f"etcd://{etcd_a.host}:{etcd_a.port}", store=str(store), name="etcd-undo",
                      root=f"/{prefix}", key_file=str(key))
        dst.put(f"/{prefix}/a".encode(), b"a")  # identical: not created by the restore
        dst.put(f"/{prefix}/own".encode(), b"the target's own")
        r = cli("restore", made["url"], "--into", f"etcd://{etcd_b.host}:{etcd_b.port}", "--key-file", str(key),
                "--json")
        assert r.code == 0, r
        summary = json.loads(r.out)
        run, store_ref = undo_line(r.err)
        assert run == summary["undo_run"] and summary["undo_keys"] == 3
        dst.put(f"/{prefix}/c".encode(), b"changed since")

        u = cli("undo", summary["undo_run_id"], "--from", store_ref, "--key-file", str(key))
        assert u.code == 3, u
        assert "deleted=2 kept=1 listed=3" in u.out
        assert dst.snapshot(f"/{prefix}/".encode()) == {
            f"/{prefix}/a".encode(): b"a", f"/{prefix}/own".encode(): b"the target's own",
            f"/{prefix}/c".encode(): b"changed since",
        }
    finally:
        src.close()
        dst.close()


def test_consul_failover_ends_with_the_undo_line_and_undo_takes_back_what_it_created(cli, consul_a, consul_b,
                                                                                    store, tmp_path):
    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    prefix = unique("cu")
    # the target is a prefix of its own in the shared server: it holds only what this test puts there
    into = f"consul://{consul_b.host}:{consul_b.port}/{unique('tgt')}"
    top = into.rsplit("/", 1)[1] + "/" + prefix
    a, b = consul_client(consul_a.url), consul_client(consul_b.url)
    for n in ("x", "y", "z"):
        a.kv.put(f"{prefix}/{n}", n.encode())
    backup(source=f"consul://{consul_a.host}:{consul_a.port}", store=str(store), name="consul-undo",
           root=prefix, key_file=str(key))
    b.kv.put(f"{top}/own", b"the target's own")
    failover = ("failover", "consul-undo", "--from", str(store), "--into", into, "--key-file", str(key),
                "--primary", DEAD_CONSUL)
    r = cli(*failover)
    assert r.code == 0, r
    run, store_ref = undo_line(r.err)
    assert store_ref == str(store)  # the store as it was given
    assert set(consul_snapshot(b, top + "/")) == {f"{top}/{n}" for n in ("x", "y", "z", "own")}
    b.kv.put(f"{top}/y", b"changed since")

    u = cli("undo", run, "--from", store_ref, "--key-file", str(key), "--list")
    assert u.code == 3, u
    assert f"kept     {prefix}/y" in u.out.splitlines()
    assert consul_snapshot(b, top + "/") == {f"{top}/own": (b"the target's own", 0, None),
                                             f"{top}/y": (b"changed since", 0, None)}

    # The same failover again has the same run name: its line names it by id, and the name, which
    # now names two runs, is refused rather than guessed.
    again = cli(*failover)
    assert again.code == 3, again  # y is a conflict now
    second, _ = undo_line(again.err)
    assert second != run
    refused = cli("undo", run, "--from", store_ref, "--key-file", str(key))
    assert refused.code == 2 and "give the run id" in refused.error_line, refused
    u = cli("undo", second, "--from", store_ref, "--key-file", str(key))
    assert u.code == 0, u
    assert "deleted=2 kept=0 listed=2" in u.out
    assert set(consul_snapshot(b, top + "/")) == {f"{top}/own", f"{top}/y"}


def test_a_restore_without_a_secret_key_says_undo_is_unavailable(cli, zk_a, zk_b, store):
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/k", b"v", makepath=True)
    r = cli("backup", f"zk://{zk_a.url}", "--to", str(store), "--root", root, "--no-encryption")
    assert r.code == 0, r
    env = {k: "" for k in ("BURROW_KEY_FILE", "BURROW_KEY", "BURROW_IDENTITY_FILE", "BURROW_PASSPHRASE_ENV")}
    r = cli("restore", r.last_line, "--into", f"zk://{zk_b.url}", env=env)
    assert r.code == 0, r
    assert "to undo:" not in r.err
    assert sum("undo is unavailable for this run" in ln for ln in r.err.splitlines()) == 1, r
    assert not list(Path(store).rglob("_undo"))


def test_a_sealed_list_opens_only_under_its_own_name_and_key(tmp_path):
    """A part copied under another run's name, or read with another key, does not open: undo
    refuses before deleting anything."""
    key_path = tmp_path / "k.key"
    keygen(key_path, x25519=False)
    keys = ArchiveKeys(Keyring(keys=read_key_file(str(key_path))))
    st = store_from_ref(str(tmp_path / "store"))
    (tmp_path / "store").mkdir()
    target = ZooKeeperCluster(hosts=["127.0.0.1:1"])
    with staging_dir() as work:
        log = CreatedLog(work / "created.jsonl")
        log.add([(b"/secret/path", 7), (b"/secret", 6)])
        sealed = seal_created(UndoSink(st, keys, "run-id-1", "restore-one", "restore"), log, target)
        assert sealed["undo_keys"] == 2
        got = load_undo_list(st, "run-id-1", keys, work)
        assert (got.run_name, got.keys, got.target, got.complete) == ("restore-one", 2, target.describe(), True)
        by_name = load_undo_list(st, "restore-one", keys, work)
        assert by_name.run_id == "run-id-1"

        (name,) = st.list_sidecars(UNDO_PREFIX)
        st.put_sidecar(name.replace("restore-one/run-id-1", "restore-two/run-id-2"), st.get_sidecar(name))
        with pytest.raises(ArchiveError, match="failed authentication"):
            load_undo_list(st, "restore-two", keys, work)

        other = tmp_path / "other.key"
        keygen(other, x25519=False)
        with pytest.raises(ArchiveError, match="not configured here"):
            load_undo_list(st, "restore-one", ArchiveKeys(Keyring(keys=read_key_file(str(other)))), work)
    shutil.rmtree(tmp_path / "store")
