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
    E2BPoolConfig,
    ModalPoolConfig,
    Resources,
)
from providers.profiles import PROFILES, STATUS_MAPS, SUBSTRATES, map_status

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
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
    table = seed_config_table(seed_page(PAGES[provider]))
    defaults = model()
    assert set(model.model_fields) == {*table, "resources"}
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
    lines = seed_page(PAGES["modal"]).splitlines()
    at = lines.index("| Field | Default | Description |")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[at + 2 : at + 5]]
    seed = {row[0]: row[1] for row in rows}
    assert seed == {key: str(value) for key, value in Resources().model_dump().items()}


def test_every_provider_has_a_profile_substrate_and_config_model() -> None:
    assert set(PROFILES) == set(SUBSTRATES) == set(CONFIG_MODELS)
