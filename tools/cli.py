"""The `tether` command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("tether: commands arrive with the MCP server and CLI", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
