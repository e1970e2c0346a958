"""The policy engine: a pure function from a map request and the table's counts to a Decision.

Rules are tried in file order and the first that matches decides. Deny rules that restrict
only external ports are the exception: when the gateway may choose the external port, they
narrow the ports it may choose instead of refusing the request (see docs/policy.md).
IPv6 pinhole requests go through the same rules (`evaluate_pinhole`): a rule's IPv4
networks match mappings, its IPv6 networks pinholes, and a pinhole's external port is its
internal port (a pure firewall translates nothing).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Protocol, TypeVar

from igd.decision import Allow, Decision, Deny, Reason
from igd.model import (
    STATIC_CLIENT,
    Mapping,
    MappingKey,
    MapRequest,
    Mechanism,
    Owner,
    RemoteFilter,
)
from igd.pinhole import PinholeAllow, PinholeDeny, PinholeFilter, PinholeRequest, Refusal
from igd.policy.file import (
    DEFAULTS_NAME,
    Action,
    Defaults,
    Forward,
    Network,
    PolicyFileError,
    PolicyIssue,
    Rule,
    read_file,
    read_text,
)
from igd.ports import PortSet

__all__ = [
    "DEFAULTS_NAME",
    "Action",
    "Defaults",
    "Forward",
    "Policy",
    "PolicyFileError",
    "PolicyIssue",
    "Rule",
    "TableView",
]


class TableView(Protocol):
    """The counts the policy needs from the mapping table (MappingTable satisfies it)."""

    def __len__(self) -> int: ...

    def count_for_client(self, client: IPv4Address) -> int: ...


class _EmptyView:
    """A table with no mappings, for rechecks and explanations."""

    def __len__(self) -> int:
        return 0

    def count_for_client(self, client: IPv4Address) -> int:
        return 0


EMPTY_VIEW: TableView = _EmptyView()
_PortsKey = tuple[int, PortSet, tuple[str, ...]]
_Ports = tuple[PortSet, tuple[str, ...], str]
MAX_REMEMBERED_REQUESTERS = 4096
"""(client, mechanism) pairs whose rule matches a Policy remembers (all cleared beyond it)."""
_DEFAULT_ONLY: tuple[IPv4Address | None, ...] = (None,)
# A pinhole over quota is refused as a mapping would be, in the pinholes' own terms.
_QUOTA_REFUSALS = {Reason.CLIENT_QUOTA: Refusal.QUOTA, Reason.GATEWAY_QUOTA: Refusal.FULL}


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy file: the defaults and the ordered rules."""

    defaults: Defaults
    rules: tuple[Rule, ...]
    source: str = "<string>"
    forwards: tuple[Forward, ...] = ()
    """The admin's static forwards ([[forwards]]), in file order."""
    addressed: bool = field(init=False, compare=False, repr=False)
    """Whether any rule names external addresses (else every mapping uses the default)."""
    _requesters: dict[tuple[IPv4Address, Mechanism], tuple[bool, ...]] = field(
        init=False, compare=False, repr=False
    )
    """Which rules each (client, mechanism) passes, worked out once per client: a reload
    makes a new Policy, so nothing outlives the rules it was computed from."""
    _ports: dict[_PortsKey, _Ports] = field(init=False, compare=False, repr=False)
    """The ports an allowing rule grants after the deny rules carved theirs out, and what
    narrowed them (the same few combinations for every request)."""

    def __post_init__(self) -> None:
        addressed = any(rule.external_addresses for rule in self.rules)
        object.__setattr__(self, "addressed", addressed)
        object.__setattr__(self, "_requesters", {})
        object.__setattr__(self, "_ports", {})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read a policy file; raise PolicyFileError listing every problem."""
        parts = read_file(path)
        return cls(parts.defaults, parts.rules, os.fspath(path), parts.forwards)

    @classmethod
    def parse(cls, text: str, source: str = "<string>") -> Policy:
        """Parse policy text; raise PolicyFileError listing every problem."""
        parts = read_text(text, source)
        return cls(parts.defaults, parts.rules, source, parts.forwards)

    def forward_mappings(self, *, now: float, wall: float) -> dict[MappingKey, Mapping]:
        """The mappings the forwards hold at wall-clock time `wall` (monotonic `now`): one per
        protocol and port; a forward whose `until` has passed holds none."""
        found: dict[MappingKey, Mapping] = {}
        owner = Owner(Mechanism.STATIC, STATIC_CLIENT)
        for forward in self.forwards:
            if forward.until is not None and forward.until <= wall:
                continue
            # Monotonic expiry: the table's expiry removes a temporary forward at `until`.
            expires = math.inf if forward.until is None else now + (forward.until - wall)
            filters = tuple(RemoteFilter(n) for n in forward.remote_hosts or ())
            for protocol in sorted(forward.protocols):
                for offset, port in enumerate(forward.ports()):
                    key = MappingKey(protocol, port, None, forward.external_address)
                    found[key] = Mapping(
                        key=key,
                        internal_address=forward.internal_address,
                        internal_port=forward.internal_port + offset,
                        owner=owner,
                        created=now,
                        expires=expires,
                        description=forward.name,
                        filters=filters,
                    )
        return found

    def forward_index(self) -> dict[MappingKey, Forward]:
        """The forward holding each key (one per protocol and port)."""
        return {
            MappingKey(protocol, port, None, forward.external_address): forward
            for forward in self.forwards
            for protocol in forward.protocols
            for port in forward.ports()
        }

    def warnings(self, *, wall: float | None = None) -> list[PolicyIssue]:
        """Valid but risky settings, for `policy check` and the daemon's log; with the
        wall-clock time `wall`, forwards whose `until` has passed too."""
        found = []
        for index, forward in enumerate(self.forwards):
            if wall is not None and forward.until is not None and forward.until <= wall:
                found.append(
                    PolicyIssue(
                        self.source,
                        forward.until_line,
                        f"forwards[{index}].until",
                        f"warning: forward {forward.name!r} ended at {_instant(forward.until)};"
                        " it is not installed",
                    )
                )
        if not self.defaults.secure_mode:
            found.append(
                PolicyIssue(
                    self.source,
                    None,
                    "defaults.secure_mode",
                    "warning: secure_mode = false lets every allowed client map ports to any"
                    " LAN host",
                )
            )
        for index, rule in enumerate(self.rules):
            if rule.action is Action.ALLOW and rule.allow_third_party:
                if rule.internal_addresses is None:
                    found.append(
                        PolicyIssue(
                            self.source,
                            rule.line,
                            f"rules[{index}].allow_third_party",
                            "warning: allow_third_party without internal_addresses lets the"
                            " rule's clients map ports to any LAN host; list the hosts in"
                            " internal_addresses",
                        )
                    )
        return found

    def rule(self, name: str) -> Rule | None:
        """The rule with this name, if any."""
        return next((rule for rule in self.rules if rule.name == name), None)

    def evaluate(
        self, request: MapRequest, view: TableView, *, now: float, renewal: bool = False
    ) -> Decision:
        """Decide a request; a renewal keeps its external port and is exempt from quotas."""
        # `now` belongs to the core's calling convention; no rule depends on time yet.
        fixed = request.exact_port or renewal
        carved = PortSet()
        carved_by: list[str] = []
        port_denied: Deny | None = None
        requester = self._requester(request.client, request.mechanism)
        for rule, passes in zip(self.rules, requester, strict=True):
            if not passes or not _target_matches(rule, request):
                continue
            if rule.action is Action.ALLOW:
                return self._decide(
                    rule, request, view, fixed, renewal, carved, carved_by, port_denied
                )
            if rule.external_ports is None:
                denied = Deny(Reason.POLICY_DENIED, rule.name, f"{_describe(request)} is denied")
                return port_denied or denied
            if fixed and port_denied is None and request.external_port in rule.external_ports:
                detail = f"external port {request.external_port} is denied"
                port_denied = Deny(Reason.POLICY_DENIED, rule.name, detail)
            # The gateway chooses the port: keep it out of these ports rather than refuse. A
            # fixed port refused above goes on the same way, to learn whether another port
            # would have been granted (Deny.other_port_allowed).
            carved = PortSet.of(carved.intervals + rule.external_ports.intervals)
            carved_by.append(rule.name)
        if self.defaults.action is Action.DENY:
            detail = f"no rule matches {_describe(request)} and the default action is deny"
            return port_denied or Deny(Reason.POLICY_DENIED, DEFAULTS_NAME, detail)
        return self._decide(None, request, view, fixed, renewal, carved, carved_by, port_denied)

    def _requester(self, client: IPv4Address, mechanism: Mechanism) -> tuple[bool, ...]:
        """Whether each rule applies to this requester and mechanism (remembered)."""
        key = (client, mechanism)
        found = self._requesters.get(key)
        if found is None:
            if len(self._requesters) >= MAX_REMEMBERED_REQUESTERS:
                self._requesters.clear()
            found = self._requesters[key] = tuple(
                _requester_matches(rule, request_client=client, mechanism=mechanism)
                for rule in self.rules
            )
        return found

    def evaluate_pinhole(
        self, request: PinholeRequest, *, held: int, total: int, now: float, renewal: bool = False
    ) -> PinholeAllow | PinholeDeny:
        """Decide an IPv6 pinhole request by the same rules as mappings: `held` is the
        client's pinholes and `total` all pinholes (counted apart from mappings against the
        same limits); a renewal is exempt from quotas."""
        # `now` belongs to the core's calling convention; no rule depends on time yet.
        port = request.key.internal_port
        for rule in self.rules:
            if not _pinhole_matches(rule, request):
                continue
            if rule.action is Action.ALLOW:
                return self._grant_pinhole(rule, request, held, total, renewal)
            # A pinhole's external port is its internal port: a deny rule's external_ports
            # refuse it when they hold that port, and let later rules decide otherwise.
            if rule.external_ports is None or port in rule.external_ports:
                detail = f"{_describe_pinhole(request)} is denied"
                return PinholeDeny(Refusal.NOT_ALLOWED, rule.name, detail)
        if self.defaults.action is Action.DENY:
            detail = f"no rule matches {_describe_pinhole(request)} and the default action is deny"
            return PinholeDeny(Refusal.NOT_ALLOWED, DEFAULTS_NAME, detail)
        return self._grant_pinhole(None, request, held, total, renewal)

    def _grant_pinhole(
        self, rule: Rule | None, request: PinholeRequest, held: int, total: int, renewal: bool
    ) -> PinholeAllow | PinholeDeny:
        """Apply an allowing rule (None: the default action) to a pinhole request."""
        name = DEFAULTS_NAME if rule is None else rule.name
        port = request.key.internal_port
        if rule is not None and rule.external_ports is not None and port not in rule.external_ports:
            detail = (
                f"port {port} (a pinhole's external port is its internal port) is outside"
                f" the allowed ports {rule.external_ports}"
            )
            return PinholeDeny(Refusal.NOT_ALLOWED, name, detail)
        client, internal = request.owner.client, request.key.internal_address
        third_party_allowed = rule is not None and rule.allow_third_party
        if internal != client and self.defaults.secure_mode and not third_party_allowed:
            detail = (
                f"internal address {internal} is not the requester {client}"
                " (secure mode; set allow_third_party on the rule)"
            )
            return PinholeDeny(Refusal.THIRD_PARTY, name, detail)
        if not renewal:
            over = self._over_quota(rule, client, held, total, "pinholes")
            if over is not None:
                return PinholeDeny(_QUOTA_REFUSALS[over.reason], over.rule, over.detail)
        filters: tuple[PinholeFilter, ...] | None = None
        if rule is not None and rule.remote_hosts is not None:
            restricted = _restrict_pinhole(rule.remote_hosts, request)
            if isinstance(restricted, str):
                return PinholeDeny(Refusal.NOT_ALLOWED, name, restricted)
            filters = restricted
        lifetime, notes = self._lease(rule, request.lifetime, filters, request.filters)
        return PinholeAllow(name, lifetime, tuple(notes), filters)

    def may_manage(self, client: IPv4Address, mechanism: Mechanism) -> bool:
        """Whether a client may see and remove other hosts' mappings (UPnP NewManage): the
        same grant as third-party mapping, secure mode off or an allow rule for this client
        and mechanism that sets allow_third_party."""
        if not self.defaults.secure_mode:
            return True
        return any(
            rule.action is Action.ALLOW
            and rule.allow_third_party
            and _requester_matches(rule, request_client=client, mechanism=mechanism)
            for rule in self.rules
        )

    def recheck(self, mapping: Mapping, *, now: float) -> Deny | None:
        """The Deny this policy gives an existing mapping (after a reload), or None if allowed."""
        request = MapRequest.renewing(mapping, max(1, mapping.remaining(now)))
        decision = self.evaluate(request, EMPTY_VIEW, now=now, renewal=True)
        if isinstance(decision, Allow):
            return sources_changed(decision, mapping) or self.address_changed(request, mapping)
        return decision

    def addresses_for(self, request: MapRequest) -> tuple[str, tuple[IPv4Address | None, ...]]:
        """The deciding rule's name and the external addresses it lets the request use, the
        default first (None: the default address)."""
        if not self.addressed:
            return DEFAULTS_NAME, _DEFAULT_ONLY
        for rule in self.rules:
            if not _matches(rule, request):
                continue
            if rule.action is Action.ALLOW:
                return rule.name, rule.external_addresses or _DEFAULT_ONLY
            if rule.external_ports is None:
                return rule.name, _DEFAULT_ONLY  # refused anyway
        return DEFAULTS_NAME, _DEFAULT_ONLY

    def address_issues(self, configured: Iterable[IPv4Address]) -> list[PolicyIssue]:
        """The rules' and forwards' external addresses that are not among `configured`
        (network.external_addresses): a mapping there would never be reached."""
        known = set(configured)
        wanted = "one of network.external_addresses in the configuration"
        issues = []
        for index, rule in enumerate(self.rules):
            for address in rule.external_addresses or ():
                if address is not None and address not in known:
                    key = f"rules[{index}].external_addresses"
                    message = f"{address} is not {wanted}"
                    issues.append(PolicyIssue(self.source, rule.line, key, message))
        for index, forward in enumerate(self.forwards):
            address = forward.external_address
            if address is not None and address not in known:
                key = f"forwards[{index}].external_address"
                issues.append(
                    PolicyIssue(self.source, forward.line, key, f"{address} is not {wanted}")
                )
        return issues

    def address_changed(self, request: MapRequest, mapping: Mapping) -> Deny | None:
        """The Deny for an existing mapping on an external address its rule no longer lists."""
        rule, allowed = self.addresses_for(request)
        if mapping.external_address in allowed:
            return None
        detail = f"external address {mapping.external_address or 'default'} is no longer allowed"
        return Deny(Reason.POLICY_DENIED, rule, detail)

    def _decide(
        self,
        rule: Rule | None,
        request: MapRequest,
        view: TableView,
        fixed: bool,
        renewal: bool,
        carved: PortSet,
        carved_by: list[str],
        port_denied: Deny | None,
    ) -> Decision:
        """The allowing rule's grant, or the refusal of a fixed port a deny rule holds, telling
        whether the gateway's choice of port would have been granted."""
        if port_denied is None:
            return self._grant(rule, request, view, fixed, renewal, carved, carved_by)
        loose = self._grant(rule, request, view, False, renewal, carved, carved_by)
        return replace(port_denied, other_port_allowed=isinstance(loose, Allow))

    def _grant(
        self,
        rule: Rule | None,
        request: MapRequest,
        view: TableView,
        fixed: bool,
        renewal: bool,
        carved: PortSet,
        carved_by: list[str],
    ) -> Decision:
        """Apply an allowing rule (None: the default action) to the request."""
        name = DEFAULTS_NAME if rule is None else rule.name
        if fixed:
            # A fixed port was checked against the deny rules' ports; they narrow nothing.
            loose_carved, loose_by = carved, carved_by
            carved, carved_by = PortSet(), []
        defaults = self.defaults
        if request.third_party and defaults.secure_mode and not (rule and rule.allow_third_party):
            detail = (
                f"internal address {request.internal_address} is not the requester"
                f" {request.client} (secure mode; set allow_third_party on the rule)"
            )
            return Deny(Reason.THIRD_PARTY_DENIED, name, detail)

        allowed, narrowed_by, narrowed = self._allowed_ports(rule, carved, carved_by)
        if not allowed:
            detail = f"no external port is left to assign ({', '.join(narrowed_by)})"
            return Deny(Reason.POLICY_DENIED, name, detail)
        if fixed and request.external_port not in allowed:
            detail = f"external port {request.external_port} is outside the allowed ports {allowed}"
            loose = self._grant(rule, request, view, False, renewal, loose_carved, loose_by)
            return Deny(
                Reason.POLICY_DENIED, name, detail, other_port_allowed=isinstance(loose, Allow)
            )

        if not renewal:
            held = view.count_for_client(request.client)
            over = self._over_quota(rule, request.client, held, len(view), "mappings")
            if over is not None:
                return over

        filters: tuple[RemoteFilter, ...] | None = None
        if rule is not None and rule.remote_hosts is not None:
            restricted = _restrict(rule.remote_hosts, request)
            if isinstance(restricted, str):
                return Deny(Reason.POLICY_DENIED, name, restricted)
            filters = restricted

        lifetime, notes = self._lease(rule, request.lifetime, filters, request.filters)
        if narrowed:
            notes.append(narrowed)
        if not fixed and request.external_port and request.external_port not in allowed:
            notes.append(
                f"suggested external port {request.external_port} is not allowed;"
                " the gateway assigns another"
            )
        return Allow(name, lifetime, allowed, tuple(notes), filters)

    def _allowed_ports(self, rule: Rule | None, carved: PortSet, carved_by: list[str]) -> _Ports:
        """The external ports an allowing rule grants once `carved` is taken out, the rules
        that narrowed them and the note saying so ("" if none did), remembered: the same few
        combinations recur."""
        # id(): the rules live as long as this Policy, and hashing a Rule hashes every field.
        key = (id(rule), carved, tuple(carved_by))
        found = self._ports.get(key)
        if found is None:
            name = DEFAULTS_NAME if rule is None else rule.name
            granted = rule.external_ports if rule and rule.external_ports is not None else None
            # Port 0 is never a real mapping, whatever the rule says.
            allowed = (granted or PortSet.full()).intersect(PortSet.full()).subtract(carved)
            narrowed_by = [f"rule {name!r}"] if granted is not None else []
            narrowed_by += [f"deny rule {denier!r}" for denier in carved_by]
            if len(self._ports) >= MAX_REMEMBERED_REQUESTERS:
                self._ports.clear()
            narrowed = ""
            if allowed != PortSet.full():
                narrowed = f"external ports limited to {allowed} by {', '.join(narrowed_by)}"
            found = self._ports[key] = (allowed, tuple(narrowed_by), narrowed)
        return found

    def _over_quota(
        self, rule: Rule | None, client: object, held: int, total: int, what: str
    ) -> Deny | None:
        """The Deny of a new lease past the client's limit (the rule's, else the defaults')
        or the gateway's, with `held` and `total` leases of its kind (`what`); None if under."""
        limit, limit_by = self.defaults.max_mappings_per_client, DEFAULTS_NAME
        if rule and rule.max_mappings_per_client is not None:
            limit, limit_by = rule.max_mappings_per_client, rule.name
        if held >= limit:
            detail = f"client {client} holds {held} {what} (limit {limit})"
            return Deny(Reason.CLIENT_QUOTA, limit_by, detail)
        if total >= self.defaults.max_mappings:
            detail = f"the gateway holds {total} {what} (limit {self.defaults.max_mappings})"
            return Deny(Reason.GATEWAY_QUOTA, DEFAULTS_NAME, detail)
        return None

    def _lease(
        self,
        rule: Rule | None,
        requested: int,
        filters: tuple[RemoteFilter | PinholeFilter, ...] | None,
        asked: tuple[RemoteFilter | PinholeFilter, ...],
    ) -> tuple[int, list[str]]:
        """Clamp a requested lease to the rule's and the defaults' bounds; the notes say so,
        and name the remote sources when the rule's `filters` replace those `asked`."""
        cap, cap_by = self.defaults.max_lease, "defaults.max_lease"
        if rule and rule.max_lease is not None and rule.max_lease < cap:
            cap, cap_by = rule.max_lease, f"max_lease of rule {rule.name!r}"
        lifetime = min(max(min(requested, cap), self.defaults.min_lease), self.defaults.max_lease)
        notes = []
        if lifetime < requested:
            notes.append(f"lease shortened from {requested} s to {lifetime} s ({cap_by})")
        elif lifetime > requested:
            by = "defaults.min_lease"
            notes.append(f"lease lengthened from {requested} s to {lifetime} s ({by})")
        if filters is not None and filters != asked:
            sources = ", ".join(_filter_text(f) for f in filters)
            name = DEFAULTS_NAME if rule is None else rule.name
            notes.append(f"remote sources limited to {sources} by rule {name!r}")
        return lifetime, notes


def sources_changed(decision: Allow, mapping: Mapping) -> Deny | None:
    """The Deny for an existing mapping that admits more sources than its rule now allows."""
    if decision.filters is None or decision.filters == mapping.filters:
        return None
    detail = f"rule {decision.rule!r} now admits other remote sources than the mapping"
    return Deny(Reason.POLICY_DENIED, decision.rule, detail)


def _restrict(listed: tuple[Network, ...], request: MapRequest) -> tuple[RemoteFilter, ...] | str:
    """The FILTERs a mapping gets under a rule's remote_hosts, or why none is left."""
    allowed = tuple(n for n in listed if isinstance(n, IPv4Network))
    if not allowed:
        return f"the rule's remote_hosts ({', '.join(map(str, listed))}) hold no IPv4 source"
    sources = ", ".join(map(str, allowed))
    remote = request.remote_host
    if remote is not None:
        # The key already admits this one host (UPnP NewRemoteHost, PCP PEER).
        if not any(remote in network for network in allowed):
            return f"remote host {remote} is outside the rule's remote_hosts ({sources})"
        return request.filters
    return _intersect(request.filters, allowed, RemoteFilter, sources)


def _restrict_pinhole(
    listed: tuple[Network, ...], request: PinholeRequest
) -> tuple[PinholeFilter, ...] | str:
    """The FILTERs a pinhole gets under a rule's remote_hosts, or why none is left."""
    allowed = tuple(n for n in listed if isinstance(n, IPv6Network))
    if not allowed:
        return f"the rule's remote_hosts ({', '.join(map(str, listed))}) hold no IPv6 source"
    sources = ", ".join(map(str, allowed))
    remote = request.key.remote
    if remote is not None:
        # The key already admits this one source (UPnP RemoteHost).
        if not any(remote.network.subnet_of(network) for network in allowed):
            return f"remote host {remote.network} is outside the rule's remote_hosts ({sources})"
        return request.filters
    return _intersect(request.filters, allowed, PinholeFilter, sources)


_F = TypeVar("_F", RemoteFilter, PinholeFilter)


def _intersect(
    asked: tuple[_F, ...],
    allowed: tuple[IPv4Network, ...] | tuple[IPv6Network, ...],
    make: Callable[[Any, int], _F],
    sources: str,
) -> tuple[_F, ...] | str:
    """The FILTERs asked for cut down to the rule's networks (all of them if none was asked),
    or why nothing is left."""
    if not asked:
        return tuple(make(network, 0) for network in allowed)
    found: set[_F] = set()
    for wanted in asked:
        for network in allowed:
            # Two prefixes overlap only when one holds the other: the narrower is the overlap.
            if wanted.network.subnet_of(network):  # type: ignore[arg-type]  # same family
                found.add(wanted)
            elif network.subnet_of(wanted.network):  # type: ignore[arg-type]
                found.add(make(network, wanted.port))
    if not found:
        asked_text = ", ".join(_filter_text(f) for f in asked)
        return f"the FILTERs asked for ({asked_text}) admit no source in remote_hosts ({sources})"
    return tuple(sorted(found))


def _filter_text(remote: RemoteFilter | PinholeFilter) -> str:
    return str(remote.network) + (f" port {remote.port}" if remote.port else "")


def _instant(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(rule: Rule, request: MapRequest) -> bool:
    """Whether the rule applies to the request, external ports aside."""
    return _requester_matches(
        rule, request_client=request.client, mechanism=request.mechanism
    ) and _target_matches(rule, request)


def _target_matches(rule: Rule, request: MapRequest) -> bool:
    """Whether the rule applies to what the request asks for, requester and external ports
    aside."""
    return (
        (
            rule.internal_addresses is None
            or any(request.internal_address in net for net in rule.internal_addresses)
        )
        and (rule.protocols is None or request.protocol in rule.protocols)
        and (rule.internal_ports is None or request.internal_port in rule.internal_ports)
        and (rule.description is None or rule.description.search(request.description) is not None)
    )


def _pinhole_matches(rule: Rule, request: PinholeRequest) -> bool:
    """Whether the rule applies to the pinhole request (its IPv6 networks do)."""
    key = request.key
    return (
        _requester_matches(
            rule, request_client=request.owner.client, mechanism=request.owner.mechanism
        )
        and (
            rule.internal_addresses is None
            or any(key.internal_address in net for net in rule.internal_addresses)
        )
        and (rule.protocols is None or key.protocol in rule.protocols)
        and (rule.internal_ports is None or key.internal_port in rule.internal_ports)
        and (rule.description is None or rule.description.search(request.description) is not None)
    )


def _describe_pinhole(request: PinholeRequest) -> str:
    key, owner = request.key, request.owner
    target = f"[{key.internal_address}]:{key.internal_port}"
    return f"pinhole {key.protocol} {target} for {owner.client} via {owner.mechanism}"


def _requester_matches(
    rule: Rule, *, request_client: IPv4Address | IPv6Address, mechanism: Mechanism
) -> bool:
    """Whether the rule applies to this requester and mechanism, whatever it asks for."""
    return (rule.clients is None or any(request_client in net for net in rule.clients)) and (
        rule.via is None or mechanism in rule.via
    )


def _describe(request: MapRequest) -> str:
    target = f"{request.internal_address}:{request.internal_port}"
    return f"{request.protocol} {target} for {request.client} via {request.mechanism}"
