"""GENA eventing (UDA 1.1 §4): subscriptions, renewals, and NOTIFY delivery.

CallStranger (CVE-2020-12695) defence: a delivery URL must be `http://` to the subscriber's
own literal IPv4 address, or the SUBSCRIBE is refused with 412; deliveries time out quickly
and never follow redirects. Subscriptions are capped per client and in total; when the total
is reached, a client holding fewer than the biggest holder (always one holding none) gets its
subscription in place of that holder's oldest, so a few hosts cannot take the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import aiohttp

from igd.proto import gena
from igd.proto.description import DeviceTree, ServiceKind
from igd.proto.errors import DecodeError
from igd.server.ratelog import RateLimitedLog

log = logging.getLogger("igd.upnp.events")

MAX_SUBSCRIPTIONS = 256
MAX_SUBSCRIPTIONS_PER_CLIENT = 16
DELIVERY_TIMEOUT = 3.0  # seconds for one NOTIFY, connection included
CONNECT_TIMEOUT = 2.0
MAX_FAILURES = 3  # consecutive failed deliveries before a subscription is dropped
MODERATION = 0.1  # seconds changes are gathered before one NOTIFY carries them all


@dataclass(eq=False)
class Subscription:
    """One subscriber to one service's events."""

    sid: str
    client: IPv4Address
    target: gena.CallbackTarget
    kind: ServiceKind
    tree: DeviceTree
    version: int
    expires: float
    names: tuple[str, ...]
    """The service version's evented variables, in state-table order."""
    seq: int = 0
    dirty: set[str] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    failures: int = 0
    task: asyncio.Task[None] | None = None


Values = Callable[[DeviceTree, str], str | None]


class Events:
    """All GENA subscriptions of the gateway."""

    def __init__(
        self,
        values: Values,
        evented: Callable[[ServiceKind, int], list[str]],
        *,
        server: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.values = values
        self.evented = evented
        self.server = server
        self.clock = clock
        # Insertion order is age order (a renewal keeps its place).
        self.subscriptions: dict[str, Subscription] = {}
        self._per_client: Counter[IPv4Address] = Counter()
        self._session: aiohttp.ClientSession | None = None
        self.refused = RateLimitedLog(log, logging.WARNING)
        self.evicted = RateLimitedLog(log, logging.INFO)

    # -- SUBSCRIBE / UNSUBSCRIBE -------------------------------------------------------------

    def subscribe(
        self,
        client: IPv4Address,
        kind: ServiceKind,
        tree: DeviceTree,
        version: int,
        headers: Mapping[str, str],
    ) -> tuple[int, dict[str, str]]:
        """Answer a SUBSCRIBE (new or renewal): HTTP status and response headers."""
        self.expire()
        sid = headers.get("SID")
        try:
            timeout = gena.parse_timeout(headers.get("TIMEOUT"))
        except DecodeError:
            timeout = gena.MIN_TIMEOUT
        if sid is not None:
            # UDA 1.1 §4.1.2: a renewal carries SID only; SID with NT or CALLBACK is 400.
            if "NT" in headers or "CALLBACK" in headers:
                return 400, {}
            existing = self.subscriptions.get(sid.strip())
            if existing is None or existing.client != client or existing.kind is not kind:
                return 412, {}
            existing.expires = self.clock() + timeout
            return 200, self._granted(existing, timeout)
        if headers.get("NT", "").strip() != gena.NT_EVENT:
            return 412, {}
        try:
            urls = gena.parse_callbacks(headers.get("CALLBACK", ""))
        except DecodeError:
            return 412, {}
        target = next(
            (t for t in map(gena.callback_target, urls) if t is not None and t.host == client),
            None,
        )
        now = self.clock()
        if target is None:
            self.refused.note(
                now,
                "refused SUBSCRIBE from %s: callback %.200s is not its own address",
                client,
                urls,
            )
            return 412, {}
        held = self._per_client[client]
        if held >= MAX_SUBSCRIPTIONS_PER_CLIENT or (
            len(self.subscriptions) >= MAX_SUBSCRIPTIONS and not self._evict_for(client, held)
        ):
            self.refused.note(now, "refused SUBSCRIBE from %s: subscription limit reached", client)
            return 503, {}
        names = tuple(self.evented(kind, version))
        subscription = Subscription(
            sid=f"uuid:{uuid.uuid4()}",
            client=client,
            target=target,
            kind=kind,
            tree=tree,
            version=version,
            expires=self.clock() + timeout,
            names=names,
            dirty=set(names),  # UDA 1.1 §4.2: the initial event carries every variable
        )
        self.subscriptions[subscription.sid] = subscription
        self._per_client[client] += 1
        subscription.task = asyncio.get_running_loop().create_task(self._deliver(subscription))
        subscription.wake.set()
        log.info("%s subscribed to %s events at %s", client, kind, target.url)
        return 200, self._granted(subscription, timeout)

    def unsubscribe(self, client: IPv4Address, headers: Mapping[str, str]) -> int:
        """Answer an UNSUBSCRIBE: its HTTP status."""
        if "NT" in headers or "CALLBACK" in headers:
            return 400
        subscription = self.subscriptions.get(headers.get("SID", "").strip())
        if subscription is None or subscription.client != client:
            return 412
        self._drop(subscription)
        return 200

    def _evict_for(self, client: IPv4Address, held: int) -> bool:
        """Make room for `client` by dropping the oldest subscription of the client holding
        the most, if that one holds more than `client` would; False when there is no room."""
        victim_client, most = self._per_client.most_common(1)[0]
        # A client with nothing is always admitted; otherwise only when it would still hold
        # no more than the victim (no endless swapping between two big holders).
        if not (held == 0 < most or most > held + 1):
            return False
        victim = next(s for s in self.subscriptions.values() if s.client == victim_client)
        self.evicted.note(
            self.clock(),
            "subscription pool full: dropped %s of %s (holding %d) for %s",
            victim.sid,
            victim_client,
            most,
            client,
        )
        self._drop(victim)
        return True

    def _granted(self, subscription: Subscription, timeout: int) -> dict[str, str]:
        return {
            "SID": subscription.sid,
            "TIMEOUT": gena.timeout_header(timeout),
            "SERVER": self.server,
        }

    # -- events ------------------------------------------------------------------------------

    def changed(self, kind: ServiceKind, names: set[str]) -> None:
        """Variables of a service changed: notify its subscribers (moderated)."""
        self.expire()
        for subscription in self.subscriptions.values():
            if subscription.kind is kind:
                fresh = names.intersection(subscription.names)
                if fresh:
                    subscription.dirty |= fresh
                    subscription.wake.set()

    def expire(self) -> None:
        """Drop subscriptions whose TIMEOUT passed without a renewal."""
        now = self.clock()
        for subscription in [s for s in self.subscriptions.values() if s.expires <= now]:
            log.info("subscription %s of %s expired", subscription.sid, subscription.client)
            self._drop(subscription)

    async def close(self) -> None:
        """Stop every delivery."""
        for subscription in list(self.subscriptions.values()):
            self._drop(subscription)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _drop(self, subscription: Subscription) -> None:
        self._forget(subscription)
        if subscription.task is not None:
            subscription.task.cancel()

    def _forget(self, subscription: Subscription) -> None:
        if self.subscriptions.pop(subscription.sid, None) is not None:
            self._per_client[subscription.client] -= 1
            if self._per_client[subscription.client] <= 0:
                del self._per_client[subscription.client]

    async def _deliver(self, subscription: Subscription) -> None:
        """One subscriber's NOTIFYs, in SEQ order, one at a time."""
        while True:
            await subscription.wake.wait()
            # Let a burst of changes (and the SUBSCRIBE answer) go out before the event.
            await asyncio.sleep(MODERATION)
            subscription.wake.clear()
            names, subscription.dirty = subscription.dirty, set()
            values = []
            for name in subscription.names:
                if name in names:
                    value = self.values(subscription.tree, name)
                    if value is not None:
                        values.append((name, value))
            if not values:
                continue
            delivered = await self._send(subscription, gena.encode_propertyset(values))
            subscription.seq = gena.next_seq(subscription.seq)
            subscription.failures = 0 if delivered else subscription.failures + 1
            if subscription.failures >= MAX_FAILURES:
                log.info(
                    "dropping subscription %s: %d failed deliveries", subscription.sid, MAX_FAILURES
                )
                self._forget(subscription)
                return

    async def _send(self, subscription: Subscription, body: bytes) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT, connect=CONNECT_TIMEOUT),
                connector=aiohttp.TCPConnector(limit=64, force_close=True),
                skip_auto_headers=("User-Agent",),
            )
        target = subscription.target
        headers = {
            "HOST": f"{target.host}:{target.port}",
            "CONTENT-TYPE": 'text/xml; charset="utf-8"',
            "NT": gena.NT_EVENT,
            "NTS": gena.NTS_PROPCHANGE,
            "SID": subscription.sid,
            "SEQ": str(subscription.seq),
        }
        try:
            async with self._session.request(
                "NOTIFY", target.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                # The body is not read: a subscriber cannot make the gateway download anything.
                ok = 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            log.debug("NOTIFY to %s failed: %s", target.url, error)
            return False
        if not ok:
            log.debug("NOTIFY to %s answered %d", target.url, response.status)
        return ok


async def cancelled(task: asyncio.Task[None] | None) -> None:
    """Wait for a cancelled task to finish (helper for tests and shutdown)."""
    if task is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await task
