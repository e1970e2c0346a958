"""What the mapper's calls share: a bound on a whole call that ends in a typed
`GatewayTimeout`; `MapCall`, the awaitable (or `async with`) result of `map()` and
`pinhole()`; `Exposed`, what `expose()` got for each family."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Generator
from dataclasses import dataclass
from ipaddress import IPv4Address
from types import TracebackType
from typing import Any, Generic, TypeVar

from igd.client.errors import GatewayTimeout, PortMappingError
from igd.client.mapping import Mapping
from igd.client.pinholes import Pinhole

T = TypeVar("T")
M = TypeVar("M", bound=Mapping[Any])


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


class MapCall(Generic[M]):
    """What `PortMapper.map()` (and `pinhole()`) returns: `await` it for the mapping, or use
    it as `async with pm.map(...) as m:` to release the mapping when the block ends."""

    __slots__ = ("_mapping", "_work")

    def __init__(self, work: Coroutine[Any, Any, M]) -> None:
        self._work = work
        self._mapping: M | None = None

    def __await__(self) -> Generator[Any, None, M]:
        return self._work.__await__()

    async def __aenter__(self) -> M:
        self._mapping = await self._work
        return self._mapping

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._mapping is not None:
            await self._mapping.release()


@dataclass(frozen=True, slots=True)
class Exposed:
    """What `PortMapper.expose()` got: the IPv4 mapping and the IPv6 pinhole, each None if
    its family failed (its error is in `errors`)."""

    mapping: Mapping[IPv4Address] | None
    pinhole: Pinhole | None
    errors: tuple[PortMappingError, ...] = ()

    async def release(self) -> None:
        """Release both."""
        for held in (self.mapping, self.pinhole):
            if held is not None:
                await held.release()


async def expose(
    mapping: MapCall[Mapping[IPv4Address]], pinhole: MapCall[Pinhole], timeout: float | None
) -> Exposed:
    """Both calls at once; raises only if both fail (the IPv4 error first)."""
    got = await bounded(
        asyncio.gather(_awaited(mapping), _awaited(pinhole), return_exceptions=True),
        timeout, "expose",
    )  # fmt: skip
    for other in got:
        if isinstance(other, BaseException) and not isinstance(other, PortMappingError):
            raise other
    errors = tuple(e for e in got if isinstance(e, PortMappingError))
    four, six = got
    held = Exposed(
        four if isinstance(four, Mapping) else None, six if isinstance(six, Pinhole) else None,
        errors,
    )  # fmt: skip
    if held.mapping is None and held.pinhole is None:
        raise errors[0]
    return held


async def _awaited(call: Awaitable[T]) -> T:
    return await call
