"""A real OpenSSH sshd on loopback for tests and benchmarks.

sshd runs unprivileged: as the account it serves, in a temporary directory, on a free port. An
unprivileged sshd can only log in the user it runs as, so every test account gets its own sshd.
When the suite runs as root (CI does), accounts are created with `useradd`; as a normal user only the
current account is available.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SSHD_BINARY = shutil.which("sshd") or "/usr/sbin/sshd"
SFTP_SERVER_CANDIDATES = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
)


def is_root() -> bool:
    return os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Account:
    """A login account on this machine that an sshd can serve."""

    name: str
    home: Path
    uid: int
    gid: int
    shell: str


EXTRA_GROUP = "tether-test"
ACCOUNTS_LOCK = Path(tempfile.gettempdir()) / "tether-test-accounts.lock"


def ensure_account(name: str, shell: str = "/bin/bash", rc_files: dict[str, str] | None = None) -> Account:
    """Create (as root) or reuse a login account; write its shell start-up files.

    As a non-root user the current account is returned unchanged: its start-up files are the user's own.
    """
    if not is_root():
        me = pwd.getpwuid(os.getuid())
        return Account(me.pw_name, Path(me.pw_dir), me.pw_uid, me.pw_gid, me.pw_shell)
    # Under pytest-xdist each worker gets accounts of its own: one worker's jobs, ~/.tether and
    # processes never show up in another's listings. useradd locks /etc/passwd and fails when another
    # process holds it, so the workers take turns.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    name = f"{name}-{worker}" if worker else name
    with machine_setup_lock():
        return _ensure_account_locked(name, shell, rc_files or {})


@contextlib.contextmanager
def machine_setup_lock() -> Iterator[None]:
    """Held while test processes change this machine (accounts, installed helpers)."""
    with open(ACCOUNTS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _ensure_account_locked(name: str, shell: str, rc_files: dict[str, str]) -> Account:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", shell, name], check=True, stdout=subprocess.DEVNULL)
        entry = pwd.getpwnam(name)
    if entry.pw_shell != shell:
        subprocess.run(["usermod", "--shell", shell, name], check=True)
    # A second group, as most real accounts have one (the tests chgrp files to it).
    try:
        members = grp.getgrnam(EXTRA_GROUP).gr_mem
    except KeyError:
        subprocess.run(["groupadd", EXTRA_GROUP], check=True)
        members = []
    if name not in members:
        subprocess.run(["usermod", "--append", "--groups", EXTRA_GROUP, name], check=True)
    home = Path(entry.pw_dir)
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    for rel, text in rc_files.items():
        path = home / rel
        path.write_text(text)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return Account(name, home, entry.pw_uid, entry.pw_gid, shell)


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return path


@dataclass
class SSHD:
    """One sshd process serving one account on 127.0.0.1."""

    account: Account
    client_key: Path
    max_sessions: int = 10
    extra_config: list[str] = field(default_factory=list)
    port: int = 0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tether-sshd-")))
    host_key: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> SSHD:
        self.workdir.chmod(0o755)
        if self.host_key is None:
            self.host_key = keygen(self.workdir / "host_ed25519")
        authorized = self.workdir / "authorized_keys"
        authorized.write_text(Path(f"{self.client_key}.pub").read_text())
        if not self.port:
            self.port = free_port()
        sftp_server = next((p for p in SFTP_SERVER_CANDIDATES if os.path.exists(p)), "internal-sftp")
        config = self.workdir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    "StrictModes no",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    f"MaxSessions {self.max_sessions}",
                    "MaxStartups 100:30:200",
                    "AllowTcpForwarding yes",
                    "LogLevel ERROR",
                    f"Subsystem sftp {sftp_server}",
                    *self.extra_config,
                ]
            )
            + "\n"
        )
        for path in self.workdir.iterdir():
            os.chown(path, self.account.uid, self.account.gid)
        os.chown(self.workdir, self.account.uid, self.account.gid)
        argv = [SSHD_BINARY, "-D", "-e", "-f", str(config)]
        if is_root():
            argv = ["runuser", "-u", self.account.name, "--", *argv]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            err = self.process.stderr.read().decode() if self.process.stderr else ""
            raise RuntimeError(f"sshd did not start: {err}") from None
        return self

    def listener_pid(self) -> int:
        return int((self.workdir / "sshd.pid").read_text().split()[0])

    def connection_pids(self) -> list[int]:
        """Pids of the sshd processes serving connections: the listener's descendants that are sshd
        (the privileged monitor and the per-session process), not the shells they started."""
        out = subprocess.run(["ps", "-eo", "pid=,ppid=,comm="], capture_output=True, text=True).stdout
        children: dict[int, list[tuple[int, str]]] = {}
        for line in out.splitlines():
            pid, ppid, comm = line.split(None, 2)
            children.setdefault(int(ppid), []).append((int(pid), comm.strip()))
        found, todo = [], [self.listener_pid()]
        while todo:
            for pid, comm in children.get(todo.pop(), []):
                if comm == "sshd":
                    found.append(pid)
                    todo.append(pid)
        return found

    def kill_connections(self) -> None:
        for pid in self.connection_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @contextlib.contextmanager
    def frozen_connections(self) -> Iterator[None]:
        """The connections' sshd processes stopped (a peer that stops answering, its TCP still up)
        for the block, and killed after it."""
        frozen = self.connection_pids()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            # Signal sshd itself, not runuser: runuser sleeps two seconds after forwarding a signal.
            # Per-connection sshd processes live in sessions of their own, so they are ended too.
            self.kill_connections()
            with contextlib.suppress(OSError, ValueError):
                os.kill(self.listener_pid(), signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def restart(self, new_host_key: bool = False) -> None:
        self.stop()
        if new_host_key:
            for suffix in ("", ".pub"):
                (self.workdir / f"host_ed25519{suffix}").unlink()
            self.host_key = None
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def address(self) -> str:
        return f"{self.account.name}@127.0.0.1:{self.port}"


# Start-up files of the test accounts. The "slowrc" one models a box whose .bashrc runs pyenv/conda/nvm.
# Both use a UTF-8 locale, as most boxes do (and as bash's handling of odd bytes depends on it).
FAST_RC = {".bashrc": "", ".profile": "", ".bash_profile": "LANG=C.UTF-8; export LANG\n"}
SLOW_RC = {
    ".bashrc": "sleep 0.05\n",
    # Debian's default .profile sources .bashrc for login bash shells; keep that behaviour.
    ".profile": 'LANG=C.UTF-8; export LANG; [ -n "$BASH_VERSION" ] && [ -f "$HOME/.bashrc" ] && . "$HOME/.bashrc"\n',
}
