"""The one narrow interface every archive store implements (local directory, S3, ...).

An archive appears in ``list`` only once it is complete: ``put`` is atomic. Anything else in
the store (``notes.txt``, ``copy of x.burrow``, a dangling link) is skipped by ``list`` with a
warning, never an error.

Errors: StoreUnavailable (transient: the tasks retry it) when a retry may help, StoreError
(permanent) otherwise, ArchiveNotFound when the name is not there.
"""

from __future__ import annotations

import builtins
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from blocks.base import BurrowBlock
from burrow.archive import ArchiveReader
from burrow.errors import store_os_error

ARCHIVE_SUFFIX = ".burrow"
#: Small objects Burrow keeps beside the archives (catalog index, rehearsal markers): never
#: listed as archives, and written create-only like them.
SIDECAR_SUFFIX = ".burrow-meta"
#: The largest sidecar a store accepts or returns (an index of many manifests, compressed).
MAX_SIDECAR_BYTES = 64 * 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


@dataclass
class ArchiveInfo:
    """A stored archive as the store sees it."""

    name: str
    size: int
    modified: str
    url: str
    #: The object store's entity tag, where it has one: it changes when the object is replaced.
    etag: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_name(name: str) -> str:
    """Reject archive names that could escape the store or look incomplete."""
    if (
        not _NAME_RE.match(name)
        or not name.endswith(ARCHIVE_SUFFIX)
        or any(part in ("", ".", "..") or part.startswith(".") for part in name.split("/"))
    ):
        from burrow.errors import UsageError

        raise UsageError(f"invalid archive name {name!r}")
    return name


def check_sidecar_name(name: str) -> str:
    """Reject sidecar names that could escape the store or be taken for an archive."""
    if (
        not _NAME_RE.match(name)
        or not name.endswith(SIDECAR_SUFFIX)
        or any(part in ("", ".", "..") or part.startswith(".") for part in name.split("/"))
    ):
        from burrow.errors import UsageError

        raise UsageError(f"invalid sidecar name {name!r}")
    return name


class ArchiveStore(BurrowBlock):
    """Base of every store block: put, get, list, head and delete archives."""

    _block_type_slug: ClassVar[str] = "burrow-store"

    def describe(self) -> str:
        """A URL of the store without credentials."""
        raise NotImplementedError

    def check(self, *, writable: bool = False) -> None:
        """Raise StoreError unless the store exists (and is writable when asked)."""
        raise NotImplementedError

    def url(self, name: str) -> str:
        """The URL of an archive in this store."""
        raise NotImplementedError

    def put(self, name: str, source: Path) -> ArchiveInfo:
        """Store a finished local archive file under ``name`` atomically."""
        raise NotImplementedError

    def get(self, name: str, dest: Path) -> Path:
        """Download an archive into the local file ``dest``."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> builtins.list[ArchiveInfo]:
        """Complete archives whose name starts with ``prefix``, oldest first; entries that are
        not addressable archives are skipped with a warning."""
        raise NotImplementedError

    def head(self, name: str) -> ArchiveInfo:
        """Size and time of one archive; raises ArchiveNotFound."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove an archive; raises ArchiveNotFound."""
        raise NotImplementedError

    @contextmanager
    def open_read(self, name: str, size: int | None = None) -> Iterator[BinaryIO]:
        """A seekable file of the archive ``name``, to read its header, footer and manifest
        (:func:`open_stored`). Here: a private download. A local store opens the file in place;
        S3 reads by ranges. ``size`` (from a listing) saves a HEAD request where one is needed."""
        with tempfile.TemporaryDirectory(prefix="burrow-read-") as tmp:
            local = self.get(name, Path(tmp) / "archive.burrow")
            with open(local, "rb") as f:
                yield f

    # Sidecars: small objects beside the archives (names end with SIDECAR_SUFFIX). They are
    # untrusted caches or authenticated records: whoever reads one checks it.

    def put_sidecar(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` atomically; raises StoreError if ``name`` exists."""
        raise NotImplementedError

    def get_sidecar(self, name: str) -> bytes:
        """The bytes of a sidecar; raises ArchiveNotFound."""
        raise NotImplementedError

    def list_sidecars(self, prefix: str = "") -> builtins.list[str]:
        """Names of the sidecars whose name starts with ``prefix``, sorted."""
        raise NotImplementedError

    def delete_sidecar(self, name: str) -> None:
        """Remove a sidecar; raises ArchiveNotFound."""
        raise NotImplementedError


@contextmanager
def open_stored(store: ArchiveStore, name: str, size: int | None = None) -> Iterator[ArchiveReader]:
    """An :class:`ArchiveReader` over the archive ``name`` of ``store`` (:meth:`ArchiveStore.open_read`):
    the catalog, ``inspect`` and the rehearsal markers read header, footer and manifest through it,
    never downloading a whole archive from object storage."""
    label = store.url(name)
    with store.open_read(name, size) as f:
        try:
            reader = ArchiveReader(f, label=label)
        except OSError as exc:
            raise store_os_error(exc, f"cannot read archive {label}") from None
        yield reader
