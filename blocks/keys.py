"""Encryption keys as a Prefect block, so deployments need no flags and no key files.

Secret fields are SecretStr: the Prefect API stores them encrypted and the UI never shows
them. Flows receive the block's *name* (``key_block``) and load it inside the run.
"""

from __future__ import annotations

from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from burrow.errors import UsageError
from burrow.keys import Keyring, Passphrase, WriteKeys, load_recipients, parse_key_text


class EncryptionKeys(Block):
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
