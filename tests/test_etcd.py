"""etcd v3: point-in-time backup while writers run, leased keys, the no-overwrite rule and
its per-key fallback, prefixes, large values under the gRPC message limit, a server that
dies mid-backup, and TLS / user-password failures."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from certs import Pki, make_pki
from conftest import SESSION_DIR
from kvutil import Etcd, backup_kwargs, unique
from pydantic import SecretStr
from services import read, source_url

from blocks.etcd import EtcdCluster, EtcdSession
from blocks.local import LocalStore
from blocks.resolve import register
from blocks.source import WalkStats
from burrow.archive import ArchiveReader
from burrow.errors import AuthError, SourceError, SourceUnavailable
from burrow.records import Record
from burrow.testing.servers import LocalServer, free_port, start_etcd
from flows.backup import backup
from flows.restore import restore
from tasks.extract import extract

MIB = 1024 * 1024
ROOT_PASSWORD = "r00t-pw-never-shown"


def _archive_records(url: str) -> list[Record]:
    path = Path(url.removeprefix("file://"))
    with open(path, "rb") as f:
        return list(ArchiveReader(f).records())


def _block(server: LocalServer, **kw: Any) -> EtcdCluster:
    return EtcdCluster(endpoints=[f"{server.host}:{server.port}"], **kw)


# --------------------------------------------------------------------------- point in time


def test_point_in_time_backup_while_writing(etcd_a, store, monkeypatch) -> None:
    """A writer thread changes keys during the backup; the archive is exactly the store at
    the revision recorded in the manifest."""
    root = "/" + unique("pit")
    r = root.encode()
    e = Etcd(etcd_a.url)
    e.put_many({r + b"/k%05d" % i: b"v0-%d" % i for i in range(3000)})

    stop = threading.Event()
    last_rev = [0]
    writes = [0]

    def writer() -> None:
        w = Etcd(etcd_a.url)
        i = 0
        while not stop.is_set():
            i += 1
            k = r + b"/k%05d" % ((i * 7919) % 3000)
            if i % 10 == 0:
                w.delete(k)
                last_rev[0] = w.revision()
            else:
                last_rev[0] = w.put(k if i % 3 else r + b"/new%05d" % i, b"v-%d" % i)
            writes[0] += 1
        w.close()

    seen: dict[str, int] = {}
    real_walk = EtcdSession.walk

    def watched_walk(self: EtcdSession, root_b: bytes, stats: WalkStats) -> Iterator[Record]:
        for n, rec in enumerate(real_walk(self, root_b, stats)):
            if n == 0:
                seen["writes_at_start"] = writes[0]
            if n % 200 == 0:
                time.sleep(0.02)  # give the writer time between pages
            yield rec
        seen["writes_at_end"] = writes[0]
        seen["rev_at_end"] = last_rev[0]

    monkeypatch.setattr(EtcdSession, "walk", watched_walk)
    ref = register(_block(etcd_a, page_size=100))
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        time.sleep(0.2)
        summary = backup(source=ref, store=str(store), root=root, **backup_kwargs())
    finally:
        stop.set()
        t.join(10)
    info = summary["service_info"]
    revision = info["revision"]
    assert summary["point_in_time"] is True and info["pages"] >= 30
    # writers really ran while the pages were read, and after the recorded revision
    assert seen["writes_at_end"] > seen["writes_at_start"] and seen["rev_at_end"] > revision

    records = _archive_records(summary["url"])
    at_revision = e.snapshot(r + b"/", revision=revision, with_meta=True)
    assert [x.key for x in records] == sorted(at_revision)
    for rec in records:
        assert rec.value == at_revision[rec.key]["value"]
        assert rec.meta["mod_revision"] == at_revision[rec.key]["mod_revision"] <= revision
    assert e.snapshot(r + b"/") != {k: v["value"] for k, v in at_revision.items()}  # the store moved on
    e.close()


# --------------------------------------------------------------------------- leases


def test_leased_keys_skipped_or_kept_with_ttl(etcd_a, etcd_b, zk_b, store) -> None:
    root = "/" + unique("lease")
    r = root.encode()
    e = Etcd(etcd_a.url)
    e.put(r + b"/plain", b"p")
    long_lease, short_lease = e.grant(300), e.grant(120)
    e.put(r + b"/l1", b"one", lease=long_lease)
    e.put(r + b"/l2", b"two", lease=long_lease)
    e.put(r + b"/l3", b"three", lease=short_lease)
    url = source_url("etcd", etcd_a)

    skipped = backup(source=url, store=str(store), root=root, **backup_kwargs())
    assert skipped["keys"] == 1 and skipped["skipped_ephemeral"] == 3
    assert skipped["service_info"]["leased_skipped"] == 3

    kept = backup(source=url, store=str(store), root=root, include_leased=True, **backup_kwargs())
    assert kept["keys"] == 4 and kept["skipped_ephemeral"] == 0
    ttl = {rec.key: rec.meta.get("lease", {}).get("ttl") for rec in _archive_records(kept["url"])}
    assert 250 < ttl[r + b"/l1"] <= 300 and ttl[r + b"/l3"] <= 120 and ttl[r + b"/plain"] is None

    result = restore(archive=kept["url"], into=source_url("etcd", etcd_b))
    assert result["created"] == 4 and not result["metadata_not_carried"]
    t = Etcd(etcd_b.url)
    got = t.snapshot(r + b"/", with_meta=True)
    assert {k: v["value"] for k, v in got.items()} == {
        r + b"/plain": b"p", r + b"/l1": b"one", r + b"/l2": b"two", r + b"/l3": b"three"
    }
    assert got[r + b"/plain"]["lease"] == 0
    assert got[r + b"/l1"]["lease"] == got[r + b"/l2"]["lease"] != 0  # keys that shared a lease still do
    assert 200 < t.ttl(got[r + b"/l1"]["lease"]) <= 300
    assert 0 < t.ttl(got[r + b"/l3"]["lease"]) <= 120

    into_zk = restore(archive=kept["url"], into=source_url("zookeeper", zk_b))
    assert into_zk["metadata_not_carried"] == {"lease": 3}  # reported, never silently dropped
    assert read("zookeeper", zk_b, root)[r + b"/l1"] == b"one"


# --------------------------------------------------------------------------- no overwrite


def test_restore_never_overwrites(etcd_a, etcd_b, store) -> None:
    root = "/" + unique("safe")
    r = root.encode()
    source = {r + b"/k%03d" % i: b"value-%d" % i for i in range(300)}
    Etcd(etcd_a.url).put_many(source)
    t = Etcd(etcd_b.url)
    t.put(r + b"/k001", b"value-1")  # identical
    t.put(r + b"/k002", b"someone else's")  # conflict
    t.put(r + b"/zzz", b"not in the archive")
    before = t.snapshot(r + b"/", with_meta=True)

    summary = backup(source=source_url("etcd", etcd_a), store=str(store), root=root, **backup_kwargs())
    result = restore(archive=summary["url"], into=source_url("etcd", etcd_b))
    assert result["status"] == "ok-with-conflicts"
    assert (result["created"], result["identical"], result["conflicts"]) == (298, 1, 1)
    assert result["conflict_paths"] == [f"{root}/k002"]
    after = t.snapshot(r + b"/", with_meta=True)
    for k, kv in before.items():  # nothing that existed was touched: not even re-written
        assert after[k] == kv
    assert {k: after[k]["value"] for k in source if k not in before} == {
        k: v for k, v in source.items() if k not in before
    }


def test_txn_batch_fallback_creates_the_rest(etcd_b) -> None:
    """A batch whose guard fails (keys appeared after planning) still creates every key
    that is missing, one guarded txn each, and leaves the existing ones alone."""
    root = "/" + unique("fallback")
    r = root.encode()
    t = Etcd(etcd_b.url)
    taken = {5: b"raced-5", 130: b"raced-130", 299: b"raced-299"}
    for i, v in taken.items():
        t.put(r + b"/k%03d" % i, v)
    records = [Record(r + b"/k%03d" % i, b"mine-%d" % i, {}) for i in range(300)]
    session = _block(etcd_b).connect()
    try:
        created = session.create(records)
    finally:
        session.close()
    assert [i for i, ok in enumerate(created) if not ok] == sorted(taken)
    got = t.snapshot(r + b"/")
    assert len(got) == 300
    for i in range(300):
        assert got[r + b"/k%03d" % i] == taken.get(i, b"mine-%d" % i)


# --------------------------------------------------------------------------- prefixes, sizes


def test_prefix_is_a_chroot_and_an_empty_prefix_is_a_valid_backup(etcd_a, etcd_b, store) -> None:
    src, dst = "/" + unique("app"), "/" + unique("copy")
    e = Etcd(etcd_a.url)
    e.put_many({src.encode() + b"/db/url": b"postgres://x", src.encode() + b"/flag": b""})
    e.put(src.encode(), b"the prefix key itself")
    summary = backup(source=f"etcd://127.0.0.1:{etcd_a.port}{src}", store=str(store), **backup_kwargs())
    assert summary["keys"] == 2 and summary["skipped_excluded"] == 1  # the prefix key itself: reported
    assert sorted(rec.key for rec in _archive_records(summary["url"])) == [b"/db/url", b"/flag"]
    result = restore(archive=summary["url"], into=f"etcd://127.0.0.1:{etcd_b.port}{dst}")
    assert result["created"] == 2
    assert Etcd(etcd_b.url).snapshot(dst.encode() + b"/") == {
        dst.encode() + b"/db/url": b"postgres://x", dst.encode() + b"/flag": b""
    }

    empty = backup(source=f"etcd://127.0.0.1:{etcd_a.port}/{unique('nothing')}", store=str(store), **backup_kwargs())
    assert empty["status"] == "ok" and empty["keys"] == 0
    again = restore(archive=empty["url"], into=source_url("etcd", etcd_b))
    assert again["created"] == 0 and again["conflicts"] == 0


def test_pages_stay_under_the_message_limit_with_1mib_values(etcd_a) -> None:
    root = "/" + unique("big")
    r = root.encode()
    values = {r + b"/v%02d" % i: os.urandom(MIB) for i in range(12)}
    e = Etcd(etcd_a.url)
    for k, v in values.items():
        e.put(k, v)
    for block in (_block(etcd_a), _block(etcd_a, max_message_bytes=3 * MIB)):
        session = block.connect()
        try:
            stats = WalkStats()
            got = {rec.key: rec.value for rec in session.walk(r, stats)}
            assert got == values
            if block.max_message_bytes > 3 * MIB:
                assert stats.info["pages"] >= 3  # ~page_bytes (4 MiB) per answer, not all 12 MiB at once
            assert session.lookup(list(values)) == list(values.values())
        finally:
            session.close()


# --------------------------------------------------------------------------- failures


def test_server_dying_mid_backup_fails_and_leaves_no_archive(tmp_path, store, monkeypatch) -> None:
    server = start_etcd(tmp_path / "etcd-doomed")
    try:
        Etcd(server.url).put_many({b"/doomed/k%05d" % i: os.urandom(64) for i in range(3000)})
        real_walk = EtcdSession.walk

        def dying_walk(self: EtcdSession, root_b: bytes, stats: WalkStats) -> Iterator[Record]:
            for n, rec in enumerate(real_walk(self, root_b, stats)):
                if n == 700:
                    server.kill()  # the member crashes while pages are still being read
                yield rec

        monkeypatch.setattr(EtcdSession, "walk", dying_walk)
        # The extract task still retries this transient error twice, just without the 1 s + 5 s pauses.
        monkeypatch.setattr("flows.backup.extract", extract.with_options(retry_delay_seconds=[0, 0]))
        ref = register(_block(server, page_size=200))
        with pytest.raises(SourceUnavailable, match="etcd"):
            backup(source=ref, store=str(store), **backup_kwargs())
        assert LocalStore(path=str(store)).list() == []
        assert not [p for p in store.rglob("*") if p.is_file()]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def etcd_secure() -> Iterator[tuple[LocalServer, int, Pki]]:
    """etcd with a TLS client port (client certificates required) and auth enabled."""
    workdir = SESSION_DIR / "etcd-secure"
    pki = make_pki(workdir / "pki")
    plain, tls = free_port(), free_port()
    server = start_etcd(
        workdir,
        port=plain,
        extra_args=[
            "--listen-client-urls", f"http://127.0.0.1:{plain},https://127.0.0.1:{tls}",
            "--advertise-client-urls", f"http://127.0.0.1:{plain}",
            "--cert-file", str(pki.server_cert), "--key-file", str(pki.server_key),
            "--trusted-ca-file", str(pki.ca), "--client-cert-auth",
        ],
    )
    ctl = ["etcdctl", f"--endpoints=http://127.0.0.1:{plain}"]
    env = {**os.environ, "ETCDCTL_API": "3"}
    for args in (["user", "add", "root", f"--new-user-password={ROOT_PASSWORD}"],
                 ["user", "grant-role", "root", "root"], ["put", "/secure/a", "1"], ["auth", "enable"]):
        subprocess.run(ctl + args, check=True, capture_output=True, env=env, timeout=30)
    yield server, tls, pki
    server.stop()


def test_tls_and_password_failures_are_clear_and_write_nothing(etcd_secure, store, cli) -> None:
    server, tls, pki = etcd_secure
    good = {
        "endpoints": [f"127.0.0.1:{tls}"], "ca_cert": str(pki.ca), "client_cert": str(pki.client_cert),
        "client_key": SecretStr(pki.client_key.read_text()),  # PEM text, not a path
        "user": "root", "password": SecretStr(ROOT_PASSWORD),
    }
    wrong_ca = register(EtcdCluster(**{**good, "ca_cert": str(pki.other_ca)}))
    with pytest.raises(SourceError, match="TLS with etcd"):
        backup(source=wrong_ca, store=str(store), **backup_kwargs())
    wrong_pw = register(EtcdCluster(**{**good, "password": SecretStr("not-the-password")}))
    with pytest.raises(AuthError, match="authentication failed") as err:
        backup(source=wrong_pw, store=str(store), **backup_kwargs())
    assert "not-the-password" not in str(err.value)
    assert not [p for p in store.rglob("*") if p.is_file()]

    ok = backup(source=register(EtcdCluster(**good)), store=str(store), root="/secure", **backup_kwargs())
    assert ok["keys"] == 1

    # the CLI takes credentials and TLS files from the environment, never from the URL
    env = {
        "BURROW_ETCD_CACERT": str(pki.ca), "BURROW_ETCD_CERT": str(pki.client_cert),
        "BURROW_ETCD_KEY": str(pki.client_key), "BURROW_ETCD_USER": "root", "BURROW_ETCD_PASSWORD": ROOT_PASSWORD,
    }
    with ThreadPoolExecutor(2) as pool:
        good_run = pool.submit(cli, "dump", f"etcds://127.0.0.1:{tls}", "--subtree", "/secure", env=env)
        bad_run = pool.submit(
            cli, "dump", f"etcds://127.0.0.1:{tls}", env={**env, "BURROW_ETCD_PASSWORD": "wrong-pw-xyz"}
        )
        r, bad = good_run.result(), bad_run.result()
    assert r.code == 0 and "/secure/a" in r.out and ROOT_PASSWORD not in r.out + r.err, r
    assert bad.code == 1 and "authentication failed" in bad.error_line and "wrong-pw-xyz" not in bad.err, bad
