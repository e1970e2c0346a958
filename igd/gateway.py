"""The gateway core: grants, renews and removes mappings in the table under the policy.

Sans-I/O: every method takes `now` (monotonic seconds), changes the table at once and
returns a `Change` that the server commits to the kernel and the lease store. If that
commit fails, `rollback` undoes what the change still owns in the table.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from collections.abc import Mapping as AbstractMapping
from dataclasses import dataclass, field, replace

from igd.decision import Allow, Deny, Reason
from igd.model import Mapping, MappingKey, MapRequest, Owner, Protocol
from igd.policy import Policy
from igd.table import MappingTable

log = logging.getLogger("igd.gateway")

# RFC 6887 §11.3 (and common sense for NAT-PMP): never map the port-mapping service's own
# ports; the daemon adds its other service ports (SSDP, HTTP) from its configuration.
ALWAYS_RESERVED = frozenset({(Protocol.UDP, 5350), (Protocol.UDP, 5351)})

# Random probes before falling back to a walk of the allowed range: with the table at
# 50,000 of ~64,000 ports a probe succeeds with p≈0.2, so 64 probes fail with p<1e-6.
RANDOM_PROBES = 64


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

    # -- requests --------------------------------------------------------------------------

    def map(self, request: MapRequest, *, now: float) -> MapResult:
        """Create or renew the mapping a request asks for."""
        existing = self.own_mapping(request)
        if isinstance(existing, Refused):
            return self._refuse(request, existing)
        renewal = existing is not None
        asked = replace(request, external_port=existing.external_port) if existing else request
        decision = self.policy.evaluate(asked, self.table, now=now, renewal=renewal)
        if isinstance(decision, Deny):
            return self._refuse(request, Refused(decision))
        if existing is not None:
            port = existing.external_port
            created = existing.created
        else:
            chosen = self._choose_port(request, decision)
            if isinstance(chosen, Refused):
                return self._refuse(request, chosen)
            port, created = chosen, now
        mapping = Mapping(
            key=replace(_key_of(request), external_port=port),
            internal_address=request.internal_address,
            internal_port=request.internal_port,
            owner=Owner(request.mechanism, request.client, request.nonce),
            created=created,
            expires=now + decision.lifetime,
            description=request.description,
            filters=request.filters,
            peer_port=request.peer_port,
        )
        previous = self.table.put(mapping)
        change = Change((previous,) if previous else (), (mapping,))
        log.info(
            "%s %s %s: %s %s:%d -> external %d for %ds (rule %r%s)",
            "renewed" if renewal else "granted",
            request.mechanism,
            request.client,
            request.protocol,
            request.internal_address,
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

    def reload(self, policy: Policy, *, now: float) -> Change:
        """Switch to a new policy; remove and log the mappings it no longer allows."""
        self.policy = policy
        doomed = []
        for mapping in self.table:
            deny = policy.recheck(mapping, now=now)
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
        return Change(removed=tuple(removed))

    def restore(self, mappings: Iterable[Mapping], *, now: float) -> list[Mapping]:
        """Put persisted mappings back at start; return those dropped as expired or clashing."""
        dropped = []
        for mapping in mappings:
            if mapping.expires <= now or mapping.key in self.table:
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
            holder = self.table.get(_key_of(request))
            if holder is None:
                return None
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

    def _choose_port(self, request: MapRequest, decision: Allow) -> int | Refused:
        if request.exact_port:
            port = request.external_port
            if (request.protocol, port) in self.reserved:
                return Refused(Deny(Reason.RESERVED_PORT, "gateway", f"port {port} is reserved"))
            return port
        allowed = decision.external_ports
        for candidate in (request.external_port, request.internal_port):
            if candidate in allowed and self._free(request, candidate):
                return candidate
        if allowed:
            for _ in range(RANDOM_PROBES):
                candidate = allowed.nth(self.rng.randrange(len(allowed)))
                if self._free(request, candidate):
                    return candidate
            start = self.rng.randrange(len(allowed))
            for offset in range(len(allowed)):
                candidate = allowed.nth((start + offset) % len(allowed))
                if self._free(request, candidate):
                    return candidate
        return Refused(
            Deny(Reason.NO_FREE_PORT, decision.rule, f"no free port in {allowed or 'nothing'}")
        )

    def _free(self, request: MapRequest, port: int) -> bool:
        """Whether a gateway-chosen port is usable for this request."""
        if port == 0 or (request.protocol, port) in self.reserved:
            return False
        if self.table.port_in_use(request.protocol, port):
            return False
        # RFC 6886 §3.3: the companion port (same number, other protocol) stays reserved for
        # the client holding it, so no one else gets UDP 80 while a client holds TCP 80.
        other = Protocol.UDP if request.protocol is Protocol.TCP else Protocol.TCP
        return all(m.owner.client == request.client for m in self.table.port_users(other, port))

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


def change_after(change: Change) -> dict[MappingKey, Mapping | None]:
    """What a change left at each key it touched (None: removed)."""
    after: dict[MappingKey, Mapping | None] = {m.key: None for m in change.removed}
    after.update((m.key, m) for m in change.added)
    return after


def _removed_at(change: Change, key: MappingKey) -> Mapping | None:
    return next((m for m in change.removed if m.key == key), None)


def _key_of(request: MapRequest) -> MappingKey:
    return MappingKey(request.protocol, request.external_port, request.remote_host)


def _same_endpoint(mapping: Mapping, request: MapRequest) -> bool:
    return (
        mapping.internal_address == request.internal_address
        and mapping.internal_port == request.internal_port
    )


def describe(mapping: Mapping) -> str:
    """One line naming a mapping for logs."""
    remote = f" from {mapping.key.remote_host}" if mapping.key.remote_host else ""
    return (
        f"{mapping.protocol} external {mapping.external_port}{remote} -> "
        f"{mapping.internal_address}:{mapping.internal_port} "
        f"({mapping.owner.mechanism} {mapping.owner.client})"
    )
