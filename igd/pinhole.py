"""IPv6 pinholes: the model, the admin's rules and the table (RFC 6092, RFC 6887 §11.3).

On IPv6 there is no NAT: a pinhole admits new inbound flows to one LAN host's port through
the gateway's default-deny firewall. Pinholes are their own small core, beside the IPv4
mapping table (whose types assume IPv4 throughout). Rules of the table:

- every pinhole state change happens in `Pinholes` (open, close, expire, restore, undo,
  readdress), which returns what changed as a `PinholeChange` for the server to commit;
- one pinhole per key (internal address, protocol, internal port, remote or wildcard);
  only its owner (mechanism, client and, for PCP, nonce) renews or deletes it;
- a pinhole points only at a unicast host of the LAN prefixes (`PinholeRules`, the network
  side), whatever the policy says; the policy (`PinholePolicy`: the policy file's engine in
  the daemon, or `PinholeRules` itself on its own) decides the rest, and all pinholes
  together are at most `PinholeRules.max_pinholes` (the kernel table's bound).
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from ipaddress import IPv6Address, IPv6Network
from typing import Protocol as TypingProtocol

from igd.model import Mechanism, Protocol

MAX_LIFETIME = 86400
"""RFC 6887 §15 suggests at most 24 h; WANIPv6FirewallControl's LeaseTime is 1..86400."""
MIN_LIFETIME = 120
"""RFC 6887 §15: a server may raise short lifetimes to its minimum (2 min suggested)."""
MAX_PER_CLIENT = 64
"""Default bound on the pinholes one client holds."""
MAX_PINHOLES = 16384
"""Default bound on all pinholes: a LAN host can send from many (spoofed) addresses of its
/64, so the per-client bound alone does not bound the table."""
MAX_UID = 0xFFFF
"""WANIPv6FirewallControl:1 §2.3.9: a pinhole's UniqueID is a ui2; 0 is never handed out."""


@dataclass(frozen=True, slots=True, order=True)
class PinholeFilter:
    """Only traffic from this remote network (and port, 0 = any) may use a pinhole."""

    network: IPv6Network
    port: int = 0


@dataclass(frozen=True, slots=True)
class PinholeKey:
    """What identifies a pinhole; `remote` None admits any remote host (UPnP RemoteHost "")."""

    internal_address: IPv6Address
    protocol: Protocol
    internal_port: int
    remote: PinholeFilter | None = None


@dataclass(frozen=True, slots=True)
class PinholeOwner:
    """Who holds a pinhole: the mechanism, the requesting client and, for PCP, its nonce."""

    mechanism: Mechanism
    client: IPv6Address
    nonce: bytes | None = None


@dataclass(frozen=True, slots=True)
class Pinhole:
    """One open pinhole. Times are monotonic seconds (the caller's clock)."""

    key: PinholeKey
    owner: PinholeOwner
    created: float
    expires: float
    description: str = ""
    filters: tuple[PinholeFilter, ...] = ()
    """PCP FILTERs (RFC 6887 §13.3): remote peers allowed in; empty admits everyone."""
    uid: int = 0
    """The UPnP UniqueID (1..65535), kept across renewals and restarts; 0 before the table
    gives one."""

    @property
    def admits(self) -> tuple[PinholeFilter, ...]:
        """The remote peers this pinhole lets in; empty means any."""
        return (self.key.remote,) if self.key.remote is not None else self.filters

    def remaining(self, now: float) -> int:
        """Whole seconds of lease left (never negative)."""
        return max(0, int(self.expires - now + 0.5))


@dataclass(frozen=True, slots=True)
class PinholeRequest:
    """Open or renew a pinhole (lifetime > 0)."""

    key: PinholeKey
    owner: PinholeOwner
    lifetime: int
    description: str = ""
    filters: tuple[PinholeFilter, ...] = ()


class Refusal(enum.Enum):
    """Why a pinhole request was refused; each adapter maps these to its codes."""

    NOT_ALLOWED = "not allowed by the policy"
    THIRD_PARTY = "secure mode: a client opens pinholes only to its own address"
    NOT_OWNER = "the pinhole belongs to another client or nonce"
    QUOTA = "the client holds as many pinholes as it may"
    FULL = "the gateway holds as many pinholes as it may"


@dataclass(frozen=True, slots=True)
class PinholeAllow:
    """The policy's grant of a pinhole request."""

    rule: str
    lifetime: int
    notes: tuple[str, ...] = ()
    filters: tuple[PinholeFilter, ...] | None = None
    """The remote sources the pinhole admits under the rule's remote_hosts (None: as asked)."""


@dataclass(frozen=True, slots=True)
class PinholeDeny:
    """Why a pinhole request was refused, and by which rule ("gateway": no policy could)."""

    refusal: Refusal
    rule: str
    detail: str = ""


GATEWAY_RULE = "gateway"
"""The rule a refusal names when the network side, not the policy, refused."""


class PinholePolicy(TypingProtocol):
    """Decides pinhole requests (the policy file's engine, or `PinholeRules` on its own)."""

    def evaluate_pinhole(
        self, request: PinholeRequest, *, held: int, total: int, now: float, renewal: bool = False
    ) -> PinholeAllow | PinholeDeny: ...


@dataclass(frozen=True, slots=True)
class PinholeRules:
    """The network side of pinholes (the `[ipv6]` section: LAN prefixes, the gateway's own
    addresses, the table's bound), and a small policy of its own for use without a policy
    file (tests, embedding): the daemon decides through the policy file instead."""

    internal_networks: tuple[IPv6Network, ...]
    """The LAN prefixes: pinholes point only into these."""
    clients: tuple[IPv6Network, ...] = ()
    """Who may ask; empty means anyone in `internal_networks`."""
    secure_mode: bool = True
    min_port: int = 1024
    max_per_client: int = MAX_PER_CLIENT
    max_pinholes: int = MAX_PINHOLES
    min_lifetime: int = MIN_LIFETIME
    max_lifetime: int = MAX_LIFETIME
    own_addresses: frozenset[IPv6Address] = field(default_factory=frozenset)

    def judge(self, request: PinholeRequest) -> Refusal | None:
        """None if these rules allow the request, else why not (default deny)."""
        client, internal = request.owner.client, request.key.internal_address
        if not any(client in net for net in self.clients or self.internal_networks):
            return Refusal.NOT_ALLOWED
        if self.secure_mode and internal != client:
            return Refusal.THIRD_PARTY
        if not self.is_lan_host(internal) or request.key.internal_port < self.min_port:
            return Refusal.NOT_ALLOWED
        return None

    def evaluate_pinhole(
        self, request: PinholeRequest, *, held: int, total: int, now: float, renewal: bool = False
    ) -> PinholeAllow | PinholeDeny:
        """These rules as a policy: `judge`, the per-client quota and the lifetime bounds."""
        refusal = self.judge(request)
        if refusal is not None:
            return PinholeDeny(refusal, "ipv6", refusal.value)
        if not renewal and held >= self.max_per_client:
            detail = f"client {request.owner.client} holds {held} pinholes"
            return PinholeDeny(Refusal.QUOTA, "ipv6", f"{detail} (limit {self.max_per_client})")
        return PinholeAllow("ipv6", self.lifetime(request.lifetime))

    def is_lan_host(self, address: IPv6Address) -> bool:
        """Whether `address` may be a pinhole's target: a unicast LAN address, not the gateway's."""
        if address in self.own_addresses or address.is_multicast or address.is_link_local:
            return False
        # RFC 4291 §2.6.1: the all-zero interface identifier is the Subnet-Router anycast.
        return any(address in net and address != net.network_address
                   for net in self.internal_networks)  # fmt: skip

    def lifetime(self, requested: int) -> int:
        """The lease granted for `requested` seconds (RFC 6887 §15: clamp to the bounds)."""
        return min(max(requested, self.min_lifetime), self.max_lifetime)


@dataclass(frozen=True, slots=True)
class PinholeChange:
    """What one operation did to the table: pinholes gone and pinholes (re)written."""

    removed: tuple[Pinhole, ...] = ()
    added: tuple[Pinhole, ...] = ()
    rule: str = ""
    """The rule that granted what was added."""
    notes: tuple[str, ...] = ()
    """What the policy narrowed (lease, remote sources)."""

    def __bool__(self) -> bool:
        return bool(self.removed or self.added)


class Pinholes:
    """The pinhole table and every change to it."""

    def __init__(self, rules: PinholeRules, policy: PinholePolicy | None = None) -> None:
        self.rules = rules
        self.policy: PinholePolicy = policy if policy is not None else rules
        self._by_key: dict[PinholeKey, Pinhole] = {}
        self._by_client: dict[IPv6Address, set[PinholeKey]] = {}
        self._by_uid: dict[int, PinholeKey] = {}
        self._next_uid = 1
        # Deadlines with lazy invalidation: an entry counts only if the pinhole still expires then.
        self._deadlines: list[tuple[float, int, PinholeKey]] = []
        self._sequence = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Pinhole]:
        return iter(list(self._by_key.values()))

    def get(self, key: PinholeKey) -> Pinhole | None:
        """The pinhole at `key`, if any."""
        return self._by_key.get(key)

    def by_uid(self, uid: int) -> Pinhole | None:
        """The pinhole with this UniqueID, if any."""
        key = self._by_uid.get(uid)
        return None if key is None else self._by_key.get(key)

    def of_client(self, client: IPv6Address) -> list[Pinhole]:
        """The pinholes `client` holds."""
        return [self._by_key[key] for key in self._by_client.get(client, ())]

    def next_deadline(self) -> float | None:
        """When the next pinhole expires, if any."""
        while self._deadlines:
            when, _, key = self._deadlines[0]
            hole = self._by_key.get(key)
            if hole is not None and hole.expires == when:
                return when
            heapq.heappop(self._deadlines)
        return None

    # -- operations -------------------------------------------------------------------------

    def decide(
        self, request: PinholeRequest, *, now: float, policy: PinholePolicy | None = None
    ) -> PinholeAllow | PinholeDeny:
        """What the network side and the policy say to `request` now (no change made)."""
        internal = request.key.internal_address
        if not self.rules.is_lan_host(internal):
            detail = f"internal address {internal} is no host of the LAN prefixes"
            return PinholeDeny(Refusal.NOT_ALLOWED, GATEWAY_RULE, detail)
        existing = self._by_key.get(request.key)
        if existing is not None and not _same_owner(existing.owner, request.owner):
            # RFC 6887 §11.3: only the nonce that created a mapping may refresh it.
            detail = f"the pinhole belongs to {existing.owner.client} ({existing.owner.mechanism})"
            return PinholeDeny(Refusal.NOT_OWNER, GATEWAY_RULE, detail)
        held = len(self._by_client.get(request.owner.client, ()))
        renewal = existing is not None
        decision = (policy or self.policy).evaluate_pinhole(
            request, held=held, total=len(self._by_key), now=now, renewal=renewal
        )
        if isinstance(decision, PinholeAllow) and not renewal:
            # WANIPv6FirewallControl:1 §2.4.4: a UniqueID is 16 bits, so never more than that.
            if len(self._by_key) >= min(self.rules.max_pinholes, MAX_UID):
                detail = f"the gateway holds {len(self._by_key)} pinholes ([ipv6] max_pinholes)"
                return PinholeDeny(Refusal.FULL, GATEWAY_RULE, detail)
        return decision

    def open(self, request: PinholeRequest, *, now: float) -> PinholeChange | PinholeDeny:
        """Open or renew a pinhole; the table changes at once on success."""
        decision = self.decide(request, now=now)
        if isinstance(decision, PinholeDeny):
            return decision
        existing = self._by_key.get(request.key)
        hole = Pinhole(
            key=request.key,
            owner=request.owner,
            created=existing.created if existing is not None else now,
            expires=now + decision.lifetime,
            description=request.description,
            filters=request.filters if decision.filters is None else decision.filters,
            # WANIPv6FirewallControl:1 §2.4.4: a renewal keeps (and returns) the UniqueID.
            uid=existing.uid if existing is not None else self._free_uid(),
        )
        self._put(hole)
        removed = (existing,) if existing is not None else ()
        return PinholeChange(removed, (hole,), decision.rule, decision.notes)

    def close(self, key: PinholeKey, owner: PinholeOwner) -> PinholeChange | PinholeDeny:
        """Delete `owner`'s pinhole at `key`; closing nothing is an empty change (§15)."""
        existing = self._by_key.get(key)
        if existing is None:
            return PinholeChange()
        if not _same_owner(existing.owner, owner):
            detail = f"the pinhole belongs to {existing.owner.client} ({existing.owner.mechanism})"
            return PinholeDeny(Refusal.NOT_OWNER, GATEWAY_RULE, detail)
        self._drop(key)
        return PinholeChange((existing,), ())

    def remove(self, keys: Iterable[PinholeKey]) -> PinholeChange:
        """Remove these pinholes whoever holds them (the admin, a reload, an address change)."""
        gone = [self._by_key[key] for key in dict.fromkeys(keys) if key in self._by_key]
        for hole in gone:
            self._drop(hole.key)
        return PinholeChange(tuple(gone), ())

    def refused(self, *, now: float, policy: PinholePolicy | None = None) -> list[Pinhole]:
        """The pinholes the network side or `policy` (default: the table's) no longer allow,
        each judged as its renewal would be."""
        found = []
        for hole in self._by_key.values():
            request = PinholeRequest(hole.key, hole.owner, max(1, hole.remaining(now)),
                                     hole.description, hole.filters)  # fmt: skip
            decision = self.decide(request, now=now, policy=policy)
            if isinstance(decision, PinholeDeny) or (
                decision.filters is not None and decision.filters != hole.filters
            ):
                found.append(hole)
        return found

    def set_rules(self, rules: PinholeRules) -> None:
        """New network side (LAN prefixes, own addresses); call `refused` for what it ends."""
        if isinstance(self.policy, PinholeRules):
            self.policy = rules
        self.rules = rules

    def set_policy(self, policy: PinholePolicy) -> None:
        """A new policy for every request from now on (a reload)."""
        self.policy = policy

    def expire(self, *, now: float) -> PinholeChange:
        """Remove every pinhole whose lease ended by `now`."""
        gone: list[Pinhole] = []
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            _, _, key = heapq.heappop(self._deadlines)
            gone.append(self._by_key[key])
            self._drop(key)
        return PinholeChange(tuple(gone), ())

    def restore(self, pinholes: Iterable[Pinhole], *, now: float) -> list[Pinhole]:
        """Load persisted pinholes; returns those dropped (expired or no longer allowed)."""
        dropped: list[Pinhole] = []
        for hole in pinholes:
            if hole.expires <= now:
                dropped.append(hole)
            elif hole.key not in self._by_key:
                if not 0 < hole.uid <= MAX_UID or hole.uid in self._by_uid:
                    hole = replace(hole, uid=self._free_uid())  # stored before UniqueIDs
                self._put(hole)
        refused = self.refused(now=now)
        for hole in refused:
            self._drop(hole.key)
        return dropped + refused

    def undo(self, change: PinholeChange) -> None:
        """Take back `change` (its commit failed): only where the table still holds its result."""
        for hole in change.added:
            if self._by_key.get(hole.key) == hole:
                self._drop(hole.key)
        for hole in change.removed:
            if hole.key not in self._by_key:
                self._put(hole)

    # -- the indexes ------------------------------------------------------------------------

    def _free_uid(self) -> int:
        """The next UniqueID no pinhole holds (the table is never full of them: see open)."""
        while self._next_uid in self._by_uid:
            self._next_uid = self._next_uid % MAX_UID + 1
        uid = self._next_uid
        self._next_uid = uid % MAX_UID + 1
        return uid

    def _put(self, hole: Pinhole) -> None:
        old = self._by_key.get(hole.key)
        if old is not None and old.owner.client != hole.owner.client:
            self._forget_client(old)
        if old is not None and old.uid != hole.uid:
            self._by_uid.pop(old.uid, None)
        if hole.uid:
            self._by_uid[hole.uid] = hole.key
        self._by_key[hole.key] = hole
        self._by_client.setdefault(hole.owner.client, set()).add(hole.key)
        self._sequence += 1
        heapq.heappush(self._deadlines, (hole.expires, self._sequence, hole.key))

    def _drop(self, key: PinholeKey) -> None:
        hole = self._by_key.pop(key)
        self._by_uid.pop(hole.uid, None)
        self._forget_client(hole)

    def _forget_client(self, hole: Pinhole) -> None:
        keys = self._by_client.get(hole.owner.client)
        if keys is not None:
            keys.discard(hole.key)
            if not keys:
                del self._by_client[hole.owner.client]


def _same_owner(held: PinholeOwner, asking: PinholeOwner) -> bool:
    return (
        held.mechanism == asking.mechanism
        and held.client == asking.client
        and (held.nonce == asking.nonce)
    )
