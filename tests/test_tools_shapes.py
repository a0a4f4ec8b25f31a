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


def test_an_edits_answer_carries_a_path_that_is_not_utf8() -> None:
    """A file under a directory whose name is not UTF-8 (its path as os.fsdecode spells it, with a
    lone surrogate): the edit was made, and its answer must say so, not fail to encode the diff."""
    from sandbox.files import EditResult
    from tools.server import edited

    path = "/w/d\udce9/f.txt"
    answer = edited(EditResult(path, 1, f"--- a{path}\n+++ b{path}\n@@ -1 +1 @@\n-hello\n+bye\n"))
    assert not answer.is_error and answer.structured_content is not None
    assert answer.structured_content["diff"].endswith("-hello\n+bye\n")
