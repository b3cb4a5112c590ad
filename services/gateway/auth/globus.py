"""Globus Auth tokens: a stub until the introspection lands."""

from __future__ import annotations

from shared import errors, schema


class GlobusAuthenticator:
    name = "globus"

    def __init__(self, settings) -> None:
        self.settings = settings

    def claims(self, credential: str) -> bool:
        return True

    async def identify(self, credential: str) -> schema.Identity:
        raise errors.Unauthorized("Token introspection: not configured")

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
