"""``burrow blocks list|refresh|export|import``: the local copy of saved blocks (blocks/localcopy.py).

Every run that resolves a saved block by name refreshes its copy under ``$BURROW_HOME/blocks``,
sealed with this machine's key, and names resolve from that copy when the Prefect API is
unreachable. These commands prepare for that day: ``refresh`` copies saved blocks now,
``export`` seals the whole copy into one file for a passphrase or X25519 recipients, and
``import`` opens such a file on another machine (the on-call laptop) and re-seals it with that
machine's key. Nothing here prints a secret: documents are named by block type and name.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from burrow.errors import EXIT_OK, UsageError

#: Block types ``refresh`` copies when given no names: Burrow's own, and the credentials blocks
#: an S3 store names.
CREDENTIAL_SLUGS = ("aws-credentials", "minio-credentials")


def register(sub: Any) -> dict[str, Any]:
    """Add ``burrow blocks`` to ``sub``; return its handler by name."""
    b = sub.add_parser(
        "blocks", help="the local copy of saved blocks, used when the Prefect API is unreachable",
        description="Saved blocks are copied under $BURROW_HOME/blocks (sealed with this machine's key) by every "
        "run that resolves them, and resolve from there when the Prefect API is unreachable.",
    )
    actions = b.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("list", help="the blocks in the local copy and when each was copied")
    ls.add_argument("--json", action="store_true")
    r = actions.add_parser("refresh", help="copy saved blocks from the Prefect API now (default: every block of "
                           "Burrow's types and every AWS/MinIO credentials block)")
    r.add_argument("names", nargs="*", metavar="NAME", help="block names (or type-slug/name)")
    e = actions.add_parser("export", help="seal the local copy into FILE (0600) for a passphrase or recipients")
    e.add_argument("file")
    e.add_argument("--passphrase-env", metavar="VAR", help="seal with the passphrase held in environment variable VAR")
    e.add_argument("--recipient", action="append", default=[], metavar="PUBKEY_OR_FILE",
                   help="seal for this X25519 public key (or file of them); repeatable")
    i = actions.add_parser("import", help="open FILE (from burrow blocks export) into this machine's local copy")
    i.add_argument("file")
    i.add_argument("--passphrase-env", metavar="VAR", help="the passphrase is in environment variable VAR")
    i.add_argument("--identity", action="append", default=[], metavar="PRIVATE_KEY_FILE",
                   help="an X25519 private key file (repeatable)")
    return {"blocks": cmd_blocks}


def cmd_blocks(args: argparse.Namespace) -> int:
    """``burrow blocks ACTION``."""
    return {"list": _list, "refresh": _refresh, "export": _export, "import": _import}[args.action](args)


def _list(args: argparse.Namespace) -> int:
    from blocks.localcopy import copy_dir, documents

    now = datetime.now(UTC)
    docs = documents()
    if args.json:
        print(json.dumps({"copy": str(copy_dir()), "blocks": [
            {"type": d.type, "name": d.name, "saved": d.saved,
             "age_s": int((now - datetime.fromisoformat(d.saved)).total_seconds())} for d in docs
        ]}, indent=2))
        return EXIT_OK
    if not docs:
        print(f"the local copy under {copy_dir()} is empty")
    for d in docs:
        print(f"{d.ref}  saved {d.saved} ({d.age(now)} ago)")
    return EXIT_OK


def _refresh(args: argparse.Namespace) -> int:
    from prefect_aws import AwsCredentials, MinIOCredentials

    from blocks.localcopy import load_block
    from blocks.registry import block_classes, register_twins

    twins = register_twins()
    classes: list[type] = [*block_classes(), AwsCredentials, MinIOCredentials]
    names = list(args.names) or _saved_names(twins)
    for name in names:
        block = load_block(name, classes, "saved")
        print(f"copied {type(block).get_block_type_slug()}/{getattr(block, '_block_document_name', name)}")
    return EXIT_OK


def _saved_names(twins: list[type]) -> list[str]:
    """``slug/name`` of every saved block of Burrow's types and the credentials types."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    slugs = [t.get_block_type_slug() for t in twins] + list(CREDENTIAL_SLUGS)
    names: list[str] = []
    page = 200
    with get_client(sync_client=True) as client:
        for slug in slugs:
            offset = 0
            while True:
                try:
                    docs = client.read_block_documents_by_type(slug, offset=offset, limit=page, include_secrets=False)
                except (ObjectNotFound, httpx.HTTPStatusError) as exc:  # a block type that server never had
                    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code != 404:
                        raise
                    break
                names += [f"{slug}/{d.name}" for d in docs if d.name and not d.is_anonymous]
                if len(docs) < page:
                    break
                offset += page
    return sorted(set(names))


def _export(args: argparse.Namespace) -> int:
    from blocks.localcopy import export_copy
    from burrow.keys import load_recipients, passphrase_from_env

    if bool(args.passphrase_env) == bool(args.recipient):
        raise UsageError("burrow blocks export needs exactly one of --passphrase-env VAR or --recipient PUBKEY")
    recipients: list[Any] = [passphrase_from_env(args.passphrase_env)] if args.passphrase_env else []
    for r in args.recipient:
        recipients += load_recipients(r)
    count = export_copy(Path(args.file).expanduser(), recipients)
    print(f"exported {count} blocks to {args.file} (0600; sealed for "
          f"{'a passphrase' if args.passphrase_env else f'{len(recipients)} recipient(s)'})")
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    from blocks.localcopy import copy_dir, import_copy
    from burrow.keys import Keyring, passphrase_from_env, read_key_file

    if not args.passphrase_env and not args.identity:
        raise UsageError("burrow blocks import needs --passphrase-env VAR or --identity PRIVATE_KEY_FILE")
    ring = Keyring()
    if args.passphrase_env:
        ring.add([passphrase_from_env(args.passphrase_env)])
    for f in args.identity:
        ring.add(read_key_file(f))
    imported, kept = import_copy(Path(args.file).expanduser(), ring)
    print(f"imported {imported} blocks into {copy_dir()} (sealed with this machine's key)"
          + (f"; kept {kept} the copy already held in a newer version" if kept else ""))
    return EXIT_OK
