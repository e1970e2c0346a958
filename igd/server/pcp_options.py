"""PCP options on the server side: checking them in order (RFC 6887 §7.3), merging FILTERs
(§13.3), keeping DESCRIPTIONs (RFC 7220) and choosing what goes back in an answer."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from igd.model import Mapping, RemoteFilter
from igd.proto import pcp
from igd.proto.pcp import (
    PcpDescription,
    PcpFilter,
    PcpOpcode,
    PcpOption,
    PcpPreferFailure,
    PcpRequest,
    PcpResult,
    PcpThirdParty,
    PcpUnknownOption,
)


class PcpError(Exception):
    """A request refused with a PCP result; the request is answered as a copy (§8.2)."""

    def __init__(self, result: PcpResult, why: str, lifetime: int | None = None) -> None:
        super().__init__(why)
        self.result = result
        self.lifetime = lifetime


@dataclass(frozen=True, slots=True)
class Limits:
    """PCP-specific limits from the configuration."""

    max_filters: int = 8
    """FILTER options kept per mapping; more get EXCESSIVE_REMOTE_PEERS (§13.3)."""
    max_description: int = 128
    """Octets of DESCRIPTION stored and echoed (RFC 7220 §3 asks for at least 128)."""


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Options:
    """What a request's options ask for, and those processed (to echo)."""

    third_party: IPv4Address | None = None
    prefer_failure: bool = False
    filters: tuple[PcpFilter, ...] = ()
    description: str | None = None
    processed: tuple[PcpOption, ...] = ()


# Options that may appear once per request (RFC 6887 §13, RFC 7220 §2).
_ONCE = (PcpThirdParty, PcpPreferFailure, PcpDescription)
_VALID_FOR = {
    PcpOpcode.ANNOUNCE: (),
    PcpOpcode.MAP: (PcpThirdParty, PcpPreferFailure, PcpFilter, PcpDescription),
    PcpOpcode.PEER: (PcpThirdParty, PcpDescription),
}


class OptionRules:
    """Applies the option rules with the configured limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def read(self, request: PcpRequest, client: IPv4Address) -> Options:
        """Check options in order of appearance (RFC 6887 §7.3)."""
        seen: set[type] = set()
        third_party = None
        prefer_failure = False
        filters: list[PcpFilter] = []
        description = None
        processed: list[PcpOption] = []
        for option in request.options:
            if isinstance(option, PcpUnknownOption):
                if option.mandatory:
                    raise PcpError(PcpResult.UNSUPP_OPTION, f"unsupported option {option.code}")
                continue  # optional and not understood: ignored, not echoed
            if isinstance(option, _ONCE):
                if type(option) in seen:
                    raise PcpError(PcpResult.MALFORMED_OPTION, f"{type(option).__name__} twice")
                seen.add(type(option))
            if not isinstance(option, _VALID_FOR[request.opcode]):
                if request.opcode is PcpOpcode.PEER and isinstance(option, PcpPreferFailure):
                    raise PcpError(PcpResult.MALFORMED_REQUEST, "PEER with PREFER_FAILURE (§12.1)")
                if isinstance(option, PcpDescription):
                    continue  # optional: ignored
                raise PcpError(
                    PcpResult.UNSUPP_OPTION, f"{type(option).__name__} with {request.opcode.name}"
                )
            if isinstance(option, PcpThirdParty):
                address = pcp.unmapped(option.address)
                if address is None:
                    raise PcpError(PcpResult.UNSUPP_OPTION, "THIRD_PARTY for an IPv6 address")
                if address == client:
                    raise PcpError(PcpResult.MALFORMED_REQUEST, "THIRD_PARTY names the sender")
                third_party = address
            elif isinstance(option, PcpPreferFailure):
                prefer_failure = True
            elif isinstance(option, PcpFilter):
                _check_filter(option)
                filters.append(option)
            elif isinstance(option, PcpDescription):
                text = _truncate(option.text, self.limits.max_description)
                description = text
                option = PcpDescription(text)
            processed.append(option)
        return Options(third_party, prefer_failure, tuple(filters), description, tuple(processed))

    def filters(self, options: Options, existing: Mapping | None) -> tuple[RemoteFilter, ...]:
        """New FILTERs add to the mapping's; prefix length 0 removes them all (§13.3)."""
        kept = list(existing.filters) if existing is not None else []
        for option in options.filters:
            if option.prefix_length == 0:
                kept = []
                continue
            wanted = _remote_filter(option)
            if wanted not in kept:
                kept.append(wanted)
        if len(kept) > self.limits.max_filters:
            raise PcpError(
                PcpResult.EXCESSIVE_REMOTE_PEERS,
                f"{len(kept)} filters, at most {self.limits.max_filters}",
            )
        return tuple(kept)

    @staticmethod
    def description(options: Options, existing: Mapping | None) -> str:
        if options.description is not None:
            return options.description  # RFC 7220 §3: a new one replaces, "" clears
        return existing.description if existing is not None else ""

    @staticmethod
    def echo(options: Options, mapping: Mapping) -> tuple[PcpOption, ...]:
        """Only processed options go back (§7.3); DESCRIPTION as stored (RFC 7220 §3); the
        FILTERs the mapping holds when they differ from those sent (a rule's remote_hosts
        narrowed them), as §13.3 lets FILTER appear in a response to a request with FILTER."""
        sent = [o for o in options.processed if isinstance(o, PcpFilter)]
        named = {_remote_filter(o) for o in sent if o.prefix_length}
        narrowed = bool(sent) and named != set(mapping.filters)
        echoed: list[PcpOption] = []
        for option in options.processed:
            if isinstance(option, PcpDescription):
                echoed.append(PcpDescription(mapping.description))
            elif not isinstance(option, PcpFilter) or not narrowed:
                echoed.append(option)
            elif option is sent[0]:
                echoed += [
                    PcpFilter(
                        96 + f.network.prefixlen, f.port, pcp.mapped(f.network.network_address)
                    )
                    for f in mapping.filters
                ]
        return tuple(echoed)


def _check_filter(option: PcpFilter) -> None:
    if option.prefix_length == 0:
        return
    address = pcp.unmapped(option.remote_address)
    # An IPv4 filter is IPv4-mapped, so its prefix counts the 96 mapped bits (§13.3).
    if address is None or not 96 < option.prefix_length <= 128:
        raise PcpError(PcpResult.MALFORMED_OPTION, f"bad FILTER prefix {option.prefix_length}")


def _remote_filter(option: PcpFilter) -> RemoteFilter:
    address = pcp.unmapped(option.remote_address)
    assert address is not None
    network = IPv4Network((address, option.prefix_length - 96), strict=False)
    return RemoteFilter(network, option.remote_port)


def _truncate(text: str, limit: int) -> str:
    """At most `limit` octets of UTF-8, cut on a character boundary."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")
