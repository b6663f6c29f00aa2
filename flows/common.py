"""What every Burrow flow shares: parameters that can never carry credentials.

Flow parameters are kept in the run history (the API stores them, the UI shows them, run
names are built from them). A URL with credentials (``zk://user:password@host``) must never
get there, whether the run comes from the CLI, a deployment or a Python call:

* :meth:`BurrowFlow.serialize_parameters` (what Prefect sends to the API when a run is created
  in-process) drops the user-info of every URL, so the stored parameters never hold it;
* :meth:`BurrowFlow.validate_parameters` (which Prefect runs before the flow body, for
  deployment runs too) refuses such a URL with a usage error that names the safe
  alternatives and quotes nothing of the URL.

The CLI strips credentials itself before it starts a flow (``blocks.resolve.secure_source_ref``),
so only a Python call or a deployment parameter ever meets the refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from prefect import Flow
from pydantic import Field

from burrow.naming import has_userinfo, redact_url, refuse_credentials

#: JSON-schema pattern of a reference parameter: no URL with user-info. The API server checks it
#: when a deployment run is created with ``enforce_parameter_schema``, so such a run is refused
#: before its parameters are stored. (Only in the schema: Python-side, validate_parameters below
#: checks the same thing with a message that quotes nothing.)
NO_CREDENTIALS_PATTERN = (
    r"^(?![A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*@)"
    r"(?![A-Za-z][A-Za-z0-9+.\-]*://[^?#]*@[A-Za-z0-9.\-\[\]:]+:[0-9]+([,/?#]|$))"
)

#: A source, store or archive: a URL without credentials, a path, or a saved block's name.
Ref = Annotated[
    str,
    Field(
        json_schema_extra={"pattern": NO_CREDENTIALS_PATTERN},
        description="A URL without credentials, a path, or the name of a saved block",
    ),
]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set)):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redacted(v) for v in value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    return value


class BurrowFlow(Flow):
    """A Prefect flow whose parameters never carry a URL's credentials into the run history."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return super().serialize_parameters({k: _redacted(v) for k, v in parameters.items()})

    def validate_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        for key, value in parameters.items():
            if any(has_userinfo(s) for s in _strings(value)):
                raise refuse_credentials(f"the {key!r} parameter")
        return super().validate_parameters(parameters)


def burrow_flow(**options: Any) -> Callable[[Callable[..., Any]], BurrowFlow]:
    """``@flow(...)`` for Burrow's flows: the same options, a :class:`BurrowFlow`."""

    def decorate(fn: Callable[..., Any]) -> BurrowFlow:
        return BurrowFlow(fn=fn, **options)

    return decorate
