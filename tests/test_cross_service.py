"""The round-trip suite over every service, and restores across every pair of services.

Each source tree is seeded through an independent client (kazoo, the etcd JSON gateway,
py-consul), backed up once by the backup flow, restored by the restore flow, and read
back key by key, byte by byte, with the independent client again.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kvutil import Etcd, backup_kwargs, consul_client, consul_snapshot, unique
from services import LARGE, expected_in, native_root, read, seed, source_url

from flows.backup import backup
from flows.restore import restore
from tasks.extract import extract

SERVICES = ["zookeeper", "etcd", "consul"]
SERVERS = {"zookeeper": ("zk_a", "zk_b"), "etcd": ("etcd_a", "etcd_b"), "consul": ("consul_a", "consul_b")}
OPEN_ACL = "acl (world:anyone, open)"


@pytest.fixture(scope="module")
def archives(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Back up a freshly seeded tree of each service once (per large-value size)."""
    cache: dict[tuple[str, int], tuple[Any, dict[str, Any]]] = {}

    def get(service: str, large: int) -> tuple[Any, dict[str, Any]]:
        if (service, large) not in cache:
            server = request.getfixturevalue(SERVERS[service][0])
            seeded = seed(service, server, large)
            store = tmp_path_factory.mktemp("store")
            summary = backup(
                source=source_url(service, server), store=str(store), root=seeded.root, **backup_kwargs()
            )
            cache[(service, large)] = (seeded, summary)
        return cache[(service, large)]

    return get


def _compare(got: dict[bytes, bytes], want: dict[bytes, bytes]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k] == v, f"value of {k!r} differs ({len(got[k])} vs {len(v)} bytes)"


@pytest.mark.parametrize("service", SERVICES)
def test_round_trip(service: str, archives: Any, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> None:
    seeded, summary = archives(service, LARGE[service])
    assert summary["status"] == "ok"
    assert summary["keys"] == len(seeded.tree)
    assert summary["skipped_ephemeral"] == len(seeded.skipped)  # ZooKeeper ephemeral / etcd leased
    assert summary["point_in_time"] is (service != "zookeeper")
    info = summary["service_info"]
    if service == "etcd":
        assert info["revision"] > 0 and info["cluster_id"] and info["leased_skipped"] == 1
    if service == "consul":
        assert info["consul_index"] > 0 and info["locked_keys"] == 1

    target = request.getfixturevalue(SERVERS[service][1])
    with caplog.at_level(logging.WARNING):
        result = restore(archive=summary["url"], into=source_url(service, target))
    assert result["status"] == "ok"
    assert result["created"] == len(seeded.tree) and result["conflicts"] == 0
    said = caplog.text
    assert "carried over to consul" not in said  # a Consul lock's session is not a Consul-to-X difference
    if service == "consul":
        assert "1 keys are created without their session: a Consul lock's session lives on the source" in said
    got = read(service, target, seeded.root)
    _compare(got, seeded.tree)
    for k in seeded.skipped:
        assert k not in got

    if service == "consul":
        snap = consul_snapshot(consul_client(target.url), seeded.root)
        for k in seeded.tree:
            value, flags, session = snap[k.decode()]
            assert flags == seeded.flags.get(k, 0)
            assert session is None  # restored without the session lock
        assert result["metadata_not_carried"] == {"session": 1}
    else:
        assert not result["metadata_not_carried"]

    again = restore(archive=summary["url"], into=source_url(service, target))
    assert again["created"] == 0 and again["conflicts"] == 0 and again["identical"] == len(seeded.tree)


PAIRS = [(s, t) for s in SERVICES for t in SERVICES if s != t]


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{s}-to-{t}" for s, t in PAIRS])
def test_restore_across_services(source: str, target: str, archives: Any, request: pytest.FixtureRequest) -> None:
    large = min(LARGE[source], LARGE[target])
    seeded, summary = archives(source, large)
    server = request.getfixturevalue(SERVERS[target][1])
    result = restore(archive=summary["url"], into=source_url(target, server))
    assert result["status"] == "ok", result
    want = expected_in(target, source, seeded.tree)
    got = read(target, server, native_root(target, seeded.root))
    _compare(got, want)

    carried = result["metadata_not_carried"]
    if source == "zookeeper":
        assert carried == {OPEN_ACL: len(seeded.tree)}
    elif source == "consul":
        assert carried == {"flags": 1, "session": 1}
    else:
        assert not carried
    if target == "consul":
        snap = consul_snapshot(consul_client(server.url), native_root(target, seeded.root))
        assert all(flags == 0 and session is None for _, flags, session in snap.values())


def test_etcd_keys_without_leading_slash_and_folders(etcd_a, etcd_b, zk_b, consul_b, store) -> None:
    """etcd ``ns/a`` becomes ZooKeeper ``/ns/a`` and Consul ``ns/a``; ``ns/b/`` is a folder."""
    name = unique("ns")
    tree = {
        f"{name}/a".encode(): b"1",
        f"{name}/b/".encode(): b"",
        f"{name}/b/c".encode(): b"2",
        f"/{name}-slash/x".encode(): b"3",
    }
    e = Etcd(etcd_a.url)
    for k, v in tree.items():
        e.put(k, v)
    summary = backup(source=source_url("etcd", etcd_a), store=str(store), **backup_kwargs())
    url = summary["url"]
    # same service: kept exactly, with and without the leading slash
    restore(archive=url, into=source_url("etcd", etcd_b))
    after = Etcd(etcd_b.url).snapshot()
    assert {k: after[k] for k in tree} == tree
    # into ZooKeeper, only this test's keys: --subtree works on the archive's own key style
    r = restore(archive=url, into=source_url("zookeeper", zk_b), subtree="/" + name)
    assert r["status"] == "ok" and r["conflicts"] == 0
    assert read("zookeeper", zk_b, "/" + name) == {
        f"/{name}".encode(): b"", f"/{name}/a".encode(): b"1", f"/{name}/b".encode(): b"",
        f"/{name}/b/c".encode(): b"2",
    }
    r = restore(archive=url, into=source_url("consul", consul_b), subtree=name)
    assert read("consul", consul_b, name) == {
        f"{name}/a".encode(): b"1", f"{name}/b/".encode(): b"", f"{name}/b/c".encode(): b"2",
    }


def test_map_across_services(archives: Any, consul_b, zk_b) -> None:
    """--map OLD=NEW is matched in the archive's key style and lands in the target's."""
    seeded, summary = archives("zookeeper", min(LARGE["zookeeper"], LARGE["consul"]))
    new = unique("moved")
    r = restore(
        archive=summary["url"], into=source_url("consul", consul_b), maps=[f"{seeded.root}/dir={new}/d"],
        subtree=seeded.root + "/dir",
    )
    assert r["status"] == "ok" and r["created"] == 2 and r["outside_subtree"] == len(seeded.tree) - 2
    assert read("consul", consul_b, new) == {f"{new}/d".encode(): b"", f"{new}/d/child".encode(): b"child"}

    seeded_c, summary_c = archives("consul", LARGE["consul"])
    dest = "/" + unique("from-consul")
    r = restore(archive=summary_c["url"], into=source_url("zookeeper", zk_b), maps=[f"/{seeded_c.root}={dest}"])
    assert r["status"] == "ok"
    want = {dest.encode() + k[len(b"/" + seeded_c.root.encode()):]: v for k, v in expected_in(
        "zookeeper", "consul", seeded_c.tree).items()}
    assert read("zookeeper", zk_b, dest) == want


def _parallel(cli, calls: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """Run CLI subprocesses two at a time (each one spends seconds importing Prefect)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(cli, *args) for name, args in calls.items()}
        return {name: f.result() for name, f in futures.items()}


def test_cli_contract(cli, etcd_a, consul_a, tmp_path, capsys, monkeypatch) -> None:
    """The contract for etcd and Consul: through the real ``burrow`` command, backup prints
    the archive URL last; through the CLI's entry point in this process (much cheaper than
    more subprocesses), verify, list, inspect and dump work and an unreachable server is one
    line, exit 1, nothing written."""
    from cli import main

    servers = {"etcd": etcd_a, "consul": consul_a}
    seeded = {svc: seed(svc, a, 1024) for svc, a in servers.items()}
    store = tmp_path / "store"
    store.mkdir()
    empty = tmp_path / "empty-store"
    empty.mkdir()
    r = _parallel(cli, {
        f"backup-{svc}": ("backup", source_url(svc, a), "--to", str(store), "--root", seeded[svc].root,
                          "--no-encryption")
        for svc, a in servers.items()
    })
    archives = {}
    for svc in servers:
        b = r[f"backup-{svc}"]
        assert b.code == 0, b
        archives[svc] = b.last_line
        assert archives[svc].startswith("file://") and archives[svc].endswith(".burrow")
    capsys.readouterr()
    assert main(["verify", archives["consul"]]) == 0
    assert f"{len(seeded['consul'].tree)} keys" in capsys.readouterr().out
    # unreachable: the extract task retries (without its pauses here), then one line, exit 1
    with monkeypatch.context() as m:
        m.setattr("flows.backup.extract", extract.with_options(retry_delay_seconds=[0, 0]))
        assert main(["backup", "etcd://127.0.0.1:1", "--to", str(empty), "--no-encryption"]) == 1
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("burrow: error:")]
    assert errors and "cannot reach etcd at etcd://127.0.0.1:1" in errors[-1]
    assert not any(empty.iterdir())

    capsys.readouterr()
    assert main(["list", str(store), "--json"]) == 0
    rows = {row["service"]: row for row in json.loads(capsys.readouterr().out)}
    assert {svc: rows[svc]["keys"] for svc in servers} == {svc: len(seeded[svc].tree) for svc in servers}
    assert main(["inspect", archives["etcd"], "--json", "--keys"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["point_in_time"] is True and info["service"] == "etcd" and info["service_info"]["revision"] > 0
    assert sorted(info["key_list"]) == sorted(k.decode() for k in seeded["etcd"].tree)
    for svc, a in servers.items():
        assert main(["dump", source_url(svc, a), "--subtree", seeded[svc].root]) == 0
        out = capsys.readouterr().out
        assert out.count("\n") == len(seeded[svc].tree) and "hex:" in out  # binary values shown safely


def test_cli_errors_in_process(etcd_a, consul_a, store, capsys, monkeypatch) -> None:
    """More bad-input rules through the CLI's entry point, in this process (cheap)."""
    from cli import main

    cases = [
        ({}, ["backup", f"etcd://127.0.0.1:{etcd_a.port}?user=x"], 2, "unknown etcd URL option"),
        ({}, ["backup", f"consul://127.0.0.1:{consul_a.port}", "--include-leased"], 2, "etcd sources only"),
        ({}, ["backup", "consul://a:1,b:2"], 2, "one agent"),
        ({}, ["backup", f"etcd://user:secret@127.0.0.1:{etcd_a.port}"], 2, "never carry credentials"),
        ({}, ["backup", f"consul://tok-secret@127.0.0.1:{consul_a.port}"], 2, "never carry credentials"),
        ({"BURROW_ETCD_CACERT": "/nonexistent/ca.pem"}, ["backup", f"etcds://127.0.0.1:{etcd_a.port}"], 2,
         "cannot read the etcd TLS CA file"),
        ({}, ["backup", f"etcds://127.0.0.1:{etcd_a.port}"], 1, "TLS with etcd"),  # TLS to a plaintext port
        ({}, ["backup", f"consuls://127.0.0.1:{consul_a.port}"], 1, "TLS with Consul"),
    ]
    for env, argv, code, text in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert main([*argv, "--to", str(store), "--no-encryption"]) == code, argv
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("burrow: error:")]
        assert lines and text in lines[-1] and "secret" not in err, (argv, err[-500:])
    assert not [p for p in store.rglob("*") if p.is_file()]
