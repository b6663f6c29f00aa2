"""The verify flow: re-read a stored archive and check manifest, checksums and counts."""

from __future__ import annotations

from typing import Any

from prefect.runtime import flow_run

from blocks.keys import archive_keys
from blocks.resolve import archive_from_ref
from burrow import naming, report
from burrow.staging import staging_dir
from flows.common import Ref, burrow_flow
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
) -> dict[str, Any]:
    """Download ``archive`` and check it end to end. Returns the manifest summary.

    Keys are given as references, as for the restore flow. ``structure_only`` checks what
    needs no key (framing, header hash, sizes, body SHA-256, chunk layout) and decrypts nothing.
    When any read key is configured, an unencrypted archive fails unless ``allow_unencrypted``.
    """
    summary: dict[str, Any] = {"status": "failed", "archive": archive}

    def _publish() -> None:
        report.publish(f"verify-{summary.get('source') or 'archive'}", f"Burrow verify: {summary['status']}", summary)

    with report.recorded(summary, _publish):
        store, name = archive_from_ref(archive)
        keys = None
        if not structure_only:
            keys = archive_keys(key_files, identity_files, passphrase_env, key_env, key_block)
        with staging_dir() as work:
            if structure_only:
                m = verify_structure_task(store, name, str(work))
            else:
                m = verify_task(store, name, str(work), keys, allow_unencrypted)
        summary.update(
            verified="structure-only" if structure_only else "full",
            decrypted_with=keys.opened_by if keys else None,
            status="ok",
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
