"""One object, one JSON shape: what `--json` prints for a sandbox's capabilities, a pool or a cost
is what the MCP tools return for it, values unrounded."""

from __future__ import annotations

import json
from typing import Any

from tests.mcp_support import stdio_client, structured, tether


def cli_json(*args: str) -> Any:
    result = tether(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_cli_json_and_mcp_results_agree() -> None:
    box = cli_json("up", "local", "--name", "shapes")["id"]
    try:
        async with stdio_client() as client:
            info = structured(await client.call_tool("sandbox_info", {"sandbox": box}))
            pools = structured(await client.call_tool("pools_list", {}))["pools"]
        assert cli_json("info", box)["capabilities"] == info["capabilities"]
        assert "runtimeKinds" in info["capabilities"]
        assert cli_json("pools") == pools
    finally:
        down = cli_json("down", box)  # (also when the above failed: no sandbox left for later tests)
    [row] = [c for c in cli_json("costs") if c["id"] == box]
    assert {k: row[k] for k in down["cost"]} == down["cost"]  # the same fields, the same (unrounded) values
    assert set(row) == {"id", "name", "provider", "pool", "terminated", *down["cost"]}
    listed = [s for s in cli_json("ls", "--all") if s["id"] == box]
    assert listed[0]["cost"] == down["cost"]
