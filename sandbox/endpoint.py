"""Where an SSH server is and how to log in to it."""

from __future__ import annotations

import getpass
import ipaddress
import os
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from asyncssh.config import SSHClientConfig
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from .errors import InvalidEndpoint

# A factory for an already-connected socket, for transports that are not plain TCP (E2B's websocket
# bridge, a socketpair in tests). When set, host and port only name the server for host-key pinning.
SocketFactory = Callable[[], Awaitable[socket.socket]]

_ADDRESS = re.compile(
    r"^(?:(?P<user>[^@\s]+)@)?(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[^@:\s\[\]]+))(?::(?P<port>\d{1,5}))?$"
)
DEFAULT_SSH_CONFIG = Path("~/.ssh/config")


def _refuse_contradictions(address: str, written: dict[str, Any], overrides: dict[str, Any]) -> None:
    """A user or port the address spells out that an override says otherwise is refused: which one
    was meant is not for tether to guess."""
    for key in ("user", "port"):
        given = overrides.get(key)
        if key in written and given is not None and given != written[key]:
            raise InvalidEndpoint(f"{address} says {key} {written[key]}, and {key} says {given}: give one")


_NOT_IN_LOGIN_NAMES = set("'\"`$;&|<>(){}[]*?!\\%#~=,/:")


def is_loopback(host: str) -> bool:
    """Whether `host` (a name, an address, an IPv6 address in brackets) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class SSHEndpoint(BaseModel):
    """An SSH server and the credentials to log in to it.

    Auth methods are tried in the order the server allows: key material and key files, then the
    ssh-agent, then a password. `token` is the Daytona-gateway style: the token is the user name and
    the server accepts "none" auth, so no other credential is offered.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    host: str = Field(description="Host name or address the server is reached at.")
    port: int = Field(22, ge=1, le=65535)
    user: str | None = Field(None, description="Login name; the local user name when omitted.")
    key_paths: tuple[str, ...] = Field((), description="Private key files to offer.")
    key_material: SecretStr | None = Field(None, description="A private key in OpenSSH or PEM text form.")
    password: SecretStr | None = None
    token: SecretStr | None = Field(None, description="Gateway token used as the user name, with 'none' auth.")
    use_agent: bool = Field(True, description="Offer keys held by the ssh-agent at $SSH_AUTH_SOCK.")
    default_keys: bool = Field(
        True, description="With no key named, offer the default key files in ~/.ssh (as ssh does)."
    )
    host_key: str | None = Field(
        None, description="The server's public key ('ssh-ed25519 AAAA…'); when set, no other key is accepted."
    )
    jump: tuple[SSHEndpoint, ...] = Field((), description="ProxyJump hops, outermost first.")
    socket_factory: SocketFactory | None = Field(None, exclude=True, repr=False)
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to establish the TCP connection.")
    login_timeout: float = Field(30.0, gt=0, description="Seconds for key exchange and authentication.")
    keepalive_interval: float = Field(15.0, ge=0, description="Seconds between keepalives; 0 disables them.")
    alias: str | None = Field(None, description="The ssh_config alias this endpoint came from, if any.")

    @field_validator("host")
    @classmethod
    def _host_has_no_spaces(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value) or value.startswith("-"):
            raise ValueError(f"not a host name: {value!r}")
        return value

    @field_validator("user")
    @classmethod
    def _user_is_a_login_name(cls, value: str | None) -> str | None:
        # A login name ends up in ssh command lines (`tether ssh`) and in ~/.ssh/config tokens
        # (%r in a ProxyCommand): nothing in it may read as an option or as shell syntax.
        if value is not None and (
            not value
            or value.startswith("-")
            or any(c.isspace() or not c.isprintable() or c in _NOT_IN_LOGIN_NAMES for c in value)
        ):
            raise ValueError(f"not a login name: {value!r}")
        return value

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def parse(cls, address: str, **overrides: Any) -> SSHEndpoint:
        """Parse `[user@]host[:port]` (IPv6 in brackets). Keyword arguments override parsed parts."""
        match = _ADDRESS.match(address.strip())
        if not match:
            raise InvalidEndpoint(f"cannot parse SSH address {address!r}; expected [user@]host[:port]")
        fields: dict[str, Any] = {"host": match["ipv6"] or match["host"]}
        if match["user"]:
            fields["user"] = match["user"]
        if match["port"]:
            port = int(match["port"])
            if not 1 <= port <= 65535:
                raise InvalidEndpoint(f"port {port} out of range in {address!r}")
            fields["port"] = port
        _refuse_contradictions(address, fields, overrides)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    @classmethod
    def resolve(cls, target: str, config_path: Path | str | None = None, **overrides: Any) -> SSHEndpoint:
        """An `~/.ssh/config` alias when the config has a Host block for it, else a plain address.

        HostName, Port, User, IdentityFile and ProxyJump are honoured; keyword arguments win over both.
        """
        path = Path(config_path or DEFAULT_SSH_CONFIG).expanduser()
        bare = _ADDRESS.match(target.strip())
        name = bare["host"] if bare and not bare["port"] else None
        options = _ssh_config_for(name, path) if name else {}
        if not options:
            return cls.parse(target, **overrides)
        if bare and bare["user"]:
            _refuse_contradictions(target, {"user": bare["user"]}, overrides)
        user = bare["user"] if bare and bare["user"] else options.get("User")
        fields: dict[str, Any] = {
            "host": options.get("Hostname", name),
            "port": int(options.get("Port", 22)),
            "user": user,
            "alias": name,
        }
        identity = [os.path.expanduser(p) for p in options.get("IdentityFile", [])]
        if identity:
            fields["key_paths"] = tuple(identity)
        jump = options.get("ProxyJump")
        if jump and str(jump).lower() != "none":
            fields["jump"] = tuple(cls.resolve(hop, path) for hop in str(jump).split(",") if hop.strip())
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    # -- identity ------------------------------------------------------------------------------------

    @property
    def login(self) -> str:
        """The user name sent to the server."""
        if self.token is not None:
            return self.token.get_secret_value()
        return self.user or getpass.getuser()

    @property
    def address(self) -> str:
        """host:port, an IPv6 host in brackets: the server alone, with no user name (which can be a
        credential: a gateway token, a relay's Pinggy Pro token)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def display(self) -> str:
        """A safe name for messages and logs (never contains a token)."""
        who = "<token>" if self.token is not None else (self.user or getpass.getuser())
        return f"{who}@{self.address}"

    def pool_key(self) -> tuple[Any, ...]:
        """Endpoints with equal keys may share a connection."""
        return (
            self.host,
            self.port,
            self.login,
            self.key_paths,
            self.key_material.get_secret_value() if self.key_material else None,
            self.password.get_secret_value() if self.password else None,
            self.use_agent,
            self.default_keys,
            self.host_key,
            tuple(j.pool_key() for j in self.jump),
            id(self.socket_factory) if self.socket_factory else None,
        )

    def __str__(self) -> str:
        return self.display


def _ssh_config_for(alias: str, path: Path) -> dict[str, Any]:
    """The options an OpenSSH client config gives `alias`; empty when the file or a Host block is missing."""
    if not path.is_file():
        return {}
    try:
        config = SSHClientConfig.load(None, [path], False, False, False, getpass.getuser(), (), alias, ())
    except Exception as exc:  # asyncssh raises ConfigParseError, but also OSError for unreadable files
        raise InvalidEndpoint(f"cannot read ssh config {path}: {exc}") from exc
    wanted = ("Hostname", "Port", "User", "IdentityFile", "ProxyJump")
    return {key: config.get(key) for key in wanted if config.get(key) is not None}
