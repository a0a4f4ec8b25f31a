"""Dial one SSH connection for an endpoint: jump hosts, credentials, host-key pinning, clear errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh.public_key import get_default_public_key_algs

from .endpoint import SSHEndpoint
from .errors import AuthFailed, ConnectError, ConnectTimeout, HostKeyMismatch, Unreachable
from .hostkeys import HostKeyPins, fingerprint_of, openssh_line

KEEPALIVE_COUNT_MAX = 3
PREFERRED_CIPHERS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
]
MSG_IGNORE = 2  # RFC 4253
_EMPTY_STRING = (b"\0\0\0\0",)  # an SSH string of no bytes
_hop_closers: set[asyncio.Task[None]] = set()


class _PinningClient(asyncssh.SSHClient):
    """Accepts the pinned key, pins an unknown one, and remembers a mismatch so dial() can report it."""

    def __init__(self, endpoint: SSHEndpoint, pins: HostKeyPins) -> None:
        self._endpoint = endpoint
        self._pins = pins
        self.mismatch: tuple[str, str] | None = None
        self.first_seen: str | None = None
        self.on_connected: Callable[[], None] | None = None  # the transport is up: the login begins
        self.transport_up = False

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.transport_up = True
        if self.on_connected is not None:
            self.on_connected()

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        presented = openssh_line(key)
        pinned = self._endpoint.host_key or self._pins.get(self._endpoint.host, self._endpoint.port)
        if pinned is None:
            # Pinned by dial() once login succeeded: only then has the server proved it holds the key.
            self.first_seen = presented
            return True
        if _same_key(pinned, presented):
            return True
        self.mismatch = (fingerprint_of(pinned), fingerprint_of(presented))
        return False


class _Redact(logging.Filter):
    """asyncssh logs the user name it logs in as ("Beginning auth for user %s"); when that name is
    a gateway token (or a relay's, in tunnels), the log would hold a credential. Rewrites such
    records before any handler. Secrets are added with `redact_in_logs`."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(secret in message for secret in self.secrets):
                for secret in self.secrets:
                    message = message.replace(secret, "<token>")
                record.msg, record.args = message, ()
        return True


_REDACT = _Redact()
logging.getLogger("asyncssh").addFilter(_REDACT)


def redact_in_logs(secret: str) -> None:
    """From now on, asyncssh's log records show `secret` (a user name that is a credential) as <token>."""
    if secret:
        _REDACT.secrets.add(secret)


class _CorkedTransport:
    """A connection's transport that sends fewer, larger writes.

    asyncssh writes every SSH packet to the socket on its own: a system call (and a TCP segment for
    the peer to read) per packet. Here the writes of one pass of the event loop are gathered and
    leave together at its end, in order: the requests of an asyncio.gather go out in one send, and a
    relayed download runs about twice as fast on a 2-core machine.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.BaseTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []  # writes gathered until the end of this pass

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._end_pass)
        self._pending.append(data)

    def _end_pass(self) -> None:
        parts, self._pending = self._pending, []
        if parts and not self._transport.is_closing():
            with contextlib.suppress(ConnectionError):  # (as asyncssh's own write does)
                self._transport.write(parts[0] if len(parts) == 1 else b"".join(parts))  # type: ignore[attr-defined]

    def close(self) -> None:
        self._end_pass()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def streamline(conn: asyncssh.SSHConnection) -> None:
    """Make a connection cheaper per packet (asyncssh internals: left alone if they change). For
    the client side of every dial, and the embedded server's side of its connections.

    Its writes are corked (above). And asyncssh puts an empty MSG_IGNORE before every packet it
    sends, a defence for CBC ciphers, which tether never offers (PREFERRED_CIPHERS): with an AEAD
    or CTR cipher the extra packet only costs both ends an encryption and a decryption. It is left
    out, unless a CBC cipher somehow is in use.
    """
    transport = getattr(conn, "_transport", None)
    if transport is not None and hasattr(transport, "write") and not isinstance(transport, _CorkedTransport):
        conn._transport = _CorkedTransport(transport, asyncio.get_running_loop())
    send_packet = getattr(conn, "send_packet", None)
    if send_packet is None:
        return

    def without_empty_ignores(pkttype: int, *args: bytes, **options: Any) -> None:
        if pkttype == MSG_IGNORE and args == _EMPTY_STRING and "cbc" not in str(conn.get_extra_info("send_cipher")):
            return
        send_packet(pkttype, *args, **options)

    # (asyncssh's send_packet sends its MSG_IGNORE through self.send_packet: it comes here)
    conn.send_packet = without_empty_ignores  # type: ignore[method-assign]


def _same_key(a: str, b: str) -> bool:
    return a.split()[:2] == b.split()[:2]


# Host keys as plain keys, never certificates (OpenSSH's or X.509): tether pins the key itself, and
# asyncssh would take a certificate on a CA's word instead, refusing one signed by a CA it does not
# know (a host with a HostCertificate could not be attached) and accepting, unpinned, one whose CA
# is in ~/.ssh/ca-bundle.crt. A host with a certificate has its plain key too.
PLAIN_HOST_KEY_ALGS = [alg.decode() for alg in get_default_public_key_algs()]


def _connect_options(endpoint: SSHEndpoint, pinned: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "username": endpoint.login,
        # We resolved ~/.ssh/config ourselves (SSHEndpoint.resolve); don't let asyncssh apply it again.
        "config": None,
        # An empty trust list routes every key through _PinningClient.validate_host_public_key.
        "known_hosts": ([], [], []),
        # Both phases are timed by _dial_one: asyncssh's connect_timeout would cover the login too.
        "connect_timeout": None,
        "login_timeout": endpoint.login_timeout,
        "keepalive_interval": endpoint.keepalive_interval or None,
        "keepalive_count_max": KEEPALIVE_COUNT_MAX,
        "gss_host": None,
        "kbdint_auth": False,
        # AES-GCM first: asyncssh encrypts chacha20-poly1305 with several cipher contexts per packet
        # in Python, which costs more CPU per small request than the request itself (AES-GCM is one
        # call into OpenSSL). Every OpenSSH since 6.2 offers it; chacha20 stays as a fallback.
        "encryption_algs": PREFERRED_CIPHERS,
        "server_host_key_algs": PLAIN_HOST_KEY_ALGS,
        "x509_trusted_certs": None,
    }
    if pinned:
        # Ask for the pinned key's kind, or a server with several keys may show another one. Its
        # signature algorithms, not its type name: an ssh-rsa key signs with rsa-sha2-256/512.
        options["server_host_key_algs"] = [alg.decode() for alg in asyncssh.import_public_key(pinned).sig_algorithms]
    if endpoint.token is not None:
        # Gateway auth: the token is the user name and "none" auth is the only method offered.
        redact_in_logs(endpoint.token.get_secret_value())
        options.update(client_keys=None, agent_path=None, password=None, preferred_auth="none")
        return options
    keys: list[Any] = [os.path.expanduser(path) for path in endpoint.key_paths]
    if endpoint.key_material is not None:
        try:
            keys.append(asyncssh.import_private_key(endpoint.key_material.get_secret_value()))
        except asyncssh.KeyImportError as exc:
            raise AuthFailed(f"{endpoint.display}: the key material is not a usable private key: {exc}") from None
    if keys:
        options["client_keys"] = keys
        # Encrypted key files (checked by _encrypted_keys) are left out; the agent may hold them.
        options["ignore_encrypted"] = True
    elif not endpoint.default_keys:
        options["client_keys"] = None  # (asyncssh's way of saying none: left out, it loads ~/.ssh's)
    if not endpoint.use_agent:
        options["agent_path"] = None
    if endpoint.password is not None:
        options["password"] = endpoint.password.get_secret_value()
    return options


async def dial(endpoint: SSHEndpoint, pins: HostKeyPins) -> asyncssh.SSHClientConnection:
    """Open a connection to `endpoint`, through its jump hosts.

    Raises:
        HostKeyMismatch: the server's key differs from the pinned one.
        AuthFailed: every credential was refused.
        ConnectTimeout: connect or login took longer than the endpoint allows.
        Unreachable: the address could not be reached.
    """
    tunnel: asyncssh.SSHClientConnection | None = None
    hops: list[asyncssh.SSHClientConnection] = []
    try:
        for hop in endpoint.jump:
            tunnel = await _dial_one(hop, pins, tunnel)
            hops.append(tunnel)
        conn = await _dial_one(endpoint, pins, tunnel)
    except BaseException:
        for hop_conn in reversed(hops):
            hop_conn.close()
        raise
    if hops:
        # The jump connections live exactly as long as the connection through them.
        async def close_hops() -> None:
            await conn.wait_closed()
            for hop_conn in reversed(hops):
                hop_conn.close()

        task = asyncio.get_running_loop().create_task(close_hops())
        _hop_closers.add(task)
        task.add_done_callback(_hop_closers.discard)
    return conn


async def _dial_one(
    endpoint: SSHEndpoint, pins: HostKeyPins, tunnel: asyncssh.SSHClientConnection | None
) -> asyncssh.SSHClientConnection:
    pinned = endpoint.host_key or pins.get(endpoint.host, endpoint.port)
    client = _PinningClient(endpoint, pins)
    encrypted = _encrypted_keys(endpoint) if endpoint.token is None else []
    options = _connect_options(endpoint, pinned)
    if tunnel is not None:
        options["tunnel"] = tunnel
    sock = None
    loop = asyncio.get_running_loop()
    try:
        # Two phases, each with its own limit: reaching the server (connect_timeout), then key
        # exchange and authentication (login_timeout), which starts once the transport is up.
        async with asyncio.timeout(endpoint.connect_timeout) as phase:
            client.on_connected = lambda: phase.reschedule(loop.time() + endpoint.login_timeout)
            if endpoint.socket_factory is not None:
                sock = await endpoint.socket_factory()
                options["sock"] = sock
            try:
                conn, _ = await asyncssh.create_connection(lambda: client, endpoint.host, endpoint.port, **options)
            except (asyncssh.KeyExchangeFailed, asyncssh.ConnectionLost, ConnectionResetError):
                if not pinned or options["server_host_key_algs"] == PLAIN_HOST_KEY_ALGS or endpoint.socket_factory:
                    raise
                # Asked only for the pinned key's kind, the server may have none of it left (its key
                # was replaced by one of another kind): ask for any, to name the key it now presents.
                options["server_host_key_algs"] = PLAIN_HOST_KEY_ALGS
                client.transport_up = False
                phase.reschedule(loop.time() + endpoint.connect_timeout)
                conn, _ = await asyncssh.create_connection(lambda: client, endpoint.host, endpoint.port, **options)
        if client.first_seen is not None:
            pins.pin(endpoint.host, endpoint.port, client.first_seen)
            # Several first dials may race: only the key that won the pin may be used.
            winner = pins.get(endpoint.host, endpoint.port)
            if winner is not None and winner.split()[:2] != client.first_seen.split()[:2]:
                conn.close()
                raise HostKeyMismatch(
                    endpoint.host, endpoint.port, fingerprint_of(winner), fingerprint_of(client.first_seen)
                )
        streamline(conn)
        return conn
    except asyncssh.HostKeyNotVerifiable as exc:
        if client.mismatch:
            raise HostKeyMismatch(endpoint.host, endpoint.port, *client.mismatch) from None
        raise ConnectError(f"{endpoint.display}: host key not accepted: {exc.reason}") from None
    except asyncssh.PermissionDenied:
        if encrypted:  # (left out, and the agent did not have it)
            raise AuthFailed(
                f"{endpoint.display}: authentication failed; {_encrypted_advice(encrypted)} "
                f"(the server refused the rest: {_offered(endpoint)})"
            ) from None
        raise AuthFailed(
            f"{endpoint.display}: authentication failed; the server refused {_offered(endpoint)}. "
            "Check the user name and that the key is in the account's authorized_keys"
        ) from None
    except TimeoutError:
        if client.transport_up:
            raise ConnectTimeout(
                f"{endpoint.display}: connected, but the SSH login did not finish within "
                f"{endpoint.login_timeout:g}s (login_timeout); is it an SSH server, and is it overloaded?"
            ) from None
        raise ConnectTimeout(
            f"{endpoint.display}: could not connect within {endpoint.connect_timeout:g}s (connect_timeout); "
            "check that the host is up and the port is right"
        ) from None
    except asyncssh.ConnectionLost as exc:
        if "timeout" in (exc.reason or "").lower():
            raise ConnectTimeout(
                f"{endpoint.display}: login did not finish within {endpoint.login_timeout:g}s"
            ) from None
        raise Unreachable(
            f"{endpoint.display}: connection closed during login: {exc.reason}; the server may refuse this user or "
            "address (its sshd log says why), or be overloaded"
        ) from None
    except (OSError, asyncssh.DisconnectError) as exc:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise Unreachable(
            f"{endpoint.display}: cannot connect: {reason}; check the host name and port, and that an SSH "
            "server runs there"
        ) from None


def _encrypted_keys(endpoint: SSHEndpoint) -> list[str]:
    """The endpoint's key files that have a passphrase, which tether cannot ask for. Read up front:
    a file that is missing or not a private key is an AuthFailed naming it and what to do (asyncssh's
    own "Invalid private key" names neither), and an encrypted one with no other way to log in too.
    """
    encrypted = []
    for path in endpoint.key_paths:
        expanded = os.path.expanduser(path)
        if not os.path.isfile(expanded):
            raise AuthFailed(f"{endpoint.display}: key file {path} does not exist; check the identity path")
        try:
            asyncssh.read_private_key(expanded)
        except asyncssh.KeyImportError as exc:
            if "passphrase" not in str(exc).lower():
                raise AuthFailed(
                    f"{endpoint.display}: key file {path} is not a private key ({exc}); give the private key "
                    "file (not the .pub), in OpenSSH, PEM or PKCS#8 format"
                ) from None
            encrypted.append(path)
        except OSError as exc:
            raise AuthFailed(f"{endpoint.display}: cannot read key file {path}: {exc.strerror or exc}") from None
    others = len(encrypted) < len(endpoint.key_paths) or endpoint.key_material or endpoint.password
    if encrypted and not (others or _agent_usable(endpoint)):
        raise AuthFailed(f"{endpoint.display}: {_encrypted_advice(encrypted)}")
    return encrypted


def _agent_usable(endpoint: SSHEndpoint) -> bool:
    return endpoint.use_agent and bool(os.environ.get("SSH_AUTH_SOCK"))


def _encrypted_advice(encrypted: list[str]) -> str:
    files = ", ".join(encrypted)
    return (
        f"key file {files} is encrypted (has a passphrase, which tether cannot ask for): add it to ssh-agent "
        f"(`ssh-add {encrypted[0]}`) and omit --identity/key_path/identityFile, or use a key without a passphrase"
    )


def _offered(endpoint: SSHEndpoint) -> str:
    if endpoint.token is not None:
        return "the gateway token"
    offered = []
    if endpoint.key_paths or endpoint.key_material:
        offered.append("the configured key")
    elif endpoint.default_keys:
        offered.append("the default keys in ~/.ssh")
    if endpoint.use_agent:
        offered.append("the ssh-agent's keys")
    if endpoint.password is not None:
        offered.append("the password")
    return ", ".join(offered) or "a login with no key (none was named)"
