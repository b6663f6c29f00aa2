"""``burrow verify``: re-read an archive and check it."""

from __future__ import annotations

import argparse
from typing import Any

from burrow.cli.common import (
    add_read_keys,
    keyring,
    read_refs,
)
from burrow.errors import (
    EXIT_OK,
)


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    v = sub.add_parser("verify", help="re-read an archive and check manifest, checksums and counts")
    v.add_argument("archive")
    v.add_argument(
        "--structure-only", action="store_true",
        help="check framing, sizes and the body SHA-256 without a key (nothing decrypted or authenticated)",
    )
    add_read_keys(v)
    v.add_argument(
        "--allow-unencrypted", action="store_true",
        help="read an unencrypted archive even though read keys are configured (by default it is refused: "
        "anyone who can write to the store could have planted it)",
    )
    return {"verify": cmd_verify}


def cmd_verify(args: argparse.Namespace) -> int:
    from blocks.resolve import archive_from_ref

    archive_from_ref(args.archive)
    refs = read_refs(args)
    if not args.structure_only:
        keyring(refs)
    from flows.verify import verify

    summary = verify(
        archive=args.archive, structure_only=args.structure_only, allow_unencrypted=args.allow_unencrypted, **refs
    )
    if args.structure_only:
        print(
            f"ok (structure only: nothing decrypted, manifest not authenticated): {summary['url']}: "
            f"body sha256 and sizes match"
        )
        return EXIT_OK
    enc = f", decrypted with {summary['decrypted_with']}" if summary.get("decrypted_with") else ""
    print(f"ok: {summary['url']}: {summary['keys']} keys, content sha256 {summary['content_sha256']}{enc}")
    return EXIT_OK
