"""What the web console shows that the table does not keep: the rule behind each mapping's
and pinhole's latest grant, and the recent refusals; fed by a subscriber of the event feed."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from igd.events import (
    MappingGranted,
    MappingRemoved,
    MappingRenewed,
    PinholeOpened,
    PinholeRefused,
    PinholeRemoved,
    PinholeRenewed,
    RequestRefused,
)
from igd.model import Mapping, MappingKey
from igd.pinhole import Pinhole, PinholeKey
from igd.policy import Policy
from igd.server.service import Service

if TYPE_CHECKING:
    from igd.server.pinholes import PinholeService

REFUSALS_KEPT = 200  # the console's ring buffer of recent refusals
CONSOLE_QUEUE_BOUND = 4096  # the console subscriber's queue (events)
MAX_LISTED = 5000  # mappings sent to the page at once; the count says how many there are


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused request, as the console lists it."""

    at: float
    """Wall-clock time (Unix seconds)."""
    event: RequestRefused | PinholeRefused


class ConsoleLog:
    """Rules per mapping key and recent refusals, kept from the event feed."""

    def __init__(self, service: Service, *, kept: int = REFUSALS_KEPT) -> None:
        self.service = service
        self.rules: dict[MappingKey, str] = {}
        """The rule of each mapping's latest grant or renewal (bounded by the table: a key
        leaves when its mapping is removed)."""
        self.refusals: deque[Refusal] = deque(maxlen=kept)
        self.lost = 0
        self.pinholes: PinholeService | None = None
        """The IPv6 pinhole service, when `[ipv6]` is enabled."""
        self.pinhole_rules: dict[PinholeKey, str] = {}
        """The rule of each pinhole's latest grant (bounded like `rules`)."""

    async def follow(self) -> None:
        """Keep up with the feed until cancelled."""
        kinds = (MappingGranted, MappingRenewed, MappingRemoved, RequestRefused,
                 PinholeOpened, PinholeRenewed, PinholeRemoved, PinholeRefused)  # fmt: skip
        subscriber = self.service.subscribe("console", CONSOLE_QUEUE_BOUND, kinds)
        try:
            while True:
                events, lost = await subscriber.next()
                if lost:
                    # Removals may be among the lost: forget rules of keys no longer held.
                    self.lost += lost
                    self.rules = {k: r for k, r in self.rules.items() if self.service.holder(k)}
                    held = self.pinholes
                    self.pinhole_rules = {
                        k: r for k, r in self.pinhole_rules.items() if held and held.get(k)
                    }
                for event in events:
                    self.note(event, at=time.time())
        except asyncio.CancelledError:
            subscriber.close()
            raise

    def note(self, event: object, *, at: float) -> None:
        """Take one event into account."""
        match event:
            case MappingGranted(mapping=m, rule=rule) | MappingRenewed(mapping=m, rule=rule):
                self.rules[m.key] = rule
            case MappingRemoved(mapping=m):
                if self.service.holder(m.key) is None:
                    self.rules.pop(m.key, None)
            case RequestRefused() | PinholeRefused():
                self.refusals.append(Refusal(at, event))
            case PinholeOpened(pinhole=h, rule=rule) | PinholeRenewed(pinhole=h, rule=rule):
                self.pinhole_rules[h.key] = rule
            case PinholeRemoved(pinhole=h):
                if self.pinholes is None or self.pinholes.get(h.key) is None:
                    self.pinhole_rules.pop(h.key, None)

    def pinhole_rows(self, *, now: float) -> tuple[list[dict[str, Any]], int]:
        """Up to MAX_LISTED pinholes as JSON-ready rows, and how many there are."""
        if self.pinholes is None:
            return [], 0
        holes = self.pinholes.pinholes()
        return [self.pinhole_row(h, now=now) for h in holes[:MAX_LISTED]], len(holes)

    def pinhole_row(self, h: Pinhole, *, now: float) -> dict[str, Any]:
        """One pinhole for the page."""
        return {
            "protocol": str(h.key.protocol),
            "internal": f"[{h.key.internal_address}]:{h.key.internal_port}",
            "remote_host": str(h.key.remote.network) if h.key.remote else None,
            "filters": [str(f.network) for f in h.filters],
            "client": str(h.owner.client),
            "mechanism": str(h.owner.mechanism),
            "description": h.description,
            "rule": self.pinhole_rules.get(h.key),
            "age": max(0, int(now - h.created)),
            "remaining": h.remaining(now),
        }

    def mapping_rows(self, *, now: float) -> tuple[list[dict[str, Any]], int]:
        """Up to MAX_LISTED mappings as JSON-ready rows, and how many there are."""
        rows = []
        for index, mapping in enumerate(self.service.mappings()):
            if index >= MAX_LISTED:
                break
            rows.append(self.row(mapping, now=now))
        return rows, self.service.count()

    def row(self, m: Mapping, *, now: float) -> dict[str, Any]:
        """One mapping for the page."""
        return {
            "protocol": str(m.key.protocol),
            "external_port": m.key.external_port,
            "external_address": str(m.external_address) if m.external_address else None,
            "remote_host": str(m.key.remote_host) if m.key.remote_host else None,
            "internal": f"{m.internal_address}:{m.internal_port}",
            "client": str(m.owner.client),
            "mechanism": str(m.owner.mechanism),
            "description": m.description,
            "rule": self.rules.get(m.key),
            "age": max(0, int(now - m.created)),
            "remaining": m.remaining(now),
        }

    def refusal_rows(self) -> list[dict[str, Any]]:
        """The recent refusals, newest first."""
        rows = []
        for refusal in reversed(self.refusals):
            if isinstance(refusal.event, PinholeRefused):
                rows.append(_pinhole_refusal_row(refusal.at, refusal.event))
                continue
            r = refusal.event.request
            target = f"{r.internal_address}:{r.internal_port}"
            port = f" external {r.external_port}" if r.external_port else ""
            rows.append(
                {
                    "at": refusal.at,
                    "client": str(r.client),
                    "mechanism": str(r.mechanism),
                    "request": f"{r.protocol} {target}{port} for {r.lifetime} s",
                    "rule": refusal.event.rule,
                    "reason": str(refusal.event.reason),
                    "detail": refusal.event.detail,
                }
            )
        return rows


def _pinhole_refusal_row(at: float, event: PinholeRefused) -> dict[str, Any]:
    key = event.request.key
    return {
        "at": at,
        "client": str(event.request.owner.client),
        "mechanism": str(event.request.owner.mechanism),
        "request": f"pinhole {key.protocol} [{key.internal_address}]:{key.internal_port}"
        f" for {event.request.lifetime} s",
        "rule": event.rule,
        "reason": event.refusal.name.lower().replace("_", "-"),
        "detail": event.detail,
    }


def policy_rows(policy: Policy) -> dict[str, Any]:
    """The policy in force, rule by rule, for the page."""
    d = policy.defaults
    rules = []
    for rule in policy.rules:
        criteria = []
        for name in ("clients", "internal_addresses"):
            networks = getattr(rule, name)
            if networks is not None:
                criteria.append(f"{name} {', '.join(map(str, networks))}")
        for name in ("internal_ports", "external_ports"):
            ports = getattr(rule, name)
            if ports is not None:
                criteria.append(f"{name} {ports}")
        for name in ("protocols", "via"):
            chosen = getattr(rule, name)
            if chosen is not None:
                criteria.append(f"{name} {', '.join(sorted(map(str, chosen)))}")
        if rule.description is not None:
            criteria.append(f"description ~ {rule.description.pattern}")
        if rule.max_lease is not None:
            criteria.append(f"max_lease {rule.max_lease}")
        if rule.max_mappings_per_client is not None:
            criteria.append(f"max_mappings_per_client {rule.max_mappings_per_client}")
        if rule.allow_third_party:
            criteria.append("allow_third_party")
        rules.append(
            {
                "name": rule.name,
                "action": str(rule.action),
                "line": rule.line,
                "criteria": "; ".join(criteria) or "any request",
            }
        )
    return {
        "source": policy.source,
        "defaults": (
            f"{d.action}; leases {d.min_lease}-{d.max_lease} s; at most"
            f" {d.max_mappings_per_client} mappings per client, {d.max_mappings} in all;"
            f" secure_mode {'on' if d.secure_mode else 'off'}"
        ),
        "rules": rules,
    }
