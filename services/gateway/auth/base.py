"""What every authenticator offers the middleware."""

from __future__ import annotations

from typing import Protocol

from shared import schema


class Authenticator(Protocol):
    name: str

    def claims(self, credential: str) -> bool:
        """Whether the credential is of this authenticator's kind (a cheap look at its form)."""

    def known(self, credential: str) -> schema.Identity | None:
        """The identity, if what the authenticator already holds vouches for the credential (no
        call to anyone, no wait); None if it would have to look."""

    async def identify(self, credential: str) -> schema.Identity:
        """The identity behind the credential. Raises errors.Unauthorized (no such, expired,
        forged, revoked), errors.Forbidden (valid, but not allowed here) or errors.NoCapacity
        (the identity provider cannot be reached: 503); never anything else."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
