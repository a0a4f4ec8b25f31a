"""`run`: persistent shells, process groups, timeouts, output caps, cwd and env."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shlex
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import ConnectionPool, Sandbox, SSHEndpoint, channels
from sandbox.errors import (
    CommandTimeout,
    ConnectError,
    ConnectionLost,
    FileNotFound,
    InvalidArgument,
    PermissionDenied,
)
from tests.conftest import endpoint_for
from tests.processes import (
    ArgvWatch,
    leaf_sleep,
    output_until_exit,
    processes_matching,
    wait_until_gone,
    wait_until_running,
)
from tests.sshd import SSHD, ensure_account


async def test_streams_are_kept_apart_with_the_exit_code(sb: Sandbox) -> None:
    r = await sb.run("echo out; echo err >&2; exit 7")
    assert (r.stdout, r.stderr, r.exit_code, r.timed_out, r.truncated) == ("out\n", "err\n", 7, False, False)


async def test_stdin_is_dev_null(sb: Sandbox) -> None:
    r = await sb.run("cat; echo done")
    assert r.stdout == "done\n"


async def test_the_directory_a_command_ends_in_is_the_next_ones_start(sb: Sandbox) -> None:
    start = await sb.cwd()
    await sb.run("mkdir -p 'sub dir' && cd 'sub dir'")
    r = await sb.run("pwd")
    assert r.stdout.strip() == f"{start}/sub dir" == r.cwd == await sb.cwd()


async def test_a_directory_named_with_a_byte_that_is_not_utf8_carries_over(sb: Sandbox) -> None:
    """In a UTF-8 locale bash's `read` takes the newline after such a byte for part of it: the
    shell reads the cwd it records as bytes."""
    assert (await sb.run("locale charmap")).stdout == "UTF-8\n"  # (the test account's locale)
    r = await sb.run("mkdir \"caf$(printf '\\351')\" && cd \"caf$(printf '\\351')\"")
    assert r.cwd.endswith("/caf\udce9") and r.cwd == await sb.cwd()
    r = await sb.run("pwd")
    assert (r.stdout[-5:], r.stderr) == ("caf\ufffd\n", "") and r.cwd.endswith("/caf\udce9")
    assert (await sb.run('printf %s "${LC_ALL-unset}"')).stdout == "unset"  # (left as it was)


async def test_cwd_and_env_per_call(sb: Sandbox) -> None:
    r = await sb.run('printf "%s|%s" "$PWD" "$GREETING"', cwd="/tmp", env={"GREETING": "it's $(x) `y`"})
    assert r.stdout == "/tmp|it's $(x) `y`"
    assert (await sb.run("printenv GREETING")).exit_code == 1  # env does not leak into later calls


@pytest.mark.parametrize("flavour", ["sshd", "dash_sshd"])
async def test_a_command_defining_command_pwd_or_cd_does_not_change_the_cwd_recorded(
    flavour: str, request: pytest.FixtureRequest, client_key: Path, pool: ConnectionPool
) -> None:
    """The cwd is recorded as the command's shell ends: functions of its own named command, pwd,
    cd or builtin must not answer for the shell's (bash runs commands in a subshell, dash in a new
    shell: both)."""
    server: SSHD = request.getfixturevalue(flavour)
    async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
        for defined in ("command() { echo hijack; }", "pwd() { echo hijack; }", "builtin() { echo hijack; }"):
            ran = await box.run(f"{defined}; cd /tmp")
            assert ran.cwd == "/tmp" and await box.cwd() == "/tmp", (defined, ran.cwd)
            await box.run("cd /")


@pytest.mark.parametrize("flavour", ["sshd", "dash_sshd", "busybox_sshd", "zsh_sshd", "mksh_sshd"])
async def test_what_a_command_left_running_writes_later_is_in_no_later_commands_output(
    flavour: str, request: pytest.FixtureRequest, client_key: Path, pool: ConnectionPool
) -> None:
    """A command that leaves something running (`(sleep; echo) &`) returns at once, and what that
    writes afterwards does not turn up in the results of the commands the same shell runs next."""
    server: SSHD = request.getfixturevalue(flavour)
    async with Sandbox(endpoint_for(server, client_key), pool=pool, shells=1) as box:
        left = await box.run("echo first; (for i in 1 2 3; do sleep 0.3; echo LEAK$i; echo ERR$i >&2; done) &")
        assert (left.stdout, left.stderr, left.exit_code) == ("first\n", "", 0)
        later = [await box.run(f"sleep 0.4; echo next{i}") for i in range(3)]
        assert [(r.stdout, r.stderr) for r in later] == [(f"next{i}\n", "") for i in range(3)]
        # and a long output of its own is still kept whole, and the shell goes on as before
        long = await box.run("seq 1 20000", max_chars=1000)
        assert long.stdout_path and (await box.read_bytes(long.stdout_path)).decode().split() == [
            str(i) for i in range(1, 20001)
        ]
        assert (await box.run("echo after")).stdout == "after\n"


async def test_a_command_that_stays_put_does_not_undo_a_cd_made_beside_it(sb: Sandbox) -> None:
    """Two runs at once: the one that cds ends first; the one that never moved, ending later, says
    nothing of where the sandbox is (it used to put the old directory back)."""
    await sb.run("cd ~")
    home = await sb.cwd()
    slow = asyncio.ensure_future(sb.run("sleep 1; echo built"))
    await asyncio.sleep(0.2)
    moved = await sb.run("cd /tmp")
    assert (await slow).cwd == home and moved.cwd == "/tmp"
    assert await sb.cwd() == "/tmp"
    assert (await sb.run("pwd")).stdout == "/tmp\n"


async def test_relative_cwd_is_relative_to_the_sandbox_directory(sb: Sandbox) -> None:
    await sb.run("mkdir -p a/b")
    here = await sb.cwd()
    assert (await sb.run("pwd", cwd="a/b")).stdout.strip() == f"{here}/a/b"


async def test_bad_env_names_are_refused_before_anything_runs(sb: Sandbox) -> None:
    with pytest.raises(InvalidArgument, match="invalid environment variable name"):
        await sb.run("true", env={"A;rm -rf ~": "x"})
    with pytest.raises(InvalidArgument, match="A's value must be text"):
        await sb.run("true", env={"A": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidArgument, match="UID is read-only in the sandbox's shell"):
        await sb.run("true", env={"UID": "0"})
    with pytest.raises(InvalidArgument, match="not int"):
        await sb.run(123)  # type: ignore[arg-type]
    for timeout in ("5", float("nan"), 0):
        with pytest.raises(InvalidArgument, match="timeout must be a positive number of seconds"):
            await sb.run("true", timeout=timeout)  # type: ignore[arg-type]


async def test_a_cwd_that_does_not_exist_is_an_error_and_nothing_runs(sb: Sandbox) -> None:
    before = await sb.cwd()
    with pytest.raises(FileNotFound, match="did not run"):
        await sb.run("touch ran-anyway", cwd="no/such/dir")
    await sb.write("plain.txt", "x")
    with pytest.raises(InvalidArgument, match="not a directory"):
        await sb.run("touch ran-anyway", cwd="plain.txt")
    assert await sb.cwd() == before and not await sb.exists(f"{await sb.home()}/ran-anyway")
    assert not await sb.exists("ran-anyway")


async def test_env_names_with_a_trailing_newline_are_refused(sb: Sandbox) -> None:
    with pytest.raises(InvalidArgument, match="invalid environment variable name"):
        await sb.run("true", env={"FOO\n": "touch pwned"})


async def test_command_output_on_the_box_is_private_to_its_user(sb: Sandbox) -> None:
    await sb.run("echo secret; echo more >&2")
    tether_dir = (await sb._p.executor.info()).tether_dir
    assert (await sb.stat(tether_dir)).mode == 0o700
    job = await sb.start_job("echo job-secret")
    await sb.job_output(job.id, wait_ms=5000)
    assert (await sb.stat(tether_dir)).mode == 0o700


async def test_a_removed_working_directory_falls_back_to_home(sb: Sandbox) -> None:
    await sb.run("mkdir doomed && cd doomed")
    await sb.run(["rmdir", await sb.cwd()])
    job = await sb.start_job("pwd")  # a job too, as run does
    output = await output_until_exit(sb, job.id)
    assert (output.stdout, output.exit_code) == (f"{await sb.home()}\n", 0) and "is gone" in output.stderr
    r = await sb.run("pwd")
    assert r.stdout.strip() == await sb.home()
    assert "is gone" in r.stderr


async def test_a_cwd_it_may_not_enter_is_named_as_such(sb: Sandbox) -> None:
    await sb.run("mkdir shut && chmod 000 shut")
    try:
        with pytest.raises(PermissionDenied, match=r"may not enter.*did not run"):
            await sb.run("touch ran", cwd="shut")
        job = await sb.start_job("touch ran", cwd="shut")
        output = await output_until_exit(sb, job.id)
        assert output.exit_code == 125 and "cannot enter" in output.stderr
    finally:
        await sb.run("chmod 700 shut")


async def test_argv_elements_are_never_interpreted(sb: Sandbox) -> None:
    hostile = ["$(touch pwned)", "`touch pwned`", "; touch pwned", "-n", "a'b\"c", "line\nbreak", "é ☃"]
    r = await sb.run(["printf", "%s\\0", *hostile])
    assert r.stdout.split("\0")[:-1] == hostile
    assert not await sb.exists("pwned")


async def test_login_profile_path_is_there(sb: Sandbox) -> None:
    r = await sb.run("echo $SHLVL; command -v ls")
    shlvl, ls = r.stdout.split()
    assert ls.endswith("/ls") and int(shlvl) >= 1


async def test_timeout_kills_the_whole_process_tree(sb: Sandbox) -> None:
    marker = f"tether-tree-{secrets.token_hex(4)}"
    started = time.monotonic()
    r = await sb.run(f"echo before; sh -c 'sleep 1000 & sleep 1000' {marker}; echo never", timeout=1)
    assert r.timed_out and r.exit_code is None
    assert r.stdout == "before\n"  # the output so far
    assert time.monotonic() - started < 10
    assert await wait_until_gone(marker) == []


async def test_timeout_also_kills_background_children_of_the_command(sb: Sandbox) -> None:
    marker = f"tether-bg-{secrets.token_hex(4)}"
    r = await sb.run(f"sleep 1000 {marker} & sleep 1000", timeout=0.5)
    assert r.timed_out
    # `sleep 1000 MARKER` fails at once on GNU sleep (bad interval); use a shell to carry the marker
    r = await sb.run(f"sh -c 'sleep 1000' {marker} & sh -c 'sleep 1000' {marker}", timeout=0.5)
    assert r.timed_out
    assert await wait_until_gone(marker) == []


async def cancel_once_running(sb: Sandbox, command: str, marker: str) -> None:
    """Run `command`, cancel the call once `marker` runs, and check that nothing of it is left."""
    task = asyncio.ensure_future(sb.run(command))
    await wait_until_running(marker)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_until_gone(marker) == []


async def test_a_timeout_reaches_what_left_the_process_group(sb: Sandbox) -> None:
    """GNU timeout moves itself and its command into a group of their own (`timeout 600 pytest`)."""
    marker = leaf_sleep()  # on the leaf: what a kill of the parent alone would leave behind
    r = await sb.run(f"timeout 500 sh -c '{marker}; true'; echo after", timeout=0.5)
    assert r.timed_out
    assert await wait_until_gone(marker) == []
    await cancel_once_running(sb, f"timeout 500 sh -c '{marker}; true'", marker)


async def test_cancelling_the_coroutine_kills_the_remote_process(sb: Sandbox) -> None:
    marker = leaf_sleep()
    await cancel_once_running(sb, f"sh -c '{marker} & {marker}; true'", marker)
    # and the sandbox is still usable
    assert (await sb.run("echo ok")).stdout == "ok\n"


async def test_a_cancel_before_the_command_reports_its_pid_still_kills_it(
    sb: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel lands in the round trip between sending the command and hearing its pid."""
    from sandbox.shell import PersistentShell

    marker = f"tether-early-{secrets.token_hex(4)}"
    await sb.run("true")  # a warm shell
    started = PersistentShell.started
    run: asyncio.Task[object] | None = None

    async def cancelled_while_waiting(shell: PersistentShell, command_id: str) -> int:
        if asyncio.current_task() is run:
            run.cancel()
        return await started(shell, command_id)

    monkeypatch.setattr(PersistentShell, "started", cancelled_while_waiting)
    run = asyncio.ensure_future(sb.run(f"sh -c 'sleep 1000' {marker}"))
    with pytest.raises(asyncio.CancelledError):
        await run
    assert await wait_until_gone(marker) == []
    assert (await sb.run("echo ok")).stdout == "ok\n"


async def test_long_output_is_capped_head_and_tail_with_the_full_stream_kept(sb: Sandbox) -> None:
    r = await sb.run("seq 1 100000; seq 1 5 >&2")
    assert r.truncated and r.stdout_path and r.stderr_path is None
    assert r.stdout.startswith("1\n2\n3\n")
    assert "100000" in r.stdout and "bytes not shown" in r.stdout
    note = f"[output cut to 30000 characters; the whole stream is in {r.stdout_path}: read it in windows]"
    assert r.stdout.endswith(note)
    assert len(r.stdout) <= 30_000 and len(r.stderr) <= 30_000  # the markers count too
    assert r.stderr == "1\n2\n3\n4\n5\n"
    full = await sb.read_text(r.stdout_path)
    assert full.split() == [str(i) for i in range(1, 100001)]


async def test_output_is_handed_over_as_it_comes_whole_and_uncapped(sb: Sandbox) -> None:
    got: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    first_seen: list[float] = []

    def on_output(stream: str, data: bytes) -> None:
        if not first_seen:
            first_seen.append(time.monotonic())
        got[stream].append(data)

    r = await sb.run("printf 'first\\n'; sleep 2; seq 1 300000; printf '\\377err' >&2", on_output=on_output)
    ended = time.monotonic()
    assert (r.exit_code, r.stdout, r.stderr, r.truncated) == (0, "", "", False)
    assert ended - first_seen[0] > 1.5, "the first line should have come while the command still ran"
    expected = "first\n" + "".join(f"{i}\n" for i in range(1, 300001))
    assert b"".join(got["stdout"]) == expected.encode()  # (over 2 MB: beyond the cap, and many reads)
    assert b"".join(got["stderr"]) == b"\xfferr"  # bytes as they are, not decoded
    assert len(got["stdout"]) > 1
    # and the shell goes on as usual
    assert (await sb.run("echo next")).stdout == "next\n"


async def test_a_failing_output_reader_stops_the_command(sb: Sandbox) -> None:
    """`tether exec … | head -1`: once our reader is gone, the remote command must not run on."""
    marker = leaf_sleep()

    def reader_gone(stream: str, data: bytes) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        await sb.run(f"echo hi; {marker}", on_output=reader_gone, timeout=60)
    assert await wait_until_gone(marker) == []
    assert (await sb.run("echo ok")).stdout == "ok\n"


async def test_a_streamed_run_that_times_out_still_delivers_what_it_printed(sb: Sandbox) -> None:
    got: list[bytes] = []
    r = await sb.run("echo before; sleep 30", timeout=0.5, on_output=lambda _, data: got.append(data))
    assert r.timed_out and b"".join(got) == b"before\n"
    for missing in ("no/such/dir", "d" * 250):  # a named cwd that is missing: nothing runs, as without streaming
        with pytest.raises(FileNotFound):
            await sb.run("echo never", cwd=missing, on_output=lambda _, data: got.append(data))


@pytest.fixture
def slow_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read of a followed output file takes a 30 ms round trip, as over a real link."""
    import sandbox.follow

    real = sandbox.follow.read_upto

    async def read_upto(f: object, size: int, offset: int = 0) -> bytes:
        await asyncio.sleep(0.03)
        return await real(f, size, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(sandbox.follow, "read_upto", read_upto)


async def test_output_that_never_pauses_is_still_handed_over_as_it_comes(sb: Sandbox, slow_reads: None) -> None:
    """A line every 10 ms, read at 30 ms a request: each poll takes what there was when it began."""
    seen: list[float] = []
    r = await sb.run(
        "i=0; while [ $i -lt 200 ]; do echo $i; sleep 0.01; i=$((i+1)); done",
        on_output=lambda _, data: seen.append(time.monotonic()),
    )
    ended = time.monotonic()
    assert r.exit_code == 0 and len(seen) > 3 and ended - seen[0] > 1, (len(seen), ended - seen[0])


async def test_a_writer_left_behind_does_not_keep_a_streamed_run_from_returning(sb: Sandbox, slow_reads: None) -> None:
    got: list[bytes] = []
    writer = "sh -c 'while :; do echo more; sleep 0.01; done'"
    try:
        async with asyncio.timeout(20):
            r = await sb.run(f"{writer} & echo pid $!", on_output=lambda _, data: got.append(data), timeout=60)
        # (the writer may get its first line out before `echo pid` does)
        assert r.exit_code == 0 and re.search(rb"^pid \d+$", b"".join(got), re.MULTILINE)
    finally:
        if said := re.search(rb"^pid (\d+)$", b"".join(got), re.MULTILINE):
            await sb.run(["kill", said[1].decode()])


async def test_a_streamed_command_that_removes_tethers_directory_still_ends_well(sb: Sandbox) -> None:
    home = (await sb.run("cd && pwd")).stdout.strip()
    r = await sb.run("rm -rf .tether/run; echo hi; sleep 0.3", cwd=home, on_output=lambda _, data: None)
    assert r.exit_code == 0
    got: list[bytes] = []
    await sb.run("echo again", on_output=lambda _, data: got.append(data))  # (the next one streams again)
    assert got == [b"again\n"]


async def test_kept_output_older_than_a_week_is_swept_when_shells_start(
    host_endpoint: SSHEndpoint, pool: ConnectionPool
) -> None:
    async with Sandbox(host_endpoint, pool=pool) as first:
        run_dir = (await first._p.executor.info()).run_dir
        await first.run(f"cd {run_dir} && echo x > old.o && touch -d '8 days ago' old.o && echo y > recent.o")
    async with Sandbox(host_endpoint, pool=pool) as second:
        # (the sweep runs in the background of the new shell: the shell is ready before it ends)
        deadline = time.monotonic() + 20
        while "old.o" in (listing := (await second.run(["ls", run_dir])).stdout.split()):
            assert time.monotonic() < deadline, "old.o was not swept"
            await asyncio.sleep(0.1)
        assert "recent.o" in listing
        await second.run(["rm", f"{run_dir}/recent.o"])


async def test_an_unwritable_tether_dir_falls_back_to_the_temp_dir(
    host_endpoint: SSHEndpoint, pool: ConnectionPool
) -> None:
    async with Sandbox(host_endpoint, pool=pool, tether_dir="/proc/tether-cannot-be-here") as box:
        r = await box.run("echo works; echo err >&2")
        assert (r.exit_code, r.stdout, r.stderr) == (0, "works\n", "err\n")
        tether_dir = (await box._p.executor.info()).tether_dir
        assert tether_dir.startswith("/tmp/tether-") and (await box.stat(tether_dir)).mode == 0o700
        job = await box.start_job("echo job")
        assert (await box.job_output(job.id, wait_ms=5000)).stdout == "job\n"


async def test_a_symlink_planted_as_the_temp_fallback_is_refused(
    sshd: SSHD, client_key: Path, pool: ConnectionPool
) -> None:
    """Another user of the box links /tmp/tether-UID to a directory of ours (so that it passes as
    ours), meaning to swing it to one of theirs later: tether must not write there."""
    fallback = Path(f"/tmp/tether-{sshd.account.uid}")
    aside = fallback.with_name(f"{fallback.name}.aside-{secrets.token_hex(4)}")
    ours = sshd.account.home / f"planted-{secrets.token_hex(4)}"
    ours.mkdir()
    os.chown(ours, sshd.account.uid, sshd.account.gid)
    if fallback.exists() or fallback.is_symlink():
        fallback.rename(aside)
    try:
        fallback.symlink_to(ours)
        endpoint = endpoint_for(sshd, client_key)
        with pytest.raises(ConnectError, match="no directory tether can write"):
            async with Sandbox(endpoint, pool=pool, tether_dir="/proc/tether-cannot-be-here") as box:
                await box.run("true")
        assert list(ours.iterdir()) == []
    finally:
        fallback.unlink(missing_ok=True)
        if aside.exists():
            aside.rename(fallback)
        shutil.rmtree(ours, ignore_errors=True)


async def test_output_cap_counts_characters_not_bytes(sb: Sandbox) -> None:
    r = await sb.run("printf 'é%.0s' $(seq 1 20000)", max_chars=30_000)
    assert r.stdout == "é" * 20000 and not r.truncated


async def test_non_utf8_output_does_not_break_decoding(sb: Sandbox) -> None:
    r = await sb.run(r"printf 'a\377b'")
    assert r.stdout == "a\ufffdb"


async def test_concurrent_runs_use_several_shells(sb: Sandbox) -> None:
    started = time.monotonic()
    results = await asyncio.gather(*(sb.run("sleep 1; echo $$") for _ in range(4)))
    assert all(r.exit_code == 0 for r in results)
    assert time.monotonic() - started < 3  # in parallel (about 1 s), not one after another (4 s)


async def test_a_short_command_does_not_wait_for_long_ones_holding_every_shell(
    host_endpoint: SSHEndpoint, pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four long runs hold the four shells: a fifth caller gets a shell of its own after waiting
    BURST_AFTER_S, and the surplus goes once the long runs give theirs back."""
    monkeypatch.setattr(channels, "BURST_AFTER_S", 0.3)
    tether_dir = f"~/.tether/t-{secrets.token_hex(3)}"
    async with Sandbox(host_endpoint, pool=pool, tether_dir=tether_dir, shells=4) as box:
        run_dir = (await box.run(f"cd {tether_dir}/run && pwd")).stdout.strip()
        marker = leaf_sleep()
        long_runs = [asyncio.ensure_future(box.run(f"{marker}; true", timeout=3)) for _ in range(4)]
        deadline = time.monotonic() + 10
        while len(processes_matching(marker)) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(processes_matching(marker)) == 4  # (every shell is busy)
        started = time.monotonic()
        quick = await box.run("echo quick")
        assert quick.stdout == "quick\n" and time.monotonic() - started < 2  # (not after the long ones: 3 s)
        assert not any(run.done() for run in long_runs)
        assert all(run.timed_out for run in await asyncio.gather(*long_runs))
        deadline = time.monotonic() + 10
        while (shells := _shells_in(run_dir)) > 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert shells == 4
        await box.run(["rm", "-rf", run_dir.rsplit("/", 1)[0]], cwd="/")


def _shells_in(run_dir: str) -> int:
    """The shells alive on this machine (the box) with output files in `run_dir` (each removes its
    own when it exits)."""
    return len({name.name.split(".", 1)[0] for name in Path(run_dir).iterdir() if name.name.count(".") == 1})


async def test_raw_output_larger_than_one_sftp_request_comes_back_whole(sb: Sandbox) -> None:
    script = "i=0; while [ $i -lt 40000 ]; do printf '%07d\\n' $i; i=$((i+1)); done"
    whole = await sb.exec_raw(["sh", "-c", script])
    assert whole.stdout == b"".join(b"%07d\n" % i for i in range(40000)) and not whole.stdout_truncated
    cut = await sb.exec_raw(["sh", "-c", script], max_bytes=200_000)
    assert cut.stdout == whole.stdout[:200_000] and cut.stdout_truncated


async def test_a_raw_command_that_times_out_raises_command_timeout(sb: Sandbox) -> None:
    marker = leaf_sleep()
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match=r"timed out after 0\.5s and was killed"):
        await sb.exec_raw(["sh", "-c", f"{marker}; true"], timeout=0.5)
    assert time.monotonic() - started < 5
    assert await wait_until_gone(marker) == []


async def test_empty_and_nul_commands_are_refused(sb: Sandbox) -> None:
    with pytest.raises(InvalidArgument):
        await sb.run("   ")
    with pytest.raises(InvalidArgument):
        await sb.run("echo a\0b")


async def test_user_exit_and_exec_do_not_break_the_shell(sb: Sandbox) -> None:
    assert (await sb.run("exit 3")).exit_code == 3
    assert (await sb.run("cd /tmp; trap 'echo bye' EXIT; exit 5")).exit_code == 5
    start = await sb.cwd()
    trapped = await sb.run("mkdir -p trap-dir && cd trap-dir; trap 'echo bye' EXIT; false")
    assert (trapped.stdout, trapped.exit_code, trapped.cwd) == ("bye\n", 1, f"{start}/trap-dir")
    await sb.run("cd ..")
    assert (await sb.run("exec echo replaced")).stdout == "replaced\n"
    # Under bash, commands are forked subshells and $$ is the persistent shell itself: killing it
    # fails that command with a clear error, and the next one gets a fresh shell.
    try:
        assert (await sb.run("kill -9 $$")).exit_code == 137
    except ConnectionLost as exc:
        assert "the next command gets a fresh shell" in str(exc)
    assert (await sb.run("echo alive")).stdout == "alive\n"


@pytest.mark.parametrize("flavour", ["dash_sshd", "busybox_sshd", "zsh_sshd", "mksh_sshd", "slow_sshd"])
async def test_other_login_shells(
    flavour: str, request: pytest.FixtureRequest, client_key: Path, pool: ConnectionPool
) -> None:
    server: SSHD = request.getfixturevalue(flavour)
    async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
        r = await box.run("echo out; echo err >&2; cd /tmp; exit 4")
        assert (r.stdout, r.stderr, r.exit_code, r.cwd) == ("out\n", "err\n", 4, "/tmp")
        assert (await box.run("pwd")).stdout == "/tmp\n"
        # A command's own EXIT trap (a temp file's cleanup) runs, and where it ended is still kept.
        trapped = await box.run("cd /; mark=$(mktemp); trap 'rm -f \"$mark\"; echo cleaned' EXIT; echo in")
        assert (trapped.stdout, trapped.cwd) == ("in\ncleaned\n", "/")
        assert (await box.run("pwd; cd /tmp")).stdout == "/\n"
        # The descriptors the shell holds on its output files are not the command's, nor a job's.
        held = "for n in 7 8; do [ -e /proc/self/fd/$n ] && echo fd $n open; done; true"
        assert (await box.run(held)).stdout == ""
        job = await box.start_job(held)
        assert (await box.job_output(job.id, wait_ms=5000)).stdout == ""
        # Ending where it started, by a detour or under another spelling, is still a place to start from.
        assert (await box.run("cd / && cd /tmp")).cwd == "/tmp"
        assert (await box.run("cd /tmp/ && true")).cwd == "/tmp"
        assert (await box.run("pwd")).stdout == "/tmp\n"
        # Environment names that tether's shell code uses itself change nothing about what runs where.
        shadowing = {"__d": "/", "__s": "echo hijacked", "__c": "/tmp/elsewhere", "__v": "x", "__o": "/tmp/o"}
        r = await box.run("echo ran; pwd", env=shadowing)
        assert (r.stdout, r.cwd) == ("ran\n/tmp\n", "/tmp")
        job = await box.start_job("echo job ran", env={"__s": "echo hijacked", "__j": "/tmp"})
        assert (await box.job_output(job.id, wait_ms=5000)).stdout == "job ran\n"
        hostile = "it's $(x) `y` \\ \n"
        assert (await box.run(f"printf %s {shlex.quote(hostile)}")).stdout == hostile
        # zsh expands a bare `=word` to a command's path: every argument and value is quoted
        assert (await box.run(["printf", "%s|", "=ls", "~", "a=b"])).stdout == "=ls|~|a=b|"
        assert (await box.run('printf %s "$V"', env={"V": "=ls"})).stdout == "=ls"
        marker = f"tether-{flavour}-{secrets.token_hex(4)}"
        timed = await box.run(f"sh -c 'sleep 1000 & sleep 1000' {marker}", timeout=0.5)
        assert timed.timed_out
        assert await wait_until_gone(marker) == []
        # and what moved to a session (and group) of its own
        timed = await box.run(f"setsid sh -c 'sleep 1000' {marker}", timeout=0.5)
        assert timed.timed_out
        assert await wait_until_gone(marker) == []
        # a saved cwd removed behind its back: the next command runs where the login landed
        doomed = f"/tmp/{marker}"
        await box.run(f"mkdir {doomed} && cd {doomed}")
        await box.exec_raw(["rmdir", doomed], cwd="/")  # (leaves the saved cwd alone)
        gone = await box.run("pwd")
        assert (gone.stdout, "is gone" in gone.stderr) == (f"{await box.home()}\n", True)
        # a cwd the caller names must exist: nothing runs, and the saved cwd stays
        with pytest.raises(FileNotFound, match="did not run"):
            await box.run(f"touch {doomed}-ran", cwd=doomed)
        assert await box.cwd() == await box.home() and not os.path.exists(f"{doomed}-ran")


@pytest.mark.parametrize("flavour", ["sshd", "dash_sshd", "busybox_sshd"])
async def test_commands_longer_than_an_argument_may_be_run_and_started_as_jobs(
    flavour: str, request: pytest.FixtureRequest, client_key: Path, pool: ConnectionPool
) -> None:
    """An agent writing a big file with a here-document: over the 128 KiB one argument may hold."""
    server: SSHD = request.getfixturevalue(flavour)
    body = "x" * 150_000 + "\n" + "é" * 40_000
    command = f"cat > big.txt <<'EOF'\n{body}\nEOF\nwc -c < big.txt"
    async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
        ran = await box.run(command, env={"GREETING": "hi"})
        assert (ran.exit_code, ran.stdout.strip()) == (0, str(len(body.encode()) + 1)), ran.stderr
        assert await box.read_text("big.txt") == body + "\n"
        job = await box.start_job(command)
        out = await output_until_exit(box, job.id)
        assert (out.exit_code, out.stdout.strip()) == (0, str(len(body.encode()) + 1)), out.stderr


@pytest.mark.parametrize("flavour", ["sshd", "dash_sshd", "busybox_sshd", "zsh_sshd", "mksh_sshd"])
async def test_a_commands_own_tracing_shows_its_lines_and_none_of_tethers(
    flavour: str, request: pytest.FixtureRequest, client_key: Path, pool: ConnectionPool
) -> None:
    """`set -x` is common in agents' scripts: the trace in stderr must be the command's, not also
    tether's lines that record the exit status and the cwd after it (or in its EXIT trap). zsh and
    mksh trace to a descriptor a redirection does not move: they show the lines that turn tracing
    off (zsh one, mksh the exit status taken, the redirection and the `set`), and none after."""
    server: SSHD = request.getfixturevalue(flavour)
    allowed = {"zsh_sshd": 1, "mksh_sshd": 3}.get(flavour, 0)

    def not_its_own(stderr: str) -> list[str]:
        return [line for line in stderr.splitlines() if not re.search(r"traced|cd /tmp|exit 3", line)]

    async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
        for command in ("set -x; echo traced", "set -x; cd /tmp; echo traced; exit 3"):
            ran = await box.run(command)
            assert "traced" in ran.stderr and len(not_its_own(ran.stderr)) <= allowed, ran
        assert ran.exit_code == 3 and await box.cwd() == "/tmp"
        job = await box.start_job("set -x; echo traced")
        out = await output_until_exit(box, job.id)
        assert "traced" in out.stderr and len(not_its_own(out.stderr)) <= allowed, out


@pytest.mark.parametrize("flavour", ["sshd", "dash_sshd", "busybox_sshd"])
async def test_a_command_that_starts_with_a_dash_is_a_command_not_evals_option(
    flavour: str, request: pytest.FixtureRequest, client_key: Path, pool: ConnectionPool
) -> None:
    """As `sh -c '-x'` has it: '-x: not found', 127 (not eval's 'invalid option')."""
    server: SSHD = request.getfixturevalue(flavour)
    async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
        for command in ("-x", "--", "-- echo hi", "--help"):
            ran = await box.run(command)
            assert (ran.exit_code, ran.stdout) == (127, ""), (command, ran)
            assert command.split()[0] in ran.stderr and "option" not in ran.stderr, ran.stderr
            job = await box.start_job(command)
            out = await output_until_exit(box, job.id)
            assert (out.exit_code, out.stdout) == (127, ""), (command, out)


@pytest.mark.parametrize(("flavour", "says"), [("sshd", "bash: line 3: "), ("dash_sshd", "dash: 3: eval: ")])
async def test_a_commands_errors_read_as_its_shell_would_print_them(
    flavour: str, says: str, request: pytest.FixtureRequest, client_key: Path, pool: ConnectionPool
) -> None:
    """Named after the shell, with the command's own line numbers: not tether's protocol script's
    ("main: line 57: …" for line 3 of a command, as bash would say of a function read from stdin)."""
    server: SSHD = request.getfixturevalue(flavour)
    script = "echo one\necho two\nnosuch-command-xyz\n"
    async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
        ran = await box.run(script)
        assert ran.stdout == "one\ntwo\n" and ran.stderr.startswith(f"{says}nosuch-command-xyz: ")
        job = await box.start_job(script)
        output = await output_until_exit(box, job.id)
        assert output.stdout == "one\ntwo\n" and output.stderr.startswith(f"{says}nosuch-command-xyz: ")


@pytest.mark.parametrize("flavour", ["sshd", "dash_sshd", "mksh_sshd"])
async def test_environment_values_never_show_in_ps(
    flavour: str, request: pytest.FixtureRequest, client_key: Path, pool: ConnectionPool
) -> None:
    """`ps` shows every process's arguments to every user of a box: secrets must not be among them."""
    server: SSHD = request.getfixturevalue(flavour)
    secret = f"s3cret-{secrets.token_hex(8)}"
    marker = f"tether-env-{secrets.token_hex(4)}"
    async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
        await box.run("true")  # (the shell's start-up is not what is watched)
        with ArgvWatch(secret) as watch:
            running = asyncio.ensure_future(box.run(f"sh -c 'sleep 1' {marker}; echo $TOKEN", env={"TOKEN": secret}))
            job = await box.start_job(f"sh -c 'sleep 1' {marker}-job; echo $TOKEN", env={"TOKEN": secret})
            await wait_until_running(f"{marker}-job")
            assert (await running).stdout == f"{secret}\n"
            for _ in range(20):  # quick ones too: a process that writes the value lives a millisecond
                assert (await box.run("echo $TOKEN", env={"TOKEN": secret})).stdout == f"{secret}\n"
            output = await output_until_exit(box, job.id)
        assert watch.scans > 10 and watch.seen == []
        assert secret in output.stdout


async def test_a_call_cancelled_just_as_its_shell_opened_leaves_the_shell_to_others(
    host_endpoint: SSHEndpoint, pool: ConnectionPool
) -> None:
    """The caller gives up at the moment its new shell is ready (fault injected around the real
    pool's open_session): the shell goes idle for the next call instead of holding a session and a
    place among the sandbox's shells for good."""
    real_open = pool.open_session
    victims: list[asyncio.Task[object]] = []

    async def open_then_cancel_the_caller(*args, **kwargs):  # type: ignore[no-untyped-def]
        opened = await real_open(*args, **kwargs)
        if victims:
            victims.pop().cancel()
        return opened

    async with Sandbox(host_endpoint, pool=pool) as box:
        pool.open_session = open_then_cancel_the_caller  # type: ignore[method-assign]
        running = asyncio.ensure_future(box.run("echo never"))
        victims.append(running)
        with pytest.raises(asyncio.CancelledError):
            await running
        assert (await box.run("echo after")).stdout == "after\n"
        await asyncio.sleep(0.2)
        [(sessions, _)] = pool.stats(host_endpoint)
        assert sessions == 2  # SFTP and one shell, not a second shell beside a lost one


async def test_commands_go_on_after_tethers_directory_was_removed(
    host_endpoint: SSHEndpoint, pool: ConnectionPool
) -> None:
    """An agent cleaning up may remove ~/.tether (here, this sandbox's own copy of it): the next
    command still runs and returns its output, and so does a background job."""
    tether_dir = f"~/.tether/t-{secrets.token_hex(3)}"
    async with Sandbox(host_endpoint, pool=pool, tether_dir=tether_dir) as box:
        assert (await box.run("echo before")).stdout == "before\n"
        where = (await box.run(f"cd {tether_dir} && pwd")).stdout.strip()
        await box.run(["rm", "-rf", where], cwd="/")
        assert (await box.run("echo after; echo err >&2")).stdout == "after\n"
        # ... or replaced the output files with copies (the same names, other files): the next
        # output is read from the file the shell writes now, not from the one tether held open.
        replace = 'echo stale; for f in run/*.o run/*.e; do cp "$f" "$f.new" && mv -f "$f.new" "$f"; done'
        assert (await box.run(replace, cwd=where)).stdout == "stale\n"
        assert (await box.run("echo again")).stdout == "again\n"
        job = await box.start_job("echo from a job")
        out = await box.job_output(job.id, wait_ms=3000)
        assert out.stdout == "from a job\n"
        # the command that removes it keeps what it wrote after (to files no path names now)
        gone = await box.run(f"rm -rf {shlex.quote(where)}; echo said after; echo err after >&2", cwd="/")
        assert (gone.stdout, gone.stderr) == ("said after\n", "err after\n")
        assert (await box.run("echo and on")).stdout == "and on\n"
        await box.run(["rm", "-rf", where], cwd="/")


async def test_a_shell_that_goes_lets_go_of_its_output_files(host_endpoint: SSHEndpoint, pool: ConnectionPool) -> None:
    """tether holds each shell's output files open over SFTP between commands; when the shell goes
    (here it is killed), so do those handles: no descriptor anywhere still names its files."""
    tether_dir = f"~/.tether/t-{secrets.token_hex(3)}"
    async with Sandbox(host_endpoint, pool=pool, tether_dir=tether_dir) as box:
        run_dir = (await box.run(f"cd {tether_dir}/run && pwd")).stdout.strip()
        shells = {name.rsplit(".", 1)[0] for name in (await box.run("ls", cwd=run_dir)).stdout.split()}
        assert len(shells) == 1  # (one shell so far)
        files = f"{run_dir}/{next(iter(shells))}."
        # (looked for from here: the box is this machine, and sftp-server hides its descriptors
        # from its own user) — held now, so the look below can see them
        assert _descriptors_naming(files), "the shell's output files should be held open between commands"
        with pytest.raises(ConnectionLost):
            await box.run("echo last words; echo >&2 on stderr; kill -9 $$")
        deadline = time.monotonic() + 5
        while (holders := _descriptors_naming(files)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert holders == []
        await box.run(["rm", "-rf", run_dir.rsplit("/", 1)[0]], cwd="/")


def _descriptors_naming(prefix: str) -> list[str]:
    """The open file descriptors on this machine (those this process may look at) whose file's
    path starts with `prefix`."""
    found = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(prefix):
                found.append(str(fd))
    return found


@pytest.fixture(scope="module")
def strict_profile_sshd(client_key: Path) -> Iterator[SSHD]:
    """A login profile that sets noclobber, traces (set -x, and for every bash it starts, through
    BASH_ENV) and moves to a project directory, as dev boxes' do."""
    profile = "set -o noclobber\nset -x\nexport BASH_ENV=~/.trace\nmkdir -p ~/project && cd ~/project\n"
    rc_files = {".bash_profile": profile, ".trace": "set -x\n"}
    server = SSHD(ensure_account("tether-strict", "/bin/bash", rc_files), client_key).start()
    yield server
    server.cleanup()


async def test_a_profiles_noclobber_does_not_mix_one_commands_output_into_the_next(
    strict_profile_sshd: SSHD, client_key: Path, pool: ConnectionPool
) -> None:
    async with Sandbox(endpoint_for(strict_profile_sshd, client_key), pool=pool) as box:
        first, second = await box.run("echo one"), await box.run("echo two; echo err >&2")
        assert (first.stdout, second.stdout, second.stderr) == ("one\n", "two\n", "err\n")
        moved = await box.run("cd /tmp")
        assert moved.stderr == "" and await box.cwd() == "/tmp"
        job = await box.start_job("echo started; sleep 100")
        assert (await box.job_output(job.id, wait_ms=5000)).stdout == "started\n"
        assert (await box.job_kill(job.id, "TERM")).status == "exited"


async def test_a_profiles_tracing_shows_no_env_value(
    strict_profile_sshd: SSHD, client_key: Path, pool: ConnectionPool
) -> None:
    """Env values can be secrets: a profile's `set -x` (or BASH_ENV's) must not print the exports
    tether runs before a command or a job, in its output or in a shell's error."""
    secret = f"s3cr3t-{secrets.token_hex(6)}"
    async with Sandbox(endpoint_for(strict_profile_sshd, client_key), pool=pool, env={"API_KEY": secret}) as box:
        ran = await box.run('test "$API_KEY" = "$OTHER" && echo same', env={"OTHER": secret})
        assert (ran.stdout, ran.stderr) == ("same\n", "")
        traced = await box.run("set -x; true")  # (a command's own tracing is its own)
        assert "+ true" in traced.stderr and secret not in traced.stderr
        job = await box.start_job('echo "${#API_KEY} ${#OTHER}"', env={"OTHER": secret})
        output = await box.job_output(job.id, wait_ms=5000)
        assert (output.stdout, output.stderr) == (f"{len(secret)} {len(secret)}\n", "")


async def test_relative_paths_before_any_command_are_where_the_login_lands(
    strict_profile_sshd: SSHD, client_key: Path, pool: ConnectionPool
) -> None:
    """The profile moves the login shell to ~/project: a file written there by a relative path
    before the first command is the one that command sees."""
    async with Sandbox(endpoint_for(strict_profile_sshd, client_key), pool=pool) as box:
        written = await box.write(f"notes-{secrets.token_hex(3)}.txt", "hello\n")
        assert written.path.endswith(f"/project/{written.path.rsplit('/', 1)[1]}")
        assert (await box.run(["cat", written.path.rsplit("/", 1)[1]])).stdout == "hello\n"
