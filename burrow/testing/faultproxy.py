"""A fault-injecting HTTP proxy for tests: put it in front of an S3 endpoint (moto) and a share of
the requests fail the way real networks and object stores fail.

Each request, with a seeded random generator (so a test run is reproducible), is either
forwarded untouched or meets one fault:

* ``error``: answered ``500 InternalError`` or ``503 SlowDown`` without reaching the server;
* ``reset``: the connection is reset before the request reaches the server;
* ``lost``: the request reaches the server and succeeds there, but the connection is reset
  before the answer gets back (the case that makes retries of non-idempotent calls hard);
* ``stall``: the request waits ``stall_seconds`` before it is forwarded;
* ``flip`` (only when asked for): one bit of a GET answer's body is flipped on the way back,
  as a faulty network card or middlebox would (the status and headers are untouched).

Listens on 127.0.0.1 only. Only the standard library is used.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("error", "reset", "lost", "stall")
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy:
    """``with FaultProxy(upstream, rate=0.2, seed=7) as proxy: ... proxy.url ...``"""

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.2,
        seed: int = 1,
        faults: tuple[str, ...] = FAULTS,
        stall_seconds: float = 1.0,
    ) -> None:
        u = urlsplit(upstream)
        self.upstream_host, self.upstream_port = u.hostname or "127.0.0.1", u.port or 80
        self.rate, self.faults, self.stall_seconds = rate, faults, stall_seconds
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.enabled = True
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._draw()
                if fault == "error":
                    code, name = proxy._rng_choice(((500, "InternalError"), (503, "SlowDown")))
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{name}</Code>'
                               f"<Message>injected by FaultProxy</Message></Error>").encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                if fault == "reset":
                    self._reset()
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_seconds)
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if fault == "lost":
                    self._reset()
                    return
                if fault == "flip" and self.command == "GET" and data:
                    flipped = bytearray(data)
                    flipped[len(flipped) // 2] ^= 0x01
                    data = bytes(flipped)
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    def _draw(self) -> str | None:
        with self._lock:
            if not self.enabled or self._rng.random() >= self.rate:
                self.counts["forwarded"] += 1
                return None
            fault = self._rng.choice(self.faults)
            self.counts[fault] += 1
            return fault

    def _rng_choice(self, options: tuple) -> tuple:
        with self._lock:
            return self._rng.choice(options)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
