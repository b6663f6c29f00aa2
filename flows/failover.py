"""The failover flow: rebuild a cluster from the newest archive of a source that verifies.

"DC-US is down: rebuild its ZooKeeper in DC-EU from the latest verified backup." The store's
archives of ``source`` are tried newest first; an archive that fails verification (corrupt,
truncated, tampered) is reported and the next older one is tried. A key that opens none of
them stops the run: failing over to stale data because of a key problem would be worse.
The restore itself follows the safety rule: only missing keys are created.
"""

from __future__ import annotations

from typing import Any

from prefect.runtime import flow_run

from blocks.keys import archive_keys
from blocks.resolve import source_from_ref, store_from_ref
from burrow import naming, report
from burrow.errors import ArchiveError, ArchiveNotFound, KeyMismatch
from burrow.runlog import logger
from burrow.staging import staging_dir
from flows.common import Ref, burrow_flow
from flows.restore import plan_and_replay, publish_summary
from tasks.catalog import by_creation, catalog, distrust
from tasks.download import download
from tasks.validate import validate


def _run_name() -> str:
    p = flow_run.parameters
    kind = "failover-dry-run" if p.get("dry_run") else "failover"
    return f"{kind}-{naming.slug(str(p.get('source', 'source')))}-to-{naming.slug(str(p.get('into', 'target')))}"


@burrow_flow(name="failover", flow_run_name=_run_name, persist_result=False)
def failover(
    source: str,
    store: Ref,
    into: Ref,
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
) -> dict[str, Any]:
    """Restore the newest verifiable archive of ``source`` (the source name recorded in the
    manifests) from ``store`` into ``into``. Returns the run summary. When any read key is
    configured, unencrypted archives are skipped (reported) unless ``allow_unencrypted``."""
    log = logger()
    summary: dict[str, Any] = {"status": "failed", "source": source, "dry_run": dry_run}
    lists: dict[str, list[str]] = {}
    skipped: list[str] = []

    def _publish() -> None:
        lists["Archives skipped (failed verification)"] = skipped
        publish_summary("failover", summary, lists, dry_run)

    with report.recorded(summary, _publish):
        st = store_from_ref(store)
        target = source_from_ref(into)
        summary.update(store=st.describe(), target=target.describe(), target_service=target.service)
        keys = archive_keys(key_files, identity_files, passphrase_env, key_env, key_block)
        keyed = bool(keys.keyring)
        rows = catalog(st, keys if keyed else None)
        mine = [r for r in rows if r.get("source") == source]
        if not mine:
            held = sorted({str(r["source"]) for r in rows if r.get("source") and not r.get("error")})
            raise ArchiveNotFound(
                f"no archive of source {source!r} in {st.describe()}"
                + (f" (it holds: {', '.join(held)})" if held else " (it holds no readable archive)")
            )
        # Act only on manifests that can be trusted: with a key configured, the manifest's claims
        # (source, created) are authenticated first, so a planted archive cannot pose as the newest.
        candidates = []
        for row in mine:
            plain_ok = allow_unencrypted and not row.get("encrypted")
            why = distrust(row, keyed=keyed and not plain_ok)
            if why is None:
                candidates.append(row)
            else:
                log.warning("failover: skipping %s: %s", row["url"], why)
                skipped.append(f"{row['url']}: {why}")
        if keyed and not candidates and any(
            r.get("encrypted") and r.get("unauthenticated_reason") == "no configured key opens it" for r in mine
        ):
            raise KeyMismatch(
                f"no configured key opens any archive of {source!r} in {st.describe()}; pass the right "
                "--key-file, --identity or --passphrase-env (a failover never falls back to stale data over a key problem)"
            )
        candidates = by_creation(candidates)
        if not candidates:
            raise ArchiveError(f"no archive of {source!r} in {st.describe()} can be trusted ({len(skipped)} skipped)")
        with staging_dir() as work:
            chosen = None
            for row in candidates[: max(1, max_candidates)]:
                try:
                    local = download(st, row["name"], str(work))
                    manifest = validate(local, keys, label=row["url"], allow_unencrypted=allow_unencrypted)
                except KeyMismatch:
                    raise
                except ArchiveError as exc:
                    log.warning("failover: skipping %s: %s", row["url"], exc)
                    skipped.append(f"{row['url']}: {exc}")
                    continue
                chosen = (row, local, manifest)
                break
            if chosen is None:
                raise ArchiveError(
                    f"none of the newest {len(skipped)} archives of {source!r} passed verification"
                )
            row, local, manifest = chosen
            log.info("failover: restoring %s (created %s) into %s", row["url"], manifest["created"], target.describe())
            summary.update(
                archive=row["url"], archive_created=manifest["created"], service=manifest["service"],
                archive_keys=manifest["keys"], content_sha256=manifest["content_sha256"],
                skipped_archives=len(skipped),
            )
            if keys.opened_by:
                summary["decrypted_with"] = keys.opened_by
            plan_and_replay(local, target, work, keys, summary, lists, dry_run=dry_run, subtree=subtree, maps=maps)
        return summary
