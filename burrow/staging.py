"""Private scratch space for one run, and spool files that never hold plaintext.

A run's staging directory is mode 0700 (under $BURROW_STAGING_DIR, else the temp dir),
holds a lock file while the run lives, and is removed when the run ends, however it ends
(and at interpreter exit, should a run be abandoned). A run killed outright (SIGKILL, power
loss) cannot clean up after itself: the next run sweeps staging directories left more than a
day ago by runs that are gone (their lock is free).

Spools (the backup's extracted records, the restore plan) are written sealed: AES-256-GCM
STREAM chunks (burrow/crypto.py) under a fresh key that lives only in this process's memory
(:func:`open_spool_writer`, :func:`open_spool_reader`). What a killed run leaves on disk is
ciphertext whose key died with it. A full disk or a file-size limit while writing staging is
a :class:`ScratchFull` error that names the cause.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import io
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from burrow.crypto import PREFIX_LEN, stream_reader, stream_writer
from burrow.errors import PermanentError

PREFIX = "burrow-staging-"
LOCK_NAME = ".burrow-staging.lock"
#: Leftover staging directories older than this (and whose run is gone) are swept at start.
SWEEP_AGE_SECONDS = 24 * 3600
SPOOL_CHUNK = 256 * 1024
SPOOL_BUFFER = 1 << 20
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})

_lock = threading.Lock()
_live: dict[Path, int] = {}  # staging directories of this process -> their lock file descriptor
_spool_keys: dict[str, tuple[bytes, bytes]] = {}  # spool path -> (key, nonce prefix): memory only


class ScratchFull(PermanentError):
    """Staging ran out of disk space, or a write hit the process's file-size limit."""


def staging_base(parent: str | None = None) -> Path:
    """Where staging directories go: ``parent``, $BURROW_STAGING_DIR, or the temp dir."""
    base = parent or os.environ.get("BURROW_STAGING_DIR") or None
    if base:
        Path(base).mkdir(mode=0o700, parents=True, exist_ok=True)
        return Path(base)
    return Path(tempfile.gettempdir())


def sweep(base: Path, *, max_age: float = SWEEP_AGE_SECONDS, prefix: str = PREFIX) -> list[Path]:
    """Remove staging directories below ``base`` that runs now gone left more than ``max_age``
    seconds ago: only this user's, only Burrow's (named ``prefix...`` and holding the lock
    file), and only when no live process holds their lock. Returns what was removed."""
    removed: list[Path] = []
    cutoff = time.time() - max_age
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            if st.st_uid != os.getuid() or st.st_mtime > cutoff:
                continue
            lock = Path(entry.path) / LOCK_NAME
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # not ours, not a staging directory, or gone meanwhile
        try:
            if os.fstat(fd).st_mtime > cutoff:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live run holds it
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


def _release(path: Path) -> None:
    with _lock:
        fd = _live.pop(path, None)
        for p in [p for p in _spool_keys if Path(p).is_relative_to(path)]:
            del _spool_keys[p]
    shutil.rmtree(path, ignore_errors=True)
    if fd is not None:
        os.close(fd)


@atexit.register
def _remove_all() -> None:
    for path in list(_live):
        _release(path)


@contextmanager
def staging_dir(parent: str | None = None, prefix: str = PREFIX) -> Iterator[Path]:
    """A fresh private (0700) directory for one run, removed when the block ends; leftovers
    of runs killed more than a day ago are swept first."""
    base = staging_base(parent)
    sweep(base, prefix=prefix)
    path = Path(os.path.abspath(tempfile.mkdtemp(prefix=prefix, dir=base)))
    try:
        os.chmod(path, 0o700)
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with _lock:
            _live[path] = fd
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        _release(path)
        raise
    try:
        yield path
    finally:
        _release(path)


@contextmanager
def scratch_writes(what: str, where: Path | str) -> Iterator[None]:
    """Turn a full disk or a file-size limit while writing ``what`` into a one-line ScratchFull."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FULL_ERRNOS:
            raise
        cause = "the file-size limit was hit" if exc.errno == errno.EFBIG else "the disk is full"
        raise ScratchFull(
            f"cannot write the {what} to staging ({where}): {cause} ({exc.strerror}); free space under "
            "$BURROW_STAGING_DIR, point it at a larger disk, or raise the limit"
        ) from None


# ---------------------------------------------------------------------------- sealed spools


class _SealedWriter(io.RawIOBase):
    def __init__(self, f: BinaryIO, key: bytes, prefix: bytes) -> None:
        self._f = f
        self._enc = stream_writer(f, key, prefix, SPOOL_CHUNK)

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self._enc.write(b)

    def close(self) -> None:
        if not self.closed:
            try:
                self._enc.close()
            finally:
                self._f.close()
        super().close()


class _SealedReader(io.RawIOBase):
    def __init__(self, f: BinaryIO, key: bytes, prefix: bytes, label: str) -> None:
        self._f = f
        self._dec = stream_reader(f, key, prefix, SPOOL_CHUNK, label)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._dec.readinto(b)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_spool_writer(path: Path | str) -> BinaryIO:
    """Create the spool file ``path`` (0600, replacing an earlier one) and return a buffered
    writer that seals what is written under a fresh key held only in this process's memory.
    close() seals the last chunk. Read it back with :func:`open_spool_reader`."""
    path = os.path.abspath(path)
    key, prefix = AESGCM.generate_key(bit_length=256), os.urandom(PREFIX_LEN)
    with _lock:
        _spool_keys[path] = (key, prefix)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    raw = _SealedWriter(os.fdopen(fd, "wb", buffering=0), key, prefix)
    return io.BufferedWriter(raw, buffer_size=SPOOL_BUFFER)  # type: ignore[return-value]


def open_spool_reader(path: Path | str) -> BinaryIO:
    """A buffered reader of the plaintext of a spool this process wrote with
    :func:`open_spool_writer`; every chunk is authenticated before a byte of it is returned."""
    path = os.path.abspath(path)
    with _lock:
        sealed = _spool_keys.get(path)
    if sealed is None:
        raise PermanentError(f"the staging spool {path} was not written by this process (its key is gone)")
    f = open(path, "rb", buffering=0)  # noqa: SIM115 - owned by the returned reader
    raw = _SealedReader(f, *sealed, label=f"staging spool {path}")
    return io.BufferedReader(raw, buffer_size=SPOOL_BUFFER)  # type: ignore[return-value]


def discard_spool(path: Path | str) -> None:
    """Delete a spool and forget its key."""
    path = os.path.abspath(path)
    with _lock:
        _spool_keys.pop(path, None)
    Path(path).unlink(missing_ok=True)
