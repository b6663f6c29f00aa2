"""Store errors: a transient I/O error (EIO, ETIMEDOUT, ESTALE, ...) is retried by the upload,
download, catalog and delete tasks and a permanent one (ENOSPC, ...) is not; and a stray file
in a store (``copy of x.burrow``, ``notes.txt``, a half-written file, a dangling link, a FIFO)
never breaks ``list``, ``prune`` or ``failover``: each skips it with a warning."""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect import flow

from blocks.local import LocalStore
from burrow.archive import ArchiveWriter
from burrow.errors import EXIT_OK, StoreError, is_transient
from burrow.records import Record
from cli import main
from tasks.catalog import catalog
from tasks.download import download
from tasks.retention import delete_archive
from tasks.upload import upload


def make_archive(store: Path, name: str, source: str, created: str, service: str = "etcd") -> Path:
    buf = io.BytesIO()
    w = ArchiveWriter(buf, service=service)
    w.add(Record(b"/stray-test/" + source.encode(), created.encode()))
    w.finish({"source": source, "created": created, "service": service, "object_name": name})
    path = store / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def iso(days_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Fault:
    """Make one function fail with ``err`` for paths below ``root``, ``times`` times (the
    rest of the process is left alone; ``only`` narrows the paths further). ``after``: do the real call first, then fail (a
    network share that did the work but lost the answer)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, root: Path, err: int,
                 times: int = 1, after: bool = False, only: Callable[[str], bool] | None = None) -> None:
        self.real: Callable[..., Any] = getattr(owner, name)
        self.root, self.err, self.left, self.after = str(root), err, times, after
        self.only = only
        self.hits = 0
        monkeypatch.setattr(owner, name, self)

    def _path(self, target: Any) -> str:
        if isinstance(target, int):
            try:
                return os.readlink(f"/proc/self/fd/{target}")
            except OSError:
                return ""
        return os.fspath(target) if isinstance(target, (str, os.PathLike)) else ""

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        path = self._path(target)
        if not path.startswith(self.root) or (self.only is not None and not self.only(path)):
            return self.real(target, *args, **kwargs)
        self.hits += 1
        if self.left <= 0:
            return self.real(target, *args, **kwargs)
        self.left -= 1
        if self.after:
            self.real(target, *args, **kwargs)
        raise OSError(self.err, os.strerror(self.err), os.fspath(target) if not isinstance(target, int) else None)


def run_in_flow(fn: Callable[[], Any]) -> Any:
    @flow(name="store-errors", persist_result=False)
    def f() -> Any:
        return fn()

    return f()


def test_upload_retries_a_transient_io_error_and_not_a_permanent_one(store, tmp_path, monkeypatch) -> None:
    st = LocalStore(path=str(store))
    src = tmp_path / "a.burrow"
    src.write_bytes(b"archive bytes")
    fast = upload.with_options(retry_delay_seconds=[0, 0, 0])
    # EIO on the directory fsync, after the archive was linked into place: the failed attempt
    # takes it back, and the retry writes it again (instead of finding "already exists").
    eio = Fault(monkeypatch, os, "fsync", store, errno.EIO, only=os.path.isdir)
    info = run_in_flow(lambda: fast(st, str(src), "s/s-1.burrow"))
    assert info.name == "s/s-1.burrow" and eio.hits == 2
    assert [a.name for a in st.list()] == ["s/s-1.burrow"]
    assert (store / "s" / "s-1.burrow").read_bytes() == b"archive bytes"

    full = Fault(monkeypatch, os, "fsync", store, errno.ENOSPC, times=5)
    with pytest.raises(StoreError, match="store is full") as err:
        run_in_flow(lambda: fast(st, str(src), "s/s-2.burrow"))
    assert full.hits == 1 and not is_transient(err.value)  # tried once: ENOSPC is permanent
    assert [a.name for a in st.list()] == ["s/s-1.burrow"]
    assert sorted(p.name for p in (store / "s").iterdir()) == ["s-1.burrow"]  # no leftovers


def test_download_and_catalog_retry_transient_io_errors(store, tmp_path, monkeypatch) -> None:
    make_archive(store, "s/s-1.burrow", "s", iso(1))
    st = LocalStore(path=str(store))
    copy = Fault(monkeypatch, shutil, "copyfile", store, errno.ETIMEDOUT)
    work = tmp_path / "work"
    work.mkdir()
    got = run_in_flow(lambda: download.with_options(retry_delay_seconds=[0, 0, 0])(st, "s/s-1.burrow", str(work)))
    assert Path(got).read_bytes() == (store / "s" / "s-1.burrow").read_bytes() and copy.hits == 2

    reads = Fault(monkeypatch, builtins, "open", store, errno.EIO)
    rows = run_in_flow(lambda: catalog.with_options(retry_delay_seconds=[0, 0, 0])(st))
    assert [r.get("source") for r in rows] == ["s"] and not rows[0].get("error") and reads.hits == 2


def test_delete_retries_and_a_retry_finding_it_gone_is_done(store, monkeypatch) -> None:
    """ESTALE after the file was in fact removed (a network share lost the answer): the retry
    finds it gone, which is what was asked."""
    make_archive(store, "s/s-1.burrow", "s", iso(1))
    st = LocalStore(path=str(store))
    unlink = Fault(monkeypatch, os, "unlink", store, errno.ESTALE, after=True)
    run_in_flow(lambda: delete_archive.with_options(retry_delay_seconds=[0, 0])(st, "s/s-1.burrow"))
    assert unlink.hits == 2 and st.list() == []


def test_stray_files_never_break_list_prune_or_failover(store, etcd_b, caplog, capsys) -> None:
    old = make_archive(store, "dc-s/dc-s-001.burrow", "dc-s", iso(3))
    new = make_archive(store, "dc-s/dc-s-002.burrow", "dc-s", iso(1))
    strays = {
        "copy of dc-s-002.burrow": new.read_bytes(),  # a name Burrow never writes
        "notes.txt": b"remember the milk",
        "dc-s/dc-s-003.burrow": new.read_bytes()[: len(new.read_bytes()) // 2],  # half-written by cp
        "empty.burrow": b"",
    }
    for name, data in strays.items():
        (store / name).write_bytes(data)
    os.symlink(store / "nowhere.burrow", store / "gone.burrow")  # dangling
    os.mkfifo(store / "pipe.burrow")  # opening it would block forever
    with open(os.path.join(os.fsencode(store), b"caf\xe9.burrow"), "wb") as f:  # not UTF-8
        f.write(new.read_bytes())
    make_archive(store, "dc-s/dc-s-004.burrow", "dc-s", "yesterday")  # a manifest Burrow never writes

    assert main(["list", str(store)]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.count("file://") == 2 and "dc-s-001.burrow" in out and "dc-s-002.burrow" in out
    warned = caplog.text
    for name in ("copy of dc-s-002.burrow", "gone.burrow", "pipe.burrow", "dc-s-003.burrow", "dc-s-004.burrow",
                 "caf"):
        assert name in warned, name

    caplog.clear()
    # a prefix of its own: the shared server holds other tests' keys, which the wrong-cluster guard refuses
    target = f"etcd://127.0.0.1:{etcd_b.port}/{uuid.uuid4().hex[:10]}"
    assert main(["failover", "dc-s", "--from", str(store), "--into", target, "--dry-run"]) == EXIT_OK
    assert "dc-s-002.burrow" in capsys.readouterr().out
    assert "copy of dc-s-002.burrow" in caplog.text

    assert main(["prune", str(store), "--keep", "1"]) == EXIT_OK
    assert not old.exists() and new.exists()
    for name in strays:
        assert (store / name).exists(), name  # never touched
