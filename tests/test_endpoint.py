"""SSHEndpoint: addresses, ssh_config aliases, ProxyJump, and secrets kept out of messages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import ConnectionPool, Sandbox, SSHEndpoint
from sandbox.errors import InvalidEndpoint
from tests.sshd import SSHD, ensure_account


@pytest.mark.parametrize(
    ("text", "user", "host", "port"),
    [
        ("box", None, "box", 22),
        ("alice@box", "alice", "box", 22),
        ("alice@box.example.com:2222", "alice", "box.example.com", 2222),
        ("[::1]:2200", None, "::1", 2200),
        ("bob@[fe80::1]", "bob", "fe80::1", 22),
        ("10.0.0.5:22", None, "10.0.0.5", 22),
    ],
)
def test_parse_addresses(text: str, user: str | None, host: str, port: int) -> None:
    endpoint = SSHEndpoint.parse(text)
    assert (endpoint.user, endpoint.host, endpoint.port) == (user, host, port)


@pytest.mark.parametrize("text", ["", "a b", "user@", "host:notaport", "host:99999", "-oProxyCommand=x", "a@b@c"])
def test_parse_refuses_what_is_not_an_address(text: str) -> None:
    with pytest.raises((InvalidEndpoint, ValueError)):
        SSHEndpoint.parse(text)


@pytest.mark.parametrize("user", ["-oProxyCommand=touch x", "a b", "$(id)", "`id`", "x;y", "bob%r", "", "tab\there"])
def test_login_names_that_could_read_as_options_or_shell_are_refused(user: str) -> None:
    with pytest.raises(ValueError, match="not a login name"):
        SSHEndpoint(host="box", user=user)


@pytest.mark.parametrize("user", ["alice", "a.b-c_d", "svc+ci", "alice@corp.example", "Étienne"])
def test_ordinary_login_names_are_accepted(user: str) -> None:
    assert SSHEndpoint(host="box", user=user).user == user


def test_secrets_never_show_in_messages() -> None:
    endpoint = SSHEndpoint(host="gw.example", token="tok-secret", password="pw-secret", key_material="KEY-secret")
    for text in (str(endpoint), repr(endpoint), endpoint.display, endpoint.model_dump_json()):
        assert "secret" not in text
    assert endpoint.login == "tok-secret"  # but the token is what goes on the wire


def test_address_names_the_server_alone() -> None:
    """host:port (an IPv6 host bracketed), with no user name: what names a relay whose user is a token."""
    assert SSHEndpoint.parse("alice@box.example:2222").address == "box.example:2222"
    v6 = SSHEndpoint.parse("bob@[fe80::1]")
    assert (v6.address, v6.display) == ("[fe80::1]:22", "bob@[fe80::1]:22")
    assert SSHEndpoint(host="gw.example", token="tok-secret").display == "<token>@gw.example:22"


def test_ssh_config_alias(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(
        "Host box\n  HostName 10.0.0.5\n  Port 2222\n  User alice\n  IdentityFile ~/.ssh/id_box\n"
        "  ProxyJump bob@jump.example:2200,hop2\n"
        "Host hop2\n  HostName 10.1.1.1\n  User carol\n"
    )
    endpoint = SSHEndpoint.resolve("box", config)
    assert (endpoint.host, endpoint.port, endpoint.user, endpoint.alias) == ("10.0.0.5", 2222, "alice", "box")
    assert endpoint.key_paths == (str(Path("~/.ssh/id_box").expanduser()),)
    assert [(j.user, j.host, j.port) for j in endpoint.jump] == [
        ("bob", "jump.example", 2200),
        ("carol", "10.1.1.1", 22),
    ]
    # not an alias: parsed as an address; an explicit user beats the config's
    assert SSHEndpoint.resolve("other:2200", config).host == "other"
    assert SSHEndpoint.resolve("dave@box", config).user == "dave"


@pytest.fixture
def jump_and_target(client_key: Path) -> Iterator[tuple[SSHD, SSHD]]:
    jump = SSHD(ensure_account("tether-jump", "/bin/bash", {".profile": ""}), client_key).start()
    target = SSHD(ensure_account("tether-bash", "/bin/bash"), client_key).start()
    yield jump, target
    jump.cleanup()
    target.cleanup()


async def test_proxyjump_through_a_second_sshd(
    jump_and_target: tuple[SSHD, SSHD], client_key: Path, tmp_path: Path, pool: ConnectionPool
) -> None:
    jump, target = jump_and_target
    config = tmp_path / "config"
    config.write_text(
        f"Host hop\n  HostName 127.0.0.1\n  Port {jump.port}\n  User {jump.account.name}\n  IdentityFile {client_key}\n"
        f"Host inner\n  HostName 127.0.0.1\n  Port {target.port}\n  User {target.account.name}\n"
        f"  IdentityFile {client_key}\n  ProxyJump hop\n"
    )
    endpoint = SSHEndpoint.resolve("inner", config, use_agent=False)
    assert endpoint.jump[0].port == jump.port
    async with Sandbox(endpoint, pool=pool) as box:
        assert (await box.run("whoami")).stdout.strip() == target.account.name
        # the target saw the connection arrive from the jump host's sshd, not from us directly
        assert jump.connection_pids()
        # both hosts' keys were pinned
        assert {port for _, port, _ in pool.pins.all()} >= {jump.port, target.port}
