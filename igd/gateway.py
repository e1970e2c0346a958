"""The gateway core: grants, renews and removes mappings in the table under the policy.

Sans-I/O: every method takes `now` (monotonic seconds), changes the table at once and
returns a `Change` that the server commits to the kernel and the lease store. If that
commit fails, `rollback` undoes what the change still owns in the table.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Iterable
from collections.abc import Mapping as AbstractMapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network

from igd.decision import Allow, Decision, Deny, Reason
from igd.model import (
    DEFAULT_ADDRESS,
    STATIC_CLIENT,
    Mapping,
    MappingKey,
    MapRequest,
    Mechanism,
    Owner,
    Protocol,
    address_text,
)
from igd.policy import Policy
from igd.policy.engine import sources_changed
from igd.ports import PortSet
from igd.table import MappingTable

log = logging.getLogger("igd.gateway")

# RFC 6887 §11.3 (and common sense for NAT-PMP): never map the port-mapping service's own
# ports; the daemon adds its other service ports (SSDP, HTTP) from its configuration.
ALWAYS_RESERVED = frozenset({(Protocol.UDP, 5350), (Protocol.UDP, 5351)})

# Uniform random probes of the free-port bitmap before falling back to the first free port
# after a random start: with the table at 50,000 of ~64,000 ports a probe succeeds with
# p≈0.2, so 64 probes fail with p<1e-6.
RANDOM_PROBES = 64
# After FEW_PROBES misses, fewer than one free port in SPARSE ends the probing.
FEW_PROBES = 4
SPARSE = 16
MAX_REMEMBERED_TARGETS = 4096
"""Internal addresses whose target_problem answer is remembered (all cleared beyond it)."""


@dataclass(frozen=True, slots=True)
class Change:
    """What one operation did to the table: mappings removed and mappings added.

    A renewal is the old mapping in `removed` and its successor (same key) in `added`.
    """

    removed: tuple[Mapping, ...] = ()
    added: tuple[Mapping, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.removed or self.added)


@dataclass(frozen=True, slots=True)
class Granted:
    """The request succeeded: the mapping now in the table and what changed."""

    mapping: Mapping
    change: Change
    decision: Allow
    renewal: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """The request failed; the table is unchanged."""

    deny: Deny
    existing: Mapping | None = None
    """For NOT_OWNER and PORT_IN_USE: the mapping in the way (its remaining lease is
    what PCP reports as the error lifetime)."""


MapResult = Granted | Refused


@dataclass
class Gateway:
    """Applies requests to the mapping table under a policy."""

    policy: Policy
    table: MappingTable = field(default_factory=MappingTable)
    reserved: frozenset[tuple[Protocol, int]] = ALWAYS_RESERVED
    rng: random.Random = field(default_factory=random.Random)
    host_ports: frozenset[tuple[Protocol, int]] = frozenset()
    """Ports the router itself listens on (refreshed at run time): excluded like `reserved`."""
    internal_networks: tuple[IPv4Network, ...] = ()
    """The internal interfaces' networks: a mapping may point only at a host inside one.
    Empty means not known (pure tests); the daemon always fills it."""
    own_addresses: frozenset[IPv4Address] = frozenset()
    """The gateway's own addresses (internal and external): never a mapping's target, and a
    client only when the deciding rule names it (docs/policy.md)."""
    _problems: dict[IPv4Address, str | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    """target_problem's answers for the current own_addresses and internal_networks."""
    _problems_for: tuple[object, object] = field(
        default=(None, None), init=False, repr=False, compare=False
    )

    # -- requests --------------------------------------------------------------------------

    def map(self, request: MapRequest, *, now: float) -> MapResult:
        """Create or renew the mapping a request asks for."""
        problem = self.target_problem(request.internal_address)
        if problem is not None:
            deny = Deny(Reason.INVALID_INTERNAL_ADDRESS, "gateway", problem)
            return self._refuse(request, Refused(deny))
        existing = self.own_mapping(request)
        if isinstance(existing, Refused):
            return self._refuse(request, existing)
        renewal = existing is not None
        asked = replace(request, external_port=existing.external_port) if existing else request
        decision = self.policy.evaluate(asked, _Dynamic(self.table), now=now, renewal=renewal)
        if isinstance(decision, Allow):
            decision = self._vet_client(request.client, decision)
        if isinstance(decision, Deny):
            return self._refuse(request, Refused(decision))
        if existing is not None:
            port, address = existing.external_port, existing.external_address
            created = existing.created
        else:
            placed = self.place(request)
            if isinstance(placed, Refused):
                return self._refuse(request, placed)
            chosen = self._choose_port(request, decision, placed)
            if isinstance(chosen, Refused):
                return self._refuse(request, chosen)
            port, address, created = chosen, placed, now
        mapping = Mapping(
            key=MappingKey(request.protocol, port, request.remote_host, address),
            internal_address=request.internal_address,
            internal_port=request.internal_port,
            owner=Owner(request.mechanism, request.client, request.nonce),
            created=created,
            expires=now + decision.lifetime,
            description=request.description,
            filters=request.filters if decision.filters is None else decision.filters,
            peer_port=request.peer_port,
        )
        previous = self.table.put(mapping)
        change = Change((previous,) if previous else (), (mapping,))
        log.info(
            "%s %s %s: %s %s:%d -> external %d for %ds (rule %r%s)",
            "renewed" if renewal else "granted",
            request.mechanism,
            address_text(request.client),
            request.protocol,
            address_text(request.internal_address),
            request.internal_port,
            port,
            decision.lifetime,
            decision.rule,
            "; " + "; ".join(decision.restrictions) if decision.restrictions else "",
        )
        return Granted(mapping, change, decision, renewal)

    def remove(self, mappings: Iterable[Mapping], *, why: str) -> Change:
        """Remove these mappings (as found in the table) and log why."""
        removed = []
        for mapping in mappings:
            gone = self.table.remove(mapping.key)
            if gone is not None:
                removed.append(gone)
                log.info("removed %s (%s)", describe(gone), why)
        return Change(removed=tuple(removed))

    def expire(self, *, now: float) -> Change:
        """Remove every mapping whose lease has ended."""
        expired = self.table.expire(now=now)
        for mapping in expired:
            log.info("expired %s", describe(mapping))
        return Change(removed=tuple(expired))

    def reload(self, policy: Policy, *, now: float, wall: float) -> Change:
        """Switch to a new policy; remove and log the mappings it no longer allows, and bring
        the static forwards to what it declares (wall-clock `wall` for their `until`)."""
        previous, self.policy = self.policy, policy
        doomed = []
        for mapping in self.table:
            if mapping.is_static:
                continue
            deny = self.recheck(mapping, now=now)
            if deny is not None:
                doomed.append((mapping, deny))
        removed = []
        for mapping, deny in doomed:
            self.table.remove(mapping.key)
            removed.append(mapping)
            log.info(
                "removed %s: the reloaded policy refuses it (%s, rule %r)",
                describe(mapping),
                deny.reason,
                deny.rule,
            )
        forwards = self.sync_forwards(previous, now=now, wall=wall)
        return Change((*removed, *forwards.removed), forwards.added)

    def sync_forwards(self, previous: Policy | None, *, now: float, wall: float) -> Change:
        """Make the table hold exactly the current policy's forwards. A forward declared alike
        in `previous` and still in the table is left alone (its kernel element never blinks);
        a changed one is replaced in the same change; dynamic mappings in a forward's way
        (its key, its port for one remote host, its companion port) are removed."""
        wanted = self.policy.forward_mappings(now=now, wall=wall)
        declared = self.policy.forward_index()
        before = previous.forward_index() if previous is not None else {}
        removed: list[Mapping] = []
        added: list[Mapping] = []
        for mapping in self.table.by_client(STATIC_CLIENT):
            if not mapping.is_static:
                continue
            key = mapping.key
            if key not in wanted:
                self.table.remove(key)
                removed.append(mapping)
                log.info("removed forward %s: no longer declared", describe(mapping))
            elif key in before and before[key] == declared.get(key):
                del wanted[key]
        for mapping in wanted.values():
            problem = self.target_problem(mapping.internal_address)
            if problem is not None:
                log.warning("forward %r not installed: %s", mapping.description, problem)
                continue
            for other in self._in_the_way(mapping):
                self.table.remove(other.key)
                removed.append(other)
                name = mapping.description
                log.info("removed %s: forward %r takes its port", describe(other), name)
            previous_mapping = self.table.put(mapping)
            if previous_mapping is not None:
                removed.append(previous_mapping)
            added.append(mapping)
            log.info("installed forward %r: %s", mapping.description, describe(mapping))
        return Change(tuple(removed), tuple(added))

    def _in_the_way(self, forward: Mapping) -> list[Mapping]:
        """Dynamic mappings a forward displaces: on its port (any remote host) or its
        companion port (RFC 6886 §3.3)."""
        port, address = forward.external_port, forward.external_address
        found = self.table.port_users(forward.protocol, port, address)
        found += self.table.port_users(_other(forward.protocol), port, address)
        return [m for m in found if not m.is_static]

    def recheck(self, mapping: Mapping, *, now: float) -> Deny | None:
        """The Deny the current policy and addresses give an existing mapping, or None."""
        problem = self.target_problem(mapping.internal_address)
        if problem is not None:
            return Deny(Reason.INVALID_INTERNAL_ADDRESS, "gateway", problem)
        if mapping.is_static:
            # The forwards answer to the policy's [[forwards]] (sync_forwards), not its rules.
            return None
        if mapping.owner.client not in self.own_addresses:
            return self.policy.recheck(mapping, now=now)
        # The own-address rule needs the deciding rule, which only an Allow names.
        request = MapRequest.renewing(mapping)
        decision = self.policy.evaluate(request, self.table, now=now, renewal=True)
        if isinstance(decision, Allow):
            decision = self._vet_client(mapping.owner.client, decision)
        if isinstance(decision, Allow):
            return sources_changed(decision, mapping) or self.policy.address_changed(
                request, mapping
            )
        return decision

    def forbidden(self, *, now: float) -> list[tuple[Mapping, Deny]]:
        """Mappings the gateway's current addresses forbid, with why (not yet removed)."""
        # At start (leases granted before these checks existed, or under other addresses)
        # and when the addresses change; only the gateway's own clients need the policy.
        found = []
        for mapping in self.table:
            problem = self.target_problem(mapping.internal_address)
            if problem is not None:
                found.append((mapping, Deny(Reason.INVALID_INTERNAL_ADDRESS, "gateway", problem)))
            elif mapping.owner.client in self.own_addresses:
                deny = self.recheck(mapping, now=now)
                if deny is not None:
                    found.append((mapping, deny))
        return found

    def target_problem(self, address: IPv4Address) -> str | None:
        """Why a mapping may not point at this address, whatever the policy says; or None."""
        # ipaddress's is_reserved and the network tests cost ~10 µs a grant: remember the
        # answer per address until either field is replaced (the daemon assigns new objects).
        problems = self._problems
        basis = self._problems_for
        if basis[0] is not self.own_addresses or basis[1] is not self.internal_networks:
            problems.clear()
            self._problems_for = (self.own_addresses, self.internal_networks)
        elif address in problems:
            return problems[address]
        if len(problems) >= MAX_REMEMBERED_TARGETS:
            problems.clear()
        problem = problems[address] = self._target_problem(address)
        return problem

    def _target_problem(self, address: IPv4Address) -> str | None:
        # A mapping must reach one LAN host: never the router itself (its LAN-only services),
        # a broadcast or multicast group, or a host outside the LAN (a relay, UPnProxy).
        if address in self.own_addresses:
            return f"internal address {address} is the gateway's own address"
        if address.is_unspecified or address.is_multicast or address.is_reserved:
            return f"internal address {address} is not a unicast host address"
        # Loopback (127.0.0.1) and every other non-LAN address fail here: no internal
        # network holds them.
        if not self.internal_networks:
            return None
        for network in self.internal_networks:
            if address in network:
                if network.prefixlen <= 30 and address in (
                    network.network_address,
                    network.broadcast_address,
                ):
                    return (
                        f"internal address {address} is the network or broadcast address"
                        f" of {network}"
                    )
                return None
        networks = ", ".join(str(n) for n in self.internal_networks)
        return f"internal address {address} is outside the internal networks ({networks})"

    def restore(self, mappings: Iterable[Mapping], *, now: float) -> list[Mapping]:
        """Put persisted mappings back at start; return those dropped as expired or clashing.
        Persisted forwards are dropped too: the policy file declares them (sync_forwards)."""
        dropped = []
        for mapping in mappings:
            if mapping.expires <= now or mapping.key in self.table or mapping.is_static:
                dropped.append(mapping)
                continue
            self.table.put(mapping)
        return dropped

    def rollback(
        self, change: Change, before: AbstractMapping[MappingKey, Mapping | None] | None = None
    ) -> list[Mapping]:
        """Undo a change whose commit failed, key by key, where the table still holds what the
        change left there; a key a later change has taken since is that change's to commit.
        `before` is what each key held before (default: what the change removed). Return
        the mappings put back."""
        restored = []
        for key, left in change_after(change).items():
            current = self.table.get(key)
            if current is not left:
                continue
            previous = before[key] if before is not None else _removed_at(change, key)
            if previous is None:
                self.table.remove(key)
            else:
                self.table.put(previous)
                restored.append(previous)
        return restored

    # -- internals -------------------------------------------------------------------------

    def own_mapping(self, request: MapRequest) -> Mapping | Refused | None:
        """The requester's existing mapping this request renews, or what stands in its way."""
        if request.exact_port:
            address = self.place(request)
            if isinstance(address, Refused):
                return None  # no mapping of its own there; map() refuses the address
            holder = self.table.get(_key_of(request, address))
            if holder is None:
                return self._shadowing(request, address)
            if _same_endpoint(holder, request) and holder.owner.client == request.client:
                return holder
            return Refused(Deny(Reason.PORT_IN_USE, "table", f"held by {describe(holder)}"), holder)
        for holder in self.table.by_internal(
            request.internal_address, request.protocol, request.internal_port, request.mechanism
        ):
            if (holder.key.remote_host, holder.peer_port) != (
                request.remote_host,
                request.peer_port,
            ):
                continue
            if holder.owner.client != request.client:
                continue
            if holder.owner.nonce != request.nonce:
                # RFC 6887 §11.3: the same internal endpoint with another nonce is refused.
                return Refused(Deny(Reason.NOT_OWNER, "table", "nonce mismatch"), holder)
            return holder
        return None

    def place(self, request: MapRequest) -> IPv4Address | Refused | None:
        """The external address a new mapping for this request gets (None: the default)."""
        if request.peer_port:
            # A PEER flow leaves masqueraded to the interface's address: the default one.
            return None
        rule, allowed = self.policy.addresses_for(request)
        if request.mechanism in _DEFAULT_ADDRESS_ONLY:
            if None in allowed:
                return None
            # RFC 6886 §3.2 has one external address per gateway, and UPnP's client asks
            # GetExternalIPAddress: a mapping elsewhere would be announced at the wrong one.
            detail = (
                f"{request.mechanism} can report only the default external address, and rule"
                f" {rule!r} does not list it"
            )
            return Refused(Deny(Reason.POLICY_DENIED, rule, detail))
        asked = request.external_address
        if asked is None:
            return allowed[0]
        wanted = None if asked == DEFAULT_ADDRESS else asked
        if wanted in allowed:
            return wanted
        if request.exact_port:
            # RFC 6887 §13.2: PREFER_FAILURE means no other address or port is acceptable.
            names = ", ".join("default" if a is None else str(a) for a in allowed)
            detail = f"external address {asked} is not allowed here (allowed: {names})"
            return Refused(Deny(Reason.POLICY_DENIED, rule, detail, other_port_allowed=True))
        # RFC 6887 §11.3: the suggested address is a hint; the server assigns another.
        return allowed[0]

    def _shadowing(self, request: MapRequest, address: IPv4Address | None) -> Refused | None:
        """Refuse an exact port where a wildcard and a remote-host mapping of two clients meet."""
        # A mapping for one remote host takes that host's traffic from a wildcard mapping on
        # the same port (and the reverse); across clients that is a takeover, so it conflicts
        # as UPnP's 718 ConflictInMappingEntry (and miniupnpd) treat it.
        for other in self.table.port_users(request.protocol, request.external_port, address):
            if other.owner.client == request.client:
                continue
            if other.key.remote_host is None or request.remote_host is None:
                detail = f"would shadow {describe(other)} for one remote host"
                return Refused(Deny(Reason.PORT_IN_USE, "table", detail), other)
        return None

    def _choose_port(
        self, request: MapRequest, decision: Allow, address: IPv4Address | None
    ) -> int | Refused:
        protocol, port = request.protocol, request.external_port
        if request.exact_port:
            if self._reserved(protocol, port):
                return Refused(Deny(Reason.RESERVED_PORT, "gateway", f"port {port} is reserved"))
            companion = self._companion_holder(request, port, address)
            if companion is not None:
                detail = f"its companion port is held by {describe(companion)} (RFC 6886 §3.3)"
                return Refused(Deny(Reason.PORT_IN_USE, "table", detail), companion)
            return port
        allowed = decision.external_ports
        for candidate in (port, request.internal_port):
            if candidate in allowed and self._free(request, candidate, address):
                return candidate
        size = len(allowed)
        # Uniform probes keep ports unpredictable. The first few test one port each (two
        # lookups); only when they miss are the table's bitmaps combined, whose every
        # operation copies 8 KiB.
        for _ in range(FEW_PROBES if size else 0):
            candidate = allowed.nth(self.rng.randrange(size))
            if self._unpaired(protocol, candidate, address):
                return candidate
        free = self._free_ports(request, allowed, address)
        if free:
            # When the few probes missed, count the free ports once and skip further probes
            # if they would mostly miss.
            if free.bit_count() * SPARSE >= size:
                for _ in range(RANDOM_PROBES - FEW_PROBES):
                    candidate = allowed.nth(self.rng.randrange(size))
                    if free >> candidate & 1:
                        return candidate
            # Sparse: the first free port at or after a random start, wrapping around.
            start = allowed.nth(self.rng.randrange(size))
            above = free >> start
            return start + _lowest_bit(above) if above else _lowest_bit(free)
        return Refused(
            Deny(Reason.NO_FREE_PORT, decision.rule, f"no free port in {allowed or 'nothing'}")
        )

    def _free(self, request: MapRequest, port: int, address: IPv4Address | None) -> bool:
        """Whether a gateway-chosen port is usable for this request."""
        protocol = request.protocol
        if port == 0 or self._reserved(protocol, port):
            return False
        if self.table.port_in_use(protocol, port, address):
            return False
        return self._companion_holder(request, port, address) is None

    def _unpaired(self, protocol: Protocol, port: int, address: IPv4Address | None) -> bool:
        """Whether a gateway choice may take this port with no one on its companion: a port
        of the first choice `_free_ports` makes (its `strict` ports)."""
        if port == 0 or self._reserved(protocol, port):
            return False
        used = self.table.port_in_use
        return not used(protocol, port, address) and not used(_other(protocol), port, address)

    def _reserved(self, protocol: Protocol, port: int) -> bool:
        """Whether the policy reserves this port or the gateway itself listens on it."""
        return (protocol, port) in self.reserved or (protocol, port) in self.host_ports

    def _companion_holder(
        self, request: MapRequest, port: int, address: IPv4Address | None
    ) -> Mapping | None:
        """Another client's mapping on the companion port (same number, other protocol)."""
        # RFC 6886 §3.3: the companion port stays reserved for the client holding it, so no
        # one else gets UDP 80 while a client holds TCP 80; applied to every mechanism.
        for mapping in self.table.port_users(_other(request.protocol), port, address):
            if mapping.owner.client != request.client:
                return mapping
        return None

    def _free_ports(
        self, request: MapRequest, allowed: PortSet, address: IPv4Address | None
    ) -> int:
        """The ports in `allowed` a gateway choice may use, as a bitmap (bit p: port p)."""
        protocol, other = request.protocol, _other(request.protocol)
        excluded = _port_mask(self.reserved, protocol) | _port_mask(self.host_ports, protocol)
        # a & ~b written as (a | b) ^ b: two cheap operations on non-negative ints.
        taken = self.table.used_ports(protocol, address) | excluded
        loose = (_set_mask(allowed) | taken) ^ taken
        if not loose:
            return 0
        twins = self.table.used_ports(other, address)
        strict = (loose | twins) ^ twins
        if strict:
            return strict
        # Only companions of used ports are left: those the requester alone holds are its own.
        own = 0
        for mapping in self.table.by_client(request.client):
            if (
                mapping.protocol is other
                and mapping.external_address == address
                and self._companion_holder(request, mapping.external_port, address) is None
            ):
                own |= 1 << mapping.external_port
        return loose & own

    def _vet_client(self, client: IPv4Address, decision: Allow) -> Decision:
        """Refuse the gateway's own addresses as clients unless the deciding rule names them."""
        # A local user on the router must not map its LAN-only services (or anything else)
        # just by sending from the router's address; the admin opts in per address.
        if client not in self.own_addresses:
            return decision
        rule = self.policy.rule(decision.rule)
        if rule is not None and rule.clients is not None and IPv4Network(client) in rule.clients:
            return decision
        detail = (
            f"client {client} is the gateway's own address and rule {decision.rule!r}"
            f" does not name it in clients"
        )
        return Deny(Reason.GATEWAY_CLIENT, decision.rule, detail)

    def _refuse(self, request: MapRequest, refused: Refused) -> Refused:
        deny = refused.deny
        log.info(
            "refused %s %s: %s %s:%d external %d: %s (rule %r)%s",
            request.mechanism,
            request.client,
            request.protocol,
            request.internal_address,
            request.internal_port,
            request.external_port,
            deny.reason,
            deny.rule,
            f": {deny.detail}" if deny.detail else "",
        )
        return refused


_DEFAULT_ADDRESS_ONLY = frozenset({Mechanism.NATPMP, Mechanism.UPNP})
"""Mechanisms whose answers cannot name an external address other than the default."""


class _Dynamic:
    """The table's counts without the static forwards: quotas are about clients' mappings."""

    def __init__(self, table: MappingTable) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table) - self.table.count_for_client(STATIC_CLIENT)

    def count_for_client(self, client: IPv4Address) -> int:
        return self.table.count_for_client(client)


@functools.lru_cache(maxsize=64)
def _set_mask(ports: PortSet) -> int:
    """A PortSet as a bitmap (bit p: port p), cached: policies hold few distinct sets."""
    return sum((1 << (hi + 1)) - (1 << lo) for lo, hi in ports.intervals)


@functools.lru_cache(maxsize=16)
def _port_mask(ports: frozenset[tuple[Protocol, int]], protocol: Protocol) -> int:
    """The ports of one protocol in a set of (protocol, port) as a bitmap."""
    return sum(1 << port for proto, port in ports if proto is protocol)


def _lowest_bit(bits: int) -> int:
    return (bits & -bits).bit_length() - 1


def _other(protocol: Protocol) -> Protocol:
    return Protocol.UDP if protocol is Protocol.TCP else Protocol.TCP


def change_after(change: Change) -> dict[MappingKey, Mapping | None]:
    """What a change left at each key it touched (None: removed)."""
    after: dict[MappingKey, Mapping | None] = {m.key: None for m in change.removed}
    after.update((m.key, m) for m in change.added)
    return after


def _removed_at(change: Change, key: MappingKey) -> Mapping | None:
    return next((m for m in change.removed if m.key == key), None)


def _key_of(request: MapRequest, address: IPv4Address | None) -> MappingKey:
    return MappingKey(request.protocol, request.external_port, request.remote_host, address)


def _same_endpoint(mapping: Mapping, request: MapRequest) -> bool:
    return (
        mapping.internal_address == request.internal_address
        and mapping.internal_port == request.internal_port
    )


def describe(mapping: Mapping) -> str:
    """One line naming a mapping for logs."""
    remote = f" from {mapping.key.remote_host}" if mapping.key.remote_host else ""
    address = f"{mapping.external_address}:" if mapping.external_address else ""
    return (
        f"{mapping.protocol} external {address}{mapping.external_port}{remote} -> "
        f"{mapping.internal_address}:{mapping.internal_port} "
        f"({mapping.owner.mechanism} {mapping.owner.client})"
    )
