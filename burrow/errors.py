"""The exception hierarchy.

Two families matter to the orchestrator: :class:`TransientError` (a retry may help: a
connection dropped, a server is electing a leader) and :class:`PermanentError` (a retry
cannot help: bad credentials, a corrupt archive, a usage mistake). ``should_retry`` feeds
this split to Prefect's ``retry_condition_fn``.

Messages never carry secrets or stored values: they name paths, hosts and fingerprints only.
"""

from __future__ import annotations

import errno
from typing import Any

#: Exit codes of the ``burrow`` command, as documented in the README.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFLICTS = 3
EXIT_DRIFT = 4  # burrow verify --against: the live cluster differs from the archive
EXIT_STALE = 5  # burrow status --max-age: a source's newest archive is too old
EXIT_EVIDENCE = 6  # burrow evidence verify: the evidence chain is broken (a report removed, edited or foreign)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM (a failover prints its archive line first)


class BurrowError(Exception):
    """Base class of every error Burrow raises on purpose."""

    exit_code: int = EXIT_FAILURE


class TransientError(BurrowError):
    """A failure that may go away on retry (network, leader election, throttling)."""


class PermanentError(BurrowError):
    """A failure that a retry cannot fix."""


class UsageError(PermanentError):
    """The command line or a flow parameter is wrong."""

    exit_code = EXIT_USAGE


class SourceUnavailable(TransientError):
    """A cluster could not be reached or dropped the connection."""


class AuthError(PermanentError):
    """Credentials were refused or lack a permission."""


class SourceError(PermanentError):
    """The cluster answered, but not in a way we can work with (or its host name does not exist)."""


class StoreError(PermanentError):
    """The archive store is missing, unwritable or refused an operation."""


class StoreUnavailable(TransientError):
    """The archive store failed an operation in a way a retry may fix (I/O error, busy, timed out)."""


class ArchiveNotFound(StoreError):
    """No archive by that name exists in the store."""


class ArchiveError(PermanentError):
    """An archive is corrupt, truncated, tampered with, or of an unknown version."""


class KeyMismatch(ArchiveError):
    """The archive was encrypted for a key we do not hold."""


class DriftFound(PermanentError):
    """``burrow verify ARCHIVE --against SOURCE``: the live cluster differs from the archive
    (keys added, removed or changed). Its message gives counts only, never a value."""

    exit_code = EXIT_DRIFT


class EvidenceChainBroken(PermanentError):
    """``burrow evidence verify STORE``: a report of the store's evidence chain was removed,
    edited or is foreign (docs/EVIDENCE.md)."""

    exit_code = EXIT_EVIDENCE


#: errno values of a store operation that a retry may fix: interrupted or busy calls, a
#: network share that timed out or lost its server (ESTALE, EHOSTDOWN, ...), and EIO, which
#: is how network and FUSE mounts report a failed round trip (on a local disk it means a
#: failing device, which a few retries do not make worse). Everything else (ENOENT, EACCES,
#: EROFS, ENOSPC, EDQUOT, ENAMETOOLONG, ...) is permanent.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN", "EWOULDBLOCK", "EINTR", "EBUSY", "ETIMEDOUT", "EIO", "ESTALE", "ENOLCK", "EREMOTEIO",
        "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "ENETDOWN", "ENETUNREACH", "ENETRESET",
        "EHOSTDOWN", "EHOSTUNREACH", "ENOBUFS", "ENOMEM", "EMFILE", "ENFILE",
    )
    if hasattr(errno, name)
)


def os_error_is_transient(exc: OSError) -> bool:
    """True when a retry of the failed file operation may succeed (see TRANSIENT_ERRNOS)."""
    return exc.errno in TRANSIENT_ERRNOS or isinstance(exc, (TimeoutError, InterruptedError, BlockingIOError))


def store_os_error(exc: OSError, what: str) -> StoreError | StoreUnavailable:
    """The Burrow error for an ``OSError`` of a store operation, classified by errno.

    ``what`` says what failed ("cannot write archive x to file:///s"); the message adds the
    system's reason (``strerror``), never file contents.
    """
    reason = exc.strerror or type(exc).__name__
    if os_error_is_transient(exc):
        return StoreUnavailable(f"{what}: {reason} (a retry may help)")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"{what}: {reason} (the store is full)")
    return StoreError(f"{what}: {reason}")


def exception_from_state(state: Any) -> BaseException | None:
    """Return the exception a failed Prefect state carries, if any."""
    try:
        result = state.result(raise_on_failure=False)
    except BaseException as exc:  # noqa: BLE001 - any failure to unwrap is itself the answer
        return exc
    return result if isinstance(result, BaseException) else None


def is_transient(exc: BaseException | None) -> bool:
    """True when ``exc`` is worth retrying."""
    if exc is None:
        return False
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, PermanentError):
        return False
    # Unknown exceptions from client libraries: retry only plain connection trouble.
    return isinstance(exc, (ConnectionError, TimeoutError))


def should_retry(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry transient errors only."""
    return is_transient(exception_from_state(state))
