"""The nft text igd sends: the table's shape, and each mapping as elements of its sets.

Pure: no kernel, no I/O. docs/nftables.md shows the resulting table and explains each part.
Every set is a hash (no `interval` flag): adding or deleting an element costs the same however
many the table holds. Interval sets (nft's "pipapo" type for concatenations) were measured and
refused: with 20,000 elements one delete took ~60 ms and one add ~2 ms, so FILTERs match
prefixes by hashing the packet's source masked at each prefix length instead (`admit` chain).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from igd.model import Mapping, Protocol, RemoteFilter
from igd.server.backends import KernelEntry, ReconcileReport

WILDCARD_MAP = "portmap"
REMOTE_MAP = "portmap_remote"
FILTERED = "filtered"
ALLOWED = "allowed"
FILTERED_REMOTE = "filtered_remote"
ALLOWED_REMOTE = "allowed_remote"
FILTERS_REMOTE = "filters_remote"
PEERS = "peers"
COUNTED = "counted"
COUNTED_REMOTE = "counted_remote"
# Mappings on one of network.external_addresses: the same shapes, the destination address
# in front of (protocol, port). nft 1.0.6 lists a type of more than five fields wrongly, so
# the FILTERs of these mappings have one set per protocol (the protocol is the set).
ADDR_MAP = "portmap_addr"
ADDR_REMOTE_MAP = "portmap_addr_remote"
FILTERED_ADDR = "filtered_addr"
ALLOWED_ADDR = {Protocol.TCP: "allowed_addr_tcp", Protocol.UDP: "allowed_addr_udp"}
COUNTED_ADDR = "counted_addr"
COUNTED_ADDR_REMOTE = "counted_addr_remote"
CONTAINERS = (
    WILDCARD_MAP, REMOTE_MAP, FILTERED, ALLOWED, FILTERED_REMOTE, ALLOWED_REMOTE,
    FILTERS_REMOTE, PEERS, COUNTED, COUNTED_REMOTE, ADDR_MAP, ADDR_REMOTE_MAP, FILTERED_ADDR,
    *ALLOWED_ADDR.values(), COUNTED_ADDR, COUNTED_ADDR_REMOTE,
)  # fmt: skip
"""Every set and map of the table, in the order commands list them."""
COUNTERS = (COUNTED, COUNTED_REMOTE, COUNTED_ADDR, COUNTED_ADDR_REMOTE)
"""Sets with a packet and byte counter per mapping key. Their elements carry no timeout and
a renewal leaves them alone (they are keyed by the mapping key only, like the mapping table),
so a mapping's counts survive its renewals; they go when the mapping goes."""

DESTINATIONS = "destinations"
"""The addresses DNAT applies to: the external interface's own, plus configured extras."""
ADDRESSED = "addressed"
"""network.external_addresses: each has mappings of its own (the `*_addr` maps)."""
GUARD_SETS = ("pxp_over", "pxp_fair", "http_over", "http_fair")
"""Per-source limiter state (dynamic sets, one element per recent source)."""
GUARD_SET_SIZE = 65536
"""Sources tracked per limiter set; when full (a spoofing flood), packets of untracked
sources skip the per-source rules and meet the total cap."""

PREROUTING = "prerouting"
INPUT = "input"
POSTROUTING = "postrouting"
ADMIT = "admit"
ADMIT_REMOTE = "admit_remote"
ADMIT_ADDR = {Protocol.TCP: "admit_addr_tcp", Protocol.UDP: "admit_addr_udp"}
FORWARD = "forward"

KERNEL_GRACE = 60
"""Seconds a kernel element outlives its lease: the daemon deletes on expiry itself; the kernel
timeout is only the safety net for a daemon that died."""

MAX_FILTERS = 1024
"""FILTERs one entry may carry: bounds the elements of one change (the daemon's own limit,
`pcp.max_filters`, is at most 64)."""

MAX_ELEMENT_TIMEOUT = 2_147_483
"""Longest element timeout we send: 2**31 ms, about 24.8 days. nft 1.0.6 refuses 10**8 s, and
older kernels handled element timeouts as 32-bit milliseconds; we stay below both. A longer
lease gets no kernel timeout rather than a shorter one: expiring before the daemon's lease
would break a live mapping."""

_TYPES = {
    WILDCARD_MAP: "inet_proto . inet_service : ipv4_addr . inet_service",
    REMOTE_MAP: "ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service",
    FILTERED: "inet_proto . inet_service",
    ALLOWED: "ipv4_addr . ipv4_addr . inet_service . inet_proto . inet_service",
    FILTERED_REMOTE: "ipv4_addr . inet_proto . inet_service",
    ALLOWED_REMOTE: "ipv4_addr . inet_service . inet_proto . inet_service",
    # nft 1.0.6 lists a `type` of more than five fields wrongly, so the FILTERs of a
    # remote-host entry are numbered (last key field) rather than spelled out in the key.
    FILTERS_REMOTE: "ipv4_addr . inet_proto . inet_service . inet_service"
    " : ipv4_addr . ipv4_addr . inet_service",
    PEERS: "ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service : inet_service",
    COUNTED: "inet_proto . inet_service",
    COUNTED_REMOTE: "ipv4_addr . inet_proto . inet_service",
    ADDR_MAP: "ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service",
    ADDR_REMOTE_MAP: "ipv4_addr . ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service",
    FILTERED_ADDR: "ipv4_addr . inet_proto . inet_service",
    **dict.fromkeys(
        ALLOWED_ADDR.values(), "ipv4_addr . ipv4_addr . inet_service . ipv4_addr . inet_service"
    ),
    COUNTED_ADDR: "ipv4_addr . inet_proto . inet_service",
    COUNTED_ADDR_REMOTE: "ipv4_addr . ipv4_addr . inet_proto . inet_service",
}
"""Key (and data) type of every set and map; each a hash with per-element timeouts."""


@dataclass(frozen=True, slots=True)
class Element:
    """One element of one of our sets or maps, in nft syntax (data is None in sets)."""

    container: str
    key: str
    data: str | None = None


# -- validation -----------------------------------------------------------------------------

# Linux ifnames (dev_valid_name) are at most 15 bytes without '/', ':' or whitespace. We accept
# a stricter alphabet so the name, quoted in nft syntax, can never close its quotes or carry a
# wildcard ('*') or a comment ('#').
_IFNAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")
# nft 1.0.6 does not accept quoted table names, so the name must be a bare identifier.
_TABLE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")


def check_ifname(name: str) -> str:
    """Return `name` if it is a safe Linux interface name; ValueError otherwise."""
    if not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid interface name {name!r}")
    return name


def check_table_name(name: str) -> str:
    """Return `name` if nft accepts it as a bare table identifier; ValueError otherwise."""
    if not _TABLE.fullmatch(name):
        raise ValueError(f"invalid nftables table name {name!r}")
    return name


def _check_port(port: object, low: int = 1) -> None:
    if type(port) is not int or not low <= port <= 65535:
        raise ValueError(f"invalid port {port!r}")


def check_entry(entry: KernelEntry) -> KernelEntry:
    """Return `entry` if every field has the type and range nft syntax needs; ValueError else."""
    if not isinstance(entry.protocol, Protocol):
        raise ValueError(f"invalid protocol {entry.protocol!r}")
    for port in (entry.external_port, entry.internal_port):
        _check_port(port)
    if not isinstance(entry.internal_address, IPv4Address):
        raise ValueError(f"invalid internal address {entry.internal_address!r}")
    if entry.remote_host is not None and not isinstance(entry.remote_host, IPv4Address):
        raise ValueError(f"invalid remote host {entry.remote_host!r}")
    _check_port(entry.peer_port, low=0)
    if entry.peer_port and entry.remote_host is None:
        raise ValueError("a PEER entry needs its remote host")
    if not isinstance(entry.filters, tuple) or len(entry.filters) > MAX_FILTERS:
        raise ValueError(f"invalid filters {entry.filters!r}")
    for remote in entry.filters:
        if not isinstance(remote, RemoteFilter) or not isinstance(remote.network, IPv4Network):
            raise ValueError(f"invalid filter {remote!r}")
        _check_port(remote.port, low=0)
    if len(set(entry.filters)) != len(entry.filters):
        # A set holds each filter once: a duplicate would not read back.
        raise ValueError(f"duplicate filters in {entry.filters!r}")
    address = entry.external_address
    if address is not None:
        if not isinstance(address, IPv4Address):
            raise ValueError(f"invalid external address {address!r}")
        if entry.peer_port:
            raise ValueError("a PEER entry uses the default external address")
        if entry.remote_host is not None and entry.filters:
            raise ValueError("a remote-host entry on another external address takes no FILTER")
    return entry


# -- entries as elements --------------------------------------------------------------------


def _span(network: IPv4Network) -> str:
    """A prefix as its first and last address: what the `admit` rules compute from a packet."""
    return f"{network.network_address} . {network.broadcast_address}"


def elements(entry: KernelEntry) -> list[Element]:
    """Every element one entry needs, whichever sets they live in."""
    check_entry(entry)
    service = f"{entry.protocol.value} . {entry.external_port}"
    target = f"{entry.internal_address} . {entry.internal_port}"
    remote = entry.remote_host
    if entry.external_address is not None:
        return _addressed(entry, f"{entry.external_address} . {service}", target)
    if remote is None:
        found = [Element(WILDCARD_MAP, service, target), Element(COUNTED, service)]
        if entry.filters:
            # RFC 6887 §13.3: only these peers may use the mapping; port 0 = any port.
            found.append(Element(FILTERED, service))
            found += [
                Element(ALLOWED, f"{_span(f.network)} . {f.port} . {service}")
                for f in entry.filters
            ]
        return found
    key = f"{remote} . {service}"
    found = [Element(REMOTE_MAP, key, target), Element(COUNTED_REMOTE, key)]
    if entry.filters:
        # Only `remote` can reach this entry: the filters reduce to the source ports they
        # allow it (none if no filter covers it). The filters themselves are kept whole in
        # FILTERS_REMOTE, which no rule reads, so that they list back exactly.
        found.append(Element(FILTERED_REMOTE, key))
        ports = sorted({f.port for f in entry.filters if remote in f.network})
        found += [Element(ALLOWED_REMOTE, f"{remote} . {p} . {service}") for p in ports]
        found += [
            Element(FILTERS_REMOTE, f"{key} . {i}", f"{_span(f.network)} . {f.port}")
            for i, f in enumerate(entry.filters)
        ]
    if entry.peer_port:
        # RFC 6887 §12: the internal endpoint's flows to the peer leave with external_port.
        flow = (
            f"{entry.internal_address} . {entry.protocol.value} . {entry.internal_port}"
            f" . {remote} . {entry.peer_port}"
        )
        found.append(Element(PEERS, flow, str(entry.external_port)))
    return found


def _addressed(entry: KernelEntry, key: str, target: str) -> list[Element]:
    """The elements of an entry on one of network.external_addresses (key: address, protocol,
    port): what the destination address selects in the `*_addr` rules."""
    if entry.remote_host is not None:
        key = f"{entry.remote_host} . {key}"
        return [Element(ADDR_REMOTE_MAP, key, target), Element(COUNTED_ADDR_REMOTE, key)]
    found = [Element(ADDR_MAP, key, target), Element(COUNTED_ADDR, key)]
    if entry.filters:
        # RFC 6887 §13.3, as for the default address, in the protocol's own set.
        found.append(Element(FILTERED_ADDR, key))
        allowed = ALLOWED_ADDR[entry.protocol]
        target_port = f"{entry.external_address} . {entry.external_port}"
        found += [
            Element(allowed, f"{_span(f.network)} . {f.port} . {target_port}")
            for f in entry.filters
        ]
    return found


def element_timeout(mapping: Mapping, now: float) -> int | None:
    """Kernel timeout for a mapping: remaining lease plus grace, rounded up; None = none."""
    remaining = mapping.expires - now
    if math.isnan(remaining) or remaining == math.inf:
        return None
    seconds = math.ceil(max(0.0, remaining)) + KERNEL_GRACE
    return None if seconds > MAX_ELEMENT_TIMEOUT else seconds


def _commands(verb: str, table: str, items: Iterable[tuple[Element, int | None]]) -> list[str]:
    """One command per set, in CONTAINERS order: nft parses one long element list about three
    times faster than as many single-element commands."""
    groups: dict[str, list[str]] = {name: [] for name in CONTAINERS}
    for element, timeout in items:
        text = element.key
        if verb == "add" and element.container not in COUNTERS:
            text += "" if timeout is None else f" timeout {timeout}s"
            text += "" if element.data is None else f" : {element.data}"
        groups[element.container].append(text)
    return [
        f"{verb} element ip {table} {name} {{ {', '.join(texts)} }}"
        for name, texts in groups.items()
        if texts
    ]


_CounterKey = tuple[Protocol, int, IPv4Address | None, IPv4Address | None]


def _counter_key(element: Element) -> _CounterKey:
    """The mapping key a counter element stands for."""
    fields = element.key.split(" . ")
    remote_first = element.container in (COUNTED_REMOTE, COUNTED_ADDR_REMOTE)
    remote = IPv4Address(fields.pop(0)) if remote_first else None
    addressed = element.container in (COUNTED_ADDR, COUNTED_ADDR_REMOTE)
    address = IPv4Address(fields.pop(0)) if addressed else None
    return Protocol(fields[0]), int(fields[1]), remote, address


def _expand(
    entries: Iterable[tuple[KernelEntry, int | None]],
) -> list[tuple[Element, int | None]]:
    return [(element, timeout) for entry, timeout in entries for element in elements(entry)]


def replace_elements(
    table: str, removed: Iterable[KernelEntry], added: Iterable[tuple[KernelEntry, int | None]]
) -> str:
    """One transaction: delete `removed`, then add `added` (entry, timeout); "" if empty.

    Keys are unique within `removed` and within `added` (the mapping table's key space)."""
    check_table_name(table)
    added = list(added)
    # A renewal (same key removed and added) keeps its counter element, and with it the
    # counts: adding an element that exists is a no-op.
    kept = {(e.protocol, e.external_port, e.remote_host, e.external_address) for e, _ in added}
    gone = [
        (element, timeout)
        for element, timeout in _expand((e, None) for e in removed)
        if element.container not in COUNTERS or _counter_key(element) not in kept
    ]
    lines = [
        # Add first: a no-op when the element is there, and it makes the delete succeed when
        # the kernel already timed the element out (or never had it). Without it, a renewal
        # of an expired element would abort the whole transaction with ENOENT.
        *_commands("add", table, gone),
        *_commands("delete", table, gone),
        *_commands("add", table, _expand(added)),
    ]
    return "".join(line + "\n" for line in lines)


def apply_commands(
    table: str, removed: Sequence[Mapping], added: Sequence[Mapping], *, now: float
) -> str:
    """The transaction for `Backend.apply`."""
    return replace_elements(
        table,
        (KernelEntry.of(m) for m in removed),
        ((KernelEntry.of(m), element_timeout(m, now)) for m in added),
    )


def entry_order(
    entry: KernelEntry,
) -> tuple[int, str, int, int, int, int, int, tuple[RemoteFilter, ...]]:
    """Sort key for entries (KernelEntry's own order fails comparing None with an address)."""
    remote = -1 if entry.remote_host is None else int(entry.remote_host)
    address = -1 if entry.external_address is None else int(entry.external_address)
    return (
        address,
        entry.protocol.value,
        entry.external_port,
        remote,
        int(entry.internal_address),
        entry.internal_port,
        entry.peer_port,
        entry.filters,
    )


def reconcile_plan(
    table: str, kernel: set[KernelEntry], wanted: Sequence[Mapping], *, now: float, held: int
) -> tuple[str, ReconcileReport]:
    """Transaction making the kernel hold exactly `wanted`, and what it removes and adds.

    `kernel` is what the table's elements amount to, `held` how many elements it has."""
    check_table_name(table)
    want = {KernelEntry.of(m): m for m in wanted}
    report = ReconcileReport(
        removed=tuple(sorted(kernel - want.keys(), key=entry_order)),
        added=tuple(sorted(want.keys() - kernel, key=entry_order)),
    )
    if not held and not want:
        return "", report
    # Flush and refill in one transaction: packets see the old table or the new one, never a
    # gap. Refilling refreshes every timeout (kernels before 6.12 cannot update one in place;
    # leases may have changed while the daemon was down), and flushing also clears elements
    # that belong to no entry (a hand edit, a half-deleted mapping).
    lines = [f"flush {kind} ip {table} {name}" for name, kind in _kinds()]
    ordered = sorted(want, key=entry_order)
    lines += _commands("add", table, _expand((e, element_timeout(want[e], now)) for e in ordered))
    return "".join(line + "\n" for line in lines), report


def _kinds() -> list[tuple[str, str]]:
    return [(name, "map" if ":" in _TYPES[name] else "set") for name in CONTAINERS]


def _declaration(name: str) -> str:
    if name in COUNTERS:
        # No timeouts: the daemon adds and deletes these with the mapping (see COUNTERS).
        return f"type {_TYPES[name]}; counter;"
    return f"type {_TYPES[name]}; flags timeout;"


# -- the table ------------------------------------------------------------------------------


FAIR_RATE = 5
"""Requests per second (burst twice that) from one source that always pass the total cap: a
well-behaved client sends a few per mapping (RFC 6886 §3.1 retransmits at 250 ms, doubling)."""

TOTAL_FACTOR = 1
"""The total cap is this many times the per-client rate: beyond every source's fair share,
all sources together get at most that much of the daemon's time. With the defaults (500/s)
that is 500/s, plus 5/s for each source within its fair share: 1,000/s with 100 flooding
sources, a fraction of what the daemon serves even on a busy machine (docs/performance.md)."""


@dataclass(frozen=True, slots=True)
class Guard:
    """Rate limits the kernel enforces on requests to the daemon's own ports, before they
    cost Python time (docs/nftables.md, "Flood guard")."""

    rate: int
    """Per source: requests (UDP datagrams, new TCP connections) per second beyond the burst
    are dropped. The daemon's own token bucket has the same numbers."""
    burst: int
    http_port: int | None = None
    """The UPnP HTTP port (TCP), when UPnP is on."""

    @classmethod
    def from_limits(cls, rate: float, burst: int, http_port: int | None) -> Guard:
        """The guard for the [limits] settings: the same numbers, rounded up."""
        return cls(max(1, math.ceil(rate)), max(1, burst), http_port)

    @property
    def fair(self) -> int:
        return min(FAIR_RATE, self.rate)

    @property
    def total(self) -> int:
        return TOTAL_FACTOR * self.rate


def guard_rules(guard: Guard, pxp_port: int = 5351, *, family: str = "ip") -> list[str]:
    """The `input` chain: per source over `rate` drop; within the fair share accept; the
    rest shares the total cap. Sources that send little are never starved by many that
    send a lot: only the excess over the fair share competes for the total. `family` "ip6"
    for the IPv6 table's chain (its sets hold IPv6 sources)."""
    g = guard
    saddr = "ip6 saddr" if family == "ip6" else "ip saddr"
    rules = []
    kinds = [("pxp", f"udp dport {pxp_port}")]
    if g.http_port is not None:
        kinds.append(("http", f"tcp dport {g.http_port} ct state new"))
    for name, match in kinds:
        rules += [
            f"{match} update @{name}_over {{ {saddr} limit rate over {g.rate}/second"
            f" burst {g.burst} packets }} counter drop",
            f"{match} update @{name}_fair {{ {saddr} limit rate {g.fair}/second"
            f" burst {2 * g.fair} packets }} accept",
            f"{match} limit rate over {g.total}/second burst {g.total} packets counter drop",
        ]
    return rules


def destination_commands(table: str, addresses: Iterable[IPv4Address]) -> str:
    """Replace the DNAT destination addresses (one transaction)."""
    t = check_table_name(table)
    found = sorted({IPv4Address(a) for a in addresses})
    lines = [f"flush set ip {t} {DESTINATIONS}"]
    if found:
        lines.append(f"add element ip {t} {DESTINATIONS} {{ {', '.join(map(str, found))} }}")
    return "".join(line + "\n" for line in lines)


Shape = tuple[int, bool]
"""How the `admit` chain tests a FILTER: (prefix length, whether it names a source port)."""


def admit_rules(shapes: Iterable[Shape] | None = None, tail: str | None = None) -> list[str]:
    """The `admit` chain: return if a filter of the packet's mapping covers its source, else
    drop. A filter is held as (first address, last address, port) of its prefix; masking the
    source at each prefix length in turn makes every test one hash lookup. Longest first.

    `shapes`: only the shapes some wildcard entry's filter has (None: all 33 lengths, with and
    without a port). Each shape costs one lookup per new flow to a filtered mapping
    (docs/performance.md)."""
    rules = []
    tail = tail or "meta l4proto . th dport @" + ALLOWED + " return"
    wanted = {(length, port) for length in range(33) for port in (True, False)}
    if shapes is not None:
        wanted = set(shapes)
    for length, port in sorted(wanted, reverse=True):
        if not (isinstance(length, int) and 0 <= length <= 32 and isinstance(port, bool)):
            raise ValueError(f"invalid filter shape {(length, port)!r}")
        net = IPv4Network((0, length))
        if length == 32:
            span = "ip saddr . ip saddr"
        else:
            span = f"ip saddr & {net.netmask} . ip saddr | {net.hostmask}"
        # `th sport & 0` is 0 for every packet: the lookup of filters for any port.
        rules.append(f"{span} . th sport . {tail}" if port else f"{span} . th sport & 0 . {tail}")
    return [*rules, "drop"]


def filter_shapes(entries: Iterable[KernelEntry]) -> set[Shape]:
    """Shapes of the filters the `admit` chains must test for these entries."""
    return {
        (f.network.prefixlen, f.port != 0)
        for e in entries
        if e.remote_host is None
        for f in e.filters
    }


def _admit_chains(shapes: Iterable[Shape] | None) -> dict[str, list[str]]:
    """The `admit` chain and, for mappings on other external addresses, one per protocol."""
    wanted = None if shapes is None else list(shapes)
    chains = {ADMIT: admit_rules(wanted)}
    for protocol, chain in ADMIT_ADDR.items():
        tail = f"ip daddr . th dport @{ALLOWED_ADDR[protocol]} return"
        chains[chain] = admit_rules(wanted, tail)
    return chains


def admit_commands(table: str, shapes: Iterable[Shape] | None) -> str:
    """Rewrite the `admit` chains for these filter shapes (part of a larger transaction)."""
    t = check_table_name(table)
    lines = []
    for chain, rules in _admit_chains(shapes).items():
        lines.append(f"flush chain ip {t} {chain}")
        lines += [f"add rule ip {t} {chain} {rule}" for rule in rules]
    return "".join(line + "\n" for line in lines)


def admit_remote_rules() -> list[str]:
    """The `admit_remote` chain: the same test for remote-host-specific entries."""
    tail = "meta l4proto . th dport @" + ALLOWED_REMOTE + " return"
    return [f"ip saddr . th sport . {tail}", f"ip saddr . th sport & 0 . {tail}", "drop"]


def open_commands(
    table: str,
    external_interface: str,
    destinations: Iterable[IPv4Address] | None = None,
    guard: Guard | None = None,
    *,
    hairpin: bool = True,
    counters: bool = True,
    admit_shapes: Iterable[Shape] | None = None,
    count_remote: bool | None = None,
    addresses: Iterable[IPv4Address] = (),
) -> str:
    """Create table, sets and chains idempotently; rewrite every rule, keep the elements.

    `destinations` (if given) replaces the DNAT destination addresses; `guard` adds the
    input chain's rate limits; `hairpin` lets LAN hosts use mappings through the external
    address (NAT loopback); `counters` counts every packet of every mapped flow;
    `admit_shapes` the FILTER shapes to test (None: all); `count_remote` whether the
    counters look for remote-host-specific entries (None: yes); `addresses` the further
    external addresses (network.external_addresses), each with mappings of its own."""
    t, ifname = check_table_name(table), check_ifname(external_interface)
    # Only packets addressed to the gateway itself: traffic routed through it (to a LAN
    # host's own address, to the gateway's LAN address) is never taken by a mapping. With
    # hairpin, such packets from any interface (a LAN host using the public address and
    # port, RFC 4787 §6 / RFC 5382 §5 "hairpinning"), else only from the external one.
    arriving = "" if hairpin else f'iifname "{ifname}" '
    inbound = f"{arriving}ip daddr @{DESTINATIONS} meta l4proto {{ tcp, udp }}"
    addressed = f"{arriving}ip daddr @{ADDRESSED} meta l4proto"
    lines = [f"add table ip {t}"]
    lines += [f"add {kind} ip {t} {name} {{ {_declaration(name)} }}" for name, kind in _kinds()]
    lines += [
        f"add chain ip {t} {PREROUTING} {{ type nat hook prerouting priority dstnat;"
        " policy accept; }",
        f"add chain ip {t} {ADMIT}",
        f"add chain ip {t} {ADMIT_REMOTE}",
        *(f"add chain ip {t} {chain}" for chain in ADMIT_ADDR.values()),
        # Before srcnat: the first NAT chain to bind a flow wins, and a PEER flow must get
        # its external port here, not whatever port the admin's masquerade would pick.
        f"add chain ip {t} {POSTROUTING} {{ type nat hook postrouting priority srcnat - 10;"
        " policy accept; }",
        # Before the admin's filter chains, so counts include what they later drop.
        f"add chain ip {t} {FORWARD} {{ type filter hook forward priority filter - 10;"
        " policy accept; }",
        f"add set ip {t} {DESTINATIONS} {{ type ipv4_addr; }}",
        f"add set ip {t} {ADDRESSED} {{ type ipv4_addr; }}",
        f"flush set ip {t} {ADDRESSED}",
        *(
            f"add set ip {t} {name} {{ type ipv4_addr; size {GUARD_SET_SIZE};"
            " flags dynamic,timeout; timeout 1m; }"
            for name in GUARD_SETS
        ),
        # Before the admin's filter chains: a flood is dropped before anything else looks.
        f"add chain ip {t} {INPUT} {{ type filter hook input priority filter - 10;"
        " policy accept; }",
    ]
    # Flushing a chain drops its rules, never set elements: mappings survive a restart, and
    # a changed external interface name replaces the old rules in the same commit.
    chains = (PREROUTING, ADMIT, ADMIT_REMOTE, *ADMIT_ADDR.values(), POSTROUTING, INPUT, FORWARD)
    lines += [f"flush chain ip {t} {chain}" for chain in chains]
    extra = sorted({IPv4Address(a) for a in addresses})
    if extra:
        lines.append(f"add element ip {t} {ADDRESSED} {{ {', '.join(map(str, extra))} }}")
    # A NAT chain sees only the first packet of each flow: exactly the packets a FILTER must
    # judge. Dropping here refuses the flow; replies of flows already admitted (or started
    # from inside) never come this way. A DNAT lookup that hits ends the chain, so a packet
    # that a remote-host-specific entry takes is never judged by the wildcard's filters.
    prerouting = [
        f"ip saddr . meta l4proto . th dport @{FILTERED_REMOTE} jump {ADMIT_REMOTE}",
        f"dnat ip to ip saddr . meta l4proto . th dport map @{REMOTE_MAP}",
        f"meta l4proto . th dport @{FILTERED} jump {ADMIT}",
        f"dnat ip to meta l4proto . th dport map @{WILDCARD_MAP}",
    ]
    lines += [f"add rule ip {t} {PREROUTING} {inbound} {rule}" for rule in prerouting]
    # The further external addresses: the destination address is part of every key, so one
    # port can lead to a different host on each address; still one lookup per map.
    # Written only when there are such addresses: otherwise new flows pay no lookup for them.
    at = "ip daddr . meta l4proto . th dport"
    if extra:
        lines.append(
            f"add rule ip {t} {PREROUTING} {addressed} {{ tcp, udp }}"
            f" dnat ip to ip saddr . {at} map @{ADDR_REMOTE_MAP}"
        )
        lines += [
            f"add rule ip {t} {PREROUTING} {addressed} {protocol.value}"
            f" {at} @{FILTERED_ADDR} jump {chain}"
            for protocol, chain in ADMIT_ADDR.items()
        ]
        lines.append(
            f"add rule ip {t} {PREROUTING} {addressed} {{ tcp, udp }}"
            f" dnat ip to {at} map @{ADDR_MAP}"
        )
    for chain, rules in _admit_chains(admit_shapes).items():
        lines += [f"add rule ip {t} {chain} {rule}" for rule in rules]
    lines += [f"add rule ip {t} {ADMIT_REMOTE} {rule}" for rule in admit_remote_rules()]
    # masquerade, not snat: the kernel takes the interface's current address for each new
    # flow, so an address change needs no rewrite. Only the port comes from the map.
    lines.append(
        f'add rule ip {t} {POSTROUTING} oifname "{ifname}" meta l4proto {{ tcp, udp }}'
        f" masquerade to : ip saddr . meta l4proto . th sport . ip daddr . th dport map @{PEERS}"
    )
    if hairpin:
        # A LAN client's flow DNATed back into the LAN leaves with the gateway's LAN address
        # as source: the service's replies then come back through the gateway to be un-NATed
        # (answered directly, the client would drop them: they come from the wrong address).
        # In postrouting the input interface is the one the packet was forwarded from.
        lines += [
            f'add rule ip {t} {POSTROUTING} iifname != "{ifname}" oifname != "{ifname}"'
            f" ct status dnat ct original ip daddr @{name} masquerade"
            for name in (DESTINATIONS, ADDRESSED)
            if extra or name == DESTINATIONS
        ]
    if counters:
        rules = count_rules(count_remote, bool(extra))
        lines += [f"add rule ip {t} {FORWARD} {rule}" for rule in rules]
    if guard is not None:
        lines += [f"add rule ip {t} {INPUT} {rule}" for rule in guard_rules(guard)]
    text = "".join(line + "\n" for line in lines)
    return text if destinations is None else text + destination_commands(t, destinations)


def count_rules(remote: bool | None, addressed: bool) -> list[str]:
    """The forward chain's rules: count every packet of a flow a mapping admitted, both
    directions (the original tuple's destination is the mapping's key). A hit in a
    remote-host set ends the chain so a flow is counted once; that lookup is left out
    while no remote-host-specific entry exists (`remote` False: most gateways, always).
    One hash lookup per forwarded packet of a mapped flow then. `addressed`: also for the
    further external addresses."""
    # (nft types `ct original proto-dst` only after a transport protocol match.)
    port = "meta l4proto . ct original proto-dst"
    rules = []
    for addresses, counted, counted_remote, key in (
        (DESTINATIONS, COUNTED, COUNTED_REMOTE, port),
        (ADDRESSED, COUNTED_ADDR, COUNTED_ADDR_REMOTE, f"ct original ip daddr . {port}"),
    ):
        if addresses == ADDRESSED and not addressed:
            break
        mapped = f"ct status dnat ct original ip daddr @{addresses} meta l4proto {{ tcp, udp }}"
        if remote is not False:
            rules.append(f"{mapped} ct original ip saddr . {key} @{counted_remote} accept")
        rules.append(f"{mapped} {key} @{counted}")
    return rules


def count_commands(table: str, remote: bool, addresses: Iterable[IPv4Address]) -> str:
    """Rewrite the forward chain's counting rules (part of a larger transaction)."""
    t = check_table_name(table)
    rules = count_rules(remote, bool(list(addresses)))
    lines = [f"flush chain ip {t} {FORWARD}", *(f"add rule ip {t} {FORWARD} {r}" for r in rules)]
    return "".join(line + "\n" for line in lines)


def close_commands(table: str) -> str:
    """Delete the table; the `add` first makes this succeed when it is already gone."""
    t = check_table_name(table)
    return f"add table ip {t}\ndelete table ip {t}\n"


def list_counters_commands(table: str) -> tuple[str, ...]:
    """Listings of the counter sets (nft 1.0.6 lists only one per call)."""
    t = check_table_name(table)
    return tuple(f"list set ip {t} {name}" for name in COUNTERS)


def list_command(table: str) -> str:
    """Listing of the table (one JSON document; nft 1.0.6 fails on two `list map` at once)."""
    return f"list table ip {check_table_name(table)}"
