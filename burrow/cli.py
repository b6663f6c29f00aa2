"""The ``burrow`` command. backup, restore and verify run the Prefect flows (so they land
in run history); list, inspect and dump work directly.

Exit codes: 0 success, 1 failure, 2 usage error, 3 restore finished but skipped conflicts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from typing import Any

from burrow.errors import (
    EXIT_CONFLICTS,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_STALE,
    EXIT_USAGE,
    ArchiveNotFound,
    BurrowError,
    UsageError,
)


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 2 with one line and a suggestion; no abbreviated flags (``--no-encrypt``
    must not silently mean ``--no-encryption``)."""

    _seen: list[str] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._seen = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def _suggestion(self, message: str) -> str:
        """' (did you mean ...?)' for a mistyped command or flag, else ''."""
        import difflib
        import re

        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
            return f" (did you mean {close[0]!r}?)" if close else ""
        known = {o for o in self._option_string_actions if o.startswith("--")}
        for action in self._actions:  # the top-level parser reports its subcommands' leftovers too
            if isinstance(action, argparse._SubParsersAction):
                command = next((t for t in self._seen or [] if t in action.choices), None)
                if command:
                    known |= {o for o in action.choices[command]._option_string_actions if o.startswith("--")}
        known = sorted(known)
        for token in self._seen or []:
            flag = token.split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
                if close:
                    return f" (unknown option {flag}: did you mean {close[0]}?)"
        return ""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"burrow: error: {message}{self._suggestion(message)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _add_write_keys(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "encryption (one of; default from BURROW_KEY_FILE, BURROW_KEY, BURROW_RECIPIENTS, "
        "BURROW_PASSPHRASE_ENV or BURROW_KEY_BLOCK)"
    )
    x = g.add_mutually_exclusive_group()
    x.add_argument("--key-file", metavar="PATH", help="encrypt with the symmetric key in this file (burrow keygen)")
    x.add_argument("--key-env", metavar="VAR", help="encrypt with the symmetric key held in environment variable VAR")
    x.add_argument(
        "--recipient", action="append", default=[], metavar="PUBKEY_OR_FILE",
        help="encrypt to this X25519 public key (or file of them); repeat for several recipients",
    )
    x.add_argument("--passphrase-env", metavar="VAR", help="encrypt with the passphrase held in environment variable VAR")
    x.add_argument("--key-block", metavar="NAME", help="use a saved EncryptionKeys block")
    x.add_argument("--no-encryption", action="store_true", help="write the archive unencrypted (explicit opt-out)")


def _add_read_keys(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "decryption (default from BURROW_KEY_FILE, BURROW_KEY, BURROW_IDENTITY_FILE, BURROW_PASSPHRASE_ENV "
        "or BURROW_KEY_BLOCK; retired keys from BURROW_KEYRING)"
    )
    g.add_argument("--key-file", action="append", default=[], metavar="PATH", help="a symmetric key file (repeatable)")
    g.add_argument(
        "--identity", action="append", default=[], metavar="PRIVATE_KEY_FILE",
        help="an X25519 private key file (repeatable)",
    )
    g.add_argument("--passphrase-env", metavar="VAR", help="the passphrase is in environment variable VAR")
    g.add_argument("--key-env", metavar="VAR", help="a symmetric key is in environment variable VAR")
    g.add_argument("--key-block", metavar="NAME", help="a saved EncryptionKeys block")


def _read_refs(args: argparse.Namespace) -> dict[str, Any]:
    """Key references as flow parameters (paths and names only, never key material)."""
    return {
        "key_files": [os.path.abspath(os.path.expanduser(f)) for f in args.key_file] or None,
        "identity_files": [os.path.abspath(os.path.expanduser(f)) for f in args.identity] or None,
        "passphrase_env": args.passphrase_env,
        "key_env": args.key_env,
        "key_block": args.key_block,
    }


def _keyring(refs: dict[str, Any]) -> Any:
    from blocks.keys import archive_keys

    return archive_keys(**refs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="burrow", description="Backup, verify and safe restore for ZooKeeper, etcd v3 and Consul KV.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Prefect's engine errors and tracebacks on the terminal")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("backup", help="back up a cluster into a store; prints the archive URL last")
    b.add_argument(
        "source",
        help="zk://h:p[,h:p][/chroot], etcd://h:p[,h:p][/prefix], consul://h:p[/prefix], or a saved source block's name",
    )
    b.add_argument("--to", dest="store", required=True, help="a directory, a file:// URL or a saved store block")
    b.add_argument("--name", help="source name recorded in the manifest and catalog")
    b.add_argument("--root", default="/", help="back up only below this path (default: /)")
    b.add_argument("--level", type=int, default=3, help="zstd compression level, 1-22 (default 3)")
    b.add_argument(
        "--include-leased", action="store_true",
        help="etcd: keep leased keys with their remaining TTL (default: skip and count them)",
    )
    _add_write_keys(b)

    r = sub.add_parser("restore", help="create the archived keys that are missing in a cluster")
    r.add_argument("archive", help="the archive URL that backup printed (with --latest: the store)")
    r.add_argument("--latest", action="store_true",
                   help="restore the newest good archive of --source from the store given as ARCHIVE")
    r.add_argument("--source", help="with --latest: the source name recorded in the archives")
    r.add_argument("--into", required=True, help="target cluster URL or saved source block name")
    r.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    r.add_argument("--subtree", help="restore only this path and below")
    r.add_argument("--map", action="append", default=[], metavar="OLD=NEW", help="restore OLD and below under NEW")
    _add_read_keys(r)
    r.add_argument(
        "--allow-unencrypted", action="store_true",
        help="read an unencrypted archive even though read keys are configured (by default it is refused: "
        "anyone who can write to the store could have planted it)",
    )

    f = sub.add_parser("failover", help="rebuild a cluster from the newest archive of a source that verifies")
    f.add_argument("source", help="the source name recorded in the archives (backup --name)")
    f.add_argument("--from", dest="store", required=True, help="the store holding the source's archives")
    f.add_argument("--into", required=True, help="target cluster URL or saved source block name")
    f.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    f.add_argument("--subtree", help="restore only this path and below")
    f.add_argument("--map", action="append", default=[], metavar="OLD=NEW", help="restore OLD and below under NEW")
    f.add_argument("--candidates", type=int, default=5, help="how many of the newest archives to try (default 5)")
    _add_read_keys(f)
    f.add_argument(
        "--allow-unencrypted", action="store_true",
        help="read an unencrypted archive even though read keys are configured (by default it is refused: "
        "anyone who can write to the store could have planted it)",
    )

    pr = sub.add_parser("prune", help="delete archives beyond a GFS retention policy (newest per source always kept)")
    pr.add_argument("store")
    pr.add_argument("--keep-last", "--keep", dest="keep_last", type=int, metavar="N",
                    help="keep the newest N archives per source (the default policy is --keep-last 24)")
    for period in ("hourly", "daily", "weekly", "monthly", "yearly"):
        pr.add_argument(f"--keep-{period}", type=int, metavar="N",
                        help=f"keep the newest archive of each of the last N {period} periods that hold one")
    pr.add_argument("--keep-within", metavar="DURATION", help="keep every archive made within DURATION of the newest")
    pr.add_argument("--policy-block", metavar="NAME", help="a saved RetentionPolicy block instead of --keep-* rules")
    pr.add_argument("--max-age-days", type=float, help="only delete archives older than this many days")
    pr.add_argument("--source", help="only this source")
    pr.add_argument("--dry-run", action="store_true",
                    help="list what would be deleted, and which rule keeps every other archive; delete nothing")
    _add_read_keys(pr)

    v = sub.add_parser("verify", help="re-read an archive and check manifest, checksums and counts")
    v.add_argument("archive")
    v.add_argument(
        "--structure-only", action="store_true",
        help="check framing, sizes and the body SHA-256 without a key (nothing decrypted or authenticated)",
    )
    _add_read_keys(v)
    v.add_argument(
        "--allow-unencrypted", action="store_true",
        help="read an unencrypted archive even though read keys are configured (by default it is refused: "
        "anyone who can write to the store could have planted it)",
    )

    ls = sub.add_parser("list", help="list the complete archives in a store")
    ls.add_argument("store")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--latest", action="store_true",
                    help="print only the URL of the newest good archive of --source")
    ls.add_argument("--source", help="only this source (the name backup recorded)")
    _add_read_keys(ls)

    st = sub.add_parser("status", help="freshness per source: newest and newest verified archive, and their ages")
    st.add_argument("store")
    st.add_argument("--json", action="store_true")
    st.add_argument("--source", help="only this source")
    st.add_argument("--max-age", metavar="DURATION",
                    help="exit 5 when a source's newest archive is older than this (90s, 30m, 26h, 7d)")
    st.add_argument("--no-verify", action="store_true", help="do not download and verify the newest archives")
    _add_read_keys(st)

    i = sub.add_parser("inspect", help="show an archive's manifest and stats")
    i.add_argument("archive")
    i.add_argument("--json", action="store_true")
    i.add_argument("--keys", action="store_true", help="also list every key path")
    _add_read_keys(i)

    k = sub.add_parser("keygen", help="create a symmetric key, or an X25519 key pair with --x25519")
    k.add_argument("--out", required=True, metavar="PATH", help="the new key file (created 0600; never overwritten)")
    k.add_argument("--x25519", action="store_true", help="make an X25519 key pair; the public key goes to PATH.pub")

    d = sub.add_parser("dump", help="print a live tree on screen, values shown safely")
    d.add_argument("source")
    d.add_argument("--subtree", default="/", help="start here (default: /)")
    d.add_argument("--no-values", action="store_true", help="print paths and sizes only")
    for sp in sub.choices.values():  # -v works after the command too
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also show Prefect's engine errors and tracebacks on the terminal")
    return p


def _quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


FLOW_COMMANDS = ("backup", "restore", "verify", "failover", "prune")


class _NoTracebacksOnConsole(logging.Filter):
    """On the terminal, an expected failure is one ``burrow: error:`` line: this drops the
    engine's error records and every traceback from the console handler only. The flow run's
    logs on the server (Prefect's API handler) still receive all of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text:
            return False
        return not (record.name.startswith("prefect") and record.levelno >= logging.ERROR)


def _quiet_console() -> None:
    """Attach :class:`_NoTracebacksOnConsole` to Prefect's console handler (set up on import)."""
    import prefect.main  # noqa: F401 - configures Prefect's logging (handlers on the root logger)
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, _NoTracebacksOnConsole) for f in handler.filters
        ):
            handler.addFilter(_NoTracebacksOnConsole())


def _print_summary(summary: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    for k, v in summary.items():
        if k in skip or v in (None, [], {}):
            continue
        print(f"{k}: {v}", file=sys.stderr)


def cmd_backup(args: argparse.Namespace) -> int:
    from blocks.resolve import secure_source_ref, store_from_ref
    from burrow.naming import check_source_name

    ref = secure_source_ref(args.source)
    if args.include_leased:
        from blocks.resolve import source_from_ref

        if source_from_ref(ref).service != "etcd":
            raise UsageError("--include-leased applies to etcd sources only")
    if args.name is not None:
        check_source_name(args.name)
    if not 1 <= args.level <= 22:
        raise UsageError("--level must be between 1 and 22")
    store_from_ref(args.store).check(writable=True)
    from blocks.keys import backup_write_keys
    from burrow.keys import KeyRefs

    def absolute(p: str) -> str:
        return os.path.abspath(os.path.expanduser(p))

    recipients = [r if r.startswith("burrow-x25519:") else absolute(r) for r in args.recipient]
    key_file = absolute(args.key_file) if args.key_file else None
    # Usage errors (no key, a missing key file, two modes) before a flow starts.
    backup_write_keys(not args.no_encryption, KeyRefs(
        key_files=[key_file] if key_file else [], key_env=args.key_env, recipients=recipients,
        passphrase_env=args.passphrase_env, block=args.key_block,
    ))
    from flows.backup import backup

    summary = backup(
        source=ref, store=args.store, name=args.name, root=args.root, compression_level=args.level,
        encryption=not args.no_encryption, key_file=key_file, key_env=args.key_env,
        recipients=recipients or None, passphrase_env=args.passphrase_env, key_block=args.key_block,
        include_leased=args.include_leased,
    )
    _print_summary(summary, skip=("url", "status"))
    print(summary["url"])
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from blocks.resolve import archive_from_ref, secure_source_ref
    from burrow.paths import KeyMapper

    KeyMapper(args.subtree, args.map)  # usage errors before a flow starts
    refs = _read_refs(args)
    keys = _keyring(refs)  # a missing or malformed key file is a usage error before a flow starts
    if args.latest:
        if not args.source:
            raise UsageError("--latest needs --source NAME (the source name recorded in the archives)")
        args.archive = _latest(args.archive, args.source, keys)
        print(f"restoring the newest good archive of {args.source}: {args.archive}", file=sys.stderr)
    elif args.source:
        raise UsageError("--source goes with --latest")
    archive_from_ref(args.archive)
    ref = secure_source_ref(args.into)
    from flows.restore import restore

    summary = restore(
        archive=args.archive, into=ref, dry_run=args.dry_run, subtree=args.subtree, maps=args.map or None,
        allow_unencrypted=args.allow_unencrypted, **refs,
    )
    return _report_restore(summary, args.dry_run)


def _report_restore(summary: dict[str, Any], dry_run: bool) -> int:
    """Print a restore or failover summary on stdout; return the exit code."""
    if dry_run:
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
    for w in summary.get("warnings") or []:
        print(f"burrow: warning: {w}", file=sys.stderr)
    if summary.get("acl_restricted"):
        print(f"burrow: {summary['acl_restricted']} nodes were given an ACL only the restoring identity holds "
              "(their archived ACL could not be used); re-apply the real ACL:", file=sys.stderr)
        for p in summary.get("acl_restricted_paths") or []:
            print(f"restricted {p}")
    if summary.get("acl_not_applied"):
        print(f"burrow: {summary['acl_not_applied']} nodes kept their restorer-only ACL because the archived ACL "
              "could not be set after their children:", file=sys.stderr)
        for p in summary.get("acl_not_applied_paths") or []:
            print(f"acl-not-applied {p}")
    if summary.get("conflicts") and dry_run:
        # A dry run skipped nothing: it succeeded, and says what a restore would leave alone.
        print(f"burrow: {summary['conflicts']} existing keys differ from the archive and would be left as they are",
              file=sys.stderr)
    elif summary.get("conflicts"):
        print(
            f"burrow: {summary['conflicts']} existing keys differ from the archive and were left as they are",
            file=sys.stderr,
        )
        return EXIT_CONFLICTS
    return EXIT_OK


def cmd_failover(args: argparse.Namespace) -> int:
    from blocks.resolve import secure_source_ref, store_from_ref
    from burrow.paths import KeyMapper

    KeyMapper(args.subtree, args.map)
    if args.candidates < 1:
        raise UsageError("--candidates must be at least 1")
    store_from_ref(args.store).check()
    ref = secure_source_ref(args.into)
    refs = _read_refs(args)
    _keyring(refs)
    from flows.failover import failover

    summary = failover(
        source=args.source, store=args.store, into=ref, dry_run=args.dry_run, subtree=args.subtree,
        maps=args.map or None, max_candidates=args.candidates, allow_unencrypted=args.allow_unencrypted, **refs,
    )
    print(f"failover from {summary['archive']} (created {summary['archive_created']})")
    return _report_restore(summary, args.dry_run)


def cmd_prune(args: argparse.Namespace) -> int:
    from blocks.resolve import store_from_ref
    from burrow.naming import parse_duration

    if args.keep_last is not None and args.keep_last < 1:
        raise UsageError("--keep-last must be at least 1: the newest archive of a source is never pruned")
    if args.keep_within:
        parse_duration(args.keep_within, "--keep-within")
    store_from_ref(args.store).check()
    refs = _read_refs(args)
    _keyring(refs)
    from flows.prune import prune

    summary = prune(
        store=args.store, keep_last=args.keep_last, keep_hourly=args.keep_hourly, keep_daily=args.keep_daily,
        keep_weekly=args.keep_weekly, keep_monthly=args.keep_monthly, keep_yearly=args.keep_yearly,
        keep_within=args.keep_within, policy_block=args.policy_block, max_age_days=args.max_age_days,
        source=args.source, dry_run=args.dry_run, **refs,
    )
    verb = "would delete" if args.dry_run else "deleted"
    for url, why in summary["deleted_because"].items():
        print(f"{verb} {url}  ({why})")
    if args.dry_run:
        for url, rules in summary["kept_because"].items():
            print(f"keep {url}  ({'; '.join(rules)})")
    print(f"{verb} {summary['deleted']} of {summary['archives']} archives; kept {summary['kept']}; "
          f"left alone {summary['left_alone']} (policy: {summary['policy']})")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from blocks.resolve import archive_from_ref

    archive_from_ref(args.archive)
    refs = _read_refs(args)
    if not args.structure_only:
        _keyring(refs)
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


def _catalog_rows(store_ref: str, keys: Any) -> tuple[Any, list[dict[str, Any]]]:
    from blocks.resolve import store_from_ref
    from tasks.catalog import describe_archives

    store = store_from_ref(store_ref)
    return store, describe_archives(store, keys if keys.keyring else None)


def _latest(store_ref: str, source: str, keys: Any) -> str:
    """The URL of the newest archive of ``source`` whose claims can be trusted."""
    from tasks.catalog import newest_first

    store, rows = _catalog_rows(store_ref, keys)
    good = newest_first(rows, source, keyed=bool(keys.keyring))
    if not good:
        sources = sorted({str(r.get("source")) for r in rows if r.get("source")})
        held = f" (the store holds: {', '.join(sources)})" if sources else " (the store holds no readable archive)"
        raise ArchiveNotFound(f"no good archive of source {source!r} in {store.describe()}{held}")
    return good[0]["url"]


def cmd_list(args: argparse.Namespace) -> int:
    from tasks.catalog import distrust

    keys = _keyring(_read_refs(args))
    if args.latest:
        if not args.source:
            raise UsageError("--latest needs --source NAME")
        print(_latest(args.store, args.source, keys))
        return EXIT_OK
    _, rows = _catalog_rows(args.store, keys)
    if args.source:
        rows = [r for r in rows if r.get("source") == args.source]
    keyed = bool(keys.keyring)
    for r in rows:
        why = distrust(r, keyed=keyed)
        if why and not r.get("error"):
            r["flagged"] = why
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for r in rows:
        if r.get("error"):
            continue  # not a readable archive: the catalog warned about it on stderr
        enc = "plain"
        if r.get("encrypted"):
            fps = ",".join(fp[:16] for fp in r.get("fingerprints") or [])
            enc = f"encrypted({r.get('encryption_mode', '?')}{':' + fps if fps else ''})"
        auth = {True: "  authenticated", False: "  UNAUTHENTICATED"}.get(r.get("authenticated"), "")
        flag = f"  FLAGGED: {r['flagged']}" if r.get("flagged") else ""
        print(
            f"{r['url']}  {r['size']:>12} B  {r['modified']}  {r.get('service', '?')}  "
            f"{r.get('source', '?')}  keys={r.get('keys', '?')}  {enc}{auth}{flag}"
        )
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    import tempfile
    from datetime import UTC, datetime, timedelta
    from pathlib import Path

    from burrow.naming import age_text, parse_duration
    from tasks.catalog import created_at, distrust, newest_first
    from tasks.download import download_archive
    from tasks.validate import validate_archive

    max_age = parse_duration(args.max_age, "--max-age") if args.max_age else None
    keys = _keyring(_read_refs(args))
    keyed = bool(keys.keyring)
    store, rows = _catalog_rows(args.store, keys)
    now = datetime.now(UTC)
    sources = sorted({str(r["source"]) for r in rows if r.get("source") and not r.get("error")})
    if args.source:
        sources = [s for s in sources if s == args.source]
        if not sources:
            raise ArchiveNotFound(f"no archive of source {args.source!r} in {store.describe()}")
    report: list[dict[str, Any]] = []
    stale = []
    for source in sources:
        mine = [r for r in rows if r.get("source") == source]
        good = newest_first(mine, source, keyed=keyed)
        entry: dict[str, Any] = {
            "source": source, "archives": len(mine), "stored_bytes": sum(int(r.get("size") or 0) for r in mine),
            "flagged": sum(1 for r in mine if distrust(r, keyed=keyed, now=now)),
        }
        if good:
            newest = good[0]
            age = now - created_at(newest)  # type: ignore[operator]
            entry.update(newest=newest["url"], newest_created=newest["created"], newest_age_s=int(age.total_seconds()))
            if max_age is not None and age > max_age:
                stale.append(source)
        verified = None
        if not args.no_verify:
            for row in good[:3]:
                with tempfile.TemporaryDirectory(prefix="burrow-status-") as tmp:
                    try:
                        local = download_archive(store, row["name"], Path(tmp))
                        if keyed or not row.get("encrypted"):
                            validate_archive(local, keys if keyed else None, label=row["url"])
                        else:
                            from burrow.archive import ArchiveReader

                            with open(local, "rb") as f:
                                ArchiveReader(f, label=row["url"]).check_stored()
                    except BurrowError as exc:
                        entry.setdefault("failed_verification", []).append(f"{row['url']}: {exc}")
                        continue
                verified = row
                break
            if verified is not None:
                vage = now - created_at(verified)  # type: ignore[operator]
                entry.update(newest_verified=verified["url"], newest_verified_created=verified["created"],
                             newest_verified_age_s=int(vage.total_seconds()),
                             verified_fully=bool(keyed or not verified.get("encrypted")))
        report.append(entry)
    unreadable = sum(1 for r in rows if r.get("error"))
    if args.json:
        print(json.dumps({"store": store.describe(), "sources": report, "unreadable": unreadable,
                          "stale": stale}, indent=2))
    else:
        print(f"store {store.describe()}: {len(rows)} archives, {unreadable} unreadable")
        for e in report:
            newest = f"newest {age_text(timedelta(seconds=e['newest_age_s']))} old" if "newest" in e else "no good archive"
            ver = ""
            if not args.no_verify:
                ver = (f", newest verified {age_text(timedelta(seconds=e['newest_verified_age_s']))} old"
                       + ("" if e.get("verified_fully") else " (structure only: no key)")
                       if "newest_verified" in e else ", NONE verified")
            flag = f", {e['flagged']} flagged" if e["flagged"] else ""
            mark = "  STALE" if e["source"] in stale else ""
            print(f"{e['source']}: {e['archives']} archives, {e['stored_bytes']} B, {newest}{ver}{flag}{mark}")
    if stale:
        print(f"burrow: newest archive older than {args.max_age} for: {', '.join(stale)}", file=sys.stderr)
        return EXIT_STALE
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from burrow.crypto import encryption_summary
    from burrow.records import display_key
    from tasks.catalog import open_archive

    refs = _read_refs(args)
    keys = _keyring(refs)
    with open_archive(args.archive) as reader:
        info = dict(reader.manifest)
        info["stored_bytes"] = reader.size
        info["encryption"] = encryption_summary(reader.header.get("encryption"))
        if reader.encrypted:
            if keys.keyring:
                reader.check_metadata(keys)  # raises unless a key opens it and the manifest MAC holds
                info["authenticated"] = f"yes (opened with {keys.opened_by})"
            else:
                info["authenticated"] = "no: no key given, so this manifest is unauthenticated"
                if args.keys:
                    raise UsageError("--keys needs the archive's key (--key-file, --identity or --passphrase-env)")
        if args.json:
            if args.keys:
                info["key_list"] = [display_key(r.key) for r in reader.records(keys)]
            print(json.dumps(info, indent=2, sort_keys=True))
            return EXIT_OK
        for k in sorted(info):
            print(f"{k}: {info[k]}")
        if args.keys:
            for r in reader.records(keys):
                print(display_key(r.key))
    return EXIT_OK


def cmd_dump(args: argparse.Namespace) -> int:
    from blocks.resolve import source_from_ref
    from blocks.source import WalkStats
    from burrow.preview import preview

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


COMMANDS = {
    "keygen": cmd_keygen,
    "backup": cmd_backup, "restore": cmd_restore, "verify": cmd_verify, "list": cmd_list,
    "inspect": cmd_inspect, "dump": cmd_dump, "failover": cmd_failover, "prune": cmd_prune, "status": cmd_status,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``burrow`` console script."""
    args = build_parser().parse_args(argv)
    _quiet_prefect()
    if args.command in FLOW_COMMANDS and not args.verbose:
        _quiet_console()
    if sys.stderr.isatty() and args.command in ("backup", "restore", "verify", "failover"):
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
        if args.verbose:
            traceback.print_exc()
        print(f"burrow: error: unexpected {type(exc).__name__}", file=sys.stderr)
        code = EXIT_FAILURE
    sys.stdout.flush()
    return code


def run() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    run()

