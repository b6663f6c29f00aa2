"""Downgrade (issue 8, item 4): with read keys configured, an unencrypted archive is refused by
restore, failover and verify unless ``--allow-unencrypted`` is given.

The attack: anyone who can write to the store plants a plaintext archive with a forged
source and a later ``created`` time; without this rule failover restores it as the newest.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from zkutil import kazoo, snapshot, unique_root

from burrow import naming
from burrow.archive import ArchiveWriter
from burrow.crypto import StreamEncryptor
from burrow.errors import ArchiveError
from burrow.keys import WriteKeys, keygen, read_key_file
from burrow.records import Record
from flows.failover import failover
from flows.restore import restore
from flows.verify import verify

ENV_VARS = ("BURROW_KEY_FILE", "BURROW_KEY", "BURROW_RECIPIENTS", "BURROW_PASSPHRASE_ENV", "BURROW_KEY_BLOCK",
            "BURROW_IDENTITY_FILE", "BURROW_KEYRING")


def stamp(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def put(store: Path, source: str, records: list[Record], created: str, write_keys: WriteKeys | None) -> Path:
    """An archive of ``source`` written straight into a local store directory."""
    buf = io.BytesIO()
    enc = StreamEncryptor(write_keys) if write_keys else None
    w = ArchiveWriter(buf, service="zookeeper", encryptor=enc)
    for r in records:
        w.add(r)
    fields = {"service": "zookeeper", "source": source, "source_url": "zk://dc-z", "root": "/", "created": created}
    if enc:
        fields["encryption"] = enc.summary()
    name = naming.archive_name(source)
    fields["object_name"] = name  # bound to its name, as a backup writes it
    w.finish(fields)
    path = store / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture
def setup(tmp_path, monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    import blocks.resolve

    monkeypatch.setattr(blocks.resolve, "_registered", {})  # no block another test registered for zk_b
    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    write_keys = WriteKeys("symmetric", [read_key_file(key)[0]], "test")
    root = unique_root()
    store = tmp_path / "store"
    store.mkdir()
    genuine = put(store, "dc-z", [Record(root.encode(), b""), Record(f"{root}/cfg".encode(), b"genuine")],
                  stamp(timedelta(hours=-1)), write_keys)
    planted = put(store, "dc-z", [Record(root.encode(), b""), Record(f"{root}/cfg".encode(), b"PLANTED"),
                                  Record(f"{root}/backdoor".encode(), b"PLANTED")],
                  stamp(timedelta(seconds=-1)), None)
    return key, root, store, genuine, planted


def test_failover_skips_a_planted_unencrypted_archive_when_keys_are_configured(zk_b, setup):
    key, root, store, genuine, planted = setup
    top = unique_root()  # a chroot of its own: zk_b holds every other test's keys (the wrong-cluster guard)
    into = f"zk://{zk_b.url}{top}"
    dry = failover(source="dc-z", store=str(store), into=into, key_files=[str(key)], dry_run=True)
    assert dry["archive"] == "file://" + str(genuine), dry  # the planted one is newer, and refused
    assert dry["skipped_archives"] == 1
    done = failover(source="dc-z", store=str(store), into=into, key_files=[str(key)])
    assert done["created"] == 2
    with kazoo(zk_b.url + top) as c:
        assert snapshot(c, root) == {root: b"", f"{root}/cfg": b"genuine"}
    # on purpose: --allow-unencrypted takes the newest, plaintext or not (dry run: writes nothing)
    dry = failover(source="dc-z", store=str(store), into=into, key_files=[str(key)], dry_run=True,
                   allow_unencrypted=True)
    assert dry["archive"] == "file://" + str(planted)


def test_restore_and_verify_refuse_an_unencrypted_archive_when_keys_are_configured(zk_b, setup, capsys):
    key, root, store, genuine, planted = setup
    with pytest.raises(ArchiveError, match="not encrypted.*--allow-unencrypted"):
        restore(archive=str(planted), into=f"zk://{zk_b.url}", key_files=[str(key)])
    with kazoo(zk_b.url) as c:
        assert c.exists(root) is None  # refused before anything was written
    with pytest.raises(ArchiveError, match="not encrypted"):
        verify(archive=str(planted), key_files=[str(key)])
    # the flag reads it anyway; and without any key configured nothing changes
    assert verify(archive=str(planted), key_files=[str(key)], allow_unencrypted=True)["keys"] == 3
    assert verify(archive=str(planted))["keys"] == 3
    assert restore(archive=str(planted), into=f"zk://{zk_b.url}", dry_run=True, key_files=[str(key)],
                   allow_unencrypted=True)["planned_create"] == 3
    # the CLI: exit 1 with one line naming the flag, and the flag itself
    from cli import main

    capsys.readouterr()
    assert main(["verify", str(planted), "--key-file", str(key)]) == 1
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("burrow: error:")]
    assert len(errors) == 1 and "not encrypted" in errors[0] and "--allow-unencrypted" in errors[0], errors
    assert main(["verify", str(planted), "--key-file", str(key), "--allow-unencrypted"]) == 0
    assert "3 keys" in capsys.readouterr().out
    assert main(["restore", str(planted), "--into", f"zk://{zk_b.url}", "--key-file", str(key), "--dry-run"]) == 1
    assert main(["failover", "dc-z", "--from", str(store), "--into", f"zk://{zk_b.url}{unique_root()}", "--key-file", str(key),
                 "--dry-run", "--allow-unencrypted"]) == 0
    assert f"failover from file://{planted}" in capsys.readouterr().out
