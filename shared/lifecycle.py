"""The shape every long-running piece shares: idempotent ``start``/``stop``, usable with ``async with``."""

from __future__ import annotations

import abc
from typing import Self


class Lifecycle(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> object: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
