"""Archive format v1: a self-describing, streamable container for a record stream.

Layout (see docs/FORMAT.md)::

    [zstd skippable frame 0x184D2A5B]  header:   b"BURROW\\n" + JSON + b"\\n"
    [body]                              zstd frame(s) of the record stream (JSON Lines),
                                        optionally passed through an encryption stage
    [zstd skippable frame 0x184D2A5C]  manifest: b"\\n" + JSON + b"\\n"
    [zstd skippable frame 0x184D2A5D]  footer:   b"BURROW-END <16 hex offset> <16 hex length>\\n"

Skippable frames are ignored by every zstd decoder, so an unencrypted archive reads with
``zstd -dc archive.burrow``. The footer has a fixed size, so a reader finds the manifest
from the end without scanning. The manifest is written last: a file without a valid footer
is truncated, never mistaken for a complete archive.

A reader is bounded whatever the bytes it is given (docs/FORMAT.md, "Bounds"): the header,
the manifest, every record line, the zstd window, and the ratio of the record stream to the
stored body all have hard limits, checked before the bytes they cover are buffered, so a
crafted archive is refused in constant memory and in time proportional to its size.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, Protocol

import orjson
import zstandard

from burrow.errors import ArchiveError
from burrow.records import MAX_LINE_BYTES, Record, RecordTooLarge, decode_record, encode_record
from burrow.version import __version__

FORMAT_NAME = "burrow-archive"
FORMAT_VERSION = 1
HEADER_MAGIC = 0x184D2A5B
MANIFEST_MAGIC = 0x184D2A5C
FOOTER_MAGIC = 0x184D2A5D
HEADER_PREFIX = b"BURROW\n"
FOOTER_PREFIX = b"BURROW-END "
FOOTER_DATA_LEN = len(FOOTER_PREFIX) + 16 + 1 + 16 + 1
FOOTER_LEN = 8 + FOOTER_DATA_LEN
PADDING_MAGIC = 0x184D2A5E
FRAME_HEADER = struct.Struct("<II")
#: The largest header frame payload (64 stanzas take about 16 KiB).
MAX_HEADER_BYTES = 64 * 1024
#: The largest manifest frame payload (a manifest is usually under 2 KiB; warnings are capped).
MAX_MANIFEST_BYTES = 1024 * 1024
#: The record stream may be at most CONTENT_ALLOWANCE + MAX_RATIO x the stored body: a writer
#: pads the body (a skippable frame) when its stream compresses better than that, and a reader
#: refuses an archive whose manifest claims more, and stops as soon as the stream holds more
#: than the manifest says. Rejecting a crafted archive costs time in proportion to its size.
MAX_RATIO = 1024
CONTENT_ALLOWANCE = 4 * 1024 * 1024
#: The largest zstd window a reader accepts (what level 22 uses); the writer's levels 1-22 fit.
MAX_WINDOW = 1 << 27
READ_CHUNK = 1 << 20
DEFAULT_LEVEL = 3
MANIFEST_DIGEST_PREFIX = b"burrow/v1/manifest-sha256\x00"
#: The name Burrow gives an archive (burrow/naming.py ``archive_name``): its last component.
LEGACY_NAME_RE = re.compile(r"^(?P<slug>.+)-(?P<stamp>\d{8}T\d{6}Z)-(?P<rand>[0-9a-f]{6})\.burrow$")
#: A pre-binding archive's ``created`` may trail the time in its name by at most this (the name is
#: chosen before the extraction, ``created`` set when the archive is finished).
LEGACY_WINDOW = timedelta(days=7)
#: Why a catalog row of a copied (or moved) archive is distrusted.
BOUND_ELSEWHERE = "bound to another object name (copied or moved)"


def _frame(magic: int, data: bytes) -> bytes:
    return FRAME_HEADER.pack(magic, len(data)) + data


def min_body_bytes(content_bytes: int) -> int:
    """The smallest stored body the format allows for a record stream of ``content_bytes``."""
    return max(0, -(-(content_bytes - CONTENT_ALLOWANCE) // MAX_RATIO))


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON (sorted keys) used for everything that is hashed or MACed."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The manifest's own checksum (``manifest_sha256``): SHA-256 over its canonical form
    without ``manifest_sha256`` and ``manifest_mac``. It catches accidents (a flipped bit in an
    unencrypted archive's manifest), not forgery: the manifest MAC does that."""
    rest = {k: v for k, v in manifest.items() if k not in ("manifest_sha256", "manifest_mac")}
    return hashlib.sha256(MANIFEST_DIGEST_PREFIX + canonical_json(rest)).hexdigest()


class BodyEncryptor(Protocol):
    """An encryption stage between compression and storage (see burrow/crypto.py)."""

    def header_params(self) -> dict[str, Any]:
        """Public parameters recorded in the header (recipients, salts, fingerprints)."""
        ...

    def wrap_writer(self, sink: BinaryIO) -> BinaryIO:
        """Return a writer that encrypts into ``sink``; its close() finalizes the stream."""
        ...

    def seal_manifest(self, manifest_bytes: bytes) -> str:
        """Return an authentication tag over the canonical manifest bytes."""
        ...


class BodyDecryptor(Protocol):
    """Opens what a BodyEncryptor wrote; built from the header's parameters."""

    def wrap_reader(self, source: BinaryIO) -> BinaryIO:
        """Return a reader of plaintext; raise ArchiveError on any tampering."""
        ...

    def check_manifest(self, manifest_bytes: bytes, tag: str) -> None:
        """Raise ArchiveError unless ``tag`` authenticates the manifest bytes."""
        ...


class DecryptorFactory(Protocol):
    """A keyring: builds the BodyDecryptor of one archive from its header (see burrow/crypto.py)."""

    def bind_header(self, params: Any, label: str) -> BodyDecryptor:
        """Return the archive's decryptor; raise KeyMismatch when no held key opens it."""
        ...


class _HashingWriter(io.RawIOBase):
    """Counts and hashes bytes on their way to ``sink`` (never closes it)."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.sink.write(data)
        self.sha.update(data)
        self.count += len(data)
        return len(data)


class _CountingWriter(io.RawIOBase):
    """Counts the bytes on their way to ``sink`` (never closes it)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = self.sink.write(b)
        n = len(b) if n is None else n
        self.count += n
        return n


class _BoundedHashingReader(io.RawIOBase):
    """Reads exactly ``length`` bytes of ``source`` and hashes them."""

    def __init__(self, source: BinaryIO, length: int) -> None:
        self.source = source
        self.remaining = length
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.remaining)
        if n <= 0:
            return 0
        data = self.source.read(n)
        if not data:
            raise ArchiveError("archive body ends early (truncated archive)")
        b[: len(data)] = data
        self.sha.update(data)
        self.count += len(data)
        self.remaining -= len(data)
        return len(data)


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string with a Z suffix."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ArchiveWriter:
    """Writes an archive to a binary stream, record by record.

    Memory use is bounded by the compressor's window whatever the archive size.
    """

    def __init__(
        self,
        out: BinaryIO,
        *,
        service: str,
        level: int = DEFAULT_LEVEL,
        encryptor: BodyEncryptor | None = None,
    ) -> None:
        self.out = out
        self.level = level
        self.encryptor = encryptor
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "service": service,
            "compression": {"algorithm": "zstd", "level": level},
            "encryption": encryptor.header_params() if encryptor else None,
            # The manifest carries manifest_sha256; the header (hashed in the manifest) says so,
            # so that a reader requires it and a damaged field name cannot pass for an old archive.
            "manifest_checksum": "sha256",
        }
        self.header_bytes = canonical_json(header)
        if len(self.header_bytes) + len(HEADER_PREFIX) + 1 > MAX_HEADER_BYTES:
            raise ArchiveError(f"the archive header would be larger than {MAX_HEADER_BYTES} bytes (too many recipients?)")
        out.write(_frame(HEADER_MAGIC, HEADER_PREFIX + self.header_bytes + b"\n"))
        self.body_start = 8 + len(HEADER_PREFIX) + len(self.header_bytes) + 1
        self._body = _HashingWriter(out)
        self._enc_writer: BinaryIO | None = None
        target: Any = self._body
        if encryptor is not None:
            self._enc_writer = encryptor.wrap_writer(self._body)  # type: ignore[arg-type]
            target = self._enc_writer
        self._compressed = _CountingWriter(target)  # the zstd stream, before any encryption
        target = self._compressed
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self._zw = cctx.stream_writer(target, closefd=False, write_size=READ_CHUNK)
        self._content_sha = hashlib.sha256()
        self.content_bytes = 0
        self.keys = 0
        self.raw_bytes = 0
        self._finished = False

    def write_content(self, data: bytes) -> None:
        """Append already-encoded record-stream bytes (whole lines)."""
        self._content_sha.update(data)
        self.content_bytes += len(data)
        self._zw.write(data)

    def add(self, record: Record) -> None:
        """Append one record."""
        self.keys += 1
        self.raw_bytes += len(record.key) + len(record.value)
        self.write_content(encode_record(record))

    def finish(self, manifest_fields: dict[str, Any]) -> dict[str, Any]:
        """Flush the body and write manifest and footer. Returns the manifest."""
        if self._finished:
            raise RuntimeError("archive already finished")
        self._finished = True
        self._zw.flush(zstandard.FLUSH_FRAME)
        self._zw.close()
        # A stream that compresses better than the format's ratio bound (zeros, repeated
        # values) gets a padded body: skippable frames, which every zstd decoder skips.
        zeros = b""
        while (short := min_body_bytes(self.content_bytes) - self._compressed.count) > 0:
            pad = min(max(0, short - FRAME_HEADER.size), 1 << 30)
            self._compressed.write(FRAME_HEADER.pack(PADDING_MAGIC, pad))
            zeros = zeros or bytes(min(pad, READ_CHUNK))
            while pad > 0:
                pad -= self._compressed.write(zeros[:pad])
        if self._enc_writer is not None:
            self._enc_writer.close()
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tool_version": __version__,
            "created": utc_now(),
            "keys": self.keys,
            "raw_bytes": self.raw_bytes,
            "content_bytes": self.content_bytes,
            "content_sha256": self._content_sha.hexdigest(),
            "body_bytes": self._body.count,
            "body_sha256": self._body.sha.hexdigest(),
            "header_sha256": hashlib.sha256(self.header_bytes).hexdigest(),
            "compression": {"algorithm": "zstd", "level": self.level},
            "encrypted": self.encryptor is not None,
        }
        manifest.update(manifest_fields)
        manifest["manifest_sha256"] = manifest_digest(manifest)
        body = canonical_json(manifest)
        if self.encryptor is not None:
            manifest["manifest_mac"] = self.encryptor.seal_manifest(body)
            body = canonical_json(manifest)
        manifest_offset = self.body_start + self._body.count
        if len(body) + 2 > MAX_MANIFEST_BYTES:
            raise ArchiveError(f"the archive manifest would be larger than {MAX_MANIFEST_BYTES} bytes")
        frame = _frame(MANIFEST_MAGIC, b"\n" + body + b"\n")
        self.out.write(frame)
        footer = FOOTER_PREFIX + b"%016x %016x\n" % (manifest_offset, len(frame))
        self.out.write(_frame(FOOTER_MAGIC, footer))
        self.out.flush()
        return manifest


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ArchiveError(f"archive is truncated ({what} is incomplete)")
    return data


class ArchiveReader:
    """Reads and checks an archive held in a seekable local file."""

    def __init__(self, f: BinaryIO, *, label: str = "archive") -> None:
        self.f = f
        self.label = label
        f.seek(0, os.SEEK_END)
        self.size = f.tell()
        if self.size < 8 + FOOTER_LEN:
            raise ArchiveError(f"{label} is not a Burrow archive (too short, possibly truncated)")
        f.seek(0)
        magic, hlen = FRAME_HEADER.unpack(_read_exact(f, 8, "header"))
        if magic != HEADER_MAGIC:
            raise ArchiveError(f"{label} is not a Burrow archive (bad header magic)")
        if hlen > MAX_HEADER_BYTES or hlen > self.size - 8 - FOOTER_LEN:
            raise ArchiveError(f"{label} has a header frame of {hlen} bytes, beyond the format's limit (corrupt)")
        hdata = _read_exact(f, hlen, "header")
        if not hdata.startswith(HEADER_PREFIX) or not hdata.endswith(b"\n"):
            raise ArchiveError(f"{label} has a malformed header")
        self.header_bytes = hdata[len(HEADER_PREFIX) : -1]
        self.body_start = 8 + hlen
        try:
            self.header: dict[str, Any] = orjson.loads(self.header_bytes)
        except orjson.JSONDecodeError:
            raise ArchiveError(f"{label} has a corrupt header") from None
        self._check_version(self.header, "header")
        # footer and manifest
        f.seek(self.size - FOOTER_LEN)
        fmagic, flen = FRAME_HEADER.unpack(_read_exact(f, 8, "footer"))
        fdata = f.read(FOOTER_DATA_LEN)
        if fmagic != FOOTER_MAGIC or flen != FOOTER_DATA_LEN or not fdata.startswith(FOOTER_PREFIX):
            raise ArchiveError(f"{label} is truncated or incomplete (no valid footer)")
        try:
            moff_s, mlen_s = fdata[len(FOOTER_PREFIX) :].split()
            self.manifest_offset, mframe_len = int(moff_s, 16), int(mlen_s, 16)
        except ValueError:
            raise ArchiveError(f"{label} has a corrupt footer") from None
        if fdata != FOOTER_PREFIX + b"%016x %016x\n" % (self.manifest_offset, mframe_len):
            raise ArchiveError(f"{label} has a corrupt footer")
        if self.manifest_offset < self.body_start or self.manifest_offset + mframe_len != self.size - FOOTER_LEN:
            raise ArchiveError(f"{label} is truncated or has a corrupt footer")
        if mframe_len > MAX_MANIFEST_BYTES + 8:
            raise ArchiveError(
                f"{label} has a manifest of {mframe_len} bytes, beyond the format's limit of {MAX_MANIFEST_BYTES}"
            )
        f.seek(self.manifest_offset)
        mmagic, mlen = FRAME_HEADER.unpack(_read_exact(f, 8, "manifest"))
        if mmagic != MANIFEST_MAGIC or mlen + 8 != mframe_len:
            raise ArchiveError(f"{label} has a corrupt manifest frame")
        mdata = _read_exact(f, mlen, "manifest")
        self.manifest_bytes = mdata.strip(b"\n")
        try:
            self.manifest: dict[str, Any] = orjson.loads(self.manifest_bytes)
        except orjson.JSONDecodeError:
            raise ArchiveError(f"{label} has a corrupt manifest") from None
        if not isinstance(self.manifest, dict):
            raise ArchiveError(f"{label} has a corrupt manifest")
        self._check_version(self.manifest, "manifest")
        if mdata != b"\n" + canonical_json(self.manifest) + b"\n":
            # Writers emit canonical JSON only, so any edit that still parses is caught here.
            raise ArchiveError(f"{label} has a corrupt manifest (not in canonical form: edited?)")
        check = self.header.get("manifest_checksum")
        if check is not None:  # archives written before it have none
            if check != "sha256":
                raise ArchiveError(f"{label} has a corrupt header (unknown manifest checksum {str(check)[:20]!r})")
            if self.manifest.get("manifest_sha256") != manifest_digest(self.manifest):
                raise ArchiveError(f"{label} has a corrupt manifest (its checksum does not match)")
        self.body_length = self.manifest_offset - self.body_start
        self._bound: tuple[Any, BodyDecryptor] | None = None

    def _check_version(self, obj: Any, what: str) -> None:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise ArchiveError(f"{self.label} is not a Burrow archive ({what} has no format marker)")
        version = obj.get("version")
        if version != FORMAT_VERSION:
            raise ArchiveError(
                f"{self.label} uses archive format version {version!r}; "
                f"this Burrow reads version {FORMAT_VERSION}"
            )

    @property
    def encrypted(self) -> bool:
        return bool(self.header.get("encryption"))

    def _decryptor(self, decryptor: BodyDecryptor | DecryptorFactory | None) -> BodyDecryptor | None:
        """Bind a keyring to this archive's header (once); plain decryptors pass through."""
        bind = getattr(decryptor, "bind_header", None)
        if decryptor is None or bind is None or not self.encrypted:
            return decryptor  # type: ignore[return-value]
        if self._bound is None or self._bound[0] is not decryptor:
            self._bound = (decryptor, bind(self.header.get("encryption"), self.label))
        return self._bound[1]

    def derived_key(self, decryptor: BodyDecryptor | DecryptorFactory | None, label: bytes) -> bytes | None:
        """A key bound to this archive derived under ``label`` (see StreamDecryptor.derive_key),
        or None when the archive is not encrypted or the decryptor cannot derive keys."""
        bound = self._decryptor(decryptor)
        derive = getattr(bound, "derive_key", None)
        return derive(label) if derive is not None else None

    def check_downgrade(self, decryptor: BodyDecryptor | DecryptorFactory | None, *, allow_unencrypted: bool) -> None:
        """Refuse an unencrypted archive when read keys are configured, unless allowed.

        With keys configured, every genuine archive is encrypted; an unencrypted one is what
        anyone who can write to the store could plant (with a forged source and time).
        """
        if self.encrypted or allow_unencrypted or not holds_keys(decryptor):
            return
        raise ArchiveError(
            f"{self.label} is not encrypted, but read keys are configured: refusing it, as anyone who can "
            "write to the store could have planted it (pass --allow-unencrypted to read it anyway)"
        )

    def _check_unkeyed(self) -> None:
        """The checks that need no key: header hash, body length, encryption flags agree,
        and the decompression bound."""
        m = self.manifest
        try:
            expected_header = m["header_sha256"]
            body_bytes = m["body_bytes"]
            content_bytes = m["content_bytes"]
            keys = m["keys"]
        except KeyError:
            raise ArchiveError(f"{self.label} has an incomplete manifest") from None
        if not all(type(v) is int and v >= 0 for v in (body_bytes, content_bytes, keys)):
            raise ArchiveError(f"{self.label} has a malformed manifest (sizes and counts must be integers)")
        if bool(m.get("encrypted")) != self.encrypted:
            raise ArchiveError(f"{self.label}: manifest and header disagree about encryption (tampered)")
        if hashlib.sha256(self.header_bytes).hexdigest() != expected_header:
            raise ArchiveError(f"{self.label} header does not match its manifest (corrupt or tampered)")
        if body_bytes != self.body_length:
            raise ArchiveError(
                f"{self.label} body is {self.body_length} bytes but the manifest says {body_bytes} (corrupt or truncated)"
            )
        if body_bytes < min_body_bytes(content_bytes):
            raise ArchiveError(
                f"{self.label} claims {content_bytes} bytes of records from a {body_bytes}-byte body, beyond the "
                f"format's bound of {MAX_RATIO}:1 (refused as a possible decompression bomb)"
            )

    def check_metadata(self, decryptor: BodyDecryptor | DecryptorFactory | None = None) -> None:
        """Check what can be checked without reading the body (the manifest MAC included)."""
        self._check_unkeyed()
        m = self.manifest
        if self.encrypted:
            if decryptor is None:
                raise ArchiveError(f"{self.label} is encrypted; pass a key to read it")
            tag = m.get("manifest_mac")
            if not isinstance(tag, str):
                raise ArchiveError(f"{self.label} is encrypted but its manifest carries no authentication tag")
            unsealed = {k: v for k, v in m.items() if k != "manifest_mac"}
            bound = self._decryptor(decryptor)
            assert bound is not None
            bound.check_manifest(canonical_json(unsealed), tag)

    def check_binding(self, name: str) -> bool | str:
        """Whether this archive may be acted on under the store name ``name``; the result is
        what a catalog row records as ``bound``:

        * ``True``: the manifest's ``object_name`` is ``name`` (or ``name`` ends with
          ``/<object_name>``: a store opened one directory up names it with a prefix);
        * ``"legacy"``: a manifest written before binding (no ``object_name``) under a name that
          carries its id: ``<slug>/<slug>-<stamp>-<6 hex>.burrow`` with the source's slug and a
          ``created`` between the name's stamp and 7 days after it;
        * ``False``: a pre-binding manifest under a name Burrow does not give: readable when
          named explicitly, never chosen automatically.

        Raises ArchiveError when the manifest is bound to another name: a copy (or a move),
        which anyone who can write to the store can make of any archive. The manifest's claims
        are only as good as its authentication (:meth:`check_metadata`): binding without a key
        catches accidents, with one it catches forgeries."""
        bound = self.manifest.get("object_name")
        if bound is not None:
            if isinstance(bound, str) and bound and (name == bound or name.endswith("/" + bound)):
                return True
            raise ArchiveError(f"{self.label} is {BOUND_ELSEWHERE}")
        return legacy_binding(name, self.manifest)

    def check_stored(self) -> None:
        """Keyless integrity check of the stored bytes: header hash, body length and body SHA-256.

        For an encrypted archive this is all a holder of public keys only can check: the
        manifest is not authenticated and nothing is decrypted.
        """
        self._check_unkeyed()
        self.f.seek(self.body_start)
        body = _BoundedHashingReader(self.f, self.body_length)
        buf = bytearray(READ_CHUNK)
        while body.readinto(buf):
            pass
        if body.sha.hexdigest() != self.manifest.get("body_sha256"):
            raise ArchiveError(f"{self.label} body checksum mismatch (corrupt or tampered)")

    def iter_content(self, decryptor: BodyDecryptor | DecryptorFactory | None = None) -> Iterator[bytes]:
        """Yield the decompressed record stream in chunks, checking every checksum.

        The final checks (body and content SHA-256, byte counts) run when the stream is
        exhausted; a consumer that must not act on unchecked data reads to the end first.
        """
        self.check_metadata(decryptor)
        self.f.seek(self.body_start)
        body = _BoundedHashingReader(self.f, self.body_length)
        source: Any = io.BufferedReader(body, buffer_size=READ_CHUNK)
        if self.encrypted:
            bound = self._decryptor(decryptor)
            assert bound is not None
            source = bound.wrap_reader(source)
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        content_sha = hashlib.sha256()
        content_bytes = 0
        expected = self.manifest["content_bytes"]  # an int: checked by check_metadata
        try:
            reader = dctx.stream_reader(source, read_across_frames=True, closefd=False)
            while True:
                chunk = reader.read(READ_CHUNK)
                if not chunk:
                    break
                content_sha.update(chunk)
                content_bytes += len(chunk)
                if content_bytes > expected:
                    raise ArchiveError(
                        f"{self.label} body decompresses to more than the {expected} bytes its manifest records "
                        "(corrupt, or a decompression bomb)"
                    )
                yield chunk
        except zstandard.ZstdError as exc:
            raise ArchiveError(f"{self.label} body is corrupt (decompression failed: {exc})") from None
        if body.remaining:
            # zstd stopped early: trailing garbage inside the body region
            raise ArchiveError(f"{self.label} body has trailing data after the compressed stream (corrupt)")
        m = self.manifest
        if body.sha.hexdigest() != m.get("body_sha256"):
            raise ArchiveError(f"{self.label} body checksum mismatch (corrupt or tampered)")
        if content_bytes != m.get("content_bytes") or content_sha.hexdigest() != m.get("content_sha256"):
            raise ArchiveError(f"{self.label} content checksum mismatch (corrupt or tampered)")

    def records(self, decryptor: BodyDecryptor | DecryptorFactory | None = None) -> Iterator[Record]:
        """Yield every record; the checksums are checked when the stream ends.

        A line longer than MAX_LINE_BYTES, or more records than the manifest's count, is
        refused as soon as it is seen, before more of it is buffered.
        """
        for lines in self._line_batches(decryptor):
            for line in lines:
                yield decode_record(line)

    def _line_batches(self, decryptor: BodyDecryptor | DecryptorFactory | None) -> Iterator[list[bytes]]:
        """The record lines of each decrypted, decompressed chunk (a line split across chunks
        goes with the chunk that ends it), with every check of :meth:`records` but the parse."""
        pending = bytearray()  # the start of a line that continues in the next chunk
        count = 0
        expected = self.manifest.get("keys")  # an int once iter_content has yielded (check_metadata)
        for chunk in self.iter_content(decryptor):
            lines = chunk.split(b"\n")
            tail = lines.pop()
            if lines and pending:
                pending += lines[0]
                lines[0] = bytes(pending)
                pending = bytearray()
            if len(lines) + count > expected:
                raise ArchiveError(
                    f"{self.label} holds more records than the {expected} its manifest records (corrupt)"
                )
            for line in lines:
                if len(line) >= MAX_LINE_BYTES:
                    raise self._long_line()
            count += len(lines)
            yield lines
            pending += tail
            if len(pending) >= MAX_LINE_BYTES:
                raise self._long_line()
        if pending:
            raise ArchiveError(f"{self.label} record stream ends in the middle of a record (corrupt)")
        if count != self.manifest.get("keys"):
            raise ArchiveError(
                f"{self.label} holds {count} records but the manifest says {self.manifest.get('keys')} (corrupt)"
            )

    def _long_line(self) -> RecordTooLarge:
        return RecordTooLarge(
            f"{self.label} holds a record line longer than the format's limit of {MAX_LINE_BYTES} bytes (corrupt)"
        )

    def validate(self, decryptor: BodyDecryptor | DecryptorFactory | None = None, *, parse: bool = True) -> int:
        """Read the whole archive and check everything; return the record count.

        ``parse=False`` checks every byte (MACs, checksums, framing, line bounds, the count) but
        does not parse the record lines: for a caller that parses each of them itself before
        anything is written (the restore flow's plan), which then raises on a malformed one."""
        n = 0
        if not parse:
            for lines in self._line_batches(decryptor):
                n += len(lines)
            return n
        for _ in self.records(decryptor):
            n += 1
        return n


def legacy_binding(name: str, manifest: dict[str, Any]) -> bool | str:
    """The binding of a manifest without ``object_name`` (see :meth:`ArchiveReader.check_binding`):
    ``"legacy"`` when the name carries the archive's id, ``False`` when it is not a name Burrow
    gives; raises ArchiveError when it is one, but of another source or time (a copy)."""
    from burrow.naming import slug

    parts = name.split("/")
    m = LEGACY_NAME_RE.match(parts[-1])
    if m is None or (len(parts) > 1 and parts[-2] != m["slug"]):
        return False
    source, created = manifest.get("source"), manifest.get("created")
    try:
        stamp = datetime.strptime(m["stamp"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        when = datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        raise ArchiveError(f"{name} is {BOUND_ELSEWHERE}: its manifest has no readable creation time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if not isinstance(source, str) or slug(source) != m["slug"] or not stamp <= when <= stamp + LEGACY_WINDOW:
        raise ArchiveError(f"{name} is {BOUND_ELSEWHERE}: its manifest's source or time is not the one its name carries")
    return "legacy"


def holds_keys(decryptor: BodyDecryptor | DecryptorFactory | None) -> bool:
    """True when a reader was given keys: a decryptor, or a keyring holding at least one key."""
    if decryptor is None:
        return False
    keyring = getattr(decryptor, "keyring", None)
    return True if keyring is None else bool(keyring)
