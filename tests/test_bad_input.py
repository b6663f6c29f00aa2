"""Bad input through the CLI: each case ends with one clear ``burrow: error:`` line as the
last line on stderr, a non-zero exit code, and nothing written (no archive, no partial file,
not a single node in the restore target). Some cases run the real console script (at once:
most of their time is interpreter start-up and, for unreachable servers, Prefect's retry
delays), the others call the same ``cli.main`` in this process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_cli
from kazoo.security import make_digest_acl
from zkutil import full_snapshot, kazoo, unique_root

from burrow.archive import ArchiveReader, ArchiveWriter
from burrow.records import Record

WRONG_PASSWORD = "wr0ng-pa55word-canary"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def run_main(*args: str) -> SimpleNamespace:
    """``cli.main`` in-process, with its stdout and stderr captured."""
    from cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    lines = [ln for ln in err.getvalue().strip().splitlines() if ln.startswith("burrow: error:")]
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue(), error_line=lines[-1] if lines else "")


def files_under(d: Path) -> list[str]:
    return [os.path.join(dp, f) for dp, _, fs in os.walk(d) for f in fs]


@pytest.fixture(scope="module")
def bad(zk_a, zk_b, tmp_path_factory):
    """Prepare every bad input, run all the CLI cases at once, return their results."""
    from flows.backup import backup

    tmp = tmp_path_factory.mktemp("bad")
    src_root, protected, target_root = unique_root(), unique_root(), unique_root()
    with kazoo(zk_a.url) as c:
        c.create(src_root + "/a/b", b"value", makepath=True)
        c.create(protected, b"private", acl=[make_digest_acl("reader", "right-password", read=True)])
    with kazoo(zk_b.url) as c:
        c.create(target_root, b"pre-existing")
        c.create(target_root + "/keep", b"keep me")
        target_before = full_snapshot(c, target_root)

    good_store = tmp / "good"
    good_store.mkdir()
    good = backup(source=f"zk://{zk_a.url}", store=str(good_store), root=src_root, encryption=False)
    good_path = Path(good["url"].removeprefix("file://"))
    data = good_path.read_bytes()
    with open(good_path, "rb") as f:
        reader = ArchiveReader(f)
        body_mid = (reader.body_start + reader.manifest_offset) // 2
    damaged = tmp / "damaged"
    damaged.mkdir()
    flipped = bytearray(data)
    flipped[body_mid] ^= 0x40
    (damaged / "corrupt.burrow").write_bytes(bytes(flipped))
    (damaged / "truncated.burrow").write_bytes(data[: len(data) - 100])
    assert data.count(b'"version":1') == 2  # header and manifest
    (damaged / "future.burrow").write_bytes(data.replace(b'"version":1', b'"version":9'))
    # every checksum right, one record line not a record: the restore's validate does not parse
    # the lines (its plan does, before any write), so the plan must be what refuses it
    w = ArchiveWriter(buf := io.BytesIO(), service="zookeeper")
    w.add(Record(target_root.encode() + b"/x", b"v", {}))  # planned, and never created
    w.keys += 1
    w.write_content(b'{"k":"/y","v":"not base64!"}\n')
    w.finish({"source": "bad", "service": "zookeeper"})
    (damaged / "malformed.burrow").write_bytes(buf.getvalue())

    stores = {name: tmp / f"store-{name}" for name in ("unreachable", "auth", "vanished")}
    for d in stores.values():
        d.mkdir()
    dead = f"127.0.0.1:{closed_port()}"
    into = ("--into", f"zk://{zk_b.url}", "--map", f"{src_root}={target_root}")
    # the real console script, all at once
    cases = {
        "backup-unreachable": ("backup", f"zk://{dead}?timeout=0.5", "--to", str(stores["unreachable"]),
                               "--no-encryption"),
        "backup-bad-auth": ("backup", f"zk://reader:{WRONG_PASSWORD}@{zk_a.url}", "--root", protected,
                            "--to", str(stores["auth"]), "--no-encryption"),
        "restore-corrupt": ("restore", f"file://{damaged}/corrupt.burrow", *into),
        "restore-unreachable-target": ("restore", good["url"], "--into", f"zk://{dead}?timeout=0.5"),
    }
    # the same code in this process
    in_process = {
        "backup-vanished-path": ("backup", f"zk://{zk_a.url}", "--root", src_root + "/gone",
                                 "--to", str(stores["vanished"]), "--no-encryption"),
        "backup-missing-store": ("backup", f"zk://{zk_a.url}", "--root", src_root, "--to", str(tmp / "missing"),
                                 "--no-encryption"),
        "restore-truncated": ("restore", f"file://{damaged}/truncated.burrow", *into),
        "restore-unknown-version": ("restore", f"file://{damaged}/future.burrow", *into),
        "restore-malformed-record": ("restore", f"file://{damaged}/malformed.burrow", "--into", f"zk://{zk_b.url}"),
        "restore-missing-archive": ("restore", f"file://{damaged}/nope.burrow", *into),
        "verify-corrupt": ("verify", f"file://{damaged}/corrupt.burrow"),
        "list-missing-store": ("list", str(tmp / "missing")),
    }
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, args in cases.items()}
        results = {name: run_main(*args) for name, args in in_process.items()}
        results.update({name: f.result() for name, f in futures.items()})
    with kazoo(zk_b.url) as c:
        target_after = full_snapshot(c, target_root)
    return {
        "results": results, "stores": stores, "tmp": tmp, "target": (target_before, target_after),
        "damaged": damaged, "good_size": len(data),
    }


EXPECTED = {
    # case: (exit code, words the error line must hold)
    "backup-unreachable": (1, ["cannot connect to ZooKeeper", "connection refused by 127.0.0.1"]),
    "backup-bad-auth": (1, ["denied", "digest user/password"]),
    "backup-vanished-path": (1, ["does not exist"]),
    "backup-missing-store": (1, ["store directory", "does not exist"]),
    "restore-corrupt": (1, ["corrupt"]),
    "restore-truncated": (1, ["truncated"]),
    "restore-unknown-version": (1, ["version 9", "reads version 1"]),
    "restore-malformed-record": (1, ["malformed record"]),
    "restore-missing-archive": (1, ["not found"]),
    "restore-unreachable-target": (1, ["cannot connect to ZooKeeper"]),
    "verify-corrupt": (1, ["corrupt"]),
    "list-missing-store": (1, ["does not exist"]),
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_one_clear_line_and_exit_code(bad, case):
    r = bad["results"][case]
    code, words = EXPECTED[case]
    assert r.code == code, r
    last = r.err.strip().splitlines()[-1]
    assert last.startswith("burrow: error: ") and last == r.error_line, r
    for w in words:
        assert w in last, r
    assert "Traceback" not in last
    assert WRONG_PASSWORD not in r.out + r.err
    if case.startswith("backup"):
        assert r.out.strip() == "", r  # no archive URL


def test_failed_backups_leave_nothing_in_the_store(bad, capsys):
    from cli import main

    for name, d in bad["stores"].items():
        assert files_under(d) == [], name  # not even a hidden partial file
        capsys.readouterr()
        assert main(["list", str(d), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == [], name
    assert not (bad["tmp"] / "missing").exists()


def test_failed_restores_write_nothing(bad):
    before, after = bad["target"]
    assert after == before
    # and the damaged archives are left as they were
    assert {p.name for p in bad["damaged"].iterdir()} == {"corrupt.burrow", "truncated.burrow", "future.burrow",
                                                      "malformed.burrow"}

