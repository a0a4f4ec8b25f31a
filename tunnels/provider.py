"""The provider backend: the provider's own URL for a port (Daytona preview links with their token
header, E2B `{port}-{id}` hosts, RunPod's proxy, Modal's encrypted ports).

Each provider implements the hook (`Provider.preview_url` in providers/); tools hands it to the
tunnel manager as a PreviewSource, since this layer knows nothing of providers.
"""

from __future__ import annotations

from sandbox import Sandbox

from .base import BackendName, PreviewSource, PreviewURL, TunnelError


class NoProviderURLs(TunnelError):
    """The sandbox's provider has no URLs of its own (local, ssh): under auto, not worth a word."""


class ProviderURL:
    def __init__(self, preview: PreviewURL) -> None:
        self.url = preview.url
        self.headers = dict(preview.headers)

    async def close(self) -> None:
        """The provider's URL lives as long as the sandbox; nothing to tear down."""


class ProviderBackend:
    name: BackendName = "provider"
    forwards = False

    def __init__(self, source: PreviewSource) -> None:
        self._source = source

    async def open(self, box: Sandbox, port: int, host: str = "127.0.0.1") -> ProviderURL:
        try:
            preview = await self._source(port)
        except TunnelError:
            raise
        except Exception as exc:  # (the provider's own API failed: under auto, the next backend)
            raise TunnelError(f"the provider could not give a URL for port {port}: {exc}") from None
        if preview is None:
            raise NoProviderURLs("this sandbox's provider has no URLs of its own for ports; use backend relay or local")
        return ProviderURL(preview)
