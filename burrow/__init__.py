"""Burrow: backup, verify and safe restore of coordination-store trees."""

from burrow.runlog import install_wire_log_filters as _install_wire_log_filters

_install_wire_log_filters()  # never let a client library log credentials or values at DEBUG
