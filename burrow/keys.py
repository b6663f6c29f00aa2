"""Key material, fingerprints, stanzas and the keyring (see docs/ENCRYPTION.md).

Every archive body is encrypted under a fresh random 32-byte *file key*. The file key is
then wrapped once per recipient into a *stanza* stored in the archive header, age-style:

* ``symmetric``: a 32-byte secret key. The wrapping key is HKDF-SHA256(key, random salt),
  and the file key is sealed with AES-256-GCM under it (the salt makes every wrapping key
  single-use, so the all-zero nonce is safe).
* ``scrypt``: a passphrase. The wrapping key is scrypt(passphrase, random salt, N=2^log_n,
  r=8, p=1); the parameters and salt are in the stanza. A scrypt stanza is always alone.
* ``x25519``: a public key. An ephemeral X25519 key pair is made per stanza; the wrapping key
  is HKDF-SHA256(shared secret, salt = ephemeral share || recipient public key). Only the
  holder of the matching private key (the *identity*) can unwrap; the writer cannot.

A stanza carries the key's fingerprint and public parameters only, never key material.
Fingerprints are the first 16 bytes of SHA-256 over a domain-separated encoding of the key
(its public half for X25519), in hex.

The text forms are one line each, so a key file (or a keyring file) may hold several keys::

    BURROW-SYMMETRIC-KEY:<base64url, 32 bytes>
    BURROW-X25519-SECRET-KEY:<base64url, 32 bytes>
    burrow-x25519:<base64url, 32 bytes>            (a public key: safe to share)

Where the keys come from is described by *references* (:class:`KeyRefs`: paths, variable names,
block names) so that flow parameters never hold key material; ``blocks/keys.py`` turns them into
keys, because one kind of reference is a saved Prefect block. Messages name paths, variable
names and fingerprints only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from burrow.errors import ArchiveError, KeyMismatch, UsageError

log = logging.getLogger("burrow.keys")

KEY_LEN = 32
FILE_KEY_LEN = 32
SYMMETRIC_PREFIX = "BURROW-SYMMETRIC-KEY:"
IDENTITY_PREFIX = "BURROW-X25519-SECRET-KEY:"
RECIPIENT_PREFIX = "burrow-x25519:"
ZERO_NONCE = b"\x00" * 12

SCRYPT_LOG_N = 17  # 128 MiB, about a second: OWASP's minimum for scrypt
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MIN_LOG_N = 10
SCRYPT_MAX_LOG_N = 18  # a header someone else wrote costs at most 256 MiB and ~2 s per archive (writers use 17)
MAX_STANZAS = 64
#: The context of the reader key (:meth:`SymmetricKey.reader_key` and the like): what rehearsal
#: markers and failover journal records are MACed with.
READER_MAC_INFO = b"burrow/v1/reader-mac"
#: The scrypt cost of a passphrase's reader key: fixed (every holder must derive the same key),
#: and as costly as a writer's stanza, so a MACed record is no cheap oracle for guessing it.
READER_SCRYPT_LOG_N = SCRYPT_LOG_N

#: Environment variables that configure encryption when no flag, parameter or block does.
ENV_KEY_FILE = "BURROW_KEY_FILE"
ENV_KEY = "BURROW_KEY"
ENV_RECIPIENTS = "BURROW_RECIPIENTS"
ENV_IDENTITY_FILE = "BURROW_IDENTITY_FILE"
ENV_PASSPHRASE_ENV = "BURROW_PASSPHRASE_ENV"
ENV_KEY_BLOCK = "BURROW_KEY_BLOCK"
ENV_KEYRING = "BURROW_KEYRING"


# ---------------------------------------------------------------------------- encodings


def b64e(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str, length: int | None = None, what: str = "value") -> bytes:
    """Decode base64url (padding optional); raise ValueError on anything else."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", text):
        raise ValueError(f"{what} is not base64url")
    stripped = text.rstrip("=")
    try:
        data = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64url") from None
    if b64e(data) != stripped:
        raise ValueError(f"{what} is not canonical base64url")
    if length is not None and len(data) != length:
        raise ValueError(f"{what} has the wrong length")
    return data


def _fingerprint(kind: str, material: bytes) -> str:
    return hashlib.sha256(b"burrow/fingerprint/v1\x00" + kind.encode() + b"\x00" + material).digest()[:16].hex()


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _stanza_ad(kind: str, fingerprint: str) -> bytes:
    return b"burrow/v1/stanza\x00" + kind.encode() + b"\x00" + fingerprint.encode()


def new_file_key() -> bytes:
    """A fresh random per-archive data key."""
    return os.urandom(FILE_KEY_LEN)


# ---------------------------------------------------------------------------- key types


class SymmetricKey:
    """A 32-byte secret key: wraps (for backup) and unwraps (for restore)."""

    kind = "symmetric"

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise ValueError("a symmetric key is exactly 32 bytes")
        self._key = bytes(key)
        self.fingerprint = _fingerprint("symmetric", self._key)

    @classmethod
    def generate(cls) -> SymmetricKey:
        return cls(os.urandom(KEY_LEN))

    def __repr__(self) -> str:
        return f"SymmetricKey(fingerprint={self.fingerprint})"

    def to_text(self) -> str:
        """The secret text form (only ever written to a 0600 file or a SecretStr)."""
        return SYMMETRIC_PREFIX + b64e(self._key)

    def describe(self) -> str:
        return f"symmetric key {self.fingerprint}"

    def reader_key(self) -> bytes:
        """The key this secret key MACs reader records with (rehearsal markers, the failover
        journal): HKDF-SHA256 under its own context, so it equals no wrapping key."""
        return _hkdf(self._key, b"", READER_MAC_INFO)

    def wrap(self, file_key: bytes) -> dict[str, Any]:
        salt = os.urandom(16)
        kek = _hkdf(self._key, salt, b"burrow/v1/wrap/symmetric")
        body = AESGCM(kek).encrypt(ZERO_NONCE, file_key, _stanza_ad(self.kind, self.fingerprint))
        return {"type": self.kind, "fingerprint": self.fingerprint, "salt": b64e(salt), "body": b64e(body)}

    def unwrap(self, stanza: dict[str, Any], label: str) -> bytes:
        try:
            salt = b64d(stanza.get("salt"), 16, "salt")
            body = b64d(stanza.get("body"), FILE_KEY_LEN + 16, "body")
        except ValueError as exc:
            raise ArchiveError(f"{label} has a malformed symmetric-key stanza ({exc})") from None
        kek = _hkdf(self._key, salt, b"burrow/v1/wrap/symmetric")
        try:
            return AESGCM(kek).decrypt(ZERO_NONCE, body, _stanza_ad(self.kind, self.fingerprint))
        except InvalidTag:
            raise ArchiveError(
                f"{label}: the header stanza for symmetric key {self.fingerprint} does not open with that key "
                "(header corrupt or tampered)"
            ) from None


class X25519Recipient:
    """A public key: backup workers encrypt to it and cannot decrypt what they wrote."""

    kind = "x25519"

    def __init__(self, public: bytes) -> None:
        if len(public) != KEY_LEN:
            raise ValueError("an X25519 public key is exactly 32 bytes")
        self.public = bytes(public)
        self._key = X25519PublicKey.from_public_bytes(self.public)
        self.fingerprint = _fingerprint("x25519", self.public)

    def __repr__(self) -> str:
        return f"X25519Recipient({self.to_text()})"

    def to_text(self) -> str:
        return RECIPIENT_PREFIX + b64e(self.public)

    def describe(self) -> str:
        return f"X25519 key {self.fingerprint}"

    def wrap(self, file_key: bytes) -> dict[str, Any]:
        eph = X25519PrivateKey.generate()
        share = eph.public_key().public_bytes_raw()
        shared = eph.exchange(self._key)
        kek = _hkdf(shared, share + self.public, b"burrow/v1/wrap/x25519")
        body = AESGCM(kek).encrypt(ZERO_NONCE, file_key, _stanza_ad(self.kind, self.fingerprint))
        return {"type": self.kind, "fingerprint": self.fingerprint, "share": b64e(share), "body": b64e(body)}


class X25519Identity:
    """An X25519 private key: unwraps the stanzas made for its public key."""

    kind = "x25519"

    def __init__(self, private: bytes) -> None:
        if len(private) != KEY_LEN:
            raise ValueError("an X25519 private key is exactly 32 bytes")
        self._key = X25519PrivateKey.from_private_bytes(bytes(private))
        self.recipient = X25519Recipient(self._key.public_key().public_bytes_raw())
        self.fingerprint = self.recipient.fingerprint

    @classmethod
    def generate(cls) -> X25519Identity:
        return cls(X25519PrivateKey.generate().private_bytes_raw())

    def __repr__(self) -> str:
        return f"X25519Identity(fingerprint={self.fingerprint})"

    def to_text(self) -> str:
        return IDENTITY_PREFIX + b64e(self._key.private_bytes_raw())

    def describe(self) -> str:
        return f"X25519 key {self.fingerprint}"

    def reader_key(self) -> bytes:
        """The reader-record MAC key of this identity: HKDF-SHA256 of the *private* key, which
        a backup worker holding only the public key cannot compute."""
        return _hkdf(self._key.private_bytes_raw(), b"", READER_MAC_INFO)

    def unwrap(self, stanza: dict[str, Any], label: str) -> bytes:
        try:
            share = b64d(stanza.get("share"), KEY_LEN, "share")
            body = b64d(stanza.get("body"), FILE_KEY_LEN + 16, "body")
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(share))
        except ValueError as exc:  # includes low-order points (all-zero shared secret)
            raise ArchiveError(f"{label} has a malformed X25519 stanza ({exc})") from None
        kek = _hkdf(shared, share + self.recipient.public, b"burrow/v1/wrap/x25519")
        try:
            return AESGCM(kek).decrypt(ZERO_NONCE, body, _stanza_ad(self.kind, self.fingerprint))
        except InvalidTag:
            raise ArchiveError(
                f"{label}: the header stanza for X25519 key {self.fingerprint} does not open with that key "
                "(header corrupt or tampered)"
            ) from None


class Passphrase:
    """A passphrase, stretched with scrypt (parameters and salt live in the stanza)."""

    kind = "scrypt"
    fingerprint = ""

    def __init__(self, passphrase: bytes, log_n: int = SCRYPT_LOG_N) -> None:
        if not passphrase:
            raise ValueError("the passphrase is empty")
        if not SCRYPT_MIN_LOG_N <= log_n <= SCRYPT_MAX_LOG_N:
            raise ValueError(f"scrypt log_n must be between {SCRYPT_MIN_LOG_N} and {SCRYPT_MAX_LOG_N}")
        self._passphrase = bytes(passphrase)
        self.log_n = log_n

    def __repr__(self) -> str:
        return "Passphrase(***)"

    def describe(self) -> str:
        return "a passphrase"

    def reader_key(self) -> bytes:
        """The reader-record MAC key of this passphrase: scrypt with a fixed salt and the
        writers' cost (a MACed record must not make guessing the passphrase cheap), computed
        once per process and passphrase."""
        digest = hashlib.sha256(b"burrow/v1/reader-cache\x00" + self._passphrase).digest()
        key = _READER_CACHE.get(digest)
        if key is None:
            kdf = Scrypt(salt=READER_MAC_INFO, length=32, n=1 << READER_SCRYPT_LOG_N, r=SCRYPT_R, p=SCRYPT_P)
            key = _READER_CACHE[digest] = kdf.derive(self._passphrase)
        return key

    @staticmethod
    def _kek(passphrase: bytes, salt: bytes, log_n: int) -> bytes:
        kdf = Scrypt(salt=b"burrow/v1/scrypt\x00" + salt, length=32, n=1 << log_n, r=SCRYPT_R, p=SCRYPT_P)
        return kdf.derive(passphrase)

    def wrap(self, file_key: bytes) -> dict[str, Any]:
        salt = os.urandom(16)
        kek = self._kek(self._passphrase, salt, self.log_n)
        body = AESGCM(kek).encrypt(ZERO_NONCE, file_key, _stanza_ad(self.kind, ""))
        return {
            "type": self.kind, "kdf": "scrypt", "log_n": self.log_n, "r": SCRYPT_R, "p": SCRYPT_P,
            "salt": b64e(salt), "body": b64e(body),
        }

    def unwrap(self, stanza: dict[str, Any], label: str) -> bytes | None:
        """The file key, or None when this passphrase is not the right one."""
        log_n, r, p = stanza.get("log_n"), stanza.get("r"), stanza.get("p")
        if (
            type(log_n) is not int or not SCRYPT_MIN_LOG_N <= log_n <= SCRYPT_MAX_LOG_N
            or r != SCRYPT_R or type(r) is not int or p != SCRYPT_P or type(p) is not int
            or stanza.get("kdf") != "scrypt"
        ):
            raise ArchiveError(f"{label} has a scrypt stanza with unsupported or unsafe parameters")
        try:
            salt = b64d(stanza.get("salt"), 16, "salt")
            body = b64d(stanza.get("body"), FILE_KEY_LEN + 16, "body")
        except ValueError as exc:
            raise ArchiveError(f"{label} has a malformed scrypt stanza ({exc})") from None
        kek = self._kek(self._passphrase, salt, log_n)
        try:
            return AESGCM(kek).decrypt(ZERO_NONCE, body, _stanza_ad(self.kind, ""))
        except InvalidTag:
            return None


#: Passphrase reader keys already derived in this process (by a digest of the passphrase).
_READER_CACHE: dict[bytes, bytes] = {}

Recipient = SymmetricKey | X25519Recipient | Passphrase
Identity = SymmetricKey | X25519Identity | Passphrase


# ---------------------------------------------------------------------------- parsing


def parse_key_text(text: str, origin: str) -> list[SymmetricKey | X25519Identity]:
    """Every secret key in a key file's text (comments and blank lines ignored)."""
    keys: list[SymmetricKey | X25519Identity] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if line.startswith(SYMMETRIC_PREFIX):
                keys.append(SymmetricKey(b64d(line[len(SYMMETRIC_PREFIX) :], KEY_LEN, "key")))
            elif line.startswith(IDENTITY_PREFIX):
                keys.append(X25519Identity(b64d(line[len(IDENTITY_PREFIX) :], KEY_LEN, "key")))
            elif re.fullmatch(r"[0-9a-fA-F]{64}", line):
                keys.append(SymmetricKey(bytes.fromhex(line)))
            elif line.startswith(RECIPIENT_PREFIX):
                raise ValueError("this is a public key; restore needs the private key (identity)")
            else:
                raise ValueError("not a Burrow key")
        except ValueError as exc:
            raise UsageError(f"{origin}, line {n}: {exc}") from None
    if not keys:
        raise UsageError(f"{origin} holds no Burrow key")
    return keys


def read_key_file(path: str | os.PathLike[str]) -> list[SymmetricKey | X25519Identity]:
    """Read a key file: text lines as written by ``burrow keygen``, or exactly 32 raw bytes."""
    p = Path(path).expanduser()
    origin = f"key file {p}"
    try:
        data = p.read_bytes()
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"{origin} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read {origin}: {exc.strerror}") from None
    if stat.S_IMODE(mode) & 0o077:
        log.warning("%s is readable by group or others (mode %o); chmod 600 it", origin, stat.S_IMODE(mode))
    if len(data) == KEY_LEN:
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            return [SymmetricKey(data)]
        if not text.strip() or not any(c.isalnum() for c in text):
            return [SymmetricKey(data)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{origin} is neither a Burrow key file nor 32 raw bytes") from None
    return parse_key_text(text, origin)


def parse_recipient(text: str) -> X25519Recipient:
    """A public key in text form."""
    t = text.strip()
    if not t.startswith(RECIPIENT_PREFIX):
        raise ValueError(f"a recipient is a public key starting {RECIPIENT_PREFIX!r}")
    return X25519Recipient(b64d(t[len(RECIPIENT_PREFIX) :], KEY_LEN, "public key"))


def load_recipients(ref: str) -> list[X25519Recipient]:
    """A public key given inline, or a file of public keys (one per line, # comments)."""
    ref = ref.strip()
    if ref.startswith(RECIPIENT_PREFIX):
        try:
            return [parse_recipient(ref)]
        except ValueError as exc:
            raise UsageError(f"bad recipient public key: {exc}") from None
    if ref.startswith((SYMMETRIC_PREFIX, IDENTITY_PREFIX)):
        raise UsageError("--recipient takes a public key or a file of public keys, never a secret key")
    p = Path(ref).expanduser()
    if not p.is_file():
        raise UsageError(f"recipient {ref!r} is neither a public key ({RECIPIENT_PREFIX}...) nor a readable file")
    out = []
    for n, raw in enumerate(p.read_text(errors="replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append(parse_recipient(line))
        except ValueError as exc:
            raise UsageError(f"recipients file {p}, line {n}: {exc}") from None
    if not out:
        raise UsageError(f"recipients file {p} holds no public key")
    return out


def _env_value(var: str | None, flag: str, what: str) -> str:
    """The value of the environment variable a ``--...-env`` flag names. A user may type the
    secret itself by mistake, so no message quotes what was given."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var or ""):
        raise UsageError(f"{flag} takes the name of an environment variable holding {what}; "
                         "what was given is not one (it is not shown, in case it is the secret itself)")
    value = os.environ.get(var or "")
    if not value:
        raise UsageError(f"the environment variable named by {flag} (holding {what}) is not set or empty "
                         "(its name is not shown, in case it is the secret itself)")
    return value


def passphrase_from_env(var: str) -> Passphrase:
    """The passphrase held in environment variable ``var`` (the name, never the value, is passed around)."""
    return Passphrase(_env_value(var, "--passphrase-env", "the passphrase").encode("utf-8"))


def key_from_env(var: str) -> list[SymmetricKey | X25519Identity]:
    """The key(s) held in environment variable ``var`` (text form or 64 hex digits)."""
    return parse_key_text(_env_value(var, "--key-env", "a key"), "the environment variable named by --key-env")


# ---------------------------------------------------------------------------- keyring


@dataclass
class Keyring:
    """The keys a reader holds: current and retired symmetric keys, X25519 identities and
    passphrases. An archive's stanzas are matched by fingerprint (passphrases are tried)."""

    keys: list[SymmetricKey | X25519Identity] = field(default_factory=list)
    passphrases: list[Passphrase] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Keyring(fingerprints={self.fingerprints()}, passphrases={len(self.passphrases)})"

    def add(self, items: Iterable[Identity]) -> None:
        for k in items:
            if isinstance(k, Passphrase):
                self.passphrases.append(k)
            elif all((k.kind, k.fingerprint) != (h.kind, h.fingerprint) for h in self.keys):
                self.keys.append(k)

    def fingerprints(self) -> list[str]:
        return [k.fingerprint for k in self.keys]

    def __bool__(self) -> bool:
        return bool(self.keys or self.passphrases)

    def unwrap(self, stanzas: list[dict[str, Any]], label: str) -> tuple[bytes, str]:
        """Return (file key, description of the key that opened it) or raise KeyMismatch."""
        needed: list[str] = []
        tried_passphrase = False
        for st in stanzas:
            kind = st.get("type")
            if kind in ("symmetric", "x25519"):
                fp = st.get("fingerprint")
                if not isinstance(fp, str) or not re.fullmatch(r"[0-9a-f]{32}", fp):
                    raise ArchiveError(f"{label} has a stanza with a malformed fingerprint")
                needed.append(f"{'symmetric' if kind == 'symmetric' else 'X25519'} key {fp}")
                for k in self.keys:
                    if k.kind == kind and k.fingerprint == fp:
                        return k.unwrap(st, label), k.describe()
            elif kind == "scrypt":
                needed.append("a passphrase")
                for p in self.passphrases:
                    tried_passphrase = True
                    file_key = p.unwrap(st, label)
                    if file_key is not None:
                        return file_key, "passphrase"
            else:
                needed.append(f"a key of unknown type {str(kind)[:20]!r}")
        held = ", ".join(self.fingerprints()) or "none"
        if tried_passphrase and needed == ["a passphrase"]:
            raise KeyMismatch(f"{label} is protected by a passphrase and the one given is wrong")
        hint = (
            "pass --passphrase-env VAR (flow parameter passphrase_env)" if needed == ["a passphrase"]
            else ("pass --key-file, --identity or --passphrase-env (flow parameters key_files, identity_files, "
                  "passphrase_env or key_block), or add the key to the keyring")
        )
        raise KeyMismatch(
            f"{label} is encrypted for {' or '.join(needed)}; no configured key matches "
            f"(configured: {held}{' + passphrase' if self.passphrases else ''}); {hint}"
        )


# ---------------------------------------------------------------------------- references


@dataclass
class KeyRefs:
    """Where keys come from: paths, environment variable names and block names only.

    These are safe to pass as flow parameters; the keys themselves are read inside the run.
    """

    key_files: list[str] = field(default_factory=list)
    key_env: str | None = None
    recipients: list[str] = field(default_factory=list)
    identity_files: list[str] = field(default_factory=list)
    passphrase_env: str | None = None
    block: str | None = None

    def any(self) -> bool:
        return bool(
            self.key_files or self.key_env or self.recipients or self.identity_files
            or self.passphrase_env or self.block
        )

    @classmethod
    def from_env(cls, *, writing: bool) -> KeyRefs:
        """The references configured by BURROW_* environment variables."""
        env = os.environ

        def paths(var: str) -> list[str]:
            return [p for p in env.get(var, "").split(os.pathsep) if p.strip()]

        refs = cls(
            key_files=paths(ENV_KEY_FILE),
            key_env=ENV_KEY if env.get(ENV_KEY) else None,
            passphrase_env=env.get(ENV_PASSPHRASE_ENV) or None,
            block=env.get(ENV_KEY_BLOCK) or None,
        )
        if writing:
            refs.recipients = [r for r in re.split(r"[\s,]+", env.get(ENV_RECIPIENTS, "")) if r]
        else:
            refs.identity_files = paths(ENV_IDENTITY_FILE)
        return refs


@dataclass
class WriteKeys:
    """What a backup encrypts to: one mode, one or more recipients."""

    mode: str
    recipients: list[Recipient]
    origin: str

    def fingerprints(self) -> list[str]:
        return [r.fingerprint for r in self.recipients if r.fingerprint]

    def can_decrypt(self) -> bool:
        """True unless the writer holds public keys only."""
        return self.mode != "x25519"

    def keyring(self) -> Keyring:
        """A keyring that opens what these keys wrote (empty for public-key recipients)."""
        ring = Keyring()
        if self.can_decrypt():
            ring.add(r for r in self.recipients if not isinstance(r, X25519Recipient))
        return ring


# ---------------------------------------------------------------------------- keygen


def _create_secret(path: Path, text: str) -> None:
    """Create ``path`` exclusively with mode 0600 and ``text`` in it, synced to disk; raises
    FileExistsError when it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o600)  # in case the umask or filesystem widened it


def write_secret_file(path: Path, text: str, what: str = "a key") -> None:
    """Create ``path`` with mode 0600; refuse to overwrite anything."""
    try:
        _create_secret(path, text)
    except FileExistsError:
        raise UsageError(f"{path} already exists; refusing to overwrite {what}") from None
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from None


def read_or_create_secret(path: Path, make: Callable[[], str], *, create: bool = True,
                          before_create: Callable[[], None] | None = None) -> str | None:
    """The text of the secret file ``path``, stripped; when it does not exist (and ``create``),
    first made once from ``make()`` (``before_create`` runs before, e.g. to make its directory
    private), created exclusively and 0600, so two processes never write two different
    secrets: the second reads the first's. A file whose mode lets anyone but its owner read it
    is set back to 0600. ``None`` when there is none and ``create`` is false."""
    for _ in range(2):
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            if not create:
                return None
            if before_create is not None:
                before_create()
            try:
                _create_secret(path, make())
            except FileExistsError:
                pass  # another process made it meanwhile: read theirs
            continue
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        return text
    raise OSError(f"cannot read {path}")


def keygen(out: Path, *, x25519: bool) -> dict[str, str]:
    """Create a symmetric key (or an X25519 key pair) at ``out``; return its public facts."""
    out = out.expanduser()
    pub_path = out.with_name(out.name + ".pub")
    if out.exists():
        raise UsageError(f"{out} already exists; refusing to overwrite a key")
    if x25519 and pub_path.exists():
        raise UsageError(f"{pub_path} already exists; refusing to overwrite it")
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if x25519:
        ident = X25519Identity.generate()
        public = ident.recipient.to_text()
        write_secret_file(
            out,
            f"# Burrow X25519 identity (private key), created {created}\n"
            f"# public key: {public}\n# fingerprint: {ident.fingerprint}\n{ident.to_text()}\n",
        )
        try:
            fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot create {pub_path}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(public + "\n")
        return {"type": "x25519", "public_key": public, "fingerprint": ident.fingerprint, "public_file": str(pub_path)}
    key = SymmetricKey.generate()
    write_secret_file(
        out, f"# Burrow symmetric key, created {created}\n# fingerprint: {key.fingerprint}\n{key.to_text()}\n"
    )
    return {"type": "symmetric", "fingerprint": key.fingerprint}
