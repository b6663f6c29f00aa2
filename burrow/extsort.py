"""A bounded external sort of byte lines, and the sort key of a tree's depth-first order.

``burrow dump`` prints a live tree in sorted, depth-first order (every node right before its
subtree, siblings by name) so two dumps can be diffed, whatever order the walk delivered the
nodes in. A tree of millions of keys does not fit in memory: lines are sorted in runs of at
most ``run_bytes``, spilled to sealed spool files (burrow/staging.py: nothing readable reaches
the disk) and merged.
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from burrow.staging import discard_spool, open_spool_reader, open_spool_writer, scratch_writes

#: Bytes that would break a line or the key's framing, and how they are escaped in a sort key.
_ESCAPES = {0x00: b"\x02\x03", 0x01: b"\x02\x04", 0x02: b"\x02\x05", 0x0A: b"\x02\x06"}
_TABLE = {bytes([b]): e for b, e in _ESCAPES.items()}


def _escape(component: bytes) -> bytes:
    if not any(b in component for b in (b"\x00", b"\x01", b"\x02", b"\n")):
        return component
    return b"".join(_TABLE.get(component[i:i + 1], component[i:i + 1]) for i in range(len(component)))


def tree_sort_key(key: bytes) -> bytes:
    """A byte string whose plain byte order is the depth-first order of ``key`` in its tree.

    Components (split on ``/``, leading and trailing slashes ignored) are joined with
    ``\\x01`` and the key ends with ``\\x00``: a node sorts before its children (``\\x00`` <
    ``\\x01``) and a node's whole subtree before a sibling whose name its name prefixes
    (``a``, ``a/x`` before ``ab``). The result holds no newline and no ``\\x00`` but the last."""
    parts = [p for p in key.split(b"/") if p]
    return b"\x01".join(_escape(p) for p in parts) + b"\x00"


class ExternalSorter:
    """Sort byte lines (each ending with a newline) in bounded memory.

    ``add`` lines, iterate once to get them in byte order, then ``close`` (also after an
    error) to remove the spilled runs."""

    def __init__(self, workdir: Path, run_bytes: int = 32 << 20, what: str = "sort run") -> None:
        self.workdir = workdir
        self.run_bytes = run_bytes
        self.what = what
        self.lines: list[bytes] = []
        self.size = 0
        self.runs: list[Path] = []
        self.readers: list[BinaryIO] = []
        self.token = uuid.uuid4().hex[:8]  # several sorters may share a scratch directory

    def add(self, line: bytes) -> None:
        self.lines.append(line)
        self.size += len(line) + 48  # a bytes object and its list slot cost about 48 bytes more
        if self.size >= self.run_bytes:
            self._spill()

    def _spill(self) -> None:
        self.lines.sort()
        path = self.workdir / f"sort-run-{self.token}-{len(self.runs):05d}.sealed"
        self.runs.append(path)
        with scratch_writes(self.what, self.workdir), open_spool_writer(path) as out:
            out.writelines(self.lines)
        self.lines, self.size = [], 0

    def __iter__(self) -> Iterator[bytes]:
        if not self.runs:
            self.lines.sort()
            lines, self.lines = self.lines, []
            return iter(lines)
        if self.lines:
            self._spill()
        self.readers = [open_spool_reader(p) for p in self.runs]
        return heapq.merge(*self.readers)

    def close(self) -> None:
        self.lines = []
        for r in self.readers:
            r.close()
        for p in self.runs:
            discard_spool(p)
