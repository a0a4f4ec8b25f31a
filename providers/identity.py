"""tether's own key pairs, generated on first use in the state dir."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

from sandbox.hostkeys import openssh_line
from sandbox.state import state_dir


def tether_key() -> Path:
    """tether's client key: offered to hosts you attach (add its .pub to their authorized_keys) and
    the only key the local provider's embedded server accepts."""
    return generated_key(state_dir() / "keys" / "id_ed25519", "tether")


def generated_key(path: Path, comment: str) -> Path:
    """An ed25519 private key at `path` (0600, with `path.pub`), created if missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
        try:
            os.link(temp, path)  # never replaces: of processes racing to create it, the first wins
        except FileExistsError:
            pass  # another process's key won: use that one (a key once read is never replaced)
        finally:
            temp.unlink()
        # The .pub (for people to copy) is derived from whichever private key won, so the pair matches.
        public = asyncssh.read_private_key(path).export_public_key()
        temp_pub = path.with_name(f".{path.name}.pub.{os.getpid()}.tmp")
        temp_pub.write_bytes(public)
        os.replace(temp_pub, Path(f"{path}.pub"))
    return path


def public_key_line(private: Path) -> str:
    return openssh_line(asyncssh.read_private_key(private))
