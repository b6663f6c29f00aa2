"""What only the local directory store has: a missing directory, and the rule that only
complete archives are ever listed when a backup fails after its upload. The contract every
store passes (put, get, list, head, delete, no replacing, partials, unsafe names, strays) is in
tests/test_stores.py."""

from __future__ import annotations

import json

import pytest
from zkutil import kazoo, unique_root

from blocks.local import LocalStore
from burrow.errors import ArchiveError, StoreError


def test_missing_store_directory(tmp_path):
    store = LocalStore(path=str(tmp_path / "missing"))
    with pytest.raises(StoreError, match="does not exist"):
        store.list()
    with pytest.raises(StoreError, match="does not exist"):
        store.check(writable=True)


def test_a_backup_whose_verify_fails_removes_its_archive(zk_a, store, monkeypatch, capsys):
    """Upload succeeded, verification did not: the archive is deleted again, so nothing that
    looks like a good backup is left, and the flow fails with the verify error."""
    import tasks.verify
    from cli import main
    from flows.backup import backup

    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/a", b"1", makepath=True)

    def broken(*args, **kwargs):
        raise ArchiveError("simulated: the stored copy does not read back")

    monkeypatch.setattr(tasks.verify, "validate_archive", broken)
    with pytest.raises(ArchiveError, match="simulated"):
        backup(source=f"zk://{zk_a.url}", store=str(store), root=root, encryption=False)
    assert [p for p in store.rglob("*") if p.is_file()] == []
    capsys.readouterr()
    assert main(["list", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
