"""``burrow list``, ``status`` and ``inspect``: what a store holds (no flow, no Prefect engine)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from burrow.errors import (
    EXIT_OK,
    EXIT_STALE,
    ArchiveNotFound,
    BurrowError,
    UsageError,
)
from cli.common import (
    add_read_keys,
    catalog_rows,
    keyring,
    latest,
    read_refs,
)


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    ls = sub.add_parser("list", help="list the complete archives in a store")
    ls.add_argument("store")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--latest", action="store_true",
                    help="print only the URL of the newest good archive of --source")
    ls.add_argument("--source", help="only this source (the name backup recorded)")
    add_read_keys(ls)
    _allow_unencrypted(ls)
    st = sub.add_parser("status", help="freshness per source: newest and newest verified archive, and their ages")
    st.add_argument("store")
    st.add_argument("--json", action="store_true")
    st.add_argument("--source", help="only this source")
    st.add_argument("--max-age", metavar="DURATION",
                    help="exit 5 when a source's newest archive is older than this (90s, 30m, 26h, 7d)")
    st.add_argument("--no-verify", action="store_true", help="do not download and verify the newest archives")
    add_read_keys(st)
    _allow_unencrypted(st)
    i = sub.add_parser("inspect", help="show an archive's manifest and stats")
    i.add_argument("archive")
    i.add_argument("--json", action="store_true")
    i.add_argument("--keys", action="store_true", help="also list every key path")
    add_read_keys(i)
    return {"list": cmd_list, "status": cmd_status, "inspect": cmd_inspect}


def _allow_unencrypted(p: Any) -> None:
    p.add_argument(
        "--allow-unencrypted", action="store_true",
        help="count an unencrypted archive as good even though read keys are configured (by default it is "
        "flagged: anyone who can write to the store could have planted it)",
    )


def _annotate(store: Any, rows: list[dict[str, Any]], keys: Any) -> None:
    """Rehearsal markers onto the rows (``row["rehearsal"]``), unless the catalog did it already."""
    from tasks.markers import annotate

    if any("rehearsal" in r for r in rows):
        return
    annotate(store, rows, keys if keys.keyring else None)


def newest_rehearsal(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The rehearsal to show for a source: the newest authenticated one of any of its archives,
    else the newest unauthenticated one (shown as such), with the archive's URL."""
    found = [dict(r["rehearsal"], archive=r["url"]) for r in rows if isinstance(r.get("rehearsal"), dict)]
    if not found:
        return None
    return max(found, key=lambda x: (bool(x.get("authenticated")), str(x.get("at") or "")))


def cmd_list(args: argparse.Namespace) -> int:
    from tasks.catalog import distrust
    from tasks.markers import rehearsal_text

    keys = keyring(read_refs(args))
    if args.latest:
        if not args.source:
            raise UsageError("--latest needs --source NAME")
        print(latest(args.store, args.source, keys, args.allow_unencrypted))
        return EXIT_OK
    store, rows = catalog_rows(args.store, keys)
    if args.source:
        rows = [r for r in rows if r.get("source") == args.source]
    _annotate(store, rows, keys)
    keyed = bool(keys.keyring)
    _mark_verification(store, rows)
    for r in rows:
        why = distrust(r, keyed=keyed, allow_unencrypted=args.allow_unencrypted)
        if why and not r.get("error"):
            r["flagged"] = why
    # each source's restorable window (its change chains), from the code status uses
    windows = source_windows(store, rows, keys, args.allow_unencrypted)
    for r in rows:
        if r.get("source") in windows:
            r["restorable"] = windows[r["source"]].to_json()
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
        if r.get("bound") == "legacy" and not flag:
            flag = "  legacy-bound"  # written before archives named their object: bound by the id its name carries
        rehearsed = f"  {rehearsal_text(r['rehearsal'])}" if r.get("rehearsal") else ""
        if r.get("verified") == "unverified":
            flag += "  UNVERIFIED (its backup could not verify it: check it with burrow verify)"
        print(
            f"{r['url']}  {r['size']:>12} B  {r['modified']}  {r.get('service', '?')}  "
            f"{r.get('source', '?')}  keys={r.get('keys', '?')}  {enc}{auth}{flag}{rehearsed}"
        )
    for source, window in sorted(windows.items()):
        print(f"{source}: {window.describe()}")
    return EXIT_OK


def _mark_verification(store: Any, rows: list[dict[str, Any]]) -> None:
    """Set ``row["verified"]`` to what the archive's backup verified ("full", "structure-only"),
    or "unverified" for an archive written since backups record their verify that has no such
    record (its backup's verify was cut short, e.g. by a store outage). Informational only:
    anyone who can write to the store can forge the record, so nothing decides from it."""
    from tasks.verify import verification_levels, verification_of

    levels = verification_levels(store)  # one listing of the store's sidecars (tasks/verify.py)
    for r in rows:
        level = verification_of(str(r.get("name", "")), levels)
        if level is not None:
            r["verified"] = level
        elif r.get("bound") is True:  # written since backups record their verify, and none recorded
            r["verified"] = "unverified"


def cmd_status(args: argparse.Namespace) -> int:
    import tempfile
    from datetime import UTC, datetime, timedelta
    from pathlib import Path

    from burrow.naming import age_text, parse_duration
    from tasks.catalog import created_at, select_archives
    from tasks.download import download_archive
    from tasks.markers import rehearsal_text
    from tasks.validate import validate_archive

    max_age = parse_duration(args.max_age, "--max-age") if args.max_age else None
    keys = keyring(read_refs(args))
    keyed = bool(keys.keyring)
    store, rows = catalog_rows(args.store, keys)
    _annotate(store, rows, keys)
    _mark_verification(store, rows)
    now = datetime.now(UTC)
    sources = sorted({str(r["source"]) for r in rows if r.get("source") and not r.get("error")})
    if args.source:
        sources = [s for s in sources if s == args.source]
        if not sources:
            raise ArchiveNotFound(f"no archive of source {args.source!r} in {store.describe()}")
    report: list[dict[str, Any]] = []
    described: dict[str, str] = {}  # each source's window, for a person
    stale = []
    for source in sources:
        mine = [r for r in rows if r.get("source") == source]
        sel = select_archives(mine, source, keyed=keyed, allow_unencrypted=args.allow_unencrypted, now=now)
        good = sel.trusted
        entry: dict[str, Any] = {
            "source": source, "archives": len(mine), "stored_bytes": sum(int(r.get("size") or 0) for r in mine),
            "flagged": len(sel.skipped), "flagged_archives": [f"{url}: {why}" for url, why in sel.skipped],
            "rehearsal": newest_rehearsal(mine),
            "unverified_at_backup": sum(1 for r in mine if r.get("verified") == "unverified"),
        }
        window = restorable_window(store, source, keys, args.allow_unencrypted)
        if window is not None:
            entry["restorable"] = window.to_json()
            described[source] = window.describe()
        if good:
            newest = good[0]
            age = now - created_at(newest)  # type: ignore[operator]
            entry.update(newest=newest["url"], newest_created=newest["created"], newest_age_s=int(age.total_seconds()))
            if window is not None and window.end is not None:
                # with a change chain, what a restore can reach is the window's end (RPO-now in seconds)
                end = datetime.fromtimestamp(window.end / 1e6, UTC)
                entry["restorable_age_s"] = int((now - end).total_seconds())
                age = min(age, now - end)
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
            if e["unverified_at_backup"]:
                flag += f", {e['unverified_at_backup']} UNVERIFIED at backup (check with burrow verify)"
            mark = "  STALE" if e["source"] in stale else ""
            rehearsed = ", " + rehearsal_text(e.get("rehearsal"))
            if e["source"] in described:
                rehearsed += f", {described[e['source']]}"
            print(f"{e['source']}: {e['archives']} archives, {e['stored_bytes']} B, {newest}{ver}{flag}{rehearsed}{mark}")
            for line in e["flagged_archives"]:  # every anomaly, named: a copy, a replay, an unbound archive
                print(f"  flagged {line}")
    if stale:
        print(f"burrow: newest archive older than {args.max_age} for: {', '.join(stale)}", file=sys.stderr)
        return EXIT_STALE
    return EXIT_OK


def restorable_window(store: Any, source: str, keys: Any, allow_unencrypted: bool = False) -> Any:
    """The source's restorable window from its change segments (burrow/segments.py ``Window``),
    or None when it has none. Segments that do not read or authenticate are left out of it
    (with a key, each chain's end is authenticated, and its links vouch for the rest: tasks/chain.py
    ``read_chains``). ``list``, ``status`` and their ``--json`` all show this one window."""
    from tasks.chain import read_chains

    found = read_chains(store, source, keys if keys.keyring else None, allow_unencrypted=allow_unencrypted)
    return found.window() if found.chains else None


def source_windows(store: Any, rows: list[dict[str, Any]], keys: Any, allow_unencrypted: bool = False) -> dict[str, Any]:
    """:func:`restorable_window` of each source the readable ``rows`` name that has one."""
    out = {}
    for source in sorted({str(r["source"]) for r in rows if r.get("source") and not r.get("error")}):
        window = restorable_window(store, source, keys, allow_unencrypted)
        if window is not None:
            out[source] = window
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    from burrow.crypto import encryption_summary
    from burrow.records import display_key
    from tasks.catalog import open_archive

    refs = read_refs(args)
    keys = keyring(refs)
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
