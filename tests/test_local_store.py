"""The local directory store (put, get, list, head, delete) and the rule that only complete
archives are ever listed, including when a backup fails after its upload."""

from __future__ import annotations

import json

import pytest
from zkutil import kazoo, unique_root

from blocks.local import LocalStore
from burrow.errors import ArchiveError, ArchiveNotFound, StoreError, UsageError


def test_put_get_list_head_delete(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    store = LocalStore(path=str(root))
    src = tmp_path / "a.burrow"
    src.write_bytes(b"archive bytes")
    info = store.put("src/src-1.burrow", src)
    assert info.name == "src/src-1.burrow" and info.size == 13 and info.url == store.url("src/src-1.burrow")
    assert store.head("src/src-1.burrow").size == 13
    assert [a.name for a in store.list()] == ["src/src-1.burrow"]
    assert [a.name for a in store.list("other/")] == []
    out = store.get("src/src-1.burrow", tmp_path / "copy")
    assert out.read_bytes() == b"archive bytes"
    with pytest.raises(StoreError, match="already exists"):
        store.put("src/src-1.burrow", src)  # never replaced
    # leftovers of an interrupted put are hidden, and other files are not archives
    (root / "src" / ".src-2.burrow.0123.partial").write_bytes(b"half")
    (root / "src" / "notes.txt").write_text("x")
    assert [a.name for a in store.list()] == ["src/src-1.burrow"]
    store.delete("src/src-1.burrow")
    assert store.list() == []
    with pytest.raises(ArchiveNotFound):
        store.head("src/src-1.burrow")
    with pytest.raises(ArchiveNotFound):
        store.delete("src/src-1.burrow")
    with pytest.raises(ArchiveNotFound):
        store.get("src/src-1.burrow", tmp_path / "x")


@pytest.mark.parametrize("name", ["../escape.burrow", "/abs.burrow", "a/../b.burrow", ".hidden.burrow", "x.txt", "a//b.burrow"])
def test_names_that_could_escape_or_look_incomplete_are_refused(tmp_path, name):
    with pytest.raises(UsageError):
        LocalStore(path=str(tmp_path)).url(name)


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
    from burrow.cli import main
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
