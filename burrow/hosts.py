"""Host names of a cluster's address, resolved once before connecting.

A name that does not exist (``no-such-host.invalid``) is a permanent error and fails at once;
a name service that failed for now (EAI_AGAIN) is transient; a server that is down or
refusing is for the client library and its retries to find out. Client libraries hide the
difference (kazoo skips unresolved hosts and retries, gRPC reports UNAVAILABLE), so it is
decided here, with the system resolver, before they start.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from burrow.errors import SourceError, SourceUnavailable
from burrow.runlog import logger

#: getaddrinfo failures a retry may fix; every other one (EAI_NONAME: no such name,
#: EAI_NODATA, EAI_FAIL, ...) means the name will not resolve however often it is asked.
_TRANSIENT_EAI = frozenset(
    getattr(socket, name) for name in ("EAI_AGAIN", "EAI_SYSTEM", "EAI_MEMORY") if hasattr(socket, name)
)


def host_of(hostport: str) -> str:
    """The host part of ``host:port``, ``[v6]:port``, or a bare host."""
    hp = hostport.strip()
    if hp.startswith("["):
        return hp[1 : hp.find("]")] if "]" in hp else hp[1:]
    if hp.count(":") == 1:
        return hp.rsplit(":", 1)[0]
    return hp


def is_transient_resolution_failure(exc: socket.gaierror) -> bool:
    """True when a getaddrinfo failure is transient (a retry may resolve the name)."""
    return exc.errno in _TRANSIENT_EAI


def check_resolvable(hostports: Iterable[str], service: str, label: str) -> list[str]:
    """The ``host:port`` entries whose host name resolves, in order.

    Raises SourceError (permanent) when no entry resolves because the names do not exist,
    SourceUnavailable when name resolution itself failed for now. Entries that do not
    resolve while others do are left out with a warning (the others may serve).
    """
    entries = list(hostports)
    ok: list[str] = []
    failed: list[tuple[str, socket.gaierror]] = []
    for hp in entries:
        host = host_of(hp)
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            failed.append((host, exc))
            continue
        except UnicodeError:  # a label longer than 63 characters, say: not a valid name at all
            failed.append((host, socket.gaierror(socket.EAI_NONAME, "not a valid host name")))
            continue
        ok.append(hp)
    if ok:
        for host, exc in failed:
            logger().warning("%s at %s: host name %s does not resolve (%s); using the others",
                             service, label, host, exc.strerror or exc)
        return ok
    names = ", ".join(sorted({h for h, _ in failed}))
    reasons = "; ".join(sorted({str(e.strerror or e) for _, e in failed}))
    if any(is_transient_resolution_failure(e) for _, e in failed):
        raise SourceUnavailable(f"cannot resolve the {service} host name {names} of {label} for now ({reasons})")
    raise SourceError(f"the {service} host name {names} of {label} does not exist ({reasons}); check the address")


def port_of(hostport: str, default: int) -> int:
    """The port of ``host:port`` or ``[v6]:port`` (``default`` when none is given)."""
    hp = hostport.strip()
    tail = hp.rsplit("]", 1)[1] if hp.startswith("[") and "]" in hp else (hp if hp.count(":") == 1 else "")
    try:
        return int(tail.rsplit(":", 1)[1]) if ":" in tail else default
    except ValueError:
        return default


def unreachable_reason(hostports: Iterable[str], default_port: int, timeout: float = 1.0) -> str:
    """Why a client could not connect, found by one plain TCP connect to each entry: "connection
    refused by h:p", "no answer from h:p within 1s", or that h:p accepted TCP (then the
    trouble was above TCP: not that service, or a server not serving yet)."""
    reasons = []
    for hp in hostports:
        host, port = host_of(hp), port_of(hp, default_port)
        where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        try:
            with socket.create_connection((host, port), timeout=timeout):
                reasons.append(f"{where} accepts TCP connections but opened no session")
        except ConnectionRefusedError:
            reasons.append(f"connection refused by {where}")
        except TimeoutError:
            reasons.append(f"no answer from {where} within {timeout:g}s")
        except OSError as exc:
            reasons.append(f"{where}: {exc.strerror or type(exc).__name__}")
    return "; ".join(reasons) or "no host to connect to"
