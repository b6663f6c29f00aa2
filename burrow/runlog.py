"""The logger for whatever is running: Prefect's run logger inside a flow or task,
a plain ``logging`` logger outside (unit tests, the CLI before a flow starts)."""

from __future__ import annotations

import logging
import sys
from typing import Any


def logger(name: str = "burrow") -> Any:
    """Return the run logger when inside a Prefect run, else a standard logger."""
    if "prefect.context" not in sys.modules:  # no run without Prefect: don't import it for nothing
        return logging.getLogger(name)
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError and friends: not in a run
        return logging.getLogger(name)


class WireLogFilter(logging.Filter):
    """Drops a client library's DEBUG (and lower) records.

    kazoo logs every request verbatim at DEBUG ("Sending request(xid=..): Auth(... 'user:password')",
    Create/SetData with the node's data), which would put digest passwords and stored values
    into logs the moment someone turns on DEBUG. Its INFO and WARNING records stay.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO


#: Loggers of client libraries that print credentials or values at DEBUG.
WIRE_LOGGERS = ("burrow.kazoo", "kazoo", "kazoo.client", "kazoo.protocol.connection")
_wire_filter = WireLogFilter()


def install_wire_log_filters() -> None:
    """Attach :class:`WireLogFilter` to every logger in WIRE_LOGGERS (idempotent)."""
    for name in WIRE_LOGGERS:
        lg = logging.getLogger(name)
        if _wire_filter not in lg.filters:
            lg.addFilter(_wire_filter)
