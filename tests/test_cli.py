"""The `tether` command line, run as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import queue
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from providers import Fleet
from providers.ledger import Ledger
from providers.local_server import local_dir
from tests.mcp_support import ROOT, server_env, tether, tether_process
from tests.processes import leaf_sleep, wait_until_gone, wait_until_running
from tests.sshd import SSHD
from tools.output import duration


def test_up_exec_cp_info_down(tmp_path: Path) -> None:
    up = tether("up", "local", "--name", "cli-box", "--ttl", "3600")
    assert up.returncode == 0, up.stderr
    sandbox_id = up.stdout.strip()
    assert sandbox_id.startswith("sb-") and "provisioning" in up.stderr

    listed = json.loads(tether("ls", "--json").stdout)
    row = next(r for r in listed if r["id"] == sandbox_id)
    assert row["name"] == "cli-box" and row["status"] == "running" and row["expires_at"].endswith("Z")
    assert row["ssh"]["host"] == "127.0.0.1" and row["cost"]["billing_model"] == "fixed"  # MCP's shapes
    pools = json.loads(tether("pools", "--json").stdout)
    assert any(p["available"] is True and p["unavailable_reason"] is None for p in pools)
    printed = tether("ssh", sandbox_id, "--print")
    assert printed.returncode == 0 and f"TETHER_SANDBOX={sandbox_id}" in printed.stdout

    # the remote exit code is tether's; stdout and stderr stay apart
    ran = tether("exec", sandbox_id, "--", "echo out; echo err >&2; exit 7")
    assert (ran.returncode, ran.stdout, ran.stderr) == (7, "out\n", "err\n")
    argv = tether("exec", "cli-box", "--", "printf", "%s|", "a b", "$(nope)")
    assert argv.returncode == 0 and argv.stdout == "a b|$(nope)|"
    # options may follow the ID
    timed = tether("exec", sandbox_id, "--timeout", "0.5", "--", "sleep 5")
    assert timed.returncode == 124 and "timed out after 0.5s" in timed.stderr
    # after `--`, everything is the command, dashes and all
    dashed = tether("exec", sandbox_id, "--", "--timeout", "5")
    assert dashed.returncode == 127 and "--timeout" in dashed.stderr, dashed.stderr
    assert tether("exec", sandbox_id, "--", "--", "true").returncode == 127  # (a command named --)
    misplaced = tether("exec", sandbox_id, "echo", "--", "hi")
    assert misplaced.returncode == 2 and "'echo' before --" in misplaced.stderr

    local = tmp_path / "data.bin"
    local.write_bytes(os.urandom(3 * 1024 * 1024))
    up_copy = tether("cp", str(local), f"{sandbox_id}:in/data.bin")
    assert up_copy.returncode == 0 and "copied 3145728 bytes" in up_copy.stdout
    back = tmp_path / "back.bin"
    assert tether("cp", "cli-box:in/data.bin", str(back)).returncode == 0
    assert back.read_bytes() == local.read_bytes()
    # exec passes the bytes through untouched (not decoded as UTF-8), on both streams
    piped = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.cli",
            "exec",
            sandbox_id,
            "--",
            "sh",
            "-c",
            "cat in/data.bin; printf '\\377' >&2",
        ],
        capture_output=True,
        cwd=ROOT,
        env=server_env(),
        timeout=120,
    )
    assert piped.returncode == 0 and piped.stdout == local.read_bytes() and piped.stderr == b"\xff"
    assert tether("cp", str(local), f"{sandbox_id}:in/").returncode == 0  # into a directory: its own name
    tree = tmp_path / "tree"
    (tree / "sub dir").mkdir(parents=True)
    (tree / "top.txt").write_text("top\n")
    (tree / "sub dir" / "low.txt").write_text("low\n")
    whole = tether("cp", str(tree), f"{sandbox_id}:copied")
    assert whole.returncode == 2 and "tether cp -r" in whole.stderr, whole.stderr
    whole = tether("cp", "-r", str(tree), f"{sandbox_id}:copied")
    assert whole.returncode == 0 and whole.stdout == "copied 8 bytes in 2 files\n", whole.stdout + whole.stderr
    assert tether("cp", "-r", "cli-box:copied", str(tmp_path / "tree-back")).returncode == 0
    assert (tmp_path / "tree-back" / "sub dir" / "low.txt").read_text() == "low\n"
    assert tether("exec", sandbox_id, "--", "cmp", "in/data.bin", "in/data.bin").returncode == 0

    info = json.loads(tether("info", sandbox_id, "--json").stdout)
    assert info["status"] == "running" and info["capacity"]["cpus"] == os.cpu_count()
    assert info["capabilities"]["billingModel"] == "fixed"

    refused = tether("pause", sandbox_id)
    assert refused.returncode == 2 and "cannot pause" in refused.stderr and "tether down" in refused.stderr

    down = json.loads(tether("down", sandbox_id, "--json").stdout)
    assert down["status"] == "terminated" and down["cost"]["billing_model"] == "fixed"
    assert set(down["cost"]) == {"seconds", "gpu_seconds", "gpu_type", "billing_model", "estimated_usd"}  # MCP's
    gone = tether("exec", sandbox_id, "--", "true")
    assert gone.returncode == 2 and "terminated" in gone.stderr
    costs = json.loads(tether("costs", "--json").stdout)
    [cost] = [c for c in costs if c["id"] == sandbox_id]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cost["terminated"])  # as ls --json's times


def test_up_alone_is_local_and_down_again_says_it_had_ended(tmp_path: Path) -> None:
    env = server_env(TETHER_CONFIG=str(tmp_path / "none.toml"), E2B_API_KEY="e2b-set")  # (an implicit cloud pool)
    up = tether("up", "--json", "--cpu", "4", env=env)
    assert up.returncode == 0, up.stderr
    row = json.loads(up.stdout)
    assert row["provider"] == "local"
    assert row["notes"] == ["note: local uses the machine as it is; cpu not applied"]  # (without --json: as it goes)
    listed = tether("ls", env=env).stdout  # (for people: what it has cost so far)
    assert "COST" in listed.splitlines()[0] and re.search(rf"{row['id']} .* \(fixed, ~\$0\.0000\) so far", listed)
    assert "so far" in tether("info", row["id"], env=env).stdout
    exec_cat = [sys.executable, "-m", "tools.cli", "exec", row["id"], "--", "cat"]
    piped = subprocess.run(exec_cat, input="data\n", capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert (piped.returncode, piped.stdout) == (0, "") and "reads /dev/null, not this stdin" in piped.stderr
    quiet = subprocess.run(exec_cat, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, env=env)
    assert (quiet.returncode, quiet.stderr) == (0, "")
    first = tether("down", row["id"], env=env)
    assert first.returncode == 0 and first.stdout.startswith(f"terminated {row['id']} after "), first.stdout
    again = tether("down", row["id"], env=env)
    assert again.returncode == 0 and again.stdout.startswith(f"{row['id']} had already ended (terminated after ")
    assert "nothing was done" in again.stdout
    checks = {c["name"]: c for c in json.loads(tether("doctor", "--json", env=env).stdout)}
    assert checks["config"]["status"] == "warn" and "none.toml, which does not exist" in checks["config"]["detail"]


def test_copies_between_two_sandboxes_keep_names_and_modes(tmp_path: Path) -> None:
    """Through this machine: a file, a directory under its name, and what `dir/.` holds; the modes as
    they were (group-writable: a umask of 022 on the way would take that away)."""
    one, two = (tether("up", "local").stdout.strip() for _ in range(2))
    try:
        made = "mkdir -p proj/sub && echo hi > proj/sub/f.txt && echo true > proj/run.sh && chmod 775 proj/run.sh"
        assert tether("exec", one, "--", made).returncode == 0
        assert tether("cp", f"{one}:proj/run.sh", f"{two}:").returncode == 0
        assert tether("cp", "-r", f"{one}:proj", f"{two}:").returncode == 0
        assert tether("exec", two, "--", "mkdir into").returncode == 0
        assert tether("cp", "-r", f"{one}:proj/.", f"{two}:into").returncode == 0
        listed = tether(
            "exec", two, "--", "stat -c '%a %n' run.sh proj/run.sh into/run.sh proj/sub/f.txt into/sub/f.txt"
        )
        modes = listed.stdout.splitlines()
        assert modes[:3] == ["775 run.sh", "775 proj/run.sh", "775 into/run.sh"], listed.stdout
        original = tether("exec", one, "--", "stat -c %a proj/sub/f.txt").stdout.strip()
        assert modes[3:] == [f"{original} proj/sub/f.txt", f"{original} into/sub/f.txt"], listed.stdout
        assert listed.returncode == 0 and "into/proj" not in tether("exec", two, "--", "find into").stdout
    finally:
        for box in (one, two):
            tether("down", box)


def test_attach_and_ssh_command(sshd: SSHD, client_key: Path) -> None:
    attached = tether("attach", sshd.address, "--identity", str(client_key), "--name", "cli-attached")
    assert attached.returncode == 0, attached.stderr
    sandbox_id = attached.stdout.strip()
    printed = tether("ssh", sandbox_id, "--print")
    assert printed.returncode == 0
    command = printed.stdout.split()
    assert command[:3] == ["ssh", "-p", str(sshd.port)] and str(client_key) in command
    assert "StrictHostKeyChecking=yes" in printed.stdout  # the pinned key, not trust-on-whatever
    # the printed command works with the real OpenSSH client
    assert command[-4:] == ["-l", sshd.account.name, "--", "127.0.0.1"]  # no name can read as an option
    result = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", *command[1:], "whoami"], capture_output=True, text=True, timeout=30
    )
    assert result.stdout.strip() == sshd.account.name, result.stderr
    # its pin forgotten (as after the host was rebuilt): tether dials it first, pinning its key
    # again, and OpenSSH is still told to accept that key alone (not the user's own settings)
    assert tether("forget-host", f"127.0.0.1:{sshd.port}").returncode == 0
    again = tether("ssh", sandbox_id, "--print")
    assert again.returncode == 0, again.stderr
    assert "StrictHostKeyChecking=yes" in again.stdout
    known = again.stdout.split("UserKnownHostsFile=")[1].split()[0]
    assert sshd.host_key is not None
    host_key = Path(f"{sshd.host_key}.pub").read_text().split()[:2]
    assert Path(known).read_text().split()[1:3] == host_key
    assert tether("down", sandbox_id).returncode == 0


def test_attach_json_and_info_of_a_host_that_went_away(sshd: SSHD, client_key: Path) -> None:
    """`attach --json` answers as host_attach does; `info` of a host that stopped answering shows
    what the ledger knows and says it is unreachable, rather than failing outright."""
    server = SSHD(sshd.account, client_key).start()
    try:
        attached = tether("attach", server.address, "--identity", str(client_key), "--json")
        assert attached.returncode == 0, attached.stderr
        row = json.loads(attached.stdout)
        assert row["capabilities"]["transportModel"] and row["ssh"]["port"] == server.port
        assert {"id", "name", "provider", "pool", "status", "ssh", "capabilities", "expires_at"} <= set(row)
    finally:
        server.cleanup()
    people = tether("info", row["id"])
    assert people.returncode == 0 and "status:        running" in people.stdout, people.stdout + people.stderr
    assert "unreachable:   " in people.stdout and "cannot connect" in people.stdout
    scripts = json.loads(tether("info", row["id"], "--json").stdout)
    assert "cannot connect" in scripts["unreachable"] and "jobs" not in scripts
    assert tether("down", row["id"]).returncode == 0


def test_errors_say_what_to_do() -> None:
    version = tether("--version")
    assert version.returncode == 0 and re.fullmatch(r"tether \d+\.\d+\.\d+\n", version.stdout), version.stdout
    missing = tether("info", "sb-nope")
    assert missing.returncode == 2 and "no sandbox 'sb-nope'" in missing.stderr and "tether ls" in missing.stderr
    bare = tether()  # the commands, not argparse's "the following arguments are required"
    assert bare.returncode == 2 and "exec " in bare.stderr and "TETHER_STATE_DIR" in bare.stderr, bare.stderr
    early = tether("--json", "ls")
    assert early.returncode == 2 and "--json goes after the command: tether ls --json" in early.stderr
    for text in ("70000", "²"):  # (refused before anything is looked up or opened; ² is a digit to str)
        port = tether("tunnel", "sb-nope", text)
        assert port.returncode == 2 and f"expected a port, 1-65535, not '{text}'" in port.stderr, port.stderr
    for ttl in ("inf", "-5", "1e12"):  # refused before anything is created, without pydantic's report
        refused = tether("up", "local", "--ttl", ttl)
        assert refused.returncode == 2 and refused.stderr.startswith("tether: invalid arguments: --ttl: ")
        assert "pydantic" not in refused.stderr and "tether up --help" in refused.stderr
    memory = tether("up", "local", "--memory-mb", "0")  # an option's error names the option
    assert memory.returncode == 2 and "invalid arguments: --memory-mb: " in memory.stderr, memory.stderr
    reaping = tether("mcp", "--reap-interval", "0")
    assert reaping.returncode == 2 and "--reap-interval: expected a positive number of seconds" in reaping.stderr
    assert "--timeout" not in reaping.stderr
    unknown = tether("up", "nope")
    assert unknown.returncode == 2 and "unknown provider 'nope'; known: local" in unknown.stderr
    no_such = tether("mcp", "--provider", "nope")  # refused at start, not blamed on each tool call
    assert no_such.returncode == 2 and "unknown provider 'nope'" in no_such.stderr
    bad_host = tether("mcp", "--attach", "bad host", timeout=30)  # (stdio: it would wait for a client)
    assert bad_host.returncode == 2 and "cannot parse SSH address 'bad host'" in bad_host.stderr
    unimplemented = tether("up", "daytona")
    assert unimplemented.returncode == 2 and "daytona provider is not part of this version" in unimplemented.stderr


def test_config_defaults_and_unknown_sections(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[defaults]\npool = "mine"\nttl_s = 600\n\n[[pools]]\nname = "mine"\nprovider = "local"\n')
    env = server_env(TETHER_CONFIG=str(config))
    up = tether("up", "--json", env=env)  # no provider: the default pool
    assert up.returncode == 0, up.stderr
    row = json.loads(up.stdout)
    assert row["pool"] == "mine" and row["expires_at"]
    assert tether("down", row["id"], env=env).returncode == 0

    config.write_text('[chanels]\nkind = "slack"\n\n[relay]\nhost = "r.example"\nidentity_file = "x"\n')
    refused = tether("up", env=env)
    assert refused.returncode == 2 and "unknown section(s) chanels" in refused.stderr
    warned = tether("ls", env=env)  # (what exists can be worked on: see the test below)
    assert warned.returncode == 0 and "warning: " in warned.stderr and "unknown section(s) chanels" in warned.stderr
    checks = {c["name"]: c for c in json.loads(tether("doctor", "--json", env=env).stdout)}
    assert checks["config"]["status"] == "fail"
    assert "chanels" in checks["config"]["detail"] and "identity_file" in checks["config"]["detail"]

    # what parses but cannot work: a default pool that is not there, a channel's unset variable
    config.write_text(
        '[defaults]\npool = "ghost"\n\n[[channels]]\nkind = "slack"\nurl_env = "TETHER_TEST_UNSET_HOOK"\n'
    )
    checks = {c["name"]: c for c in json.loads(tether("doctor", "--json", env=env).stdout)}
    assert checks["[defaults]"]["status"] == "fail" and "'ghost' is not a pool here" in checks["[defaults]"]["detail"]
    channel = next(c for name, c in checks.items() if name.startswith("channel "))
    assert channel["status"] == "warn" and "$TETHER_TEST_UNSET_HOOK not set" in channel["detail"]

    config.write_text('[relay]\nhost = "relay.example"\n')  # (no user name: none of this machine's is sent)
    checks = {c["name"]: c for c in json.loads(tether("doctor", "--json", env=env).stdout)}
    assert checks["config"]["status"] == "fail" and "no user name for relay.example:22" in checks["config"]["detail"]


def test_doctor_checks_each_pool(sshd: SSHD, client_key: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    box = f'config = {{ host = "{sshd.address}", identityFile = "{client_key}" }}'
    config.write_text(
        f'[[pools]]\nname = "here"\nprovider = "local"\n\n'
        f'[[pools]]\nname = "box"\nprovider = "ssh"\n{box}\n\n'
        f'[[pools]]\nname = "cloud"\nprovider = "e2b"\n\n'
        f'[[pools]]\nname = "own-daytona"\nprovider = "daytona"\n'
        f'config = {{ daytonaApiUrl = "http://127.0.0.1:{sshd.port}/api" }}\n'
    )
    env = server_env(TETHER_CONFIG=str(config), DAYTONA_API_KEY="dtn-test", MODAL_TOKEN_ID="half-set")
    env.pop("E2B_API_KEY", None)
    env.pop("DAYTONA_API_URL", None)
    env.pop("MODAL_TOKEN_SECRET", None)
    result = tether("doctor", "--json", env=env)
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["pool here (local)"]["status"] == "ok"
    assert checks["pool box (ssh)"]["status"] == "ok" and sshd.address in checks["pool box (ssh)"]["detail"]
    assert checks["pool cloud (e2b)"]["status"] == "fail"
    assert "E2B_API_KEY" in checks["pool cloud (e2b)"]["detail"]
    # a self-hosted Daytona: the pool's daytonaApiUrl is where doctor looks, not app.daytona.io
    assert f"127.0.0.1:{sshd.port} reachable" in checks["pool own-daytona (daytona)"]["detail"]
    assert "dtn-test" not in result.stdout + result.stderr
    half = checks["modal credentials"]  # no pool of its own would mention it
    assert half["status"] == "warn" and "MODAL_TOKEN_SECRET" in half["detail"] and "half-set" not in result.stdout
    assert result.returncode == 1


def test_doctor_reports_a_pool_whose_host_does_not_parse_and_goes_on(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[[pools]]\nname = "odd"\nprovider = "ssh"\nconfig = { host = "-me@box" }\n\n'
        '[[pools]]\nname = "here"\nprovider = "local"\n'
    )
    result = tether("doctor", "--json", env=server_env(TETHER_CONFIG=str(config)))
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    odd = checks["pool odd (ssh)"]
    assert odd["status"] == "fail" and "-me" in odd["detail"], odd
    assert checks["pool here (local)"]["status"] == "ok"  # the checks after it still ran
    assert result.returncode == 1 and "invalid arguments" not in result.stderr
    people = tether("doctor", env=server_env(TETHER_CONFIG=str(config)))
    assert "[FAIL] pool odd (ssh): " in people.stdout and people.returncode == 1


def test_a_damaged_or_impossible_state_dir_is_named_not_a_traceback(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    damaged.mkdir(mode=0o700)
    (damaged / "tether.db").write_text("not a database")
    listed = tether("ls", env=server_env(TETHER_STATE_DIR=str(damaged)))
    assert listed.returncode == 2 and "Traceback" not in listed.stderr, listed.stderr
    assert f"state database {damaged}/tether.db cannot be used (file is not a database)" in listed.stderr
    doctor = tether("doctor", env=server_env(TETHER_STATE_DIR=str(damaged)))
    assert doctor.returncode == 1 and "[FAIL] state db: " in doctor.stdout, doctor.stdout + doctor.stderr
    impossible = str(tmp_path / "a-file" / "state")
    (tmp_path / "a-file").write_text("")
    for command in ("ls", "doctor"):
        result = tether(command, env=server_env(TETHER_STATE_DIR=impossible))
        assert "Traceback" not in result.stderr and f"state dir {impossible} cannot be created" in (
            result.stdout + result.stderr
        ), result.stdout + result.stderr
        assert result.returncode == (1 if command == "doctor" else 2)
    a_file = tether("ls", env=server_env(TETHER_STATE_DIR=str(tmp_path / "a-file")))
    assert f"state dir {tmp_path}/a-file cannot be created (it is not a directory)" in a_file.stderr, a_file.stderr


def test_demo_runs_the_whole_story() -> None:
    result = tether("demo", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    for step in (
        "provisioning a local sandbox",
        "writing a small web app",
        "editing the greeting",
        "grepping",
        "running the tests",
        "starting the server",
        "fetching a page through a tunnel",
        "tearing down",
    ):
        assert f"==> {step}" in result.stdout
    assert "-> 200 'Hi, tether!'" in result.stdout and "OK" in result.stdout


def test_a_demo_whose_reader_leaves_ends_quietly_and_tears_down() -> None:
    """`tether demo | head -3`: as any command whose reader went away (141, no complaint), and its
    sandbox is torn down."""
    demo = tether_process("demo")
    try:
        assert demo.stdout is not None
        sandbox_id = None
        for line in demo.stdout:  # (until a line names the sandbox)
            if sandbox_id := re.search(r"\((sb-[0-9a-f]{10})\)", line):
                break
        assert sandbox_id is not None, "the demo never named its sandbox"
        demo.stdout.close()
        assert demo.wait(timeout=120) == 141
        assert "demo failed" not in (demo.stderr.read() if demo.stderr else "")
    finally:
        demo.kill()
    assert Ledger().get(sandbox_id.group(1)).status == "terminated"


def test_an_id_that_cannot_be_printed_ends_the_sandbox_it_names(tmp_path: Path) -> None:
    """`tether up >&-` or onto a full disk: a script would never learn the id to end the sandbox,
    so tether ends it and fails. With stdout closed, any command says so (no traceback)."""
    env = server_env(TETHER_CONFIG=str(tmp_path / "none.toml"))
    before = {row["id"] for row in json.loads(tether("ls", "--all", "--json", env=env).stdout)}
    closed = ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "tools.cli"]
    for command, target in ((closed, None), ([sys.executable, "-m", "tools.cli"], "/dev/full")):
        with open(target or os.devnull, "w") as out:
            up = subprocess.run([*command, "up"], stdout=out, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        assert up.returncode == 2 and "Traceback" not in up.stderr, up.stderr
        assert ("standard output is closed" if target is None else "No space left on device") in up.stderr
    made = [row for row in json.loads(tether("ls", "--all", "--json", env=env).stdout) if row["id"] not in before]
    assert len(made) == 2 and {row["status"] for row in made} == {"terminated"}, made
    assert all(row["status_reason"] == "its id could not be printed" for row in made)
    listed = subprocess.run([*closed, "ls"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert (listed.returncode, listed.stderr) == (2, "tether: [Errno 9] standard output is closed\n")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_a_demo_ended_by_a_signal_tears_its_sandbox_down(stop: signal.Signals) -> None:
    """A demo stopped midway (SIGTERM from a supervisor, SIGHUP from a closed terminal) leaves no
    sandbox behind for gc: it ends as Ctrl-C would, tearing down what it created."""
    demo = tether_process("demo", stderr=subprocess.STDOUT)
    lines: queue.Queue[str] = queue.Queue()  # (read in a thread: a demo that hangs fails the test)
    threading.Thread(target=lambda: [lines.put(line) for line in demo.stdout or ()], daemon=True).start()
    try:
        output = ""
        while "==> fetching a page" not in output:  # (its server runs as a job by now)
            output += lines.get(timeout=60)
        sandbox_id = re.search(r"\((sb-[0-9a-f]{10})\)", output)
        assert sandbox_id is not None, output
        demo.send_signal(stop)
        assert demo.wait(timeout=60) == 128 + stop, output
    finally:
        demo.kill()
    record = Ledger().get(sandbox_id.group(1))
    assert record.status == "terminated", record
    assert not (local_dir() / "sandboxes" / record.id).exists()


def test_pause_and_resume_for_people_and_for_scripts(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[[providers]]\nname = "pausing"\nclass = "tests.test_lifecycle:PausingProvider"\n\n'
        '[[pools]]\nname = "pauses"\nprovider = "pausing"\n'
    )
    env = server_env(TETHER_CONFIG=str(config))
    up = tether("up", "pausing", "--json", env=env)
    assert up.returncode == 0, up.stderr
    sandbox_id = json.loads(up.stdout)["id"]
    paused = tether("pause", sandbox_id, "--json", env=env)
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout) == {"id": sandbox_id, "name": json.loads(up.stdout)["name"], "status": "paused"}
    resumed = tether("resume", sandbox_id, env=env)
    assert resumed.returncode == 0 and resumed.stdout.startswith("resumed ") and resumed.stdout.endswith(": running\n")
    # its provider's plugin gone from the config: what the ledger knows is still shown
    config.write_text('[[pools]]\nname = "pauses"\nprovider = "local"\n')
    for args in (("info", sandbox_id), ("info", sandbox_id, "--json")):
        shown = tether(*args, env=env)
        assert shown.returncode == 0 and sandbox_id in shown.stdout, shown.stderr
        assert "provider 'pausing', which is no longer configured" in shown.stdout, shown.stdout
    assert json.loads(tether("info", sandbox_id, "--json", env=env).stdout)["capabilities"] is None
    config.write_text(
        '[[providers]]\nname = "pausing"\nclass = "tests.test_lifecycle:PausingProvider"\n\n'
        '[[pools]]\nname = "pauses"\nprovider = "pausing"\n'
    )
    assert tether("down", sandbox_id, env=env).returncode == 0


def test_people_get_a_progress_bar_and_tables(tmp_path: Path) -> None:
    """On a terminal, cp draws a progress bar on stderr that ends at 100%; without one it stays
    silent. `ls` and `pools` print aligned tables with headers."""
    up = tether("up", "local", "--name", "cli-people")
    assert up.returncode == 0, up.stderr
    sandbox_id = up.stdout.strip()
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(8 * 1024 * 1024))

    controller, terminal = pty.openpty()
    drawn = bytearray()
    reader = threading.Thread(target=_drain, args=(controller, drawn))
    reader.start()
    copy = subprocess.run(
        [sys.executable, "-m", "tools.cli", "cp", str(local), f"{sandbox_id}:big.bin"],
        stdout=subprocess.PIPE,
        stderr=terminal,
        cwd=ROOT,
        env=server_env(),
        timeout=120,
    )
    os.close(terminal)
    reader.join(10)
    assert copy.returncode == 0 and b"copied 8388608 bytes" in copy.stdout
    bar = drawn.decode().replace("\r\n", "\n")
    assert f"{local} -> {sandbox_id}:big.bin [" in bar and "100.0%" in bar and bar.count("\r") >= 1
    assert "##############################" in bar and bar.endswith("\n")  # full, then the line ends
    quiet = tether("cp", f"{sandbox_id}:big.bin", str(tmp_path / "back.bin"))  # stderr is a pipe here
    assert quiet.returncode == 0 and quiet.stderr == ""

    listing = tether("ls").stdout.splitlines()
    assert listing[0].split()[:2] == ["ID", "NAME"]
    row = next(line for line in listing if line.startswith(sandbox_id))
    assert row.split()[1] == "cli-people" and "running" in row.split()
    columns = [listing[0].index(h) for h in listing[0].split()]
    assert all(row[c - 1] == " " for c in columns[1:])  # aligned: each column starts after a space
    pools = tether("pools").stdout.splitlines()
    assert pools[0].split()[0] == "NAME" and any(line.split()[0] == "local" for line in pools[1:])
    assert tether("down", sandbox_id).returncode == 0


def _drain(fd: int, into: bytearray) -> None:
    with contextlib.suppress(OSError):  # EIO once the terminal side is closed
        while chunk := os.read(fd, 4096):
            into.extend(chunk)
    os.close(fd)


def test_exec_and_cp_at_the_edges(tmp_path: Path) -> None:
    """A reader that goes away, SIGTERM, bad timeouts, local paths that are not plain files: each a
    clear end, never a traceback, and nothing left running on the box."""
    up = tether("up", "local", "--name", "edges")
    assert up.returncode == 0, up.stderr
    box = up.stdout.strip()
    try:
        for bad in ("nan", "inf", "0", "-1", "soon"):
            refused = tether("exec", box, "--timeout", bad, "--", "true")
            assert refused.returncode == 2 and "positive number of seconds" in refused.stderr, refused.stderr
        unknown = tether("exec", box, "--json", "--", "true")  # not run as the command `--json`
        assert unknown.returncode == 2 and "no option --json" in unknown.stderr, unknown.stderr
        # `tether exec … | head -1`: the exit status of a writer whose reader left, and no traceback
        head = subprocess.run(
            f"{shlex.quote(sys.executable)} -m tools.cli exec {box} -- 'seq 1 200000; echo err >&2' | head -1",
            shell=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=server_env(),
            timeout=120,
        )
        assert head.stdout == "1\n" and "Traceback" not in head.stderr, head.stderr
        # Output shows as it comes; Ctrl-C and SIGTERM end the remote command too
        for stop, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            marker = leaf_sleep()
            killed = tether_process("exec", box, "--", f"echo started; {marker}", stderr=None, text=False)
            assert killed.stdout is not None
            shown, _, _ = select.select([killed.stdout], [], [], 30)
            assert shown and killed.stdout.readline() == b"started\n", "exec should show output while it runs"
            asyncio.run(wait_until_running(marker, 30))
            killed.send_signal(stop)
            assert killed.wait(30) == code
            assert asyncio.run(wait_until_gone(marker)) == []
            killed.stdout.close()
        # cp: into 'dir/' (created), and nothing over or out of a pipe or a device
        assert tether("exec", box, "--", "echo hi > f.txt").returncode == 0
        assert tether("cp", f"{box}:f.txt", f"{tmp_path}/made/").returncode == 0
        assert (tmp_path / "made" / "f.txt").read_text() == "hi\n"
        os.mkfifo(tmp_path / "fifo")
        refused = tether("cp", f"{box}:f.txt", str(tmp_path / "fifo"))
        assert refused.returncode == 2 and "named pipe" in refused.stderr
        refused = tether("cp", "/dev/zero", f"{box}:zero")
        assert refused.returncode == 2 and "character device" in refused.stderr
        for stream in ([f"{box}:f.txt", "-"], ["-", f"{box}:g.txt"]):  # not a file named '-'
            refused = tether("cp", *stream)
            assert refused.returncode == 2 and "not standard input or output" in refused.stderr, refused.stderr
        directory = tether("cp", str(tmp_path / "made"), f"{box}:made")
        assert directory.returncode == 2 and "copies are of single files" in directory.stderr, directory.stderr
        denied = tether("cp", f"{box}:f.txt", "/proc/no-such-dir/f.txt")  # an OSError here: a message
        assert denied.returncode == 2 and denied.stderr.startswith("tether: ") and "Traceback" not in denied.stderr
        assert "/proc/no-such-dir/f.txt: cannot write it on this machine" in denied.stderr, denied.stderr
        assert ".part" not in denied.stderr  # (tether's temp file is not what was asked for)
        missing = tether("cp", f"{box}:no-such.txt", f"{tmp_path}/not-made/")
        assert missing.returncode == 2 and "no such file" in missing.stderr
        assert not (tmp_path / "not-made").exists()  # (a failed copy leaves no directory behind)
        in_the_way = tether("cp", f"{box}:f.txt", f"{tmp_path}/made/f.txt/x")  # (a file where a directory goes)
        assert in_the_way.returncode == 2 and "x: cannot write it on this machine: not a directory" in in_the_way.stderr
        for empty in ([f"{box}:f.txt", ""], ["", f"{box}:g.txt"]):
            refused = tether("cp", *empty)
            assert refused.returncode == 2 and "an empty path names no file" in refused.stderr, refused.stderr
        # a directory is not copied into itself, nor anywhere below itself
        assert tether("exec", box, "--", "mkdir -p d/sub && echo x > d/sub/f").returncode == 0
        for into in ("d", "d/", "d/sub/new", "./d/sub"):
            refused = tether("cp", "-r", f"{box}:d", f"{box}:{into}")
            assert refused.returncode == 2 and "into itself" in refused.stderr, refused.stderr
        assert tether("exec", box, "--", "find d | sort").stdout == "d\nd/sub\nd/sub/f\n"
    finally:
        tether("down", box)


def test_a_config_mistake_keeps_no_one_from_the_sandboxes_that_exist(tmp_path: Path) -> None:
    """A typo in config.toml (a section that has nothing to do with the sandbox) refuses new
    sandboxes, saying what is wrong; what runs, and costs, can still be listed, used and torn down."""
    config = tmp_path / "config.toml"
    env, dir_env = server_env(TETHER_CONFIG=str(config)), server_env(TETHER_CONFIG=str(tmp_path))
    box = tether("up", "local", env=env).stdout.strip()
    try:
        for mistake, named in {
            '[[channels]]\nkind = "telegram"\nurl = "http://x"\n': "[[channels]] #1",
            '[[pools]]\nname = "p"\nprovider = "local"\nbogus = 1\n': "bogus",
            "[relay]\nurl = 3\n": "[relay]: host: Field required",
            '[relay]\nhost = "r.example"\nurl_template = "http://{host}/{sub}"\n': "can name only {host} and {port}",
            '[relay]\nhost = "r.example"\nurl_pattern = "(http"\n': "'(http' is not a regular expression",
            "[[pools]\n": "not valid TOML",
            '[[providers]]\nname = "x"\nclass = "json:JSONDecoder"\n[[pools]]\nname = "p"\nprovider = "x"\n': (
                "not a class derived from providers.Provider"
            ),
        }.items():
            config.write_text(mistake)
            for making in (("up", "local"), ("pools",)):  # (pools shows what up would choose from)
                refused = tether(*making, env=env)
                assert refused.returncode == 2 and named in refused.stderr and "Traceback" not in refused.stderr, making
            listed = tether("ls", "--json", env=env)
            assert listed.returncode == 0 and box in listed.stdout, listed.stderr
            ran = tether("exec", box, "--", "echo still here", env=env)
            assert (ran.returncode, ran.stdout) == (0, "still here\n"), ran.stderr
            assert named in ran.stderr and "warning" in ran.stderr
        config.write_bytes(b"\xff\xfe")
        for where, named in ((env, "config.toml is not valid TOML: 'utf-8' codec"), (dir_env, "is a directory")):
            refused = tether("up", "local", env=where)
            assert refused.returncode == 2 and named in refused.stderr, refused.stderr
            ran = tether("exec", box, "--", "true", env=where)
            assert ran.returncode == 0 and named in ran.stderr, ran.stderr
        assert tether("down", box, env=env).returncode == 0
        assert json.loads(tether("info", box, "--json", env=env).stdout)["status"] == "terminated"
    finally:
        tether("down", box)


def test_tether_exec_leaves_none_of_its_output_on_the_box() -> None:
    """Each `tether exec` opens the sandbox and closes it: its shell's files (the command's whole
    output) go as it ends, however soon this process exits after (not a week later, by the sweep)."""
    box = tether("up", "local").stdout.strip()
    try:
        # Eight at once: the machine busy, as when the shell was killed before it acted on its TERM.
        argv = [sys.executable, "-m", "tools.cli", "exec", box, "--", "seq 1 50000"]
        piped = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        runs = [subprocess.Popen(argv, cwd=ROOT, env=server_env(), **piped) for _ in range(8)]
        for run in runs:
            out, err = run.communicate(timeout=120)
            assert run.returncode == 0 and out.endswith("\n50000\n"), err
        assert sorted(p.name for p in (local_dir() / "sandboxes" / box / "tether" / "run").iterdir()) == []
    finally:
        tether("down", box)


def test_an_open_tether_ssh_session_is_activity_and_an_expired_sandbox_gets_none(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[defaults]\nidle_timeout_s = 1\n")
    env = server_env(TETHER_CONFIG=str(config))
    box = tether("up", "local", env=env).stdout.strip()
    reaper = Fleet(config={})
    session: subprocess.Popen[str] | None = None
    expiring = ""
    try:
        session = tether_process("ssh", box, env=env, stdin=subprocess.PIPE)
        assert session.stdin is not None
        session.stdin.write("sleep 2.5; echo still-here\n")
        session.stdin.close()
        time.sleep(1.8)  # (past the idle timeout, the session still open)
        assert box not in [r for r, _ in asyncio.run(reaper.reap())]
        assert session.wait(timeout=60) == 0 and session.stdout is not None
        assert "still-here" in session.stdout.read()
        time.sleep(1.2)
        assert box in [r for r, _ in asyncio.run(reaper.reap())]  # (once it ended, idle like any other)
        expiring = tether("up", "local", "--ttl", "0.5").stdout.strip()
        time.sleep(0.8)
        listed = tether("ls")
        assert any(expiring in line and "running (expired)" in line for line in listed.stdout.splitlines())
        refused = tether("ssh", expiring)
        assert refused.returncode == 2 and "expired" in refused.stderr, refused.stderr
        assert reaper.ledger.get(expiring).status == "terminated"
    finally:
        if session is not None and session.poll() is None:
            session.kill()
            session.wait()
        for made in filter(None, (box, expiring)):
            tether("down", made)
        asyncio.run(reaper.close())


def test_a_local_sandbox_whose_directory_was_removed_says_so() -> None:
    box = tether("up", "local").stdout.strip()
    try:
        shutil.rmtree(local_dir() / "sandboxes" / box / "work")
        refused = tether("exec", box, "--", "true")
        assert refused.returncode == 2 and "directory" in refused.stderr and "is gone" in refused.stderr, refused.stderr
        assert "authentication" not in refused.stderr and f"tether down {box}" in refused.stderr
        assert tether("down", box).returncode == 0
    finally:
        tether("down", box)


def test_forget_host_reads_ipv6_and_refuses_bad_ports() -> None:
    unknown = tether("forget-host", "::1")
    assert unknown.returncode == 2 and "no host key pinned for ::1:22" in unknown.stderr, unknown.stderr
    assert "no host key pinned for ::1:2222" in tether("forget-host", "[::1]:2222").stderr
    for bad in ("127.0.0.1:99999999999999999999", "host:0", "host:x"):
        refused = tether("forget-host", bad)
        assert refused.returncode == 2 and "port 1-65535" in refused.stderr, refused.stderr


def test_an_unknown_option_is_refused_with_the_commands_own_usage() -> None:
    refused = tether("ls", "--bogus")
    assert refused.returncode == 2 and "usage: tether ls" in refused.stderr, refused.stderr
    assert "unrecognized arguments: --bogus" in refused.stderr


def test_exec_runs_no_longer_than_the_sandboxs_ttl() -> None:
    """No reaper runs in a CLI command: exec itself stops at the TTL, and the sandbox ends."""
    box = tether("up", "local", "--ttl", "3").stdout.strip()
    started = time.monotonic()
    cut = tether("exec", box, "--", "echo start; sleep 60; echo never")
    assert cut.returncode == 2 and "TTL ran out" in cut.stderr, cut.stderr
    assert cut.stdout == "start\n" and time.monotonic() - started < 30
    assert json.loads(tether("info", box, "--json").stdout)["status"] == "terminated"


def test_durations_read_as_people_say_them() -> None:
    """A sandbox that lived a second and a bit is not shown as 0s."""
    assert [duration(s) for s in (0.63, 1.1, 42.9, 75, 3700)] == ["0.6s", "1.1s", "42s", "1m15s", "1h01m"]
