"""The namespace lab: WAN hosts, a gateway and LAN hosts on one machine, for end-to-end runs.

Shape (default addresses; the WAN and LAN prefixes are parameters):

    wan1 203.0.113.2 ─┐                                  ┌─ eth0 192.168.77.10 lan1
    wan2 203.0.113.3 ─┤ br0 (wan-switch) ─ wan0 [gw] br-lan ─┤
                                     203.0.113.1   192.168.77.1 └─ eth0 192.168.77.11 lan2

The gateway forwards (ip_forward=1) but does no NAT of its own: WAN hosts have no route to
the LAN, so only what the daemon maps is reachable from outside. Its default route points at
wan1, like a router's upstream; multicast is routed to br-lan so announcements reach the LAN.

IPv6 (documentation prefixes, RFC 3849) runs beside it: the WAN link is 2001:db8:0:1::/64
(gw ::1, wan1 ::2, wan2 ::3), the LAN 2001:db8:0:77::/64 (gw ::1, lan1 ::a, lan2 ::b). There
is no NAT on IPv6: the WAN hosts route the LAN prefix via the gateway, as an ISP routes a
delegated prefix, and the gateway forwards it (forwarding=1) with no filter of its own, so
only the daemon's `[ipv6]` firewall table stands between the WAN and the LAN hosts (RFC 6092).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from lab.netns import (
    KILL_GRACE,
    LAB_PREFIX,
    LabCommandError,
    LabError,
    add_bridge,
    add_netns,
    add_veth,
    check_name,
    cleanup_stale,
    delete_netns,
    enslave,
    ip,
    list_netns,
    netns_exec,
    run_in,
    sysctl,
    workdir_path,
)

__all__ = [
    "LAB_PREFIX",
    "GatewayHost",
    "Host",
    "Lab",
    "LabCommandError",
    "LabError",
    "cleanup_stale",
    "list_netns",
]

DEFAULT_WAN_NETWORK = "203.0.113.0/24"  # RFC 5737 TEST-NET-3
DEFAULT_LAN_NETWORK = "192.168.77.0/24"
DEFAULT_WAN_NETWORK6 = "2001:db8:0:1::/64"  # RFC 3849 documentation prefix
DEFAULT_LAN_NETWORK6 = "2001:db8:0:77::/64"
FIRST_LAN_HOST = 10  # LAN hosts get .10, .11, ...
MAX_HOSTS = 64  # per side: each host is a namespace and a veth pair
STOP_TIMEOUT = 10.0  # seconds a stopped gateway gets before SIGKILL
WAN_BRIDGE = "br0"
HOST_INTERFACE = "eth0"

TomlValue = str | int | float | bool | Sequence["TomlValue"]


@dataclass(frozen=True, slots=True)
class Host:
    """One machine of the lab: a network namespace with one address on one interface."""

    name: str
    ns: str
    address: str
    interface: str
    address6: str = field(default="", kw_only=True)
    """Global IPv6 address ("" in a lab built without IPv6)."""


@dataclass(frozen=True, slots=True)
class GatewayHost(Host):
    """The gateway: `address` is on the LAN bridge, `external_address` on the WAN link."""

    external_address: str
    external_interface: str
    external_address6: str = field(default="", kw_only=True)


class Lab:
    """A lab of namespaces; build it with `with Lab() as lab:` and it is always torn down."""

    def __init__(
        self,
        prefix: str | None = None,
        *,
        wan_hosts: int = 2,
        lan_hosts: int = 2,
        wan_network: str = DEFAULT_WAN_NETWORK,
        lan_network: str = DEFAULT_LAN_NETWORK,
        external_interface: str = "wan0",
        internal_interface: str = "br-lan",
        wan_network6: str | None = DEFAULT_WAN_NETWORK6,
        lan_network6: str | None = DEFAULT_LAN_NETWORK6,
    ) -> None:
        self.prefix = check_name(prefix or f"{LAB_PREFIX}{secrets.token_hex(3)}")
        self.wan_network = ipaddress.IPv4Network(wan_network)
        self.lan_network = ipaddress.IPv4Network(lan_network)
        # IPv6 is on unless both prefixes are None; each must be a /64 or wider.
        self.wan_network6 = ipaddress.IPv6Network(wan_network6) if wan_network6 else None
        self.lan_network6 = ipaddress.IPv6Network(lan_network6) if lan_network6 else None
        if (self.wan_network6 is None) != (self.lan_network6 is None):
            raise ValueError("give both IPv6 prefixes or neither")
        wan6, lan6 = self.wan_network6, self.lan_network6
        wan_room = self.wan_network.num_addresses - 3  # network, broadcast, gateway
        lan_room = self.lan_network.num_addresses - 1 - FIRST_LAN_HOST
        if not 0 <= wan_hosts <= min(MAX_HOSTS, wan_room):
            raise ValueError(f"wan_hosts={wan_hosts} does not fit {wan_network} (max {MAX_HOSTS})")
        if not 1 <= lan_hosts <= min(MAX_HOSTS, lan_room):
            raise ValueError(f"lan_hosts={lan_hosts} does not fit {lan_network} (max {MAX_HOSTS})")
        for name in (external_interface, internal_interface):
            if len(name) > 15 or not name.replace("-", "").isalnum():
                raise ValueError(f"bad interface name {name!r}")
        self.workdir = workdir_path(self.prefix)
        self.gateway = GatewayHost(
            name="gw",
            ns=f"{self.prefix}-gw",
            address=str(self.lan_network[1]),
            interface=internal_interface,
            external_address=str(self.wan_network[1]),
            external_interface=external_interface,
            address6=str(lan6[1]) if lan6 else "",
            external_address6=str(wan6[1]) if wan6 else "",
        )
        self.wan = [
            Host(
                f"wan{i}",
                f"{self.prefix}-wan{i}",
                str(self.wan_network[1 + i]),
                HOST_INTERFACE,
                address6=str(wan6[1 + i]) if wan6 else "",
            )
            for i in range(1, wan_hosts + 1)
        ]
        self.lan = [
            Host(
                f"lan{i}",
                f"{self.prefix}-lan{i}",
                str(self.lan_network[FIRST_LAN_HOST - 1 + i]),
                HOST_INTERFACE,
                address6=str(lan6[FIRST_LAN_HOST - 1 + i]) if lan6 else "",
            )
            for i in range(1, lan_hosts + 1)
        ]
        self.switch_ns = f"{self.prefix}-wan-switch"
        self.gateway_config: Path | None = None
        self._gateway: subprocess.Popen[bytes] | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._built = False
        self._saved_handlers: list[dict[int, Any]] = []

    # -- building and tearing down ---------------------------------------------------------

    @property
    def hosts(self) -> dict[str, Host]:
        """Every host by its short name: `gw`, `wan1`..., `lan1`..."""
        return {host.name: host for host in (self.gateway, *self.wan, *self.lan)}

    def host(self, host: Host | str) -> Host:
        """`host` itself, or the host with that short name."""
        if isinstance(host, Host):
            return host
        try:
            return self.hosts[host]
        except KeyError:
            raise LabError(f"no host {host!r} in lab {self.prefix}") from None

    def namespaces(self) -> list[str]:
        """Every namespace this lab makes, in build order."""
        return [self.switch_ns, *(host.ns for host in self.hosts.values())]

    def build(self) -> Lab:
        """Create the namespaces and links; on any failure, remove what was made and raise."""
        if self._built:
            return self
        taken = [ns for ns in list_netns() if ns.startswith(f"{self.prefix}-")]
        if taken or self.workdir.exists():
            option = f" --prefix {self.prefix}" if self.prefix != LAB_PREFIX else ""
            raise LabError(
                f"a lab named {self.prefix} already exists ({', '.join(taken) or self.workdir}):"
                f" remove it with `./dev.sh lab down{option}`"
            )
        self._built = True
        atexit.register(self.teardown)
        try:
            self.workdir.mkdir(mode=0o700)
            for ns in self.namespaces():
                add_netns(ns)
                if self.lan_network6 is not None:
                    # Links made from now on skip Duplicate Address Detection: their
                    # link-local addresses would otherwise stay tentative for 1-2 s, and
                    # neighbour discovery fails in that time.
                    sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
            self._build_wan()
            self._build_gateway()
            self._build_lan()
        except BaseException:
            self.teardown()
            raise
        return self

    def _build_wan(self) -> None:
        gw, bits = self.gateway, self.wan_network.prefixlen
        add_bridge(self.switch_ns, WAN_BRIDGE)
        add_veth(gw.ns, gw.external_interface, self.switch_ns, gw.name)
        enslave(self.switch_ns, gw.name, WAN_BRIDGE)
        ip("addr", "add", f"{gw.external_address}/{bits}", "dev", gw.external_interface, ns=gw.ns)
        for host in self.wan:
            add_veth(host.ns, host.interface, self.switch_ns, host.name)
            enslave(self.switch_ns, host.name, WAN_BRIDGE)
            ip("addr", "add", f"{host.address}/{bits}", "dev", host.interface, ns=host.ns)
        if self.wan:
            ip("route", "add", "default", "via", self.wan[0].address, ns=gw.ns)
        if self.wan_network6 is None or self.lan_network6 is None:
            return
        bits6 = self.wan_network6.prefixlen
        # nodad: the address is usable at once (no 1-2 s of Duplicate Address Detection).
        _add6(gw.ns, gw.external_interface, f"{gw.external_address6}/{bits6}")
        for host in self.wan:
            _add6(host.ns, host.interface, f"{host.address6}/{bits6}")
            # The upstream routes the delegated LAN prefix to the gateway; no NAT on IPv6.
            ip("-6", "route", "add", str(self.lan_network6), "via", gw.external_address6,
               ns=host.ns)  # fmt: skip
        if self.wan:
            ip("-6", "route", "add", "default", "via", self.wan[0].address6, ns=gw.ns)

    def _build_gateway(self) -> None:
        gw = self.gateway
        add_bridge(gw.ns, gw.interface)
        bits = self.lan_network.prefixlen
        ip("addr", "add", f"{gw.address}/{bits}", "dev", gw.interface, ns=gw.ns)
        # With the default route on the WAN side, a datagram to 224.0.0.1 (NAT-PMP and PCP
        # announcements, SSDP NOTIFY) would leave through wan0 unless multicast is routed here.
        ip("route", "add", "224.0.0.0/4", "dev", gw.interface, ns=gw.ns)
        sysctl(gw.ns, "net.ipv4.ip_forward", "1")
        if self.lan_network6 is not None:
            _add6(gw.ns, gw.interface, f"{gw.address6}/{self.lan_network6.prefixlen}")
            sysctl(gw.ns, "net.ipv6.conf.all.forwarding", "1")
        if Path("/proc/sys/net/bridge").is_dir():
            # br_netfilter is loaded on this machine: keep frames switched between LAN hosts
            # out of the gateway's IP hooks, as a hardware switch would.
            with contextlib.suppress(LabError):
                sysctl(gw.ns, "net.bridge.bridge-nf-call-iptables", "0")

    def _build_lan(self) -> None:
        gw, bits = self.gateway, self.lan_network.prefixlen
        for host in self.lan:
            add_veth(gw.ns, host.name, host.ns, host.interface)
            enslave(gw.ns, host.name, gw.interface)
            ip("addr", "add", f"{host.address}/{bits}", "dev", host.interface, ns=host.ns)
            ip("route", "add", "default", "via", gw.address, ns=host.ns)
            if self.lan_network6 is not None:
                _add6(host.ns, host.interface, f"{host.address6}/{self.lan_network6.prefixlen}")
                ip("-6", "route", "add", "default", "via", gw.address6, ns=host.ns)

    def teardown(self) -> None:
        """Kill every process the lab started and delete its namespaces and files.

        Idempotent; raises LabError at the end if something could not be removed.
        """
        with _signals_ignored():
            errors: list[str] = []
            if self._gateway is not None:
                self.stop_gateway(timeout=KILL_GRACE)
            for proc in self._procs:
                _stop_group(proc)
            self._procs.clear()
            # Only what this object built: a lab with the same prefix may belong to someone
            # else (`./dev.sh lab up`, or a build that stopped at "already exists").
            if self._built:
                for ns in reversed(self.namespaces()):
                    try:
                        delete_netns(ns)
                    except LabError as exc:
                        errors.append(str(exc))
                shutil.rmtree(self.workdir, ignore_errors=True)
                if self.workdir.exists():
                    errors.append(f"could not remove {self.workdir}")
            self._built = False
            atexit.unregister(self.teardown)
        if errors:
            raise LabError("lab teardown incomplete: " + "; ".join(errors))

    def detach(self) -> None:
        """Leave the lab running after this process exits (`./dev.sh lab up`); forget it here."""
        atexit.unregister(self.teardown)
        self._built = False
        self._gateway = None
        self._procs.clear()

    def __enter__(self) -> Lab:
        if threading.current_thread() is threading.main_thread():
            # SIGINT already unwinds as KeyboardInterrupt; make SIGTERM and SIGHUP unwind too,
            # so that `with Lab()` tears down when a CI runner or a terminal stops us.
            saved: dict[int, Any] = {}
            for sig in (signal.SIGTERM, signal.SIGHUP):
                saved[sig] = signal.signal(sig, _exit_on_signal)
            self._saved_handlers.append(saved)
        try:
            return self.build()
        except BaseException:
            self._restore_handlers()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.teardown()
        finally:
            self._restore_handlers()

    def _restore_handlers(self) -> None:
        if self._saved_handlers:
            for sig, handler in self._saved_handlers.pop().items():
                signal.signal(sig, handler)

    # -- running things in hosts -----------------------------------------------------------

    def run(
        self,
        host: Host | str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in `host` and wait; LabCommandError if `check` and it exits non-zero."""
        return run_in(self.host(host).ns, argv, check=check, timeout=timeout, input=input)

    def popen(self, host: Host | str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` in `host` in its own process group; teardown kills the group."""
        kwargs["start_new_session"] = True
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            netns_exec(self.host(host).ns, argv), **kwargs
        )
        self._procs.append(proc)
        return proc

    def python(
        self,
        host: Host | str,
        code: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run Python code (a string for `-c`, or argv such as `["-m", "http.server"]`)."""
        return self.run(host, _python_argv(code), check=check, timeout=timeout, input=input)

    def python_popen(
        self, host: Host | str, code: str | Sequence[str], **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start Python code in `host`, as `python` does, without waiting."""
        return self.popen(host, _python_argv(code), **kwargs)

    # -- the gateway daemon ----------------------------------------------------------------

    @property
    def gateway_log_path(self) -> Path:
        """Where the daemon's stdout and stderr go."""
        return self.workdir / "gateway.log"

    @property
    def gateway_process(self) -> subprocess.Popen[bytes] | None:
        """The daemon started by `start_gateway`, if any."""
        return self._gateway

    def write_gateway_config(
        self,
        policy_path: str | Path,
        *,
        filename: str = "gateway.toml",
        host: GatewayHost | None = None,
        state_name: str = "state",
        **sections: Mapping[str, TomlValue],
    ) -> Path:
        """Write the daemon's TOML config for this lab (for `host`, by default the gateway);
        `sections` update its tables."""
        gw = self.gateway if host is None else host
        state = self.workdir / check_name(state_name)
        state.mkdir(mode=0o700, exist_ok=True)
        config: dict[str, dict[str, TomlValue]] = {
            "network": {
                "external_interface": gw.external_interface,
                "internal_interfaces": [gw.interface],
                # Documentation and private WAN ranges are fine in the lab; say so explicitly.
                "allow_private_external": not ipaddress.IPv4Address(gw.external_address).is_global,
            },
            "state": {"directory": str(state)},
            "policy": {"file": str(Path(policy_path).resolve())},
            "natpmp": {"enabled": True},
            "pcp": {"enabled": True},
            "upnp": {"enabled": False},
            "nftables": {"table": "igd"},
        }
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        text = dump_toml(config)
        tomllib.loads(text)  # what we hand the daemon must parse
        path = self.workdir / check_name(filename)
        path.write_text(text)
        return path

    def start_gateway(
        self, config_path: str | Path, extra_args: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """Start `python -m igd.server --config ...` in the gateway, logging to a file."""
        if self._gateway is not None and self._gateway.poll() is None:
            raise LabError("the gateway is already running; stop_gateway() first")
        self._gateway = self.start_daemon(
            self.gateway, config_path, self.gateway_log_path, extra_args
        )
        self.gateway_config = Path(config_path)
        return self._gateway

    def stop_gateway(
        self, sig: signal.Signals = signal.SIGTERM, *, timeout: float = STOP_TIMEOUT
    ) -> int | None:
        """Signal the daemon and wait for it (SIGKILL after `timeout`); its exit code."""
        proc, self._gateway = self._gateway, None
        return stop_daemon(proc, sig, timeout=timeout)

    def start_daemon(
        self,
        host: Host,
        config_path: str | Path,
        log_path: Path,
        extra_args: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start igd-server (`python -m igd.server --config ...`) in `host`, appending its
        output to `log_path`; any gateway host of a lab (the cascade's upstream too)."""
        argv = [sys.executable, "-m", "igd.server", "--config", str(config_path), *extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log_path.open("ab") as log:
            log.write(f"--- {' '.join(argv)}\n".encode())
            log.flush()
            return self.popen(host, argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    def gateway_log(self) -> str:
        """Everything the daemon printed so far (empty if it never ran)."""
        try:
            return self.gateway_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        """A table of hosts, namespaces and addresses, for people."""
        lines = [f"lab {self.prefix} (files in {self.workdir})"]
        gw = self.gateway
        lines.append(
            f"  {gw.name:<6} {gw.ns:<24} {gw.external_interface} {gw.external_address}"
            f" {gw.external_address6}  {gw.interface} {gw.address} {gw.address6}".rstrip()
        )
        for host in (*self.wan, *self.lan):
            lines.append(
                f"  {host.name:<6} {host.ns:<24} {host.interface} {host.address}"
                f" {host.address6}".rstrip()
            )
        return "\n".join(lines)


def stop_daemon(
    proc: subprocess.Popen[Any] | None,
    sig: signal.Signals = signal.SIGTERM,
    *,
    timeout: float = STOP_TIMEOUT,
) -> int | None:
    """Signal a daemon `start_daemon` started and wait for it (SIGKILL after `timeout`, and
    to any helper it started); its exit code, None if there was none."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        deadline = time.monotonic() + timeout
        while not _exited(proc) and time.monotonic() < deadline:
            time.sleep(0.05)
    _stop_group(proc, grace=0)
    return proc.returncode


def _add6(ns: str, interface: str, address: str) -> None:
    ip("-6", "addr", "add", address, "dev", interface, "nodad", ns=ns)


def dump_toml(config: Mapping[str, Mapping[str, TomlValue]]) -> str:
    """TOML text for tables of scalars and arrays (all the daemon's config needs)."""
    out: list[str] = []
    for section, values in config.items():
        out.append(f"[{section}]")
        out.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        out.append("")
    return "\n".join(out)


def _toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string without ASCII escaping is a valid TOML basic string.
        return json.dumps(value, ensure_ascii=False)
    return "[" + ", ".join(_toml_value(item) for item in value) + "]"


def _python_argv(code: str | Sequence[str]) -> list[str]:
    return [sys.executable, "-c", code] if isinstance(code, str) else [sys.executable, *code]


def _stop_group(proc: subprocess.Popen[Any], grace: float = KILL_GRACE) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL what is left after `grace`, reap it."""
    if proc.returncode is not None:
        return  # reaped already: its pid, and so its group id, may belong to someone else now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while not _exited(proc) and time.monotonic() < deadline:
        time.sleep(0.02)
    # The leader is at most a zombie here, so the group id is still ours to signal.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _exited(proc: subprocess.Popen[Any]) -> bool:
    """Whether `proc` has exited, without reaping it."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Hold off SIGINT and SIGTERM while tearing down, so teardown is not cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
