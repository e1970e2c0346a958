"""What the mapper's calls share: a bound on a whole call that ends in a typed
`GatewayTimeout`, and `MapCall`, the awaitable (or `async with`) result of `map()`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Generator
from types import TracebackType
from typing import Any, TypeVar

from igd.client.errors import GatewayTimeout
from igd.client.mapping import Mapping

T = TypeVar("T")


async def bounded(work: Awaitable[T], timeout: float | None, what: str) -> T:
    """`work`, or GatewayTimeout once `timeout` seconds have passed (None: no bound)."""
    scope = asyncio.timeout(timeout)
    try:
        async with scope:
            return await work
    except TimeoutError:
        if scope.expired():
            raise GatewayTimeout(f"{what}: no answer within {timeout:g} s") from None
        raise


class MapCall:
    """What `PortMapper.map()` returns: `await` it for the mapping, or use it as
    `async with pm.map(...) as m:` to release the mapping when the block ends."""

    __slots__ = ("_mapping", "_work")

    def __init__(self, work: Coroutine[Any, Any, Mapping]) -> None:
        self._work = work
        self._mapping: Mapping | None = None

    def __await__(self) -> Generator[Any, None, Mapping]:
        return self._work.__await__()

    async def __aenter__(self) -> Mapping:
        self._mapping = await self._work
        return self._mapping

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._mapping is not None:
            await self._mapping.release()
