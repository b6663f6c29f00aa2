"""``burrow keygen``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from burrow.errors import (
    EXIT_OK,
)


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    k = sub.add_parser("keygen", help="create a symmetric key, or an X25519 key pair with --x25519")
    k.add_argument("--out", required=True, metavar="PATH", help="the new key file (created 0600; never overwritten)")
    k.add_argument("--x25519", action="store_true", help="make an X25519 key pair; the public key goes to PATH.pub")
    return {"keygen": cmd_keygen}


def cmd_keygen(args: argparse.Namespace) -> int:
    from pathlib import Path

    from burrow.keys import keygen

    out = Path(args.out).expanduser()
    facts = keygen(out, x25519=args.x25519)
    if facts["type"] == "x25519":
        print(f"wrote private key {out} (mode 0600) and public key {facts['public_file']}", file=sys.stderr)
        print(f"fingerprint: {facts['fingerprint']}")
        print(f"public key: {facts['public_key']}")
    else:
        print(f"wrote symmetric key {out} (mode 0600); keep it secret and back it up", file=sys.stderr)
        print(f"fingerprint: {facts['fingerprint']}")
    return EXIT_OK
