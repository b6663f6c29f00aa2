"""The tool version recorded in every manifest."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("burrow")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"
