"""The failover flow: rebuild a cluster from an archive of a source, as a guarded drill.

"DC-US is down: rebuild its ZooKeeper in DC-EU from the latest verified backup." Steps, each a
task with its own retries, each timed and reported in the artifact:

1. **Preflight** (tasks/preflight.py). Nothing is written if any check fails, and every
   refusal names the flag that overrides it. The target is checked first (reachable),
   before any archive is listed or downloaded; it is written to (the writability check's
   scratch key) only once the wrong-cluster guard passed: the archive's service is the
   target's (or ``cross_service``) and the target holds no more than ``foreign_keys_max``
   percent of the archive's key count outside the archive's paths. Candidates (the source's trusted
   archives by signed time, newest first, a rehearsed one first only when it is within
   ``prefer_rehearsed_within`` of the newest; or the one ``archive`` pins) are downloaded
   and validated in turn: a missing, corrupt, truncated or too old one is skipped with its
   reason and the next older one is tried. A key that opens none stops the run (failing over
   to stale data because of a key problem would be worse). The split-brain guard probes the
   failed primary and refuses while it answers; the sanity check refuses an archive whose key
   count fell by more than half against the previous archive (both unless ``force``).
2. **Plan, then restore** under the safety rule: create-only, conflicts reported. Under a
   deployment, a plan with conflicts pauses the run for on-call approval first.
3. **Post-verify** (tasks/postverify.py): the target is re-read; every selected archived key
   must be there with its archived value, except the reported conflicts.
4. **Report**: the artifact and summary give the RPO (``rpo_s``: the archive's age at
   failover) and the RTO (``rto_s``: the run's machine time, its duration less the on-call's
   approval wait, which is reported beside it as ``approval_wait_s``; ``steps_s``: each step's time),
   and the event ``burrow.failover.completed`` / ``.failed`` names source, target and archive.

Idempotent: a re-run after an interruption creates only what is still missing. The archive
is named on stdout and in the artifact so a re-run can pin it with ``archive``.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.input import RunInput
from prefect.runtime import deployment, flow_run
from pydantic import Field

from blocks.keys import archive_keys
from blocks.resolve import scheme_of, source_from_ref, store_from_ref
from burrow import naming, report
from burrow.errors import ArchiveError, ArchiveNotFound, KeyMismatch, UsageError
from burrow.runlog import logger
from burrow.staging import staging_dir
from flows.common import Ref, burrow_flow, recorded_run, source_lock, store_block_name
from flows.restore import (
    conflict_rows,
    plan_summary,
    publish_summary,
    replay_summary,
    run_key,
    save_list,
    target_lock_name,
    target_name,
)
from tasks.catalog import Selection, catalog, created_at, select_archives
from tasks.chain import has_chain
from tasks.download import download
from tasks.journal import close_journal, record_choice, unfinished_failover
from tasks.markers import annotate_task, rehearsal_text
from tasks.plan import plan as plan_task
from tasks.postverify import PostVerifyFailed, postverify
from tasks.preflight import (
    FOREIGN_KEYS_MAX_PCT,
    FailoverRefused,
    cluster_guard,
    previous_archive,
    primary_block,
    primary_guard,
    rehearsed,
    rpo_problem,
    sanity_problem,
    target_check,
)
from tasks.replay import replay
from tasks.undo import undo_sink
from tasks.validate import validate

#: Seconds between two checks of a paused run for the on-call's answer.
APPROVAL_POLL_S = 2

#: The summary of the failover this process runs now (``summary``): the CLI reads the chosen
#: archive from it when the run is interrupted, as the exception a signal raises may be a new one
#: that carries nothing (Prefect re-delivers a SIGTERM to the handler it replaced).
RUNNING: dict[str, dict[str, Any]] = {}


class FailoverApproval(RunInput):
    """The on-call's answer when a failover's plan finds conflicts (existing keys in the
    target that differ from the archive and will be left as they are). The approver's name and
    a comment are required: Prefect's API refuses a resume without them (the run stays paused),
    and both go into the run's summary, artifact, facts and ``burrow.failover.*`` event."""

    approve: bool = False
    approver: str = Field(min_length=1, max_length=200, pattern=r"\S",
                          description="Your name: who approves (or aborts) this failover")
    comment: str = Field(min_length=1, max_length=2000, pattern=r"\S",
                         description="Why: what you checked in the conflicts table")


def _run_name() -> str:
    p = flow_run.parameters
    kind = "failover-dry-run" if p.get("dry_run") else "failover"
    return f"{kind}-{naming.slug(str(p.get('source', 'source')))}-to-{naming.slug(str(p.get('into', 'target')))}"


@dataclass
class _Run:
    """What a failover run gathers for its report as it goes: the summary, each step's time,
    the artifact's lists, the skipped candidates and the preflight lines (stdout)."""

    summary: dict[str, Any]
    dry_run: bool
    steps: report.Steps = field(default_factory=report.Steps)
    lists: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    preflight: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.summary["steps_s"] = self.steps.seconds

    def step(self, name: str) -> AbstractContextManager[None]:
        """Time one step into ``steps_s`` (the RTO's parts)."""
        return self.steps.step(name)

    def publish(self) -> None:
        # the RTO is machine time: the on-call's approval wait (the paused run) is reported beside it
        waited = self.steps.seconds.get("approval", 0.0)
        self.summary["rto_s"] = round(max(0.0, time.monotonic() - self.started - waited), 3)
        self.summary["approval_wait_s"] = round(waited, 3)
        self.summary["skipped"] = list(self.skipped)
        self.summary["preflight"] = list(self.preflight)
        publish_summary("failover", self.summary, self.lists, self.dry_run, steps=self.steps.rows(),
                        preflight=self.preflight)


@dataclass
class _Limits:
    """The run's durations and bounds, parsed before anything is contacted (a malformed one is
    a usage error, never a failed probe)."""

    max_age: timedelta | None
    resume_within: timedelta
    prefer_rehearsed_within: timedelta
    max_candidates: int


@dataclass
class _Choice:
    """The candidates to try, in order, and what chose them."""

    candidates: list[dict[str, Any]]
    trusted: list[dict[str, Any]]
    resumed: dict[str, Any] | None = None  # the unfinished failover's journal record
    resumed_row: dict[str, Any] | None = None  # ... and its archive among the candidates


@burrow_flow(name="failover", flow_run_name=_run_name, persist_result=False)
def failover(
    source: str,
    store: Ref,
    into: Ref,
    primary: Ref | None = None,
    archive: Ref | None = None,
    max_age: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    subtree: str | None = None,
    maps: list[str] | None = None,
    max_candidates: int = 5,
    key_files: list[str] | None = None,
    identity_files: list[str] | None = None,
    passphrase_env: str | None = None,
    key_env: str | None = None,
    key_block: str | None = None,
    allow_unencrypted: bool = False,
    approval_timeout_s: int = 3600,
    prefer_rehearsed_within: str = "2h",
    resume: bool = True,
    resume_within: str = "6h",
    list_file: str | None = None,
    list_sealed: bool = False,
    cross_service: bool = False,
    foreign_keys_max: float = FOREIGN_KEYS_MAX_PCT,
    full_only: bool = False,
) -> dict[str, Any]:
    """Fail ``source`` (the source name its backups record) over from ``store`` into ``into``.

    ``primary``: the failed cluster (URL or block) to probe; by default the source name when
    it is a URL or saved block, else the source URL the archive's manifest records.
    ``archive``: pin the archive (its URL or name in the store) instead of choosing one.
    ``max_age``: refuse archives older than this (``90s``, ``30m``, ``26h``, ``7d``).
    ``resume``: finish an interrupted failover of the same source into the same target with
    the archive it chose (its signed journal record, tasks/journal.py), when that record is
    at most ``resume_within`` old (default 6h); ``resume=False`` chooses afresh.
    ``prefer_rehearsed_within``: an archive with a passing, authenticated rehearsal is tried
    before the newest only when it is at most this much older than the newest.
    ``cross_service``: restore an archive of one service into another on purpose (else the
    wrong-cluster guard refuses). ``foreign_keys_max``: the percent of the archive's key count
    the target may already hold outside the archive's paths (default 1) before the guard refuses.
    ``force``: fail over although the primary still answers, the archive's key count fell by
    more than half, or the wrong-cluster guard refuses. A ``dry_run`` runs every read-only check and the plan, and writes nothing
    (not even the scratch key of the writability check). ``list_file``/``list_sealed``: every
    planned create's line, as in flows/restore.py (``--list``, ``--list-file``). Returns the
    run summary.

    When the source has a change chain (``burrow capture``) that continues the chosen archive,
    the failover restores ``--at latest``: the archive plus the chain's changes up to its end
    (every segment checked before anything is written), and the preflight gives the RPO of the
    chain's end beside the archive's. ``full_only`` restores the archive alone.
    """
    run = _Run({"status": "failed", "source": source, "dry_run": dry_run, "force": force}, dry_run)
    summary = run.summary
    RUNNING["summary"] = summary
    title = f"failover of {source} into {into if scheme_of(into) is None else naming.redact_url(into)}"
    try:
        with recorded_run("failover", summary, run.publish, progress_title=title):
            limits = _limits(max_age, resume_within, prefer_rehearsed_within, max_candidates)
            st = store_from_ref(store)
            target = source_from_ref(into, role="target")
            summary.update(store=st.describe(), target=target.describe(), target_service=target.service)
            if scheme_of(into) is None:
                summary["target_block"] = into  # the artifact's key and the event's resource name it
            if store_block_name(store):
                summary["store_block"] = store
            if max_age:
                summary["max_age"] = max_age

            # 1. the target first: a dead target must not cost the time to fetch candidates (its
            # writability is checked once the wrong-cluster guard has passed: nothing is written before)
            with run.step("target"):
                reached = target_check(target, write=False)
            keys = archive_keys(key_files, identity_files, passphrase_env, key_env, key_block)
            choice = _select(run, st, source, target.describe(), keys, archive, resume, limits, allow_unencrypted)
            # the split-brain guard, before any download when the primary is known without one
            guarded = bool(primary or scheme_or_block(source))
            if guarded:
                _guard_primary(run, primary, source, None, target, force)

            # the RPO gate judges what the failover restores: with a change chain, its end (below,
            # once the chain is resolved); with --full-only or no chain, the archive's age here
            chained = not full_only and has_chain(st, source, keys, allow_unencrypted)
            point = _chain_first(run, st, source, keys, choice, allow_unencrypted, bool(archive)) if chained else None
            with staging_dir() as work:
                with run.step("download_validate"):
                    row, local, manifest = _choose(
                        choice.candidates[: limits.max_candidates], st, work, keys,
                        None if chained else limits.max_age, allow_unencrypted, run.skipped, pinned=bool(archive),
                    )
                _report_archive(run, row, manifest, keys, choice, pinned=bool(archive),
                                max_age=None if chained else max_age)
                if not guarded:
                    _guard_primary(run, None, source, manifest.get("source_url"), target, force)
                _sanity(run, row, manifest, choice.trusted, force)
                # the state to restore: the archive, or (a change chain continuing it) the chain's end
                state, state_keys, manifest = _at_latest(run, st, row, local, manifest, keys, work, allow_unencrypted,
                                                         full_only, point)
                if chained:
                    _rpo_gate(run, limits.max_age, max_age)
                with run.step("target"):
                    _guard_target(run, target, state, manifest, state_keys, reached, force=force,
                                  cross_service=cross_service, foreign_keys_max=foreign_keys_max,
                                  subtree=subtree, maps=maps)

                # 2. plan, (approval), restore, 3. post-verify. As in restore, the target cluster is
                # locked from planning (its first read) to the last read of the post-verify: a backup
                # or restore of it on any worker waits, and the plan cannot go stale under the replay.
                # The on-call's approval is awaited under the lock too, for the same reason.
                with source_lock(target_lock_name(into, target)):
                    with run.step("plan"):
                        p = plan_task(state, target, str(work), subtree=subtree, maps=maps, decryptor=state_keys,
                                      listed=bool(list_file))
                    plan_summary(p, summary, run.lists, dry_run=dry_run)
                    if dry_run:
                        save_list(p, list_file, list_sealed, summary)
                        return summary
                    if p.conflicts and deployment.id:
                        with run.step("approval"):
                            _approve(p.conflicts, row["url"], approval_timeout_s, summary)
                    # a re-run after an interruption resumes with this archive (a signed, expiring record)
                    record_choice(st, source, target.describe(), row, keys if keys.keyring else None,
                                  limits.resume_within.total_seconds())
                    with run.step("replay"):
                        done = replay(p, target, undo_sink(st, keys, "failover"))  # seals what it created for undo
                    replay_summary(p, done, summary, run.lists)
                    save_list(p, list_file, list_sealed, summary)
                    with run.step("postverify"):
                        checked = postverify(
                            state, target, subtree=subtree, maps=maps, decryptor=state_keys,
                            conflict_paths=summary["conflict_paths"], conflicts=summary["conflicts"],
                        )
                _report_postverify(run, checked, target)
                close_journal(st, source, target.describe(), keys if keys.keyring else None)
            return summary
    except BaseException as exc:  # a refusal, a failure, or an interruption (Ctrl-C, SIGTERM)
        # the CLI prints the skips and, once one was chosen, the archive line on stdout
        with suppress(AttributeError, TypeError):
            exc.failover_summary = summary  # type: ignore[attr-defined]
        raise


def _chain_first(run: _Run, st: Any, source: str, keys: Any, choice: _Choice, allow_unencrypted: bool,
                 pinned: bool) -> Any:
    """The change chain's latest point (tasks/chain.py; a broken chain refuses the run here,
    before any download), and the candidates ordered for ``--at latest``: the newest state goes
    first, never a rehearsed but older one (``--prefer-rehearsed-within`` orders archives restored
    alone: ``--full-only``). When the chain ends after the newest archive was taken, the archive it
    continues goes first (a chain from a resync needs none: the order stays); when the newest
    archive is newer than the chain's end, it goes first and is restored alone. An unfinished
    failover's archive stays first (it is finished with what it began), and so does an archive
    the operator named (``--archive``)."""
    from burrow import segments
    from tasks.catalog import signed_order
    from tasks.chain import resolve_point_task

    point = resolve_point_task(st, source, keys, latest=True, allow_unencrypted=allow_unencrypted)
    if pinned or choice.resumed_row is not None or not choice.candidates:
        return point
    end = point.segments[-1].last_time if point.segments else None
    newest = max(choice.candidates, key=signed_order)
    if end is None or end <= segments.iso_to_us(newest.get("created")):
        want, why = newest, "it is newer than the change chain's end"
    elif point.start_name:
        want = next((r for r in choice.candidates if r["name"] == point.start_name), None)
        why = "the change chain continues it to its end (--at latest)"
    else:
        want, why = None, ""
    first = choice.candidates[0]
    if want is not None and want is not first:
        choice.candidates = [want] + [r for r in choice.candidates if r is not want]
        run.preflight.append(f"archive: {want['url']} tried before {first['url']}: {why}; --full-only restores "
                             "an archive alone, as --prefer-rehearsed-within orders them")
    return point


def _at_latest(run: _Run, st: Any, row: dict[str, Any], local: str, manifest: dict[str, Any], keys: Any,
               work: Any, allow_unencrypted: bool, full_only: bool, point: Any) -> tuple[str, Any, dict[str, Any]]:
    """``(archive path, its keys, its manifest)`` to restore: the chosen archive as it is, or, when
    the source's change chain continues it up to a later point, the state at the chain's end
    (``point``: resolved once, by :func:`_chain_first`; None when there is no chain or with
    ``full_only``), with a preflight line giving both RPOs."""
    from burrow import segments
    from tasks.chain import materialize

    if full_only:
        run.preflight.append("changes: not applied (--full-only)")
        return local, keys, manifest
    if point is None:  # no change chain (tasks/chain.py has_chain)
        run.preflight.append("changes: none captured (no change chain): the archive alone")
        return local, keys, manifest
    # The chain's latest point starts from the chosen archive, or from a resync of the chain (ZooKeeper
    # and Consul list the whole state afresh on every (re)connection: the archive is not needed)
    end = point.segments[-1].last_time if point.segments else None
    if point.start_name not in (row["name"], None):
        run.preflight.append(f"changes: the change chain does not continue {row['url']}: restoring the archive alone")
        return local, keys, manifest
    if point.start_name is None and (end is None or end <= segments.iso_to_us(manifest.get("created"))):
        run.preflight.append(f"changes: the change chain ends before {row['url']} was taken: restoring the archive alone")
        return local, keys, manifest
    base = local if point.start_name is not None else None
    state, state_keys, state_manifest = materialize(st, point, base, keys, str(work), allow_unencrypted)
    now = segments.now_us()
    full_rpo = int((now - segments.iso_to_us(manifest.get("created"))) / 1e6)
    if end is not None:
        chain_rpo = int((now - end) / 1e6)
        run.summary.update(at="latest", at_time=segments.us_to_iso(end), segments=len(point.segments),
                           rpo_full_s=full_rpo, rpo_s=chain_rpo)
        run.preflight.append(f"changes: --at latest, {len(point.segments)} change segments to "
                             f"{segments.show_time(end)} (RPO {chain_rpo}s) beside the archive's RPO {full_rpo}s")
    return state, state_keys, {**manifest, "keys": state_manifest["keys"]}


def _rpo_gate(run: _Run, limit: timedelta | None, shown: str | None) -> None:
    """``--max-age`` against what this failover restores: the chain's end when the chain
    continues the archive (``rpo_s`` is then the chain's), else the archive. Before anything is
    written (the target's scratch key included)."""
    if limit is None:
        return
    rpo = run.summary.get("rpo_s")
    what = f"the change chain's end ({run.summary['at_time']})" if run.summary.get("at") == "latest" else \
        f"the archive {run.summary.get('archive')}"
    age = naming.age_text(timedelta(seconds=rpo)) if rpo is not None else "unknown"
    if rpo is None or rpo > limit.total_seconds():
        raise FailoverRefused(f"RPO gate: {what} is {age} old, older than --max-age {shown}; pass a larger "
                              "--max-age (flow parameter max_age) to accept it")
    run.preflight.append(f"rpo: {what} is {age} old (--max-age {shown})")


def _limits(max_age: str | None, resume_within: str, prefer_rehearsed_within: str, max_candidates: int) -> _Limits:
    if max_candidates < 1:
        raise UsageError("--candidates must be at least 1")
    return _Limits(
        max_age=naming.parse_duration(max_age, "--max-age") if max_age else None,
        resume_within=naming.parse_duration(resume_within, "--resume-within"),
        prefer_rehearsed_within=naming.parse_duration(prefer_rehearsed_within, "--prefer-rehearsed-within"),
        max_candidates=max_candidates,
    )


def _select(run: _Run, st: Any, source: str, target: str, keys: Any, archive: str | None, resume: bool,
            limits: _Limits, allow_unencrypted: bool) -> _Choice:
    """Select the archive: the source's trusted archives from the catalog, in the selector's
    order (tasks/catalog.py), or the one ``archive`` pins; an unfinished failover of this source
    into this target puts its archive first. Nothing is downloaded yet."""
    log = logger()
    keyed = bool(keys.keyring)
    with run.step("catalog"):
        rows = catalog(st, keys if keyed else None)
        mine = [r for r in rows if r.get("source") == source]
        if not mine:
            held = sorted({str(r["source"]) for r in rows if r.get("source") and not r.get("error")})
            raise ArchiveNotFound(
                f"no archive of source {source!r} in {st.describe()}"
                + (f" (it holds: {', '.join(held)})" if held else " (it holds no readable archive)")
            )
        annotate_task(st, mine, keys if keyed else None)
        for row in rows:  # unreadable (truncated, corrupt) files named like this source's archives
            if row.get("error") and _named_like(str(row.get("name", "")), source):
                run.skipped.append(f"{row['url']}: unreadable: {row['error']}")
    selection = select_archives(mine, source, keyed=keyed, allow_unencrypted=allow_unencrypted,
                                prefer_rehearsed_within=limits.prefer_rehearsed_within)
    trusted = _trusted(selection, run.skipped)
    if keyed and not trusted and any(
        r.get("encrypted") and r.get("unauthenticated_reason") == "no configured key opens it" for r in mine
    ):
        raise KeyMismatch(
            f"no configured key opens any archive of {source!r} in {st.describe()}; pass the right "
            "--key-file, --identity or --passphrase-env (a failover never falls back to stale data over a "
            "key problem)"
        )
    choice = _Choice(_pinned(archive, mine, trusted, run.skipped) if archive else selection.candidates, trusted)
    if not archive and choice.candidates:
        run.preflight.append(selection.note)
    if archive is None and resume:
        _resume_first(choice, st, source, target, keys if keyed else None, limits.resume_within)
    elif archive is None:
        log.info("failover: not resuming an unfinished failover (--no-resume): choosing afresh")
    if not choice.candidates:
        raise ArchiveError(f"no archive of {source!r} in {st.describe()} can be trusted ({len(run.skipped)} skipped)")
    return choice


def _resume_first(choice: _Choice, st: Any, source: str, target: str, keys: Any, within: timedelta) -> None:
    """An interrupted failover of this source into this target is finished with its archive
    (its record is signed with a reader key, bound to source, target and manifest, and young
    enough: tasks/journal.py), whatever appeared since: that archive goes first."""
    log = logger()
    resumed = unfinished_failover(st, source, target, keys, within=within)
    if resumed is None:
        return
    choice.resumed = resumed
    same = [r for r in choice.candidates if r["name"] == resumed["archive"]
            and r.get("manifest_sha256") == resumed.get("manifest_sha256")]
    if same:
        choice.resumed_row = same[0]
        choice.candidates = same + [r for r in choice.candidates if r is not same[0]]
        log.info("failover: an unfinished failover of %s into %s (begun %s) chose %s: trying it first",
                 source, target, resumed["started"], same[0]["url"])
    else:
        log.warning("failover: an unfinished failover (started %s) used %s, which is no longer a "
                    "trusted candidate; choosing again", resumed["started"], resumed.get("url"))


def _guard_primary(run: _Run, primary: str | None, source: str, manifest_url: str | None, target: Any,
                   force: bool) -> None:
    """Guard the primary: the split-brain guard probes the failed primary (``--primary``, else
    the source name, else the URL the archive records) and refuses while it answers."""
    with run.step("primary"):
        block, origin = primary_block(primary, source, manifest_url, _resolve_primary)
        guard = primary_guard(block, target, force, origin)
    run.summary["primary_check"] = guard
    run.preflight.append(f"primary: {guard.get('primary') or '-'}: {guard['detail']}")


def _report_archive(run: _Run, row: dict[str, Any], manifest: dict[str, Any], keys: Any, choice: _Choice, *,
                    pinned: bool, max_age: str | None) -> None:
    """What the chosen archive is, why it was used and how old it is (the RPO): in the summary,
    the preflight lines and the log."""
    log = logger()
    now = datetime.now(UTC)
    when = created_at(row)
    run.summary.update(
        archive=row["url"], archive_created=manifest["created"], service=manifest["service"],
        archive_keys=manifest["keys"], content_sha256=manifest["content_sha256"],
        skipped_archives=len(run.skipped), rpo_s=round((now - when).total_seconds(), 3) if when else None,
    )
    if keys.opened_by:
        run.summary["decrypted_with"] = keys.opened_by
    if rehearsed(row):
        run.summary["rehearsal"] = row["rehearsal"]
    begun = choice.resumed["started"] if choice.resumed else None
    why, line = _why_used(row, choice.resumed_row, begun, pinned, choice.trusted)
    run.summary["archive_chosen"] = why
    if why == "resumed":
        run.summary["resumed"] = begun
        log.info("failover: %s", line)
    elif why == "newest":
        log.warning("failover: %s has no passing authenticated rehearsal; %s", row["url"], line)
    run.preflight.append(line if why == "resumed" else f"archive: {line}")
    run.preflight.append(f"rpo: the archive is {naming.age_text(now - when) if when else '?'} old"
                         + (f" (--max-age {max_age})" if max_age else ""))
    log.info("failover: using %s (created %s)", row["url"], manifest["created"])


def _sanity(run: _Run, row: dict[str, Any], manifest: dict[str, Any], trusted: list[dict[str, Any]],
            force: bool) -> None:
    """The sanity check: an archive whose key count fell by more than half against the previous
    one is refused (a prefix typo or an empty read looks like this), unless ``force``."""
    problem = sanity_problem(int(manifest["keys"]), previous_archive(row, trusted))
    if problem and not force:
        raise FailoverRefused(f"sanity check: {row['url']}: {problem}; pin another with --archive, "
                              "or pass --force (flow parameter force) to fail over to it anyway")
    run.preflight.append("sanity: " + (f"OVERRIDDEN (--force): {problem}" if problem else "key count ok"))


def _guard_target(run: _Run, target: Any, local: str, manifest: dict[str, Any], keys: Any, reached: str, *,
                  force: bool, cross_service: bool, foreign_keys_max: float, subtree: str | None,
                  maps: list[str] | None) -> None:
    """Guard the target: the wrong-cluster guard (its service, and the keys it already holds
    outside the archive's paths: read-only), then the writability check's scratch key (not in a
    dry run, which keeps the reachability it found first)."""
    line = cluster_guard(target, local, manifest, force=force, cross_service=cross_service,
                         foreign_keys_max=foreign_keys_max, subtree=subtree, maps=maps, decryptor=keys)
    run.preflight.append(f"cluster: {line}")
    written = reached if run.dry_run else target_check(target, write=True, force=force)
    run.preflight.append(f"target {target.describe()}: {written}")


def _report_postverify(run: _Run, checked: Any, target: Any) -> None:
    """The post-verify's outcome in the summary and the artifact; a difference fails the run."""
    run.summary.update(checked.as_summary())
    run.lists["Post-verify: missing from the target (first 1000)"] = checked.missing_paths
    run.lists["Post-verify: differing, not a reported conflict (first 1000)"] = checked.differing_paths
    run.lists["Post-verify: value as archived, ACL, flags or lease not (first 1000)"] = checked.metadata_paths
    if not checked.ok:
        raise PostVerifyFailed(
            f"post-verify of {target.describe()} failed: {checked.problem()} (paths in the run's artifact)"
        )


def _resolve_primary(ref: str) -> Any:
    """The failed primary's block, in its own role: its credentials never stand in for the
    target's, even when both name the same hosts (blocks/resolve.py)."""
    return source_from_ref(ref, role="primary")


def scheme_or_block(source: str) -> bool:
    """Whether the source name can name its cluster without an archive: a URL (a backup's
    default name) or a saved block's name; a name with neither is found out by trying."""
    return "://" in source


def _named_like(name: str, source: str) -> bool:
    """Whether a store file's name is one Burrow gives the archives of ``source``
    (``<slug>/<slug>-<time>-<random>.burrow``): an unreadable file so named is reported as a
    skipped candidate, though its manifest cannot say whose it is."""
    s = naming.slug(source)
    parts = name.split("/")
    return len(parts) >= 2 and parts[-2] == s and parts[-1].startswith(s + "-")


def _trusted(selection: Selection, skipped: list[str]) -> list[dict[str, Any]]:
    """The rows the selector trusts, in the order they are tried; the others are logged and
    noted in ``skipped``."""
    log = logger()
    for url, why in selection.skipped:
        log.warning("failover: skipping %s: %s", url, why)
        skipped.append(f"{url}: {why}")
    return list(selection.candidates)


def _why_used(row: dict[str, Any], resumed_row: dict[str, Any] | None, begun: str | None, pinned: bool,
              trusted: list[dict[str, Any]]) -> tuple[str, str]:
    """Which archive was really used and why: ``(resumed | pinned | rehearsed | newest, line)``
    (the line goes to the preflight on stdout; a resumed run's is the one line that says so)."""
    r = row.get("rehearsal")
    if row is resumed_row:
        return "resumed", f"resuming the failover begun at {begun} with archive {row['url']}"
    # the words list and status use (tasks/markers.py): "never rehearsed" only without any marker
    state = rehearsal_text(r if isinstance(r, dict) else None)
    if pinned:
        return "pinned", f"pinned with --archive, {state}"
    if rehearsed(row):
        return "rehearsed", state
    when = created_at(row)
    newer = sum(1 for t in trusted if t is not row and when is not None and (created_at(t) or when) > when)
    if not newer:
        return "newest", f"{state} (no usable rehearsed archive): the newest valid one"
    return "newest", (f"{state} (no usable rehearsed archive): the newest one that passed validation "
                      f"({newer} newer skipped)")


def _pinned(archive: str, mine: list[dict[str, Any]], trusted: list[dict[str, Any]], skipped: list[str]) -> list[dict[str, Any]]:
    """The one candidate ``archive`` names (its URL, or its name in the store)."""
    for row in mine:
        if archive in (row["url"], row["name"]):
            if row not in trusted:
                why = next((s.split(": ", 1)[1] for s in skipped if s.startswith(row["url"] + ": ")), "not trusted")
                raise ArchiveError(f"the pinned archive {row['url']} cannot be used: {why}")
            return [row]
    raise ArchiveNotFound(f"the pinned --archive {naming.redact_url(archive)} is not an archive of this source in the store "
                          "(pruned meanwhile, or another source's)")


def _choose(candidates: list[dict[str, Any]], st: Any, work: Any, keys: Any, limit: Any, allow_unencrypted: bool,
            skipped: list[str], *, pinned: bool) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Download and validate candidates in order; the first that passes. A candidate too old
    for ``--max-age``, missing (pruned meanwhile), corrupt or truncated is skipped with its
    reason; a key mismatch stops the run."""
    log = logger()
    too_old: list[tuple[Any, str]] = []
    for row in candidates:
        why = rpo_problem(row, limit)
        if why is None:
            try:
                local = download(st, row["name"], str(work))
                # the archive must be the one its catalog row (perhaps from the index) described
                manifest = validate(local, keys, label=row["url"], allow_unencrypted=allow_unencrypted,
                                    expect_manifest_sha256=row.get("manifest_sha256"))
                return row, local, manifest
            except KeyMismatch:
                raise
            except ArchiveNotFound as exc:
                why = f"missing (pruned meanwhile?): {exc}"
            except ArchiveError as exc:
                why = str(exc)
            if pinned:
                raise ArchiveError(f"the pinned archive {row['url']} cannot be used: {why}")
        else:
            too_old.append((created_at(row), why))
        log.warning("failover: skipping %s: %s", row["url"], why)
        skipped.append(f"{row['url']}: {why}")
    if too_old:
        newest = max(too_old, key=lambda t: t[0] or datetime.min.replace(tzinfo=UTC))[1]
        others = len(candidates) - len(too_old)
        raise FailoverRefused(
            f"RPO gate: no usable archive is recent enough: the newest is {newest}"
            + (f" (the other {others} failed verification)" if others else "")
            + "; pass a larger --max-age (flow parameter max_age) to accept it"
        )
    raise ArchiveError(f"none of the {len(candidates)} candidate archives passed verification ({len(skipped)} skipped)")


def _approve(conflicts: int, archive: str, timeout_s: int, summary: dict[str, Any]) -> None:
    """Pause the deployment run for the on-call. First the plan's conflicts go out as a table
    artifact (path and kind, never values; ``failover-<source>-to-<target>-conflicts``), linked
    from the pause's description; the on-call reads them there and resumes the run with
    ``approve``, their name (``approver``) and a ``comment``, all required. The answer goes into
    the summary (``approval``), hence the artifact, the facts and the event."""
    from prefect.flow_runs import pause_flow_run

    log = logger()
    target = target_name(summary)
    key = f"{run_key('failover', summary)}-conflicts"
    link = None
    try:
        link = report.artifact_url(report.publish_table(
            key, f"failover of {summary.get('source')} into {target}: conflicts to approve (path and kind, never values)",
            conflict_rows(summary)))
    except Exception as exc:  # noqa: BLE001 - the approval must still be asked for; the log says where to look
        log.warning("failover: could not publish the conflicts table: %s", type(exc).__name__)
    where = f"the conflicts table {link}" if link else f"the table artifact {key}"
    log.warning("failover: the plan found %d conflicts in %s (kept as they are): read them in %s, then resume the "
                "run with approve (true or false), approver (your name) and comment", conflicts, target, where)
    answer = pause_flow_run(
        wait_for_input=FailoverApproval.with_initial_data(
            description=f"The failover of {summary.get('source')} into {target} found {conflicts} existing keys that "
            f"differ from the archive {archive}; they will be left as they are. Read them in {where} "
            "(paths and kinds, never values). Approve to restore everything else; your name and a comment are "
            "required.",
            approve=False,
        ),
        timeout=timeout_s, poll_interval=APPROVAL_POLL_S, key="failover-approval",
    )
    approver = " ".join(str(answer.approver or "").split())[:200]
    comment = " ".join(str(answer.comment or "").split())[:500]
    summary["approval"] = {"approved": bool(answer.approve), "approver": approver, "comment": comment}
    if not answer.approve:
        raise FailoverRefused(f"{approver} aborted the failover at the approval step ({conflicts} conflicts)"
                              + (f": {comment}" if comment else ""))
    log.info("failover: approved by %s: %s", approver, comment)
