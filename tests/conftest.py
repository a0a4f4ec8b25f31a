"""Shared fixtures: real OpenSSH sshd instances on loopback, one per login-shell flavour.

Set TETHER_TEST_SSH=user@host:port and TETHER_TEST_SSH_KEY=/path/to/key to run the tests that only
need "an SSH host" against a host of your own (compose.test.yml starts one); tests that must kill or
restart sshd always start their own.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

# Imported up front, not first by its pytest plugin as the session ends: CPython 3.11.7's ast module
# can fail that late import ("AST constructor recursion depth mismatch") after a test that cut a
# connection mid-transfer, when only a few test files ran.
import hypothesis  # noqa: F401
import pytest

from sandbox import ConnectionPool, Sandbox, SSHEndpoint
from sandbox.hostkeys import HostKeyPins
from sandbox.state import StateStore
from tests.sshd import FAST_RC, SLOW_RC, SSHD, Account, ensure_account, is_root, keygen, machine_setup_lock

BUSYBOX = shutil.which("busybox")


@pytest.fixture(scope="session", autouse=True)
def state_dir() -> Iterator[Path]:
    """Every test run gets its own tether state dir: pins and ledgers never touch the user's."""
    path = Path(tempfile.mkdtemp(prefix="tether-state-"))
    os.environ["TETHER_STATE_DIR"] = str(path)
    os.environ.pop("SSH_AUTH_SOCK", None)  # the tests decide when an agent is used
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def keys_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tether-keys-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def client_key(keys_dir: Path) -> Path:
    key = keygen(keys_dir / "client_ed25519")
    # sshd running as the test account must be able to read authorized_keys derived from it
    (keys_dir / "client_ed25519.pub").chmod(0o644)
    return key


def _start(account: Account, key: Path, **options: object) -> SSHD:
    return SSHD(account, key, **options).start()  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def bash_account() -> Account:
    return ensure_account("tether-bash", "/bin/bash", FAST_RC)


@pytest.fixture(scope="session")
def sshd(bash_account: Account, client_key: Path) -> Iterator[SSHD]:
    """sshd for an account whose login shell is bash (MaxSessions 10, the OpenSSH default)."""
    server = _start(bash_account, client_key)
    yield server
    server.cleanup()


def _login_shell_sshd(shell: str, rc_files: dict[str, str], client_key: Path) -> Iterator[SSHD]:
    """sshd for a test account whose login shell is `shell` (its own account, tether-SHELL)."""
    path = shutil.which(shell, path="/bin:/usr/bin")
    if not is_root() or path is None:
        pytest.fail(f"the {shell} login-shell tests need root and {shell} (scripts/test installs it)")
    server = _start(ensure_account(f"tether-{shell}", path, rc_files), client_key)
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def dash_sshd(client_key: Path) -> Iterator[SSHD]:
    yield from _login_shell_sshd("dash", {".profile": "PATH=$HOME/bin:$PATH\n"}, client_key)


@pytest.fixture(scope="session")
def zsh_sshd(client_key: Path) -> Iterator[SSHD]:
    """zsh as the login shell (macOS's default), with its default options: commands run in zsh."""
    yield from _login_shell_sshd("zsh", {".zprofile": "path=($HOME/bin $path)\n"}, client_key)


@pytest.fixture(scope="session")
def mksh_sshd(client_key: Path) -> Iterator[SSHD]:
    """mksh as the login shell: a ksh whose printf is not a builtin (an argument of it shows in ps)."""
    yield from _login_shell_sshd("mksh", {}, client_key)


@pytest.fixture(scope="session")
def busybox_sshd(client_key: Path) -> Iterator[SSHD]:
    """A minimal box: busybox ash as the login shell and only busybox applets on PATH (no rg, no GNU)."""
    if not is_root() or not BUSYBOX:
        pytest.fail("the busybox tests need root and busybox (scripts/test installs it)")
    applets = Path("/opt/tether-test/busybox-bin")
    with machine_setup_lock():
        if not (applets / "ash").exists():
            applets.mkdir(parents=True, exist_ok=True)
            subprocess.run([BUSYBOX, "--install", "-s", str(applets)], check=True)
    account = ensure_account("tether-ash", str(applets / "ash"), {".profile": f"PATH={applets}; export PATH\n"})
    server = _start(account, client_key)
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def slow_sshd(client_key: Path) -> Iterator[SSHD]:
    """bash login shell whose .bashrc sleeps 50 ms (the pyenv/conda/nvm case)."""
    server = _start(ensure_account("tether-slow", "/bin/bash", SLOW_RC), client_key)
    yield server
    server.cleanup()


def endpoint_for(server: SSHD, key: Path, **overrides: object) -> SSHEndpoint:
    return SSHEndpoint.parse(server.address, key_paths=(str(key),), use_agent=False, **overrides)


@pytest.fixture(scope="session")
def host_endpoint(sshd: SSHD, client_key: Path) -> SSHEndpoint:
    """The SSH host for tests that only need one: TETHER_TEST_SSH when given, else the bash sshd."""
    given = os.environ.get("TETHER_TEST_SSH")
    if given:
        key = os.environ.get("TETHER_TEST_SSH_KEY")
        return SSHEndpoint.parse(given, key_paths=(key,) if key else (), use_agent=key is None)
    return endpoint_for(sshd, client_key)


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[ConnectionPool]:
    """A pool of its own per test, with host-key pins in a fresh store."""
    store = StateStore(tmp_path / "state.db")
    p = ConnectionPool(HostKeyPins(store))
    yield p
    await p.close()
    store.close()


@pytest.fixture
async def sb(host_endpoint: SSHEndpoint, pool: ConnectionPool) -> AsyncIterator[Sandbox]:
    """A sandbox on the bash host, working in a fresh directory of its own."""
    async with Sandbox(host_endpoint, pool=pool) as box:
        work = f"{await box.home()}/work-{secrets.token_hex(4)}"
        await box.makedirs(work)
        await box.run(["true"], cwd=work)
        yield box
        for job in await box.job_list():  # (the test's own jobs: they would run on for good)
            if job.status == "running" and job.cwd.startswith(work):
                await box.job_kill(job.id, "KILL")
        await box.run(["rm", "-rf", work], cwd="/")


@pytest.fixture
def own_sshd(bash_account: Account, client_key: Path) -> Iterator[SSHD]:
    """An sshd of this test's own, which it may kill or restart."""
    server = SSHD(bash_account, client_key).start()
    yield server
    server.cleanup()
