"""``burrow failover``: rebuild a cluster from an archive of a source, as a guarded drill."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from burrow.errors import (
    EXIT_INTERRUPTED,
    BurrowError,
    UsageError,
)
from burrow.naming import redact_url
from cli.common import (
    add_read_keys,
    keyring,
    list_parameters,
    read_refs,
    report_restore,
)
from cli.undo import with_undo_line


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    f = sub.add_parser(
        "failover",
        help="rebuild a cluster from an archive of a source: preflight checks, restore, post-verify, report",
    )
    f.add_argument("source", help="the source name recorded in the archives (backup --name)")
    f.add_argument("--from", dest="store", required=True, help="the store holding the source's archives")
    f.add_argument("--into", required=True, help="target cluster URL or saved source block name")
    f.add_argument("--primary", help="the failed primary cluster (URL or saved block) to probe before failing over "
                   "(default: the source name when it is a URL or block, else the URL the archive records)")
    f.add_argument("--archive", help="pin the archive to use (its URL or name in the store) instead of choosing one")
    f.add_argument("--max-age", help="refuse archives older than this (90s, 30m, 26h, 7d): the RPO gate")
    f.add_argument("--prefer-rehearsed-within", metavar="DURATION", default="2h",
                   help="try an archive with a passing, authenticated rehearsal before the newest only when it is "
                   "at most this much older than the newest (default 2h)")
    f.add_argument("--resume-within", metavar="DURATION", default="6h",
                   help="resume an interrupted failover of the same source into the same target with the archive it "
                   "chose only when it began at most this long ago (default 6h; its record is signed and expires)")
    f.add_argument("--no-resume", action="store_true",
                   help="choose the archive afresh even if an interrupted failover of this source into this target "
                   "left a record of its choice")
    f.add_argument("--force", action="store_true",
                   help="fail over although the primary still answers, the archive's key count fell by more "
                   "than half against the previous archive, or the wrong-cluster guard refuses the target")
    f.add_argument("--cross-service", action="store_true",
                   help="restore an archive of one service (ZooKeeper, etcd, Consul) into another on purpose "
                   "(without it, the wrong-cluster guard refuses)")
    f.add_argument("--foreign-keys-max", metavar="PCT", type=float,
                   help="refuse a target that already holds more keys outside the archive's paths than PCT percent "
                   "of the archive's key count (default 1): the wrong-cluster guard")
    f.add_argument("--at", choices=["latest"],
                   help="restore the newest archive plus the change chain that continues it, up to the chain's end "
                   "(the default; the runbook says it: without a chain the archive alone is restored, and the "
                   "preflight says so)")
    f.add_argument("--full-only", action="store_true",
                   help="restore the full archive alone, without the changes a capture chained after it (by default "
                   "a failover restores --at latest when a change chain continues the archive)")
    f.add_argument("--dry-run", action="store_true",
                   help="run every read-only check and print the plan; write nothing")
    f.add_argument("--subtree", help="restore only this path and below")
    f.add_argument("--map", action="append", default=[], metavar="OLD=NEW", help="restore OLD and below under NEW")
    f.add_argument("--candidates", type=int, default=5, help="how many archives to try at most (default 5)")
    add_read_keys(f)
    f.add_argument(
        "--allow-unencrypted", action="store_true",
        help="read an unencrypted archive even though read keys are configured (by default it is refused: "
        "anyone who can write to the store could have planted it)",
    )
    f.set_defaults(precheck=check_usage)
    return {"failover": with_undo_line(cmd_failover, lambda args, _: redact_url(args.store))}  # ends: `to undo: ...`


def _print_preflight(summary: dict[str, Any]) -> None:
    """The preflight's outcome and the skipped candidates, on stdout (not only in the log)."""
    for line in summary.get("preflight") or []:
        # a resumed failover says so in one line of its own: "resuming the failover begun at T with archive X"
        print(line if line.startswith("resuming the failover ") else f"preflight {line}")
    for line in summary.get("skipped") or []:
        print(f"skipped  {line}")


def check_usage(args: argparse.Namespace) -> None:
    """Every usage error that needs neither the orchestrator nor a cluster: ``main`` calls this
    before it probes either, so a malformed duration or a missing key file is said at once."""
    from burrow.keys import key_from_env, passphrase_from_env, read_key_file
    from burrow.naming import parse_duration
    from burrow.paths import KeyMapper

    KeyMapper(args.subtree, args.map)
    if getattr(args, "at", None) and args.full_only:
        raise UsageError("--at latest restores the chain's end and --full-only the archive alone: give one of them")
    if args.candidates < 1:
        raise UsageError("--candidates must be at least 1")
    if args.foreign_keys_max is not None and not 0 <= args.foreign_keys_max <= 100:
        raise UsageError("--foreign-keys-max takes a percentage from 0 to 100")
    if args.max_age:
        parse_duration(args.max_age, "--max-age")
    parse_duration(args.prefer_rehearsed_within, "--prefer-rehearsed-within")
    parse_duration(args.resume_within, "--resume-within")
    refs = read_refs(args)
    for path in (refs["key_files"] or []) + (refs["identity_files"] or []):
        read_key_file(path)
    if refs["key_env"]:
        key_from_env(refs["key_env"])
    if refs["passphrase_env"]:
        passphrase_from_env(refs["passphrase_env"])


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C (KeyboardInterrupt), or SIGTERM: ours before the run, Prefect's inside it."""
    return isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TerminationSignal"


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM interrupts the failover as Ctrl-C does (inside the flow run Prefect's own handler
    takes over, raising its TerminationSignal), so both end with the archive line and exit 130."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (a test calling main in a worker): nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report_interrupted(done: dict[str, Any] | None) -> int:
    """An interrupted failover (Ctrl-C, SIGTERM): the preflight so far and, once it was chosen,
    the archive line the runbook pins on the re-run, on stdout; exit 130. The journal keeps the
    choice (its record is written before the first write), so a plain re-run resumes with it."""
    if done:
        _print_preflight(done)
        if done.get("archive"):
            print(f"failover from {done['archive']} (created {done.get('archive_created')})")
    sys.stdout.flush()
    print("burrow: interrupted" + (f": re-run the failover to finish it with {done['archive']} (or pin it with "
                                   "--archive)" if done and done.get("archive") else ""), file=sys.stderr)
    return EXIT_INTERRUPTED


def cmd_failover(args: argparse.Namespace) -> int:
    from blocks.resolve import secure_source_ref, store_from_ref

    check_usage(args)  # (main did too, before any probe; a direct call still gets them first)
    listing = list_parameters()
    store_from_ref(args.store).check()
    ref = secure_source_ref(args.into, role="target")  # each role keeps its own credentials
    primary = secure_source_ref(args.primary, role="primary") if args.primary else None
    refs = read_refs(args)
    keyring(refs)
    from flows.failover import failover

    try:
        with _sigterm_interrupts():
            summary = failover(
                source=args.source, store=args.store, into=ref, primary=primary, archive=args.archive,
                max_age=args.max_age, force=args.force, dry_run=args.dry_run, subtree=args.subtree,
                maps=args.map or None, max_candidates=args.candidates, allow_unencrypted=args.allow_unencrypted,
                prefer_rehearsed_within=args.prefer_rehearsed_within, resume=not args.no_resume,
                resume_within=args.resume_within, cross_service=args.cross_service, full_only=args.full_only,
                **refs, **listing,
                **({} if args.foreign_keys_max is None else {"foreign_keys_max": args.foreign_keys_max}),
            )
    except BaseException as exc:
        if _interrupted(exc):
            from flows.failover import RUNNING

            return _report_interrupted(getattr(exc, "failover_summary", None) or RUNNING.get("summary"))
        if not isinstance(exc, BurrowError):
            raise
        done = getattr(exc, "failover_summary", None)
        if done:
            _print_preflight(done)
            if done.get("archive"):
                print(f"failover archive {done['archive']} (pin it on a re-run with --archive)")
        raise
    _print_preflight(summary)
    print(f"failover from {summary['archive']} (created {summary['archive_created']})")
    code = report_restore(summary, args.dry_run)
    print(f"rpo_s={summary.get('rpo_s')} rto_s={summary.get('rto_s')} "
          + " ".join(f"{k}_s={v}" for k, v in (summary.get("steps_s") or {}).items()))
    if not args.dry_run:
        print(f"post-verify: {summary.get('postverify_checked', 0)} keys checked, "
              f"{summary.get('postverify_matching', 0)} match, {summary.get('postverify_conflicts', 0)} are the "
              "conflicts listed above")
    return code
