"""The mapping table: the single source of truth for every mechanism.

Rules:
- Every change to mapping state happens here, through `put`, `remove` and `expire`.
  Adapters and the gateway never keep mappings of their own.
- One key space for all mechanisms: (protocol, external port, remote host or wildcard,
  external address: None for the default one).
  A mapping made over UPnP conflicts with one made over PCP or NAT-PMP exactly as two
  mappings of the same mechanism would.
- Every lookup is O(1): by key, by internal endpoint, by owning client, by external port,
  and by listing position (`entry(i)`), which UPnP clients walk from 0 to N. Deleting moves
  the last entry into the freed position, so positions stay dense and O(1).
- Expiry comes from a deadline heap with lazy invalidation; nothing scans all mappings.
- Each (external address, protocol) keeps a bitmap of the external ports in use (bit p set:
  some mapping holds port p), so finding a free port, or learning there is none, never walks
  the table, however many external addresses there are.
- Time is passed in (`now`, monotonic seconds); the table never reads a clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address
from typing import TypeVar

from igd.model import Mapping, MappingKey, Mechanism, Protocol

InternalEndpoint = tuple[IPv4Address, Protocol, int]
ExternalPort = tuple[IPv4Address | None, Protocol, int]
"""(external address, None for the default; protocol; port)."""
_Slot = TypeVar("_Slot")
# Most endpoints and ports have exactly one mapping: such an index slot holds the key itself,
# and becomes a set only when a second key arrives (half the memory, and faster loads).
_Keys = MappingKey | set[MappingKey]


class MappingTable:
    """All current mappings, indexed for the lookups the protocols need."""

    def __init__(self) -> None:
        self._by_key: dict[MappingKey, Mapping] = {}
        self._order: list[MappingKey] = []
        self._position: dict[MappingKey, int] = {}
        self._by_internal: dict[InternalEndpoint, _Keys] = {}
        self._by_client: dict[IPv4Address, set[MappingKey]] = {}
        self._port_users: dict[ExternalPort, _Keys] = {}
        # Bit p set: some mapping holds port p. An int, so that the gateway's port search is a
        # few whole-bitmap operations; an update costs one (well under a microsecond).
        self._used: dict[tuple[IPv4Address | None, Protocol], int] = {}
        self._deadlines: list[tuple[float, int, MappingKey]] = []
        self._sequence = itertools.count()

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Mapping]:
        return (self._by_key[key] for key in self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def get(self, key: MappingKey) -> Mapping | None:
        """The mapping with this key, if any."""
        return self._by_key.get(key)

    def entry(self, index: int) -> Mapping:
        """The index-th mapping in listing order; IndexError past the end."""
        if index < 0:
            raise IndexError(index)
        return self._by_key[self._order[index]]

    def by_internal(
        self,
        address: IPv4Address,
        protocol: Protocol,
        port: int,
        mechanism: Mechanism | None = None,
    ) -> list[Mapping]:
        """Mappings that forward to this internal endpoint (optionally of one mechanism)."""
        keys = _iter(self._by_internal.get((address, protocol, port)))
        found = [self._by_key[k] for k in keys]
        if mechanism is not None:
            found = [m for m in found if m.owner.mechanism is mechanism]
        return found

    def by_client(self, client: IPv4Address) -> list[Mapping]:
        """Mappings owned by this requesting client."""
        return [self._by_key[k] for k in self._by_client.get(client, ())]

    def count_for_client(self, client: IPv4Address) -> int:
        """How many mappings this client owns."""
        return len(self._by_client.get(client, ()))

    def port_users(
        self, protocol: Protocol, port: int, address: IPv4Address | None = None
    ) -> list[Mapping]:
        """Mappings on this external port of this external address, for any remote host."""
        slot = self._port_users.get((address, protocol, port))
        return [self._by_key[k] for k in _iter(slot)]

    def port_in_use(
        self, protocol: Protocol, port: int, address: IPv4Address | None = None
    ) -> bool:
        """Whether any mapping holds this external port of this external address."""
        return (address, protocol, port) in self._port_users

    def used_ports(self, protocol: Protocol, address: IPv4Address | None = None) -> int:
        """The external ports of one address in use for a protocol, as a bitmap (bit p set:
        port p is held)."""
        return self._used.get((address, protocol), 0)

    def next_deadline(self) -> float | None:
        """The earliest expiry time, or None for an empty table."""
        while self._deadlines:
            expires, _, key = self._deadlines[0]
            current = self._by_key.get(key)
            if current is not None and current.expires == expires:
                return expires
            heapq.heappop(self._deadlines)
        return None

    # -- changing --------------------------------------------------------------------------

    def put(self, mapping: Mapping) -> Mapping | None:
        """Insert or replace the mapping with this key; return the one it replaced."""
        key = mapping.key
        previous = self._by_key.get(key)
        if previous is not None:
            self._unindex(previous)
        else:
            self._position[key] = len(self._order)
            self._order.append(key)
            port, used = key.external_port, (key.external_address, key.protocol)
            if _add(self._port_users, (*used, port), key):
                self._used[used] = self._used.get(used, 0) | 1 << port
        self._by_key[key] = mapping
        self._index(mapping)
        heapq.heappush(self._deadlines, (mapping.expires, next(self._sequence), key))
        self._compact_heap()
        return previous

    def remove(self, key: MappingKey) -> Mapping | None:
        """Delete the mapping with this key; return it, or None if there was none."""
        mapping = self._by_key.pop(key, None)
        if mapping is None:
            return None
        self._unindex(mapping)
        position = self._position.pop(key)
        last = self._order.pop()
        if last != key:
            self._order[position] = last
            self._position[last] = position
        port, used = key.external_port, (key.external_address, key.protocol)
        if _drop(self._port_users, (*used, port), key):
            bits = self._used[used] ^ 1 << port  # the bit is set: the slot was in use
            if bits or used[0] is None:
                self._used[used] = bits
            else:
                del self._used[used]  # bounded by the addresses in use, not ever seen
        # The heap entry is left behind and discarded lazily.
        return mapping

    def expire(self, *, now: float) -> list[Mapping]:
        """Remove and return every mapping whose lease ended at or before now."""
        expired = []
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            _, _, key = heapq.heappop(self._deadlines)
            mapping = self.remove(key)
            if mapping is not None:
                expired.append(mapping)
        return expired

    def clear(self) -> list[Mapping]:
        """Remove everything; return what was removed."""
        removed = list(self)
        self.__init__()  # type: ignore[misc]
        return removed

    # -- internals -------------------------------------------------------------------------

    def _index(self, mapping: Mapping) -> None:
        endpoint = (mapping.internal_address, mapping.protocol, mapping.internal_port)
        _add(self._by_internal, endpoint, mapping.key)
        self._by_client.setdefault(mapping.owner.client, set()).add(mapping.key)

    def _unindex(self, mapping: Mapping) -> None:
        endpoint = (mapping.internal_address, mapping.protocol, mapping.internal_port)
        _drop(self._by_internal, endpoint, mapping.key)
        keys = self._by_client[mapping.owner.client]
        keys.discard(mapping.key)
        if not keys:
            del self._by_client[mapping.owner.client]

    def _compact_heap(self) -> None:
        # Renewals leave stale heap entries; rebuild once they outnumber live ones, so the
        # heap stays O(live mappings) in size however often leases are refreshed.
        if len(self._deadlines) > 2 * len(self._by_key) + 64:
            self._deadlines = [
                (m.expires, next(self._sequence), m.key) for m in self._by_key.values()
            ]
            heapq.heapify(self._deadlines)


def _iter(slot: _Keys | None) -> Iterable[MappingKey]:
    if slot is None:
        return ()
    return slot if isinstance(slot, set) else (slot,)


def _add(index: dict[_Slot, _Keys], slot: _Slot, key: MappingKey) -> bool:
    """Index key under slot; True when the slot was empty before."""
    held = index.get(slot)
    if held is None:
        index[slot] = key
        return True
    if isinstance(held, set):
        held.add(key)
    elif held != key:
        index[slot] = {held, key}
    return False


def _drop(index: dict[_Slot, _Keys], slot: _Slot, key: MappingKey) -> bool:
    """Unindex key from slot; True when the slot is empty now."""
    held = index.get(slot)
    if held == key:
        del index[slot]
        return True
    if isinstance(held, set):
        held.discard(key)
        if len(held) == 1:
            index[slot] = next(iter(held))
    return False
