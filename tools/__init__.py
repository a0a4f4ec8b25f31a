"""The agent-facing surface: the MCP tool server and the `tether` CLI."""

import importlib.metadata


def tether_version() -> str:
    """The installed distribution's version (the MCP server's and `tether --version`'s)."""
    try:
        return importlib.metadata.version("tether")
    except importlib.metadata.PackageNotFoundError:  # (run from a checkout, not installed)
        return "0+unknown"
