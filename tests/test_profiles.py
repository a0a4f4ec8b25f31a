"""Profiles, substrate defaults, status mappings and pool config defaults, compared field by field with
the seed documents in ../shared/seeds/ (the provider pages tether comes from)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from providers.config import (
    CONFIG_MODELS,
    DaytonaPoolConfig,
    DaytonaResources,
    E2BPoolConfig,
    ModalPoolConfig,
    Resources,
)
from providers.errors import ProviderError
from providers.profiles import PROFILES, STATUS_MAPS, SUBSTRATES, map_status

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
SPECS = SEEDS.parent / "specs"
PAGES = {"local": "Local Sandbox", "daytona": "Daytona Sandbox", "e2b": "E2B Sandbox", "modal": "Modal Sandbox"}
CAPABILITY_FIELDS = [
    "transportModel",
    "supportsFsSnapshot",
    "supportsPauseResume",
    "supportsCapacityQuery",
    "maxConcurrent",
    "maxSessionDurationSeconds",
    "regions",
    "os",
    "arch",
    "idleCostModel",
    "billingModel",
    "supportsGpu",
    "supportsCustomNetworkPolicy",
    "egressDefault",
]


def seed_page(title: str) -> str:
    for path in SEEDS.glob("*.txt"):
        text = path.read_text()
        if title in text.splitlines()[:3] or text.startswith(title) or f"\n{title}\n" in text[:200]:
            return text
    raise AssertionError(f"no seed page titled {title!r} in {SEEDS}")


def seed_cell(page: str, key: str) -> str | None:
    """The value cell of `key` in a capability or config table, in either layout the seeds use:
    `key | value |` rows, or key and value run together on one line."""
    for line in page.splitlines():
        stripped = line.strip().strip("|").strip().replace("`", "")
        if stripped.startswith(key):
            rest = stripped[len(key) :]
            if not rest or rest[0].isupper():
                continue  # a longer camelCase key that starts with this one
            if rest.lstrip().startswith("|"):
                return rest.lstrip(" |").split("|")[0].strip()
            return rest.strip()
    return None


@pytest.mark.parametrize("provider", sorted(PAGES))
def test_capability_profiles_match_the_seed_tables(provider: str) -> None:
    page = seed_page(PAGES[provider])
    cells = PROFILES[provider].cells()
    for field in CAPABILITY_FIELDS:
        expected = seed_cell(page, field)
        if expected is None:
            assert field not in cells, f"{provider}.{field} is not in the seed page, yet tether sets it"
            continue
        assert cells[field] == expected, f"{provider}.{field}"


@pytest.mark.parametrize("provider", sorted(PAGES))
def test_substrate_defaults_match_the_seeds(provider: str) -> None:
    page = seed_page(PAGES[provider])
    runtime = re.search(r"Runtime kinds: (.+)", page)
    requirement = re.search(r"Requirement kinds: (.+)", page)
    assert runtime and requirement
    assert SUBSTRATES[provider].runtime_kinds == [k.strip() for k in runtime.group(1).split(",")]
    assert SUBSTRATES[provider].requirement_kinds == [k.strip() for k in requirement.group(1).split(",")]


def test_derived_profiles_are_complete_and_documented() -> None:
    for provider in ("ssh", "runpod"):
        cells = PROFILES[provider].cells()
        assert set(cells) == set(CAPABILITY_FIELDS)
        assert SUBSTRATES[provider].runtime_kinds and SUBSTRATES[provider].requirement_kinds
    # the overview seed: RunPod is the GPU provider, A100s at ~$0.50/hour; host-binary is local's alone
    assert PROFILES["runpod"].supports_gpu and "gpu" in SUBSTRATES["runpod"].requirement_kinds
    assert "A100s at ~$0.50/hour" in seed_page("Runtimes")
    assert all("host-binary" not in SUBSTRATES[p].requirement_kinds for p in SUBSTRATES if p != "local")


PLATFORM_STATUSES = ("provisioning", "running", "failed", "terminated")


def seed_status_table(page: str, header: str) -> dict[str, str]:
    """A "<provider> state | Platform status" table, `state[, state…] → status`, in either layout
    (pipe rows, or state and status run together on one line); "others" names the fallback."""
    lines = page.splitlines()
    at = next(i for i, line in enumerate(lines) if line.replace("|", "").replace(" ", "").startswith(header))
    table: dict[str, str] = {}
    for line in lines[at + 1 :]:
        row = line.strip().strip("|").strip()
        if set(row) <= {"-", "|"} and row:
            continue  # the |---|---| rule
        cells = [c.strip() for c in row.split("|")]
        if len(cells) == 2 and cells[1] in PLATFORM_STATUSES:
            states, status = cells
        else:
            status = next((st for st in PLATFORM_STATUSES if row.endswith(st)), "")
            states = row[: -len(status)] if status else ""
        if not status or not states:
            break
        for state in states.split(","):
            table[state.strip()] = status
    return table


@pytest.mark.parametrize(
    ("provider", "header"), [("daytona", "DaytonastatePlatformstatus"), ("modal", "ModalstatusPlatformstatus")]
)
def test_status_mappings_match_the_seeds(provider: str, header: str) -> None:
    seed = seed_status_table(seed_page(PAGES[provider]), header)
    fallback = seed.pop("others")
    assert seed and fallback == "terminated"
    assert STATUS_MAPS[provider] == seed
    assert map_status(provider, "some-state-the-seed-does-not-name") == fallback
    assert all(map_status(provider, state.upper()) == status for state, status in seed.items())


def e2b_sandbox_states() -> list[str]:
    """SandboxState's enum in E2B's OpenAPI spec (YAML, read as text: no YAML parser needed)."""
    text = (SPECS / "e2b" / "openapi.yml").read_text()
    block = re.search(r"\n    SandboxState:\n((?:      .*\n|        .*\n)+)", text)
    assert block, "SandboxState moved in the E2B spec"
    return re.findall(r"^        - (\S+)$", block.group(1), re.MULTILINE)


def test_a_stopped_runpod_pod_is_not_taken_for_deleted() -> None:
    """EXITED: the container stopped, the pod still exists and bills its volume (RunPod's v2 spec);
    only TERMINATED is deleted."""
    assert map_status("runpod", "EXITED") == "failed" and map_status("runpod", "TERMINATED") == "terminated"


def runpod_pod_statuses() -> list[str]:
    """PodStatus's enum in RunPod's v2 spec; v1's desiredStatus (what the GraphQL API returns) is a subset."""
    v2 = json.loads((SPECS / "runpod" / "openapi-v2.json").read_text())["components"]["schemas"]["PodStatus"]["enum"]
    v1 = json.loads((SPECS / "runpod" / "openapi-v1.json").read_text())["components"]["schemas"]["Pod"]
    assert set(v1["properties"]["desiredStatus"]["enum"]) <= set(v2)
    return list(v2)


@pytest.mark.parametrize(("provider", "states"), [("e2b", e2b_sandbox_states), ("runpod", runpod_pod_statuses)])
def test_status_mappings_cover_every_state_of_the_api_specs(provider: str, states) -> None:  # type: ignore[no-untyped-def]
    """E2B's and RunPod's pages give no mapping: every state their API specs name has one."""
    spec = states()
    assert spec and sorted(STATUS_MAPS[provider]) == sorted(s.lower() for s in spec)
    assert all(map_status(provider, state) in (*PLATFORM_STATUSES, "paused") for state in spec)


def test_status_mappings_where_the_specs_are_plain() -> None:
    assert [map_status("e2b", s) for s in ("running", "paused")] == ["running", "paused"]
    assert [map_status("runpod", s) for s in ("PROVISIONING", "STARTING", "RUNNING", "ERROR", "TERMINATED")] == [
        "provisioning",
        "provisioning",
        "running",
        "failed",
        "terminated",
    ]


@pytest.mark.parametrize("provider", ["local", "ssh", "some-custom-provider"])
def test_map_status_refuses_a_provider_without_a_mapping(provider: str) -> None:
    with pytest.raises(
        ProviderError, match=f"no status mapping for provider '{provider}'.*daytona, e2b, modal, runpod"
    ):
        map_status(provider, "running")


CONFIG_TYPES = ("string[]", "string", "number", "boolean")


def seed_config_table(page: str) -> dict[str, tuple[str, str, bool]]:
    """The "Config key | Type | Default | Description" table: key → (type, text after the type,
    whether that text is the default cell alone). The run-together layout leaves the default run
    into its description (`diskGBnumber20Disk size…`)."""
    lines = page.splitlines()
    at = next(
        i for i, line in enumerate(lines) if line.replace("|", "").replace(" ", "") == "ConfigkeyTypeDefaultDescription"
    )
    table: dict[str, tuple[str, str, bool]] = {}
    for line in lines[at + 1 :]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1] in CONFIG_TYPES:
            table[cells[0]] = (cells[1], cells[2], True)
            continue
        if line.startswith("|---"):
            continue
        run_together = re.match(r"([a-z][A-Za-z0-9]*?)(string\[\]|string|number|boolean)(.+)", line.strip())
        if not run_together:
            break
        key, type_name, rest = run_together.groups()
        table[key] = (type_name, rest, False)
    return table


def _as_seed_text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


PYTHON_TYPES = {"string": str, "number": (int, float), "boolean": bool, "string[]": list}


@pytest.mark.parametrize(
    ("provider", "model"), [("daytona", DaytonaPoolConfig), ("e2b", E2BPoolConfig), ("modal", ModalPoolConfig)]
)
def test_pool_config_defaults_match_the_seeds(provider: str, model: type) -> None:
    page = seed_page(PAGES[provider])
    table = seed_config_table(page)
    defaults = model()
    # spec.resources where the page speaks of it (Modal's table, Daytona's timeoutSec), else not at all;
    # and the keys its text names (E2B: "Set config.snapshotId on the pool"), with no default
    named = set(re.findall(r"\bconfig\.([a-z][A-Za-z0-9]*)", page)) - set(table)
    assert set(model.model_fields) == {*table, *named, *(["resources"] if "spec.resources" in page else [])}
    assert all(getattr(defaults, key) is None for key in named)
    model.model_validate({key: "x" for key in named})  # (a pool may set them as the page says)
    for key, (type_name, text, whole_cell) in table.items():
        ours = getattr(defaults, key)
        expected = _as_seed_text(ours)
        if whole_cell:
            assert text == expected, key
        else:
            # The default, then a description that starts with a capital: `20Disk size…`, not `2` + `0Disk…`.
            assert text.startswith(expected) and (text == expected or text[len(expected)].isupper()), key
        assert ours is None or isinstance(ours, PYTHON_TYPES[type_name]), key


def test_resource_defaults_match_the_seed() -> None:
    """Modal's "Resource configuration" table, field for field; no other page gives these defaults."""
    lines = seed_page(PAGES["modal"]).splitlines()
    at = lines.index("| Field | Default | Description |")
    rows = []
    for line in lines[at + 2 :]:
        if line.count("|") < 3:
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    seed = {row[0]: row[1] for row in rows}
    assert seed == {key: str(value) for key, value in Resources().model_dump().items()}
    assert ModalPoolConfig().ttl() == (3600, False)
    assert ModalPoolConfig.model_validate({"resources": {"timeoutSec": 60}}).ttl() == (60, True)
    for provider in ("daytona", "e2b"):  # (nor cpu or memory: those are Modal's pool defaults alone)
        assert "memoryMB" not in seed_page(PAGES[provider]), provider


def test_daytona_timeout_sets_its_auto_stop_interval_as_the_seed_says() -> None:
    """Daytona's page: `autoStopInterval = ceil(timeoutSec / 60)  // minutes; default 30`, and no
    session ceiling (maxSessionDurationSeconds null): its timeoutSec is no TTL, and has no default."""
    page = seed_page(PAGES["daytona"])
    formula = re.search(r"autoStopInterval = ceil\(timeoutSec / 60\)\s*// minutes; default (\d+)", page)
    assert formula, "the seed's auto-stop formula moved"
    assert DaytonaResources.model_fields.keys() == {"timeoutSec"} and DaytonaResources().timeoutSec is None
    assert DaytonaPoolConfig().auto_stop_minutes() == int(formula.group(1)) == 30
    for timeout, minutes in ((60, 1), (61, 2), (1800, 30), (7200, 120)):
        config = DaytonaPoolConfig.model_validate({"resources": {"timeoutSec": timeout}})
        assert config.auto_stop_minutes() == minutes
    assert not hasattr(DaytonaPoolConfig(), "ttl") and PROFILES["daytona"].max_session_duration_seconds is None


def test_every_provider_has_a_profile_substrate_and_config_model() -> None:
    assert set(PROFILES) == set(SUBSTRATES) == set(CONFIG_MODELS)
