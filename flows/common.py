"""What every Burrow flow shares: parameters that can never carry credentials.

Flow parameters are kept in the run history (the API stores them, the UI shows them, run
names are built from them). A URL with credentials (``zk://user:password@host``) must never
get there, whether the run comes from the CLI, a deployment or a Python call:

* :meth:`BurrowFlow.serialize_parameters` (what Prefect sends to the API when a run is created
  in-process) drops the user-info of every URL, so the stored parameters never hold it;
* :meth:`BurrowFlow.validate_parameters` (which Prefect runs before the flow body, for
  deployment runs too) refuses such a URL with a usage error that names the safe
  alternatives and quotes nothing of the URL.

The CLI strips credentials itself before it starts a flow (``blocks.resolve.secure_source_ref``),
so only a Python call or a deployment parameter ever meets the refusal.

Beside that, what every run records (:func:`recorded_run`): who or what triggered it
(:func:`run_trigger`), its artifact, its ``burrow run facts`` table, its event, a progress
artifact for the long ones; and, under a deployment, an expected failure (a ``BurrowError``) ends
the run Failed with one ERROR line and no traceback (:func:`quiet_failure`), while a direct call
(the CLI) still gets the exception and its exit code.
"""

from __future__ import annotations

import functools
import getpass
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any

from prefect import Flow
from pydantic import Field

from burrow.errors import BurrowError
from burrow.naming import has_userinfo, redact_url, refuse_credentials, slug

#: JSON-schema pattern of a reference parameter: no URL with user-info. The API server checks it
#: when a deployment run is created with ``enforce_parameter_schema``, so such a run is refused
#: before its parameters are stored. (Only in the schema: Python-side, validate_parameters below
#: checks the same thing with a message that quotes nothing.)
NO_CREDENTIALS_PATTERN = (
    r"^(?![A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*@)"
    r"(?![A-Za-z][A-Za-z0-9+.\-]*://[^?#]*@[A-Za-z0-9.\-\[\]:]+:[0-9]+([,/?#]|$))"
)

#: A source, store or archive: a URL without credentials, a path, or a saved block's name.
Ref = Annotated[
    str,
    Field(
        json_schema_extra={"pattern": NO_CREDENTIALS_PATTERN},
        description="A URL without credentials, a path, or the name of a saved block",
    ),
]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set)):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redacted(v) for v in value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    return value


def _json_native(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_json_native(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_native(v) for k, v in value.items())
    return False


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class BurrowFlow(Flow):
    """A Prefect flow whose parameters never carry a URL's credentials into the run history."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        redacted = {k: _redacted(v) for k, v in parameters.items()}
        if all(_json_native(v) for v in redacted.values()):
            # Burrow's parameters are names, paths, numbers and flags: already JSON. Prefect's
            # own path imports FastAPI's encoder, a third of a second of every CLI run.
            return {k: _plain(v) for k, v in redacted.items()}
        return super().serialize_parameters(redacted)

    def validate_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        for key, value in parameters.items():
            if any(has_userinfo(s) for s in _strings(value)):
                raise refuse_credentials(f"the {key!r} parameter")
        return super().validate_parameters(parameters)


# ------------------------------------------------------------------- heartbeats that stop at once


@contextmanager
def _prompt_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
    """Prefect 3.8's flow-run heartbeat (``prefect.flow_engine._send_heartbeats``) with one
    change: between heartbeats the thread waits on its stop event instead of sleeping in
    one-second steps, so the end of a run no longer waits up to a second per run context for
    the thread to notice (0.7 s of a 2.5 s CLI backup, measured). The heartbeats themselves,
    their interval (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``), events and the stop when the run is
    final are Prefect's own."""
    import contextvars
    import threading

    from prefect import flow_engine

    seconds = engine.heartbeat_seconds
    if seconds is None:
        yield
        return
    seconds = max(seconds, getattr(flow_engine, "MINIMUM_HEARTBEAT_INTERVAL", 0))  # as Prefect's
    resource, related = engine._build_heartbeat_event_template()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            run = engine.flow_run
            if run and run.state and run.state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:  # noqa: BLE001 - as Prefect's: a missed heartbeat is logged at DEBUG
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            stop.wait(seconds)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(loop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_on_exit:
            thread.join(timeout=2)


#: What :func:`_prompt_heartbeats` was written against: Prefect's release, and the sha256 of the
#: source of the function it replaces (``inspect.getsource(prefect.flow_engine._send_heartbeats)``).
#: After a Prefect upgrade, compare the new ``_send_heartbeats`` with ``_prompt_heartbeats``; when
#: the replacement is still equivalent, update both values (``heartbeat_source_digest()`` gives the
#: hash). Until then Prefect's own heartbeat runs: correct, only up to a second slower per run.
PROMPT_HEARTBEATS_FOR = ("3.8.8", "83e152cb73a04e977ca181188e99b3d583c894892b5456043b2eb51e45dbe996")


def heartbeat_source_digest() -> str | None:
    """sha256 of the source of Prefect's ``flow_engine._send_heartbeats`` (``None``: no such
    function, or no source to read)."""
    import hashlib
    import inspect

    from prefect import flow_engine

    original = getattr(flow_engine, "_send_heartbeats", None)
    if original is None or original is _prompt_heartbeats:
        original = getattr(flow_engine, "_burrow_replaced_send_heartbeats", original)
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(source.encode()).hexdigest()


def install_prompt_heartbeats() -> bool:
    """Use :func:`_prompt_heartbeats` for every flow run of this process, but only when the
    installed Prefect is the release it was written for *and* the function it replaces has the
    source it was written against (:data:`PROMPT_HEARTBEATS_FOR`); otherwise Prefect's own
    heartbeat stays. Returns whether it is installed.

    Only the CLI calls this (``cli.main``, for flow commands): a flow run a worker starts
    keeps Prefect's heartbeat untouched, as nothing there waits on the run's end.
    """
    import prefect
    from prefect import flow_engine
    from prefect.flow_engine import BaseFlowRunEngine

    original = getattr(flow_engine, "_send_heartbeats", None)
    if original is _prompt_heartbeats:
        return True
    version, digest = PROMPT_HEARTBEATS_FOR
    hooks = all(hasattr(BaseFlowRunEngine, h) for h in
                ("heartbeat_seconds", "_build_heartbeat_event_template", "_emit_flow_run_heartbeat"))
    if original is None or not hooks or prefect.__version__ != version or heartbeat_source_digest() != digest:
        return False
    flow_engine._burrow_replaced_send_heartbeats = original  # type: ignore[attr-defined]
    flow_engine._send_heartbeats = _prompt_heartbeats
    return True


def burrow_flow(**options: Any) -> Callable[[Callable[..., Any]], BurrowFlow]:
    """``@flow(...)`` for Burrow's flows: the same options, a :class:`BurrowFlow` whose expected
    failures are quiet under a deployment (:func:`quiet_failure`)."""

    def decorate(fn: Callable[..., Any]) -> BurrowFlow:
        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> Any:
            quiet = under_deployment()
            if quiet:  # before any task can fail: Prefect logs a task's exception as it happens
                install_quiet_failures()
            try:
                return fn(*args, **kwargs)
            except BurrowError as exc:
                if not quiet:
                    raise  # the CLI, a test, a Python call: the exception, as always
                return quiet_failure(exc)

        return BurrowFlow(fn=body, **options)

    return decorate


# ------------------------------------------------------------------------ the work pool's runs

#: The command a Burrow work pool's process worker starts each flow run with. Left unset, Prefect
#: 3.8's process worker starts a workspace supervisor for every run (``python -m
#: prefect.runner._workspace_supervisor``: it imports Prefect, runs the pull steps, then execs
#: ``python -m prefect.engine``, which imports Prefect again), and the worker does more per run
#: besides: 4.1-4.3 CPU-seconds a run on this repository's 2-core machine against 2.7-3.0 with the
#: command set (bench/RESULTS.md, "A flow run's CPU under a process worker"), for a fleet's
#: hundreds of runs an hour. The engine runs the deployment's pull steps itself. ``python`` is
#: looked up on the worker's PATH: ``burrow worker start`` puts its own interpreter's directory
#: first, so the runs use the interpreter Burrow is installed in (as Prefect's default does).
FLOW_RUN_COMMAND = "python -m prefect.engine"


def process_pool_template() -> dict[str, Any]:
    """The base job template of a Burrow process work pool: Prefect's own, with
    :data:`FLOW_RUN_COMMAND` as the command's default (a deployment can still override it)."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["command"]["default"] = FLOW_RUN_COMMAND
    return template


def pool_run_command(template: dict[str, Any]) -> str | None:
    """The command a process pool's base job template names for its runs (see
    :data:`FLOW_RUN_COMMAND`), or None when it names none (Prefect's default)."""
    return template.get("variables", {}).get("properties", {}).get("command", {}).get("default") or None


# ------------------------------------------------------------------------ quiet expected failures


def under_deployment() -> bool:
    """Whether this flow run belongs to a deployment (a worker, the schedule, an automation)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return bool(ctx and ctx.flow_run and ctx.flow_run.deployment_id)


class _ExpectedFailureFilter(logging.Filter):
    """Drops Prefect's own records of a :class:`BurrowError` (the task's "Task run failed with
    exception", the engine's "Engine execution exited with unexpected exception", each with its
    traceback), and says the failed task's "Finished in state Failed(...)" at INFO: the flow
    logged the error's one line itself. Any other exception stays loud."""

    _FINISHED = re.compile(r"^Finished in state Failed\('Task run encountered an exception (\w+):")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BurrowError):
            return False
        # the task's own last line names the exception's class only: one of Burrow's is said at INFO
        m = self._FINISHED.match(str(record.msg)) if exc is None else None
        if m and m.group(1) in _burrow_error_names():
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def _burrow_error_names() -> set[str]:
    """The class names of BurrowError and its subclasses (the task run's last line names one)."""
    names, todo = set(), [BurrowError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


_expected_failure_filter = _ExpectedFailureFilter()

#: Prefect's loggers that report a run's exception with a traceback.
_ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.engine")


def install_quiet_failures() -> None:
    """Attach :class:`_ExpectedFailureFilter` to Prefect's run loggers (idempotent)."""
    for name in _ENGINE_LOGGERS:
        lg = logging.getLogger(name)
        if _expected_failure_filter not in lg.filters:
            lg.addFilter(_expected_failure_filter)


def quiet_failure(exc: BurrowError) -> Any:
    """An expected failure (a refusal, a conflict, an unreachable cluster: a :class:`BurrowError`,
    each with its exit code) of a deployment run: one ERROR line with its message, no traceback,
    and the run Failed with that message. The state carries the exception, so whoever reads the
    run's result (``state.result()``) still gets it."""
    from prefect.context import FlowRunContext
    from prefect.states import Failed

    from burrow.runlog import logger

    install_quiet_failures()
    ctx = FlowRunContext.get()
    name = ctx.flow.name if ctx and ctx.flow else "run"
    message = str(exc).replace("\n", " ")
    logger().error("%s failed: %s", name, message)
    return Failed(message=message, data=exc)


# ------------------------------------------------------------------------------------ triggers


def run_trigger() -> dict[str, Any]:
    """Who or what started this run, for its summary, event, artifact and the evidence report.

    A run outside a deployment (the CLI, a Python call) is ``{"kind": "cli", "by": "user@host"}``.
    A deployment run is ``{"kind": "schedule" | "automation" | "manual", "by": ..., "deployment":
    "<flow>/<deployment>"}``: ``schedule`` when the scheduler made it (``auto_scheduled``),
    ``automation`` when an automation did (``created_by``; ``by`` is its name, ``automation_id``
    its id), else ``manual`` (``prefect deployment run``, the UI, the API, a fleet), ``by`` being
    the deployment. ``user@host`` names an account and a machine, never a secret."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx else None
    if run is None or not run.deployment_id:
        return {"kind": "cli", "by": f"{_user()}@{socket.gethostname()}"}
    from prefect.runtime import deployment

    flow_name = ctx.flow.name if ctx and ctx.flow else "flow"
    name = f"{flow_name}/{deployment.name or run.deployment_id}"
    created = run.created_by
    kind_of = str(getattr(created, "type", "") or "").upper()
    if kind_of == "AUTOMATION":
        return {"kind": "automation", "by": str(created.display_value or created.id), "deployment": name,
                "automation_id": str(created.id)}
    if run.auto_scheduled:
        return {"kind": "schedule", "by": name, "deployment": name}
    return {"kind": "manual", "by": str(created.display_value) if created and created.display_value else name,
            "deployment": name}


def store_block_name(ref: str) -> str | None:
    """``ref``'s name when it names a saved store block (not a URL, not a directory): what the
    run's artifact key and event resource use."""
    from pathlib import Path

    from blocks.resolve import scheme_of

    if scheme_of(ref) is not None or ref.startswith((".", "/", "~")) or Path(ref).expanduser().exists():
        return None
    return ref


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


# ---------------------------------------------------------------- events and per-source locks

#: Summary fields that go into an event's payload (counts, times, status: never values).
_EVENT_PAYLOAD = (
    "status", "error", "duration_s", "keys", "created", "conflicts", "identical", "planned_create", "deleted",
    "archives", "archive_created", "rpo_s", "rto_s", "approval_wait_s", "stored_bytes", "dry_run", "verified", "drift",
    "approval", "trigger", "gap",
)

#: Summary fields never published as facts: they name keys (paths), which stay in the run's logs
#: and its own lists.
_NOT_FACTS = ("warnings",)

#: The facts table's ``kind`` of a run kind whose events are named otherwise.
_FACT_KIND = {"rehearsal": "rehearse"}


def source_resource(source: str) -> dict[str, str]:
    """The event resource of a source (a cluster by the name its backups record)."""
    return {"prefect.resource.id": f"burrow.source.{source}", "prefect.resource.name": source}


def emit_run_event(kind: str, outcome: str, summary: dict[str, Any]) -> None:
    """Emit ``burrow.<kind>.<outcome>`` about ``summary['source']`` (``burrow.source.<name>``),
    with the target, store and archive as related resources. URLs lose their user-info; the
    payload holds counts, times and the one-line error. Never fails the run it describes."""
    from burrow.runlog import logger

    try:
        from prefect.events import emit_event

        source = str(summary.get("source") or "unknown")
        related = []
        for role in ("target", "store", "archive", "url", "scratch"):
            value = summary.get(f"{role}_block") or summary.get(role)  # a saved block's name when known
            if isinstance(value, str) and value:
                related.append({"prefect.resource.id": f"burrow.{'archive' if role == 'url' else role}.{redact_url(value)}",
                                "prefect.resource.role": "archive" if role == "url" else role})
        payload = {k: summary[k] for k in _EVENT_PAYLOAD if k in summary}
        emit_event(event=f"burrow.{kind}.{outcome}", resource=source_resource(source), related=related,
                   payload=payload)
    except Exception as exc:  # noqa: BLE001 - an event must never fail the run it describes
        logger().warning("could not emit the burrow.%s.%s event: %s", kind, outcome, type(exc).__name__)


def run_facts(kind: str, outcome: str, summary: dict[str, Any]) -> list[dict[str, str]]:
    """The rows of the run's ``burrow run facts`` table (burrow/report.py ``facts_table``): the
    summary without what names keys (``*_paths``, warnings)."""
    from burrow import report

    safe = {k: v for k, v in summary.items() if not k.endswith("_paths") and k not in _NOT_FACTS}
    return report.facts_table(_FACT_KIND.get(kind, kind), outcome, safe)


def publish_facts(kind: str, outcome: str, summary: dict[str, Any]) -> None:
    """Publish the run's facts table artifact (unkeyed, described ``burrow run facts``)."""
    from burrow import report
    from burrow.runlog import logger

    try:
        report.publish_table(None, report.FACTS_DESCRIPTION, run_facts(kind, outcome, summary))
    except Exception as exc:  # noqa: BLE001 - the facts must never fail the run they describe
        logger().warning("could not publish the run's facts: %s", type(exc).__name__)


#: Run kinds long enough to show a progress artifact.
_PROGRESS_KINDS = ("backup", "restore", "failover", "rehearsal")


@contextmanager
def recorded_run(kind: str, summary: dict[str, Any], publish: Callable[[], None], *, event: bool = True,
                 progress_title: str | None = None) -> Iterator[None]:
    """Run a flow body: its trigger (:func:`run_trigger`) into ``summary``, then
    :func:`burrow.report.recorded` (timing, one-line error, the artifact), the run's facts table
    and (``event``) its event ``burrow.<kind>.completed`` or ``burrow.<kind>.failed``. Long runs
    show their stages in a progress artifact (``progress_title`` names the run in it)."""
    from burrow import progress, report

    try:
        summary.setdefault("trigger", run_trigger())
    except Exception:  # noqa: BLE001 - outside a run (a unit test): no trigger to record
        pass
    ok = False
    shown = progress.run_progress(progress_title or kind) if kind in _PROGRESS_KINDS else nullcontext()
    try:
        with shown, report.recorded(summary, publish):
            yield
        ok = True
    finally:
        publish_facts(kind, "completed" if ok else "failed", summary)
        if event:
            emit_run_event(kind, "completed" if ok else "failed", summary)


def source_limit_name(source: str) -> str:
    """The global concurrency limit that keeps one cluster to one backup or restore at a time."""
    return f"burrow-source-{slug(source)}"


def _limit_exists(limit: str) -> bool:
    """Whether the global concurrency limit exists (asked quietly: Prefect's own check warns)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            return False
    return True


def _lock_record_path(limit: str) -> Path:
    from burrow.home import burrow_home

    return burrow_home() / "locks" / f"{limit}.json"


def _api_id() -> str:
    """Which orchestrator (a hash of its API URL: the record names no address, and no credential
    a URL might carry)."""
    import hashlib

    from prefect.settings import get_current_settings

    return hashlib.sha256(str(get_current_settings().api.url or "").encode()).hexdigest()[:32]


def _record_lock_holder(limit: str, lease_id: Any) -> None:
    """Note on this host (0600, in Burrow's private home) that this process holds ``limit``'s
    slot under ``lease_id``, on which orchestrator: the next run here that finds the slot taken
    can tell whether its holder is gone for certain (:func:`_free_if_holder_gone`)."""
    from burrow.home import private_dir
    from burrow.proc import process_identity

    try:
        path = _lock_record_path(limit)
        record = {"limit": limit, "lease": str(lease_id), "api": _api_id(), "holder": process_identity()}
        private_dir(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # (no home) the lock holds anyway; only a takeover after a crash is lost
        logging.getLogger("burrow").debug("cannot record the holder of %s: %s", limit, exc)


def _read_lock_record(limit: str) -> dict[str, Any] | None:
    """This host's record of ``limit``'s holder (:func:`_record_lock_holder`), or None when there
    is none that reads."""
    try:
        record = json.loads(_lock_record_path(limit).read_text())
    except (OSError, ValueError, RuntimeError):
        return None
    return record if isinstance(record, dict) else None


def _drop_lock_record(limit: str, lease_id: str | None) -> None:
    """Remove this host's record of ``limit``'s holder if it still names ``lease_id``."""
    record = _read_lock_record(limit)
    if lease_id and record is not None and record.get("lease") == lease_id:
        try:
            _lock_record_path(limit).unlink()
        except (OSError, RuntimeError):
            pass


def _free_if_holder_gone(limit: str) -> bool:
    """When this host's record says the process holding ``limit``'s slot (on the same
    orchestrator) has ended for certain (same boot, its pid gone or reused: killed outright, it
    could not release it), release its lease now instead of waiting for the lease to run out.
    Returns whether a lease was released. A holder on another host, or still alive, is left be."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    from burrow.proc import identity_gone
    from burrow.runlog import logger

    record = _read_lock_record(limit)
    if record is None:
        return False
    try:
        lease = UUID(str(record["lease"]))
    except (ValueError, KeyError):
        return False
    holder = record.get("holder") if isinstance(record.get("holder"), dict) else {}
    if record.get("api") != _api_id() or not identity_gone(holder):
        return False
    try:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease_id=lease)
    except Exception as exc:  # noqa: BLE001 - expired meanwhile (or the server's own error): wait as usual
        logger().debug("could not release the lease of a gone holder of %s: %s", limit, type(exc).__name__)
    _drop_lock_record(limit, str(lease))
    logger().info("the per-cluster lock %s was held by process %s on this host, which has ended: its lease is "
                  "released", limit, holder.get("pid"))
    return True


@contextmanager
def source_lock(source: str, *, timeout_seconds: float | None = None, lease_duration: float = 300) -> Iterator[None]:
    """Hold one slot of the source's global concurrency limit (``burrow-source-<slug>``, limit
    1, created by ``deployments/setup.py``) across all workers. Under a deployment the limit
    must exist (``strict=True``): a missing limit is an error, never silently unenforced. A
    run outside a deployment (the CLI) uses the limit when it exists.

    Logs the limit's name (a cluster name, never a credential) when it holds the slot and, only
    when the slot is taken by another run so that this one really waits, that it is waiting: the
    slot is first asked for without waiting (no retry on the server's "locked" answer), and only
    when that is refused does the run log the wait and queue for the slot. ``lease_duration``: how
    long (seconds, at least Prefect's 60) the slot outlives a holder killed outright on another
    host. On this host a holder's process is recorded, so a run that finds the slot held by a
    process that has ended (SIGKILL, the OOM killer) releases its lease at once."""
    import httpx
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.context import ConcurrencyContext
    from prefect.concurrency.sync import concurrency
    from prefect.runtime import deployment

    from burrow.errors import PermanentError
    from burrow.runlog import logger

    log = logger()
    limit = source_limit_name(source)
    strict = bool(deployment.id)
    if not strict and not _limit_exists(limit):
        log.debug("no global concurrency limit %s: this run outside a deployment does not lock the cluster", limit)
        yield
        return

    def without_waiting(stack: ExitStack) -> bool:
        """The slot, if free now (no retry on the server's "locked" answer)."""
        try:
            stack.enter_context(concurrency(limit, occupy=1, strict=strict, max_retries=0,
                                            lease_duration=lease_duration))
        except ConcurrencySlotAcquisitionError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423):
                raise
            return False
        return True

    held: dict[str, str] = {}
    with ExitStack() as stack:
        stack.callback(lambda: _drop_lock_record(limit, held.get("lease")))  # (after the release below)
        leases = stack.enter_context(ConcurrencyContext())  # where Prefect notes the lease it grants
        try:
            # an uncontended run takes the slot at once, and says nothing of waiting
            if not without_waiting(stack) and not (_free_if_holder_gone(limit) and without_waiting(stack)):
                log.info("waiting for the per-cluster lock %s (another run holds it)", limit)
                stack.enter_context(concurrency(limit, occupy=1, strict=strict, timeout_seconds=timeout_seconds,
                                                lease_duration=lease_duration))
        except ConcurrencySlotAcquisitionError as exc:
            if "must be created" not in str(exc):
                raise
            raise PermanentError(
                f"the global concurrency limit {limit} does not exist, so this cluster could run two backups "
                "or restores at once: deployments/setup.py creates one per cluster it registers (list the "
                "cluster under definitions.clusters in deployments/prefect.yaml, or pass --cluster to setup.py)"
            ) from None
        if leases.cleanup_lease_ids:
            held["lease"] = str(leases.cleanup_lease_ids[-1])
            _record_lock_holder(limit, held["lease"])
        log.info("holding the per-cluster lock %s", limit)
        try:
            yield
        finally:
            log.info("releasing the per-cluster lock %s", limit)
