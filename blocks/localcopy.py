"""A local copy of the saved blocks Burrow has resolved, so that recovery never needs the
orchestrator.

Saved blocks (``dc-eu``, ``archives-eu``, an ``EncryptionKeys`` block, the ``MinIOCredentials``
an ``S3Store`` names) live in the Prefect API. In an outage that API may sit in the datacenter
that is down, and the on-call runbook names those blocks. So every load of a saved block by name
that succeeds also refreshes a copy of it under Burrow's home (``$BURROW_HOME/blocks/``, 0700; a
block nested in another, such as a store's credentials, is copied under its own name too, since
archive URLs name it: ``&credentials=minio-credentials/minio-eu``). When the Prefect API is
unreachable, names resolve from that copy, with one warning naming the copy's age.

**Secrets are never in plaintext on disk.** Each document (the block's fields, secrets included,
as Prefect would hand them to Burrow) is sealed with AES-256-GCM under the machine key, 32 random
bytes in ``$BURROW_HOME/local-copy.key`` (0600, made once), with the block type, name and the
time it was saved as associated data: a document moved to another name, type or age does not
open. Only the block type, name and save time are readable. Secrets a user keeps out of blocks
(``BURROW_ZK_PASSWORD``, ``CONSUL_HTTP_TOKEN``, the AWS environment) stay in the environment and
are never copied.

**Carrying it to another machine** (the on-call laptop): :func:`export_copy` writes every
document into one file sealed for a passphrase (scrypt) or X25519 recipients, with the stanzas of
``burrow/keys.py`` (the wrapping archives use); :func:`import_copy` opens it, checks it whole
(AES-GCM over the documents, the header as associated data: a tampered file is refused before
anything is written) and re-seals every document with the importing machine's key.

How the API is judged unreachable: the CLI says so when its dead-orchestrator probe fell back to
Burrow's local server (``api_unreachable``: the blocks were saved on the configured API, not on
the local one); otherwise the first name resolved in a process probes the configured API's
``/health`` (``BURROW_ORCHESTRATOR_TIMEOUT`` seconds, default 2: a dead API must not cost
Prefect's client retries), and a load that fails on the connection counts too.

This module sits in the blocks layer below ``resolve.py``, ``keys.py`` and ``s3.py``, which load
saved blocks through :func:`load_block`; it imports no block module (the caller passes the block
classes) and imports Prefect only to load from the API.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from burrow.errors import ArchiveError, PermanentError, UsageError
from burrow.home import burrow_home, private_dir
from burrow.keys import (
    Keyring,
    Passphrase,
    X25519Recipient,
    b64d,
    b64e,
    new_file_key,
    read_or_create_secret,
    write_secret_file,
)
from burrow.naming import age_text, redact_url
from burrow.runlog import logger

COPY_DIR = "blocks"
KEY_FILE = "local-copy.key"
COPY_VERSION = 1
_COPY_AD = b"burrow/v1/local-block\x00"
EXPORT_FORMAT = "burrow-blocks-export"
EXPORT_VERSION = 1
_EXPORT_INFO = b"burrow/v1/blocks-export"
#: An export larger than this is not one (a copy holds a few dozen small documents).
MAX_EXPORT_BYTES = 64 * 1024 * 1024
PROBE_TIMEOUT = 2.0
#: Keys of a dumped Prefect block that are its document's identity, not its configuration.
_META = ("_block_document_id", "_block_document_name", "_is_anonymous")


class BlockUnavailable(PermanentError):
    """A saved block is needed, the Prefect API is unreachable and the local copy does not hold it
    (a retry cannot make it appear: exit 1)."""


class LocalCopyError(PermanentError):
    """The local copy or an export could not be read, opened or written."""


# ------------------------------------------------------------------------------ where


def copy_dir() -> Path:
    """Where the sealed documents live (0700)."""
    return burrow_home() / COPY_DIR


def machine_key(create: bool = True) -> bytes | None:
    """This machine's key for the local copy: 32 random bytes in ``$BURROW_HOME/local-copy.key``
    (0600), created once and exclusively, so two commands never make two. ``None`` when there is
    none and ``create`` is false."""
    path = burrow_home() / KEY_FILE
    try:
        text = read_or_create_secret(path, lambda: b64e(os.urandom(32)) + "\n", create=create,
                                     before_create=lambda: private_dir(burrow_home()))
    except OSError as exc:
        raise LocalCopyError(f"cannot read {path} ({exc.strerror or exc})") from None
    if text is None:
        return None
    try:
        return b64d(text, 32, "the local copy's machine key")
    except ValueError as exc:
        raise LocalCopyError(f"{path}: {exc}; remove it (the local copy then refreshes on the next "
                             "successful run, or import an export)") from None


# ------------------------------------------------------------------------------ documents


@dataclass
class SavedBlock:
    """One block document of the copy: its block type slug, name, when it was copied from the
    API, and its fields (secrets included: only ever held in memory or sealed)."""

    type: str
    name: str
    saved: str  # ISO 8601 UTC, to the microsecond
    data: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.type}/{self.name}"

    def age(self, now: datetime | None = None) -> str:
        return age_text((now or datetime.now(UTC)) - datetime.fromisoformat(self.saved))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _file(slug: str, name: str) -> Path:
    """One file per document, named by a hash (a block name may hold any character)."""
    digest = hashlib.sha256(f"{slug}/{name}".encode()).hexdigest()[:32]
    return copy_dir() / f"{digest}.json"


def _ad(slug: str, name: str, saved: str) -> bytes:
    return _COPY_AD + b"\x00".join(s.encode() for s in (slug, name, saved))


def _seal(doc: SavedBlock, key: bytes) -> dict[str, Any]:
    nonce = os.urandom(12)
    body = json.dumps(doc.data, sort_keys=True).encode()
    sealed = AESGCM(key).encrypt(nonce, body, _ad(doc.type, doc.name, doc.saved))
    return {"version": COPY_VERSION, "type": doc.type, "name": doc.name, "saved": doc.saved,
            "nonce": b64e(nonce), "sealed": b64e(sealed)}


def _unseal(record: Any, key: bytes, label: str) -> SavedBlock:
    try:
        if not isinstance(record, dict) or record.get("version") != COPY_VERSION:
            raise ValueError("not a version-1 document")
        slug, name, saved = (str(record[k]) for k in ("type", "name", "saved"))
        datetime.fromisoformat(saved)
        nonce, sealed = b64d(record["nonce"], 12, "nonce"), b64d(record["sealed"], None, "sealed")
    except (KeyError, ValueError, TypeError) as exc:
        raise LocalCopyError(f"{label} is malformed ({exc})") from None
    try:
        data = json.loads(AESGCM(key).decrypt(nonce, sealed, _ad(slug, name, saved)))
    except InvalidTag:
        raise LocalCopyError(
            f"{label} does not open with this machine's key (tampered with, or copied from another machine: "
            "carry a copy with `burrow blocks export` and `burrow blocks import`)"
        ) from None
    if not isinstance(data, dict):
        raise LocalCopyError(f"{label} is malformed (not a block document)")
    return SavedBlock(slug, name, saved, data)


def write(doc: SavedBlock, key: bytes | None = None) -> None:
    """Seal ``doc`` with the machine key into the copy (atomically, 0600)."""
    key = key or machine_key()
    assert key is not None
    private_dir(copy_dir())
    path = _file(doc.type, doc.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_seal(doc, key), f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read(slug: str, name: str) -> SavedBlock | None:
    """The copy's document of block ``slug/name``; None when the copy does not hold it."""
    path = _file(slug, name)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LocalCopyError(f"the local copy of block {slug}/{name} ({path}) cannot be read: {exc}") from None
    key = machine_key(create=False)
    if key is None:
        raise LocalCopyError(f"the local copy under {copy_dir()} has no machine key ({burrow_home() / KEY_FILE})")
    doc = _unseal(record, key, f"the local copy of block {slug}/{name}")
    if (doc.type, doc.name) != (slug, name):
        raise LocalCopyError(f"the local copy of block {slug}/{name} holds another block")
    return doc


def documents() -> list[SavedBlock]:
    """Every document of the copy, opened (a document that does not open raises)."""
    key = machine_key(create=False)
    found: list[SavedBlock] = []
    directory = copy_dir()
    if key is None or not directory.is_dir():
        return found
    for path in sorted(directory.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise LocalCopyError(f"{path} cannot be read: {exc}") from None
        found.append(_unseal(record, key, f"the local copy's {path.name}"))
    return sorted(found, key=lambda d: d.ref)


def _named_documents(data: Any, saved: str) -> list[SavedBlock]:
    """The named (not anonymous) block documents in a dumped block, itself and nested ones."""
    found: list[SavedBlock] = []
    if isinstance(data, dict):
        slug, name = data.get("block_type_slug"), data.get("_block_document_name")
        if isinstance(slug, str) and isinstance(name, str) and name and not data.get("_is_anonymous") \
                and not name.startswith("anonymous-"):
            found.append(SavedBlock(slug, name, saved, data))
        for value in data.values():
            found += _named_documents(value, saved)
    elif isinstance(data, list):
        for value in data:
            found += _named_documents(value, saved)
    return found


def refresh(block: Any) -> int:
    """Copy a block just loaded from the API (and the named blocks nested in it) into the local
    copy; returns how many documents were written."""
    data = block.model_dump(mode="json", context={"include_secrets": True})
    docs = _named_documents(data, _now())
    if docs:
        key = machine_key()
        for doc in docs:
            write(doc, key)
    return len(docs)


def _strip(data: Any, top: bool = True) -> Any:
    """A dumped block's fields without its document identity (nested blocks keep their type slug,
    which tells a union of block types which one it is)."""
    if isinstance(data, dict):
        return {k: _strip(v, False) for k, v in data.items()
                if k not in _META and not (top and k == "block_type_slug")}
    if isinstance(data, list):
        return [_strip(v, False) for v in data]
    return data


def _name(block: Any, data: Any) -> None:
    """Give a rebuilt block (and its nested blocks) their document names back, as Prefect's load
    does: a store's URL names its credentials block by it."""
    if not isinstance(data, dict) or not hasattr(block, "_block_document_name"):
        return
    if data.get("_block_document_name"):
        block._block_document_name = data["_block_document_name"]
        block._is_anonymous = bool(data.get("_is_anonymous"))
    for field, value in data.items():
        if isinstance(value, dict) and "block_type_slug" in value:
            _name(getattr(block, field, None), value)


def slug_of(cls: type) -> str:
    """The block type slug of a Burrow block class or a Prefect block class."""
    get = getattr(cls, "get_block_type_slug", None)
    return get() if callable(get) else str(cls._block_type_slug)


def build(doc: SavedBlock, classes: Sequence[type]) -> Any:
    """The block ``doc`` describes, as an instance of the class of ``classes`` with its type
    (a Burrow block as its Prefect twin, as a load from the API returns it)."""
    for cls in classes:
        if slug_of(cls) == doc.type:
            target = cls.prefect_block() if hasattr(cls, "prefect_block") else cls
            block = target.model_validate(_strip(doc.data))
            _name(block, doc.data)
            return block
    raise ValueError(f"block {doc.ref} is not of the type asked for")


# ------------------------------------------------------------------------------ is the API there?

_lock = threading.RLock()
_unreachable: tuple[str, str] | None = None  # (redacted URL, cause) of the API that does not answer
#: Prefect now talks to Burrow's local server instead (the CLI fell back): it answers, and may hold
#: blocks saved on it, so a name the copy lacks is asked there
_local_api = False
_probed = False
_warned = False
_told: set[str] = set()  # blocks already taken from the copy in this process
_refreshed: set[str] = set()  # blocks already copied in this process


def api_unreachable(url: str, cause: str, local_api: bool = True) -> None:
    """The CLI found the configured Prefect API at ``url`` dead and runs on its local server
    instead (``local_api``): saved blocks live on the dead one, so names resolve from the copy."""
    global _unreachable, _probed, _local_api
    with _lock:
        _unreachable = (redact_url(url), cause)
        _probed = True
        _local_api = local_api


def reset() -> None:
    """Forget this process's view of the API and its warnings (tests)."""
    global _unreachable, _probed, _warned, _local_api
    with _lock:
        _unreachable, _probed, _warned, _local_api = None, False, False, False
        _told.clear()
        _refreshed.clear()


def _probe_timeout() -> float:
    try:
        return max(0.1, float(os.environ.get("BURROW_ORCHESTRATOR_TIMEOUT", PROBE_TIMEOUT)))
    except ValueError:
        return PROBE_TIMEOUT


def _configured_api() -> str | None:
    """The Prefect API this process's Prefect talks to (environment or profile)."""
    with contextlib.suppress(Exception):
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
        return str(url) if url else None
    return os.environ.get("PREFECT_API_URL") or None


def probe(url: str, timeout: float) -> str | None:
    """``None`` when the Prefect API at ``url`` answers ``/health`` (any answer below 500),
    else a short cause. The same judgement as the CLI's dead-orchestrator probe."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(redact_url(url).rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"it answered HTTP {exc.code}"
    except Exception as exc:  # noqa: BLE001 - every failure is a cause to name
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused"
        if isinstance(reason, TimeoutError):
            return f"no answer within {timeout:g} s"
        return getattr(reason, "strerror", None) or type(reason).__name__


def _unreachable_now() -> tuple[str, str] | None:
    """(URL, cause) when the Prefect API is known or found to be unreachable (probed once per process)."""
    global _unreachable, _probed
    with _lock:
        if not _probed:
            _probed = True
            url = _configured_api()
            if url:
                cause = probe(url, _probe_timeout())
                if cause:
                    _unreachable = (redact_url(url), cause)
        return _unreachable


def _connection_failure(exc: BaseException) -> str | None:
    """The cause when ``exc`` (or what caused it) is the Prefect API not answering."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        kind = type(e).__module__.split(".")[0]
        if kind in ("httpx", "httpcore") and ("Connect" in type(e).__name__ or "Timeout" in type(e).__name__
                                              or type(e).__name__ in ("RemoteProtocolError", "ReadError")):
            return {"ConnectError": "connection failed"}.get(type(e).__name__, type(e).__name__)
        e = e.__cause__ or e.__context__
    return None


# ------------------------------------------------------------------------------ loading by name


def _say(message: str, warning: bool) -> None:
    """A line for the person at the terminal: inside a run through its logger (the CLI shows it as
    a stage line or ``burrow: warning:``, and the run's logs keep it), else straight on stderr."""
    log = logger()
    if not isinstance(log, logging.Logger):
        (log.warning if warning else log.info)(message)
    elif warning:
        print(f"burrow: warning: {message}", file=sys.stderr, flush=True)


def _from_copy(name: str, classes: Sequence[type], down: tuple[str, str]) -> Any | None:
    """The block ``name`` rebuilt from the copy (one warning per process names its age), or None."""
    global _warned
    slug, _, bare = name.rpartition("/")
    wanted = [slug] if slug else [slug_of(c) for c in classes]
    for s in wanted:
        doc = read(s, bare)
        if doc is None:
            continue
        block = build(doc, classes)
        with _lock:
            first, _warned = not _warned, True
            told = doc.ref in _told
            _told.add(doc.ref)
        url, cause = down
        if first:
            _say(f"using the local copy of block {bare!r} saved {doc.age()} ago: the Prefect API at {url} is "
                 f"unreachable ({cause})", warning=True)
        elif not told:
            _say(f"using the local copy of block {bare!r} saved {doc.age()} ago", warning=False)
        return block
    return None


def _from_api(name: str, classes: Sequence[type]) -> Any:
    """Prefect's load: ``slug/name`` by its type slug, a bare name tried as each class in turn."""
    if "/" in name:
        from prefect.blocks.core import Block

        return Block.load(name)
    for cls in classes:
        try:
            return cls.load(name)
        except ValueError:
            continue
    raise ValueError(f"no saved block named {name!r} of the types asked for")


def _unavailable(name: str, what: str, down: tuple[str, str]) -> BlockUnavailable:
    url, cause = down
    return BlockUnavailable(
        f"the saved {what} block {name!r} cannot be read: the Prefect API at {url} is unreachable ({cause}) "
        f"and the local copy under {copy_dir()} does not hold it (the copy is refreshed by every run that "
        "resolves the block; `burrow blocks import FILE` brings one from another machine)"
    )


def load_block(name: str, classes: Sequence[type], what: str = "saved") -> Any:
    """The saved block ``name`` (``slug/name``, or a bare name tried as each of ``classes``).

    From the Prefect API when it answers, refreshing the local copy; from the copy when the API
    is unreachable. Raises ValueError (as Prefect's load does) when the API answers and holds no
    such block, and :class:`BlockUnavailable` when the API is unreachable and the copy does not
    hold it either."""
    down = _unreachable_now()
    if down is not None:
        try:
            block = _from_copy(name, classes, down)
        except LocalCopyError as exc:
            raise BlockUnavailable(f"{_unavailable(name, what, down)}: {exc}") from None
        if block is not None:
            return block
        if not _local_api:
            raise _unavailable(name, what, down)
        try:  # Prefect now talks to Burrow's local server, which answers: a block saved there
            block = _from_api(name, classes)
        except (ValueError, RuntimeError):
            raise _unavailable(name, what, down) from None
        except Exception as exc:  # noqa: BLE001 - a dead API: named, never "unexpected"
            if _connection_failure(exc) is None:
                raise
            raise _unavailable(name, what, down) from None
        return block
    try:
        block = _from_api(name, classes)
    except Exception as exc:  # noqa: BLE001 - only a connection failure is handled here
        cause = _connection_failure(exc)
        if cause is None:
            raise
        api_unreachable(_configured_api() or "?", cause, local_api=False)
        return load_block(name, classes, what)
    _refresh_once(block)
    return block


def _refresh_once(block: Any) -> None:
    """Refresh the copy of ``block`` once per process; a copy that cannot be written never fails
    the run that loaded the block (it is said once, as a warning)."""
    ref = f"{slug_of(type(block))}/{getattr(block, '_block_document_name', '')}"
    with _lock:
        if ref in _refreshed:
            return
        _refreshed.add(ref)
    try:
        refresh(block)
    except Exception as exc:  # noqa: BLE001 - the copy is a convenience for the next outage
        _say(f"could not refresh the local copy of block {ref} under {copy_dir()}: {type(exc).__name__}",
             warning=True)


# ------------------------------------------------------------------------------ export and import


def _export_key(file_key: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_EXPORT_INFO).derive(file_key)


def _header_ad(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def export_copy(path: Path, recipients: Sequence[Passphrase | X25519Recipient]) -> int:
    """Write every document of the local copy into ``path`` (created 0600, never overwriting),
    sealed for ``recipients`` (a passphrase, or X25519 public keys); returns the count."""
    if not recipients:
        raise UsageError("burrow blocks export needs --passphrase-env VAR or --recipient PUBKEY")
    docs = documents()
    if not docs:
        raise LocalCopyError(f"the local copy under {copy_dir()} is empty: run a command that names the saved "
                             "blocks (or `burrow blocks refresh NAME...`) while the Prefect API answers")
    file_key, salt, nonce = new_file_key(), os.urandom(32), os.urandom(12)
    header = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "created": _now(), "salt": b64e(salt),
              "stanzas": [r.wrap(file_key) for r in recipients]}
    body = json.dumps([{"type": d.type, "name": d.name, "saved": d.saved, "data": d.data} for d in docs]).encode()
    sealed = AESGCM(_export_key(file_key, salt)).encrypt(nonce, body, _header_ad(header))
    text = json.dumps({"header": header, "nonce": b64e(nonce), "sealed": b64e(sealed)}) + "\n"
    write_secret_file(Path(path), text, what="it")
    return len(docs)


def _open_export(path: Path, keyring: Keyring) -> list[SavedBlock]:
    label = f"the blocks export {path}"
    try:
        if path.stat().st_size > MAX_EXPORT_BYTES:
            raise LocalCopyError(f"{label} is larger than any export ({MAX_EXPORT_BYTES} bytes)")
        outer = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"{label} is not a blocks export ({type(exc).__name__})") from None
    try:
        header = outer["header"]
        if header.get("format") != EXPORT_FORMAT or header.get("version") != EXPORT_VERSION:
            raise ValueError("unknown format or version")
        stanzas = header["stanzas"]
        if not isinstance(stanzas, list) or not stanzas:
            raise ValueError("no stanzas")
        salt = b64d(header["salt"], 32, "salt")
        nonce, sealed = b64d(outer["nonce"], 12, "nonce"), b64d(outer["sealed"], None, "sealed")
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ArchiveError(f"{label} is not a blocks export ({exc})") from None
    file_key, _ = keyring.unwrap(stanzas, label)  # KeyMismatch / ArchiveError when no key opens it
    try:
        body = AESGCM(_export_key(file_key, salt)).decrypt(nonce, sealed, _header_ad(header))
    except InvalidTag:
        raise ArchiveError(f"{label} does not authenticate: it was tampered with or damaged; nothing imported") \
            from None
    try:
        docs = [SavedBlock(str(d["type"]), str(d["name"]), str(d["saved"]), d["data"]) for d in json.loads(body)]
        for d in docs:
            datetime.fromisoformat(d.saved)
            if not isinstance(d.data, dict) or not d.type or not d.name:
                raise ValueError("a document is malformed")
    except (KeyError, ValueError, TypeError) as exc:
        raise ArchiveError(f"{label} holds a malformed document ({exc})") from None
    return docs


def import_copy(path: Path, keyring: Keyring) -> tuple[int, int]:
    """Open the export ``path`` with ``keyring`` and re-seal its documents with this machine's
    key into the local copy. A document the copy holds a newer version of is kept as it is.
    Returns (imported, kept). Nothing is written unless the whole export authenticates."""
    docs = _open_export(path, keyring)
    key = machine_key()
    imported = kept = 0
    for doc in docs:
        try:
            mine = read(doc.type, doc.name)
        except LocalCopyError:
            mine = None  # one that does not open here is replaced
        if mine is not None and datetime.fromisoformat(mine.saved) > datetime.fromisoformat(doc.saved):
            kept += 1
            continue
        write(doc, key)
        imported += 1
    return imported, kept
