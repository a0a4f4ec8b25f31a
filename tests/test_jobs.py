"""Background jobs: start, incremental output, status, kill, list, and surviving a dead connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandbox import ConnectionPool, Sandbox, SSHEndpoint
from sandbox.errors import FileNotFound, InvalidArgument, JobNotFound, SandboxError
from sandbox.jobs import STOP_ALL_JOBS
from tests.conftest import endpoint_for
from tests.processes import (
    leaf_sleep,
    output_until_exit,
    processes_matching,
    running,
    wait_until_gone,
    wait_until_running,
)
from tests.sshd import SSHD


async def wait_for_exit(sb: Sandbox, job_id: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (await sb._p.jobs.get(job_id)).status == "exited":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{job_id} still running after {seconds}s")


async def test_output_is_returned_incrementally_with_the_exit_code(sb: Sandbox) -> None:
    job = await sb.start_job("echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three; exit 5")
    assert job.status == "running" and job.id.startswith("j-")
    first = await sb.job_output(job.id, wait_ms=2000)
    assert first.stdout == "one\n" and first.status == "running"
    await wait_for_exit(sb, job.id)
    rest = await sb.job_output(job.id)
    assert (rest.stdout, rest.stderr, rest.status, rest.exit_code) == ("three\n", "two\n", "exited", 5)
    assert (await sb.job_output(job.id)).stdout == ""  # nothing new


async def test_wait_ms_returns_as_soon_as_output_arrives(sb: Sandbox) -> None:
    job = await sb.start_job("sleep 0.3; echo ready; sleep 30")
    started = time.monotonic()
    out = await sb.job_output(job.id, wait_ms=5000)
    assert out.stdout == "ready\n" and time.monotonic() - started < 3
    await sb.job_kill(job.id, "KILL")


async def test_jobs_run_in_the_given_cwd_with_env(sb: Sandbox) -> None:
    await sb.makedirs("jobdir")
    job = await sb.start_job('pwd; echo "$X"', cwd="jobdir", env={"X": "a b $(c)"})
    await wait_for_exit(sb, job.id)
    out = await sb.job_output(job.id)
    assert out.stdout == f"{await sb.cwd()}/jobdir\na b $(c)\n" and out.exit_code == 0
    # a cwd that is not there, or not a directory: nothing starts (as with run)
    before = len(await sb.job_list())
    with pytest.raises(FileNotFound, match="the job did not start"):
        await sb.start_job("touch ran", cwd="no-such-dir")
    await sb.write("jobdir/file", "")
    with pytest.raises(InvalidArgument, match="not a directory"):
        await sb.start_job("touch ran", cwd="jobdir/file")
    assert len(await sb.job_list()) == before and not await sb.exists("ran")


async def test_kill_sends_the_signal_to_the_whole_group(sb: Sandbox) -> None:
    job = await sb.start_job("sleep 1000 & sleep 1000; echo not-reached")
    await asyncio.sleep(0.2)
    killed = await sb.job_kill(job.id)  # TERM
    assert killed.status == "exited" and killed.exit_code == 143 and killed.signal == "TERM"
    # live members of the group (zombies don't count: a container's pid 1 may never reap them)
    live = await sb.run(f"ps -eo pgid=,stat=,args= | awk '$1 == {killed.pid} && $2 !~ /^Z/'")
    assert live.stdout == ""


@pytest.mark.parametrize("flavour", ["sshd", "dash_sshd"])
async def test_a_job_shutting_down_on_term_runs_until_it_has(
    flavour: str, request: pytest.FixtureRequest, client_key: Path, pool: ConnectionPool
) -> None:
    """A server that cleans up when TERMed (uvicorn, node) still runs after job_kill: the job says
    so until it has ended, and all it wrote is there once it says exited (an agent that restarts it
    at "exited" would find its port still taken)."""
    server: SSHD = request.getfixturevalue(flavour)
    graceful = (
        "import signal, sys, time\n"
        "def stop(*_):\n    time.sleep(3); print('cleaned', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\nprint('serving', flush=True)\ntime.sleep(1000)\n"
    )
    async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
        await box.write("graceful.py", graceful)
        job = await box.start_job("python3 graceful.py")
        assert (await box.job_output(job.id, wait_ms=5000)).stdout == "serving\n"
        killed = await box.job_kill(job.id, "TERM")
        assert killed.sent and killed.status == "running"
        output = await output_until_exit(box, job.id)
        assert (output.status, output.stdout) == ("exited", "cleaned\n")


@pytest.mark.parametrize("flavour", ["sshd", "dash_sshd"])
async def test_int_and_quit_reach_a_job(
    flavour: str, request: pytest.FixtureRequest, client_key: Path, pool: ConnectionPool
) -> None:
    """A shell without job control starts background commands with INT and QUIT ignored, for good:
    a job starts with them at their defaults instead."""
    server: SSHD = request.getfixturevalue(flavour)
    async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
        for signal, code in (("INT", 130), ("QUIT", 131)):
            marker = leaf_sleep()
            job = await box.start_job(marker)
            await wait_until_running(marker, 10)
            killed = await box.job_kill(job.id, signal)
            assert (killed.status, killed.exit_code, killed.signal) == ("exited", code, signal)


async def test_kill_with_kill_signal_and_bad_signals(sb: Sandbox) -> None:
    job = await sb.start_job("sleep 1000")
    with pytest.raises(InvalidArgument, match="unknown signal"):
        await sb.job_kill(job.id, "9; rm -rf ~")
    killed = await sb.job_kill(job.id, "SIGKILL")
    assert killed.status == "exited" and killed.signal == "KILL"
    done = await sb.start_job("true")
    await wait_for_exit(sb, done.id)
    late = await sb.job_kill(done.id)
    assert late.signal is None and not late.sent  # it ended by itself: nothing was signalled
    assert killed.sent and not (await sb.job_kill(job.id)).sent  # (a second kill finds it ended)


async def test_output_ending_in_half_a_character_is_delivered_once_the_job_ended(sb: Sandbox) -> None:
    job = await sb.start_job("printf 'abc\\303'")
    out = await sb.job_output(job.id, wait_ms=5000)
    text = out.stdout  # (each read returns what is new since the previous one: keep all of it)
    while out.status == "running":
        out = await sb.job_output(job.id, wait_ms=5000)
        text += out.stdout
    text += (await sb.job_output(job.id)).stdout
    assert text == "abc\ufffd"
    again = await sb.job_output(job.id)
    assert (again.stdout, again.more) == ("", False)


async def test_half_a_character_held_back_is_not_new_output_to_wait_for(sb: Sandbox) -> None:
    """Buffered output often splits a character between two writes: the bytes held back until it
    completes are neither output to return at once nor "more" to read."""
    job = await sb.start_job("printf 'ok caf\\303'; sleep 2; printf '\\251 done\\n'")
    out = await sb.job_output(job.id, wait_ms=1500)
    assert (out.stdout, out.more) == ("ok caf", False)
    started = time.monotonic()
    out = await sb.job_output(job.id, wait_ms=5000)  # waits for the rest, not for what it holds
    assert out.stdout == "\u00e9 done\n" and time.monotonic() - started > 0.3


async def test_a_job_that_never_got_a_pid_is_not_running_forever(sb: Sandbox) -> None:
    jobs_dir = (await sb._p.executor.info()).jobs_dir
    old, new = "j-0dead001", "j-0dead002"
    for job_id, started in ((old, time.time() - 120), (new, time.time())):
        meta = {"command": "x", "cwd": "/", "started_at": started}
        await sb.write(f"{jobs_dir}/{job_id}/meta.json", json.dumps(meta))
    status = {j.id: j.status for j in await sb.job_list()}
    assert (status[old], status[new]) == ("exited", "running")  # (a start cut off, one still starting)
    # every tool says the same of the cut-off one, at once
    started = time.monotonic()
    out = await sb.job_output(old, wait_ms=3000)
    assert (out.status, out.stdout) == ("exited", "") and time.monotonic() - started < 2
    assert (await sb.job_kill(old)).status == "exited"  # nothing to signal; not "no such job"
    assert (await sb.job_output(new)).status == "running"
    with pytest.raises(SandboxError, match="still starting"):  # no process to signal yet: say so
        await sb.job_kill(new)
    await sb.run(["rm", "-rf", f"{jobs_dir}/{old}", f"{jobs_dir}/{new}"])


@pytest.mark.parametrize("flavour", ["sshd", "dash_sshd"])
async def test_what_an_ended_job_left_running_is_stopped_by_job_kill_and_teardown(
    flavour: str, request: pytest.FixtureRequest, client_key: Path, pool: ConnectionPool
) -> None:
    """`run_in_background: "server &"`: the job ends at once, the server runs on in its group. The
    wrapper notes it as it ends; job_kill and a sandbox's teardown (the ssh provider's detach)
    stop it, and nothing that merely has its pid and stamp but sits in another group."""
    server: SSHD = request.getfixturevalue(flavour)
    async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
        await what_an_ended_job_left_running_is_stopped(box)


async def what_an_ended_job_left_running_is_stopped(sb: Sandbox) -> None:
    jobs_dir = (await sb._p.executor.info()).jobs_dir

    async def teardown_of(job_id: str) -> None:
        """What a teardown (an ssh host's detach) does, on a copy of the job's directory alone:
        the other tests' jobs are left alone."""
        alone = f"{jobs_dir}-alone"
        await sb.run(["sh", "-c", 'mkdir -p "$2" && cp -R "$1" "$2"/', "sh", f"{jobs_dir}/{job_id}", alone])
        await sb.run(["sh", "-c", STOP_ALL_JOBS + '; rm -rf "$1"', "sh", alone])

    for stop in ("job_kill", "teardown"):
        marker = leaf_sleep()
        job = await sb.start_job(f"{marker} & echo started")
        await wait_for_exit(sb, job.id)
        await wait_until_running(marker)
        assert (await sb.job_output(job.id)).exit_code == 0
        if stop == "job_kill":
            killed = await sb.job_kill(job.id)
            assert killed.sent and (killed.status, killed.exit_code, killed.signal) == ("exited", 0, "TERM")
            assert not (await sb.job_kill(job.id)).sent  # (nothing left the second time)
        else:
            await teardown_of(job.id)
        assert await wait_until_gone(marker) == [], f"{stop} left what the job started"
    # a `left` file naming a process that runs as itself, but in a group of its own: not the job's
    bystander = int((await sb.run("setsid sleep 1000 >/dev/null 2>&1 & echo $!")).stdout)
    try:
        stamp = Path(f"/proc/{bystander}/stat").read_text().rsplit(")", 1)[1].split()[19]
        ended = await sb.start_job("true")
        await wait_for_exit(sb, ended.id)
        await sb.write(f"{jobs_dir}/{ended.id}/left", f"{bystander}:{stamp}\n")
        assert not (await sb.job_kill(ended.id, "KILL")).sent
        await teardown_of(ended.id)
        assert (await sb.run(f"kill -0 {bystander}")).exit_code == 0, "the bystander was signalled"
    finally:
        await sb.run(f"kill {bystander}")


async def test_a_pid_that_now_names_another_process_is_never_signalled(sb: Sandbox) -> None:
    """A job whose wrapper died without recording its end (the OOM killer, a reboot) leaves its pid
    file behind, and the kernel may hand that pid to anything: neither job_kill nor a sandbox's
    teardown may signal it."""
    jobs_dir = (await sb._p.executor.info()).jobs_dir
    job = await sb.start_job("sleep 1000")
    pid_file = f"{jobs_dir}/{job.id}/pid"
    pid, stamp = (await sb.read_text(pid_file)).strip().split(":")  # the box has /proc: stamped
    assert int(pid) == job.pid and stamp.isdigit()
    await sb.run(f"kill -KILL -{job.pid}")  # wrapper and all, with no exit file written
    bystander = int((await sb.run("setsid sleep 1000 >/dev/null 2>&1 & echo $!")).stdout)
    try:
        # its pid, and a start before its own (ticks are 10 ms: the job's could be the same one)
        stamp = str(int(stamp) - 1)
        await sb.write(pid_file, f"{bystander}:{stamp}\n")
        assert [j.status for j in await sb.job_list() if j.id == job.id] == ["exited"]
        assert (await sb.job_kill(job.id, "KILL")).status == "exited"
        assert (await sb.job_output(job.id)).status == "exited"
        # a sandbox's teardown (the local provider's terminate, the ssh provider's detach)
        other = f"{jobs_dir}-teardown/{job.id}"
        await sb.write(f"{other}/pid", f"{bystander}:{stamp}\n")
        await sb.run(["sh", "-c", STOP_ALL_JOBS, "sh", str(Path(other).parent)])
        assert (await sb.read_text(f"{other}/exit")).strip() == "137"  # marked ended, never trusted again
        assert (await sb.run(f"kill -0 {bystander}")).exit_code == 0, "the bystander was signalled"
    finally:
        await sb.run(f"kill {bystander}; rm -rf {jobs_dir}-teardown")


async def test_a_job_whose_wrapper_was_killed_alone_can_still_be_stopped(sb: Sandbox) -> None:
    """`kill -9 PID` of the pid job_list shows ends the wrapper only: the command runs on in its
    group, which job_list still shows and job_kill still stops."""
    marker = leaf_sleep()
    job = await sb.start_job(marker)
    await wait_until_running(marker, 10)
    await sb.run(f"kill -KILL {job.pid}")  # the wrapper alone
    deadline = time.monotonic() + 5
    while running(job.pid):  # (until the KILL landed: then the command has outlived it)
        assert time.monotonic() < deadline, "the wrapper outlived its KILL"
        await asyncio.sleep(0.02)
    assert processes_matching(marker), "the command should outlive its wrapper"
    assert [j.status for j in await sb.job_list() if j.id == job.id] == ["running"]
    await sb.job_kill(job.id, "KILL")
    assert await wait_until_gone(marker) == []


async def test_output_read_by_calls_sent_together_is_returned_once(sb: Sandbox) -> None:
    job = await sb.start_job("echo hello; echo world >&2")
    await wait_for_exit(sb, job.id)
    outputs = await asyncio.gather(*(sb.job_output(job.id) for _ in range(4)))
    assert sorted((o.stdout, o.stderr) for o in outputs) == [("", "")] * 3 + [("hello\n", "world\n")]


async def test_waits_sent_together_each_end_when_their_own_wait_does(sb: Sandbox) -> None:
    """Reads of one job take turns, but each call's wait_ms counts from the call, not from its turn."""
    job = await sb.start_job("sleep 30")
    started = time.monotonic()
    outputs = await asyncio.gather(*(sb.job_output(job.id, wait_ms=1500) for _ in range(3)))
    assert all(o.stdout == "" and o.exit_code is None for o in outputs)
    assert time.monotonic() - started < 3.5  # (one after the other, they took 4.5 s)
    await sb.job_kill(job.id, "KILL")


async def test_list_copes_with_hundreds_of_jobs(sb: Sandbox) -> None:
    """Four small files per job, read for every job at once, would exhaust sftp-server's descriptors
    (1024 under a usual limit) on a box that has run a few hundred jobs."""
    real = await sb.start_job("exit 0")
    jobs_dir = (await sb._p.executor.info()).jobs_dir
    fake = [f"j-fa{i:06x}" for i in range(400)]
    make = (
        'cd "$1" && shift && for d in "$@"; do mkdir "$d" && '
        'printf \'{"command": "old", "cwd": "/", "started_at": 1}\' >"$d/meta.json" && '
        'echo 1 >"$d/pid" && echo 0 >"$d/exit"; done'
    )
    await sb.run(["sh", "-c", make, "sh", jobs_dir, *fake])
    try:
        listed = {job.id: job for job in await sb.job_list()}
        assert set(fake) | {real.id} <= set(listed)
        assert all(listed[i].status == "exited" and listed[i].exit_code == 0 for i in fake)
    finally:
        await sb.run(["sh", "-c", 'cd "$1" && shift && rm -rf "$@"', "sh", jobs_dir, *fake])


async def test_list_shows_command_status_and_start_time(sb: Sandbox) -> None:
    a = await sb.start_job("exit 0")
    b = await sb.start_job("sleep 30")
    await wait_for_exit(sb, a.id)
    jobs = {j.id: j for j in await sb.job_list()}
    assert jobs[a.id].status == "exited" and jobs[a.id].command == "exit 0"
    assert jobs[b.id].status == "running" and jobs[b.id].started_at >= a.started_at
    await sb.job_kill(b.id, "KILL")


async def test_unknown_and_malformed_job_ids(sb: Sandbox) -> None:
    with pytest.raises(JobNotFound, match="job_list"):
        await sb.job_output("j-00000000")
    with pytest.raises(JobNotFound):
        await sb.job_output("../../etc")


async def test_large_output_is_returned_in_pieces(sb: Sandbox) -> None:
    job = await sb.start_job("seq 1 20000")
    await wait_for_exit(sb, job.id)
    text, rounds = "", 0
    while True:
        out = await sb.job_output(job.id)
        text += out.stdout
        rounds += 1
        if not out.more:
            break
    assert rounds > 1 and text.split() == [str(i) for i in range(1, 20001)]


async def test_jobs_survive_the_connection_dying(sshd: SSHD, client_key: Path, pool: ConnectionPool) -> None:
    """The sshd process serving tether is killed mid-session: the next operation re-dials, and a job
    started before is still listed, with its output readable."""
    async with Sandbox(endpoint_for(sshd, client_key), pool=pool) as box:
        job = await box.start_job("for i in $(seq 1 30); do echo tick $i; sleep 0.1; done")
        assert (await box.run("echo before")).stdout == "before\n"
        sshd.kill_connections()
        await asyncio.sleep(0.3)
        assert (await box.run("echo after")).stdout == "after\n"
        assert job.id in [j.id for j in await box.job_list()]
        await wait_for_exit(box, job.id)
        out = await box.job_output(job.id)
        assert out.stdout.splitlines()[-1] == "tick 30" and out.exit_code == 0


async def test_a_new_tether_process_goes_on_where_the_last_read_ended(
    host_endpoint: SSHEndpoint, pool: ConnectionPool
) -> None:
    """The read position lives on the box: a second Sandbox with a pool of its own (as a restarted
    MCP server would have) gets only what came after the first one's read, not the job's whole
    output again; and a damaged position file means reading from the start, not an error."""
    async with Sandbox(host_endpoint, pool=pool) as first:
        job = await first.start_job("echo one; echo uno >&2; read -r _ < /dev/null; sleep 2; echo two; echo dos >&2")
        out = await first.job_output(job.id, wait_ms=3000)
        said = (out.stdout, out.stderr)
        while said != ("one\n", "uno\n"):  # (the two streams may come apart: one read each)
            out = await first.job_output(job.id, wait_ms=1000)
            said = (said[0] + out.stdout, said[1] + out.stderr)
            assert said[0] in ("", "one\n")
    async with fresh_process(pool) as other_pool, Sandbox(host_endpoint, pool=other_pool) as second:
        await wait_for_exit(second, job.id)
        rest = await second.job_output(job.id)
        assert (rest.stdout, rest.stderr, rest.exit_code) == ("two\n", "dos\n", 0)
        assert (await second.job_output(job.id)).stdout == ""
        jobs_dir = (await second._p.executor.info()).jobs_dir
        await second.write(f"{jobs_dir}/{job.id}/read", "garbage")
    async with fresh_process(pool) as third_pool, Sandbox(host_endpoint, pool=third_pool) as third:
        again = await third.job_output(job.id)
        assert (again.stdout, again.stderr) == ("one\ntwo\n", "uno\ndos\n")


@contextlib.asynccontextmanager
async def fresh_process(pool: ConnectionPool) -> AsyncIterator[ConnectionPool]:
    """What a new tether process has: connections of its own (the host-key pins stay)."""
    fresh = ConnectionPool(pool.pins)
    try:
        yield fresh
    finally:
        await fresh.close()


async def test_a_job_that_ended_a_week_ago_is_forgotten(
    sb: Sandbox, host_endpoint: SSHEndpoint, pool: ConnectionPool
) -> None:
    """Its directory is removed by the next shell to start on the box (in the background, while
    the shell serves); running jobs and recent ones stay."""
    old, recent = await sb.start_job("true"), await sb.start_job("true")
    running = await sb.start_job("sleep 1000")
    await wait_for_exit(sb, old.id)
    await wait_for_exit(sb, recent.id)
    jobs_dir = (await sb._p.executor.info()).jobs_dir
    await sb.run(["touch", "-d", "8 days ago", f"{jobs_dir}/{old.id}/exit", f"{jobs_dir}/{running.id}/pid"])
    async with Sandbox(host_endpoint, pool=pool) as fresh:
        deadline = time.monotonic() + 10
        while old.id in (listed := {job.id for job in await fresh.job_list()}) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    assert old.id not in listed and {recent.id, running.id} <= listed
    await sb.job_kill(running.id, "KILL")
