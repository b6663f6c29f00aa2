"""The streaming authenticated encryption of archive bodies (used between compress and upload).

The construction (see docs/ENCRYPTION.md) follows the STREAM online-AE scheme of Hoang,
Reyhanitabar, Rogaway and Vizár, as Tink's AES-GCM-HKDF streaming AEAD and age do:

* a fresh random 32-byte file key per archive, wrapped for each recipient (burrow/keys.py);
* HKDF-SHA256(file key, random 32-byte salt) derives two independent subkeys: one for the
  payload, one for the manifest MAC;
* the compressed body is cut into fixed-size chunks (64 KiB by default), each sealed with
  AES-256-GCM under the payload key with the 12-byte nonce
  ``nonce_prefix (7 random bytes) || chunk counter (4 bytes, big-endian) || last flag (1 byte)``.
  Reordered, dropped, duplicated or appended chunks and truncation all fail authentication;
* the manifest (which records the header's SHA-256, the body's SHA-256 and every count) is
  authenticated with HMAC-SHA256 under the MAC subkey.

Memory stays bounded by one chunk whatever the archive size.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from burrow.errors import ArchiveError
from burrow.keys import MAX_STANZAS, Keyring, WriteKeys, _hkdf, new_file_key

SCHEME = "burrow-stream-aes256gcm-hkdf-sha256-v1"
DEFAULT_CHUNK = 64 * 1024
MIN_CHUNK = 1 << 10
MAX_CHUNK = 1 << 22
TAG_LEN = 16
PREFIX_LEN = 7
SALT_LEN = 32
MAX_CHUNKS = 1 << 32
PAYLOAD_INFO = b"burrow/v1/payload"
MAC_INFO = b"burrow/v1/manifest-mac"
#: The domain of a reader key's public id (``signer`` in markers and journal records).
READER_ID_DOMAIN = b"burrow/v1/reader-id"
#: How a reader-signed record names its MAC (``mac_scheme``).
READER_MAC_SCHEME = "hmac-sha256:burrow/v1/reader-mac"


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    if counter >= MAX_CHUNKS:
        raise ArchiveError("archive body exceeds the STREAM chunk limit")
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


@dataclass(frozen=True)
class StreamParams:
    """The header's ``encryption`` object, checked."""

    chunk_size: int
    nonce_prefix: bytes
    salt: bytes
    stanzas: list[dict[str, Any]]

    def to_header(self) -> dict[str, Any]:
        return {
            "scheme": SCHEME,
            "chunk_size": self.chunk_size,
            "nonce_prefix": self.nonce_prefix.hex(),
            "salt": self.salt.hex(),
            "stanzas": self.stanzas,
        }


def _hex(value: Any, n: int, what: str, label: str) -> bytes:
    if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{2 * n}}}", value):
        raise ArchiveError(f"{label} has a malformed encryption header ({what})")
    return bytes.fromhex(value)


def parse_params(params: Any, label: str = "archive") -> StreamParams:
    """Check the header's encryption parameters; raise ArchiveError on anything unexpected."""
    if not isinstance(params, dict):
        raise ArchiveError(f"{label} has a malformed encryption header")
    if params.get("scheme") != SCHEME:
        raise ArchiveError(f"{label} uses an unknown encryption scheme {str(params.get('scheme'))[:60]!r}")
    chunk = params.get("chunk_size")
    if type(chunk) is not int or not MIN_CHUNK <= chunk <= MAX_CHUNK or chunk & (chunk - 1):
        raise ArchiveError(f"{label} has a malformed encryption header (chunk size)")
    stanzas = params.get("stanzas")
    if (
        not isinstance(stanzas, list) or not 1 <= len(stanzas) <= MAX_STANZAS
        or not all(isinstance(s, dict) for s in stanzas)
    ):
        raise ArchiveError(f"{label} has a malformed encryption header (stanzas)")
    if any(s.get("type") == "scrypt" for s in stanzas) and len(stanzas) != 1:
        raise ArchiveError(f"{label} has a malformed encryption header (a passphrase stanza must be alone)")
    return StreamParams(
        chunk_size=chunk,
        nonce_prefix=_hex(params.get("nonce_prefix"), PREFIX_LEN, "nonce prefix", label),
        salt=_hex(params.get("salt"), SALT_LEN, "salt", label),
        stanzas=stanzas,
    )


def encryption_summary(params: Any) -> dict[str, Any]:
    """What an archive is encrypted to, for list and inspect (public facts only)."""
    if not params:
        return {"encrypted": False}
    try:
        sp = parse_params(params)
    except ArchiveError:
        return {"encrypted": True, "mode": "unreadable header"}
    kinds = sorted({str(s.get("type")) for s in sp.stanzas})
    mode = {"symmetric": "symmetric", "x25519": "x25519", "scrypt": "passphrase"}.get(kinds[0], kinds[0])
    if len(kinds) > 1:
        mode = "+".join(kinds)
    fps = [str(s.get("fingerprint")) for s in sp.stanzas if s.get("fingerprint")]
    out: dict[str, Any] = {"encrypted": True, "mode": mode, "fingerprints": fps}
    if mode == "passphrase":
        s = sp.stanzas[0]
        out["kdf"] = f"scrypt log_n={s.get('log_n')} r={s.get('r')} p={s.get('p')}"
    return out


def check_layout(params: Any, body_length: int, label: str = "archive") -> int:
    """Check that ``body_length`` is a possible STREAM ciphertext length; return the chunk count.

    This needs no key: the structure-only verify of a backup written for public-key recipients.
    """
    sp = parse_params(params, label)
    full = sp.chunk_size + TAG_LEN
    if body_length < TAG_LEN:
        raise ArchiveError(f"{label} body is too short to be encrypted data (truncated)")
    chunks = -(-body_length // full)
    last = body_length - (chunks - 1) * full
    if last < TAG_LEN or (last == TAG_LEN and chunks > 1):
        raise ArchiveError(f"{label} body length does not fit the encrypted chunk layout (truncated or padded)")
    return chunks


class _EncryptingWriter(io.RawIOBase):
    """Seals chunks into ``sink``; close() writes the final (flagged) chunk. Never closes ``sink``."""

    def __init__(self, sink: BinaryIO, aead: AESGCM, prefix: bytes, chunk_size: int) -> None:
        self._sink = sink
        self._aead = aead
        self._prefix = prefix
        self._chunk = chunk_size
        self._buf = bytearray()
        self._counter = 0
        self._finished = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self._finished:
            raise ValueError("write to a finished encryption stream")
        data = memoryview(b).cast("B")
        n = len(data)
        chunk = self._chunk
        # Keep at least one byte back: the last chunk must be flagged, and we only know
        # which one is last at close().
        if len(self._buf) + n <= chunk:
            self._buf += data
            return n
        pos = 0
        if self._buf:  # top up the pending partial chunk first
            pos = chunk - len(self._buf)
            self._buf += data[:pos]
            self._seal(self._buf)
            self._buf = bytearray()
        while n - pos > chunk:  # whole chunks straight from the caller's buffer, no copy
            self._seal(data[pos : pos + chunk])
            pos += chunk
        self._buf += data[pos:]
        return n

    def _seal(self, plaintext: Any) -> None:
        nonce = _nonce(self._prefix, self._counter, False)
        self._sink.write(self._aead.encrypt(nonce, plaintext, None))
        self._counter += 1

    def close(self) -> None:
        if not self._finished and not self.closed:
            self._finished = True
            nonce = _nonce(self._prefix, self._counter, True)
            self._sink.write(self._aead.encrypt(nonce, bytes(self._buf), None))
            self._buf = bytearray()
        super().close()


class _DecryptingReader(io.RawIOBase):
    """Opens chunks from ``source``; raises ArchiveError before releasing any unauthenticated byte."""

    def __init__(self, source: BinaryIO, aead: AESGCM, prefix: bytes, chunk_size: int, label: str) -> None:
        self._src = source
        self._aead = aead
        self._prefix = prefix
        self._full = chunk_size + TAG_LEN
        self._label = label
        self._ahead = b""
        self._plain = b""
        self._pos = 0
        self._counter = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _read_upto(self, n: int) -> bytes:
        parts = []
        while n > 0:
            data = self._src.read(n)
            if not data:
                break
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    def _next(self) -> None:
        data = self._ahead + self._read_upto(self._full + 1 - len(self._ahead))
        if len(data) > self._full:
            ct, self._ahead, last = data[: self._full], data[self._full :], False
        else:
            ct, self._ahead, last = data, b"", True
        n = self._counter
        if last and (len(ct) < TAG_LEN or (len(ct) == TAG_LEN and n > 0)):
            raise ArchiveError(f"{self._label} encrypted body is truncated (chunk {n} incomplete)")
        try:
            self._plain = self._aead.decrypt(_nonce(self._prefix, n, last), ct, None)
        except InvalidTag:
            where = "final chunk" if last else f"chunk {n}"
            raise ArchiveError(
                f"{self._label} encrypted body failed authentication at {where} "
                "(corrupt, truncated, reordered or tampered)"
            ) from None
        self._pos = 0
        self._counter += 1
        self._done = last

    def readinto(self, b: Any) -> int:
        while self._pos >= len(self._plain):
            if self._done:
                return 0
            self._next()
        n = min(len(b), len(self._plain) - self._pos)
        b[:n] = self._plain[self._pos : self._pos + n]
        self._pos += n
        return n


def stream_writer(sink: BinaryIO, key: bytes, nonce_prefix: bytes, chunk_size: int = DEFAULT_CHUNK) -> BinaryIO:
    """A STREAM encryptor of everything written to it into ``sink`` under the 32-byte ``key``
    (never reuse a key with the same ``nonce_prefix``); close() seals the final chunk and
    leaves ``sink`` open. Archive bodies use it, and so do the sealed staging spools."""
    if len(key) != 32 or len(nonce_prefix) != PREFIX_LEN:
        raise ValueError("STREAM needs a 32-byte key and a 7-byte nonce prefix")
    return _EncryptingWriter(sink, AESGCM(key), nonce_prefix, chunk_size)  # type: ignore[return-value]


def stream_reader(
    source: BinaryIO, key: bytes, nonce_prefix: bytes, chunk_size: int = DEFAULT_CHUNK, label: str = "stream"
) -> BinaryIO:
    """The reader of what :func:`stream_writer` wrote: raises ArchiveError (naming ``label``)
    before it releases any byte of a chunk that fails authentication, or on truncation."""
    return _DecryptingReader(source, AESGCM(key), nonce_prefix, chunk_size, label)  # type: ignore[return-value]


def _subkeys(file_key: bytes, salt: bytes) -> tuple[bytes, bytes]:
    return _hkdf(file_key, salt, PAYLOAD_INFO), _hkdf(file_key, salt, MAC_INFO)


def _mac(mac_key: bytes, manifest_bytes: bytes) -> str:
    return hmac.new(mac_key, b"burrow/v1/manifest\x00" + manifest_bytes, hashlib.sha256).hexdigest()


class StreamEncryptor:
    """Implements burrow.archive.BodyEncryptor for one archive (make a new one per archive)."""

    def __init__(self, keys: WriteKeys, chunk_size: int = DEFAULT_CHUNK) -> None:
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_size & (chunk_size - 1):
            raise ValueError("chunk size must be a power of two between 1 KiB and 4 MiB")
        self.keys = keys
        file_key = new_file_key()
        salt = os.urandom(SALT_LEN)
        self._payload_key, self._mac_key = _subkeys(file_key, salt)
        self.params = StreamParams(
            chunk_size=chunk_size,
            nonce_prefix=os.urandom(PREFIX_LEN),
            salt=salt,
            stanzas=[r.wrap(file_key) for r in keys.recipients],
        )
        del file_key
        self._used = False

    def __repr__(self) -> str:
        return f"StreamEncryptor(mode={self.keys.mode}, fingerprints={self.keys.fingerprints()})"

    def header_params(self) -> dict[str, Any]:
        return self.params.to_header()

    def summary(self) -> dict[str, Any]:
        """The manifest's ``encryption`` field (authenticated by the manifest MAC)."""
        return encryption_summary(self.header_params()) | {"scheme": SCHEME}

    def wrap_writer(self, sink: BinaryIO) -> BinaryIO:
        if self._used:
            raise RuntimeError("a StreamEncryptor encrypts exactly one archive")
        self._used = True
        return _EncryptingWriter(  # type: ignore[return-value]
            sink, AESGCM(self._payload_key), self.params.nonce_prefix, self.params.chunk_size
        )

    def seal_manifest(self, manifest_bytes: bytes) -> str:
        return _mac(self._mac_key, manifest_bytes)


class StreamDecryptor:
    """Implements burrow.archive.BodyDecryptor for one archive, once its file key is known."""

    def __init__(self, file_key: bytes, params: StreamParams, label: str = "archive", opened_by: str = "") -> None:
        self.params = params
        self.label = label
        self.opened_by = opened_by
        self._payload_key, self._mac_key = _subkeys(file_key, params.salt)

    def __repr__(self) -> str:
        return f"StreamDecryptor({self.label}, opened by {self.opened_by or 'a key'})"

    def wrap_reader(self, source: BinaryIO) -> BinaryIO:
        p = self.params
        return _DecryptingReader(  # type: ignore[return-value]
            source, AESGCM(self._payload_key), p.nonce_prefix, p.chunk_size, self.label
        )

    def derive_key(self, label: bytes) -> bytes:
        """A further 32-byte key bound to this one archive, for records about it (rehearsal
        markers): HMAC-SHA256 of ``label`` under the archive's manifest-MAC subkey. Distinct
        labels give independent keys; none equals a key the archive itself uses."""
        return hmac.new(self._mac_key, label, hashlib.sha256).digest()

    def check_manifest(self, manifest_bytes: bytes, tag: str) -> None:
        if not isinstance(tag, str) or not hmac.compare_digest(
            _mac(self._mac_key, manifest_bytes).encode(), tag.encode("utf-8", "replace")
        ):
            raise ArchiveError(f"{self.label} manifest failed authentication (edited, corrupt or tampered)")


class ArchiveKeys:
    """What flows hand to the reading tasks: a keyring that opens whichever archive it meets.

    ArchiveReader calls :meth:`bind_header` with the header's encryption parameters; it
    returns the archive's StreamDecryptor, or raises KeyMismatch naming the fingerprints the
    archive needs.
    """

    def __init__(self, keyring: Keyring | None = None) -> None:
        self.keyring = keyring or Keyring()
        self.opened_by: str | None = None

    def __repr__(self) -> str:
        return f"ArchiveKeys({self.keyring!r})"

    def bind_header(self, params: Any, label: str) -> StreamDecryptor:
        sp = parse_params(params, label)
        file_key, opened_by = self.keyring.unwrap(sp.stanzas, label)
        if len(file_key) != 32:
            raise ArchiveError(f"{label} has a malformed wrapped key")
        self.opened_by = opened_by
        return StreamDecryptor(file_key, sp, label, opened_by)

    # -------------------------------------------------------------------- reader records
    #
    # Records about archives that steer decisions (rehearsal markers, failover journal records)
    # are MACed with a *reader key*: derived from the secret side of a keyring identity (a
    # symmetric key, an X25519 private key, a passphrase). A backup worker that holds public
    # keys only, or anyone else who can only write to the store, cannot make one; an archive's
    # own key would not do, since the worker that wrote the archive made its file key.

    def _reader_keys(self) -> Iterator[tuple[str, bytes]]:
        """``(public id, key)`` of every secret identity in the keyring, keys before passphrases
        (a passphrase's reader key costs one scrypt per process, so it is derived last)."""
        for ident in [*self.keyring.keys, *self.keyring.passphrases]:
            key = ident.reader_key()
            yield reader_id(key), key

    def reader_signers(self) -> list[str]:
        """The public ids of the reader keys this keyring holds (empty: it cannot sign)."""
        return [rid for rid, _ in self._reader_keys()]

    def can_reader_sign(self) -> bool:
        """Whether this keyring holds a secret identity, and so can make reader records."""
        return bool(self.keyring)

    def reader_sign(self, domain: bytes, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with ``mac_scheme``, ``signer`` (the reader key's public id) and ``mac``
        added: HMAC-SHA256 under the keyring's first reader key over ``domain`` and the record's
        canonical JSON. Raises ValueError when the keyring holds no secret identity."""
        for rid, key in self._reader_keys():
            out = {k: v for k, v in body.items() if k != "mac"} | {"mac_scheme": READER_MAC_SCHEME, "signer": rid}
            out["mac"] = _reader_mac(key, domain, out)
            return out
        raise ValueError("no secret key to sign with: a keyring of public keys only cannot make reader records")

    def reader_verify(self, domain: bytes, record: Any) -> tuple[bool, str | None]:
        """Whether ``record`` carries a valid reader MAC under ``domain`` by a key of this
        keyring: ``(True, None)`` or ``(False, why)`` (a reason without key material)."""
        if not isinstance(record, dict):
            return False, "not a record"
        tag, signer = record.get("mac"), record.get("signer")
        if not isinstance(tag, str) or record.get("mac_scheme") != READER_MAC_SCHEME or not isinstance(signer, str):
            return False, "it carries no reader MAC"
        if not self.keyring:
            return False, "no read key is configured to authenticate it"
        for rid, key in self._reader_keys():
            if rid == signer:
                body = {k: v for k, v in record.items() if k != "mac"}
                if hmac.compare_digest(_reader_mac(key, domain, body).encode(), tag.encode("utf-8", "replace")):
                    return True, None
                return False, "its MAC does not match (edited, or copied from another record)"
        return False, f"it was signed by reader key {signer[:16]!r}, which is not configured here"

    def reader_seal(self, domain: bytes, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        """Encrypt and authenticate ``plaintext`` so that only holders of a reader key can read
        it (records that name key paths, such as the undo lists of tasks/undo.py): AES-256-GCM
        under HKDF-SHA256(the keyring's first reader key, a random 32-byte salt, ``domain``),
        with ``aad`` authenticated too. Returns ``(signer, salt || nonce || ciphertext)``
        (``signer``: the reader key's public id). Raises ValueError without a secret identity."""
        for rid, key in self._reader_keys():
            salt, nonce = os.urandom(SALT_LEN), os.urandom(12)
            return rid, salt + nonce + AESGCM(_hkdf(key, salt, domain)).encrypt(nonce, plaintext, aad)
        raise ValueError("no secret key to seal with: a keyring of public keys only cannot make reader records")

    def reader_open(self, domain: bytes, signer: str, sealed: bytes, aad: bytes) -> bytes:
        """The plaintext of what :meth:`reader_seal` made; ValueError (a reason without key
        material) when no configured key is ``signer``'s, or the bytes or ``aad`` were changed."""
        if len(sealed) < SALT_LEN + 12 + TAG_LEN:
            raise ValueError("it is too short to be sealed")
        for rid, key in self._reader_keys():
            if rid == signer:
                salt, nonce = sealed[:SALT_LEN], sealed[SALT_LEN : SALT_LEN + 12]
                try:
                    return AESGCM(_hkdf(key, salt, domain)).decrypt(nonce, sealed[SALT_LEN + 12 :], aad)
                except InvalidTag:
                    raise ValueError("it failed authentication (edited, or copied from another name)") from None
        raise ValueError(f"it was sealed by reader key {str(signer)[:16]!r}, which is not configured here")


def reader_id(key: bytes) -> str:
    """The public id of a reader key: 16 hex digits of a domain-separated SHA-256 of it."""
    return hashlib.sha256(READER_ID_DOMAIN + key).hexdigest()[:16]


def _reader_mac(key: bytes, domain: bytes, body: dict[str, Any]) -> str:
    return hmac.new(key, domain + orjson.dumps(body, option=orjson.OPT_SORT_KEYS), hashlib.sha256).hexdigest()
