"""Encryption keys as a Prefect block, and the resolution of key references into keys.

Secret fields are SecretStr: the Prefect API stores them encrypted and the UI never shows
them. Flows receive the block's *name* (``key_block``) and load it inside the run, together
with the other references (key files, variable names) that :class:`burrow.keys.KeyRefs`
holds: this module turns those references into the keys a backup writes to
(:func:`backup_write_keys`) and the keyring a reader opens archives with (:func:`archive_keys`).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from pydantic import Field, SecretStr

from blocks.base import BurrowBlock
from burrow.crypto import ArchiveKeys
from burrow.errors import UsageError
from burrow.keys import (
    ENV_KEYRING,
    KeyRefs,
    Keyring,
    Passphrase,
    Recipient,
    SymmetricKey,
    WriteKeys,
    X25519Identity,
    key_from_env,
    load_recipients,
    parse_key_text,
    passphrase_from_env,
    read_key_file,
)


class EncryptionKeys(BurrowBlock):
    """Keys for Burrow archives.

    Backups encrypt to exactly one of ``key`` (symmetric), ``recipients`` (X25519 public keys)
    or ``passphrase``. Restores and verifies use ``key``, ``identities``, ``passphrase`` and
    ``retired_keys`` (keys that older archives were written with: key rotation).
    """

    _block_type_name: ClassVar[str] = "Burrow Encryption Keys"
    _block_type_slug: ClassVar[str] = "burrow-encryption-keys"
    _description: ClassVar[str] = "Keys that encrypt Burrow archives (backup) and open them (restore, verify)."

    key: SecretStr | None = Field(
        default=None, description="Current symmetric key (BURROW-SYMMETRIC-KEY:... as written by burrow keygen)"
    )
    recipients: list[str] = Field(
        default_factory=list, description="X25519 public keys (burrow-x25519:...) that backups encrypt to"
    )
    passphrase: SecretStr | None = Field(default=None, description="Passphrase (scrypt-stretched)")
    identities: list[SecretStr] = Field(
        default_factory=list, description="X25519 private keys (BURROW-X25519-SECRET-KEY:...) for restore"
    )
    retired_keys: list[SecretStr] = Field(
        default_factory=list, description="Older symmetric keys or identities, still accepted for restore"
    )

    def write_keys(self, name: str) -> list[WriteKeys]:
        """What a backup configured by this block encrypts to (one entry per configured mode)."""
        origin = f"encryption-keys block {name!r}"
        modes: list[WriteKeys] = []
        if self.key is not None:
            keys = parse_key_text(self.key.get_secret_value(), f"{origin} field key")
            sym = [k for k in keys if k.kind == "symmetric"]
            if not sym:
                raise UsageError(f"{origin}: field key holds no symmetric key")
            modes.append(WriteKeys("symmetric", [sym[0]], origin))
        if self.recipients:
            recips: list[Any] = []
            for r in self.recipients:
                recips += load_recipients(r)
            modes.append(WriteKeys("x25519", recips, origin))
        if self.passphrase is not None:
            try:
                modes.append(WriteKeys("passphrase", [Passphrase(self.passphrase.get_secret_value().encode())], origin))
            except ValueError as exc:
                raise UsageError(f"{origin}: {exc}") from None
        return modes

    def read_keys(self, name: str) -> Keyring:
        """Every key this block holds that can open an archive."""
        origin = f"encryption-keys block {name!r}"
        ring = Keyring()
        if self.key is not None:
            ring.add(parse_key_text(self.key.get_secret_value(), f"{origin} field key"))
        for i, s in enumerate(self.identities):
            ring.add(parse_key_text(s.get_secret_value(), f"{origin} identity #{i + 1}"))
        for i, s in enumerate(self.retired_keys):
            ring.add(parse_key_text(s.get_secret_value(), f"{origin} retired key #{i + 1}"))
        if self.passphrase is not None and self.passphrase.get_secret_value():
            ring.add([Passphrase(self.passphrase.get_secret_value().encode())])
        return ring


# ---------------------------------------------------------------------------- references


def load_key_block(name: str) -> EncryptionKeys:
    """The saved EncryptionKeys block ``name``; a usage error when there is none."""
    from blocks.localcopy import load_block  # refreshes the local copy; used when the API is down

    try:
        return load_block(name, [EncryptionKeys], "encryption-keys")
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"no saved encryption-keys block named {name!r}: {type(exc).__name__}") from None


def _write_keys_from(refs: KeyRefs, origin: str) -> WriteKeys | None:
    modes: list[WriteKeys] = []
    if refs.key_files or refs.key_env:
        keys: list[SymmetricKey | X25519Identity] = []
        for f in refs.key_files:
            keys += read_key_file(f)
        if refs.key_env:
            keys += key_from_env(refs.key_env)
        sym = [k for k in keys if isinstance(k, SymmetricKey)]
        if not sym:
            raise UsageError(
                "the key file holds no symmetric key; to encrypt to an X25519 key pass its public key with --recipient"
            )
        modes.append(WriteKeys("symmetric", [sym[0]], origin))  # the first key is the current one
    if refs.recipients:
        recips: list[Recipient] = []
        for r in refs.recipients:
            recips += load_recipients(r)
        uniq: dict[str, Recipient] = {}
        for r in recips:
            uniq.setdefault(r.fingerprint, r)
        modes.append(WriteKeys("x25519", list(uniq.values()), origin))
    if refs.passphrase_env:
        modes.append(WriteKeys("passphrase", [passphrase_from_env(refs.passphrase_env)], origin))
    if refs.block:
        b = load_key_block(refs.block)
        modes += b.write_keys(refs.block)
    if len(modes) > 1:
        raise UsageError(
            f"{origin} configures more than one way to encrypt ({', '.join(m.mode for m in modes)}); choose one"
        )
    return modes[0] if modes else None


def resolve_write_keys(refs: KeyRefs) -> WriteKeys | None:
    """The keys a backup encrypts to: the explicit references, else the BURROW_* environment.
    None when nothing is configured."""
    if refs.any():
        return _write_keys_from(refs, "the command line")
    return _write_keys_from(KeyRefs.from_env(writing=True), "the BURROW_* environment")


NO_KEY_MESSAGE = (
    "no encryption key is configured, so Burrow refuses to write the archive: pass --key-file PATH, "
    "--recipient PUBKEY or --passphrase-env VAR (or set BURROW_KEY_FILE, BURROW_RECIPIENTS, "
    "BURROW_PASSPHRASE_ENV or BURROW_KEY_BLOCK), or --no-encryption to write it unencrypted on purpose"
)


def backup_write_keys(encryption: bool, refs: KeyRefs) -> WriteKeys | None:
    """The keys a backup must encrypt to; None only when encryption was turned off explicitly."""
    if not encryption:
        if refs.any():
            raise UsageError("--no-encryption cannot be combined with a key, recipient, passphrase or key block")
        return None
    keys = resolve_write_keys(refs)
    if keys is None:
        raise UsageError(NO_KEY_MESSAGE)
    return keys


def resolve_keyring(refs: KeyRefs) -> Keyring:
    """The keys a reader holds: the explicit references (else the BURROW_* environment), plus
    the retired keys of $BURROW_KEYRING."""
    source = refs if refs.any() else KeyRefs.from_env(writing=False)
    ring = Keyring()
    for f in source.key_files + source.identity_files:
        ring.add(read_key_file(f))
    if source.key_env:
        ring.add(key_from_env(source.key_env))
    if source.passphrase_env:
        ring.add([passphrase_from_env(source.passphrase_env)])
    if source.block:
        held = load_key_block(source.block).read_keys(source.block)
        ring.add(held.keys)
        ring.add(held.passphrases)
    for f in os.environ.get(ENV_KEYRING, "").split(os.pathsep):
        if f.strip():
            ring.add(read_key_file(f))
    return ring




def archive_keys(
    key_files: list[str] | None = None,
    identity_files: list[str] | None = None,
    passphrase_env: str | None = None,
    key_env: str | None = None,
    key_block: str | None = None,
) -> ArchiveKeys:
    """The keyring named by flow parameters (paths, variable and block names) plus what the
    BURROW_* environment configures, ready to open whichever archive it meets."""
    return ArchiveKeys(resolve_keyring(KeyRefs(
        key_files=list(key_files or []), identity_files=list(identity_files or []),
        passphrase_env=passphrase_env, key_env=key_env, block=key_block,
    )))
