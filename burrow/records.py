"""The record layer: one key of a tree store, and its line in the record stream.

A record stream is JSON Lines. Each line is one object:

``{"k": "/a/b", "v": "<base64 value>", "m": {...service metadata...}}``

``k`` holds the key when it is valid UTF-8; otherwise the key is in ``k64`` as base64.
Values are always base64, so any byte string (binary, empty, huge) round-trips exactly.
This layer knows nothing of compression, encryption or storage.

Lines are bounded (see docs/FORMAT.md, "Bounds"): a writer refuses a record whose key and
value add up to more than :data:`MAX_RECORD_BYTES` or whose line is longer than
:data:`MAX_LINE_BYTES`, and a reader refuses a longer line before it has buffered more.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson

from burrow.errors import ArchiveError

#: The largest key plus value one record may hold: above every service's own default value
#: limit (ZooKeeper's jute.maxbuffer, 1 MiB; etcd's --max-request-bytes, 1.5 MiB, which etcd
#: warns against raising above 10 MiB; Consul's kv_max_value_size, 512 KiB).
MAX_RECORD_BYTES = 16 * 1024 * 1024
#: The longest record line, its newline included, that a writer emits and a reader accepts: a
#: 16 MiB value in base64 is 21.3 MiB, which leaves 2.7 MiB for the key and the metadata.
MAX_LINE_BYTES = 24 * 1024 * 1024


class RecordTooLarge(ArchiveError):
    """A record (or a line of a record stream) is beyond the format's bounds."""


@dataclass(slots=True)
class Record:
    """One node or key: its native key, its value, and JSON-able service metadata."""

    key: bytes
    value: bytes
    meta: dict[str, Any] = field(default_factory=dict)

    def display_key(self) -> str:
        """The key for logs and reports: UTF-8 where possible, escaped otherwise."""
        return display_key(self.key)


def display_key(key: bytes) -> str:
    """Render a key for humans without ever failing on odd bytes."""
    return key.decode("utf-8", errors="backslashreplace")


def _too_large(record: Record, size: int, what: str, limit: int) -> RecordTooLarge:
    return RecordTooLarge(
        f"key {display_key(record.key)[:200]!r} cannot be archived: its {what} is {size} bytes, above the "
        f"archive format's limit of {limit} bytes (see docs/FORMAT.md, Bounds)"
    )


def encode_record(record: Record) -> bytes:
    """Serialize one record as a JSON line (with trailing newline); raise RecordTooLarge when
    it is beyond the format's bounds."""
    size = len(record.key) + len(record.value)
    if size > MAX_RECORD_BYTES:
        raise _too_large(record, size, "key plus value", MAX_RECORD_BYTES)
    obj: dict[str, Any] = {}
    try:
        obj["k"] = record.key.decode("utf-8")
    except UnicodeDecodeError:
        obj["k64"] = binascii.b2a_base64(record.key, newline=False).decode("ascii")
    obj["v"] = binascii.b2a_base64(record.value, newline=False).decode("ascii")
    if record.meta:
        obj["m"] = record.meta
    line = orjson.dumps(obj) + b"\n"
    if len(line) > MAX_LINE_BYTES:
        raise _too_large(record, len(line), "record line", MAX_LINE_BYTES)
    return line


def decode_record(line: bytes) -> Record:
    """Parse one JSON line back into a record; raise ArchiveError on anything malformed."""
    try:
        obj = orjson.loads(line)
        if "k" in obj:
            key = obj["k"].encode("utf-8")
        else:
            key = binascii.a2b_base64(obj["k64"], strict_mode=True)
        value = binascii.a2b_base64(obj["v"], strict_mode=True)
        meta = obj.get("m") or {}
        if not isinstance(meta, dict):
            raise TypeError("metadata is not an object")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, binascii.Error, ValueError) as exc:
        raise ArchiveError(f"malformed record in archive: {type(exc).__name__}") from None
    return Record(key, value, meta)


def write_records(records: Iterable[Record], out: BinaryIO) -> int:
    """Write records to a binary stream; return how many were written."""
    n = 0
    for record in records:
        out.write(encode_record(record))
        n += 1
    return n


def read_records(stream: BinaryIO) -> Iterator[Record]:
    """Read records from a binary stream of JSON lines, one at a time (lines are bounded)."""
    while line := stream.readline(MAX_LINE_BYTES + 1):
        if len(line) > MAX_LINE_BYTES:
            raise RecordTooLarge(f"record stream holds a line longer than {MAX_LINE_BYTES} bytes (corrupt)")
        if not line.endswith(b"\n"):
            raise ArchiveError("record stream ends in the middle of a record (truncated archive)")
        yield decode_record(line)
