"""The IPv6 firewall's data plane: pinholes as elements of nftables sets in a table of our own.

Shape (docs/nftables.md, "IPv6 pinholes"):

    table ip6 igd6 {
      set lan              the LAN prefixes (RFC 6092 protects these)
      set pinholes         internal address . protocol . port           (hash: O(1) lookup)
      set pinholes_remote  remote prefix . remote ports . internal address . protocol . port
                           (FILTERs, RFC 6887 §13.3; an interval set: prefixes and port ranges)
      set counted, counted_remote
                           the same keys without timeouts, a packet counter per element
                           (GetPinholePackets, CheckPinholeWorking); a renewal keeps them
      chain forward (filter, priority filter - 5)
        inbound packets of flows the WAN opened: counted (two hash/interval lookups);
        established/related: accept; ICMPv6 errors and echo from the WAN: accept (RFC 4890)
        new flows from the external interface: pinhole → accept (firewall "own") or mark
        (firewall "external"); anything else to the LAN → drop (firewall "own": RFC 6092 REC-11)
      sets pxp_over, pxp_fair, http_over, http_fair, chain input (filter, priority filter - 10)
        the flood guard of the IPv4 table for IPv6 sources: PCP (UDP 5351) and new UPnP
        connections, per source over the rate drop, fair share accept, the rest a total cap
    }

Rules are fixed; a change touches only elements, in one transaction. Elements carry the
lease as their kernel timeout, so a pinhole closes on time even if the daemon is gone.
Deleting is "add then delete" in the same transaction: an element the kernel already timed
out does not fail the transaction. Renewing is delete and add (nft cannot change a timeout
in place), atomic within the transaction. Text building is pure; `NftPinholeBackend` runs it
through libnftables on one worker thread (as `NftablesBackend` does).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from typing import Any, Literal, TypeVar

from igd.model import Protocol
from igd.pinhole import Pinhole, PinholeFilter
from igd.server.backends import BackendError
from igd.server.backends.libnft import Nft
from igd.server.backends.nft_payload import (
    GUARD_SET_SIZE,
    GUARD_SETS,
    Guard,
    check_ifname,
    check_table_name,
    guard_rules,
)
from igd.server.backends.nftables import check_netns_name, enter_netns
from igd.server.backends.watch import (
    NFPROTO_IPV6,
    RulesetWatcher,
    Transactions,
    repair_losses,
)

__all__ = [
    "PINHOLE_MARK",
    "Firewall",
    "MemoryPinholeBackend",
    "NftPinholeBackend",
    "PinholeEntry",
    "apply_text",
    "table_text",
]

Firewall = Literal["own", "external"]

PINHOLE_MARK = 0x00100000
"""With `firewall = "external"`, pinholed new flows carry this packet mark bit; the admin's
forward chain accepts them with `meta mark & 0x00100000 != 0 accept`."""

PRIORITY = "filter - 5"
"""Before a filter-priority firewall of the admin's, so the mark is set when it looks."""

_T = TypeVar("_T")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, order=True)
class PinholeEntry:
    """One kernel element: what it admits, without lease bookkeeping."""

    internal_address: IPv6Address
    protocol: Protocol
    internal_port: int
    remote: PinholeFilter | None = None


def entries_of(hole: Pinhole) -> list[PinholeEntry]:
    """The kernel elements a pinhole needs: one, or one per admitted remote filter."""
    key = hole.key
    if not hole.admits:
        return [PinholeEntry(key.internal_address, key.protocol, key.internal_port)]
    return [
        PinholeEntry(key.internal_address, key.protocol, key.internal_port, remote)
        for remote in hole.admits
    ]


def _element(entry: PinholeEntry) -> tuple[str, str]:
    """(set name, element text without timeout)."""
    target = f"{entry.internal_address} . {entry.protocol} . {entry.internal_port}"
    if entry.remote is None:
        return "pinholes", target
    ports = f"{entry.remote.port}" if entry.remote.port else "0-65535"
    return "pinholes_remote", f"{entry.remote.network} . {ports} . {target}"


COUNTED = {"pinholes": "counted", "pinholes_remote": "counted_remote"}
"""The counter set beside each pinhole set: same keys, no timeout, `counter` per element."""
_COUNTS = re.compile(r"counter packets (\d+) bytes (\d+)")


def _timeout(hole: Pinhole, now: float) -> int:
    return max(1, math.ceil(hole.expires - now))


def table_text(
    table: str,
    external_interface: str,
    lan: Sequence[IPv6Network],
    firewall: Firewall,
    pinholes: Iterable[Pinhole],
    *,
    now: float,
    guard: Guard | None = None,
) -> str:
    """Commands that make the table exist holding exactly `pinholes`, in one transaction;
    with `guard`, the flood guard's input chain too (docs/nftables.md, "Flood guard")."""
    check_table_name(table)
    wan = check_ifname(external_interface)
    verdict = "accept" if firewall == "own" else f"meta mark set meta mark | {PINHOLE_MARK:#x}"
    inbound = f'iifname "{wan}" ct direction original meta l4proto {{ tcp, udp }}'
    rules = [
        # Every inbound packet of a flow the WAN opened, counted per pinhole (both lookups:
        # a packet two pinholes admit counts for each). WANIPv6FirewallControl:1 §2.4.6.
        f"{inbound} ip6 saddr . th sport . ip6 daddr . meta l4proto . th dport @counted_remote",
        f"{inbound} ip6 daddr . meta l4proto . th dport @counted",
        "ct state established,related accept",
        # RFC 4890 §4.3.1: ICMPv6 errors must pass; echo requests should (reachability).
        f'iifname "{wan}" icmpv6 type {{ destination-unreachable, packet-too-big,'
        " time-exceeded, parameter-problem, echo-request } accept",
        f'iifname "{wan}" ip6 daddr . meta l4proto . th dport @pinholes {verdict}',
        f'iifname "{wan}" ip6 saddr . th sport . ip6 daddr . meta l4proto . th dport'
        f" @pinholes_remote {verdict}",
    ]
    if firewall == "own" and lan:
        # RFC 6092 REC-11/REC-17: new inbound flows to the LAN are refused unless solicited.
        rules.append(f'iifname "{wan}" ip6 daddr @lan drop')
    elements: dict[str, list[str]] = {name: [] for name in (*COUNTED, *COUNTED.values())}
    for hole in pinholes:
        for entry in entries_of(hole):
            name, text = _element(entry)
            elements[name].append(f"{text} timeout {_timeout(hole, now)}s")
            elements[COUNTED[name]].append(text)
    lines = [
        # Create-then-delete makes the delete safe whether or not the table exists; the whole
        # buffer is one transaction, so traffic never sees a half-built table.
        f"add table ip6 {table}",
        f"delete table ip6 {table}",
        f"add table ip6 {table}",
        f"add set ip6 {table} lan {{ type ipv6_addr; flags interval; }}",
        f"add set ip6 {table} pinholes {{ type ipv6_addr . inet_proto . inet_service;"
        " flags timeout; }",
        f"add set ip6 {table} pinholes_remote {{ type ipv6_addr . inet_service . ipv6_addr"
        " . inet_proto . inet_service; flags interval,timeout; }",
        f"add set ip6 {table} counted {{ type ipv6_addr . inet_proto . inet_service; counter; }}",
        f"add set ip6 {table} counted_remote {{ type ipv6_addr . inet_service . ipv6_addr"
        " . inet_proto . inet_service; flags interval; counter; }",
        f"add chain ip6 {table} forward {{ type filter hook forward priority {PRIORITY};"
        " policy accept; }",
        *(f"add rule ip6 {table} forward {rule}" for rule in rules),
    ]
    if guard is not None:
        # The same numbers as the IPv4 table's guard ([limits]); sources are IPv6 here.
        lines += [
            f"add set ip6 {table} {name} {{ type ipv6_addr; size {GUARD_SET_SIZE};"
            " flags dynamic,timeout; timeout 1m; }"
            for name in GUARD_SETS
        ]
        lines.append(
            f"add chain ip6 {table} input {{ type filter hook input priority filter - 10;"
            " policy accept; }"
        )
        lines += [f"add rule ip6 {table} input {r}" for r in guard_rules(guard, family="ip6")]
    if lan:
        lines.append(f"add element ip6 {table} lan {{ {', '.join(map(str, lan))} }}")
    for name, items in elements.items():
        if items:
            lines.append(f"add element ip6 {table} {name} {{ {', '.join(items)} }}")
    return "\n".join(lines) + "\n"


def apply_text(
    table: str, removed: Iterable[Pinhole], added: Iterable[Pinhole], *, now: float
) -> str:
    """Commands for one change, one transaction: remove `removed`, then write `added`."""
    check_table_name(table)
    lines: list[str] = []
    added = list(added)
    written = {entry for hole in added for entry in entries_of(hole)}
    for hole in removed:
        for entry in entries_of(hole):
            if entry in written:
                continue  # rewritten below with its new timeout
            name, text = _element(entry)
            lines.append(f"add element ip6 {table} {name} {{ {text} timeout 1s }}")
            lines.append(f"delete element ip6 {table} {name} {{ {text} }}")
            lines.append(f"add element ip6 {table} {COUNTED[name]} {{ {text} }}")
            lines.append(f"delete element ip6 {table} {COUNTED[name]} {{ {text} }}")
    for hole in added:
        for entry in entries_of(hole):
            name, text = _element(entry)
            lines.append(f"add element ip6 {table} {name} {{ {text} timeout 1s }}")
            lines.append(f"delete element ip6 {table} {name} {{ {text} }}")
            lines.append(
                f"add element ip6 {table} {name} {{ {text} timeout {_timeout(hole, now)}s }}"
            )
            # A no-op when it exists: a renewal keeps the pinhole's counts.
            lines.append(f"add element ip6 {table} {COUNTED[name]} {{ {text} }}")
    return "\n".join(lines) + "\n" if lines else ""


def packets_commands(table: str, hole: Pinhole) -> list[str]:
    """One `get element` of the counter sets per kernel element of `hole`."""
    check_table_name(table)
    commands = []
    for entry in entries_of(hole):
        name, text = _element(entry)
        commands.append(f"get element ip6 {table} {COUNTED[name]} {{ {text} }}")
    return commands


def parse_packets(text: str) -> int:
    """The packet count in `get element` output (nft 1.0.6 prints it as text even with -j)."""
    match = _COUNTS.search(text)
    return int(match.group(1)) if match else 0


def parse_entries(document: dict[str, Any]) -> set[PinholeEntry]:
    """The elements of the two pinhole sets in `nft -j list table` output."""
    found: set[PinholeEntry] = set()
    for item in document.get("nftables", []):
        if not isinstance(item, dict) or "set" not in item:
            continue
        spec = item["set"]
        for element in spec.get("elem", []):
            value = (
                element.get("elem", {}).get("val", element)
                if isinstance(element, dict)
                else element
            )
            parts = value.get("concat") if isinstance(value, dict) else None
            if not isinstance(parts, list):
                continue
            if spec.get("name") == "pinholes" and len(parts) == 3:
                found.add(PinholeEntry(IPv6Address(parts[0]), Protocol(parts[1]), int(parts[2])))
            elif spec.get("name") == "pinholes_remote" and len(parts) == 5:
                found.add(_remote_entry(parts))
    return found


def _remote_entry(parts: list[Any]) -> PinholeEntry:
    net, ports, address, protocol, port = parts
    if isinstance(net, dict):
        prefix = net["prefix"]
        network = IPv6Network((prefix["addr"], int(prefix["len"])))
    else:
        network = IPv6Network(net)
    remote_port = 0 if isinstance(ports, dict) else int(ports)
    return PinholeEntry(
        IPv6Address(address), Protocol(protocol), int(port), PinholeFilter(network, remote_port)
    )


class NftPinholeBackend:
    """Pinholes in an nftables `ip6` table of the daemon's, through libnftables."""

    def __init__(
        self,
        table: str,
        external_interface: str,
        lan: Sequence[IPv6Network],
        firewall: Firewall = "own",
        *,
        netns: str | None = None,
        guard: Guard | None = None,
    ) -> None:
        self.table = check_table_name(table)
        self.external_interface = check_ifname(external_interface)
        self.lan = tuple(lan)
        self.firewall: Firewall = firewall
        self.guard = guard
        self.netns = None if netns is None else check_netns_name(netns)
        # libnftables blocks and a context stays on one thread: one worker owns both.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nft-{table}")
        self._nft: Nft | None = None
        self._lock = asyncio.Lock()
        self._own_threads: set[int] = set()
        self.restores = 0
        """Times another program's transaction removed (part of) the table (`watch`)."""

    def set_lan(self, lan: Sequence[IPv6Network]) -> None:
        """The LAN prefixes the next `replace` protects (they changed)."""
        self.lan = tuple(lan)

    async def replace(self, pinholes: Iterable[Pinhole], *, now: float) -> None:
        """Make the table exist and hold exactly `pinholes` (start-up reconcile)."""
        text = table_text(
            self.table, self.external_interface, self.lan, self.firewall, pinholes, now=now,
            guard=self.guard,
        )  # fmt: skip
        await self._call(lambda: self._context().run(text))

    async def apply(
        self, removed: Iterable[Pinhole], added: Iterable[Pinhole], *, now: float
    ) -> None:
        """Apply one change in one transaction; BackendError leaves the kernel as it was."""
        text = apply_text(self.table, removed, added, now=now)
        if text:
            await self._call(lambda: self._context().run(text))

    async def packets(self, hole: Pinhole) -> int:
        """Inbound packets the kernel counted for `hole` (0 for elements it lacks)."""
        commands = packets_commands(self.table, hole)

        def read() -> int:
            total = 0
            for command in commands:
                try:
                    total += parse_packets(self._context().run(command))
                except BackendError:
                    continue  # the element is gone (kernel timeout): nothing counted
            return total

        return await self._call(read)

    async def entries(self) -> set[PinholeEntry]:
        """What the kernel holds (for tests and listings)."""
        command = f"list table ip6 {self.table}"
        return parse_entries(await self._call(lambda: self._context().run_json(command)))

    async def watch(self, restore: Callable[[str], Awaitable[None]]) -> None:
        """Until cancelled: after another program's transaction removed (part of) the table
        (`nft flush ruleset`, a firewall reload, an element deleted by hand), await
        restore(what happened); our own transactions are ignored. The IPv4 table's watcher
        (docs/nftables.md, "Firewall reloads"): one socket, no cost per pinhole."""
        watcher = await self._call(self._open_watcher)
        if watcher is None:
            return
        transactions = Transactions(self.table, self._own_threads, family=NFPROTO_IPV6)
        await repair_losses(
            watcher, transactions, restore, lambda: self._call(self._intact), self._counted
        )

    def _counted(self) -> None:
        self.restores += 1

    async def close(self, *, flush: bool) -> None:
        """Keep the table (pinholes stay open until their timeouts) or delete it."""
        try:
            if flush:
                command = f"add table ip6 {self.table}\ndelete table ip6 {self.table}\n"
                await self._call(lambda: self._context().run(command))
        finally:
            await self._call(self._free)
            self._executor.shutdown(wait=False)

    async def _call(self, job: Callable[[], _T]) -> _T:
        async with self._lock:
            return await asyncio.wrap_future(self._executor.submit(job))

    # Below runs on the worker thread.

    def _context(self) -> Nft:
        if self._nft is None:
            self._enter()
            self._nft = Nft()
        return self._nft

    def _enter(self) -> None:
        if not self._own_threads and self.netns is not None:
            enter_netns(self.netns)
        # NEWGEN names the committing thread: this worker's commits are ours.
        self._own_threads.add(threading.get_native_id())

    def _open_watcher(self) -> RulesetWatcher | None:
        self._enter()
        try:
            return RulesetWatcher()
        except OSError as exc:
            log.warning(
                "cannot watch the nftables ruleset (%s): a firewall reload that removes"
                " table ip6 %s goes unnoticed until the next start",
                exc.strerror or exc,
                self.table,
            )
            return None

    def _intact(self) -> bool:
        try:
            self._context().run(f"list table ip6 {self.table}")
        except BackendError:
            return False
        return True

    def _free(self) -> None:
        if self._nft is not None:
            self._nft.close()
            self._nft = None


class MemoryPinholeBackend:
    """The same interface over a Python set: tests and `--dry-run`; can be told to fail."""

    def __init__(self) -> None:
        self.held: dict[PinholeEntry, float] = {}
        """Entry → kernel deadline (monotonic)."""
        self.fail_next = 0
        """Refuse this many coming calls (tests of failed commits)."""
        self.lan: tuple[IPv6Network, ...] = ()
        self.counts: dict[PinholeEntry, int] = {}
        """Packets per entry, as a test sets them (the kernel counts them for real)."""

    def set_lan(self, lan: Sequence[IPv6Network]) -> None:
        self.lan = tuple(lan)

    async def replace(self, pinholes: Iterable[Pinhole], *, now: float) -> None:
        self._maybe_fail()
        self.held = {e: h.expires for h in pinholes for e in entries_of(h)}

    async def apply(
        self, removed: Iterable[Pinhole], added: Iterable[Pinhole], *, now: float
    ) -> None:
        self._maybe_fail()
        for hole in removed:
            for entry in entries_of(hole):
                self.held.pop(entry, None)
        for hole in added:
            for entry in entries_of(hole):
                self.held[entry] = hole.expires

    async def entries(self) -> set[PinholeEntry]:
        return set(self.held)

    async def packets(self, hole: Pinhole) -> int:
        return sum(self.counts.get(entry, 0) for entry in entries_of(hole))

    async def watch(self, restore: Callable[[str], Awaitable[None]]) -> None:
        """Nothing outside the process changes a Python set: returns at once."""

    async def close(self, *, flush: bool) -> None:
        if flush:
            self.held.clear()

    def _maybe_fail(self) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise BackendError("memory pinhole backend told to fail")
