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


def test_status_mappings_match_the_seeds() -> None:
    daytona = seed_page(PAGES["daytona"])
    assert "creatingprovisioning" in daytona and "started, runningrunning" in daytona and "errorfailed" in daytona
    assert [map_status("daytona", s) for s in ("creating", "started", "running", "error", "archived")] == [
        "provisioning",
        "running",
        "running",
        "failed",
        "terminated",
    ]
    modal = seed_page(PAGES["modal"])
    for states, status in (
        ("creating, pending", "provisioning"),
        ("running, ready", "running"),
        ("error, failed", "failed"),
    ):
        assert re.search(rf"\|\s*{re.escape(states)}\s*\|\s*{status}\s*\|", modal)
        for state in states.split(", "):
            assert STATUS_MAPS["modal"][state] == status
    assert map_status("modal", "stopped") == "terminated"


def _config_default(page: str, key: str, type_name: str, column: int = 2) -> str:
    """A config table row's default, in `key | type | default | description` or run-together form."""
    for line in page.splitlines():
        cells = [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]
        if len(cells) > column and cells[0] == key:
            return cells[column]
        if line.startswith(key + type_name):
            return line[len(key + type_name) :]
    raise AssertionError(f"no config row {key} in the seed page")


@pytest.mark.parametrize(
    ("provider", "model", "rows"),
    [
        (
            "daytona",
            DaytonaPoolConfig,
            {"daytonaApiUrl": "string", "image": "string", "diskGB": "number", "user": "string", "command": "string[]"},
        ),
        ("e2b", E2BPoolConfig, {"templateId": "string", "launchRunnerInline": "boolean"}),
        ("modal", ModalPoolConfig, {"image": "string", "gpu": "string", "entrypoint": "string[]"}),
    ],
)
def test_pool_config_defaults_match_the_seeds(provider: str, model: type, rows: dict[str, str]) -> None:
    page = seed_page(PAGES[provider])
    defaults = model()
    for key, type_name in rows.items():
        seed_text = _config_default(page, key, type_name)
        ours = getattr(defaults, key)
        if ours is None:
            assert seed_text.startswith("-"), key
        elif isinstance(ours, list):
            assert seed_text.startswith(json.dumps(ours)), key
        elif isinstance(ours, bool):
            assert seed_text.startswith(str(ours).lower()), key
        else:
            assert seed_text.startswith(str(ours)), key
    assert set(type(defaults).model_fields) == {*rows, "resources"}


def test_resource_defaults_match_the_seed() -> None:
    page = seed_page(PAGES["modal"])
    resources = Resources()
    # | Field | Default | Description |
    assert _config_default(page, "cpu", "", column=1) == "2.0" == str(resources.cpu)
    assert _config_default(page, "memoryMB", "", column=1) == "2048" == str(resources.memoryMB)
    assert _config_default(page, "timeoutSec", "", column=1) == "3600" == str(resources.timeoutSec)


def test_every_provider_has_a_profile_substrate_and_config_model() -> None:
    assert set(PROFILES) == set(SUBSTRATES) == set(CONFIG_MODELS)
