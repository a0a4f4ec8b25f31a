"""A provider for crash tests: it creates its "machine" (a directory standing in for a cloud account,
$TETHER_TEST_CLOUD), labels it with tether's id as every provider must, then hangs forever."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

from providers.base import Handle, ListedResource, Progress, Provider, ProvisionSpec, SandboxStatus, no_progress
from providers.config import LocalPoolConfig
from providers.profiles import PROFILES, SUBSTRATES


def account() -> Path:
    return Path(os.environ["TETHER_TEST_CLOUD"])


class HangProvider(Provider):
    name = "hang"
    profile = PROFILES["e2b"]
    substrate = SUBSTRATES["e2b"]
    config_model = LocalPoolConfig

    async def provision(self, spec: ProvisionSpec, progress: Progress = no_progress) -> Handle:
        # The machine appears in the account with its labels already on it, as a cloud's does: it is
        # made aside and moved in, so a listing never sees one half-made.
        staging = account().parent / f"staging-{spec.sandbox_id}"
        staging.mkdir()
        (staging / "labels.json").write_text(json.dumps(spec.labels))
        staging.rename(account() / f"vm-{spec.sandbox_id}")
        await asyncio.sleep(3600)  # the boot that never finishes
        raise AssertionError("unreachable")

    async def list(self) -> list[ListedResource]:
        listed = []
        for machine in sorted(account().iterdir()):
            labels = json.loads((machine / "labels.json").read_text())
            listed.append(
                ListedResource(
                    external_id=machine.name,
                    tether_id=labels.get("tether-id"),
                    installation=labels.get("tether-installation"),
                    status="running",
                    data={"dir": str(machine)},
                )
            )
        return listed

    async def terminate(self, handle: Handle) -> None:
        shutil.rmtree(handle.data["dir"], ignore_errors=True)

    async def status(self, handle: Handle) -> SandboxStatus:
        return "running" if Path(handle.data["dir"]).exists() else "terminated"


class UnlistedHangProvider(HangProvider):
    """The same, from a provider that keeps no listing of its machines (as ssh: attached hosts are
    people's own)."""

    name = "unlisted-hang"

    async def list(self) -> None:  # type: ignore[override]
        return None


class SlowEndingHangProvider(HangProvider):
    """The same, whose terminate takes a while and is counted (terminations.log beside the
    account): a second ending started during the first one shows."""

    name = "slow-ending-hang"

    async def terminate(self, handle: Handle) -> None:
        with open(account().parent / "terminations.log", "a") as log:
            log.write(f"{handle.data['dir']}\n")
        await asyncio.sleep(0.5)
        await super().terminate(handle)
