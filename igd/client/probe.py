"""Probing PCP, NAT-PMP and UPnP at the same time, and what was found."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from typing import Any

from igd.client.discovery import SsdpReply, ssdp_search
from igd.client.errors import (
    NoGatewayError,
    NotAuthorized,
    PortMappingError,
    UnsupportedVersion,
    UpstreamNat,
)
from igd.client.natpmp import NatPmpClient
from igd.client.pcp import PcpClient
from igd.client.selection import DEFAULT_PREFERENCE, Choice, MechanismReport, Verdict, choose
from igd.client.upnp import UpnpIgdClient
from igd.model import Mechanism

log = logging.getLogger("igd.client")

MAX_DESCRIPTIONS = 3  # IGD descriptions fetched per probe, best-ranked first
# Once NAT-PMP or PCP answered, an IGD on the same LAN gets this long to answer SSDP too
# (unicast search answers come at once; multicast ones within MX, which we set to 1 s).
UPNP_GRACE = 0.3


@dataclass(slots=True)
class ProbeResult:
    """What the gateway speaks, its external address and the mechanism picked."""

    gateway: IPv4Address
    local_address: IPv4Address
    reports: tuple[MechanismReport, ...]
    choice: Choice
    seconds: float
    upnp: UpnpIgdClient | None = field(default=None, repr=False)
    ssdp: tuple[SsdpReply, ...] = ()
    trace: tuple[str, ...] = ()
    """What the probe did and heard, in order, each line with its time since the start."""

    def report(self, mechanism: Mechanism) -> MechanismReport | None:
        return next((r for r in self.reports if r.mechanism is mechanism), None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "gateway": str(self.gateway),
            "local_address": str(self.local_address),
            "chosen": self.choice.mechanism.value if self.choice.mechanism else None,
            "verdict": self.choice.verdict.value,
            "reason": self.choice.reason,
            "external_address": _str(self.choice.external_address),
            "seconds": round(self.seconds, 4),
            "mechanisms": {
                r.mechanism.value: {
                    "available": r.available,
                    "external_address": _str(r.external_address),
                    "address_kind": r.address_kind.value if r.address_kind else None,
                    "epoch": r.epoch,
                    "error": r.error,
                    "seconds": None if r.seconds is None else round(r.seconds, 4),
                    "detail": r.detail,
                }
                for r in self.reports
            },
            "upnp_devices": [
                {"location": s.location, "st": s.st, "server": s.server, "source": list(s.source)}
                for s in self.ssdp
            ],
            "trace": list(self.trace),
        }


class Trace:
    """The probe's debug trace: lines stamped with the time since the probe began, also
    logged at DEBUG (`igd -vv`)."""

    MAX_LINES = 200  # a LAN full of chatty devices cannot grow it without bound

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        if len(self.lines) < self.MAX_LINES:
            line = f"{time.monotonic() - self.started:7.3f} s  {text}"
            self.lines.append(line)
            log.debug("probe: %s", line)


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def _attempts_within(budget: float, first: float = 0.25) -> int:
    """How many NAT-PMP sends fit in `budget` seconds of the RFC 6886 schedule."""
    attempts, spent, wait = 0, 0.0, first
    while spent + wait <= budget or attempts == 0:
        attempts, spent, wait = attempts + 1, spent + wait, wait * 2
    return attempts


async def _timed(
    mechanism: Mechanism, work: Callable[[], Awaitable[MechanismReport]], trace: Trace
) -> MechanismReport:
    started = time.monotonic()
    trace(f"{mechanism.value}: start")
    try:
        report = await work()
    except UpstreamNat as exc:
        report = MechanismReport(mechanism, False, error=str(exc), upstream_nat=True)
    except NotAuthorized as exc:
        report = MechanismReport(mechanism, False, error=str(exc), refuses=True)
    except PortMappingError as exc:
        report = MechanismReport(mechanism, False, error=str(exc))
    if report.available:
        address = "" if report.external_address is None else f" external {report.external_address}"
        epoch = "" if report.epoch is None else f" epoch {report.epoch}"
        trace(f"{mechanism.value}: available{address}{epoch} {report.detail}".rstrip())
    else:
        trace(f"{mechanism.value}: not available: {report.error}")
    return replace(report, seconds=time.monotonic() - started)


async def probe_natpmp(client: NatPmpClient, budget: float) -> MechanismReport:
    """NAT-PMP external address request."""
    response = await client.external_address(attempts=_attempts_within(budget))
    return MechanismReport(Mechanism.NATPMP, True, response.address, response.epoch)


async def probe_pcp(client: PcpClient, budget: float) -> MechanismReport:
    """PCP ANNOUNCE, sent twice within the budget (not the 3 s RFC schedule: a probe)."""
    try:
        response = await client.announce(waits=(budget / 3, budget * 2 / 3))
    except UnsupportedVersion as exc:
        # RFC 6886 §1.1: not cached; every later request tries PCP again.
        detail = "NAT-PMP only for now (PCP is tried again on every request)"
        if exc.version != 0:
            detail = f"server offers PCP version {exc.version}; retry after {exc.retry_after:g} s"
        return MechanismReport(Mechanism.PCP, False, error=str(exc), detail=detail)
    return MechanismReport(Mechanism.PCP, True, None, response.epoch)


async def probe_upnp(
    gateway: IPv4Address,
    local: IPv4Address,
    budget: float,
    cutoff: asyncio.Event | None = None,
    only_gateway: bool = False,
    trace: Callable[[str], None] = lambda text: None,
) -> tuple[MechanismReport, UpnpIgdClient | None, list[SsdpReply]]:
    """SSDP search, then the best IGD's description and external address."""
    started = time.monotonic()
    replies = await ssdp_search(
        gateway, local=local, budget=budget, cutoff=cutoff, only_gateway=only_gateway,
        trace=trace,
    )  # fmt: skip
    if not replies:
        where = f" on {gateway}" if only_gateway else ""
        return (
            MechanismReport(Mechanism.UPNP, False, error=f"no IGD answered SSDP{where}"),
            None,
            [],
        )
    errors = []
    for reply in replies[:MAX_DESCRIPTIONS]:
        left = max(0.5, budget - (time.monotonic() - started))
        trace(f"upnp: reading {reply.location} ({reply.server})")
        try:
            client = await UpnpIgdClient.connect(
                reply.location, http_timeout=left, server=reply.server
            )
            address = await client.external_address()
        except PortMappingError as exc:
            errors.append(f"{reply.location}: {exc}")
            trace(f"upnp: {reply.location}: {exc}")
            continue
        detail = f"{client.service_type} at {reply.location} ({reply.server})"
        if reply.host != str(gateway):
            detail += f"; not on the default gateway {gateway}"
        return MechanismReport(Mechanism.UPNP, True, address, detail=detail), client, replies
    return MechanismReport(Mechanism.UPNP, False, error="; ".join(errors)), None, replies


async def probe(
    gateway: IPv4Address,
    *,
    natpmp: NatPmpClient,
    pcp: PcpClient,
    mechanisms: Sequence[Mechanism] = DEFAULT_PREFERENCE,
    budget: float = 2.0,
    only_gateway: bool = False,
) -> ProbeResult:
    """Probe every mechanism in `mechanisms` at once (and only those); rank them.
    `only_gateway`: UPnP devices other than `gateway` are ignored."""
    started = time.monotonic()
    trace = Trace()
    await pcp.open()
    local = pcp.local_address
    trace(
        f"probing {gateway} from {local} over {', '.join(m.value for m in mechanisms)}"
        f" ({budget:g} s){'; the named gateway only' if only_gateway else ''}"
    )
    upnp: UpnpIgdClient | None = None
    ssdp: list[SsdpReply] = []

    cutoff = asyncio.Event()

    async def run_upnp() -> MechanismReport:
        nonlocal upnp, ssdp
        report, upnp, ssdp = await probe_upnp(gateway, local, budget, cutoff, only_gateway, trace)
        return report

    async def answered(report: Awaitable[MechanismReport]) -> MechanismReport:
        done = await report
        if done.available:
            asyncio.get_running_loop().call_later(UPNP_GRACE, cutoff.set)
        return done

    work: dict[Mechanism, Callable[[], Awaitable[MechanismReport]]] = {
        Mechanism.PCP: lambda: answered(probe_pcp(pcp, budget)),
        Mechanism.NATPMP: lambda: answered(probe_natpmp(natpmp, budget)),
        Mechanism.UPNP: run_upnp,
    }
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(_timed(m, work[m], trace)) for m in mechanisms]
    reports = [task.result() for task in tasks]
    reports = _share_address(reports)
    choice = choose(reports, mechanisms)
    trace(f"chosen: {choice.mechanism.value if choice.mechanism else 'none'}: {choice.reason}")
    return ProbeResult(
        gateway,
        local,
        tuple(reports),
        choice,
        time.monotonic() - started,
        upnp,
        tuple(ssdp),
        tuple(trace.lines),
    )


async def probe_routes(
    routes: Sequence[IPv4Address], mechanisms: Sequence[Mechanism], budget: float
) -> ProbeResult | None:
    """Probe the gateway of every default route at once, each for its own devices only, and
    return the best: one that answers, with a public address if any, else the first route's
    (RFC 7488 §4: every server configured is contacted). None if none answers."""

    async def one(address: IPv4Address) -> ProbeResult | None:
        try:
            async with NatPmpClient(address) as natpmp, PcpClient(address) as pcp:
                return await probe(
                    address, natpmp=natpmp, pcp=pcp, mechanisms=mechanisms, budget=budget,
                    only_gateway=True,
                )  # fmt: skip
        except PortMappingError as exc:  # no route to it after all, no socket
            log.info("cannot probe the default route's gateway %s: %s", address, exc)
            return None

    found = await asyncio.gather(*(one(address) for address in routes))
    results = [r for r in found if r is not None]
    usable = [(i, r) for i, r in enumerate(results) if r.choice.mechanism is not None]
    if not usable:
        return None  # the caller falls back to the first route's gateway, any device
    _, best = min(usable, key=lambda ir: (ir[1].choice.verdict is not Verdict.PUBLIC, ir[0]))
    others = [
        f"default route via {r.gateway}: "
        f"{r.choice.mechanism.value if r.choice.mechanism else 'nothing'} answers"
        for r in results
    ]
    return replace(best, trace=(*others, f"using {best.gateway}", *best.trace))


def _share_address(reports: list[MechanismReport]) -> list[MechanismReport]:
    """PCP's ANNOUNCE carries no address; NAT-PMP on the same server (port 5351) does."""
    pmp = next((r for r in reports if r.mechanism is Mechanism.NATPMP and r.available), None)
    if pmp is None or pmp.external_address is None:
        return reports
    return [
        replace(r, external_address=pmp.external_address, detail="address as told by NAT-PMP")
        if r.mechanism is Mechanism.PCP and r.available and r.external_address is None
        else r
        for r in reports
    ]


def require_gateway(result: ProbeResult) -> Mechanism:
    """The chosen mechanism, or NoGatewayError saying why there is none."""
    if result.choice.mechanism is None:
        raise NoGatewayError(f"{result.choice.reason} (gateway {result.gateway})")
    return result.choice.mechanism
