"""A directory on local disk (or a mounted share) as an archive store.

I/O errors are classified by errno (``burrow.errors.store_os_error``): a transient one (EIO,
ETIMEDOUT, ESTALE, EAGAIN, ...) raises StoreUnavailable, which the upload, download, catalog
and delete tasks retry; a permanent one (ENOENT, EACCES, EROFS, ENOSPC, ...) raises StoreError.
A file that is not an addressable, complete archive (``copy of x.burrow``, a dangling link,
a FIFO) is skipped by ``list`` with a warning: one stray file never breaks the store.
"""

from __future__ import annotations

import builtins
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, ClassVar
from urllib.parse import quote

from blocks.store import (
    ARCHIVE_SUFFIX,
    MAX_SIDECAR_BYTES,
    SIDECAR_SUFFIX,
    ArchiveInfo,
    ArchiveStore,
    check_name,
    check_sidecar_name,
)
from burrow.errors import ArchiveNotFound, StoreError, UsageError, os_error_is_transient, store_os_error
from burrow.runlog import logger


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
        try:
            st = root.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise StoreError(f"store directory {root} does not exist") from None
        except OSError as exc:
            raise store_os_error(exc, f"cannot open store directory {root}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"store directory {root} does not exist (it is not a directory)")
        if writable and not os.access(root, os.W_OK | os.X_OK):
            raise StoreError(f"store directory {root} is not writable")

    def url(self, name: str) -> str:
        return "file://" + quote(str(self.root / check_name(name)))

    def _file(self, name: str) -> Path:
        return self.root / check_name(name)

    def _stat(self, name: str, p: Path) -> os.stat_result:
        """The archive's stat; ArchiveNotFound when there is no regular file by that name."""
        try:
            st = p.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ArchiveNotFound(f"archive {name} not found in {self.describe()}") from None
        except OSError as exc:
            raise store_os_error(exc, f"cannot read archive {name} in {self.describe()}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ArchiveNotFound(f"archive {name} not found in {self.describe()} (not a regular file)")
        return st

    def _info(self, name: str, st: os.stat_result) -> ArchiveInfo:
        modified = datetime.fromtimestamp(st.st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return ArchiveInfo(name=name, size=st.st_size, modified=modified, url=self.url(name))

    def put(self, name: str, source: Path) -> ArchiveInfo:
        self.check(writable=True)

        def copy(dst: BinaryIO) -> None:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)

        return self._info(name, self._publish(self._file(name), f"archive {name}", copy))

    def _publish(self, final: Path, what: str, fill: Callable[[BinaryIO], None]) -> os.stat_result:
        """Write ``final`` atomically and never over an existing file: ``fill`` writes a hidden
        temporary file, which is fsynced, hard-linked into place (atomic, fails if the name
        exists) and its directory fsynced. Returns the new file's stat."""
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.partial"
        linked = False
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as dst:
                fill(dst)
                dst.flush()
                os.fsync(dst.fileno())
            try:
                os.link(tmp, final)  # atomic, and never replaces an existing file
            except FileExistsError:
                raise StoreError(f"{what} already exists in {self.describe()}") from None
            linked = True
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            return final.stat()
        except OSError as exc:
            if linked:
                # Not known to be durable: take it back, so a retry writes it again instead of
                # finding "already exists".
                final.unlink(missing_ok=True)
            raise store_os_error(exc, f"cannot write {what} to {self.describe()}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, name: str, dest: Path) -> Path:
        src = self._file(name)
        self._stat(name, src)
        try:
            shutil.copyfile(src, dest)
        except FileNotFoundError as exc:
            if exc.filename == str(src):
                raise ArchiveNotFound(f"archive {name} not found in {self.describe()}") from None
            raise store_os_error(exc, f"cannot read archive {name} from {self.describe()}") from None
        except OSError as exc:
            raise store_os_error(exc, f"cannot read archive {name} from {self.describe()}") from None
        return dest

    @contextmanager
    def open_read(self, name: str, size: int | None = None) -> Iterator[BinaryIO]:
        """The archive's file itself, opened in place (no copy)."""
        label = self.url(name)
        try:
            f = open(self.root / name, "rb")  # noqa: SIM115 - closed by the with below, around the yield
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ArchiveNotFound(f"archive {label} not found") from None
        except OSError as exc:
            raise store_os_error(exc, f"cannot read archive {label}") from None
        with f:
            yield f

    def list(self, prefix: str = "") -> builtins.list[ArchiveInfo]:
        self.check()
        out = []
        for name, path in self._files(ARCHIVE_SUFFIX, prefix):
            info = self._listed(name, path)
            if info is not None:
                out.append(info)
        out.sort(key=lambda a: (a.modified, a.name))
        return out

    def _files(self, suffix: str, prefix: str) -> Iterator[tuple[str, Path]]:
        """(name, path) of every file below the store whose name ends with ``suffix`` and
        starts with ``prefix``, skipping hidden files and directories (partials)."""
        root = self.root
        log = logger()

        def walk_error(exc: OSError) -> None:
            # The store itself, or any transient failure, fails the listing (the catalog task
            # retries StoreUnavailable); a subdirectory we may not read is skipped, as a stray.
            if exc.filename in (str(root), None) or os_error_is_transient(exc):
                raise store_os_error(exc, f"cannot list {exc.filename or root}") from None
            log.warning("store %s: skipping directory %s: %s", self.describe(), exc.filename, exc.strerror)

        for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith(".") or not fn.endswith(suffix):
                    continue
                name = os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/")
                if name.startswith(prefix):
                    yield name, Path(dirpath) / fn

    def _listed(self, name: str, p: Path) -> ArchiveInfo | None:
        """The listing entry of one file, or None (with a warning) for a stray that is not an
        addressable archive: a name Burrow never writes, a dangling link, a non-regular file."""
        why = None
        try:
            check_name(name)
            st = p.stat()
        except UsageError:
            why = "not an archive name Burrow writes (letters, digits, '.', '_', '-' and '/' only)"
        except FileNotFoundError:
            why = "it vanished while listing, or is a dangling link"
        except OSError as exc:
            if os_error_is_transient(exc):
                raise store_os_error(exc, f"cannot read {name} in {self.describe()}") from None
            why = exc.strerror or type(exc).__name__
        else:
            if not stat.S_ISREG(st.st_mode):
                why = "not a regular file"
        if why is not None:
            logger().warning("store %s: skipping %r: %s", self.describe(), name, why)
            return None
        return self._info(name, st)

    def head(self, name: str) -> ArchiveInfo:
        return self._info(name, self._stat(name, self._file(name)))

    def delete(self, name: str) -> None:
        p = self._file(name)
        try:
            os.unlink(p)
        except FileNotFoundError:
            raise ArchiveNotFound(f"archive {name} not found in {self.describe()}") from None
        except OSError as exc:
            raise store_os_error(exc, f"cannot delete archive {name} from {self.describe()}") from None

    # ------------------------------------------------------------------ sidecars

    def put_sidecar(self, name: str, data: bytes) -> None:
        if len(data) > MAX_SIDECAR_BYTES:
            raise StoreError(f"sidecar {name} is larger than {MAX_SIDECAR_BYTES} bytes")
        self.check(writable=True)
        self._publish(self.root / check_sidecar_name(name), name, lambda dst: dst.write(data))

    def get_sidecar(self, name: str) -> bytes:
        p = self.root / check_sidecar_name(name)
        try:
            with open(p, "rb") as f:
                data = f.read(MAX_SIDECAR_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ArchiveNotFound(f"{name} not found in {self.describe()}") from None
        except OSError as exc:
            raise store_os_error(exc, f"cannot read {name} in {self.describe()}") from None
        if len(data) > MAX_SIDECAR_BYTES:
            raise StoreError(f"{name} in {self.describe()} is larger than {MAX_SIDECAR_BYTES} bytes")
        return data

    def list_sidecars(self, prefix: str = "") -> builtins.list[str]:
        self.check()
        out = []
        for name, _ in self._files(SIDECAR_SUFFIX, prefix):
            try:
                out.append(check_sidecar_name(name))
            except UsageError:
                continue
        return sorted(out)

    def delete_sidecar(self, name: str) -> None:
        p = self.root / check_sidecar_name(name)
        try:
            os.unlink(p)
        except FileNotFoundError:
            raise ArchiveNotFound(f"{name} not found in {self.describe()}") from None
        except OSError as exc:
            raise store_os_error(exc, f"cannot delete {name} from {self.describe()}") from None
