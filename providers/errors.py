"""Errors of the providers layer. Messages say what happened and what to do next."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.errors import SandboxError


class ProviderError(SandboxError):
    """A provider could not do what was asked."""


class ConfigError(ProviderError, ValueError):
    """config.toml says something tether cannot use."""


class ProviderUnavailable(ProviderError):
    """The provider cannot be used here (not implemented yet, missing credentials, draining host)."""


class Unsupported(ProviderError):
    """The provider's capability profile does not offer this operation (pause, snapshot, …)."""

    def __init__(self, provider: str, operation: str, why: str = "") -> None:
        self.provider, self.operation = provider, operation
        instead = _INSTEAD.get(operation, "")
        super().__init__(
            f"the {provider} provider cannot {operation}{': ' + why if why else ''}; {instead}"
            "see its capability profile (pools_list, or tether pools --json)"
        )


# What to do when an operation is not offered, by operation.
_INSTEAD = {
    "pause": "leave it running (its idle timeout ends it, if it has one) or end it with sandbox_destroy "
    "(tether down); ",
    "snapshot": "copy what must be kept off the box (`tether cp SANDBOX:PATH .`, or Sandbox.download in Python); ",
}


class EndedWithLeftovers(ProviderError):
    """The machine counts as ended, but the provider could not clean up all of it (an attached
    host that could not be reached). The message says what was left where: the fleet records it
    as part of the sandbox's end (nothing would find the leftovers later)."""


class SandboxNotFound(ProviderError, LookupError):
    def __init__(self, ref: str) -> None:
        self.ref = ref
        super().__init__(f"no sandbox {ref!r}; list them with sandbox_list (or `tether ls`)")


class SandboxGone(ProviderError):
    """The sandbox exists in the ledger but was terminated."""

    def __init__(self, ref: str, status: str, message: str | None = None) -> None:
        default = f"sandbox {ref!r} is {status}; create a new one with sandbox_create (or `tether up`)"
        super().__init__(message or default)


@dataclass(frozen=True)
class Rejection:
    pool: str
    provider: str
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.pool} ({self.provider}): {'; '.join(self.reasons)}"


class DispatchError(ProviderError):
    """No pool can serve the request. `rejections` says why, pool by pool."""

    def __init__(self, summary: str, rejections: list[Rejection]) -> None:
        self.rejections = rejections
        if rejections:
            summary += ":\n" + "\n".join(f"  - {r}" for r in rejections)
        super().__init__(summary)


class AuthPinError(DispatchError):
    """An auth mode that needs this machine's credentials, with no local pool to run it."""
