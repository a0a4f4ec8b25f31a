"""The ssh provider: machines you bring. tether attaches to them; it never creates or destroys them.

Attach by `user@host[:port]` or an ~/.ssh/config alias (ProxyJump works), offering tether's own key,
your ~/.ssh keys and your ssh-agent (or one identity file you name). The host key is pinned on first
use. Each attachment keeps its files in ~/.tether/sandboxes/<id>/ on the host; terminating detaches
and removes only that directory and the jobs tether started there (a host it cannot reach then is
detached all the same, its sandbox's end recording what was left there).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sandbox import Sandbox, SSHEndpoint
from sandbox.errors import InvalidArgument, InvalidEndpoint, SandboxError, validation_problems
from sandbox.jobs import STOP_JOBS_FN

from .base import Capacity, Handle, Progress, Provider, ProvisionSpec, Request, SandboxStatus, no_progress
from .capacity import remote_capacity
from .config import SSHPoolConfig
from .errors import EndedWithLeftovers, ProviderError
from .identity import tether_key
from .profiles import PROFILES, SUBSTRATES

DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")

# Stop the attachment's jobs, then remove its directory ($1).
_DETACH = STOP_JOBS_FN + '\n__t_stopjobs "$1/jobs"; rm -rf -- "$1"'


def identities(identity_file: str | None) -> tuple[str, ...]:
    """The named key, else tether's key and whichever default ~/.ssh keys exist. A named key's
    path is made absolute: the ledger keeps it for later commands, run from other directories."""
    if identity_file:
        return (str(Path(identity_file).expanduser().absolute()),)
    found = [str(tether_key())]
    for name in DEFAULT_IDENTITIES:
        path = Path.home() / ".ssh" / name
        if path.is_file():
            found.append(str(path))
    return tuple(found)


def endpoint_fields(endpoint: SSHEndpoint) -> dict[str, Any]:
    """What the ledger keeps to reach the host again: addresses and key paths, never secrets."""
    return {
        "host": endpoint.host,
        "port": endpoint.port,
        "user": endpoint.user,
        "key_paths": list(endpoint.key_paths),
        "use_agent": endpoint.use_agent,
        "alias": endpoint.alias,
        "jump": [endpoint_fields(j) for j in endpoint.jump],
    }


def endpoint_from_fields(fields: dict[str, Any]) -> SSHEndpoint:
    return SSHEndpoint(
        host=fields["host"],
        port=fields["port"],
        user=fields.get("user"),
        key_paths=tuple(fields.get("key_paths", ())),
        use_agent=fields.get("use_agent", True),
        alias=fields.get("alias"),
        jump=tuple(endpoint_from_fields(j) for j in fields.get("jump", [])),
    )


class SSHProvider(Provider):
    name = "ssh"
    profile = PROFILES["ssh"]
    substrate = SUBSTRATES["ssh"]
    config_model = SSHPoolConfig
    option_names = ("host", "user", "port", "key_path")
    sizes_by = ()  # (the machine as it is)

    def _target(self, options: dict[str, Any]) -> SSHEndpoint:
        config = self.pool.config if isinstance(self.pool.config, SSHPoolConfig) else None
        host = options.get("host") or (config.host if config else None)
        if not host:
            raise ProviderError(
                "the ssh provider needs a host: user@host[:port] or an ~/.ssh/config alias (host_attach, "
                "`tether attach HOST`, or an ssh pool with a host in config.toml)"
            )
        user = options.get("user") or (config.user if config else None)
        port = options["port"] if options.get("port") is not None else (config.port if config else None)
        key = options.get("key_path") or (config.identityFile if config else None)
        try:
            endpoint = SSHEndpoint.resolve(str(host), user=user, port=port)
        except ValidationError as exc:
            raise InvalidArgument(f"cannot attach to {host}: {validation_problems(exc)}") from None
        except InvalidEndpoint as exc:  # (an address it cannot read, or one at odds with user or port)
            raise InvalidArgument(f"cannot attach to {host}: {exc}") from None
        keys = identities(key) if key or not endpoint.key_paths else endpoint.key_paths
        return endpoint.model_copy(update={"key_paths": keys})

    def check_request(self, request: Request) -> None:
        super().check_request(request)
        self._target(request.options)  # (no host, or an address or port it cannot use: refused now)

    async def provision(self, spec: ProvisionSpec, progress: Progress = no_progress) -> Handle:
        endpoint = self._target(spec.request.options)
        await progress(f"connecting to {endpoint.display}", 0.2)
        directory = self.tether_dir(spec.sandbox_id)
        async with Sandbox(endpoint, pool=self.connections, tether_dir=directory) as box:
            # Logging in pins the host key; the label file marks the directory as this sandbox's.
            absolute = await box.resolve(directory)
            await box.write(f"{absolute}/labels.json", json.dumps({**spec.labels, "created_at": time.time()}))
        await progress(f"attached to {endpoint.display}", 1.0)
        return Handle(
            external_id=endpoint.display,
            data={**endpoint_fields(endpoint), "sandbox_id": spec.sandbox_id, "tether_dir": absolute},
        )

    async def endpoint(self, handle: Handle) -> SSHEndpoint:
        return endpoint_from_fields(handle.data)

    async def status(self, handle: Handle) -> SandboxStatus:
        return "running"  # tether doesn't manage the machine; reachability shows on the next call

    async def terminate(self, handle: Handle) -> None:
        """Detach: stop this attachment's jobs and remove its directory; nothing else is touched."""
        endpoint = endpoint_from_fields(handle.data)
        sandbox_id = handle.data.get("sandbox_id")
        directory = handle.data.get("tether_dir")
        if not sandbox_id or not directory:
            return
        try:
            async with Sandbox(endpoint, pool=self.connections, tether_dir=directory) as box:
                await box.exec_raw(["sh", "-c", _DETACH, "sh", directory], timeout=30)
        except SandboxError as exc:
            # Detached all the same (a host gone for good must not keep `tether down` failing), and
            # nothing would find the leftovers later (no listing for gc): the sandbox's end says so.
            raise EndedWithLeftovers(
                f"could not clean up on {endpoint.display} ({exc}): tether's jobs there may still run, "
                f"and {directory} is still there (the jobs' pids are under its jobs/); stop them and "
                "remove it when the host is back"
            ) from exc

    async def capacity(self, handle: Handle | None) -> Capacity:
        if handle is None:
            target = self._target({})
        else:
            target = endpoint_from_fields(handle.data)
        async with Sandbox(target, pool=self.connections, tether_dir="~/.tether") as box:
            return await remote_capacity(box)
