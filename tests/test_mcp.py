"""`tether mcp` through the official MCP client, as a real stdio subprocess and over streamable HTTP:
every tool of the contract, against the real sshd host and the local provider, error paths included."""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import json
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from providers import Fleet
from providers.ledger import Ledger
from providers.local import LocalProvider
from sandbox.pool import REDIAL_BACKOFF
from tests.mcp_support import (
    ROOT,
    http_client,
    http_server,
    mcp_client,
    server_env,
    stdio_client,
    structured,
    tether,
    tether_process,
    text,
)
from tests.processes import leaf_sleep, processes_matching, wait_until_gone, wait_until_running
from tests.sshd import SSHD
from tests.test_files import PNG_1X1
from tools.http import HTTPSecurityError, resolve_token
from tools.stdio import _LineReader

CONTRACT_TOOLS = {
    "sandbox_create",
    "sandbox_list",
    "sandbox_info",
    "sandbox_destroy",
    "sandbox_pause",
    "sandbox_resume",
    "sandbox_snapshot",
    "host_attach",
    "pools_list",
    "read",
    "write",
    "edit",
    "multi_edit",
    "glob",
    "grep",
    "run",
    "job_output",
    "job_list",
    "job_kill",
}
READ_ONLY = {"read", "grep", "glob", "sandbox_list", "sandbox_info", "pools_list", "job_list", "job_output"}
DESTRUCTIVE = {"sandbox_destroy", "write", "edit", "multi_edit", "run"}
# The first request of a raw JSON-RPC session, for tests that speak the stdio protocol by hand.
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


@pytest.fixture
def ssh_pool_env(sshd: SSHD, client_key: Path, tmp_path: Path) -> dict[str, str]:
    """A server whose config has a pool on the real sshd."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'[[pools]]\nname = "box"\nprovider = "ssh"\nconfig = {{ host = "{sshd.address}", '
        f'identityFile = "{client_key}" }}\n\n[[pools]]\nname = "local"\nprovider = "local"\n'
    )
    return server_env(TETHER_CONFIG=str(config))


async def test_tools_schemas_and_annotations() -> None:
    async with stdio_client() as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert client.server_info.name == "tether" and client.server_info.version == importlib.metadata.version(
            "tether"
        )
    assert CONTRACT_TOOLS <= set(tools)
    for name in READ_ONLY:
        assert tools[name].annotations.read_only_hint is True, name
    for name in DESTRUCTIVE:
        assert tools[name].annotations.destructive_hint is True, name
    assert tools["job_output"].annotations.idempotent_hint is False  # each call moves a read position
    for name, tool in tools.items():
        assert tool.description, name
        for param, schema in tool.input_schema.get("properties", {}).items():
            assert schema.get("description"), f"{name}.{param} has no description"
        if name != "read":
            assert tool.output_schema, f"{name} has no output schema"
    assert set(tools["run"].output_schema["properties"]) >= {
        "exit_code",
        "stdout",
        "stderr",
        "timed_out",
        "truncated",
        "duration_ms",
        "cwd",
        "job_id",
    }


@pytest.mark.parametrize("transport", ["stdio", "http"])
@pytest.mark.parametrize("where", ["local", "sshd"])
async def test_file_and_shell_tools(where: str, transport: str, ssh_pool_env: dict[str, str]) -> None:
    args = ["--provider", "ssh"] if where == "sshd" else []
    async with mcp_client(transport, *args, env=ssh_pool_env) as client:
        work = f"w-{secrets.token_hex(3)}"
        ran = structured(await client.call_tool("run", {"command": f"mkdir -p {work} && cd {work} && pwd"}))
        assert ran["exit_code"] == 0 and ran["cwd"].endswith(work)
        info = structured(await client.call_tool("sandbox_info", {}))
        assert info["provider"] == ("ssh" if where == "sshd" else "local") and info["cwd"] == ran["cwd"]

        written = structured(await client.call_tool("write", {"path": "app.py", "content": "x = 1\nx = 1\ny = 2\n"}))
        assert written == {"path": f"{ran['cwd']}/app.py", "bytes": 18, "created": True}
        window = text(await client.call_tool("read", {"path": "app.py", "limit": 2}))
        assert window.startswith("     1\tx = 1\n     2\tx = 1") and "read on with offset=3" in window
        ambiguous = await client.call_tool("edit", {"path": "app.py", "old_string": "x = 1", "new_string": "x = 3"})
        assert ambiguous.is_error and "matches 2 times (lines 1, 2)" in text(ambiguous)
        edited = structured(
            await client.call_tool(
                "edit", {"path": "app.py", "old_string": "x = 1", "new_string": "x = 3", "replace_all": True}
            )
        )
        assert edited["replacements"] == 2 and "+x = 3" in edited["diff"]
        # an edit inside a long line (minified code) shows both sides of the change, each line cut around it
        await client.call_tool("write", {"path": "min.js", "content": "x" * 100_000 + "NEEDLE" + "y" * 100_000})
        changed = structured(
            await client.call_tool("edit", {"path": "min.js", "old_string": "NEEDLE", "new_string": "REPLACED"})
        )
        minus, plus = [line for line in changed["diff"].splitlines() if line[:1] in "-+" and line[1:3] not in "--++"]
        assert "xNEEDLEy" in minus and "xREPLACEDy" in plus and len(changed["diff"]) < 5000, changed["diff"][:300]
        assert minus.startswith("-… [99500 characters] ") and plus.endswith("… [line cut: 200008 characters]")
        multi = structured(
            await client.call_tool(
                "multi_edit",
                {
                    "path": "app.py",
                    "edits": [
                        {"old_string": "y = 2", "new_string": "y = 4"},
                        {"old_string": "y = 4", "new_string": "y = 5"},
                    ],
                },
            )
        )
        assert multi["replacements"] == 2
        failed = await client.call_tool(
            "multi_edit",
            {
                "path": "app.py",
                "edits": [{"old_string": "y = 5", "new_string": "y = 6"}, {"old_string": "nope", "new_string": "z"}],
            },
        )
        assert failed.is_error and "edits[1]:" in text(failed)
        assert "y = 5" in text(await client.call_tool("read", {"path": "app.py"}))

        found = await client.call_tool("glob", {"pattern": "*.py"})
        assert structured(found) == {"files": [f"{ran['cwd']}/app.py"], "truncated": False}
        grep = await client.call_tool("grep", {"pattern": "y =", "output_mode": "content"})
        assert text(grep) == f"{ran['cwd']}/app.py:3:y = 5"
        assert structured(grep)["mode"] == "content" and structured(grep)["lines"] == 1
        first = await client.call_tool("grep", {"pattern": "=", "output_mode": "content", "head_limit": 1})
        assert text(first).endswith(":1:x = 3\n[head_limit reached; more lines follow: raise head_limit to see them]")
        unlimited = await client.call_tool("grep", {"pattern": "=", "output_mode": "content", "head_limit": 0})
        assert structured(unlimited)["lines"] > 1  # (0: no limit, as agents send it)
        from_zero = await client.call_tool("read", {"path": "app.py", "offset": 0, "limit": 1})
        assert text(from_zero).startswith("     1\tx = 3")  # (0: from the start)
        into_directory = await client.call_tool("write", {"path": ran["cwd"], "content": "x"})
        assert into_directory.is_error and "take a file's path: name a file inside it" in text(into_directory)

        png = base64.b64encode(PNG_1X1).decode()
        await client.call_tool("run", {"command": f"printf %s {png} | base64 -d > dot.png"})
        image = await client.call_tool("read", {"path": "dot.png"})
        assert image.content[0].type == "image" and base64.b64decode(image.content[0].data) == PNG_1X1

        missing = await client.call_tool("read", {"path": "missing.txt"})
        assert missing.is_error and "no such file" in text(missing)
        long = await client.call_tool("run", {"command": "seq 1 100000"})
        kept = structured(long)["stdout_path"]
        assert kept and text(long).count(kept) == 1 and text(long).endswith("read it in windows]\n[exit code 0]")
        timed = structured(await client.call_tool("run", {"command": "echo started; sleep 30", "timeout_ms": 500}))
        assert timed["timed_out"] and timed["exit_code"] is None and timed["stdout"] == "started\n"
        bad = await client.call_tool("run", {"command": "true", "timeout_ms": "soon"})
        assert bad.is_error and text(bad).startswith("invalid arguments for run: timeout_ms: ")
        assert "pydantic" not in text(bad) and "call again" in text(bad)
        for arguments, said in [  # (what pydantic alone would take: true as 1 ms, "yes" as true)
            ({"command": "true", "timeout_ms": True}, "timeout_ms: a number, not true"),
            ({"command": "true", "run_in_background": "yes"}, 'run_in_background: true or false, not "yes"'),
        ]:
            refused = await client.call_tool("run", arguments)
            assert refused.is_error and said in text(refused), text(refused)
        # what clients send for "not given" (null) and for a boolean (at times the string "true")
        spelled = await client.call_tool(
            "run", {"command": "echo spelled", "run_in_background": " False ", "timeout_ms": None, "cwd": None}
        )
        assert structured(spelled)["stdout"] == "spelled\n"
        await client.call_tool("write", {"path": "flags.txt", "content": "a a\n"})
        flagged = await client.call_tool(
            "edit", {"path": "flags.txt", "old_string": "a", "new_string": "b", "replace_all": "TRUE"}
        )
        assert structured(flagged)["replacements"] == 2
        unknown_tool = await client.call_tool("read_file", {"path": "x"})
        assert unknown_tool.is_error and "unknown tool 'read_file' (did you mean 'read'?)" in text(unknown_tool)
        missing = await client.call_tool("edit", {"path": "x"})
        assert missing.is_error and "old_string: Field required" in text(missing)
        # another tool set's names are refused, with tether's name for them, not quietly dropped
        for tool, arguments, hint in [
            ("grep", {"pattern": "y", "-i": True}, "unknown parameter '-i' (did you mean 'case_insensitive'?)"),
            ("run", {"command": "sleep 5", "timeout": 500}, "unknown parameter 'timeout' (did you mean 'timeout_ms'?)"),
            ("read", {"file_path": "app.py"}, "unknown parameter 'file_path' (did you mean 'path'?)"),
            ("job_output", {"job_id": "j-1", "timeout": 500}, "unknown parameter 'timeout' (did you mean 'wait_ms'?)"),
            ("edit", {"path": "app.py", "old_string": "y", "new_string": "z", "replaceal": True}, "'replace_all'?"),
        ]:
            refused = await client.call_tool(tool, arguments)
            assert refused.is_error and hint in text(refused) and "Its parameters: " in text(refused), text(refused)
        # ... inside multi_edit's edits too: a camel-cased replaceAll is not dropped (to replace only one)
        await client.call_tool("write", {"path": "twice.txt", "content": "a a\n"})
        camel = {"path": "twice.txt", "edits": [{"old_string": "a", "new_string": "b", "replaceAll": True}]}
        refused = await client.call_tool("multi_edit", camel)
        assert refused.is_error and "edits.0.replaceAll: Extra inputs are not permitted" in text(refused), text(refused)
        assert "1\ta a" in text(await client.call_tool("read", {"path": "twice.txt"}))
        # ... and its replace_all is read as the top-level flags are: "yes" refused, "true" taken
        for flag in ("yes", 1):
            camel["edits"][0] = {"old_string": "a", "new_string": "b", "replace_all": flag}
            refused = await client.call_tool("multi_edit", camel)
            assert refused.is_error and "edits.0.replace_all: Input should be a valid boolean" in text(refused)
        camel["edits"][0]["replace_all"] = " True"
        assert structured(await client.call_tool("multi_edit", camel))["replacements"] == 2
        listed_tools = await client.list_tools()
        assert all(t.input_schema.get("additionalProperties") is False for t in listed_tools.tools)
        edits_schema = next(t for t in listed_tools.tools if t.name == "multi_edit").input_schema
        assert edits_schema["$defs"]["EditSpec"]["additionalProperties"] is False
        unknown = await client.call_tool("run", {"command": "true", "sandbox": "sb-doesnotexist"})
        assert unknown.is_error and "no sandbox 'sb-doesnotexist'" in text(unknown)
        before = len(structured(await client.call_tool("sandbox_list", {}))["sandboxes"])
        for ttl in (1e308, "Infinity", -1):  # refused before anything is created
            forever = await client.call_tool("sandbox_create", {"provider": "local", "timeout_s": ttl})
            assert forever.is_error and "timeout_s" in text(forever), text(forever)
        # an env every later command would refuse: refused now (and its values, maybe secrets, not echoed)
        for env in ({"BAD NAME": "s3cret"}, {"X": "s3cret\u0000"}):
            bad_env = await client.call_tool("sandbox_create", {"provider": "local", "env": env})
            assert bad_env.is_error and "env" in text(bad_env) and "s3cret" not in text(bad_env), text(bad_env)
        unusable = await client.call_tool("sandbox_create", {"provider": "local", "name": "my box"})
        assert unusable.is_error and "start with a letter or digit, then letters" in text(unusable), text(unusable)
        assert len(structured(await client.call_tool("sandbox_list", {}))["sandboxes"]) == before

        job = structured(await client.call_tool("run", {"command": "echo one; sleep 1000", "run_in_background": True}))
        output = structured(await client.call_tool("job_output", {"job_id": job["job_id"], "wait_ms": 5000}))
        assert output["stdout"] == "one\n" and output["status"] == "running"
        listed = structured(await client.call_tool("job_list", {}))
        assert job["job_id"] in [j["job_id"] for j in listed["jobs"]]
        killed = await client.call_tool("job_kill", {"job_id": job["job_id"], "signal": "SIGKILL"})
        assert structured(killed)["status"] == "exited" and structured(killed)["signal"] == "KILL"
        assert text(killed).startswith(f"sent KILL to {job['job_id']}: exited"), text(killed)
        again = await client.call_tool("job_kill", {"job_id": job["job_id"]})  # (ended by the first)
        assert text(again) == f"{job['job_id']} had already exited (137); nothing was signalled", text(again)
        assert structured(again)["signal"] is None
        done = structured(await client.call_tool("run", {"command": "true", "run_in_background": True}))
        assert structured(await client.call_tool("job_output", {"job_id": done["job_id"], "wait_ms": 5000}))
        late = await client.call_tool("job_kill", {"job_id": done["job_id"]})
        assert text(late) == f"{done['job_id']} had already exited (0); nothing was signalled", text(late)
        bad_signal = await client.call_tool("job_kill", {"job_id": job["job_id"], "signal": "SIGWHAT"})
        assert bad_signal.is_error and "use one of" in text(bad_signal)
        await client.call_tool("run", {"command": f"cd .. && rm -rf {work}"})


def test_results_are_made_encodable_whatever_lone_surrogates_they_hold() -> None:
    from tools.server import json_safe

    value = {"files": ["caf\udce9.txt", "x\ud800y", "plain", "ünï"], "n": 3, "k\udcff": None}
    assert json_safe(value) == {"files": ["caf\ufffd.txt", "x\ufffdy", "plain", "ünï"], "n": 3, "k\ufffd": None}


async def test_a_file_name_that_is_not_utf8_is_shown_not_fatal() -> None:
    """One file named with a Latin-1 byte under the searched tree: glob, grep and run list it with
    U+FFFD (JSON cannot carry the byte), and the server goes on serving."""
    async with stdio_client() as client:
        work = f"w-{secrets.token_hex(3)}"
        made = "mkdir -p {0} && printf 'needle\\n' > \"{0}/caf$(printf '\\351').txt\" && echo ok > {0}/plain.txt"
        assert structured(await client.call_tool("run", {"command": made.format(work)}))["exit_code"] == 0
        globbed = await client.call_tool("glob", {"pattern": f"{work}/*.txt"})
        assert not globbed.is_error and any(f.endswith("/caf\ufffd.txt") for f in structured(globbed)["files"])
        grep = await client.call_tool("grep", {"pattern": "needle", "path": work})
        assert not grep.is_error and text(grep).endswith("/caf\ufffd.txt")
        listed = structured(await client.call_tool("run", {"command": f"ls {work}"}))
        assert listed["stdout"] == "caf\ufffd.txt\nplain.txt\n"
        missing = await client.call_tool("read", {"path": f"{work}/caf\ufffd.txt"})
        assert missing.is_error and "no such file" in text(missing)
        assert "ok" in text(await client.call_tool("read", {"path": f"{work}/plain.txt"}))
        # an edit in a directory so named (the cwd, given by a relative path): the file changes,
        # and the answer says so (its diff names the path with U+FFFD), not an encoding error
        inside = f"{work}/d$(printf '\\351')"  # (the byte E9 alone: not UTF-8)
        moved = await client.call_tool("run", {"command": f'mkdir "{inside}" && cd "{inside}" && echo hello > f.txt'})
        assert structured(moved)["exit_code"] == 0
        edited = await client.call_tool("edit", {"path": "f.txt", "old_string": "hello", "new_string": "bye"})
        assert not edited.is_error and "+bye" in structured(edited)["diff"], text(edited)
        await client.call_tool("run", {"command": "cd ~"})
        await client.call_tool("run", {"command": f"rm -rf {work}"})


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_lifecycle_tools_and_stopping_tears_down(
    transport: str, sshd: SSHD, client_key: Path, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[[providers]]\nname = "pausing"\nclass = "tests.test_lifecycle:PausingProvider"\n\n'
        '[[pools]]\nname = "local"\nprovider = "local"\n\n'
        '[[pools]]\nname = "pauses"\nprovider = "pausing"\n\n'
        f'[[pools]]\nname = "box"\nprovider = "ssh"\n'
        f'config = {{ host = "{sshd.address}", identityFile = "{client_key}" }}\n'
    )
    async with mcp_client(transport, env=server_env(TETHER_CONFIG=str(config))) as client:
        created = structured(await client.call_tool("sandbox_create", {"provider": "local", "name": "lc-one"}))
        assert created["status"] == "running" and created["provider"] == "local" and created["ssh"]["port"]
        assert created["capabilities"]["billingModel"] == "fixed"
        kept_call = await client.call_tool("sandbox_create", {"provider": "local", "keep": True, "cpu": 8})
        kept = structured(kept_call)
        assert "note: local uses the machine as it is; cpu not applied" in text(kept_call), text(kept_call)
        attached = structured(
            await client.call_tool("host_attach", {"host": sshd.address, "key_path": str(client_key), "name": "lc-box"})
        )
        assert attached["provider"] == "ssh" and attached["ssh"]["port"] == sshd.port
        listed = structured(await client.call_tool("sandbox_list", {}))
        assert {"lc-one", "lc-box"} <= {s["name"] for s in listed["sandboxes"]}
        live_cost = next(s["cost"] for s in listed["sandboxes"] if s["name"] == "lc-one")
        assert live_cost["billing_model"] == "fixed" and live_cost["seconds"] >= 0  # the cost so far
        ambiguous = await client.call_tool("run", {"command": "true"})
        assert ambiguous.is_error and "several sandboxes exist" in text(ambiguous)

        pools = structured(await client.call_tool("pools_list", {}))
        assert pools["pools"][0]["capabilities"]["transportModel"] == "either"
        for tool in ("sandbox_pause", "sandbox_snapshot"):
            for where in ("lc-one", "lc-box"):  # neither this machine nor an attached host can
                refused = await client.call_tool(tool, {"sandbox": where})
                assert refused.is_error and "cannot" in text(refused) and "false" in text(refused)
        # a provider that can pause (E2B's profile, on this machine), and a pool of the real sshd
        pausing = structured(await client.call_tool("sandbox_create", {"pool": "pauses", "name": "lc-pause"}))
        paused = structured(await client.call_tool("sandbox_pause", {"sandbox": "lc-pause"}))
        assert paused == {"id": pausing["id"], "status": "paused"}
        assert structured(await client.call_tool("sandbox_info", {"sandbox": "lc-pause"}))["status"] == "paused"
        resumed = structured(await client.call_tool("sandbox_resume", {"sandbox": "lc-pause"}))
        assert resumed == {"id": pausing["id"], "status": "running"}
        pooled = structured(await client.call_tool("sandbox_create", {"pool": "box", "name": "lc-pool"}))
        assert (pooled["provider"], pooled["ssh"]["port"]) == ("ssh", sshd.port)
        ran = structured(await client.call_tool("run", {"command": "whoami", "sandbox": "lc-pool"}))
        assert ran["stdout"] == f"{sshd.account.name}\n"
        detached = structured(await client.call_tool("sandbox_destroy", {"sandbox": "lc-box"}))
        assert detached["status"] == "terminated" and detached["cost"]["billing_model"] == "fixed"
        again = await client.call_tool("sandbox_info", {"sandbox": "lc-box"})
        assert again.is_error and "terminated" in text(again)
        twice = await client.call_tool("sandbox_destroy", {"sandbox": "lc-box"})  # (its cost, and that it had ended)
        assert structured(twice) == detached and "had already ended" in text(twice), text(twice)
    # the client closed the server's stdin: it stopped and tore down what it created, except `keep`
    ledger = Ledger()
    for made in (created, pausing, pooled):
        assert ledger.get(made["id"]).status == "terminated"
        assert ledger.get(made["id"]).status_reason == "tether stopped"
    assert ledger.get(kept["id"]).status == "running"
    assert ledger.get(attached["id"]).status == "terminated"
    # (kept means outliving the server, not the test session: later servers would adopt it)
    fleet = Fleet(config={})
    await fleet.destroy(kept["id"])
    await fleet.close()


async def test_progress_is_reported_while_provisioning() -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with stdio_client() as client:
        structured(await client.call_tool("sandbox_create", {"provider": "local"}, progress_callback=on_progress))
    assert seen and seen[-1][0] == 100 and any("provisioning" in (m or "") for _, _, m in seen)
    values = [progress for progress, _, _ in seen]
    assert values == sorted(set(values)), f"progress must increase with each notification: {values}"


async def test_progress_is_reported_during_a_long_run() -> None:
    seen: list[str | None] = []

    values: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message)
        values.append(progress)

    async with stdio_client() as client:
        ran = structured(
            await client.call_tool(
                "run", {"command": "sleep 6; echo done", "description": "a slow build"}, progress_callback=on_progress
            )
        )
    assert ran["stdout"] == "done\n"
    assert any(m and m.startswith("a slow build: running for") for m in seen)
    assert values == sorted(set(values))


async def test_a_cancelled_run_leaves_no_process_behind() -> None:
    marker = leaf_sleep()  # on the leaves, which a kill of the parent alone would leave behind
    async with stdio_client() as client:
        structured(await client.call_tool("run", {"command": "true"}))
        async with anyio.create_task_group() as calls:
            calls.start_soon(client.call_tool, "run", {"command": f"sh -c '{marker} & {marker}; true'"})
            assert len(await wait_until_running(marker)) >= 1
            calls.cancel_scope.cancel()
        assert await wait_until_gone(marker, 10) == []
        assert structured(await client.call_tool("run", {"command": "echo still here"}))["stdout"] == "still here\n"
    assert processes_matching(marker) == []


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
async def test_streamable_http_with_a_token(stop: signal.Signals) -> None:
    token = secrets.token_urlsafe(24)
    with http_server(env=server_env(TETHER_MCP_TOKEN=token)) as (process, url, _):
        async with http_client(url, token) as client:
            ran = structured(await client.call_tool("run", {"command": "echo over http"}))
            assert ran["stdout"] == "over http\n"
            created = structured(await client.call_tool("sandbox_create", {"provider": "local", "name": "via-http"}))
        async with httpx.AsyncClient() as raw:
            wrong = await raw.post(url, headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}, json={})
            assert wrong.status_code == 401
            missing = await raw.post(url, json={})
            assert missing.status_code == 401
            for wrong_scheme in (f"Basic {token}", token, f"Bearer{token}"):
                assert (await raw.post(url, headers={"Authorization": wrong_scheme}, json={})).status_code == 401
            # the scheme's case does not matter (RFC 9110): past the token check, to the MCP layer
            lowercase = await raw.post(url, headers={"Authorization": f"bearer {token}"}, json={})
            assert lowercase.status_code not in (401, 403)
            rebinding = await raw.post(
                url, headers={"Authorization": f"Bearer {token}", "Host": "evil.example"}, json={}
            )
            assert rebinding.status_code in (400, 403, 421)
            for origin in ("http://evil.example", "null"):  # a page elsewhere, or a sandboxed frame
                cross = await raw.post(url, headers={"Authorization": f"Bearer {token}", "Origin": origin}, json={})
                assert cross.status_code == 403, origin
            huge = await raw.post(
                url,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/json",
                    "Accept": "application/json, text/event-stream",
                },
                content=b"x" * (17 * 1024 * 1024),
            )
            assert huge.status_code == 413
        process.send_signal(stop)
        assert process.wait(30) == 0
    assert Ledger().get(created["id"]).status == "terminated"  # SIGTERM and SIGINT tear down too


async def test_sighup_stops_the_http_server_and_tears_down() -> None:
    """A closed terminal or a dropped SSH session ends the server as SIGTERM does: its sandboxes
    are terminated, not left running until a gc."""
    with http_server() as (process, url, _):
        async with http_client(url) as client:
            created = structured(await client.call_tool("sandbox_create", {"provider": "local"}))
        process.send_signal(signal.SIGHUP)
        assert await asyncio.to_thread(process.wait, 30) == 0
    assert Ledger().get(created["id"]).status == "terminated"


CREATE = {"name": "sandbox_create"}


def stdio_server_with_a_sandbox(
    arguments: dict[str, Any], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """`tether mcp` over raw stdio, initialized, with a sandbox created by sandbox_create."""
    process = tether_process("mcp", env=env, stdin=subprocess.PIPE)
    assert process.stdin and process.stdout
    messages = [
        INITIALIZE,
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "sandbox_create", "arguments": arguments},
        },
    ]
    for message in messages:
        process.stdin.write(json.dumps(message) + "\n")
    process.stdin.flush()
    while True:
        reply = json.loads(process.stdout.readline())
        if reply.get("id") == 2:
            return process, reply["result"]["structuredContent"]


# (SIGHUP: the terminal closed, or the SSH session the server was started from dropped)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_stops_the_stdio_server_and_tears_down(stop: signal.Signals) -> None:
    process, created = stdio_server_with_a_sandbox({"provider": "local"})
    try:
        assert Ledger().get(created["id"]).status == "running"
        process.send_signal(stop)  # stdin stays open: the signal alone stops it
        assert process.wait(30) == 0
        assert Ledger().get(created["id"]).status == "terminated"
    finally:
        if process.poll() is None:
            process.kill()


def test_a_signal_as_a_request_comes_in_stops_the_stdio_server_cleanly() -> None:
    """Stopped just as a call arrives, the SDK's relay of it finds its stream closed: that is the
    stop, not a crash (no traceback, exit 0), and what the call made is torn down."""
    started = time.time()
    for _ in range(4):  # (the window is narrow: it was hit three times in four)
        process = tether_process("mcp", stdin=subprocess.PIPE)
        assert process.stdin and process.stdout and process.stderr
        process.stdin.write(json.dumps(INITIALIZE) + "\n")
        process.stdin.flush()
        process.stdout.readline()
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "sandbox_create"}}
        for message in ({"jsonrpc": "2.0", "method": "notifications/initialized"}, call):
            process.stdin.write(json.dumps(message) + "\n")
        process.stdin.flush()
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(30) == 0
            said = process.stderr.read()
            assert "Traceback" not in said, said
        finally:
            if process.poll() is None:
                process.kill()
    assert [r for r in Ledger().list() if r.created_at >= started and r.status != "terminated"] == []


class SlowTeardownProvider(LocalProvider):
    """A local machine whose termination takes two seconds, like a cloud API's."""

    name = "slow-teardown"

    async def terminate(self, handle):  # type: ignore[no-untyped-def]
        await asyncio.sleep(2)
        await super().terminate(handle)


def test_signals_during_the_teardown_do_not_cut_it_short(tmp_path: Path) -> None:
    """Clients close stdin, then send SIGTERM a moment later (and people press Ctrl-C twice):
    once the teardown is under way it finishes, and the machine is terminated."""
    config = tmp_path / "config.toml"
    config.write_text(
        '[[providers]]\nname = "slow-teardown"\nclass = "tests.test_mcp:SlowTeardownProvider"\n\n'
        '[[pools]]\nname = "slow"\nprovider = "slow-teardown"\n'
    )
    process, created = stdio_server_with_a_sandbox({"pool": "slow"}, server_env(TETHER_CONFIG=str(config)))
    try:
        assert process.stdin is not None
        process.stdin.close()  # the teardown begins
        time.sleep(0.7)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        record = Ledger().get(created["id"])
        assert record.status == "terminated"
        assert "stopping; tearing down" in (process.stderr.read() if process.stderr else "")
    finally:
        if process.poll() is None:
            process.kill()


def test_a_non_loopback_bind_without_a_token_refuses_to_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.cli", "mcp", "--transport", "http", "--host", "0.0.0.0", "--port", "0"],
        env=server_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "refusing to serve MCP on 0.0.0.0 without authentication" in result.stderr


async def test_a_non_loopback_bind_with_a_generated_token() -> None:
    with http_server("--generate-token", host="0.0.0.0") as (process, url, said):
        assert url.startswith("http://0.0.0.0:") and not url.startswith("http://0.0.0.0:0/")
        async with httpx.AsyncClient() as raw:
            assert (await raw.post(url, json={})).status_code == 401
        process.terminate()
        out = said + process.communicate(timeout=30)[0]
    token = out.split("bearer token (shown once): ")[1].split()[0]
    assert len(token) >= 32 and out.count(token) == 1


async def test_tools_that_report_or_change_a_sandbox_make_none(tmp_path: Path) -> None:
    """Asked about a sandbox when there is none, the answer is not a new machine (maybe a billed one)."""
    env = server_env(TETHER_STATE_DIR=str(tmp_path))
    async with stdio_client(env=env) as client:
        for tool in ("job_output", "job_kill"):
            unknown = await client.call_tool(tool, {"job_id": "j-0000beef"})
            assert unknown.is_error and "no background job 'j-0000beef'" in text(unknown), text(unknown)
        assert structured(await client.call_tool("job_list", {})) == {"jobs": []}
        for tool in ("sandbox_info", "sandbox_pause", "sandbox_resume", "sandbox_snapshot", "sandbox_destroy"):
            refused = await client.call_tool(tool, {})
            assert refused.is_error and "sandbox_list" in text(refused), (tool, text(refused))
        assert structured(await client.call_tool("sandbox_list", {}))["sandboxes"] == []
        # two sandboxes kept from before, none named: which one is the caller's to say
        made = [tether("up", "local", env=env).stdout.strip() for _ in range(2)]
        for tool in ("job_list", "sandbox_info", "sandbox_pause", "sandbox_resume"):
            refused = await client.call_tool(tool, {})
            assert refused.is_error and "several sandboxes exist" in text(refused), (tool, text(refused))
        for sandbox_id in made:
            assert tether("down", sandbox_id, env=env).returncode == 0


@pytest.mark.parametrize("host", ["127.0.0.2", "[::1]"])
async def test_any_loopback_address_serves_the_url_it_prints(host: str) -> None:
    """127.0.0.2 is loopback too: the Host check lets the address bound (as printed) through."""
    with http_server(host=host) as (_, url, _):
        async with httpx.AsyncClient() as raw:
            headers = {"Accept": "application/json, text/event-stream"}
            answer = await raw.post(url, json=INITIALIZE, headers=headers)
            assert answer.status_code == 200, answer.text
            rebound = await raw.post(url, json=INITIALIZE, headers={**headers, "Host": "evil.example"})
            assert rebound.status_code == 421


@pytest.mark.parametrize("token", ["abcdefghijklmnop ", "abcdefgh ijklmnop", " " * 20])
def test_a_token_with_whitespace_is_refused_at_start(token: str) -> None:
    """No client could send it (HTTP strips a header value's edges): refused, not silently useless."""
    with pytest.raises(HTTPSecurityError, match="whitespace"):
        resolve_token("0.0.0.0", False, {"TETHER_MCP_TOKEN": token})


def test_a_token_http_clients_cannot_send_is_refused_at_start() -> None:
    """(httpx, under the official client, refuses such a header before anything is sent.)"""
    with pytest.raises(HTTPSecurityError, match="other than ASCII"):
        resolve_token("0.0.0.0", False, {"TETHER_MCP_TOKEN": "pässwörd-0123456789"})


def test_a_request_with_a_lone_surrogate_gets_an_answer() -> None:
    """JavaScript's JSON.stringify can send "\\ud800" alone; the SDK's parser refuses the line and
    would answer nothing (the client waits forever): it gets an error, and the next call goes on."""
    process = tether_process("mcp", stdin=subprocess.PIPE)
    try:
        assert process.stdin and process.stdout
        write = '{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "write", '
        write += '"arguments": {"path": "s.txt", "content": "a\\ud800b"}}}'
        run = {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "run", "arguments": {"command": "true"}},
        }
        for line in (
            json.dumps(INITIALIZE),
            json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            write,
            json.dumps(run),
        ):
            process.stdin.write(line + "\n")
        process.stdin.flush()
        replies = {}
        while len(replies) < 3:
            assert select.select([process.stdout], [], [], 30)[0], f"no answer after {sorted(replies)}"
            reply = json.loads(process.stdout.readline())
            replies[reply["id"]] = reply
        assert replies[2]["error"]["code"] == -32602 and "lone UTF-16 surrogate" in replies[2]["error"]["message"]
        assert replies[3]["result"]["structuredContent"]["exit_code"] == 0
        process.stdin.close()
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()


class Sink:
    """Where the line reader writes its own answers (what _LineWriter does with a pipe)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    async def write(self, text: str) -> None:
        text.encode("utf-8")  # as the pipe would: a string UTF-8 cannot carry fails here
        self.lines.append(text)

    async def flush(self) -> None:
        pass


async def test_stdio_lines_that_could_crash_the_reader_do_not() -> None:
    """A lone surrogate in the request's id (answered in ASCII, escaped), and a line nested too
    deep to parse (left to the session, which reports it): the reader goes on either way."""
    reader = asyncio.StreamReader(limit=1 << 20)
    deep = "[" * 100_000 + '"\\ud800"' + "]" * 100_000
    reader.feed_data(('{"jsonrpc": "2.0", "id": "\\ud800", "method": "ping"}\n' + deep + '\n{"id": 3}\n').encode())
    reader.feed_eof()
    sink = Sink()
    lines = [line async for line in _LineReader(reader, 1 << 20, sink)]  # type: ignore[arg-type]
    assert lines == [deep + "\n", '{"id": 3}\n']
    reply = json.loads(sink.lines[0])
    assert reply["id"] == "\ud800" and reply["error"]["code"] == -32602 and sink.lines[0].isascii()


async def test_stdio_drops_an_oversized_message_whole_and_reads_on() -> None:
    reader = asyncio.StreamReader(limit=16)
    reader.feed_data(b'{"method": "far too long for the limit"}\n{"id": 2}\n{"id": 3}')
    reader.feed_eof()
    lines = [line async for line in _LineReader(reader, 16)]
    assert lines == ["(a message over 16 bytes was dropped)", '{"id": 2}\n', '{"id": 3}']


async def test_a_stdio_request_over_the_limit_is_answered_with_its_own_id() -> None:
    """A tool call too long to read (a write of a huge file) gets an error result saying what to do
    instead, not a parse error with id null that leaves the client waiting; the server reads on."""
    limit = 64 * 1024  # (the real limit, 64 MiB, works the same, slowly)
    async with stdio_client(env=server_env(TETHER_MCP_MAX_LINE_BYTES=str(limit))) as client:
        with anyio.fail_after(30):
            refused = await client.call_tool("write", {"path": "big.txt", "content": "x" * (2 * limit)})
        assert refused.is_error and "tether cp" in text(refused) and "limit" in text(refused), text(refused)
        written = structured(await client.call_tool("write", {"path": "small.txt", "content": "fits"}))
        assert written["bytes"] == 4
        never_written = await client.call_tool("read", {"path": "big.txt"})
        assert never_written.is_error and "no such file" in text(never_written)


async def test_stdio_answers_oversized_requests_and_drops_other_oversized_lines() -> None:
    reader = asyncio.StreamReader(limit=64)
    pad = "x" * 200
    reader.feed_data(
        (
            f'{{"jsonrpc": "2.0", "id": "a\\"b", "method": "tools/call", "params": "{pad}"}}\n'
            f'{{"jsonrpc":"2.0","id":7,"method":"resources/read","params":"{pad}"}}\n'
            # as the TypeScript SDK writes a request ({...request, jsonrpc, id}): params before the id
            f'{{"method":"tools/call","params":{{"name":"write","arguments":{{"id":1,"c":"{pad}"}}}},"jsonrpc":"2.0","id":11}}\n'
            # an id only inside params is not the request's
            f'{{"method":"tools/call","params":{{"arguments":{{"c":"{pad}","id":12}}}}}}\n'
            f'{{"jsonrpc": "2.0", "id": 8, "result": "{pad}"}}\n'  # a response: nothing to answer
            f'{{"jsonrpc": "2.0", "method": "notifications/x", "params": "{pad}"}}\n'
            '{"id": 9}\n'
        ).encode()
    )
    reader.feed_eof()
    sink = Sink()
    lines = [line async for line in _LineReader(reader, 64, sink)]  # type: ignore[arg-type]
    assert lines == ["(a message over 64 bytes was dropped)"] * 3 + ['{"id": 9}\n']
    call, other, typescript = (json.loads(line) for line in sink.lines)
    assert call["id"] == 'a"b' and call["result"]["isError"] and "tether cp" in call["result"]["content"][0]["text"]
    assert other["id"] == 7 and other["error"]["code"] == -32600
    assert typescript["id"] == 11 and typescript["result"]["isError"]


@pytest.mark.parametrize("wiring", ["two sockets", "one socket"])
def test_stdio_serves_separate_sockets_and_one_shared_by_stdin_and_stdout(wiring: str) -> None:
    """MCP clients give the server pipes (served from the event loop, as every stdio_client test
    shows), or separate sockets (served the same way); inetd-style launchers give one socket for
    both (served by the SDK's transport): either way every request gets its answer, and the end of
    input ends the server cleanly."""
    ours, theirs = socket.socketpair()
    if wiring == "one socket":
        server_in = server_out = theirs
        replies = ours
    else:
        server_in = theirs
        replies, server_out = socket.socketpair()
    server = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "mcp"], stdin=server_in, stdout=server_out, cwd=ROOT, env=server_env()
    )
    theirs.close()
    server_out.close()
    replies.settimeout(20)
    pending = b""

    def exchange(message: dict[str, object]) -> dict[str, object]:
        nonlocal pending
        ours.sendall(json.dumps(message).encode() + b"\n")
        while b"\n" not in pending:
            chunk = replies.recv(65536)
            assert chunk, "the server closed the connection"
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        return json.loads(line)

    try:
        hello = exchange(INITIALIZE)
        assert hello["result"]["serverInfo"]["name"] == "tether"  # type: ignore[index]
        ours.sendall(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')
        for request_id in range(2, 6):
            assert exchange({"jsonrpc": "2.0", "id": request_id, "method": "ping"}) == {
                "jsonrpc": "2.0",
                "id": request_id,
                "result": {},
            }
        ours.shutdown(socket.SHUT_WR)
        assert server.wait(20) == 0
    finally:
        if server.poll() is None:
            server.kill()
        ours.close()
        replies.close()


async def test_an_attached_default_host_is_kept_and_reused_by_the_next_server(
    sshd: SSHD, client_key: Path, tmp_path: Path
) -> None:
    """`tether mcp --attach` must not kill what runs on someone's own machine when it stops."""
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        f"Host devbox\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.account.name}\n"
        f"  IdentityFile {client_key}\n"
    )
    args = ("--attach", "devbox")
    env = server_env(HOME=str(tmp_path))
    async with stdio_client(*args, env=env) as client:
        job = structured(await client.call_tool("run", {"command": "sleep 1000", "run_in_background": True}))
        first = structured(await client.call_tool("sandbox_list", {}))["default"]
    ledger = Ledger()
    assert ledger.get(first).status == "running"
    async with stdio_client(*args, env=env) as client:
        listed = structured(await client.call_tool("job_list", {}))
        assert job["job_id"] in [j["job_id"] for j in listed["jobs"] if j["status"] == "running"]
        assert structured(await client.call_tool("sandbox_list", {}))["default"] == first
        await client.call_tool("job_kill", {"job_id": job["job_id"], "signal": "KILL"})
        await client.call_tool("sandbox_destroy", {"sandbox": first})


async def test_attach_with_a_key_of_its_own_and_ssh_without_a_host(
    sshd: SSHD, client_key: Path, tmp_path: Path
) -> None:
    env = server_env(HOME=str(tmp_path))  # no ~/.ssh keys, no agent: only --identity can log in
    env.pop("SSH_AUTH_SOCK", None)
    async with stdio_client("--attach", sshd.address, "--identity", str(client_key), env=env) as client:
        before = await client.call_tool("sandbox_info", {})  # (reports on nothing: attaches nothing)
        assert before.is_error and f"attaches {sshd.address}, the default" in text(before), text(before)
        ran = structured(await client.call_tool("run", {"command": "whoami"}))
        assert ran["stdout"] == f"{sshd.account.name}\n"
        detached = text(await client.call_tool("sandbox_destroy", {}))
        assert detached.endswith(f"default sandbox: a call that names no sandbox now attaches {sshd.address} again")
    refused = tether("mcp", "--provider", "ssh")
    assert refused.returncode == 2 and "--attach" in refused.stderr, refused.stderr


async def test_the_default_sandbox_comes_from_config_defaults(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[defaults]\npool = "mine"\nidle_timeout_s = 900\n\n[[pools]]\nname = "mine"\nprovider = "local"\n'
    )
    async with stdio_client(env=server_env(TETHER_CONFIG=str(config))) as client:
        nothing = await client.call_tool("sandbox_destroy", {})
        assert nothing.is_error and "no default sandbox" in nothing.content[0].text
        await client.call_tool("run", {"command": "true"})
        listed = structured(await client.call_tool("sandbox_list", {}))
        default = next(s for s in listed["sandboxes"] if s["id"] == listed["default"])
        assert default["pool"] == "mine"
        assert Ledger().get(listed["default"]).idle_timeout == 900
        destroyed = await client.call_tool("sandbox_destroy", {})  # the default, by omission
        assert structured(destroyed)["id"] == listed["default"]
        assert Ledger().get(listed["default"]).status == "terminated"
        assert text(destroyed).endswith("the default sandbox: a call that names no sandbox now makes a new, empty one")


async def test_destroying_the_only_sandbox_says_the_next_call_makes_a_new_one() -> None:
    """The only live sandbox is the default before any call has used it: ending it says so too."""
    async with stdio_client() as client:
        made = structured(await client.call_tool("sandbox_create", {"provider": "local"}))
        ended = await client.call_tool("sandbox_destroy", {})
        assert structured(ended)["id"] == made["id"]
        assert text(ended).endswith("the default sandbox: a call that names no sandbox now makes a new, empty one")


async def test_the_only_live_sandbox_is_the_default_everywhere() -> None:
    """With no default named or made, the only live sandbox is what calls without `sandbox` use:
    sandbox_list marks it, and sandbox_destroy without `sandbox` destroys it."""
    async with stdio_client() as client:
        one = structured(await client.call_tool("sandbox_create", {"provider": "local", "name": "one"}))
        two = structured(await client.call_tool("sandbox_create", {"provider": "local", "name": "two"}))
        assert structured(await client.call_tool("sandbox_list", {}))["default"] is None  # which? unsaid
        several = await client.call_tool("run", {"command": "true"})
        assert several.is_error and "several sandboxes exist" in text(several)
        await client.call_tool("sandbox_destroy", {"sandbox": one["id"]})
        assert structured(await client.call_tool("sandbox_list", {}))["default"] == two["id"]
        here = structured(await client.call_tool("run", {"command": "pwd"}))["stdout"]
        assert here == structured(await client.call_tool("run", {"command": "pwd", "sandbox": "two"}))["stdout"]
        destroyed = structured(await client.call_tool("sandbox_destroy", {}))
        assert destroyed["id"] == two["id"] and Ledger().get(two["id"]).status == "terminated"


async def test_the_server_reaps_expired_and_idle_sandboxes_itself() -> None:
    async with stdio_client("--reap-interval", "0.2") as client:
        ttl = structured(await client.call_tool("sandbox_create", {"provider": "local", "timeout_s": 0.5}))
        idle = structured(await client.call_tool("sandbox_create", {"provider": "local", "idle_timeout_s": 0.5}))
        ledger = Ledger()
        deadline = time.monotonic() + 10
        while any(ledger.get(s["id"]).live for s in (ttl, idle)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert ledger.get(ttl["id"]).status_reason == "expired (TTL)"
        assert (ledger.get(idle["id"]).status_reason or "").startswith("idle for")
        for made in (ttl, idle):
            rows = ledger.store.query("SELECT COUNT(*) AS n FROM cost_events WHERE sandbox_id = ?", (made["id"],))
            assert rows[0]["n"] == 1
        gone = await client.call_tool("run", {"command": "true", "sandbox": ttl["id"]})
        assert gone.is_error and "terminated" in text(gone)


async def test_a_list_does_not_show_running_what_outlived_its_ttl() -> None:
    """The reaper comes by every 30 s; a list in between must agree with what a call would find."""
    async with stdio_client() as client:
        brief = structured(await client.call_tool("sandbox_create", {"provider": "local", "timeout_s": 1}))
        kept = structured(await client.call_tool("sandbox_create", {"provider": "local", "name": "kept"}))
        listed = structured(await client.call_tool("sandbox_list", {}))["sandboxes"]
        assert {s["id"] for s in listed} == {brief["id"], kept["id"]}
        await asyncio.sleep(1.5)
        listed = structured(await client.call_tool("sandbox_list", {}))["sandboxes"]
        assert [s["id"] for s in listed] == [kept["id"]]
        assert Ledger().get(brief["id"]).status_reason == "expired (TTL)"


async def test_big_reads_and_diffs_come_back_cut_with_a_way_on() -> None:
    async with stdio_client("--provider", "local") as client:
        wide = "".join(f"{i:04d}" + "w" * 996 + "\n" for i in range(1, 3001))
        await client.call_tool("write", {"path": "wide.txt", "content": wide})
        read = text(await client.call_tool("read", {"path": "wide.txt"}))
        assert len(read) < 101_000 and "(an answer stops at 100000 characters); read on with offset=" in read
        replaced = await client.call_tool(
            "edit", {"path": "wide.txt", "old_string": "w" * 996, "new_string": "v", "replace_all": True}
        )
        diff = structured(replaced)["diff"]
        assert structured(replaced)["replacements"] == 3000
        assert len(diff) <= 30_000 and diff.endswith("[diff cut; read the file for the rest]"), diff[-200:]


async def test_a_command_running_when_its_sandbox_expires_is_stopped_and_says_so() -> None:
    """The reaper ends a sandbox under a running command: the command dies with it (a local one
    would run on, with its sandbox's directory gone), and the call says why it ended."""
    marker = leaf_sleep()
    async with stdio_client("--reap-interval", "0.2") as client:
        made = structured(await client.call_tool("sandbox_create", {"provider": "local", "timeout_s": 1.5}))
        started = time.monotonic()
        ran = await client.call_tool("run", {"command": marker, "timeout_ms": 60000, "sandbox": made["id"]})
        assert ran.is_error and "ended while this ran (expired (TTL))" in text(ran), text(ran)
        assert time.monotonic() - started < 20
        assert await wait_until_gone(marker) == []


async def test_a_default_sandbox_ended_by_another_process_is_said_so_not_replaced_silently() -> None:
    """`tether down` elsewhere under a running command: the call says its sandbox ended (not that the
    command killed its shell); the next call says the default is gone, once; then a new one."""
    marker = leaf_sleep()
    async with stdio_client("--provider", "local") as client:
        for empty in ("sandbox_info", "sandbox_destroy", "run"):
            refused = await client.call_tool(empty, {"sandbox": ""} | ({"command": "true"} if empty == "run" else {}))
            assert refused.is_error and "sandbox: String should have at least 1 character" in text(refused), text(
                refused
            )
        first = structured(await client.call_tool("run", {"command": "touch here; pwd"}))
        default = structured(await client.call_tool("sandbox_list", {}))["default"]
        running = asyncio.ensure_future(client.call_tool("run", {"command": marker, "timeout_ms": 60000}))
        await wait_until_running(marker, 20)
        assert (await asyncio.to_thread(tether, "down", default)).returncode == 0
        ran = await running
        assert ran.is_error and "ended while this ran" in text(ran), text(ran)
        told = await client.call_tool("run", {"command": "ls"})
        assert told.is_error and "the default sandbox" in text(told) and default in text(told), text(told)
        again = structured(await client.call_tool("run", {"command": "ls; pwd"}))
        assert "here" not in again["stdout"].split() and again["cwd"] != first["cwd"]  # (a new, empty one)
        assert structured(await client.call_tool("sandbox_list", {}))["default"] != default


def test_a_client_gone_without_a_goodbye_ends_the_server_quietly() -> None:
    """A client killed with -9 leaves a pipe nobody reads: its answers are dropped, and the end of
    its input ends the server (and its teardown) as a clean close would, without a traceback."""
    server = tether_process("mcp", stdin=subprocess.PIPE, text=False)
    assert server.stdin is not None and server.stdout is not None and server.stderr is not None
    server.stdout.close()  # the client's end, gone
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    for message in (initialize, {"jsonrpc": "2.0", "method": "notifications/initialized"}):
        server.stdin.write((json.dumps(message) + "\n").encode())
        server.stdin.flush()
    time.sleep(1)
    server.stdin.write(b'{"jsonrpc": "2.0", "id": 2, "method": "tools/list"}\n')
    server.stdin.close()
    assert server.wait(30) == 0
    assert "Traceback" not in server.stderr.read().decode()


async def test_sandbox_info_of_a_host_that_went_away_says_it_could_not_ask(own_sshd: SSHD, client_key: Path) -> None:
    """Its jobs and ports then read empty: `unreachable` says why, so that no agent takes that for none."""
    server = own_sshd
    async with stdio_client() as client:
        try:
            attached = structured(
                await client.call_tool("host_attach", {"host": server.address, "key_path": str(client_key)})
            )
            assert (
                structured(await client.call_tool("sandbox_info", {"sandbox": attached["id"]}))["unreachable"] is None
            )
        finally:
            server.cleanup()
        info = structured(await client.call_tool("sandbox_info", {"sandbox": attached["id"]}))
        assert info["status"] == "running" and info["jobs"] == [] and "cannot connect" in info["unreachable"], info
        # The first call waited out the re-dial backoff (a dropped connection is often a moment's);
        # once that failed, the host is taken for down: the next call learns so at the first refusal.
        started = time.monotonic()
        again = structured(await client.call_tool("sandbox_info", {"sandbox": attached["id"]}))
        assert "cannot connect" in again["unreachable"] and time.monotonic() - started < sum(REDIAL_BACKOFF)
        await client.call_tool("sandbox_destroy", {"sandbox": attached["id"]})
