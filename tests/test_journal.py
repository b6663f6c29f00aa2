"""The failover journal (issue 16): a record of an unfinished failover steers the next one only
when a key only readers hold authenticated it, it is bound to this source, target, archive and
manifest, and it has not expired. Anything else is ignored with one warning and left for prune.

The store is written the way a compromised backup worker could (plain files, no key); the
failovers run against a real ZooKeeper (dry runs: the choice is made, nothing is written)."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from zkutil import unique_root

from blocks.keys import archive_keys
from blocks.local import LocalStore
from burrow import naming
from burrow.archive import ArchiveWriter
from burrow.crypto import ArchiveKeys, StreamEncryptor
from burrow.keys import Keyring, WriteKeys, X25519Identity, keygen, read_key_file
from burrow.records import Record
from burrow.testing.servers import free_port
from cli import main
from flows.failover import failover
from tasks.catalog import describe_archives
from tasks.journal import (
    JOURNAL_PREFIX,
    build_record,
    check_record,
    journal_dir,
    open_journal,
    stale_journal_records,
    unfinished_failover,
)

DEAD = f"zk://127.0.0.1:{free_port()}"
SOURCE = "dc-jr"


def _archive(store: Path, key: Path, created: datetime, tag: str) -> Path:
    enc = StreamEncryptor(WriteKeys("symmetric", [read_key_file(key)[0]], "test"))
    buf = io.BytesIO()
    w = ArchiveWriter(buf, service="zookeeper", encryptor=enc)
    root = unique_root()
    for r in [Record(root.encode(), b"")] + [Record(f"{root}/k{i}".encode(), f"{tag}{i}".encode()) for i in range(3)]:
        w.add(r)
    name = naming.archive_name(SOURCE)
    w.finish({"service": "zookeeper", "source": SOURCE, "source_url": DEAD, "root": "/", "object_name": name,
              "created": created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "encryption": enc.summary()})
    path = store / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture
def setup(store: Path, tmp_path: Path, zk_b):  # noqa: ANN201
    """A store with an older and a newer archive of SOURCE, the key, and a target URL."""
    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    now = datetime.now(UTC)
    old = _archive(store, key, now - timedelta(hours=1), "old")
    new = _archive(store, key, now - timedelta(minutes=10), "new")
    keys = archive_keys([str(key)], None, None, None, None)
    rows = {r["url"]: r for r in describe_archives(LocalStore(path=str(store)), keys)}
    into = f"zk://{zk_b.url}/{unique_root().strip('/')}"
    return {"store": store, "key": key, "keys": keys, "old": rows[f"file://{old}"], "new": rows[f"file://{new}"],
            "into": into, "st": LocalStore(path=str(store))}


def _plant(s: dict, record: dict, stamp: str = "20991231T000000000000Z") -> Path:
    """Write a record into the journal directory as plain bytes (no key needed)."""
    path = s["store"] / f"{journal_dir(SOURCE, s['into'])}{stamp}-deadbeef.burrow-meta"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps(record).encode())
    return path


def _dry(s: dict, **kw) -> dict:  # noqa: ANN003
    return failover(source=SOURCE, store=str(s["store"]), into=s["into"], primary=DEAD, key_files=[str(s["key"])],
                    dry_run=True, **kw)


def _cli(capsys, s: dict, *extra: str) -> tuple[str, str]:  # noqa: ANN001
    capsys.readouterr()
    code = main(["failover", SOURCE, "--from", str(s["store"]), "--into", s["into"], "--primary", DEAD,
                 "--key-file", str(s["key"]), "--dry-run", *extra])
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    return out, err


def test_a_planted_record_without_a_valid_mac_does_not_steer_failover(setup, caplog):
    s = setup
    old = s["old"]
    unsigned = {"kind": "burrow-failover-journal", "version": 2, "source": SOURCE, "target": s["into"],
                "archive": old["name"], "url": old["url"], "manifest_sha256": old["manifest_sha256"],
                "started": datetime.now(UTC).isoformat(), "expires": "2099-01-01T00:00:00+00:00"}
    planted = _plant(s, unsigned)
    # ... and one with a MAC made by a key the readers do not hold (an attacker's own)
    other = ArchiveKeys(Keyring([X25519Identity.generate()]))
    forged = _plant(s, build_record(SOURCE, s["into"], old, other, started=datetime.now(UTC)), "20991231T000000000001Z")
    with caplog.at_level(logging.WARNING):
        done = _dry(s)
    assert done["archive"] == s["new"]["url"] and not done.get("resumed"), done
    assert done["archive_chosen"] == "newest"
    warnings = [r.getMessage() for r in caplog.records if "journal record" in r.getMessage()]
    assert len(warnings) == 1 and "ignoring 2 failover journal records" in warnings[0], warnings
    assert "unauthenticated" in warnings[0]
    # left for prune, which is told exactly these two
    assert planted.exists() and forged.exists()
    stale = stale_journal_records(s["st"], s["keys"])
    assert sorted(stale) == sorted(p.relative_to(s["store"]).as_posix() for p in (planted, forged))


def test_a_genuine_fresh_record_is_resumed_with_one_line_and_no_resume_starts_afresh(setup, capsys):
    s = setup
    name = open_journal(s["st"], SOURCE, s["into"], s["old"], s["keys"])
    assert name and name.startswith(JOURNAL_PREFIX)
    record = json.loads((s["store"] / name).read_bytes())
    assert record["signer"] and record["mac"] and record["manifest_sha256"] == s["old"]["manifest_sha256"]
    assert record["target"] == s["into"] and record["source"] == SOURCE and record["expires"] > record["started"]

    out, _ = _cli(capsys, s)
    want = f"resuming the failover begun at {record['started']} with archive {s['old']['url']}"
    lines = [ln for ln in out.splitlines() if "resum" in ln]
    assert lines == [want], out
    assert f"failover from {s['old']['url']}" in out

    out, _ = _cli(capsys, s, "--no-resume")
    assert "resum" not in out and f"failover from {s['new']['url']}" in out, out
    assert stale_journal_records(s["st"], s["keys"]) == []  # a genuine, fresh record is not prune's


def test_an_expired_genuine_record_is_ignored(setup):
    s = setup
    long_ago = datetime.now(UTC) - timedelta(days=20)
    expired = _plant(s, build_record(SOURCE, s["into"], s["old"], s["keys"], started=long_ago), "20200101T000000000000Z")
    done = _dry(s)
    assert done["archive"] == s["new"]["url"] and not done.get("resumed"), done
    assert stale_journal_records(s["st"], s["keys"]) == [expired.relative_to(s["store"]).as_posix()]

    # a record within its own 6 h but older than this run's --resume-within is not resumed either
    expired.unlink()
    _plant(s, build_record(SOURCE, s["into"], s["old"], s["keys"], started=datetime.now(UTC) - timedelta(hours=2)))
    assert _dry(s, resume_within="1h")["archive"] == s["new"]["url"]
    assert _dry(s)["archive"] == s["old"]["url"]  # (the default 6 h: resumed)


def test_records_bound_elsewhere_are_ignored(setup):
    s = setup
    now = datetime.now(UTC)
    # genuine, but for another target, copied into this pair's directory
    _plant(s, build_record(SOURCE, "zk://elsewhere:2181/x", s["old"], s["keys"], started=now))
    # genuine, but naming a manifest the archive does not have
    _plant(s, build_record(SOURCE, s["into"], dict(s["old"], manifest_sha256="0" * 64), s["keys"], started=now),
           "20991231T000000000001Z")
    assert unfinished_failover(s["st"], SOURCE, s["into"], s["keys"]) is not None  # (the second authenticates ...)
    done = _dry(s)
    assert done["archive"] == s["new"]["url"] and not done.get("resumed"), done  # ... but names no candidate
    assert len(stale_journal_records(s["st"], s["keys"])) == 1  # the foreign one


def test_check_record_rules_and_a_public_key_holder_cannot_sign():
    now = datetime.now(UTC)
    ident = X25519Identity.generate()
    readers = ArchiveKeys(Keyring([ident]))
    row = {"name": "s/s-1.burrow", "url": "file:///x/s/s-1.burrow", "manifest_sha256": "ab" * 32}
    rec = build_record("s", "zk://t:1/a", row, readers, started=now)
    assert check_record(rec, "s", "zk://t:1/a", readers, now=now) == (True, None)
    assert check_record(rec, "s", "zk://t:1/a", readers, now=now + timedelta(hours=7))[1] == "expired"
    assert check_record(rec, "s", "zk://t:1/a", readers, now=now + timedelta(hours=2), within=timedelta(hours=1))[1] \
        == "expired"
    assert check_record(rec, "s", "zk://t:1/a", readers, now=now - timedelta(hours=1))[1] == "dated in the future"
    assert check_record(rec, "other", "zk://t:1/a", readers, now=now)[1].startswith("foreign")
    assert check_record(rec, "s", "zk://t:1/b", readers, now=now)[1].startswith("foreign")
    edited = dict(rec, archive="s/s-0.burrow")
    assert check_record(edited, "s", "zk://t:1/a", readers, now=now)[1].startswith("unauthenticated")
    # a backup worker holds the public key only: it can neither sign nor verify
    worker = ArchiveKeys(WriteKeys("x25519", [ident.recipient], "test").keyring())
    assert not worker.can_reader_sign() and worker.reader_signers() == []
    with pytest.raises(ValueError):
        build_record("s", "zk://t:1/a", row, worker, started=now)
    assert check_record(rec, "s", "zk://t:1/a", worker, now=now)[1].startswith("unverifiable")
    assert check_record(rec, "s", "zk://t:1/a", None, now=now)[1].startswith("unverifiable")
