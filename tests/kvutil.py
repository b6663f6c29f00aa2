"""Independent clients for tests: etcd through its JSON gRPC gateway and Consul through
py-consul, so what the tests seed and read back never goes through Burrow's own code."""

from __future__ import annotations

import base64
import inspect
import uuid
from typing import Any

import consul
import httpx


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def backup_kwargs() -> dict[str, Any]:
    """Flow keyword arguments that keep test archives unencrypted when the flow encrypts by default."""
    from flows.backup import backup

    params = inspect.signature(backup.fn).parameters
    return {"encryption": False} if "encryption" in params else {}


# --------------------------------------------------------------------------- etcd


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _prefix_end(p: bytes) -> bytes:
    b = bytearray(p)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


class Etcd:
    """etcd v3 over the JSON gateway (``/v3/...``), one HTTP call per operation."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=60, trust_env=False)

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post(path, json=body)
        r.raise_for_status()
        return r.json()

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self._post("/v3/kv/put", body)["header"]["revision"])

    def put_many(self, items: dict[bytes, bytes], lease: int = 0) -> None:
        """Put many keys, 128 per txn."""
        pairs = list(items.items())
        for i in range(0, len(pairs), 128):
            ops = []
            for k, v in pairs[i : i + 128]:
                put: dict[str, Any] = {"key": _b64(k), "value": _b64(v)}
                if lease:
                    put["lease"] = str(lease)
                ops.append({"request_put": put})
            self._post("/v3/kv/txn", {"success": ops})

    def delete(self, key: bytes) -> None:
        self._post("/v3/kv/deleterange", {"key": _b64(key)})

    def grant(self, ttl: int) -> int:
        return int(self._post("/v3/lease/grant", {"TTL": str(ttl)})["ID"])

    def ttl(self, lease: int) -> int:
        return int(self._post("/v3/kv/lease/timetolive", {"ID": str(lease)})["TTL"])

    def revision(self) -> int:
        return int(self._post("/v3/kv/range", {"key": _b64(b"\0"), "count_only": True})["header"]["revision"])

    def get(self, key: bytes) -> dict[str, Any] | None:
        kvs = self._post("/v3/kv/range", {"key": _b64(key)}).get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    def snapshot(self, prefix: bytes = b"", revision: int = 0, *, with_meta: bool = False) -> dict[bytes, Any]:
        """Every key starting with ``prefix`` (everything when empty) at ``revision`` (0: now)."""
        body: dict[str, Any] = {
            "key": _b64(prefix or b"\0"),
            "range_end": _b64(_prefix_end(prefix) if prefix else b"\0"),
        }
        if revision:
            body["revision"] = str(revision)
        kvs = self._post("/v3/kv/range", body).get("kvs") or []
        out: dict[bytes, Any] = {}
        for raw in kvs:
            kv = _kv(raw)
            out[kv["key"]] = kv if with_meta else kv["value"]
        return out


def _kv(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": base64.b64decode(raw["key"]),
        "value": base64.b64decode(raw.get("value", "")),
        "lease": int(raw.get("lease", 0)),
        "mod_revision": int(raw.get("mod_revision", 0)),
    }


# --------------------------------------------------------------------------- Consul


def consul_client(url: str, token: str | None = None) -> consul.Consul:
    hostport = url.split("://", 1)[-1]
    host, port = hostport.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port), token=token)


def consul_snapshot(c: consul.Consul, prefix: str) -> dict[str, tuple[bytes, int, str | None]]:
    """key -> (value, flags, session) for every key starting with ``prefix``."""
    _, entries = c.kv.get(prefix, recurse=True)
    return {e["Key"]: (e["Value"] or b"", e["Flags"], e.get("Session")) for e in entries or []}
