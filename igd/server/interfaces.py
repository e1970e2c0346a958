"""What the daemon learns from the host's interfaces: internal networks, external address."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)

import netifaces

log = logging.getLogger("igd.interfaces")


@dataclass(frozen=True, slots=True)
class InternalInterface:
    """A LAN interface the daemon serves: its name, its own address and its networks."""

    name: str
    address: IPv4Address
    networks: tuple[IPv4Network, ...]

    def serves(self, client: IPv4Address | IPv6Address) -> bool:
        """Whether a source address belongs on this interface's networks."""
        return any(client in network for network in self.networks)


LINK_LOCAL6 = IPv6Network("fe80::/10")


@dataclass(frozen=True, slots=True)
class InternalInterface6:
    """A LAN interface's IPv6 side: its name, the address UPnP serves on, the LAN prefixes."""

    name: str
    address: IPv6Address
    networks: tuple[IPv6Network, ...]

    def serves(self, client: IPv4Address | IPv6Address) -> bool:
        """Whether a source is on this LAN: in its prefixes, or on-link (link-local)."""
        return isinstance(client, IPv6Address) and (
            client in LINK_LOCAL6 or any(client in network for network in self.networks)
        )


def internal_interfaces6(
    names: Sequence[str], lan: Sequence[IPv6Network]
) -> list[InternalInterface6]:
    """Each LAN interface's first global (or ULA) address inside the LAN prefixes."""
    found = []
    for name in names:
        for entry in ipv6_interfaces(name):
            if any(entry.ip in network for network in lan) and not entry.ip.is_link_local:
                found.append(InternalInterface6(name, entry.ip, tuple(lan)))
                break
    return found


def ipv4_interfaces(name: str) -> list[IPv4Interface]:
    """The IPv4 addresses (with prefix) configured on an interface; [] if it has none."""
    try:
        entries = netifaces.ifaddresses(name).get(netifaces.AF_INET, [])
    except ValueError:
        return []
    found = []
    for entry in entries:
        try:
            found.append(IPv4Interface(f"{entry['addr']}/{entry.get('netmask', '32')}"))
        except (KeyError, ValueError):
            continue
    return found


def ipv6_interfaces(name: str) -> list[IPv6Interface]:
    """The IPv6 addresses (with prefix) on an interface, link-local ones included."""
    try:
        entries = netifaces.ifaddresses(name).get(netifaces.AF_INET6, [])
    except ValueError:
        return []
    found = []
    for entry in entries:
        try:
            address = entry["addr"].split("%")[0]  # link-local ones carry "%ifname"
            bits = str(entry.get("netmask", "/128")).rpartition("/")[2] or "128"
            found.append(IPv6Interface(f"{address}/{bits}"))
        except (KeyError, ValueError):
            continue
    return found


def internal_interface(name: str) -> InternalInterface:
    """Describe a LAN interface; ValueError if it has no IPv4 address."""
    addresses = ipv4_interfaces(name)
    if not addresses:
        raise ValueError(f"internal interface {name!r} does not exist or has no IPv4 address")
    return InternalInterface(
        name, addresses[0].ip, tuple(dict.fromkeys(a.network for a in addresses))
    )


def further_address_problems(
    addresses: tuple[IPv4Address, ...], *, allow_private: bool
) -> list[str]:
    """Why network.external_addresses cannot be served: each must be an address of this
    host (normally on the external interface; a routed subnet's addresses on any interface,
    `lo` included), and public unless private external addresses are allowed."""
    local = {entry.ip for _, name in socket.if_nameindex() for entry in ipv4_interfaces(name)}
    problems = []
    for address in addresses:
        if address not in local:
            problems.append(
                f"network.external_addresses: {address} is no address of this host"
                f" (add it to the external interface, e.g. ip address add {address}/32 dev ...)"
            )
        elif not is_public(address) and not allow_private:
            problems.append(
                f"network.external_addresses: {address} is not public"
                " (set network.allow_private_external = true behind another NAT or in a lab)"
            )
    return problems


def is_public(address: IPv4Address) -> bool:
    """Whether an address is globally routable (not private, shared, reserved or special)."""
    shared = address in ipaddress.IPv4Network("100.64.0.0/10")
    return address.is_global and not shared


class ExternalAddress:
    """Tracks the address the gateway reports, deciding whether it may serve with it."""

    def __init__(
        self,
        interface: str,
        *,
        override: IPv4Address | None = None,
        allow_private: bool = False,
        further: tuple[IPv4Address, ...] = (),
    ) -> None:
        self.interface = interface
        self.override = override
        self.further = further
        """network.external_addresses: fixed, never the default, whose own mappings report
        them (mapping.external_address)."""
        self.allow_private = allow_private
        self.current: IPv4Address | None = None
        self.public: IPv4Address | None = None
        """The upstream gateway's public address, when mappings are mirrored there
        (igd/server/upstream.py): what clients are told instead of `current`."""
        self._warned: IPv4Address | None = None
        self._read_once = False

    @property
    def reported(self) -> IPv4Address | None:
        """The address clients are told: the upstream's public one behind a double NAT."""
        if self.current is None:
            return None
        return self.public or self.current

    def read(self) -> IPv4Address | None:
        """The interface's address now (or the override), vetted; None when unusable."""
        if self.override is not None:
            return self._vet(self.override)
        addresses = [a for a in ipv4_interfaces(self.interface) if a.ip not in self.further]
        return self._vet(addresses[0].ip) if addresses else None

    def of(self, address: IPv4Address | None) -> IPv4Address | None:
        """What a mapping on `address` is reached at: the reported default for None."""
        return self.reported if address is None else address

    def refresh(self) -> bool:
        """Re-read the address; True when what the gateway reports changed."""
        address = self.read()
        first, self._read_once = not self._read_once, True
        if first:
            # The first reading is no change: say what it is, without a warning.
            log.info("external address on %s: %s", self.interface, address or "none usable")
        elif address != self.current:
            log.warning(
                "external address on %s changed: %s -> %s", self.interface, self.current, address
            )
        changed = address != self.current
        self.current = address
        return changed

    def _vet(self, address: IPv4Address) -> IPv4Address | None:
        if is_public(address):
            return address
        if self._warned != address:
            self._warned = address
            if self.allow_private:
                log.warning(
                    "EXTERNAL ADDRESS %s IS NOT PUBLIC: serving anyway (allow_private_external);"
                    " clients will see a private address (double NAT or lab)",
                    address,
                )
            else:
                log.error(
                    "external address %s is not public: refusing mappings. Behind another NAT"
                    " set network.allow_private_external = true, or network.external_address",
                    address,
                )
        return address if self.allow_private else None


def bind_to_device(sock: socket.socket, name: str) -> None:
    """Receive only what arrives on this interface (SO_BINDTODEVICE)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, name.encode() + b"\0")
