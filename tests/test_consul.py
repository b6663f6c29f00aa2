"""Consul KV: the no-overwrite rule and its per-key fallback, prefixes and empty backups,
Consul's value limit, a server that dies mid-backup, ACL token / TLS failures, and the
backup's recursive read parsed as a stream."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from typing import Any

import ijson
import pytest
from certs import Pki, make_pki
from conftest import SESSION_DIR
from kvutil import Etcd, backup_kwargs, consul_client, consul_snapshot, unique
from pydantic import SecretStr
from services import source_url

import blocks.consul as consul_block
from blocks.consul import ConsulCluster, ConsulSession, _json_array_batches
from blocks.local import LocalStore
from blocks.resolve import register
from blocks.source import WalkStats
from burrow.errors import AuthError, SourceError, SourceUnavailable
from burrow.records import Record
from burrow.testing.servers import LocalServer, free_port, start_consul
from flows.backup import backup
from flows.restore import restore
from tasks.extract import extract

MASTER_TOKEN = "6e1c2b1a-0000-4000-8000-burrowmaster1"


def test_restore_never_overwrites(consul_a, consul_b, store) -> None:
    root = unique("safe")
    a, b = consul_client(consul_a.url), consul_client(consul_b.url)
    for i in range(80):  # more than one 64-op txn
        a.kv.put(f"{root}/k{i:03d}", f"value-{i}", flags=i)
    b.kv.put(f"{root}/k001", "value-1", flags=1)  # identical
    b.kv.put(f"{root}/k002", "someone else's", flags=7)  # conflict
    b.kv.put(f"{root}/zzz", "not in the archive")
    _, before = b.kv.get(root, recurse=True)

    summary = backup(source=source_url("consul", consul_a), store=str(store), root=root, **backup_kwargs())
    result = restore(archive=summary["url"], into=source_url("consul", consul_b))
    assert result["status"] == "ok-with-conflicts"
    assert (result["created"], result["identical"], result["conflicts"]) == (78, 1, 1)
    assert result["conflict_paths"] == [f"{root}/k002"]
    _, after = b.kv.get(root, recurse=True)
    after_by_key = {e["Key"]: e for e in after}
    for e in before:  # untouched, down to the modify index
        assert after_by_key[e["Key"]] == e
    snap = consul_snapshot(b, root)
    for i in range(3, 80):
        assert snap[f"{root}/k{i:03d}"] == (f"value-{i}".encode(), i, None)


def test_txn_batch_fallback_creates_the_rest(consul_b) -> None:
    """A txn batch that fails because some keys appeared still creates every missing key."""
    root = unique("fallback")
    c = consul_client(consul_b.url)
    taken = {3: b"raced-3", 64: b"raced-64", 130: b"raced-130"}
    for i, v in taken.items():
        c.kv.put(f"{root}/k{i:03d}", v)
    records = [Record(f"{root}/k{i:03d}".encode(), b"mine-%d" % i, {"flags": 5}) for i in range(140)]
    records.append(Record(f"{root}/big".encode(), os.urandom(500 * 1024), {}))  # too big for a txn: cas PUT
    session = ConsulCluster(address=f"127.0.0.1:{consul_b.port}").connect()
    try:
        created = session.create(records)
    finally:
        session.close()
    assert [i for i, ok in enumerate(created) if not ok] == sorted(taken)
    snap = consul_snapshot(c, root)
    assert len(snap) == 141 and snap[f"{root}/big"][0] == records[-1].value
    for i in range(140):
        want = (taken[i], 0, None) if i in taken else (b"mine-%d" % i, 5, None)
        assert snap[f"{root}/k{i:03d}"] == want


def test_prefix_is_a_chroot_and_an_empty_prefix_is_a_valid_backup(consul_a, consul_b, store) -> None:
    src, dst = unique("app"), unique("copy")
    a = consul_client(consul_a.url)
    a.kv.put(f"{src}/", "")  # the prefix folder itself: not below the prefix, reported
    a.kv.put(f"{src}/db/url", "postgres://x", flags=3)
    a.kv.put(f"{src}/db/", "")
    a.kv.put(f"{src}x/sibling", "outside")  # shares the raw prefix, not the path
    summary = backup(source=f"consul://127.0.0.1:{consul_a.port}/{src}", store=str(store), **backup_kwargs())
    assert summary["keys"] == 2 and summary["skipped_excluded"] == 1
    result = restore(archive=summary["url"], into=f"consul://127.0.0.1:{consul_b.port}/{dst}")
    assert result["created"] == 2
    assert consul_snapshot(consul_client(consul_b.url), dst) == {
        f"{dst}/db/": (b"", 0, None), f"{dst}/db/url": (b"postgres://x", 3, None)
    }
    empty = backup(source=f"consul://127.0.0.1:{consul_a.port}/{unique('nothing')}", store=str(store),
                   **backup_kwargs())
    assert empty["status"] == "ok" and empty["keys"] == 0
    assert empty["service_info"]["consul_index"] > 0


def test_value_over_consuls_limit_fails_before_writing(etcd_a, consul_b, store) -> None:
    """A 1 MiB etcd value cannot go into Consul (512 KiB): the restore stops while planning."""
    root = "/" + unique("toobig")
    e = Etcd(etcd_a.url)
    e.put(root.encode() + b"/ok", b"small")
    e.put(root.encode() + b"/huge", os.urandom(1024 * 1024))
    summary = backup(source=source_url("etcd", etcd_a), store=str(store), root=root, **backup_kwargs())
    with pytest.raises(SourceError, match="accepts at most 524288"):
        restore(archive=summary["url"], into=source_url("consul", consul_b))
    assert consul_snapshot(consul_client(consul_b.url), root.strip("/")) == {}


def test_server_dying_mid_backup_fails_and_leaves_no_archive(tmp_path, store, monkeypatch) -> None:
    server = start_consul(tmp_path / "consul-doomed")
    try:
        c = consul_client(server.url)
        for i in range(50):
            c.kv.put(f"doomed/k{i}", "x" * 100)
        real_walk = ConsulSession.walk

        def dying_walk(self: ConsulSession, root_b: bytes, stats: WalkStats) -> Iterator[Record]:
            server.kill()  # the agent crashes between connecting and the recursive read
            yield from real_walk(self, root_b, stats)

        monkeypatch.setattr(ConsulSession, "walk", dying_walk)
        # The extract task still retries this transient error twice, just without the 1 s + 5 s pauses.
        monkeypatch.setattr("flows.backup.extract", extract.with_options(retry_delay_seconds=[0, 0]))
        with pytest.raises(SourceUnavailable, match="Consul"):
            backup(source=source_url("consul", server), store=str(store), **backup_kwargs())
        assert LocalStore(path=str(store)).list() == []
        assert not [p for p in store.rglob("*") if p.is_file()]
    finally:
        server.stop()


def _in_pieces(data: bytes, rnd: random.Random, most: int) -> list[bytes]:
    pieces, i = [], 0
    while i < len(data):
        n = rnd.randint(1, most)
        pieces.append(data[i : i + n])
        i += n
    return pieces


@pytest.mark.parametrize("fallback", [False, True])
def test_the_read_is_parsed_as_it_arrives_whatever_the_keys_hold(monkeypatch, fallback) -> None:
    """The streaming parse gives exactly orjson's elements, however the answer is cut and
    whatever "}", "," or quotes the keys hold; also when it falls back to ijson."""
    if fallback:
        monkeypatch.setattr(consul_block, "_FAILS", 1)
    rnd = random.Random(7)
    parts = ["}", ",", "]", "{", '"', "\\", " ", "\n", "a", "é", "/", '},{"', "}, ", "}]", "\u2028", "x" * 40]

    def text() -> str:
        return "".join(rnd.choice(parts) for _ in range(rnd.randint(0, 10)))

    for _ in range(300):
        entries = []
        for _ in range(rnd.choice([0, 1, 3, 40])):
            e = {"LockIndex": 0, "Key": text(), "Flags": rnd.choice([0, 7, 2**64 - 1]),
                 "Value": rnd.choice([None, "", "aGVsbG8="]), "CreateIndex": 5, "ModifyIndex": 9}
            if rnd.random() < 0.2:
                e["Session"] = text()
            entries.append(e)
        data = json.dumps(entries, indent=rnd.choice([None, 4]), ensure_ascii=rnd.random() < 0.5).encode()
        for most in (1, 16, 300, len(data) + 1):
            got = [e for batch in _json_array_batches(_in_pieces(data, rnd, most)) for e in batch]
            assert got == entries
    assert list(_json_array_batches([])) == []
    for bad in (b"{}", b"[{]", b'[{"a":1}', b'[{"a":1}]x', b'[{"a":1},]', b"nope"):
        with pytest.raises((ValueError, ijson.JSONError)):
            list(_json_array_batches(_in_pieces(bad, rnd, 3)))


def test_backup_read_keeps_odd_keys_flags_and_empty_values(consul_a) -> None:
    root = unique("stream")
    c = consul_client(consul_a.url)
    keys = {f"{root}/a}},{{\"b": b"1", f"{root}/c}}]": b"", f"{root}/d/": b"", f"{root}/e f": b"x" * 70_000}
    for k, v in keys.items():
        c.kv.put(k, v, flags=2**64 - 1 if k.endswith("]") else None)
    c.kv.put(root + "x/sibling", "not below the root")
    session = ConsulCluster(address=f"127.0.0.1:{consul_a.port}").connect()
    try:
        stats = WalkStats()
        got = list(session.walk(root.encode(), stats))
    finally:
        session.close()
    assert [(r.key.decode(), r.value) for r in got] == sorted(keys.items())
    assert [r.meta for r in got] == [{}, {"flags": 2**64 - 1}, {}, {}]
    assert isinstance(stats.info["consul_index"], int) and stats.info["point_in_time"]


@pytest.fixture(scope="module")
def consul_secure() -> Iterator[tuple[LocalServer, int, Pki]]:
    """Consul with ACLs (default deny) and an HTTPS port next to the HTTP one."""
    workdir = SESSION_DIR / "consul-secure"
    pki = make_pki(workdir / "pki")
    http, https = free_port(), free_port()
    server = start_consul(
        workdir,
        port=http,
        extra_config={
            "ports": {
                "http": http, "https": https, "server": free_port(), "serf_lan": free_port(),
                "serf_wan": free_port(), "dns": -1, "grpc": -1,
            },
            "acl": {"enabled": True, "default_policy": "deny", "tokens": {"master": MASTER_TOKEN}},
            "ca_file": str(pki.ca), "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
            "verify_incoming": False, "verify_outgoing": False,
        },
    )
    c = consul_client(server.url, token=MASTER_TOKEN)
    c.kv.put("secure/a", "1")
    c.kv.put("secure/b", "2", flags=9)
    yield server, https, pki
    server.stop()


def test_token_and_tls_failures_are_clear_and_write_nothing(consul_secure, store, cli) -> None:
    server, https, pki = consul_secure
    bad_token = register(ConsulCluster(address=f"127.0.0.1:{server.port}", token=SecretStr("wrong-token-123")))
    with pytest.raises(AuthError, match="ACL not found") as err:
        backup(source=bad_token, store=str(store), **backup_kwargs())
    assert "wrong-token-123" not in str(err.value)

    tls: dict[str, Any] = {"address": f"127.0.0.1:{https}", "http_scheme": "https", "token": SecretStr(MASTER_TOKEN)}
    wrong_ca = register(ConsulCluster(**tls, ca_cert=str(pki.other_ca)))
    with pytest.raises(SourceError, match="TLS with Consul"):
        backup(source=wrong_ca, store=str(store), **backup_kwargs())
    assert not [p for p in store.rglob("*") if p.is_file()]

    ok = backup(source=register(ConsulCluster(**tls, ca_cert=pki.ca.read_text())), store=str(store),
                root="secure", **backup_kwargs())
    assert ok["keys"] == 2 and ok["service_info"]["acl"] == "token"

    # The CLI reads the token and the CA from Consul's own environment variables.
    env = {"CONSUL_HTTP_TOKEN": MASTER_TOKEN, "CONSUL_CACERT": str(pki.ca)}
    r = cli("dump", f"consuls://127.0.0.1:{https}", "--subtree", "secure", env=env)
    assert r.code == 0 and "secure/a" in r.out and "secure/b" in r.out, r
    assert MASTER_TOKEN not in r.out + r.err
