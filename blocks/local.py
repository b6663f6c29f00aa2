"""A directory on local disk (or a mounted share) as an archive store."""

from __future__ import annotations

import builtins
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

from blocks.store import ARCHIVE_SUFFIX, ArchiveInfo, ArchiveStore, check_name
from burrow.errors import ArchiveNotFound, StoreError


class LocalStore(ArchiveStore):
    """Archives as files below a directory. Writes go to a hidden temporary file that is
    fsynced and renamed into place, so a crash never leaves a half archive under its name."""

    _block_type_name: ClassVar[str] = "Burrow Local Store"
    _block_type_slug: ClassVar[str] = "burrow-local-store"
    _description: ClassVar[str] = "A local directory holding Burrow archives."

    path: str

    @property
    def root(self) -> Path:
        return Path(self.path).expanduser().resolve()

    def describe(self) -> str:
        return "file://" + quote(str(self.root))

    def check(self, *, writable: bool = False) -> None:
        root = self.root
        if not root.is_dir():
            raise StoreError(f"store directory {root} does not exist")
        if writable and not os.access(root, os.W_OK | os.X_OK):
            raise StoreError(f"store directory {root} is not writable")

    def url(self, name: str) -> str:
        return "file://" + quote(str(self.root / check_name(name)))

    def _file(self, name: str) -> Path:
        return self.root / check_name(name)

    def _info(self, name: str, p: Path) -> ArchiveInfo:
        st = p.stat()
        modified = datetime.fromtimestamp(st.st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return ArchiveInfo(name=name, size=st.st_size, modified=modified, url=self.url(name))

    def put(self, name: str, source: Path) -> ArchiveInfo:
        self.check(writable=True)
        final = self._file(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.partial"
        try:
            with open(source, "rb") as src, open(tmp, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            try:
                os.link(tmp, final)  # atomic, and never replaces an existing archive
            except FileExistsError:
                raise StoreError(f"archive {name} already exists in {self.describe()}") from None
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StoreError(f"cannot write archive {name} to {self.describe()}: {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return self._info(name, final)

    def get(self, name: str, dest: Path) -> Path:
        src = self._file(name)
        if not src.is_file():
            raise ArchiveNotFound(f"archive {name} not found in {self.describe()}")
        try:
            shutil.copyfile(src, dest)
        except OSError as exc:
            raise StoreError(f"cannot read archive {name}: {exc.strerror}") from None
        return dest

    def list(self, prefix: str = "") -> builtins.list[ArchiveInfo]:
        self.check()
        out = []
        root = self.root
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                if fn.startswith(".") or not fn.endswith(ARCHIVE_SUFFIX):
                    continue
                name = os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/")
                if name.startswith(prefix):
                    out.append(self._info(name, Path(dirpath) / fn))
        out.sort(key=lambda a: (a.modified, a.name))
        return out

    def head(self, name: str) -> ArchiveInfo:
        p = self._file(name)
        if not p.is_file():
            raise ArchiveNotFound(f"archive {name} not found in {self.describe()}")
        return self._info(name, p)

    def delete(self, name: str) -> None:
        p = self._file(name)
        try:
            p.unlink()
        except FileNotFoundError:
            raise ArchiveNotFound(f"archive {name} not found in {self.describe()}") from None
