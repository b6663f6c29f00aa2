"""The evidence flow: one report per period of what Prefect's history and the archive store
prove about the backups (docs/EVIDENCE.md), as a markdown artifact keyed ``evidence-<period>``,
and, with a store, as JSON and HTML chained in the store under the read key's MAC."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect.runtime import flow_run

from blocks.keys import archive_keys
from blocks.resolve import store_from_ref
from burrow import evidence as ev
from burrow import naming, report
from burrow.errors import BurrowError, UsageError
from burrow.runlog import logger
from burrow.version import __version__
from flows.common import Ref, burrow_flow, recorded_run
from tasks.evidence import api_url, read_history_task, read_store_task, ui_url, write_report_task


def _run_name() -> str:
    """``evidence-<period label>`` (``evidence-2026-11``), as the artifact is keyed."""
    p = flow_run.parameters
    try:
        label = ev.parse_period(p.get("since") or "30d", p.get("until"), p.get("month")).label
    except BurrowError:  # the run itself reports the usage error
        label = naming.stamp()
    return f"evidence-{label}"


@burrow_flow(name="evidence", flow_run_name=_run_name, persist_result=False)
def evidence(
    since: str = "30d",
    until: str | None = None,
    month: str | None = None,
    sources: list[str] | None = None,
    store: Ref | None = None,
    controls: str | None = None,
    key_files: list[str] | None = None,
    identity_files: list[str] | None = None,
    passphrase_env: str | None = None,
    key_env: str | None = None,
    key_block: str | None = None,
) -> dict[str, Any]:
    """The evidence report of a period: ``month`` (``YYYY-MM`` or ``previous``), else ``since``
    (a duration back from ``until``, or a UTC time) to ``until`` (default now). ``sources``
    limits it to those sources; ``controls`` is another targets and controls file than the
    shipped ``burrow/controls.toml``.

    With ``store`` (a URL without credentials, a path or a saved block's name) the store's
    archives, verification records, rehearsal markers and Object Lock are read, and the JSON and
    HTML are written there as the next link of its evidence chain, MACed with the read key (the
    key references, as for the other flows: a secret key is required). Returns the report."""
    summary: dict[str, Any] = {"status": "failed", "source": "all"}
    md: dict[str, str] = {}

    def _publish() -> None:
        if md:
            _publish_markdown(md["key"], md["text"], md["headline"])
        else:
            report.publish("evidence", f"evidence: failed: {summary.get('error', 'see the logs')}", summary)

    with recorded_run("evidence", summary, _publish):
        conf = ev.load_controls(controls)
        period = ev.parse_period(since, until, month)
        summary.update(period=period.label, since=ev.utc_text(period.since), until=ev.utc_text(period.until))
        st = store_from_ref(store) if store else None
        keys = archive_keys(key_files, identity_files, passphrase_env, key_env, key_block)
        if st is not None and not keys.can_reader_sign():
            raise UsageError("writing evidence to a store needs the read key (a secret key: --key-file, --identity, "
                             "--passphrase-env, --key-env or --key-block): its chain records are MACed with it")
        now = datetime.now(UTC)  # one "now" for the slots that are due and the report's time
        history = read_history_task(period.since, period.until, conf.slot_tolerance_s, now)
        view = read_store_task(st, keys) if st is not None else None
        rep = ev.build_report(
            period=period, controls=conf, runs=history["runs"], deployments=history["deployments"], store=view,
            generated_at=now, ui_url=ui_url(), api_url=api_url(), sources=sources,
            burrow_version=__version__,
        )
        if st is not None:
            rep = write_report_task(st, keys, rep)
            summary.update(store=st.describe(), chain_seq=rep["chain"]["seq"], chain_record=rep["chain"]["record"])
        line = ev.headline(rep)
        md.update(key=f"evidence-{period.label}", text=ev.render_markdown(rep), headline=line)
        failing = [c["id"] for c in rep["controls"] if c["status"] == ev.FAIL]
        summary.update(status="ok", sources=len(rep["sources"]), controls_failing=failing,
                       controls_passing=sum(c["status"] == ev.PASS for c in rep["controls"]))
        logger().info("%s", line)
        return rep


def _publish_markdown(key: str, text: str, headline: str) -> None:
    """The report's markdown artifact (a no-op outside a run; a failure is a warning)."""
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:
            return
        create_markdown_artifact(markdown=text, key=report.artifact_key(key), description=headline[:500])
    except Exception as exc:  # noqa: BLE001 - the artifact must never fail the run it describes
        logger().warning("could not publish the evidence artifact: %s", type(exc).__name__)
