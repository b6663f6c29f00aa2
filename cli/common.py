"""Parts every command shares: the parser class, key flags, output options (--json, --list),
restore reports, catalog lookups."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from burrow.errors import (
    EXIT_CONFLICTS,
    EXIT_OK,
    EXIT_USAGE,
    ArchiveNotFound,
    UsageError,
)


class Parser(argparse.ArgumentParser):
    """Usage errors exit 2 with one line and a suggestion; no abbreviated flags (``--no-encrypt``
    must not silently mean ``--no-encryption``)."""

    _seen: list[str] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._seen = list(sys.argv[1:] if args is None else args)
        ns, extra = super().parse_known_args(args, namespace)
        problem = list_file_problem(getattr(ns, "list_file", None))
        if problem:  # a usage error at once, before any probe: not a failure after the run's writes
            self.error(problem)
        return ns, extra

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


@dataclass
class Output:
    """How this command prints its result, set by ``main`` from the shared flags."""

    command: str = ""
    json: bool = False  # --json: one JSON object on stdout, nothing else there
    list_paths: bool = False  # --list: every path after the summary
    list_file: str | None = None  # --list-file PATH: the paths go there
    stdout: TextIO | None = None  # the real stdout (with --json, print() goes to stderr)
    emitted: bool = False
    list_spool: str | None = None  # --list of a restore or failover: the sealed spool its flow wrote

    def reset(self, **kwargs: Any) -> None:
        _close_list_spool()
        self.__dict__.update(Output(**kwargs).__dict__)


OUTPUT = Output()
#: The private staging directory holding OUTPUT.list_spool while the command runs.
_LIST_DIR = contextlib.ExitStack()

#: Conflicts listed without --list (the summary holds the count).
CONFLICTS_SHOWN = 20


def emit_json(obj: dict[str, Any]) -> None:
    """Print the run summary as one JSON object on the real stdout (``--json``)."""
    out = OUTPUT.stdout or sys.stdout
    out.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    out.flush()
    OUTPUT.emitted = True


def report_json(summary: dict[str, Any], code: int) -> bool:
    """With ``--json``: print ``summary`` (plus the command and exit code) and return True."""
    if not OUTPUT.json:
        return False
    emit_json({**summary, "command": OUTPUT.command, "exit_code": code})
    return True


def write_list(lines: list[str], what: str) -> None:
    """The long list of a run (planned creates, kept archives): on stdout after the summary
    with ``--list``, into a file with ``--list-file``, else only a hint that it exists."""
    if OUTPUT.list_file:
        with open(os.path.expanduser(OUTPUT.list_file), "w") as f:
            f.writelines(line + "\n" for line in lines)
        print(f"burrow: wrote {len(lines)} {what} lines to {OUTPUT.list_file}", file=sys.stderr)
    elif OUTPUT.list_paths:
        for line in lines:
            print(line)
    elif lines:
        print(f"burrow: {len(lines)} {what} lines not shown (--list shows them, --list-file PATH saves them)",
              file=sys.stderr)


def list_parameters() -> dict[str, Any]:
    """The flow parameters that make a restore or failover write its list of creates.

    The flow writes the list itself, streamed from its plan's spool, while the plan is still
    on disk (the list can be millions of lines: it is never held in memory, nor returned in
    the summary). ``--list-file PATH``: into PATH, checked here first (a usage error before
    anything runs, not a failure after the writes). ``--list``: into a sealed spool in a
    private staging directory of this process, printed after the summary by
    :func:`report_restore`. Neither (or ``--json`` without ``--list-file``): nothing."""
    if OUTPUT.list_file:
        problem = list_file_problem(OUTPUT.list_file)  # (the parser said so already: for direct calls)
        if problem:
            raise UsageError(problem)
        return {"list_file": os.path.abspath(os.path.expanduser(OUTPUT.list_file))}
    if OUTPUT.list_paths and not OUTPUT.json:
        from burrow.staging import staging_dir

        _close_list_spool()
        folder = _LIST_DIR.enter_context(staging_dir())
        OUTPUT.list_spool = str(folder / "list.sealed")
        return {"list_file": OUTPUT.list_spool, "list_sealed": True}
    return {}


def list_file_problem(list_file: str | None) -> str | None:
    """Why ``--list-file`` cannot be written (a usage error), else None."""
    if not list_file:
        return None
    path = os.path.abspath(os.path.expanduser(list_file))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        return f"--list-file {list_file}: is a directory; name a file"
    if not os.path.isdir(folder):
        return f"--list-file {list_file}: the directory {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"--list-file {list_file}: not writable"
    return None


def _close_list_spool() -> None:
    """Remove the --list spool and its staging directory (also at exit, should a run fail)."""
    OUTPUT.list_spool = None
    _LIST_DIR.close()


def _print_list_spool(path: str) -> int:
    """Stream the lines of the --list spool the flow wrote to stdout; how many there were."""
    from burrow.staging import open_spool_reader

    n = 0
    out = sys.stdout
    with open_spool_reader(path) as f:
        for line in f:
            out.write(line.decode("utf-8"))
            n += 1
    out.flush()
    return n


def report_list(summary: dict[str, Any], dry_run: bool) -> None:
    """The list of a restore's or failover's creates, every line, as the flow wrote it (see
    :func:`list_parameters`): on stdout with ``--list``, a note with ``--list-file``, else (a
    dry run) a hint that counts every line the list would have."""
    lines = summary.get("list_lines")
    if summary.get("list_error"):
        return  # the flow warned already
    if OUTPUT.list_file:
        if lines is not None:
            print(f"burrow: wrote {lines} create lines to {OUTPUT.list_file}", file=sys.stderr)
    elif OUTPUT.list_spool:
        try:
            if lines is not None:
                _print_list_spool(OUTPUT.list_spool)
        finally:
            _close_list_spool()
    elif dry_run and not OUTPUT.json:
        n = int(summary.get("planned_create") or 0) + int(summary.get("planned_intermediate") or 0)
        if n:
            print(f"burrow: {n} create lines not shown (--list shows them, --list-file PATH saves them)",
                  file=sys.stderr)


def add_write_keys(p: argparse.ArgumentParser) -> None:
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


def add_read_keys(p: argparse.ArgumentParser) -> None:
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


def read_refs(args: argparse.Namespace) -> dict[str, Any]:
    """Key references as flow parameters (paths and names only, never key material)."""
    return {
        "key_files": [os.path.abspath(os.path.expanduser(f)) for f in args.key_file] or None,
        "identity_files": [os.path.abspath(os.path.expanduser(f)) for f in args.identity] or None,
        "passphrase_env": args.passphrase_env,
        "key_env": args.key_env,
        "key_block": args.key_block,
    }


def write_refs(args: argparse.Namespace) -> dict[str, Any]:
    """The write keys of ``add_write_keys``'s flags as flow parameters (absolute paths and names,
    never key material), checked first: no key, a missing key file or two modes are usage errors
    before a flow starts (backup and capture take the same keys)."""
    from blocks.keys import backup_write_keys
    from burrow.keys import KeyRefs

    def absolute(p: str) -> str:
        return os.path.abspath(os.path.expanduser(p))

    recipients = [r if r.startswith("burrow-x25519:") else absolute(r) for r in args.recipient]
    key_file = absolute(args.key_file) if args.key_file else None
    backup_write_keys(not args.no_encryption, KeyRefs(
        key_files=[key_file] if key_file else [], key_env=args.key_env, recipients=recipients,
        passphrase_env=args.passphrase_env, block=args.key_block,
    ))
    return {"encryption": not args.no_encryption, "key_file": key_file, "key_env": args.key_env,
            "recipients": recipients or None, "passphrase_env": args.passphrase_env, "key_block": args.key_block}


def keyring(refs: dict[str, Any]) -> Any:
    from blocks.keys import archive_keys

    return archive_keys(**refs)



def print_summary(summary: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    for k, v in summary.items():
        if k in skip or v in (None, [], {}):
            continue
        if isinstance(v, (dict, list, tuple)):  # written out (``cli, by user@host``), never a repr
            from burrow.report import value_text

            v = value_text(k, v)
        print(f"{k}: {v}", file=sys.stderr)



def report_restore(summary: dict[str, Any], dry_run: bool) -> int:
    """Print a restore or failover summary on stdout, summary first; return the exit code.

    The counts come first. Conflicts follow (up to CONFLICTS_SHOWN of them; all with
    ``--list``); then every planned create with ``--list`` (or into ``--list-file``), on
    real and dry runs alike (:func:`report_list`). With ``--json`` the whole summary is one
    JSON object instead (``--list-file`` is still written)."""
    code = EXIT_CONFLICTS if summary.get("conflicts") and not dry_run else EXIT_OK
    if report_json(summary, code):
        _restore_notes(summary, dry_run, paths=False)
        report_list(summary, dry_run)
        return code
    if dry_run:
        print(f"dry run: nothing was written to {summary['target']}")
    keys = [
        "planned_create", "planned_intermediate", "created", "intermediate_created", "identical",
        "conflicts", "outside_subtree", "metadata_not_carried",
    ]
    print(", ".join(f"{k}={summary[k]}" for k in keys if k in summary))
    conflicts = list(summary.get("conflict_paths") or [])
    shown = conflicts if OUTPUT.list_paths else conflicts[:CONFLICTS_SHOWN]
    for p in shown:
        print(f"conflict {p}")
    if len(shown) < len(conflicts):
        print(f"burrow: {len(conflicts) - len(shown)} more conflicts not shown (--list shows all)", file=sys.stderr)
    report_list(summary, dry_run)
    _restore_notes(summary, dry_run, paths=True)
    return code


def _restore_notes(summary: dict[str, Any], dry_run: bool, paths: bool) -> None:
    """Warnings and ACL notes of a restore (stderr), and their paths (stdout) unless ``--json``."""
    for w in summary.get("warnings") or []:
        print(f"burrow: warning: {w}", file=sys.stderr)
    if summary.get("acl_restricted"):
        print(f"burrow: {summary['acl_restricted']} nodes were given an ACL only the restoring identity holds "
              "(their archived ACL could not be used); re-apply the real ACL:", file=sys.stderr)
        for p in (summary.get("acl_restricted_paths") or []) if paths else []:
            print(f"restricted {p}")
    if summary.get("acl_not_applied"):
        print(f"burrow: {summary['acl_not_applied']} nodes kept their restorer-only ACL because the archived ACL "
              "could not be set after their children:", file=sys.stderr)
        for p in (summary.get("acl_not_applied_paths") or []) if paths else []:
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


def catalog_rows(store_ref: str, keys: Any) -> tuple[Any, list[dict[str, Any]]]:
    from blocks.resolve import store_from_ref
    from tasks.catalog import describe_archives

    store = store_from_ref(store_ref)
    return store, describe_archives(store, keys if keys.keyring else None)


def latest(store_ref: str, source: str, keys: Any, allow_unencrypted: bool = False) -> str:
    """The URL of the newest archive of ``source`` whose claims can be trusted."""
    return latest_row(store_ref, source, keys, allow_unencrypted)["url"]


def latest_row(store_ref: str, source: str, keys: Any, allow_unencrypted: bool = False) -> dict[str, Any]:
    """The catalog row of the newest archive of ``source`` whose claims can be trusted (the
    selector failover and rehearse use: tasks/catalog.py ``select_archives``)."""
    from tasks.catalog import select_archives

    store, rows = catalog_rows(store_ref, keys)
    newest = select_archives(rows, source, keyed=bool(keys.keyring), allow_unencrypted=allow_unencrypted).newest
    if newest is None:
        sources = sorted({str(r.get("source")) for r in rows if r.get("source")})
        held = f" (the store holds: {', '.join(sources)})" if sources else " (the store holds no readable archive)"
        raise ArchiveNotFound(f"no good archive of source {source!r} in {store.describe()}{held}")
    return newest
