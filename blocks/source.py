"""The interface every source cluster implements (ZooKeeper, etcd, Consul).

A source block is configuration (hosts, credentials as SecretStr, timeouts). ``connect()``
opens a :class:`SourceSession` that knows how to walk the tree and how to create missing
keys atomically. Flows and tasks only ever talk to this interface.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from blocks.base import BurrowBlock
from burrow.records import Record


@dataclass
class WalkStats:
    """What a walk saw besides the records it yielded."""

    skipped_ephemeral: int = 0
    skipped_excluded: int = 0
    vanished: int = 0
    redacted_acls: int = 0
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def warn(self, message: str) -> None:
        if message not in self.warnings and len(self.warnings) < 100:
            self.warnings.append(message)


class SourceSession(Protocol):
    """An open connection to a cluster.

    A session may also have ``plan_warnings() -> list[str]`` (called once planning ends: what
    would make the restore fail although nothing is written yet) and ``finish() -> dict`` (called
    once every planned create succeeded; returns what it adds to the restore report). ZooKeeper
    has both (ACLs); planning and replay look them up with ``getattr``.
    """

    service: str

    def walk(self, root: bytes, stats: WalkStats) -> Iterator[Record]:
        """Yield every record under ``root``, parents before children."""
        ...

    def lookup(self, keys: list[bytes]) -> list[bytes | None]:
        """Return each key's current value, or None where the key does not exist."""
        ...

    def create(self, records: list[Record]) -> list[bool]:
        """Create each record only if absent (atomically). True = created, False = existed.

        Records come parents first. Any error other than "already exists" raises.
        """
        ...

    def created_versions(self, keys: list[bytes]) -> list[int | None]:
        """The version each key was created at, read back right after :meth:`create` made it
        (ZooKeeper: the node's czxid; etcd: its create_revision; Consul: its CreateIndex), or
        None where the key is gone. A restore records these (tasks/undo.py) so that ``burrow
        undo`` can delete exactly what it created. A key changed before this read shows a newer
        modification version than the creation version recorded, so undo keeps it."""
        ...

    def delete_if_version(self, items: list[tuple[bytes, int]], *, dry_run: bool = False) -> list[bool]:
        """Delete each ``(key, version)`` only if the key's modification version (ZooKeeper
        mzxid, etcd mod_revision, Consul ModifyIndex) still equals ``version``: unchanged since
        it was created with that version. Items come children first. True = the key is gone
        (deleted now or already absent); False = kept (changed since, it gained children, or
        deleting it was refused). ``dry_run`` deletes nothing and answers as a real run would.

        The one deletion Burrow makes in a cluster: ``burrow undo`` and the rehearsal cleanup
        use it, never a restore."""
        ...

    def prepare(self, record: Record, source_service: str) -> tuple[Record, list[str]]:
        """Adapt an archived record to this target: returns the record to create and the
        names of metadata that cannot be carried over (reported, never silently dropped)."""
        ...

    def parent_key(self, key: bytes) -> bytes | None:
        """The key that must exist before ``key`` can be created, or None (flat stores)."""
        ...

    def ensure_root(self) -> None:
        """Make sure the configured root/chroot exists before a restore writes into it."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


@dataclass
class ChangeBatch:
    """What a change feed delivered at once: the changes (``op`` ``put`` or ``del``, the key
    relative to the source's root, the value after a put, the position, the metadata a backup
    records) and ``position``: every change up to it has now been delivered (a progress
    notification when ``changes`` is empty)."""

    changes: list[tuple[str, bytes, bytes, int, dict[str, Any]]]
    position: int
    progress: bool = False
    #: The whole state at ``position`` (every key a ``put``), not changes: a feed that cannot
    #: resume exactly (Consul, ZooKeeper) starts and restarts with one; keys it leaves out are gone.
    resync: bool = False
    #: A resync comes in pieces (bounded memory): ``more`` says another piece of it follows,
    #: ``continued`` that this piece continues the previous batch's resync (else it starts one).
    more: bool = False
    continued: bool = False


class HistoryCompacted(Exception):
    """The service no longer holds the history a change feed was asked to start from (etcd
    ErrCompacted): the changes before ``available`` are lost to the capture, a gap."""

    def __init__(self, available: int) -> None:
        super().__init__(f"history compacted up to position {available}")
        self.available = available


class ChangeFeed(Protocol):
    """A narrow, optional capability of a session (``session.watch(after)``, where the service
    has one): the changes after a position, in position order, as :class:`ChangeBatch` items.
    Raises HistoryCompacted when that history is gone. ``request_progress`` asks for a batch
    that says how far the feed has delivered; ``close`` ends it (also from another thread).
    A feed whose class sets ``RESUMES_EXACTLY = True`` delivers every change after ``after``
    without a resync (etcd); the others begin with one (tasks/capture.py ``_adjust``)."""

    def __iter__(self) -> Iterator[ChangeBatch]: ...

    def request_progress(self) -> None: ...

    def close(self) -> None: ...


class SourceBlock(BurrowBlock):
    """Base of every source cluster block."""

    _block_type_slug: ClassVar[str] = "burrow-source"
    service: ClassVar[str] = "unknown"
    scheme: ClassVar[str] = ""

    def describe(self) -> str:
        """A URL identifying the cluster, without any credentials."""
        raise NotImplementedError

    def connect(self) -> SourceSession:
        """Open a session; raises SourceUnavailable or AuthError with a one-line message."""
        raise NotImplementedError
