"""Turn what a user typed (a URL, a path or a saved block's name) into blocks.

Flow parameters only ever hold references without credentials. When a user passes a URL
that carries credentials on the command line, the CLI strips them, keeps the configured
block in this process (``register``) and hands the flow the redacted URL.

Blocks are kept per role (``source``: what a backup reads, and the default; ``target``: what a
restore or failover writes; ``primary``: the failed cluster a failover probes), never by the
bare URL alone: ``--into zk://restorer:pw@h/c`` and ``--primary zk://prober:pw@h/c`` name the
same hosts and chroot, and keyed by URL the prober's credentials replaced the restorer's (an
in-place failover then created nodes as the prober). A flow resolves each parameter in its
role; a role with nothing registered falls back to the default role only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import SecretStr

from blocks.local import LocalStore
from blocks.source import SourceBlock
from blocks.store import ArchiveStore
from burrow.errors import UsageError
from burrow.naming import has_userinfo, redact_url, split_userinfo

if TYPE_CHECKING:  # each source's client library loads only when that source is used
    from blocks.consul import ConsulCluster
    from blocks.etcd import EtcdCluster
    from blocks.zookeeper import ZooKeeperCluster

#: (role, credential-free reference) -> the block the CLI configured for it in this process.
_registered: dict[tuple[str, str], SourceBlock] = {}
#: The roles a source block is registered and resolved in.
ROLES = ("source", "target", "primary")
DEFAULT_ROLE = "source"
_HOSTPORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d+$")


def _zookeeper_from_url(url: str) -> ZooKeeperCluster:
    """``zk://[user:password@]h:p[,h:p][/chroot][?timeout=SECONDS]``; ``timeout`` is the
    connect timeout (default: the block's, 10 s)."""
    from blocks.zookeeper import ZooKeeperCluster

    userinfo, bare = split_userinfo(url)
    rest, _, query_s = bare[len("zk://") :].partition("?")
    options: dict = {}
    if query_s:
        try:
            query = parse_qs(query_s, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise UsageError("bad query string in a zk:// URL") from None
        unknown = set(query) - {"timeout"}
        if unknown:
            raise UsageError(f"unknown zk URL option(s): {', '.join(sorted(unknown))} (known: timeout)")
        try:
            options["connect_timeout"] = float(query["timeout"][-1])
        except ValueError:
            raise UsageError("?timeout= takes a number of seconds") from None
        if not 0 < options["connect_timeout"] <= 3600:
            raise UsageError("?timeout= takes a number of seconds between 0 and 3600")
    hosts_part, _, chroot = rest.partition("/")
    hosts = [h for h in hosts_part.split(",") if h]
    if not hosts:
        raise UsageError("a zk:// URL needs at least one host:port")
    for h in hosts:
        if not _HOSTPORT.match(h):
            # never quote a host list that may hold a piece of a password
            shown = "" if userinfo is not None or "@" in url else f" {h!r}"
            raise UsageError(f"bad ZooKeeper host{shown} (expected host:port[,host:port...])")
    kwargs: dict = {"hosts": hosts, "chroot": "/" + unquote(chroot).strip("/") if chroot.strip("/") else None}
    if userinfo:
        user, _, password = userinfo.partition(":")
        kwargs["digest_user"] = unquote(user)
        kwargs["digest_password"] = SecretStr(unquote(password))
    return ZooKeeperCluster(**kwargs, **options)


def _split_service_url(url: str, what: str) -> tuple[str, list[str], str, dict[str, list[str]]]:
    """(scheme, host:port list, unquoted path without its leading '/', query) of an etcd/consul URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if has_userinfo(url) or "@" in parts.netloc:
        raise UsageError(
            f"{scheme}:// URLs never carry credentials; give them in a saved block or the environment "
            f"(see the README, {what})"
        )
    hosts = [h for h in parts.netloc.split(",") if h]
    if not hosts:
        raise UsageError(f"a {scheme}:// URL needs at least one host:port")
    for h in hosts:
        if not _HOSTPORT.match(h):
            shown = "" if "@" in url else f" {h!r}"
            raise UsageError(f"bad {what} host{shown} (expected host:port)")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise UsageError(f"bad query string in a {scheme}:// URL") from None
    return scheme, hosts, unquote(parts.path), query


def _etcd_from_url(url: str) -> EtcdCluster:
    """``etcd://h:p[,h:p][/prefix]`` (``etcds://`` for TLS). Credentials and TLS files come
    from the BURROW_ETCD_* environment variables, never from the URL."""
    from blocks.etcd import EtcdCluster

    scheme, hosts, path, query = _split_service_url(url, "etcd")
    unknown = set(query) - {"prefix"}
    if unknown:
        raise UsageError(f"unknown etcd URL option(s): {', '.join(sorted(unknown))} (known: prefix)")
    prefix = path.rstrip("/") if path.strip("/") else None
    if "prefix" in query:
        if prefix:
            raise UsageError("give an etcd prefix either as the URL path or as ?prefix=, not both")
        prefix = query["prefix"][-1] or None
    return EtcdCluster(endpoints=hosts, prefix=prefix, tls=scheme == "etcds")


def _consul_from_url(url: str) -> ConsulCluster:
    """``consul://h:p[/prefix][?dc=DC]`` (``consuls://`` for HTTPS). The ACL token comes from
    the block or CONSUL_HTTP_TOKEN, never from the URL."""
    from blocks.consul import ConsulCluster

    scheme, hosts, path, query = _split_service_url(url, "Consul")
    if len(hosts) != 1:
        raise UsageError("a consul:// URL names one agent (host:port)")
    unknown = set(query) - {"dc"}
    if unknown:
        raise UsageError(f"unknown consul URL option(s): {', '.join(sorted(unknown))} (known: dc)")
    return ConsulCluster(
        address=hosts[0],
        http_scheme="https" if scheme == "consuls" else "http",
        prefix=path.strip("/") or None,
        datacenter=(query.get("dc") or [None])[-1] or None,
    )


#: URL scheme -> factory building a source block from a URL (credentials included).
SOURCE_SCHEMES = {
    "zk": _zookeeper_from_url,
    "etcd": _etcd_from_url,
    "etcds": _etcd_from_url,
    "consul": _consul_from_url,
    "consuls": _consul_from_url,
}

def source_blocks() -> list[type[SourceBlock]]:
    """Block classes tried when a source is given by a saved block's name."""
    from blocks.consul import ConsulCluster
    from blocks.etcd import EtcdCluster
    from blocks.zookeeper import ZooKeeperCluster

    return [ZooKeeperCluster, EtcdCluster, ConsulCluster]
def store_blocks() -> list[type[ArchiveStore]]:
    """Block classes tried when a store is given by a saved block's name (each is saved under
    its own block type, so the base class's slug would find none of them). The S3 store is
    imported only when needed: boto3 and prefect-aws take a while to load."""
    from blocks.s3 import S3Store

    return [LocalStore, S3Store]


def _s3_from_url(url: str) -> ArchiveStore:
    from blocks.s3 import S3Store

    return S3Store.from_url(url)


def scheme_of(ref: str) -> str | None:
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", ref)
    return m.group(1).lower() if m else None


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown source role {role!r} (known: {', '.join(ROLES)})")
    return role


def register(block: SourceBlock, role: str = DEFAULT_ROLE) -> str:
    """Keep a configured block for this process in ``role``; return its credential-free
    reference. Another role's block for the same reference is left as it is."""
    ref = block.describe()
    _registered[(_check_role(role), ref)] = block
    return ref


def registered(ref: str, role: str = DEFAULT_ROLE) -> SourceBlock | None:
    """The block registered for ``ref`` in ``role``, else in the default role, else None."""
    block = _registered.get((_check_role(role), ref))
    if block is None and role != DEFAULT_ROLE:
        block = _registered.get((DEFAULT_ROLE, ref))
    return block


#: The form each URL scheme takes, for errors about a URL that is almost one.
URL_FORMS = {
    "zk": "zk://host:port[,host:port][/chroot]",
    "etcd": "etcd://host:port[,host:port][/prefix]",
    "etcds": "etcds://host:port[,host:port][/prefix]",
    "consul": "consul://host:port[/prefix][?dc=DC]",
    "consuls": "consuls://host:port[/prefix][?dc=DC]",
    "s3": "s3://bucket[/prefix][?endpoint=...]",
    "file": "file:///absolute/path",
}
_ALMOST_URL = re.compile(r"^(zk|etcds?|consuls?|s3|file)(:(?!//)|//|:/(?!/)|;//|:\\\\)", re.I)


def check_not_almost_url(ref: str) -> None:
    """A usage error naming the expected form for ``zk:/host:2181``, ``etcd//h:p`` and the like,
    instead of looking them up as block names."""
    m = _ALMOST_URL.match(ref)
    if m and scheme_of(ref) is None:
        form = URL_FORMS[m.group(1).lower()]
        shown = "a reference" if "@" in ref else repr(ref)  # never quote what may hold a password
        raise UsageError(f"{shown} looks like a malformed {m.group(1).lower()}:// URL; expected {form}")


def source_from_ref(ref: str, role: str = DEFAULT_ROLE) -> SourceBlock:
    """Resolve a source reference: a block registered in ``role``, a URL, or a saved block's name."""
    block = registered(ref, role)
    if block is not None:
        return block
    check_not_almost_url(ref)
    scheme = scheme_of(ref)
    if scheme is not None:
        factory = SOURCE_SCHEMES.get(scheme)
        if factory is None:
            known = ", ".join(f"{s}://" for s in SOURCE_SCHEMES)
            raise UsageError(f"unknown source URL scheme {scheme}:// (known: {known})")
        return factory(ref)
    return _load_block(ref, source_blocks(), "source")


def _load_block(name: str, classes: list, what: str):  # noqa: ANN202 - returns one of `classes`
    """A saved block by name: the only resolution that imports Prefect (it asks the Prefect API).
    Through ``blocks/localcopy.py``: a load refreshes the local copy, and with the Prefect API
    unreachable the name resolves from that copy (one warning names its age)."""
    from blocks.localcopy import load_block
    from blocks.registry import register_twins

    if "/" in name:
        register_twins()  # Block.load finds the class by the document's block type slug
        try:
            block = load_block(name, classes, what)
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"no saved {what} block named {name!r}: {type(exc).__name__}") from None
        if not isinstance(block, tuple(classes)):
            raise UsageError(f"block {name!r} is not a {what}")
        return block
    try:
        return load_block(name, classes, what)
    except ValueError:
        raise UsageError(
            f"{name!r} is neither a {what} URL nor the name of a saved {what} block"
        ) from None


def secure_source_ref(ref: str, role: str = DEFAULT_ROLE) -> str:
    """For the CLI: resolve ``ref`` now and return a reference safe to use as a flow parameter,
    registering its block in ``role`` (the flow resolves it in the same role)."""
    check_not_almost_url(ref)
    if scheme_of(ref) is None:
        return ref
    _check_role(role)
    return register(source_from_ref(ref, role), role)


def store_from_ref(ref: str) -> ArchiveStore:
    """Resolve a store reference: a directory path, a file:// URL, or a saved block's name."""
    check_not_almost_url(ref)
    scheme = scheme_of(ref)
    if scheme == "file":
        return LocalStore(path=unquote(urlsplit(ref).path))
    if scheme == "s3":
        return _s3_from_url(ref)
    if scheme is not None:
        raise UsageError(f"unknown store URL scheme {scheme}:// (known: file://, s3://, or a directory path)")
    if ref.startswith((".", "/", "~")) or Path(ref).expanduser().exists():
        return LocalStore(path=ref)
    try:
        return _load_block(ref, store_blocks(), "store")
    except UsageError:
        # Not a block either: treat it as a (missing) directory so the error says so.
        return LocalStore(path=ref)


def archive_from_ref(ref: str) -> tuple[ArchiveStore, str]:
    """Split an archive reference (what backup printed) into its store and name."""
    scheme = scheme_of(ref)
    if scheme == "file" or scheme is None:
        path = Path(unquote(urlsplit(ref).path) if scheme == "file" else ref).expanduser()
        if not path.name.endswith(".burrow"):
            raise UsageError(f"{redact_url(ref)!r} does not name a .burrow archive")
        return LocalStore(path=str(path.parent)), path.name
    if scheme == "s3":
        parts = urlsplit(ref)
        key = unquote(parts.path).strip("/")
        prefix, _, name = key.rpartition("/")
        if not name.endswith(".burrow"):
            raise UsageError(f"{redact_url(ref)!r} does not name a .burrow archive")
        store = _s3_from_url(f"s3://{parts.netloc}/{prefix}" + (f"?{parts.query}" if parts.query else ""))
        return store, name
    raise UsageError(f"unknown archive URL scheme {scheme}:// (known: file://, s3://)")
