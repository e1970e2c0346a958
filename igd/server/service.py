"""The one door into the gateway: every protocol adapter and admin surface asks its questions,
gives its commands and hears what happened here, never reaching the table or the policy.

Commands (map, remove, reload, and the admin's delete and flush) change the table through
the gateway core and return only once the kernel and the lease store hold the change
(igd/server/commits.py). What happened is published on `feed` as typed events
(igd/events.py): grants, renewals, refusals, removals with their cause, failed commits,
external address changes and dropped datagrams.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from ipaddress import IPv4Address

from igd.decision import Deny, Reason
from igd.events import (
    Event,
    ExternalAddressChanged,
    MappingGranted,
    MappingRemoved,
    MappingRenewed,
    RemovalCause,
    RequestRefused,
)
from igd.gateway import Change, Gateway, Granted, MapResult, Refused, describe
from igd.model import Mapping, MappingKey, MapRequest, Mechanism, Protocol
from igd.policy import Policy
from igd.server.backends import Backend, BackendError, ReconcileReport
from igd.server.commits import MAX_BATCH, Committer
from igd.server.feed import DEFAULT_QUEUE_BOUND, EventFeed, Subscriber
from igd.server.store import Clock, LeaseStore
from igd.server.upstream import Public, Upstream, UpstreamRefusal

log = logging.getLogger("igd.service")

EPOCH_KEY = "epoch_start"
# After a failed removal (expiry, reload) the mappings are back in the table: wait this long
# before the expiry timer tries again, so a refusing kernel is not asked in a busy loop.
RETRY_AFTER_FAILURE = 1.0
ADDRESS_CHANGE = "its target is no LAN host or its client is the gateway (current addresses)"
# How often rows the lease store refused are written again (see commits.py).
STORE_RETRY = 5.0


class Service:
    """The gateway core plus its commit pipeline, expiry timer, epoch and event feed."""

    def __init__(
        self,
        gateway: Gateway,
        backend: Backend,
        store: LeaseStore,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = gateway
        """The core; only this class (and its commit pipeline) reaches it."""
        self.backend = backend
        self.store = store
        self.now = clock
        self.feed = EventFeed()
        self.committer = Committer(gateway, backend, store, self.feed, clock, self._restored)
        self._rearm = asyncio.Event()
        self._armed: float | None = None
        self._changes = 0
        self.epoch_start = time.time()
        self.before_map: Callable[[float], None] | None = None
        """Called with `now` before each request reaches the core (fresh host ports)."""
        self.upstream: Upstream | None = None
        """The double-NAT mirror (igd/server/upstream.py), when `[upstream]` is on."""
        self.observe: Callable[[MapRequest, float], None] | None = None
        """Told each map request and the seconds until its answer was ready (metrics)."""

    # -- queries -----------------------------------------------------------------------------

    def holder(self, key: MappingKey) -> Mapping | None:
        """The mapping with this key, if any."""
        return self.gateway.table.get(key)

    def count(self) -> int:
        """How many mappings the gateway holds."""
        return len(self.gateway.table)

    def mappings(self) -> Iterator[Mapping]:
        """Every mapping, in listing order."""
        return iter(self.gateway.table)

    def entry(self, index: int) -> Mapping | None:
        """The index-th mapping in listing order (O(1), UPnP's generic entry walk)."""
        try:
            return self.gateway.table.entry(index)
        except IndexError:
            return None

    def mappings_of(self, client: IPv4Address) -> list[Mapping]:
        """The mappings a client holds."""
        return self.gateway.table.by_client(client)

    def at_internal(
        self,
        address: IPv4Address,
        protocol: Protocol,
        port: int,
        mechanism: Mechanism | None = None,
    ) -> list[Mapping]:
        """The mappings forwarding to an internal endpoint (optionally of one mechanism)."""
        return self.gateway.table.by_internal(address, protocol, port, mechanism)

    def on_port(self, protocol: Protocol, port: int) -> list[Mapping]:
        """The mappings holding an external port, for any remote host."""
        return self.gateway.table.port_users(protocol, port)

    def renewing(self, request: MapRequest) -> Mapping | Refused | None:
        """The requester's mapping this request would renew, or the refusal in its way."""
        return self.gateway.own_mapping(request)

    def is_local(self, address: IPv4Address) -> bool:
        """Whether an address is the gateway's own or a host on an internal network."""
        gateway = self.gateway
        return address in gateway.own_addresses or any(
            address in network for network in gateway.internal_networks
        )

    def is_own(self, address: IPv4Address) -> bool:
        """Whether an address is one of the gateway's own."""
        return address in self.gateway.own_addresses

    def may_manage(self, client: IPv4Address, mechanism: Mechanism) -> bool:
        """Whether the policy lets a client act on other clients' mappings."""
        return self.gateway.policy.may_manage(client, mechanism)

    def max_lease(self) -> int:
        """The longest lease the policy grants."""
        return self.gateway.policy.defaults.max_lease

    @property
    def changes(self) -> int:
        """How often the mapping table has changed (UPnP's SystemUpdateID follows it)."""
        return self._changes

    def subscribe(
        self,
        name: str,
        bound: int = DEFAULT_QUEUE_BOUND,
        kinds: tuple[type[Event], ...] | None = None,
    ) -> Subscriber:
        """A bounded queue of every event (of these kinds) from now on (igd/server/feed.py)."""
        return self.feed.subscribe(name, bound, kinds)

    def observe_commits(self, observer: Callable[[str, float], None] | None) -> None:
        """Tell `observer` how long each kernel and lease-store write takes (metrics)."""
        self.committer.timed = observer

    def epoch(self) -> int:
        """Seconds since the mapping state began (NAT-PMP SSSoE, PCP epoch), 32 bits."""
        return int(time.time() - self.epoch_start) & 0xFFFFFFFF

    def told(self, mapping: Mapping, lifetime: int) -> Public | None:
        """Behind a double NAT, the public endpoint a mapping is reached at now and the lesser
        lease (`lifetime` the local one left); None if it is not mirrored."""
        return None if self.upstream is None else self.upstream.told(mapping, lifetime)

    async def public(self, mapping: Mapping, lifetime: int) -> Public | UpstreamRefusal | None:
        """Behind a double NAT, what to tell the client about a mapping just granted with
        `lifetime` (the upstream's endpoint, or pending); None without an upstream. A refusal
        from the upstream removes the local mapping again, so the client's refusal is whole."""
        if self.upstream is None:
            return None
        answer = await self.upstream.public(mapping, lifetime)
        if isinstance(answer, UpstreamRefusal):
            try:
                await self.remove([mapping], why=answer.detail, cause=RemovalCause.CLIENT)
            except BackendError as error:
                log.error("could not remove %s after the upstream refused: %s", mapping, error)
        return answer

    # -- commands ----------------------------------------------------------------------------

    async def map(self, request: MapRequest) -> MapResult:
        """Grant or renew a mapping; return only once the kernel and store hold it."""
        if self.observe is None:
            return await self._map(request)
        started = time.perf_counter()
        try:
            return await self._map(request)
        finally:
            self.observe(request, time.perf_counter() - started)

    async def _map(self, request: MapRequest) -> MapResult:
        now = self.now()
        if self.before_map is not None:
            self.before_map(now)
        loop = self.upstream.loops(request) if self.upstream is not None else None
        if loop is not None:
            # Our own upstream mirror's request came back to us: refused, and mirroring is
            # off (server/upstream.py), or each answer would ask for yet another port.
            self.feed.publish(RequestRefused(request, Reason.GATEWAY_CLIENT, "upstream", loop))
            return Refused(Deny(Reason.GATEWAY_CLIENT, "upstream", loop))
        result = self.gateway.map(request, now=now)
        if isinstance(result, Refused):
            deny = result.deny
            self.feed.publish(RequestRefused(request, deny.reason, deny.rule, deny.detail))
            return result
        self._changes += 1
        event: Event
        if result.renewal and result.change.removed:
            event = MappingRenewed(
                result.mapping, result.change.removed[0], request, result.decision.rule
            )
        else:
            event = MappingGranted(
                result.mapping, request, result.decision.rule, result.decision.restrictions
            )
        try:
            await self.committer.commit(result.change, (event,), request)
        except BackendError as error:
            self._changes += 1  # rolled back
            return Refused(Deny(Reason.BACKEND_FAILURE, "gateway", str(error)))
        self._watch_deadline(result.mapping.expires)
        return result

    async def remove(
        self, mappings: Iterable[Mapping], *, why: str, cause: RemovalCause = RemovalCause.CLIENT
    ) -> Change:
        """Remove mappings (as found by a query) from the table, the kernel and the store;
        BackendError if the kernel or the store refused (the mappings then stay). A static
        forward is removed only by its `until`, a reload or an address change: no client
        and no admin command takes it (the policy file declares it)."""
        if cause in (RemovalCause.CLIENT, RemovalCause.ADMIN):
            mappings = [m for m in mappings if not m.is_static]
        change = self.gateway.remove(mappings, why=why)
        if change:
            self._changes += 1
            events = tuple(MappingRemoved(m, cause) for m in change.removed)
            try:
                await self.committer.commit(change, events)
            except BackendError:
                self._changes += 1  # rolled back
                raise
        return change

    async def delete(self, key: MappingKey) -> Mapping | None:
        """Admin: remove the mapping with this key, whoever holds it; None if there is none
        (a static forward is the policy file's to remove)."""
        mapping = self.holder(key)
        if mapping is None or mapping.is_static:
            return None
        await self.remove([mapping], why="deleted by the admin", cause=RemovalCause.ADMIN)
        return mapping

    async def flush(
        self, *, client: IPv4Address | None = None, mechanism: Mechanism | None = None
    ) -> Change:
        """Admin: remove every mapping (of one client, of one mechanism, or both)."""
        chosen = self.mappings_of(client) if client is not None else list(self.mappings())
        if mechanism is not None:
            chosen = [m for m in chosen if m.owner.mechanism is mechanism]
        return await self.remove(chosen, why="flushed by the admin", cause=RemovalCause.ADMIN)

    async def reload(self, policy: Policy) -> Change:
        """Switch policy; mappings it refuses are removed."""
        change = self.gateway.reload(policy, now=self.now(), wall=time.time())
        if change:
            await self._commit_or_log(change, "policy reload", RemovalCause.POLICY_RELOAD)
        return change

    async def expire(self) -> bool:
        """Remove every mapping whose lease has ended (what the expiry timer does); False if
        the kernel or the store refused (the mappings then stay, to be tried again)."""
        change = self.gateway.expire(now=self.now())
        # A key whose change is still being committed is not expired yet: that change may
        # fail and be undone (a failing renewal puts back the mapping it replaced), and an
        # expiry of the uncommitted state would take the client's granted mapping with it.
        waiting = [m for m in change.removed if self.committer.in_flight(m.key)]
        if waiting:
            for mapping in waiting:
                self.gateway.table.put(mapping)
            change = Change(tuple(m for m in change.removed if m not in waiting))
        done = await self._commit_or_log(change, "expiry", RemovalCause.EXPIRED) if change else True
        return done and not waiting

    def address_changed(self, previous: IPv4Address | None, current: IPv4Address | None) -> None:
        """The external address changed: a new epoch (RFC 6887 §8.5), and tell subscribers
        (the NAT-PMP/PCP announcements, PCP Mapping Update, GENA)."""
        self.reset_epoch()
        self.feed.publish(ExternalAddressChanged(previous, current))

    def set_host_ports(self, ports: frozenset[tuple[Protocol, int]]) -> None:
        """The ports the router itself serves on its external addresses: never mapped."""
        self.gateway.host_ports = ports

    def set_own_addresses(self, addresses: frozenset[IPv4Address]) -> None:
        """The gateway's own addresses (before restore; afterwards `readdress`)."""
        self.gateway.own_addresses = addresses

    async def readdress(self, addresses: frozenset[IPv4Address]) -> Change:
        """The gateway's own addresses are now these: remove the mappings they forbid (a
        target off the LAN, a client that is now the gateway's own address)."""
        if addresses == self.gateway.own_addresses:
            return Change()
        log.info("gateway addresses now %s", ", ".join(sorted(map(str, addresses))))
        self.gateway.own_addresses = addresses
        forbidden = self.gateway.forbidden(now=self.now())
        for mapping, deny in forbidden:
            log.info("removing %s: %s (rule %r)", describe(mapping), deny.detail, deny.rule)
        change = await self.remove(
            [m for m, _ in forbidden], why=ADDRESS_CHANGE, cause=RemovalCause.ADDRESS_CHANGE
        )
        # Forwards the old addresses kept out (a target that was no LAN host) come back.
        policy = self.gateway.policy
        forwards = self.gateway.sync_forwards(policy, now=self.now(), wall=time.time())
        if forwards:
            await self._commit_or_log(forwards, "address change", RemovalCause.ADDRESS_CHANGE)
        return Change((*change.removed, *forwards.removed), forwards.added)

    def publish(self, event: Event) -> None:
        """Report something an adapter saw (a dropped datagram) to every subscriber."""
        self.feed.publish(event)

    def reset_epoch(self) -> None:
        """Start a new epoch (state lost or external address changed) and persist it."""
        self.epoch_start = time.time()
        self.store.set_meta(EPOCH_KEY, repr(self.epoch_start))

    def restore_epoch(self, *, kept_mappings: bool) -> None:
        """Continue the persisted epoch when mappings survived, else begin a new one."""
        saved = self.store.get_meta(EPOCH_KEY)
        if kept_mappings and saved is not None:
            self.epoch_start = float(saved)
        else:
            self.reset_epoch()

    # -- start-up ------------------------------------------------------------------------------

    def restore(
        self, persisted: Iterable[Mapping], *, recheck: Policy | None, now: float
    ) -> tuple[list[Mapping], Change]:
        """Put persisted mappings back at start (before anything is served): those dropped as
        expired or clashing, and those `recheck`'s policy refuses, leave the store too."""
        dropped = self.gateway.restore(persisted, now=now)
        wall = time.time()
        # The forwards come from the policy file, whatever the store held (docs/policy.md):
        # `restore` dropped the stored ones, and both branches install the file's.
        if recheck is not None:
            refused = self.gateway.reload(recheck, now=now, wall=wall)
        else:
            # Same policy, but the addresses may differ: drop what points off the LAN.
            forbidden = self.gateway.forbidden(now=now)
            gone = self.gateway.remove([m for m, _ in forbidden], why=ADDRESS_CHANGE)
            forwards = self.gateway.sync_forwards(None, now=now, wall=wall)
            refused = Change((*gone.removed, *forwards.removed), forwards.added)
        self.store.apply([*dropped, *refused.removed], refused.added, Clock(mono=now))
        self._changes += 1
        return dropped, Change(refused.removed, ())

    async def reconcile(self, *, now: float, audit_limit: int) -> ReconcileReport:
        """Make the kernel hold exactly the table's mappings (at start)."""
        wanted = list(self.gateway.table)
        return await self.backend.reconcile(wanted, now=now, audit=len(wanted) <= audit_limit)

    # -- background tasks --------------------------------------------------------------------

    async def run_committer(self) -> None:
        """Commit changes that queued up behind another (see igd/server/commits.py)."""
        await self.committer.run(STORE_RETRY)

    async def run_expiry(self) -> None:
        """Remove mappings as their leases end, sleeping until the next deadline."""
        while True:
            self._armed = self.gateway.table.next_deadline()
            timeout = None if self._armed is None else max(0.0, self._armed - self.now())
            try:
                await asyncio.wait_for(self._rearm.wait(), timeout)
            except TimeoutError:
                pass
            self._rearm.clear()
            if not await self.expire():
                await asyncio.sleep(RETRY_AFTER_FAILURE)

    # -- internals -----------------------------------------------------------------------------

    async def _commit_or_log(self, change: Change, what: str, cause: RemovalCause) -> bool:
        self._changes += 1
        events: tuple[Event, ...] = tuple(MappingRemoved(m, cause) for m in change.removed)
        # Only forwards are added by a reload or an address change: installed by the admin.
        events += tuple(
            MappingGranted(m, MapRequest.renewing(m), f"forward {m.description!r}")
            for m in change.added
        )
        try:
            await self.committer.commit(change, events)
        except BackendError as error:
            self._changes += 1
            # The mappings are back in the table, as they are in the kernel: a later
            # attempt removes them.
            log.error("%s: could not remove %d mappings: %s", what, len(change.removed), error)
            return False
        return True

    def _restored(self, mapping: Mapping) -> None:
        self._changes += 1
        self._watch_deadline(mapping.expires)

    def _watch_deadline(self, expires: float) -> None:
        if self._armed is None or expires < self._armed:
            self._rearm.set()


__all__ = ["MAX_BATCH", "Granted", "Refused", "Service"]
