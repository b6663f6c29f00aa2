"""The verify flow: re-read a stored archive and check manifest, checksums and counts; with
``against``, also diff it with a live cluster (drift: keys added, removed and changed, by path)."""

from __future__ import annotations

from typing import Any

from prefect.runtime import flow_run

from blocks.keys import archive_keys
from blocks.resolve import archive_from_ref, scheme_of, source_from_ref
from burrow import naming, report
from burrow.errors import UsageError
from burrow.staging import staging_dir
from flows.common import Ref, burrow_flow, recorded_run
from tasks.download import download
from tasks.drift import drift as drift_task
from tasks.validate import validate
from tasks.verify import verify as verify_task
from tasks.verify import verify_structure_task


def _run_name() -> str:
    ref = str(flow_run.parameters.get("archive", "archive"))
    return f"verify-{naming.slug(ref.rsplit('/', 1)[-1].removesuffix('.burrow'))}"


@burrow_flow(name="verify", flow_run_name=_run_name, persist_result=False)
def verify(
    archive: Ref,
    key_files: list[str] | None = None,
    identity_files: list[str] | None = None,
    passphrase_env: str | None = None,
    key_env: str | None = None,
    key_block: str | None = None,
    structure_only: bool = False,
    allow_unencrypted: bool = False,
    against: Ref | None = None,
    root: str | None = None,
) -> dict[str, Any]:
    """Download ``archive`` and check it end to end. Returns the manifest summary.

    Keys are given as references, as for the restore flow. ``structure_only`` checks what
    needs no key (framing, header hash, sizes, body SHA-256, chunk layout) and decrypts nothing.
    When any read key is configured, an unencrypted archive fails unless ``allow_unencrypted``.

    ``against`` (a cluster URL without credentials or a saved block's name): once the archive
    passed every check, diff it with that live cluster, walked below ``root`` (default: the
    archive's own root). The summary gets ``drift`` (keys that differ), ``added``, ``removed``
    and ``changed`` with the paths (never values), status ``drift`` when any differ, and the
    run leaves a drift artifact. Nothing is written to the cluster.
    """
    summary: dict[str, Any] = {"status": "failed", "archive": archive}
    lists: dict[str, list[str]] = {}

    def _publish() -> None:
        rows = {k: v for k, v in summary.items() if not k.endswith("_paths") and k not in ("status", "error")}
        what = summary.get("source") or naming.redact_url(archive).rsplit("/", 1)[-1]
        if against is not None:
            outcome = f"drift of {against if scheme_of(against) is None else summary.get('target', 'the cluster')} " \
                      f"from {what}: {report.done_word(summary)}"
            if summary.get("status") != "failed":
                outcome += (f", {report.count(summary.get('drift'), 'key')} differ ({summary.get('added', 0):,} added, "
                            f"{summary.get('removed', 0):,} removed, {summary.get('changed', 0):,} changed)")
            report.publish(f"drift-{naming.slug(str(what))}", outcome, rows, lists=lists)
            return
        outcome = f"verify of {what}: {report.done_word(summary)}"
        if summary.get("status") != "failed":
            outcome += f", {summary.get('verified')}, {report.count(summary.get('keys'), 'key')}"
        report.publish(f"verify-{naming.slug(str(what))}", outcome, rows)

    with recorded_run("verify", summary, _publish):
        store, name = archive_from_ref(archive)
        if against is not None and structure_only:
            raise UsageError("--against compares keys and values, so it cannot be --structure-only")
        keys = None
        if not structure_only:
            keys = archive_keys(key_files, identity_files, passphrase_env, key_env, key_block)
        target = source_from_ref(against) if against is not None else None
        if target is not None:
            summary.update(target=target.describe(), target_service=target.service)
        with staging_dir() as work:
            if structure_only:
                m = verify_structure_task(store, name, str(work))
            elif target is not None:
                local = download(store, name, str(work))
                m = validate(local, keys, label=store.url(name), allow_unencrypted=allow_unencrypted)
                d = drift_task(local, target, str(work), keys, root, label=store.url(name))
                summary.update(drift=d.total, added=d.added, removed=d.removed, changed=d.changed,
                               unchanged=d.same, live_keys=d.live_keys,
                               added_paths=d.added_paths, removed_paths=d.removed_paths,
                               changed_paths=d.changed_paths)
                lists.update({"Added (in the cluster, not in the archive)": d.added_paths,
                              "Removed (in the archive, not in the cluster)": d.removed_paths,
                              "Changed (value differs)": d.changed_paths})
            else:
                m = verify_task(store, name, str(work), keys, allow_unencrypted)
        summary.update(
            verified="structure-only" if structure_only else "full",
            decrypted_with=keys.opened_by if keys else None,
            status="drift" if summary.get("drift") else "ok",
            url=store.url(name),
            service=m.get("service"),
            source=m.get("source"),
            keys=m.get("keys"),
            raw_bytes=m.get("raw_bytes"),
            content_sha256=m.get("content_sha256"),
            created=m.get("created"),
            encrypted=m.get("encrypted", False),
        )
        enc = m.get("encryption") if isinstance(m.get("encryption"), dict) else {}
        if enc.get("encrypted"):
            summary.update(encryption=enc.get("mode"), key_fingerprints=enc.get("fingerprints"))
        return summary
