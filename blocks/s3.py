"""AWS S3 and S3-compatible object storage (MinIO, Ceph RGW, Cloudflare R2, ...) as an archive store.

Credentials come from prefect-aws's ``AwsCredentials`` or ``MinIOCredentials`` block (the
``credentials`` field, or ``?credentials=BLOCK`` in a URL), else from the standard AWS
environment and files; they never appear in a URL, a parameter, a log or an artifact. With a
credentials block, the client is built by the block's ``get_s3_client()``, so its
``endpoint_url`` and ``aws_client_parameters`` apply; the store only adds its own endpoint,
addressing style, TLS and checksum settings on top. Without one, the store builds the same
client from the environment with boto3 itself, so that ``burrow list s3://...`` need not import
prefect-aws (and with it Prefect).

Publishing is atomic and never replaces anything: an archive is uploaded as a multipart
upload (parts sent as they are read, a bounded number in flight) and becomes visible only
when ``CompleteMultipartUpload`` succeeds with ``If-None-Match: *``. A failed or interrupted
upload is aborted. Uploads left open by a crashed backup are swept by prune only (it runs one
at a time), never by a backup: :meth:`S3Store.abort_stray_uploads` aborts only uploads Burrow
started (marked with the ``burrow-upload`` metadata at ``CreateMultipartUpload`` and recorded
in an ``_uploads/`` sidecar, since ``ListMultipartUploads`` returns no metadata), of ``.burrow``
objects below the store's prefix, whose sidecar is older than a week. Another application's
upload in the same bucket, and a running backup's, are never touched.

Integrity end to end: Burrow computes the full-object CRC32 itself, stores it with the object
(as the S3 full-object checksum where the store accepts checksums, and always as the
``x-amz-meta-burrow-crc32`` metadata), and compares it with what a download received before
the archive's own SHA-256 checks run.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import io
import json
import os
import socket
import threading
import uuid
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

from pydantic import Field, PrivateAttr, field_validator

from blocks.store import (
    ARCHIVE_SUFFIX,
    MAX_SIDECAR_BYTES,
    SIDECAR_SUFFIX,
    ArchiveInfo,
    ArchiveStore,
    check_name,
    check_sidecar_name,
)
from burrow.errors import ArchiveError, ArchiveNotFound, StoreError, StoreUnavailable, UsageError
from burrow.runlog import logger

MiB = 1024 * 1024
MIN_PART = 5 * MiB  # S3's minimum for every part but the last
CRC_META = "burrow-crc32"
TOKEN_META = "burrow-upload"
#: How old a Burrow upload's record must be before prune aborts the upload as stray. A week:
#: far longer than any backup runs, so a running backup's upload is never taken for a stray.
STRAY_UPLOAD_AGE = timedelta(days=7)
#: Where the record of each open Burrow upload lives (a sidecar, so never listed as an archive).
UPLOADS_PREFIX = "_uploads/"
#: ClientError codes a retry may fix (5xx, throttling, conflicting concurrent requests).
_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
    "Throttling", "ThrottlingException", "TooManyRequests", "OperationAborted", "ConditionalRequestConflict",
    "500", "502", "503", "504",
}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}

_CREDENTIALS_HELP = "An AwsCredentials or MinIOCredentials block (default: the AWS environment)"

#: URL query options: name -> model field.
URL_OPTIONS = {
    "endpoint": "endpoint_url", "region": "region", "addressing": "addressing_style", "verify": "verify_tls",
    "sse": "sse", "kms_key_id": "kms_key_id", "storage_class": "storage_class", "object_lock": "object_lock_mode",
    "retain_days": "retain_days", "checksum": "checksum", "credentials": "credentials_block",
    "part_size_mib": "part_size_mib", "concurrency": "concurrency",
}


class UploadVanished(StoreError):
    """A multipart upload of ours disappeared while it ran: someone else aborted it."""


def _no_such_upload() -> Exception:
    """A botocore NoSuchUpload error, for :meth:`S3Store._error` to word."""
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": "NoSuchUpload", "Message": "The specified upload does not exist"}},
                       "UploadPart")


def _b64crc(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def _held_until(head: dict[str, Any]) -> datetime | None:
    """From a HEAD answer: until when the object's current version is under Object Lock, its
    retention in force or a legal hold (no end: ``datetime.max``); None when it is not."""
    until = head.get("ObjectLockRetainUntilDate")
    if until is not None and until > datetime.now(UTC):
        return until
    if head.get("ObjectLockLegalHoldStatus") == "ON":
        return datetime.max.replace(tzinfo=UTC)
    return None


def _utc(ts: Any) -> str:
    if isinstance(ts, datetime):
        return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(ts)


class S3Store(ArchiveStore):
    """Archives as objects below ``prefix`` in an S3 bucket (AWS or any S3-compatible endpoint)."""

    _block_type_name: ClassVar[str] = "Burrow S3 Store"
    _block_type_slug: ClassVar[str] = "burrow-s3-store"
    _description: ClassVar[str] = "An S3 (or S3-compatible: MinIO, Ceph RGW, R2) bucket holding Burrow archives."

    bucket: str = Field(description="Bucket name")
    prefix: str = Field(default="", description="Key prefix the archives live below")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (default: AWS, or the credentials block's)")
    region: str | None = Field(default=None, description="Region (default: the credentials block's or the environment's)")
    addressing_style: Literal["auto", "path", "virtual"] = Field(default="auto", description="Bucket addressing style")
    verify_tls: bool = Field(default=True, description="Verify the endpoint's TLS certificate")
    sse: Literal["AES256", "aws:kms"] | None = Field(default=None, description="Server-side encryption")
    kms_key_id: str | None = Field(default=None, description="KMS key id for sse=aws:kms")
    storage_class: str | None = Field(default=None, description="Storage class, e.g. STANDARD_IA")
    object_lock_mode: Literal["GOVERNANCE", "COMPLIANCE"] | None = Field(
        default=None, description="Object Lock retention mode for new archives (the bucket needs Object Lock)"
    )
    retain_days: int | None = Field(default=None, ge=1, description="Object Lock retention in days")
    checksum: Literal["when_required", "when_supported", "off"] | None = Field(
        default=None,
        description=(
            "boto3's request checksums: 'when_supported' (AWS default), 'when_required' (default for "
            "non-AWS endpoints, which often reject the new default checksums), or 'off' (no S3 checksum "
            "headers at all; Burrow's CRC32 still travels as metadata)"
        ),
    )
    part_size_mib: int = Field(default=16, ge=5, le=5120, description="Multipart part size in MiB")
    concurrency: int = Field(default=4, ge=1, le=32, description="Parts in flight at once")
    # Any credentials object with ``aws_client_parameters`` and ``get_s3_client()`` (prefect-aws's
    # AwsCredentials or MinIOCredentials); the Prefect twin narrows it to those two block types.
    credentials: Any = Field(default=None, description=_CREDENTIALS_HELP)
    credentials_block: str | None = Field(
        default=None, description="Name of a saved AwsCredentials or MinIOCredentials block (URL form)"
    )

    _client: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def _twin_fields(cls) -> dict[str, tuple[Any, Any]]:
        from prefect_aws import AwsCredentials, MinIOCredentials

        # MinIO first, left to right: AwsCredentials has no required field and allows extras, so
        # in pydantic's "smart" union a saved MinIOCredentials came back as an AwsCredentials
        # without its keys. MinIOCredentials requires its user and password, so an AWS one
        # still falls through to AwsCredentials.
        return {"credentials": (MinIOCredentials | AwsCredentials | None,
                                Field(default=None, description=_CREDENTIALS_HELP, union_mode="left_to_right"))}

    @field_validator("credentials")
    @classmethod
    def _credentials_like(cls, value: Any) -> Any:
        if value is not None and not (hasattr(value, "get_s3_client") and hasattr(value, "aws_client_parameters")):
            raise ValueError("credentials must be an AwsCredentials or MinIOCredentials block")
        return value

    # ------------------------------------------------------------------ configuration

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        """``s3://bucket[/prefix][?endpoint=...&region=...&addressing=path&verify=false&sse=...
        &kms_key_id=...&storage_class=...&object_lock=GOVERNANCE&retain_days=30&checksum=...
        &credentials=BLOCK]``. Credentials never go in the URL: name a credentials block."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3":
            raise UsageError("an S3 store URL starts with s3://")
        if "@" in parts.netloc:
            raise UsageError("s3:// URLs never carry credentials; name a credentials block (?credentials=NAME) "
                             "or use the AWS environment")
        if not parts.netloc:
            raise UsageError("an s3:// URL needs a bucket: s3://bucket[/prefix]")
        try:
            query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError:
            raise UsageError("bad query string in an s3:// URL") from None
        unknown = set(query) - set(URL_OPTIONS)
        if unknown:
            raise UsageError(f"unknown s3 URL option(s): {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(URL_OPTIONS))})")
        kw: dict[str, Any] = {"bucket": parts.netloc, "prefix": unquote(parts.path).strip("/")}
        for key, values in query.items():
            value = values[-1]
            field = URL_OPTIONS[key]
            if field == "verify_tls":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise UsageError("?verify= takes true or false")
                kw[field] = value.lower() in ("true", "1", "yes")
            elif field == "endpoint_url":
                ep = urlsplit(value)
                if ep.scheme not in ("http", "https") or not ep.netloc or "@" in ep.netloc:
                    raise UsageError("?endpoint= takes http(s)://host[:port] (no credentials)")
                kw[field] = value.rstrip("/")
            else:
                kw[field] = value or None
        try:
            return cls(**kw)
        except ValueError as exc:
            fields = sorted({".".join(str(x) for x in e["loc"]) for e in getattr(exc, "errors", lambda: [])()})
            raise UsageError(f"bad s3 URL option(s): {', '.join(fields) or 'invalid value'}") from None

    def _query(self) -> str:
        q = []
        endpoint = self.endpoint_url or self._credentials_endpoint()
        if endpoint:
            q.append("endpoint=" + quote(endpoint, safe=":/"))
        if self.region:
            q.append("region=" + quote(self.region))
        if self.addressing_style != "auto":
            q.append("addressing=" + self.addressing_style)
        if not self.verify_tls:
            q.append("verify=false")
        if self.checksum:
            q.append("checksum=" + self.checksum)
        name = self.credentials_block or self._saved_credentials_name()
        if name:
            q.append("credentials=" + quote(name, safe="/"))
        return ("?" + "&".join(q)) if q else ""

    def _credentials_endpoint(self) -> str | None:
        params = getattr(self.credentials, "aws_client_parameters", None)
        return getattr(params, "endpoint_url", None)

    def _saved_credentials_name(self) -> str | None:
        creds = self.credentials
        name = getattr(creds, "_block_document_name", None) if creds is not None else None
        slug = getattr(type(creds), "get_block_type_slug", lambda: None)() if creds is not None else None
        if name and not str(name).startswith("anonymous-") and slug:
            return f"{slug}/{name}"
        return None

    @property
    def is_aws(self) -> bool:
        endpoint = self.endpoint_url or self._credentials_endpoint()
        if not endpoint:
            return True
        host = urlsplit(endpoint).hostname or ""
        return host.endswith(".amazonaws.com") or host == "amazonaws.com"

    @property
    def checksum_mode(self) -> str:
        return self.checksum or ("when_supported" if self.is_aws else "when_required")

    @property
    def part_size(self) -> int:
        return max(MIN_PART, self.part_size_mib * MiB)

    def describe(self) -> str:
        path = f"/{quote(self.prefix.strip('/'))}" if self.prefix.strip("/") else ""
        return f"s3://{self.bucket}{path}{self._query()}"

    def _key(self, name: str) -> str:
        p = self.prefix.strip("/")
        return f"{p}/{check_name(name)}" if p else check_name(name)

    def _sidecar_key(self, name: str) -> str:
        p = self.prefix.strip("/")
        return f"{p}/{check_sidecar_name(name)}" if p else check_sidecar_name(name)

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{quote(self._key(name))}{self._query()}"

    def _credentials(self) -> Any:
        """The credentials block to build the client with; None: the AWS environment."""
        if self.credentials is not None:
            return self.credentials
        if self.credentials_block:
            from prefect_aws import AwsCredentials, MinIOCredentials

            from blocks.localcopy import load_block  # refreshes the local copy; used when the API is down

            try:
                block = load_block(self.credentials_block, [AwsCredentials, MinIOCredentials], "credentials")
            except (ValueError, RuntimeError):
                block = None
            if not isinstance(block, (AwsCredentials, MinIOCredentials)):
                raise UsageError(f"no saved AwsCredentials or MinIOCredentials block named {self.credentials_block!r}")
            return block
        return None  # the standard AWS environment, config and credential files

    def client(self) -> Any:
        """The boto3 S3 client (made once): by the credentials block's ``get_s3_client()``, or
        from the AWS environment when the store has none."""
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        creds = self._credentials()
        params = creds.aws_client_parameters if creds is not None else None
        config = dict((params.config if params is not None else None) or {})
        s3cfg = dict(config.get("s3") or {})
        if self.addressing_style != "auto":
            s3cfg["addressing_style"] = self.addressing_style
        if s3cfg:
            config["s3"] = s3cfg
        mode = "when_required" if self.checksum_mode == "off" else self.checksum_mode
        config["request_checksum_calculation"] = mode
        config["response_checksum_validation"] = mode
        config.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
        config.setdefault("connect_timeout", 10)
        config.setdefault("read_timeout", 60)
        config.setdefault("max_pool_connections", max(10, self.concurrency * 2))
        if creds is None:
            return self._environment_client(config)
        update: dict[str, Any] = {"config": config}
        if self.endpoint_url:
            update["endpoint_url"] = self.endpoint_url
        if not self.verify_tls:
            update["verify"] = False
            update["verify_cert_path"] = None
        creds_update: dict[str, Any] = {"aws_client_parameters": params.model_copy(update=update)}
        if self.region:
            creds_update["region_name"] = self.region
        elif getattr(creds, "region_name", None) is None and not os.environ.get("AWS_DEFAULT_REGION") \
                and not os.environ.get("AWS_REGION"):
            creds_update["region_name"] = "us-east-1"
        return creds.model_copy(update=creds_update).get_s3_client()

    def _environment_client(self, config: dict[str, Any]) -> Any:
        """The client prefect-aws's ``AwsCredentials()`` (no field set) would build: boto3's
        default credential chain (environment, config and credential files, instance role)."""
        import boto3
        from botocore.config import Config

        region = self.region
        if region is None and not os.environ.get("AWS_DEFAULT_REGION") and not os.environ.get("AWS_REGION"):
            region = "us-east-1"
        kwargs: dict[str, Any] = {"config": Config(**config)}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        if not self.verify_tls:
            kwargs["verify"] = False
        return boto3.session.Session(region_name=region).client("s3", **kwargs)

    # ------------------------------------------------------------------ errors

    def _error(self, exc: Exception, what: str) -> Exception:
        """The Burrow error for a botocore failure; messages name the operation and the S3
        error code, never credentials."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        where = f"{what} ({self.describe()})"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "")) or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _NOT_FOUND_CODES:
                return ArchiveNotFound(f"{where}: not found")
            if code == "NoSuchUpload":
                return UploadVanished(
                    f"{where}: the upload was aborted by something else while it ran (NoSuchUpload: another "
                    "tool's sweep of multipart uploads, or a bucket lifecycle rule); nothing was published, "
                    "run the backup again"
                )
            if code == "NoSuchBucket":
                return StoreError(f"{where}: bucket {self.bucket} does not exist")
            if code in _AUTH_CODES:
                return StoreError(f"{where}: access denied ({code}); check the credentials block or AWS environment")
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return StoreUnavailable(f"{where}: {code or status} (a retry may help)")
            return StoreError(f"{where}: {code or status}")
        if isinstance(exc, NoCredentialsError):
            return StoreError(f"{where}: no AWS credentials (give a credentials block, or set the AWS environment)")
        if isinstance(exc, EndpointConnectionError):
            cause: BaseException | None = exc
            while cause is not None:
                if isinstance(cause, socket.gaierror) and cause.errno not in (socket.EAI_AGAIN,):
                    return StoreError(f"{where}: the endpoint's host name does not resolve")
                cause = cause.__cause__ or cause.__context__
            return StoreUnavailable(f"{where}: cannot reach the endpoint (a retry may help)")
        if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
            return StoreUnavailable(f"{where}: timed out (a retry may help)")
        if isinstance(exc, BotoCoreError):
            return StoreUnavailable(f"{where}: {type(exc).__name__} (a retry may help)")
        if isinstance(exc, OSError):
            return StoreUnavailable(f"{where}: {exc.strerror or type(exc).__name__} (a retry may help)")
        return exc

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:  # noqa: BLE001 - classified into Burrow's hierarchy
            err = self._error(exc, what)
            if err is exc:
                raise
            raise err from None

    # ------------------------------------------------------------------ store operations

    def check(self, *, writable: bool = False) -> None:
        """The bucket answers. Nothing is swept here: every backup checks its store, and a sweep
        on that path aborted the uploads of backups still running (prune sweeps, one at a time)."""
        self._call(f"cannot open bucket {self.bucket}", self.client().head_bucket, Bucket=self.bucket)

    def put(self, name: str, source: Path) -> ArchiveInfo:
        """Upload a finished local archive: its CRC32 is known first, so it also travels as
        metadata (a streamed write can only state it at completion)."""
        with open(source, "rb") as f:
            crc = 0
            while chunk := f.read(4 * MiB):
                crc = zlib.crc32(chunk, crc)
            f.seek(0)
            with self.writer(name, metadata={CRC_META: f"{crc:08x}"}) as out:
                while chunk := f.read(self.part_size):
                    out.write(chunk)
        return self.head(name)

    @contextmanager
    def writer(self, name: str, metadata: dict[str, str] | None = None) -> Iterator[BinaryIO]:
        """Write an archive as it is produced: parts go out as soon as ``part_size`` bytes are
        written (at most ``concurrency`` in flight), and the archive is published when the block
        ends without an error (``If-None-Match: *``); on an error the upload is aborted and
        nothing is visible. The full-object CRC32 is computed on the way and stored as the S3
        full-object checksum (with ``checksum=off`` a streamed archive carries none)."""
        w = _MultipartWriter(self, name, metadata or {})
        try:
            yield w  # type: ignore[misc]
        except BaseException:
            w.abort()
            raise
        w.complete()

    def _create_args(self, key: str, metadata: dict[str, str]) -> dict[str, Any]:
        create: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Metadata": metadata}
        if self.checksum_mode != "off":
            create.update(ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT")
        if self.sse:
            create["ServerSideEncryption"] = self.sse
            if self.sse == "aws:kms" and self.kms_key_id:
                create["SSEKMSKeyId"] = self.kms_key_id
        if self.storage_class:
            create["StorageClass"] = self.storage_class
        retain = self._retain_until()
        if retain is not None:
            create.update(ObjectLockMode=self.object_lock_mode, ObjectLockRetainUntilDate=retain)
        return create

    def _complete(self, name: str, key: str, upload_id: str, parts: builtins.list[dict], crc: int, token: str) -> None:
        """Publish the upload with ``If-None-Match: *``: never replacing an existing object."""
        complete: dict[str, Any] = {
            "Bucket": self.bucket, "Key": key, "UploadId": upload_id, "IfNoneMatch": "*",
            "MultipartUpload": {"Parts": parts},
        }
        if self.checksum_mode != "off":
            complete.update(ChecksumCRC32=_b64crc(crc), ChecksumType="FULL_OBJECT")
        try:
            self.client().complete_multipart_upload(**complete)
        except Exception as exc:  # noqa: BLE001
            from botocore.exceptions import ClientError

            code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
            # A retried complete whose first answer was lost finds the upload gone (NoSuchUpload)
            # or the object there (PreconditionFailed): it is ours if it carries our token.
            if code in ("PreconditionFailed", "NoSuchUpload") and self._token_of(key) == token:
                self._forget_upload(key, upload_id)
                return
            if code == "PreconditionFailed":
                raise StoreError(f"archive {name} already exists in {self.describe()}") from None
            raise self._error(exc, f"cannot publish {name}") from None
        self._forget_upload(key, upload_id)

    def _abort(self, name: str, key: str, upload_id: str) -> None:
        try:
            self.client().abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # noqa: BLE001 - the upload failed already; say so, keep its error
            from botocore.exceptions import ClientError

            code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
            if code != "NoSuchUpload":  # gone already: nothing left to abort
                logger().warning("store %s: could not abort the upload of %s (%s); prune will",
                                 self.describe(), name, type(exc).__name__)
                return
        self._forget_upload(key, upload_id)

    # ------------------------------------------------------------------ Burrow's open uploads

    def _upload_record(self, key: str, upload_id: str) -> str:
        """The sidecar that records one open upload as Burrow's: named by a digest of its key and
        upload id (an upload id may hold characters a sidecar name may not)."""
        digest = hashlib.sha256(f"{key}\0{upload_id}".encode()).hexdigest()[:40]
        return f"{UPLOADS_PREFIX}{digest}{SIDECAR_SUFFIX}"

    def _remember_upload(self, name: str, key: str, upload_id: str) -> None:
        """Record a just-started upload as Burrow's (create-only), so that prune may abort it once it
        is a week old; an upload that cannot be recorded is aborted (it could never be swept)."""
        body = json.dumps({"key": key, "upload_id": upload_id, "started": _utc(datetime.now(UTC))}).encode()
        try:
            self.put_sidecar(self._upload_record(key, upload_id), body)
        except BaseException:
            self._abort(name, key, upload_id)
            raise

    def _forget_upload(self, key: str, upload_id: str) -> None:
        """Remove the record of a finished (published or aborted) upload. A failure only leaves a
        record without an upload, which prune removes later: never an error of the upload."""
        try:
            self.client().delete_object(Bucket=self.bucket, Key=self._sidecar_key(self._upload_record(key, upload_id)))
        except Exception as exc:  # noqa: BLE001
            logger().debug("store %s: could not remove an upload record (%s); prune will",
                           self.describe(), type(exc).__name__)

    def _token_of(self, key: str) -> str | None:
        try:
            head = self.client().head_object(Bucket=self.bucket, Key=key)
        except Exception:  # noqa: BLE001 - absent or unreadable: not ours
            return None
        return (head.get("Metadata") or {}).get(TOKEN_META)

    @staticmethod
    def _part(number: int, crc: str | None, fut: Future) -> dict:
        part = {"PartNumber": number, "ETag": fut.result()["ETag"]}
        if crc:
            part["ChecksumCRC32"] = crc
        return part

    def _retain_until(self) -> datetime | None:
        if not self.object_lock_mode:
            return None
        if not self.retain_days:
            raise UsageError("object_lock needs retain_days (how long archives stay locked)")
        return datetime.now(UTC) + timedelta(days=self.retain_days)

    def _lock_object(self, name: str, key: str, retain: datetime) -> None:
        """Make sure the new version carries its retention (some S3-compatible servers ignore
        the lock headers of CreateMultipartUpload)."""
        client = self.client()
        head = self._call(f"cannot read {name}", client.head_object, Bucket=self.bucket, Key=key)
        if head.get("ObjectLockRetainUntilDate") and head.get("ObjectLockMode"):
            return
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key,
                                  "Retention": {"Mode": self.object_lock_mode, "RetainUntilDate": retain}}
        if head.get("VersionId") and head["VersionId"] != "null":
            kwargs["VersionId"] = head["VersionId"]
        self._call(f"cannot set Object Lock retention on {name}", client.put_object_retention, **kwargs)

    def get(self, name: str, dest: Path) -> Path:
        from boto3.s3.transfer import TransferConfig

        client, key = self.client(), self._key(name)
        head = self._call(f"cannot read archive {name}", client.head_object, Bucket=self.bucket, Key=key,
                          **({"ChecksumMode": "ENABLED"} if self.checksum_mode != "off" else {}))
        expected = self._stored_crc(head)
        # the version HEAD described, so size and checksum belong to the bytes downloaded
        extra = {"VersionId": head["VersionId"]} if head.get("VersionId") not in (None, "null") else {}
        config = TransferConfig(multipart_threshold=self.part_size, multipart_chunksize=self.part_size,
                                max_concurrency=self.concurrency)
        self._call(f"cannot download archive {name}", client.download_file, Bucket=self.bucket, Key=key,
                   Filename=str(dest), Config=config, ExtraArgs=extra)
        size = dest.stat().st_size
        if size != head["ContentLength"]:
            raise StoreUnavailable(f"download of {name} was cut short ({size} of {head['ContentLength']} bytes)")
        if expected is not None:
            crc = 0
            with open(dest, "rb") as f:
                while chunk := f.read(4 * MiB):
                    crc = zlib.crc32(chunk, crc)
            if crc != expected:
                raise ArchiveError(
                    f"{self.url(name)} failed its end-to-end checksum: the CRC32 stored with the object does not "
                    "match the bytes downloaded (corrupt in the store or in transit)"
                )
        return dest

    @staticmethod
    def _stored_crc(head: dict) -> int | None:
        meta = (head.get("Metadata") or {}).get(CRC_META)
        if meta:
            try:
                return int(meta, 16)
            except ValueError:
                return None
        if head.get("ChecksumCRC32") and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            return int.from_bytes(base64.b64decode(head["ChecksumCRC32"]), "big")
        return None

    def read_range(self, name: str, start: int, length: int) -> bytes:
        """``length`` bytes of an archive from offset ``start`` (negative: from the end)."""
        rng = f"bytes=-{length}" if start < 0 else f"bytes={start}-{start + length - 1}"
        resp = self._call(f"cannot read archive {name}", self.client().get_object,
                          Bucket=self.bucket, Key=self._key(name), Range=rng)
        return resp["Body"].read()

    def open_read(self, name: str, size: int | None = None) -> io.BufferedReader:  # type: ignore[override]
        """Ranged reads (:meth:`open_ranged`), never a whole download."""
        return self.open_ranged(name, size)

    def open_ranged(self, name: str, size: int | None = None) -> io.BufferedReader:
        """A seekable read-only file over the archive, read with ranged GETs: the catalog reads
        header, footer and manifest (two requests for most archives) instead of the whole."""
        if size is None:
            size = self.head(name).size
        return io.BufferedReader(RangedFile(self, name, size), buffer_size=RangedFile.BLOCK)

    def _objects(self, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every object whose name (below the store's prefix) starts with ``prefix``, as
        (name, ListObjectsV2 entry), page after page."""
        base = self.prefix.strip("/")
        base = base + "/" if base else ""
        client, token = self.client(), None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base + prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self._call(f"cannot list {self.describe()}", client.list_objects_v2, **kw)
            for obj in page.get("Contents", []):
                yield obj["Key"][len(base):], obj
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def list(self, prefix: str = "") -> builtins.list[ArchiveInfo]:
        out: builtins.list[ArchiveInfo] = []
        for name, obj in self._objects(prefix):
            if not name.endswith(ARCHIVE_SUFFIX):
                continue  # not an archive (a sidecar, a note): not ours to list
            try:
                check_name(name)
            except UsageError:
                logger().warning("store %s: skipping %r: not an archive name Burrow writes", self.describe(), name)
                continue
            out.append(ArchiveInfo(name=name, size=obj["Size"], modified=_utc(obj["LastModified"]),
                                   url=self.url(name), etag=obj.get("ETag")))
        out.sort(key=lambda a: (a.modified, a.name))
        return out

    def head(self, name: str) -> ArchiveInfo:
        h = self._call(f"cannot read archive {name}", self.client().head_object,
                       Bucket=self.bucket, Key=self._key(name))
        return ArchiveInfo(name=name, size=h["ContentLength"], modified=_utc(h["LastModified"]), url=self.url(name),
                           etag=h.get("ETag"))

    def locked_until(self, name: str) -> datetime | None:
        """The Object Lock retain-until date of the archive's current version, if it is in force
        (read from HEAD: not every server implements GetObjectRetention)."""
        h = self._call(f"cannot read archive {name}", self.client().head_object,
                       Bucket=self.bucket, Key=self._key(name))
        return _held_until(h)

    def lock_sidecar(self, name: str) -> datetime | None:
        """Put the sidecar ``name`` under the store's Object Lock retention, as archives are (the
        evidence report's objects: tasks/evidence.py); returns the retain-until time, or None when
        the store sets no Object Lock."""
        retain = self._retain_until()
        if retain is None:
            return None
        self._lock_object(name, self._sidecar_key(name), retain)
        return retain

    def delete(self, name: str) -> None:
        client, key = self.client(), self._key(name)
        h = self._call(f"cannot read archive {name}", client.head_object, Bucket=self.bucket, Key=key)
        until = _held_until(h)  # (what locked_until reports, from the same HEAD: the delete needs it anyway)
        if until is not None:
            raise StoreError(f"archive {name} is under Object Lock until {_utc(until)}; it cannot be deleted before")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if h.get("VersionId") and h["VersionId"] != "null":
            kwargs["VersionId"] = h["VersionId"]  # delete the version itself, not hide it behind a marker
        self._call(f"cannot delete archive {name}", client.delete_object, **kwargs)

    # ------------------------------------------------------------------ sidecars

    def put_sidecar(self, name: str, data: bytes) -> None:
        if len(data) > MAX_SIDECAR_BYTES:
            raise StoreError(f"sidecar {name} is larger than {MAX_SIDECAR_BYTES} bytes")
        key = self._sidecar_key(name)
        try:
            self.client().put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*",
                                     Metadata={CRC_META: f"{zlib.crc32(data):08x}"})
        except Exception as exc:  # noqa: BLE001 - classified below
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
                "PreconditionFailed", "412"
            ):
                raise StoreError(f"{name} already exists in {self.describe()}") from None
            err = self._error(exc, f"cannot write {name}")
            if err is exc:
                raise
            raise err from None

    def get_sidecar(self, name: str) -> bytes:
        resp = self._call(f"cannot read {name}", self.client().get_object,
                          Bucket=self.bucket, Key=self._sidecar_key(name))
        if resp.get("ContentLength", 0) > MAX_SIDECAR_BYTES:
            resp["Body"].close()
            raise StoreError(f"{name} in {self.describe()} is larger than {MAX_SIDECAR_BYTES} bytes")
        data = resp["Body"].read()
        expected = (resp.get("Metadata") or {}).get(CRC_META)
        if expected is not None and expected != f"{zlib.crc32(data):08x}":
            raise StoreUnavailable(f"{name} in {self.describe()} failed its CRC32 check (a retry may help)")
        return data

    def list_sidecars(self, prefix: str = "") -> builtins.list[str]:
        out = []
        for name, _ in self._objects(prefix):
            if name.endswith(SIDECAR_SUFFIX):
                try:
                    out.append(check_sidecar_name(name))
                except UsageError:
                    continue
        return sorted(out)

    def delete_sidecar(self, name: str) -> None:
        client, key = self.client(), self._sidecar_key(name)
        self._call(f"cannot read {name}", client.head_object, Bucket=self.bucket, Key=key)  # ArchiveNotFound
        self._call(f"cannot delete {name}", client.delete_object, Bucket=self.bucket, Key=key)

    def abort_stray_uploads(
        self, older_than: timedelta = STRAY_UPLOAD_AGE, *, now: datetime | None = None
    ) -> builtins.list[str]:
        """Abort the multipart uploads Burrow started below this store's prefix and never finished
        (a backup killed mid-upload), once they are older than ``older_than``; return their keys.

        Prune calls this (one prune at a time); no backup does. An upload is aborted only when all
        hold: its key ends in ``.burrow`` and is an archive name below the prefix; its record
        (``_uploads/<digest>.burrow-meta``, written when Burrow started it) exists; and both the
        record's LastModified and the upload's ``Initiated`` are older than the limit. The record's
        time comes from the store's own listing: some servers (moto) report every ``Initiated`` as
        2010, which alone would make a running backup's upload look ancient. Another application's
        upload has no record and is never touched. Records left without an upload (a finished
        upload whose record could not be removed) are removed once older than the limit.
        """
        base = self.prefix.strip("/")
        base = base + "/" if base else ""
        client = self.client()
        cutoff = (now or datetime.now(UTC)) - older_than
        records = {name: obj["LastModified"] for name, obj in self._objects(UPLOADS_PREFIX)
                   if name.endswith(SIDECAR_SUFFIX)}
        seen: set[str] = set()
        aborted = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base}
        while True:
            page = self._call(f"cannot list uploads in {self.describe()}", client.list_multipart_uploads, **kw)
            for up in page.get("Uploads", []):
                key, upload_id = up["Key"], up["UploadId"]
                if not key.endswith(ARCHIVE_SUFFIX):
                    continue  # not an archive: not Burrow's
                try:
                    check_name(key[len(base):])
                except UsageError:
                    continue
                record = self._upload_record(key, upload_id)
                if record not in records:
                    continue  # not started by Burrow (no record): another application's
                seen.add(record)
                if records[record] >= cutoff or up["Initiated"] >= cutoff:
                    continue  # recent: perhaps a backup still running
                try:
                    self._call(f"cannot abort a stray upload in {self.describe()}", client.abort_multipart_upload,
                               Bucket=self.bucket, Key=key, UploadId=upload_id)
                except StoreError as exc:
                    if "NoSuchUpload" not in str(exc):
                        raise
                aborted.append(key)
                self._drop_record(record)
            if not page.get("IsTruncated"):
                break
            kw.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))
        for record, modified in records.items():
            if record not in seen and modified < cutoff:
                self._drop_record(record)  # its upload finished or was aborted long ago
        if aborted:
            logger().warning("store %s: aborted %d stray multipart upload(s) Burrow started more than %s ago",
                             self.describe(), len(aborted), older_than)
        return aborted

    def _drop_record(self, record: str) -> None:
        try:
            self.delete_sidecar(record)
        except ArchiveNotFound:
            pass


class RangedFile(io.RawIOBase):
    """Seekable reads of a stored archive through ``store.read_range``, in blocks with a small
    cache. A small archive is fetched whole by the first read; a larger one is read where the
    reader looks (the first read at the end fetches the last 128 KiB, which holds the footer
    and, for all but huge archives, the manifest)."""

    BLOCK = 64 * 1024
    WHOLE = 256 * 1024
    CACHE = 16

    def __init__(self, store: S3Store, name: str, size: int) -> None:
        super().__init__()
        self.store, self.name, self.size = store, name, size
        self.pos = 0
        self.bytes_read = 0
        self._blocks: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _fetch(self, first: int, count: int) -> None:
        start = first * self.BLOCK
        length = min(self.size, (first + count) * self.BLOCK) - start
        data = self.store.read_range(self.name, start, length)
        if len(data) != length:
            raise StoreUnavailable(f"ranged read of {self.name} was cut short")
        self.bytes_read += len(data)
        if len(self._blocks) + count > self.CACHE:
            self._blocks.clear()
        for i in range(count):
            self._blocks[first + i] = data[i * self.BLOCK : (i + 1) * self.BLOCK]

    def _block(self, index: int) -> bytes:
        if index not in self._blocks:
            last = (self.size - 1) // self.BLOCK
            if self.size <= self.WHOLE:
                self._fetch(0, last + 1)
            elif index >= last - 1:
                self._fetch(max(0, last - 1), last - max(0, last - 1) + 1)
            else:
                self._fetch(index, min(4, last - index + 1))
        return self._blocks[index]

    def readinto(self, b: Any) -> int:
        if self.pos >= self.size:
            return 0
        index, offset = divmod(self.pos, self.BLOCK)
        block = self._block(index)
        n = min(len(b), len(block) - offset)
        b[:n] = block[offset : offset + n]
        self.pos += n
        return n


class _MultipartWriter(io.RawIOBase):
    """The file object :meth:`S3Store.writer` yields: buffers one part, sends full parts with a
    bounded number in flight, and keeps the running CRC32."""

    def __init__(self, store: S3Store, name: str, metadata: dict[str, str]) -> None:
        super().__init__()
        self.store, self.name = store, name
        self.key = store._key(name)
        self.client = store.client()
        self.token = uuid.uuid4().hex  # tells our own completed upload from another writer's object
        create = store._create_args(self.key, {**metadata, TOKEN_META: self.token})
        self.retain = create.get("ObjectLockRetainUntilDate")
        self.upload_id = store._call(f"cannot start uploading {name}", self.client.create_multipart_upload,
                                     **create)["UploadId"]
        store._remember_upload(name, self.key, self.upload_id)
        self.checksums = store.checksum_mode != "off"
        self.buf = bytearray()
        self.crc = 0
        self.size = 0
        self.number = 0
        self.parts: builtins.list[dict] = []
        self.inflight: deque[tuple[int, str | None, Future]] = deque()
        self.pool = ThreadPoolExecutor(max_workers=store.concurrency, thread_name_prefix="burrow-s3")
        self.finished = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)  # the same object when it already is bytes
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        part, pos = self.store.part_size, 0
        if self.buf:  # top up the part being gathered first
            pos = min(len(data), part - len(self.buf))
            self.buf += memoryview(data)[:pos]
            if len(self.buf) == part:
                self._send(bytes(self.buf))
                self.buf = bytearray()
        while len(data) - pos >= part:  # whole parts straight from the caller's bytes (no copy for one part)
            self._send(data if pos == 0 and len(data) == part else data[pos : pos + part])
            pos += part
        self.buf += memoryview(data)[pos:]
        return len(data)

    def _send(self, data: bytes) -> None:
        self.number += 1
        crc = _b64crc(zlib.crc32(data)) if self.checksums else None
        kwargs: dict[str, Any] = {"Bucket": self.store.bucket, "Key": self.key, "UploadId": self.upload_id,
                                  "PartNumber": self.number, "Body": data}
        if crc:
            kwargs["ChecksumCRC32"] = crc
        fut = self.pool.submit(self.store._call, f"cannot upload part {self.number} of {self.name}",
                               self.client.upload_part, **kwargs)
        self.inflight.append((self.number, crc, fut))
        while len(self.inflight) >= self.store.concurrency:
            self._collect()

    def _collect(self) -> None:
        """Wait for the oldest part in flight. A part that failed because the upload itself is
        gone (someone aborted it; some servers, moto among them, answer 500 rather than
        NoSuchUpload) fails as :class:`UploadVanished`, not as a retryable outage."""
        try:
            self.parts.append(S3Store._part(*self.inflight.popleft()))
        except StoreUnavailable:
            if self.vanished():
                raise self.store._error(_no_such_upload(), f"cannot upload {self.name}") from None
            raise

    def vanished(self) -> bool:
        """Whether this upload no longer exists (ListParts answers NoSuchUpload)."""
        try:
            self.client.list_parts(Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id, MaxParts=1)
        except Exception as exc:  # noqa: BLE001 - only NoSuchUpload says anything
            from botocore.exceptions import ClientError

            return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") == "NoSuchUpload"
        return False

    def complete(self) -> None:
        try:
            if self.buf or self.number == 0:
                self._send(bytes(self.buf))
                self.buf = bytearray()
            while self.inflight:
                self._collect()
            try:
                self.store._complete(self.name, self.key, self.upload_id, self.parts, self.crc, self.token)
            except StoreUnavailable:
                if not self.vanished():
                    raise
                if self.store._token_of(self.key) != self.token:
                    raise self.store._error(_no_such_upload(), f"cannot publish {self.name}") from None
                self.store._forget_upload(self.key, self.upload_id)  # completed: only the answer was lost
        except BaseException:
            self.abort()
            raise
        finally:
            self.pool.shutdown(wait=not self.finished)  # an aborted upload waits for no part (abort)
        self.finished = True
        if self.retain is not None:
            self.store._lock_object(self.name, self.key, self.retain)

    def abort(self) -> None:
        if self.finished:
            return
        self.finished = True
        for _, _, fut in self.inflight:
            fut.cancel()
        # The upload is aborted at once, without waiting for the parts still in flight: one may
        # hang on a stalled connection, and an abort that waits for it never happens when the run
        # is being stopped (SIGTERM, then SIGKILL a few seconds later), leaving the upload open.
        # A part that lands after the abort is refused (NoSuchUpload); nothing waits for it.
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.store._abort(self.name, self.key, self.upload_id)

    def flush(self) -> None:
        pass
