"""The ``burrow`` command. backup, restore and verify run the Prefect flows (so they land
in run history); list, inspect and dump work directly.

Exit codes: 0 success, 1 failure, 2 usage error, 3 restore finished but skipped conflicts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from burrow.errors import EXIT_CONFLICTS, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, BurrowError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"burrow: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="burrow", description="Backup, verify and safe restore for ZooKeeper, etcd v3 and Consul KV.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("backup", help="back up a cluster into a store; prints the archive URL last")
    b.add_argument("source", help="zk://h:p[,h:p][/chroot], or a saved source block's name")
    b.add_argument("--to", dest="store", required=True, help="a directory, a file:// URL or a saved store block")
    b.add_argument("--name", help="source name recorded in the manifest and catalog")
    b.add_argument("--root", default="/", help="back up only below this path (default: /)")
    b.add_argument("--level", type=int, default=3, help="zstd compression level, 1-22 (default 3)")

    r = sub.add_parser("restore", help="create the archived keys that are missing in a cluster")
    r.add_argument("archive", help="the archive URL that backup printed")
    r.add_argument("--into", required=True, help="target cluster URL or saved source block name")
    r.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    r.add_argument("--subtree", help="restore only this path and below")
    r.add_argument("--map", action="append", default=[], metavar="OLD=NEW", help="restore OLD and below under NEW")

    v = sub.add_parser("verify", help="re-read an archive and check manifest, checksums and counts")
    v.add_argument("archive")

    ls = sub.add_parser("list", help="list the complete archives in a store")
    ls.add_argument("store")
    ls.add_argument("--json", action="store_true")

    i = sub.add_parser("inspect", help="show an archive's manifest and stats")
    i.add_argument("archive")
    i.add_argument("--json", action="store_true")
    i.add_argument("--keys", action="store_true", help="also list every key path")

    d = sub.add_parser("dump", help="print a live tree on screen, values shown safely")
    d.add_argument("source")
    d.add_argument("--subtree", default="/", help="start here (default: /)")
    d.add_argument("--no-values", action="store_true", help="print paths and sizes only")
    return p


def _quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _print_summary(summary: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    for k, v in summary.items():
        if k in skip or v in (None, [], {}):
            continue
        print(f"{k}: {v}", file=sys.stderr)


def cmd_backup(args: argparse.Namespace) -> int:
    from burrow.naming import check_source_name
    from burrow.resolve import secure_source_ref, store_from_ref

    ref = secure_source_ref(args.source)
    if args.name is not None:
        check_source_name(args.name)
    if not 1 <= args.level <= 22:
        raise UsageError("--level must be between 1 and 22")
    store_from_ref(args.store).check(writable=True)
    from flows.backup import backup

    summary = backup(source=ref, store=args.store, name=args.name, root=args.root, compression_level=args.level)
    _print_summary(summary, skip=("url", "status"))
    print(summary["url"])
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from burrow.paths import KeyMapper
    from burrow.resolve import archive_from_ref, secure_source_ref

    KeyMapper(args.subtree, args.map)  # usage errors before a flow starts
    archive_from_ref(args.archive)
    ref = secure_source_ref(args.into)
    from flows.restore import restore

    summary = restore(archive=args.archive, into=ref, dry_run=args.dry_run, subtree=args.subtree, maps=args.map or None)
    if args.dry_run:
        print(f"dry run: nothing was written to {summary['target']}")
        for p in summary.get("planned_paths", []):
            print(f"create   {p}")
        if summary["planned_create"] + summary["planned_intermediate"] > len(summary.get("planned_paths", [])):
            print("create   ... (list truncated)")
    for p in summary.get("conflict_paths", []):
        print(f"conflict {p}")
    keys = [
        "planned_create", "planned_intermediate", "created", "intermediate_created", "identical",
        "conflicts", "outside_subtree", "metadata_not_carried",
    ]
    print(", ".join(f"{k}={summary[k]}" for k in keys if k in summary))
    if summary.get("conflicts"):
        print(
            f"burrow: {summary['conflicts']} existing keys differ from the archive and were left as they are",
            file=sys.stderr,
        )
        return EXIT_CONFLICTS
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from burrow.resolve import archive_from_ref

    archive_from_ref(args.archive)
    from flows.verify import verify

    summary = verify(archive=args.archive)
    print(f"ok: {summary['url']}: {summary['keys']} keys, content sha256 {summary['content_sha256']}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from burrow.catalog import describe_archives
    from burrow.resolve import store_from_ref

    store = store_from_ref(args.store)
    rows = describe_archives(store)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for r in rows:
        enc = "encrypted" if r.get("encrypted") else "plain"
        print(
            f"{r['url']}  {r['size']:>12} B  {r['modified']}  {r.get('service', '?')}  "
            f"{r.get('source', '?')}  keys={r.get('keys', '?')}  {enc}"
        )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from burrow.catalog import open_archive
    from burrow.records import display_key

    with open_archive(args.archive) as reader:
        info = dict(reader.manifest)
        info["stored_bytes"] = reader.size
        if args.json:
            if args.keys:
                info["key_list"] = [display_key(r.key) for r in reader.records()]
            print(json.dumps(info, indent=2, sort_keys=True))
            return EXIT_OK
        for k in sorted(info):
            print(f"{k}: {info[k]}")
        if args.keys:
            for r in reader.records():
                print(display_key(r.key))
    return EXIT_OK


def cmd_dump(args: argparse.Namespace) -> int:
    from blocks.source import WalkStats
    from burrow.preview import preview
    from burrow.resolve import source_from_ref

    source = source_from_ref(args.source)
    session = source.connect()
    stats = WalkStats()
    n = 0
    try:
        for rec in session.walk(args.subtree.encode("utf-8"), stats):
            n += 1
            line = f"{rec.display_key()}  [{len(rec.value)} B]"
            if not args.no_values:
                line += f"  {preview(rec.value)}"
            print(line)
    finally:
        session.close()
    print(f"# {n} keys; {stats.skipped_ephemeral} ephemeral/leased not shown", file=sys.stderr)
    return EXIT_OK


COMMANDS = {
    "backup": cmd_backup, "restore": cmd_restore, "verify": cmd_verify, "list": cmd_list,
    "inspect": cmd_inspect, "dump": cmd_dump,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``burrow`` console script."""
    args = build_parser().parse_args(argv)
    _quiet_prefect()
    if sys.stderr.isatty() and args.command in ("backup", "restore", "verify"):
        from burrow import progress

        progress.install_terminal_reporter()
    try:
        code = COMMANDS[args.command](args)
    except BurrowError as exc:
        print(f"burrow: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("burrow: interrupted", file=sys.stderr)
        code = EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - one line, no traceback, never a value
        print(f"burrow: error: unexpected {type(exc).__name__}", file=sys.stderr)
        code = EXIT_FAILURE
    sys.stdout.flush()
    return code


def run() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    run()

