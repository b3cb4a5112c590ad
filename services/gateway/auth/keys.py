"""API keys (``first keys create``): a stub until the key store lands."""

from __future__ import annotations

from shared import errors, schema

PREFIX = "first-"


class KeyAuthenticator:
    name = "keys"

    def __init__(self, nc, config) -> None:
        self.nc, self.config = nc, config

    def claims(self, credential: str) -> bool:
        return credential.startswith(PREFIX)

    async def identify(self, credential: str) -> schema.Identity:
        raise errors.Unauthorized("This API key is not known here.")

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
