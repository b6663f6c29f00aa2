"""The capture flow: follow a source's changes and seal them into change segments, for a window
of time; on a gap, take a full backup at once and continue the chain from it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.runtime import flow_run

from blocks.keys import backup_write_keys
from blocks.resolve import source_from_ref, store_from_ref
from burrow import naming, proc, report
from burrow.errors import UsageError
from burrow.keys import KeyRefs
from burrow.runlog import logger
from burrow.staging import staging_dir
from flows.common import Ref, burrow_flow, emit_run_event, recorded_run, source_limit_name, source_lock
from tasks.capture import capture as capture_task
from tasks.capture import follow_ahead
from tasks.upload import check_store


def capture_lock_name(source_name: str) -> str:
    """The lock (a global concurrency limit of 1) that keeps a source to one capture at a time,
    beside (not the same as) its backup/restore lock: a capture holds it for its whole window,
    and takes a full backup inside it when it meets a gap."""
    return source_limit_name(f"capture-{source_name}")


@contextmanager
def capture_lock(source_name: str) -> Iterator[None]:
    """Hold the source's capture lock, whether the capture runs from the CLI or a deployment:
    two captures of one source would fork its chain (which restores then refuse). The limit is
    created when missing (the first capture of a source, on any orchestrator), then held with
    ``source_lock``: a second capture says, in one line, that it waits for the lock, and
    continues the chain once the first has ended (a run killed outright frees it at once for
    the next run on its host, and when its lease runs out for any other)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = capture_lock_name(source_name)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another capture of the source created it at the same moment
    # Prefect's shortest lease: a capture killed outright (SIGKILL, a lost worker) and started
    # again on another host waits about a minute for its lock, not the default five (a window's
    # gap, and the "no sealed segment in 5 minutes" trigger, for every crash)
    with source_lock(f"capture-{source_name}", lease_duration=60):
        yield


def _run_name() -> str:
    params = flow_run.parameters
    name = params.get("name") or str(params.get("source", "source")).split("://", 1)[-1].split("?", 1)[0]
    return f"capture-{naming.slug(str(name))}-{naming.stamp()}"


@burrow_flow(name="capture", flow_run_name=_run_name, persist_result=False, log_prints=False)
def capture(
    source: Ref,
    store: Ref,
    name: str | None = None,
    seal_every_s: float = 10.0,
    duration_s: float | None = 3600.0,
    encryption: bool = True,
    key_file: str | None = None,
    key_env: str | None = None,
    recipients: list[str] | None = None,
    passphrase_env: str | None = None,
    key_block: str | None = None,
    include_leased: bool = False,
    nice: int = 10,
) -> dict[str, Any]:
    """Follow ``source``'s changes for ``duration_s`` seconds (None: until interrupted) and seal
    them into ``store`` every ``seal_every_s`` seconds, continuing the source's chain (or
    starting one after its newest full archive). Encrypted with the write keys of ``backup``
    (the same parameters). A gap emits ``burrow.capture.gap`` (its first and last positions and
    times), takes a full backup and goes on from it. One capture at a time per source
    (``capture_lock``). ``include_leased`` (etcd): leased keys are captured with their lease's
    TTL, as ``backup --include-leased`` keeps them; else a leased put is recorded as the key's
    delete, as a backup skips it. ``nice``: the capture's process lowers its CPU priority to this
    niceness (0: left as it is): it follows for hours beside whatever else the host runs, the
    source's own server perhaps, and a busy CPU serves the others first (bench/RESULTS.md, the
    source's write latency with and without a capture)."""
    log = logger()
    summary: dict[str, Any] = {"status": "failed", "source": name or source}

    def _publish() -> None:
        report.publish(f"capture-{summary.get('source', 'source')}",
                       f"Burrow capture of {summary.get('source')}: {summary['status']}", dict(summary))

    with recorded_run("capture", summary, _publish):
        summary["nice"] = proc.lower_priority(nice)
        src = source_from_ref(source)
        if include_leased:
            if "include_leased" not in type(src).model_fields:
                raise UsageError(f"--include-leased applies to etcd sources only, not {src.service}")
            src = src.model_copy(update={"include_leased": True})
        dst = store_from_ref(store)
        check_store(dst)
        source_name = naming.check_source_name(name or (src.describe() if "://" in source else source))
        summary.update(service=src.service, source=source_name, source_url=src.describe(), store=dst.describe())
        refs = KeyRefs(key_files=[key_file] if key_file else [], key_env=key_env, recipients=list(recipients or []),
                       passphrase_env=passphrase_env, block=key_block)
        write_keys = backup_write_keys(encryption, refs)
        if write_keys is None:
            log.warning("encryption is turned off: change segments are written unencrypted")
        started = time.monotonic()
        totals = {"segments": 0, "changes": 0, "gaps": 0, "backups": 0}
        # one capture per source, from the CLI or a deployment alike (a second would fork the chain);
        # a run that waits for the lock follows the source meanwhile, so it is caught up when the
        # run before it stops: the window does not break there
        ahead = follow_ahead(src, dst, source_name, write_keys)
        try:
            with staging_dir() as work, capture_lock(source_name):
                while True:
                    left = None if duration_s is None else max(0.0, duration_s - (time.monotonic() - started))
                    owned, ahead = ahead, None  # (the task owns it from now on, and closes it)
                    done = capture_task(src, dst, source_name, write_keys, str(work), seal_every_s, left, owned)
                    totals["segments"] += done["segments"]
                    totals["changes"] += done["changes"]
                    summary["last_position"] = done["last_position"]
                    if done["gap"] is None:
                        break
                    totals["gaps"] += 1
                    # the gap's positions and times (no key, no value) ride in the event's payload
                    emit_run_event("capture", "gap", {**summary, "status": "gap", "gap": done["gap"]})
                    log.warning("capture: a gap in the chain; taking a full backup to continue from")
                    from flows.backup import backup

                    backup(source=source, store=store, name=source_name, encryption=encryption, key_file=key_file,
                           key_env=key_env, recipients=recipients, passphrase_env=passphrase_env, key_block=key_block,
                           include_leased=include_leased)
                    totals["backups"] += 1
                    if left is not None and duration_s is not None and time.monotonic() - started >= duration_s:
                        break
        finally:
            if ahead is not None:  # (the lock was never held)
                ahead.close()
        summary.update(status="ok", **totals)
        return summary
