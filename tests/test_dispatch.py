"""Dispatch: requests × pools → the chosen pool, or every pool's rejection reasons; the auth-mode pin;
and pools from config.toml."""

from __future__ import annotations

import tomllib

import pytest
from pydantic import ValidationError

from providers import AuthPinError, ConfigError, DispatchError, Request
from providers.config import LocalPoolConfig, Pool, implicit_pools, load_pools
from providers.dispatch import choose_pool
from providers.ledger import new_sandbox_id

CONFIG = tomllib.loads("""
[[pools]]
name = "laptop"
provider = "local"
config = { note = "the Mac on my desk", owner = "mark" }

[[pools]]
name = "ci-box"
provider = "local"
active = false

[[pools]]
name = "daytona"
provider = "daytona"

[[pools]]
name = "daytona-node"
provider = "daytona"
config = { image = "registry.example.com/worker-node:v1", diskGB = 40 }
[pools.runtime_provides]
runtimeKinds = ["npm", "python-pip", "http", "mcp-server", "a2a-protocol"]
requirementKinds = ["long-running", "network-egress", "git", "full-history-clone", "toolchain:node"]

[[pools]]
name = "modal-gpu"
provider = "modal"
config = { gpu = "a10g" }
[pools.runtime_provides]
runtimeKinds = ["npm", "python-pip", "http", "mcp-server", "a2a-protocol"]
requirementKinds = ["long-running", "network-egress", "git", "full-history-clone", "gpu"]

[[pools]]
name = "gpu-box"
provider = "ssh"
config = { host = "me@gpu-box.lan", identityFile = "~/.ssh/id_gpu" }
[pools.runtime_provides]
runtimeKinds = ["native"]
requirementKinds = ["persistent-storage", "long-running", "gpu", "git"]
""")
POOLS = load_pools(CONFIG)


def everything_available(pool: Pool) -> str | None:
    return None


def no_daytona_key(pool: Pool) -> str | None:
    return "missing credentials: set DAYTONA_API_KEY" if pool.provider == "daytona" else None


@pytest.mark.parametrize(
    ("request_fields", "chosen"),
    [
        ({}, "laptop"),
        ({"requirements": ["toolchain:go", "host-binary"]}, "laptop"),
        ({"runtime_kinds": ["host-binary", "workarea"]}, "laptop"),
        ({"provider": "daytona"}, "daytona"),
        ({"provider": "daytona", "requirements": ["toolchain:node"]}, "daytona-node"),
        ({"gpu": "a10g"}, "modal-gpu"),
        ({"requirements": ["gpu", "persistent-storage"]}, "gpu-box"),
        ({"pool": "gpu-box"}, "gpu-box"),
        ({"auth_mode": "host-session"}, "laptop"),
        ({"auth_mode": "local", "requirements": ["git"]}, "laptop"),
        ({"auth_mode": "api-key", "provider": "modal"}, "modal-gpu"),
    ],
)
def test_dispatch_table(request_fields: dict, chosen: str) -> None:
    assert choose_pool(Request(**request_fields), POOLS, everything_available).name == chosen


def test_a_failed_dispatch_lists_every_pools_reason() -> None:
    with pytest.raises(DispatchError) as caught:
        choose_pool(Request(requirements=["gpu", "toolchain:go"]), POOLS, everything_available)
    reasons = {r.pool: r.reasons for r in caught.value.rejections}
    assert set(reasons) == {p.name for p in POOLS}
    fix = "(if its machines have them, add them to its runtime_provides)"
    assert reasons["laptop"] == (f"lacks requirement kinds gpu {fix}",)
    assert reasons["modal-gpu"] == (f"lacks requirement kinds toolchain:go {fix}",)
    # an implicit pool (no config): there is no runtime_provides to edit, nor should a GPU be claimed
    implicit = [Pool(name="local", provider="local", implicit=True)]
    with pytest.raises(DispatchError) as alone:
        choose_pool(Request(gpu="a100"), implicit, everything_available)
    assert alone.value.rejections[0].reasons == (
        "lacks requirement kinds gpu (configure a [[pools]] entry for a machine that has them)",
    )
    assert "inactive (set active = true in config.toml)" in reasons["ci-box"]
    message = str(caught.value)
    assert (
        "requirements gpu, toolchain:go" in message
        and "- gpu-box (ssh): lacks requirement kinds toolchain:go" in message
    )


def test_a_pool_that_does_not_exist_is_named_with_the_pools_there_are() -> None:
    with pytest.raises(DispatchError, match=r"^no pool named 'lapotp'; the pools here: laptop, ") as caught:
        choose_pool(Request(pool="lapotp"), POOLS, everything_available)
    assert caught.value.rejections == []


def test_unavailable_providers_are_rejected_with_the_reason() -> None:
    with pytest.raises(DispatchError) as caught:
        choose_pool(Request(provider="daytona"), POOLS, no_daytona_key)
    reasons = {r.pool: r.reasons for r in caught.value.rejections}
    assert reasons["daytona"] == ("missing credentials: set DAYTONA_API_KEY",)
    assert reasons["laptop"] == ("provider is local, not the requested daytona",)


@pytest.mark.parametrize("spelling", ["host_session", "Host-Session", " LOCAL "])
def test_auth_modes_pin_however_they_are_spelled(spelling: str) -> None:
    with pytest.raises(AuthPinError):
        choose_pool(Request(auth_mode=spelling, provider="e2b"), POOLS, lambda pool: None)


@pytest.mark.parametrize(
    ("typo", "meant"), [("host-sesion", "host-session"), ("hostsession", "host-session"), ("locl", "local")]
)
def test_a_near_miss_of_a_pinned_auth_mode_is_refused_not_taken_for_another(typo: str, meant: str) -> None:
    with pytest.raises(ValidationError, match=f"did you mean '{meant}'"):
        Request(auth_mode=typo, provider="e2b")


def test_auth_pin_refuses_cloud_providers_before_dispatch() -> None:
    with pytest.raises(AuthPinError, match="runs only on local pools, not on daytona"):
        choose_pool(Request(auth_mode="host-session", provider="daytona"), POOLS, everything_available)


def test_auth_pin_with_no_active_local_pool_fails_at_validation() -> None:
    pools = [p for p in POOLS if p.name != "laptop"]  # ci-box is local but inactive
    called = []

    def availability(pool: Pool) -> str | None:
        called.append(pool.name)  # a provider would be consulted here
        return None

    with pytest.raises(AuthPinError) as caught:
        choose_pool(Request(auth_mode="local"), pools, availability)
    assert "no local pool is active" in str(caught.value) and "ci-box (local): inactive" in str(caught.value)
    assert called == []


async def test_auth_pin_is_not_bypassed_by_naming_the_local_provider(tmp_path, monkeypatch) -> None:
    """A fleet makes up a pool for a provider the config lacks, but not for a pinned auth mode:
    with no local pool configured, the request fails before any sandbox is recorded."""
    from providers import Fleet

    monkeypatch.setenv("TETHER_STATE_DIR", str(tmp_path))
    fleet = Fleet(config={"pools": [{"name": "gpu-box", "provider": "ssh", "config": {"host": "me@gpu"}}]})
    try:
        with pytest.raises(AuthPinError) as caught:
            await fleet.create(Request(auth_mode="host-session", provider="local"))
        assert "no local pool is active" in str(caught.value)
        assert "no pools are configured" not in str(caught.value)
        assert fleet.list(include_terminated=True) == []
        plain = await fleet.create(Request(provider="local"))  # without the pin, an ad-hoc local pool
        await plain.destroy()
    finally:
        await fleet.close()


async def test_auth_pin_is_not_bypassed_by_a_host_option(tmp_path, monkeypatch) -> None:
    """Only an ssh request with a host is an ad-hoc attach: a host option on a pinned local request
    makes up no pool, and an inactive local pool stays inactive."""
    from providers import Fleet

    monkeypatch.setenv("TETHER_STATE_DIR", str(tmp_path))
    fleet = Fleet(config={"pools": [{"name": "laptop", "provider": "local", "active": False}]})
    try:
        for request in (
            Request(provider="local", auth_mode="host-session", options={"host": "anything"}),
            Request(provider="local", options={"host": "anything"}),
        ):
            with pytest.raises((AuthPinError, DispatchError), match="laptop \\(local\\): inactive"):
                await fleet.create(request)
        assert fleet.list(include_terminated=True) == []
    finally:
        await fleet.close()


async def test_defaults_pool_goes_first_but_does_not_overrule_what_a_request_needs(tmp_path, monkeypatch) -> None:
    """[defaults] pool is where a request that says nothing goes; a request with an auth mode or
    requirements is dispatched over every pool, the default first."""
    from providers import Fleet

    monkeypatch.setenv("TETHER_STATE_DIR", str(tmp_path))
    config = {
        "defaults": {"pool": "gpu", "provider": "local"},  # (the pool wins: provider is for when none is named)
        "pools": [
            {"name": "gpu", "provider": "ssh", "config": {"host": "me@gpu.example"}},
            {"name": "laptop", "provider": "local", "config": {"resources": {"timeoutSec": 60}, "owner": "mark"}},
        ],
    }
    fleet = Fleet(config=config)
    try:
        assert fleet._choose(fleet._with_defaults(Request())).name == "gpu"
        assert fleet._choose(fleet._with_defaults(Request(auth_mode="local"))).name == "laptop"
        assert fleet._choose(fleet._with_defaults(Request(requirements=["toolchain:go"]))).name == "laptop"
        assert fleet._choose(fleet._with_defaults(Request(requirements=["long-running"]))).name == "gpu"
        # a local pool's config is metadata, whatever keys it holds: none of it is read
        box = await fleet.create(Request(pool="laptop", name="meta"))
        assert box.record.expires_at is None
        await box.destroy()
    finally:
        await fleet.close()


def test_local_pool_config_is_kept_as_metadata() -> None:
    laptop = POOLS[0]
    assert isinstance(laptop.config, LocalPoolConfig)
    assert laptop.config.model_dump() == {"note": "the Mac on my desk", "owner": "mark"}


def test_runtime_provides_overrides_the_substrate() -> None:
    by_name = {p.name: p for p in POOLS}
    assert "toolchain:node" in by_name["daytona-node"].substrate().requirement_kinds
    assert "toolchain:node" not in by_name["daytona"].substrate().requirement_kinds
    assert by_name["daytona-node"].config.diskGB == 40 and by_name["daytona"].config.diskGB == 20


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[pools]]\nname = "d"\nprovider = "daytona"\nconfig = { diskGb = 40 }', "diskGb: unknown key"),
        ('[[pools]]\nname = "e"\nprovider = "e2b"\nconfig = { templateId = 5 }', "templateId"),
        ('[[pools]]\nname = "x"\nprovider = "nimbus"', "unknown provider 'nimbus'"),
        ('[[pools]]\nname = "a"\nprovider = "local"\n[[pools]]\nname = "a"\nprovider = "local"', "repeated: a"),
        ('[[pools]]\nname = "m"\nprovider = "modal"\nsize = "big"', "size"),
        ('[[pools]]\nname = "l"\nprovider = "local"\nactive = "no"', "active"),  # not quietly true
        ('[[pools]]\nname = "d"\nprovider = "daytona"\nconfig = { resources = { timeoutSec = "3600" } }', "timeoutSec"),
        # Modal's resource defaults are Modal's: Daytona's page names timeoutSec alone, E2B's no resources
        ('[[pools]]\nname = "d"\nprovider = "daytona"\nconfig = { resources = { cpu = 4.0 } }', "cpu: unknown key"),
        ('[[pools]]\nname = "e"\nprovider = "e2b"\nconfig = { resources = { timeoutSec = 60 } }', "resources: unknown"),
        ("pools = [1]", "each pool is a table"),
        ('[[pools]]\nname = "m"\nprovider = "modal"\nconfig = { gpu = "a100:0" }', "'a100:0' is not a GPU"),
        (
            '[[pools]]\nname = "m"\nprovider = "modal"\nconfig = { resources = { timeoutSec = 100000000000 } }',
            "timeoutSec: Input should be less than or equal",
        ),
        ("pools = {}", "array of tables"),  # (an empty table is no empty list of pools)
        ("pools = false", "array of tables"),
        ("providers = [1]", "array of tables"),
        (
            '[[pools]]\nname = "s"\nprovider = "ssh"\nconfig = { host = "me@h" }\n'
            'runtime_provides = { runtimeKinds = ["native"], requirementKinds = ["host-binary"] }',
            "host-binary is exclusive to the local provider",
        ),
    ],
)
def test_bad_pool_config_is_refused_with_the_key_named(toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_pools(tomllib.loads(toml))


def test_implicit_pools_follow_the_credentials_in_the_environment() -> None:
    assert [p.name for p in implicit_pools({})] == ["local"]
    env = {"E2B_API_KEY": "k", "MODAL_TOKEN_ID": "i", "RUNPOD_API_KEY": "r"}  # modal lacks its secret
    pools = implicit_pools(env)
    assert [p.name for p in pools] == ["local", "e2b", "runpod"] and all(p.implicit for p in pools)
    assert load_pools({}, environ={"DAYTONA_API_KEY": "k"})[1].config.daytonaApiUrl == "https://app.daytona.io/api"


async def test_a_default_provider_without_a_pool_is_still_a_candidate(tmp_path, monkeypatch) -> None:
    """[defaults] provider = "local" with only an ssh pool configured: a request that says what it
    needs still has the local provider's implicit pool, first."""
    from providers import Fleet

    monkeypatch.setenv("TETHER_STATE_DIR", str(tmp_path))
    config = {
        "defaults": {"provider": "local"},
        "pools": [{"name": "remote", "provider": "ssh", "config": {"host": "me@remote.example"}}],
    }
    fleet = Fleet(config=config)
    try:
        for request in (Request(), Request(requirements=["toolchain:go"])):
            assert fleet._choose(fleet._with_defaults(request)).provider == "local"
    finally:
        await fleet.close()


@pytest.mark.parametrize("value", ["inf", "nan", "1e12", "-1"])
def test_config_defaults_are_bounded_like_requests(value: str) -> None:
    from providers.config import load_defaults

    with pytest.raises(ConfigError, match="ttl_s"):
        load_defaults({"defaults": {"ttl_s": float(value)}})


def test_an_unknown_default_provider_is_refused_when_the_config_loads() -> None:
    """It used to load, and the first create failed with a raw pydantic error."""
    from providers import Fleet
    from providers.config import load_defaults

    with pytest.raises(ConfigError, match=r"\[defaults\]: provider: .*unknown provider 'bogus'; known: local, ssh"):
        load_defaults({"defaults": {"provider": "bogus"}})
    with pytest.raises(ConfigError, match="unknown provider 'bogus'"):
        Fleet(config={"defaults": {"provider": "bogus"}})


def test_a_name_cannot_take_the_form_of_a_sandbox_id() -> None:
    """Sandboxes are found by id before name: a sandbox named like another's id could not be reached."""
    with pytest.raises(ValidationError, match="form of a sandbox id"):
        Request(name=new_sandbox_id())
    assert Request(name="sb-web").name == "sb-web"
    for unusable in ("my box", "-x", ".hidden", "a/b", "x" * 64):
        with pytest.raises(ValidationError, match="is not a usable name: start with a letter or digit"):
            Request(name=unusable)
    assert Request(name="x" * 63).name == "x" * 63
