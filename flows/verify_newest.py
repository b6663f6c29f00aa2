"""The verify-newest flow (the daily ``verify-daily`` deployment): fully verify, with the read
keys, the newest trusted archive of every source in a store, and record it as verified ``full`` (the plain record ``list`` and ``status`` show, and a record signed
    with the reader key that the evidence report counts: tasks/evidence.py).

Backup workers hold public keys only, so every archive they write is verified structure-only
(nothing decrypted, the manifest not authenticated). This run, where the identities are, closes
that gap for the archive a failover would take: it downloads it, decrypts and checks every
record against the authenticated manifest (tasks/verify.py), and writes the create-only
``<archive>.verified-full.burrow-meta`` record that ``list``, ``status`` and the evidence report
read."""

from __future__ import annotations

from typing import Any

from prefect.runtime import flow_run

from blocks.keys import archive_keys
from blocks.resolve import store_from_ref
from burrow import naming, report
from burrow.errors import ArchiveError, StoreError, UsageError
from burrow.runlog import logger
from burrow.staging import staging_dir
from flows.common import Ref, burrow_flow, recorded_run
from tasks.catalog import catalog, select_archives
from tasks.evidence import record_full_verification_task
from tasks.verify import record_verification_task, verification_levels, verification_of
from tasks.verify import verify as verify_task


def _run_name() -> str:
    return f"verify-newest-{naming.slug(str(flow_run.parameters.get('store', 'store')))}-{naming.stamp()}"


@burrow_flow(name="verify-newest", flow_run_name=_run_name, persist_result=False)
def verify_newest(
    store: Ref,
    sources: list[str] | None = None,
    key_files: list[str] | None = None,
    identity_files: list[str] | None = None,
    passphrase_env: str | None = None,
    key_env: str | None = None,
    key_block: str | None = None,
    allow_unencrypted: bool = False,
) -> dict[str, Any]:
    """Fully verify the newest trusted archive of each source of ``store`` (or of ``sources``)
    with the read keys, and record each as verified ``full``. An archive that fails its verify
    fails the run (after every source was tried), and is left where it is: deleting is prune's."""
    log = logger()
    summary: dict[str, Any] = {"status": "failed", "source": "all", "store": store}
    results: list[dict[str, Any]] = []

    def _publish() -> None:
        failed = [r for r in results if r["outcome"] != "ok"]
        outcome = (f"verify of the newest archives in {store}: {summary['status']}, "
                   f"{len(results) - len(failed)} of {len(results)} fully verified")
        report.publish(f"verify-newest-{naming.slug(store)}", outcome,
                       {k: v for k, v in summary.items() if k != "results"},
                       tables={"archives": ("archives verified", results)})

    with recorded_run("verify", summary, _publish):
        st = store_from_ref(store)
        keys = archive_keys(key_files, identity_files, passphrase_env, key_env, key_block)
        if not keys.can_reader_sign():
            raise UsageError("a full verify needs the read keys (the identities: --key-block, --identity, --key-file, "
                             "--passphrase-env or --key-env)")
        rows = catalog(st, keys)
        names = sorted(set(sources) if sources else {str(r["source"]) for r in rows if r.get("source")})
        levels = verification_levels(st)
        with staging_dir() as work:
            for source in names:
                newest = select_archives(rows, source, keyed=True, allow_unencrypted=allow_unencrypted).newest
                if newest is None:
                    log.warning("verify: no trusted archive of %s in %s", source, st.describe())
                    results.append({"source": source, "archive": "", "outcome": "no trusted archive", "keys": None})
                    continue
                try:
                    m = verify_task(st, newest["name"], str(work), keys, allow_unencrypted)
                except (ArchiveError, StoreError) as exc:
                    log.error("verify: %s FAILED: %s", newest["url"], exc)
                    results.append({"source": source, "archive": newest["url"], "outcome": f"failed: {exc}", "keys": None})
                    continue
                record_full_verification_task(st, keys, newest["name"], m)  # signed, bound to the manifest verified
                if verification_of(newest["name"], levels) != "full":
                    try:
                        record_verification_task(st, newest["name"], "full")
                    except StoreError as exc:  # written meanwhile by another run: create-only
                        log.warning("verify: the verification record of %s was not written: %s", newest["url"], exc)
                log.info("verify: %s fully verified: %s keys, content sha256 %s", newest["url"], m.get("keys"),
                         m.get("content_sha256"))
                results.append({"source": source, "archive": newest["url"], "outcome": "ok", "keys": m.get("keys")})
        failed = [r for r in results if r["outcome"] != "ok"]
        summary.update(verified=sum(r["outcome"] == "ok" for r in results), sources=len(names), failed=len(failed))
        if failed:
            raise ArchiveError(f"{len(failed)} of {len(names)} sources' newest archives did not verify: "
                               + "; ".join(f"{r['source']}: {r['outcome']}" for r in failed[:5]))
        summary["status"] = "ok"
        return summary
