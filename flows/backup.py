"""The backup flow: extract, compress, upload, verify."""

from __future__ import annotations

from typing import Any

from prefect.runtime import flow_run

from blocks.keys import backup_write_keys
from blocks.resolve import source_from_ref, store_from_ref
from burrow import naming, report
from burrow.crypto import ArchiveKeys, StreamEncryptor
from burrow.errors import ArchiveError, BurrowError, UsageError
from burrow.keys import KeyRefs
from burrow.runlog import logger
from burrow.staging import discard_spool, staging_dir
from flows.common import Ref, burrow_flow, recorded_run, source_lock, store_block_name
from tasks.compress import compress, compress_upload
from tasks.extract import extract
from tasks.upload import check_store, upload
from tasks.verify import record_verification_task, verify, verify_structure_task


def _run_name() -> str:
    params = flow_run.parameters
    ref = str(params.get("source", "source"))
    scheme = ref.split("://", 1)[0].lower() if "://" in ref else ""
    tag = {"zk": "zk", "etcd": "etcd", "etcds": "etcd", "consul": "consul", "consuls": "consul"}.get(scheme, "block")
    name = params.get("name") or ref.split("://", 1)[-1].split("?", 1)[0]  # the URL: scheme is in the tag
    return f"backup-{tag}-{naming.slug(str(name))}-{naming.stamp()}"


@burrow_flow(name="backup", flow_run_name=_run_name, persist_result=False, log_prints=False)
def backup(
    source: Ref,
    store: Ref,
    name: str | None = None,
    root: str = "/",
    compression_level: int = 3,
    include_leased: bool = False,
    encryption: bool = True,
    key_file: str | None = None,
    key_env: str | None = None,
    recipients: list[str] | None = None,
    passphrase_env: str | None = None,
    key_block: str | None = None,
) -> dict[str, Any]:
    """Back up ``source`` (a URL without credentials, or a saved block's name) into ``store``.

    The archive is encrypted to the key named by ``key_file`` (a path), ``key_env`` (the
    name of an environment variable holding a key), ``recipients`` (public keys or files of
    them), ``passphrase_env`` (the name of the variable holding a passphrase) or ``key_block``
    (a saved EncryptionKeys block), else to what the BURROW_* environment configures. With
    none, the run refuses to write anything unless ``encryption`` is False. Parameters are
    references only: key material is read inside the run and never recorded.

    Returns the run summary; its ``url`` is the archive's location.
    """
    log = logger()
    summary: dict[str, Any] = {"status": "failed", "source": name or source}
    steps = report.Steps()

    def _publish() -> None:
        summary["steps_s"] = dict(steps.seconds)
        publish_summary(summary, steps)

    with recorded_run("backup", summary, _publish, progress_title=f"backup of {name or source}"):
        src = source_from_ref(source)
        if include_leased:
            if "include_leased" not in type(src).model_fields:
                raise UsageError(f"--include-leased applies to etcd sources only, not {src.service}")
            src = src.model_copy(update={"include_leased": True})
        dst = store_from_ref(store)
        with steps.step("store"):
            check_store(dst)  # fail before touching the cluster
        # default: the block's name, or the URL as the block describes it (no credentials or options)
        source_name = naming.check_source_name(name or (src.describe() if "://" in source else source))
        summary.update(service=src.service, source=source_name, source_url=src.describe(), store=dst.describe())
        if store_block_name(store):
            summary["store_block"] = store
        refs = KeyRefs(
            key_files=[key_file] if key_file else [], key_env=key_env, recipients=list(recipients or []),
            passphrase_env=passphrase_env, block=key_block,
        )
        write_keys = backup_write_keys(encryption, refs)  # refuses before touching the cluster
        encryptor = StreamEncryptor(write_keys) if write_keys else None
        if write_keys is None:
            log.warning("encryption is turned off: this archive is written unencrypted")
            summary.update(encrypted=False)
        else:
            log.info("encrypting for %s key(s) %s", write_keys.mode, ", ".join(write_keys.fingerprints()) or "-")
            summary.update(encrypted=True, encryption=write_keys.mode, key_fingerprints=write_keys.fingerprints())
        archive = naming.archive_name(source_name)
        with staging_dir() as work:
            with source_lock(source_name), steps.step("extract"):  # one run at a time reads this cluster
                ex = extract(src, root, str(work))
            extra = {"encryption": encryptor.summary()} if encryptor else None
            if hasattr(dst, "writer"):
                # object storage: parts leave as they are produced, no archive file on scratch disk
                with steps.step("compress and upload"):
                    _, info = compress_upload(ex, dst, archive, source_name, compression_level, encryptor, extra)
                discard_spool(ex.spool)
            else:
                with steps.step("compress"):
                    comp = compress(ex, str(work / "archive.burrow"), source_name, compression_level, encryptor,
                                    extra, object_name=archive)
                discard_spool(ex.spool)
                with steps.step("upload"):
                    info = upload(dst, comp.path, archive)
            try:
                if write_keys is not None and not write_keys.can_decrypt():
                    # Public keys only: this worker cannot decrypt what it wrote (by design).
                    with steps.step("verify"):
                        verified = verify_structure_task(dst, archive, str(work))
                    summary["verified"] = "structure-only"
                    summary["verified_note"] = (
                        "public-key recipients: framing, header, sizes and body SHA-256 checked; "
                        "nothing decrypted, manifest not authenticated"
                    )
                else:
                    keys = ArchiveKeys(write_keys.keyring()) if write_keys else None
                    with steps.step("verify"):
                        verified = verify(dst, archive, str(work), keys)
                    summary["verified"] = "full"
            except ArchiveError:
                # The bytes are wrong: only this removes the archive, so it is never taken for a good one.
                _remove_bad_archive(dst, archive, info.url)
                raise
            except BurrowError as exc:
                # The store (or the network) failed, not the archive: it stays, unverified, and the
                # catalog shows it so. Deleting it here once destroyed good backups during an outage.
                summary["verified"] = "unverified"
                log.error("verify could not complete; %s was left in the store unverified", info.url)
                exc.args = (f"{exc}; the archive {info.url} was left in the store unverified "
                            "(check it with `burrow verify`)",)
                raise
            _record_verification(dst, archive, summary["verified"])
        m = verified
        summary.update(
            status="ok",
            url=info.url,
            keys=m["keys"],
            raw_bytes=m["raw_bytes"],
            stored_bytes=info.size,
            ratio=report.ratio(m["raw_bytes"], info.size),
            content_sha256=m["content_sha256"],
            archive_created=m.get("created"),  # the signed time: the evidence report's RPO of a pruned archive
            skipped_ephemeral=m.get("skipped_ephemeral", 0),
            point_in_time=m.get("point_in_time", False),
            skipped_excluded=m.get("skipped_excluded", 0),
            redacted_acls=m.get("redacted_acls", 0),
            encrypted=m.get("encrypted", False),
            service_info=m.get("service_info", {}),
            warnings=m.get("warnings", []),
        )
        return summary


def publish_summary(summary: dict[str, Any], steps: report.Steps) -> None:
    """The backup's artifact, keyed ``backup-<source>`` (the block's or source's name): the
    outcome line, the steps, the facts; the warnings below."""
    source = str(summary.get("source") or "source")
    outcome = f"backup of {source}: {report.done_word(summary)}"
    if summary.get("status") == "ok":
        outcome += (f", {report.count(summary.get('keys'), 'key')}, {report.size(summary.get('stored_bytes'))} stored "
                    f"({summary.get('ratio')}), {report.seconds(summary.get('duration_s'))}")
    facts = {k: v for k, v in summary.items() if k not in ("warnings", "steps_s", "status", "error")}
    report.publish(f"backup-{naming.slug(source)}", outcome, facts, steps=steps.rows(),
                   lists={"Warnings": summary.get("warnings", [])})


def _remove_bad_archive(dst: Any, archive: str, url: str) -> None:
    """Delete an archive that failed its verify. A failing delete is logged, and never replaces
    the verify's error, which the caller re-raises: that is the one the operator must see."""
    log = logger()
    log.error("verify failed: removing %s so it is never mistaken for a good backup", url)
    try:
        dst.delete(archive)
    except BurrowError as exc:
        log.error("could not remove %s either (%s): delete it by hand; it failed its verify", url, exc)


def _record_verification(dst: Any, archive: str, level: str) -> None:
    """Record next to the archive what its verify covered (``list``/``status`` show it). The
    archive is verified either way: a record that cannot be written is a warning only, and the
    archive then shows as unverified, the safe side."""
    try:
        record_verification_task(dst, archive, level)
    except BurrowError as exc:
        logger().warning("the verification record of %s could not be written (%s): list and status will "
                         "show it as unverified", archive, exc)
