"""The agent-facing surface: the MCP tool server and the `tether` CLI."""
