"""The two-level lab: a double NAT, for igd-server's upstream mirroring (docs/upstream.md).

    wan1 203.0.113.2 ─ br0 (wan-switch) ─ wan0 [up] br-mid ─ wan0 [gw] br-lan ─ eth0 lan1
                                     203.0.113.1  192.168.1.1  192.168.1.2  192.168.77.1

`up` is the upstream gateway (the ISP's router, a CGN): igd-server or Debian's miniupnpd runs
there with its LAN on the middle network. `gw` is the gateway under test, with a private
external address on that middle network and its default route through `up`; `lab.gateway`,
`start_gateway` and the LAN hosts are the plain Lab's. Neither gateway masquerades: the WAN
hosts reach the LAN only through what both map.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from lab import (
    DEFAULT_LAN_NETWORK,
    DEFAULT_WAN_NETWORK,
    STOP_TIMEOUT,
    WAN_BRIDGE,
    GatewayHost,
    Host,
    Lab,
    TomlValue,
    stop_daemon,
)
from lab.netns import (
    LabError,
    add_bridge,
    add_veth,
    enslave,
    ip,
    sysctl,
)

DEFAULT_MIDDLE_NETWORK = "192.168.1.0/24"
MIDDLE_BRIDGE = "br-mid"


class CascadeLab(Lab):
    """A Lab whose gateway sits behind another NAT gateway, `upstream`."""

    def __init__(
        self,
        prefix: str | None = None,
        *,
        wan_hosts: int = 1,
        lan_hosts: int = 1,
        public_network: str = DEFAULT_WAN_NETWORK,
        middle_network: str = DEFAULT_MIDDLE_NETWORK,
        lan_network: str = DEFAULT_LAN_NETWORK,
    ) -> None:
        # IPv4 only: the cascade builds its own gateway hosts, which carry no IPv6 addresses.
        super().__init__(
            prefix, wan_hosts=0, lan_hosts=lan_hosts, wan_network=middle_network,
            lan_network=lan_network, wan_network6=None, lan_network6=None,
        )  # fmt: skip
        self.public_network = ipaddress.IPv4Network(public_network)
        self.middle_network = self.wan_network
        if not 1 <= wan_hosts <= min(16, self.public_network.num_addresses - 3):
            raise ValueError(f"wan_hosts={wan_hosts} does not fit {public_network}")
        gw = self.gateway
        self.gateway = GatewayHost(
            name=gw.name, ns=gw.ns, address=gw.address, interface=gw.interface,
            external_address=str(self.middle_network[2]),
            external_interface=gw.external_interface,
        )  # fmt: skip
        self.upstream = GatewayHost(
            name="up", ns=f"{self.prefix}-up", address=str(self.middle_network[1]),
            interface=MIDDLE_BRIDGE, external_address=str(self.public_network[1]),
            external_interface="wan0",
        )  # fmt: skip
        self.wan = [
            Host(f"wan{i}", f"{self.prefix}-wan{i}", str(self.public_network[1 + i]), "eth0")
            for i in range(1, wan_hosts + 1)
        ]
        self._upstream: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> CascadeLab:
        super().__enter__()
        return self

    @property
    def hosts(self) -> dict[str, Host]:
        """Every host by its short name: `up`, `gw`, `wan1`..., `lan1`..."""
        return {h.name: h for h in (self.upstream, self.gateway, *self.wan, *self.lan)}

    def _build_wan(self) -> None:
        up, gw = self.upstream, self.gateway
        public_bits, middle_bits = self.public_network.prefixlen, self.middle_network.prefixlen
        add_bridge(self.switch_ns, WAN_BRIDGE)
        # Not "up": `ip link set up up` reads the name as a keyword.
        add_veth(up.ns, up.external_interface, self.switch_ns, "upstream")
        enslave(self.switch_ns, "upstream", WAN_BRIDGE)
        ip("addr", "add", f"{up.external_address}/{public_bits}", "dev", up.external_interface,
           ns=up.ns)  # fmt: skip
        for host in self.wan:
            add_veth(host.ns, host.interface, self.switch_ns, host.name)
            enslave(self.switch_ns, host.name, WAN_BRIDGE)
            ip("addr", "add", f"{host.address}/{public_bits}", "dev", host.interface, ns=host.ns)
        ip("route", "add", "default", "via", self.wan[0].address, ns=up.ns)
        # The middle network: the upstream's LAN bridge, our gateway's WAN link on it.
        add_bridge(up.ns, MIDDLE_BRIDGE)
        ip("addr", "add", f"{up.address}/{middle_bits}", "dev", MIDDLE_BRIDGE, ns=up.ns)
        ip("route", "add", "224.0.0.0/4", "dev", MIDDLE_BRIDGE, ns=up.ns)
        sysctl(up.ns, "net.ipv4.ip_forward", "1")
        if Path("/proc/sys/net/bridge").is_dir():
            with contextlib.suppress(LabError):
                sysctl(up.ns, "net.bridge.bridge-nf-call-iptables", "0")
        add_veth(gw.ns, gw.external_interface, up.ns, gw.name)
        enslave(up.ns, gw.name, MIDDLE_BRIDGE)
        ip("addr", "add", f"{gw.external_address}/{middle_bits}", "dev", gw.external_interface,
           ns=gw.ns)  # fmt: skip
        ip("route", "add", "default", "via", up.address, ns=gw.ns)

    # -- the upstream gateway's igd-server ---------------------------------------------------

    @property
    def upstream_log_path(self) -> Path:
        """Where the upstream daemon's output goes."""
        return self.workdir / "upstream.log"

    def write_upstream_config(
        self, policy_path: str | Path, **sections: Mapping[str, TomlValue]
    ) -> Path:
        """The upstream igd-server's config: its LAN is the middle network."""
        return self.write_gateway_config(
            policy_path,
            filename="upstream.toml",
            host=self.upstream,
            state_name="upstream-state",
            **sections,
        )

    def start_upstream(self, config_path: str | Path) -> subprocess.Popen[bytes]:
        """Start igd-server in the upstream gateway, logging to `upstream_log_path`."""
        if self._upstream is not None and self._upstream.poll() is None:
            raise LabError("the upstream is already running; stop_upstream() first")
        self._upstream = self.start_daemon(self.upstream, config_path, self.upstream_log_path)
        return self._upstream

    def stop_upstream(
        self, sig: signal.Signals = signal.SIGTERM, *, timeout: float = STOP_TIMEOUT
    ) -> int | None:
        """Signal the upstream daemon and wait for it (SIGKILL after `timeout`)."""
        proc, self._upstream = self._upstream, None
        return stop_daemon(proc, sig, timeout=timeout)

    def upstream_log(self) -> str:
        """Everything the upstream daemon printed so far."""
        try:
            return self.upstream_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def teardown(self) -> None:
        """Stop the upstream daemon too, then tear down as the Lab does."""
        if self._upstream is not None:
            self.stop_upstream(timeout=1.0)
        super().teardown()

    def describe(self) -> str:
        """A table of hosts, namespaces and addresses, for people."""
        up = self.upstream
        line = (
            f"  {up.name:<6} {up.ns:<24} {up.external_interface} {up.external_address}"
            f"  {up.interface} {up.address}"
        )
        first, *rest = super().describe().splitlines()
        return "\n".join([first, line, *rest])


class UpstreamSite:
    """The upstream gateway seen as a lab of its own (its LAN the middle network), for tools
    written for a Lab's gateway, such as lab.miniupnpd.Miniupnpd."""

    def __init__(self, cascade: CascadeLab) -> None:
        self.cascade = cascade
        self.gateway = cascade.upstream
        self.lan_network = cascade.middle_network
        self.workdir = cascade.workdir
        self.lan = [cascade.gateway]

    def run(
        self, host: Host | str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run in a host of the cascade."""
        return self.cascade.run(host, argv, **kwargs)

    def popen(self, host: Host | str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start in a host of the cascade."""
        return self.cascade.popen(host, argv, **kwargs)

    def python(
        self, host: Host | str, code: str | Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run Python in a host of the cascade."""
        return self.cascade.python(host, code, **kwargs)

    def as_lab(self) -> Lab:
        """This view where a Lab is expected (it has every member those tools use)."""
        return cast(Lab, self)


__all__ = ["CascadeLab", "UpstreamSite"]
