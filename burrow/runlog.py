"""The logger for whatever is running: Prefect's run logger inside a flow or task,
a plain ``logging`` logger outside (unit tests, the CLI before a flow starts)."""

from __future__ import annotations

import logging
from typing import Any


def logger(name: str = "burrow") -> Any:
    """Return the run logger when inside a Prefect run, else a standard logger."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError and friends: not in a run
        return logging.getLogger(name)
