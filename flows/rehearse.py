"""The rehearse flow: prove that a backup restores.

Restore an archive (the newest trusted one of ``source`` by default) into an empty scratch
target, compare every key and value with the archive, measure how long the restore took
(download, validation, plan and replay: the real RTO), clean the scratch target up, and
record the result next to the archive as a marker (tasks/markers.py), MACed with a reader
key (derived from the configured secret key: a backup worker with public keys only cannot
make one) and bound to the archive's name and manifest. ``burrow list``/``status`` show the
markers, and failover prefers a recent archive with an authenticated, passing one. The
marker, the artifact and the ``burrow.rehearsal.*`` events never carry a key path: a failure
is named by its class and a count, the paths stay in the run's logs.

For backups encrypted to X25519 public keys, the backup worker can only check structure;
a scheduled rehearsal where the identity lives is their full verification.

Parameters are block-friendly and never secret: a store, a source name, a scratch target
(URL without credentials or a saved block's name) and key references (paths, variable and
block names).
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect.runtime import flow_run

from blocks.keys import archive_keys
from blocks.resolve import archive_from_ref, scheme_of, source_from_ref, store_from_ref
from burrow import naming, report
from burrow.archive import ArchiveReader
from burrow.errors import ArchiveError, ArchiveNotFound, BurrowError, KeyMismatch, UsageError
from burrow.runlog import logger
from burrow.staging import staging_dir
from flows.common import Ref, burrow_flow, recorded_run, source_lock, store_block_name
from flows.restore import plan_and_replay, target_lock_name
from tasks.catalog import catalog, select_archives
from tasks.download import download
from tasks.markers import build_marker, write_marker
from tasks.rehearse import check_scratch, clean_scratch, compare_scratch, public_error
from tasks.validate import validate


def _run_name() -> str:
    p = flow_run.parameters
    return f"rehearse-{naming.slug(str(p.get('source', 'source')))}-{naming.stamp()}"


@burrow_flow(name="rehearse", flow_run_name=_run_name, persist_result=False)
def rehearse(
    store: Ref,
    source: str,
    scratch: Ref,
    archive: Ref | None = None,
    key_files: list[str] | None = None,
    identity_files: list[str] | None = None,
    passphrase_env: str | None = None,
    key_env: str | None = None,
    key_block: str | None = None,
    allow_unencrypted: bool = False,
    at: str | None = None,
) -> dict[str, Any]:
    """Rehearse a restore of ``source``'s newest trusted archive in ``store`` (or of
    ``archive``) into the empty ``scratch`` target; returns the run summary.

    The run fails (and the marker says so) when the archive does not validate, the restore
    fails, or the scratch copy differs from the archive. A scratch target that holds keys is
    refused before anything is written, and a key that opens no archive stops the run: in
    both cases no marker is written (neither says anything about the archive).

    ``at`` (``latest``, or an ISO 8601 time): rehearse the point instead, the archive plus the
    change chain up to it (as ``restore --at``): the scratch copy is compared with the state at
    the point, and the marker of the point's start archive records the rehearsal."""
    log = logger()
    point_at = at  # (``at`` below is the rehearsal's own time)
    summary: dict[str, Any] = {"status": "failed", "source": source}
    lists: dict[str, list[str]] = {}
    steps = report.Steps()

    def _publish() -> None:
        # No key path leaves the run's logs: the artifact gets counts (the lists of paths, and
        # the plan's warnings, which name keys, are logged instead), the marker and the event a
        # path-free error (tasks/rehearse.py public_error).
        summary["steps_s"] = dict(steps.seconds)
        rows = {k: v for k, v in summary.items()
                if not k.endswith("_paths") and k not in ("warnings", "status", "error", "steps_s")}
        if summary.get("warnings"):
            rows["plan_warnings"] = len(summary["warnings"])
            for w in summary["warnings"]:
                log.warning("rehearse: plan: %s", w)
        for title, paths in lists.items():
            if paths:
                rows[f"{title}: count"] = len(paths)
                log.info("rehearse: %s: %s", title, ", ".join(paths))
        outcome = f"rehearsal of {source}: " + ("passed" if summary["status"] == "ok" else report.done_word(summary))
        if summary["status"] == "ok":
            outcome += (f", {report.count(summary.get('compared'), 'key')} restored and compared, "
                        f"RTO {report.seconds(summary.get('rto_s'))}")
        report.publish(f"rehearsal-{naming.slug(source)}", outcome, rows, steps=steps.rows())

    with recorded_run("rehearsal", summary, _publish, progress_title=f"rehearsal of {source}"):
        st = store_from_ref(store)
        target = source_from_ref(scratch)
        summary.update(store=st.describe(), scratch=target.describe(), scratch_service=target.service)
        for role, ref in (("store", store if store_block_name(store) else None),
                          ("scratch", scratch if scheme_of(scratch) is None else None)):
            if ref:
                summary[f"{role}_block"] = ref  # the event's resource names the saved block
        keys = archive_keys(key_files, identity_files, passphrase_env, key_env, key_block)
        keyed = bool(keys.keyring)
        if archive:
            st, name = _in_store(st, *archive_from_ref(archive))
            row: dict[str, Any] = {"name": name, "url": st.url(name)}
        else:
            row = _newest(st, source, keys if keyed else None, keyed, allow_unencrypted)
            name = row["name"]
        summary.update(archive=row["url"], archive_created=row.get("created"))
        log.info("rehearse: %s into %s", row["url"], target.describe())
        # The scratch target is locked (its per-cluster limit, as a restore target is) from the
        # emptiness check to the end of the cleanup: two rehearsals never share it at once.
        with source_lock(target_lock_name(scratch, target)):
            prepared = check_scratch(target)  # refuses a scratch target that holds keys: nothing written

            at = datetime.now(UTC)
            outcome: dict[str, Any] = {"ok": False, "error": None, "restore_s": 0.0, "keys": 0}
            manifest: dict[str, Any] = {k: row.get(k) for k in ("manifest_sha256", "content_sha256", "source")}
            mark = True
            touched = False
            with staging_dir() as work:
                local = None
                chain_end = None  # a chain's end from its last resync, rehearsed after the archive
                started = time.monotonic()
                stage = "download"  # what a failure is reported as (public_error: no key path)
                try:
                    with steps.step("download"):
                        local = download(st, name, str(work))
                    stage = "validate"
                    # the archive must be the one its catalog row (perhaps from the index) described
                    with steps.step("validate"):
                        manifest = validate(local, keys, label=row["url"], allow_unencrypted=allow_unencrypted,
                                            expect_manifest_sha256=row.get("manifest_sha256"))
                    if archive and manifest.get("source") != source:
                        mark = False
                        raise UsageError(
                            f"{row['url']} is an archive of {manifest.get('source')!r}, not of {source!r}; nothing was written"
                        )
                    if keys.opened_by:
                        summary["decrypted_with"] = keys.opened_by
                    summary.update(service=manifest["service"], archive_keys=manifest["keys"], keys=manifest["keys"],
                                   content_sha256=manifest["content_sha256"])
                    state, state_keys = local, keys
                    if point_at is not None:  # a point: the archive plus the change chain up to it
                        stage = "validate"
                        with steps.step("validate"):
                            state, state_keys, state_manifest, chain_end = _point_state(
                                st, source, name, point_at, local, keys, work, allow_unencrypted, summary)
                        summary.update(keys=state_manifest["keys"])
                    touched = True
                    restored_at = _restore_and_compare(state, state_keys, target, work, summary, lists, steps,
                                                       row["url"])
                    stage = "own"  # (the flow's own messages: counts and URLs only)
                    restore_s = restored_at - started
                    outcome.update(restore_s=restore_s, keys=summary["keys"], ok=True)
                    summary.update(rto_s=round(restore_s, 3), restore_s=round(restore_s, 3))
                except KeyMismatch:
                    mark = False  # a key problem says nothing about the archive
                    raise
                except UsageError:
                    mark = False
                    raise
                except _Failed as failed:
                    outcome["error"] = failed.public
                    raise failed.error from None
                except BurrowError as exc:
                    public = public_error(exc, stage)
                    outcome["error"] = public
                    if public != str(exc):  # the full message (it names keys) stays in the run's logs
                        log.error("rehearse: %s: %s", public, exc)
                        raise _public(exc, public) from None
                    raise
                finally:
                    if touched:
                        with steps.step("cleanup"):
                            _cleanup(target, prepared, work, summary, lists)
                    if mark:
                        _mark(st, name, row, manifest, local, keys, at, outcome, target.describe(), summary)
                if chain_end is not None:
                    _rehearse_chain_end(st, chain_end, target, Path(work), keys, allow_unencrypted, summary, lists,
                                        steps)
        summary["status"] = "ok"
        return summary


def _rehearse_chain_end(st: Any, point: Any, target: Any, work: Path, keys: Any, allow_unencrypted: bool,
                        summary: dict[str, Any], lists: dict[str, list[str]], steps: report.Steps) -> None:
    """After the archive passed (its marker written): the change chain's end, which a ZooKeeper
    or Consul chain holds from its last resync (the whole state listed afresh, so the archive is
    no part of it), restored into the scratch target, empty again, compared key by key and cleaned
    up, as ``failover --at latest`` would restore it. Its counts go into ``summary["chain"]``; a
    difference or a failure fails the run with a path-free error (the archive's marker stands: the
    archive itself restored)."""
    from burrow import segments
    from tasks.chain import materialize

    end = point.segments[-1].last_time
    chain: dict[str, Any] = {"segments": len(point.segments), "at_time": segments.us_to_iso(end)}
    summary.update(chain=chain, at_time=chain["at_time"], segments=len(point.segments))
    sub = work / "chain-end"
    sub.mkdir()
    prepared = check_scratch(target)
    done: dict[str, Any] = {}  # the plan's and the replay's counts
    mine: dict[str, list[str]] = {}
    touched = False
    try:
        with steps.step("chain"):
            try:
                state, state_keys, state_manifest = materialize(st, point, None, keys, str(sub), allow_unencrypted)
            except BurrowError as exc:
                raise _Failed.of(exc, "validate", "the change chain's end") from None
            chain["keys"] = done["keys"] = state_manifest["keys"]
            touched = True
            _restore_and_compare(state, state_keys, target, sub, done, mine, None, "the change chain's end")
        chain.update({k: done[k] for k in ("compared", "scratch_missing", "scratch_changed", "scratch_extra")})
        logger().info("rehearse: the change chain's end (%d segments, to %s) restored and compared: %d keys",
                      len(point.segments), segments.show_time(end), chain["compared"])
    except _Failed as failed:
        chain["error"] = failed.public
        raise failed.error from None
    finally:
        if touched:
            _cleanup(target, prepared, sub, chain, mine)
        for title, paths in mine.items():
            lists[f"Chain end: {title}"] = paths


class _Failed(Exception):
    """A scratch restore that failed: the error to raise (path-free) and its public text."""

    def __init__(self, error: BurrowError, public: str) -> None:
        super().__init__(public)
        self.error, self.public = error, public

    @classmethod
    def of(cls, exc: BurrowError, stage: str, what: str) -> _Failed:
        """``exc`` as the rehearsal reports it: its text when it names no key, else the stage's
        public line (the full message stays in the run's logs)."""
        public = public_error(exc, stage)
        if public != str(exc):
            logger().error("rehearse: %s: %s: %s", what, public, exc)
            return cls(_public(exc, public), public)
        return cls(exc, public)


def _restore_and_compare(state: str, state_keys: Any, target: Any, work: Path, summary: dict[str, Any],
                         lists: dict[str, list[str]], steps: report.Steps | None, label: str) -> float:
    """The rehearsal's proof, of an archive or of a change chain's end (``state``): restored into
    the empty scratch target, no conflict, then compared key by key. The counts go into
    ``summary``, the differing paths into ``lists``; ``_Failed`` on a failure or a difference (a
    key or usage problem is raised as it is: it says nothing about the archive). ``steps``: the
    run's steps, timed as ``restore`` and ``compare`` (None: the caller times them). Returns when
    the replay ended (``time.monotonic()``)."""
    def step(name: str) -> Any:
        return steps.step(name) if steps is not None else contextlib.nullcontext()

    stage = "restore"
    try:
        with step("restore"):
            plan_and_replay(state, target, work, state_keys, summary, lists, dry_run=False, subtree=None, maps=None)
        restored_at = time.monotonic()
        stage = "own"  # (the flow's own messages: counts and URLs only)
        if summary.get("conflicts"):
            raise ArchiveError(
                f"the scratch target {target.describe()} held {summary['conflicts']} of the keys of {label} with other "
                "values (written there during the rehearsal?): the rehearsal proves nothing")
        stage = "compare"
        with step("compare"):
            cmp = compare_scratch(state, target, str(work), state_keys, int(summary.get("intermediate_created") or 0),
                                  label=label)
        stage = "own"
        d = cmp.drift
        summary.update(compared=d.archive_keys, scratch_missing=d.removed, scratch_changed=d.changed,
                       scratch_extra=d.added)
        lists["Missing in the scratch restore"] = d.removed_paths
        lists["Changed in the scratch restore"] = d.changed_paths
        lists["Extra in the scratch restore"] = d.added_paths
        if not cmp.ok:
            raise ArchiveError(f"the scratch restore differs from {label}: {cmp.problem}")
    except (KeyMismatch, UsageError):
        raise
    except BurrowError as exc:
        raise _Failed.of(exc, stage, label) from None
    return restored_at


def _point_state(st: Any, source: str, name: str, at: str, local: str, keys: Any, work: Any,
                 allow_unencrypted: bool, summary: dict[str, Any]) -> tuple[str, Any, dict[str, Any], Any]:
    """The state at ``at`` (``latest`` or a time) from the archive ``name`` (at ``local``) and the
    source's change chain (tasks/chain.py), every segment checked, and a chain's end to rehearse
    after the archive (or None). A point that does not start from this archive is refused: the
    marker would name the wrong one."""
    from burrow import segments
    from tasks.chain import has_chain, materialize, resolve_point_task

    at_time = None if at == "latest" else segments.parse_point(at)
    point = None
    if at != "latest" or has_chain(st, source, keys, allow_unencrypted):
        point = resolve_point_task(st, source, keys, at_time=at_time, latest=at == "latest",
                                   allow_unencrypted=allow_unencrypted)
    if at == "latest" and (point is None or point.start_name != name):
        # The daily rehearsal asks for ``latest``. With no chain, or one whose latest point does
        # not start from this archive, the archive alone is rehearsed: the rehearsal's marker is
        # the archive's. A ZooKeeper/Consul chain that continues this archive holds its latest
        # point from a resync (the whole state): that point is rehearsed after the archive, as a
        # failover --at latest would restore it.
        summary.update(at="latest", segments=0)
        later = None
        if point is not None and point.start_name is None and point.segments and all(
                s.base_name == name for s in point.segments):
            later = point
            logger().info("rehearse: the change chain of %s continues the archive from a resync: rehearsing the "
                          "archive, then the chain's end", source)
        else:
            logger().info("rehearse: no change chain of %s starts its latest point from the archive: rehearsing "
                          "the archive alone", source)
        return local, keys, {"keys": summary["keys"]}, later
    assert point is not None
    if point.start_name != name:
        raise UsageError(f"the point {at} of {source!r} starts from {point.start_name or 'a resync'}, not from the "
                         "archive being rehearsed; nothing was written")
    state, state_keys, state_manifest = materialize(st, point, local, keys, str(work), allow_unencrypted)
    end = point.segments[-1].last_time if point.segments else None
    summary.update(at=at, segments=len(point.segments),
                   at_time=segments.us_to_iso(at_time if at_time is not None else end) if (at_time or end) else None)
    return state, state_keys, state_manifest, None


def _public(exc: BurrowError, public: str) -> BurrowError:
    """``exc``'s class (the exit code depends on it) with the path-free message ``public``."""
    try:
        return type(exc)(public)
    except TypeError:  # a class with another constructor
        return BurrowError(public)


def _in_store(st: Any, ast: Any, name: str) -> tuple[Any, str]:
    """The archive ``name`` of ``ast`` as an archive of the store ``st`` when it is one (so its
    marker is named as ``list`` names the archive), else as given."""
    url = ast.url(name)
    for info in st.list():
        if info.url == url:
            return st, info.name
    return ast, name


def _newest(st: Any, source: str, keys: Any, keyed: bool, allow_unencrypted: bool) -> dict[str, Any]:
    """The newest archive of ``source`` whose claims can be trusted (the selector failover,
    ``restore --latest`` and ``status`` use: by signed time, bound to its name)."""
    rows = catalog(st, keys)
    newest = select_archives(rows, source, keyed=keyed, allow_unencrypted=allow_unencrypted).newest
    if newest is None:
        held = sorted({str(r["source"]) for r in rows if r.get("source") and not r.get("error")})
        raise ArchiveNotFound(
            f"no trusted archive of source {source!r} in {st.describe()}"
            + (f" (it holds: {', '.join(held)})" if held else " (it holds no readable archive)")
        )
    return newest


def _cleanup(target: Any, prepared: Any, work: Any, summary: dict[str, Any], lists: dict[str, list[str]]) -> None:
    """Remove what the rehearsal restored; a failure is reported, never hides the run's outcome."""
    # The restore's plan spool lists every key it created (tasks/plan.py names it plan.jsonl in
    # the work directory): cleanup deletes exactly those.
    restored = Path(work) / "plan.jsonl"
    try:
        cleaned = clean_scratch(target, prepared, str(work), str(restored) if restored.exists() else None)
    except BurrowError as exc:
        logger().error("rehearse: cleaning up %s failed: %s", target.describe(), exc)
        summary["cleanup_error"] = public_error(exc, "cleanup")
        return
    summary.update(cleanup_deleted=cleaned["deleted"], cleanup_left=cleaned["left"])
    if cleaned.get("no_plan"):
        summary["cleanup"] = "no restore plan was made: nothing was written, nothing deleted"
    lists["Left in the scratch target (changed or added meanwhile)"] = cleaned["left_paths"]


def _mark(
    st: Any, name: str, row: dict[str, Any], manifest: dict[str, Any], local: str | None, keys: Any,
    at: datetime, outcome: dict[str, Any], scratch: str, summary: dict[str, Any],
) -> None:
    """Write the rehearsal's marker next to the archive: MACed with the reader key of the
    configured secret key (tasks/markers.py), bound to the archive's full name in the store and
    its manifest checksum; unauthenticated when no secret key is configured."""
    if not manifest.get("manifest_sha256") and local is not None:
        try:  # (a pinned archive that failed validation: bind the marker to the manifest it has)
            with open(local, "rb") as f:
                manifest = dict(manifest, manifest_sha256=ArchiveReader(f, label=row["url"]).manifest.get("manifest_sha256"))
        except (OSError, BurrowError):
            pass
    details = {k: summary[k] for k in ("created", "intermediate_created", "compared", "scratch_missing",
                                       "scratch_changed", "scratch_extra") if k in summary}
    marker = build_marker(
        name, manifest, at=at, ok=outcome["ok"], keys=outcome["keys"], restore_s=outcome["restore_s"],
        scratch=scratch, error=outcome["error"], details=details, signer=keys,
    )
    try:
        summary["marker"] = write_marker(st, name, marker)
        summary["marker_authenticated"] = "mac" in marker
    except BurrowError as exc:
        logger().error("rehearse: the marker could not be written next to %s: %s", row["url"], exc)
        summary["marker_error"] = str(exc)
        if outcome["ok"]:
            raise  # a rehearsal whose result is not recorded proves nothing to list, status or failover
