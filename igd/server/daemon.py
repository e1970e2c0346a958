"""The igd-server daemon: wires configuration, policy, table, backend, store and adapters."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import signal
import socket
import time
from collections import Counter
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, cast

import igd
from igd.gateway import ALWAYS_RESERVED, Gateway
from igd.model import Protocol
from igd.pinhole import PinholeRules
from igd.policy import Policy, PolicyFileError
from igd.server.admin.server import AdminServer, listener_device
from igd.server.audit import AUDIT_QUEUE_BOUND, AUDITED, AuditLog, timestamp
from igd.server.backends import Backend, BackendError
from igd.server.backends.memory import MemoryBackend
from igd.server.backends.nft_payload import Guard
from igd.server.backends.nftables import NftablesBackend
from igd.server.backends.pinholes import Firewall, MemoryPinholeBackend, NftPinholeBackend
from igd.server.commands import admin_commands, mapping_row, pinhole_row
from igd.server.config import Config
from igd.server.control import ControlServer
from igd.server.hostports import HostPorts
from igd.server.instance import (
    InstanceLock,
    Port,
    StartError,
    acquire,
    check_ports,
    interface_problems,
)
from igd.server.interfaces import (
    ExternalAddress,
    InternalInterface6,
    further_address_problems,
    internal_interface,
    internal_interfaces6,
    ipv4_interfaces,
    ipv6_interfaces,
)
from igd.server.natpmp import NatPmpHandler
from igd.server.pcp import PcpHandler
from igd.server.pcp6 import Pcp6Handler, Pcp6Server
from igd.server.pcp_options import Limits as PcpLimits
from igd.server.pinhole_store import PinholeStore
from igd.server.pinholes import CommitError as PinholeCommitError
from igd.server.pinholes import PinholeService
from igd.server.pxp import SERVER_PORT as PXP_PORT
from igd.server.pxp import PxpServer, RateLimiter
from igd.server.service import Service
from igd.server.store import POLICY_KEY, Clock, LeaseStore, file_digest
from igd.server.systemd import ready, reloading, stopping
from igd.server.upnp import UpnpServer
from igd.server.upstream import Upstream

log = logging.getLogger("igd.daemon")

SSDP_PORT = 1900
ADDRESS_KEY = "external_address"
# Up to this many mappings, start-up reads the kernel table first to log what differed from
# the lease store; beyond it, reading costs more than the replacement itself (1.5 s for
# 50,000 elements) and the table is replaced unread.
AUDIT_LIMIT = 10_000
GC_FULL_AFTER = 100
"""Middle-generation passes before a full one may run (CPython's default: 10)."""


def release_free_heap() -> None:
    """Hand the heap that a large libnftables transaction freed back to the system: glibc
    keeps it otherwise, and a 50,000-element reconcile leaves hundreds of MB behind."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def settle_heap() -> None:
    """Keep what start-up built (modules, the restored table) out of the garbage collector's
    passes, and let a full pass come only once the heap has grown by a quarter. By default
    every ~100th young pass was a full one: at 10,000 mappings under load those walked the
    whole table about once a second, most of the collector's time (docs/performance.md).
    Mappings hold no reference cycles: removed ones are freed at once, frozen or not."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    # CPython runs a full pass only when the third threshold is passed *and* the objects
    # that survived since the last one exceed a quarter of the rest.
    gc.set_threshold(young, middle, GC_FULL_AFTER)


class Daemon:
    """One running gateway."""

    def __init__(
        self, config: Config, *, dry_run: bool = False, lock: InstanceLock | None = None
    ) -> None:
        self.config = config
        self.dry_run = dry_run
        self.started = time.monotonic()
        self.policy_digest = file_digest(config.policy_file)
        self.policy = Policy.load(config.policy_file)
        self.policy_loaded = time.time()
        # Before the lease store, the kernel or any socket: a second instance touches nothing.
        self.lock = acquire(config.state_directory) if lock is None else lock
        try:
            self._build(config, dry_run)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, config: Config, dry_run: bool) -> None:
        for warning in self.policy.warnings(wall=time.time()):
            log.warning("policy %s", warning)
        problems = interface_problems(
            config.external_interface,
            config.internal_interfaces,
            need_address=config.external_address is None,
        )
        problems += further_address_problems(
            config.external_addresses,
            allow_private=config.allow_private_external or config.upstream.mode != "off",
        )
        problems += [str(issue) for issue in self.policy.address_issues(config.external_addresses)]
        if problems:
            raise StartError("; ".join(problems))
        if config.external_interface not in {name for _, name in socket.if_nameindex()}:
            log.warning(
                "external interface %r does not exist: nothing is forwarded until it does",
                config.external_interface,
            )
        self.interfaces = [internal_interface(name) for name in config.internal_interfaces]
        mirroring = config.upstream.mode != "off"
        self.external = ExternalAddress(
            config.external_interface,
            override=config.external_address,
            # Behind a double NAT the private address is served, and mirrored upstream.
            allow_private=config.allow_private_external or mirroring,
            further=config.external_addresses,
        )
        if dry_run:
            self.store = LeaseStore(Path(":memory:"))
            self.backend: Backend = MemoryBackend()
        else:
            self.store = LeaseStore(
                config.state_directory / "leases.sqlite", checkpoint_thread=True
            )
            guard = Guard.from_limits(
                config.requests_per_second_per_client,
                config.burst_per_client,
                config.upnp_http_port if config.upnp_enabled else None,
            )
            self.backend = NftablesBackend(
                config.nftables_table,
                config.external_interface,
                guard=guard,
                hairpin=config.hairpin,
                counters=config.traffic_counters,
                addresses=config.external_addresses,
            )
        reserved = set(ALWAYS_RESERVED)
        if config.upnp_enabled:
            reserved |= {(Protocol.TCP, config.upnp_http_port), (Protocol.UDP, SSDP_PORT)}
        gateway = Gateway(
            self.policy,
            reserved=frozenset(reserved),
            internal_networks=tuple(
                dict.fromkeys(net for iface in self.interfaces for net in iface.networks)
            ),
        )
        self.service = Service(gateway, self.backend, self.store)
        self.host_ports = HostPorts(lambda: self.destinations() | set(config.external_addresses))
        self.service.before_map = self._refresh_host_ports
        self.upstream: Upstream | None = None
        if mirroring:
            self.upstream = Upstream(
                config.upstream,
                self.external,
                state_directory=None if dry_run else config.state_directory,
            )
            self.service.upstream = self.upstream
        natpmp = NatPmpHandler(self.service, self.external) if config.natpmp_enabled else None
        pcp = None
        if config.pcp_enabled:
            limits = PcpLimits(config.pcp_max_filters, config.pcp_max_description)
            pcp = PcpHandler(self.service, self.external, limits)
        # One budget per client for every mapping protocol: NAT-PMP, PCP and UPnP actions.
        limiter = RateLimiter(config.requests_per_second_per_client, config.burst_per_client)
        self.pxp = PxpServer(self.interfaces, natpmp, pcp, limiter, self.service)
        self.control = ControlServer(config.control_socket, admin_commands(self))
        self.audit: AuditLog | None = None
        if config.audit_file is not None:
            self.audit = AuditLog(
                config.audit_file, max_bytes=config.audit_max_bytes, keep=config.audit_keep
            )
            self.audit.open()  # a path the daemon cannot write stops it at start, not later
            self._audited = self.service.subscribe("audit", AUDIT_QUEUE_BOUND, AUDITED)
        self.pinholes: PinholeService | None = None
        self.pcp6: Pcp6Server | None = None
        self.lan6: list[InternalInterface6] = []
        if config.ipv6.enabled:
            self._build_ipv6()
        self.upnp: UpnpServer | None = None
        if config.upnp_enabled:
            self.upnp = UpnpServer(
                self.service,
                self.external,
                self.interfaces,
                external_interface=config.external_interface,
                http_port=config.upnp_http_port,
                igd_version=config.upnp_igd_version,
                store=self.store,
                pinholes=self.pinholes,
                lan6=self.lan6,
                limiter=limiter,
            )
        self.kernel_restores = 0
        """Times the nftables table was restored after another program removed it."""
        self.admin: AdminServer | None = None
        if config.admin_enabled:
            self.admin = self._admin_server()
            self.admin.metrics.state.kernel_restores = self._kernel_restores
            if self.pinholes is not None:
                # Metrics and the console show pinholes beside mappings.
                self.admin.metrics.state.pinholes = self.pinholes.pinholes
                self.admin.log.pinholes = self.pinholes
        self._stop = asyncio.Event()
        self._side_tasks: set[asyncio.Task[None]] = set()

    def _build_ipv6(self) -> None:
        """The `[ipv6]` part: pinhole rules, kernel table, store table, PCP over IPv6."""
        six = self.config.ipv6
        lan = self.lan_prefixes6()
        if not lan:
            log.warning("[ipv6] enabled, but the internal interfaces have no IPv6 prefix")
        rules = PinholeRules(
            internal_networks=lan,
            max_pinholes=six.max_pinholes,
            own_addresses=self.own_addresses6(),
        )
        firewall = cast(Firewall, six.firewall)
        if self.dry_run:
            backend: MemoryPinholeBackend | NftPinholeBackend = MemoryPinholeBackend()
            store = PinholeStore(Path(":memory:"))
        else:
            # The IPv4 table's flood guard, for requests over IPv6 (docs/nftables.md).
            guard = Guard.from_limits(
                self.config.requests_per_second_per_client,
                self.config.burst_per_client,
                self.config.upnp_http_port if self.config.upnp_enabled else None,
            )
            backend = NftPinholeBackend(
                six.nftables_table, self.config.external_interface, lan, firewall, guard=guard
            )
            store = PinholeStore(self.config.state_directory / "leases.sqlite")
        # The policy file decides pinholes like mappings; events go on the one feed.
        self.pinholes = PinholeService(
            rules, backend, store, policy=self.policy, feed=self.service.feed
        )
        handler = Pcp6Handler(
            self.pinholes,
            max_filters=self.config.pcp_max_filters,
            max_description=self.config.pcp_max_description,
        )
        limiter = RateLimiter(
            self.config.requests_per_second_per_client, self.config.burst_per_client
        )
        self.pcp6 = Pcp6Server(self.config.internal_interfaces, handler, lan, limiter)
        # UPnP over IPv6 (SSDP on ff02::c, HTTP) serves each LAN interface's address in `lan`.
        self.lan6 = internal_interfaces6(self.config.internal_interfaces, lan)
        log.info("IPv6 pinholes for %s (firewall %s)", ", ".join(map(str, lan)), six.firewall)

    def lan_prefixes6(self) -> tuple[IPv6Network, ...]:
        """`[ipv6] lan_prefixes`, else the global prefixes on the internal interfaces now."""
        return self.config.ipv6.lan_prefixes or tuple(
            dict.fromkeys(
                entry.network
                for name in self.config.internal_interfaces
                for entry in ipv6_interfaces(name)
                if not (entry.ip.is_link_local or entry.ip.is_loopback)
            )
        )

    async def _readdress6(self) -> None:
        """Follow the LAN's IPv6 prefixes and the gateway's own addresses (renumbering)."""
        if self.pinholes is None:
            return
        current = self.pinholes.rules
        rules = replace(
            current, internal_networks=self.lan_prefixes6(), own_addresses=self.own_addresses6()
        )
        if rules != current:
            if rules.internal_networks != current.internal_networks:
                log.info("IPv6 LAN prefixes now %s (were %s)",
                         ", ".join(map(str, rules.internal_networks)) or "none",
                         ", ".join(map(str, current.internal_networks)) or "none")  # fmt: skip
            try:
                await self.pinholes.readdress(rules, now=time.monotonic())
            except PinholeCommitError as error:
                log.error("could not follow the IPv6 prefix change: %s", error)
                return
            if self.pcp6 is not None:
                self.pcp6.lan = rules.internal_networks
        # UPnP over IPv6 serves the LAN's current addresses: a stale LOCATION is a dead URL.
        lan6 = internal_interfaces6(self.config.internal_interfaces, rules.internal_networks)
        if lan6 != self.lan6:
            # An address still tentative (RFC 4862 §5.4) cannot be bound: kept as not done,
            # so the next look (every address_poll_interval) tries it again.
            if self.upnp is not None and not await self.upnp.readdress6(lan6):
                return
            log.info("UPnP over IPv6 now at %s (was %s)",
                     ", ".join(str(i.address) for i in lan6) or "none",
                     ", ".join(str(i.address) for i in self.lan6) or "none")  # fmt: skip
            self.lan6 = lan6

    def own_addresses6(self) -> frozenset[IPv6Address]:
        """The gateway's own IPv6 addresses: never a pinhole's target."""
        names = [*self.config.internal_interfaces, self.config.external_interface]
        return frozenset(entry.ip for name in names for entry in ipv6_interfaces(name))

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop cleanly."""
        try:
            await self.start()
        except BaseException:
            self.store.close()
            self.lock.release()
            raise
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.shutdown)
        loop.add_signal_handler(signal.SIGINT, self.shutdown)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self.service.run_committer()),
                group.create_task(self.service.run_expiry()),
                group.create_task(self._watch_address()),
                group.create_task(self.backend.watch(self._restore_kernel)),
                group.create_task(self.pxp.announce()),
                group.create_task(self.pxp.run()),
            ]
            if self.upnp is not None:
                tasks.append(group.create_task(self.upnp.run()))
            if self.audit is not None:
                tasks.append(group.create_task(self.audit.follow(self._audited)))
            if self.upstream is not None:
                tasks.append(group.create_task(self.upstream.run(self.service)))
            if self.pinholes is not None:
                tasks.append(group.create_task(self.pinholes.run_expiry()))
                tasks.append(group.create_task(self.pinholes.watch_kernel()))
            log.info(
                "igd-server ready: %d mappings, epoch %d",
                self.service.count(),
                self.service.epoch(),
            )
            settle_heap()
            ready(f"serving {self.service.count()} mappings")
            await self._stop.wait()
            log.info("stopping")
            stopping()
            self.pxp.close()
            if self.pcp6 is not None:
                self.pcp6.close()
            for task in (*tasks, *self._side_tasks):
                task.cancel()
        await self.stop()

    def shutdown(self) -> None:
        """Ask a running daemon to stop (what SIGTERM does)."""
        self._stop.set()

    def ports(self) -> list[Port]:
        """Every socket the daemon binds, as `start` will bind it."""
        ports = [
            # Exclusive: any other NAT-PMP/PCP server on the LAN side is a conflict, even one
            # that, like us, sets SO_REUSEADDR.
            Port(socket.SOCK_DGRAM, "0.0.0.0", PXP_PORT, i.name, False, "NAT-PMP/PCP")
            for i in self.interfaces
        ]
        if self.upnp is not None:
            for i in self.interfaces:
                port = self.config.upnp_http_port
                ports.append(Port(socket.SOCK_STREAM, str(i.address), port, i.name, True, "UPnP"))
                ports.append(Port(socket.SOCK_DGRAM, "0.0.0.0", SSDP_PORT, i.name, True, "SSDP"))
            for six in self.lan6:
                port = self.config.upnp_http_port
                ports.append(Port(socket.SOCK_STREAM, str(six.address), port, six.name, True,
                                  "UPnP over IPv6"))  # fmt: skip
                ports.append(Port(socket.SOCK_DGRAM, "::", SSDP_PORT, six.name, True,
                                  "SSDP over IPv6"))  # fmt: skip
        return ports

    async def start(self) -> None:
        """Check the ports, restore leases, reconcile the kernel, open sockets."""
        if self.admin is not None:
            # First: a listener that cannot open changes nothing, and its metrics and
            # console follow the feed before any request is served.
            await self.admin.start()
        check_ports(self.ports())
        self.external.refresh()
        self.service.set_own_addresses(self.own_addresses())
        await self.backend.open()
        await self.backend.set_destinations(self.destinations())
        started = time.perf_counter()
        now = time.monotonic()
        clock = Clock(mono=now)
        persisted = self.store.load(clock, now=now)
        # Leases granted under another policy file are checked against this one.
        recheck = self.policy if self.store.get_meta(POLICY_KEY) != self.policy_digest else None
        dropped, refused = self.service.restore(persisted, recheck=recheck, now=now)
        self.store.set_meta(POLICY_KEY, self.policy_digest)
        report = await self.service.reconcile(now=now, audit_limit=AUDIT_LIMIT)
        release_free_heap()
        kernel = (
            f"{len(report.removed)} orphans removed, {len(report.added)} entries re-added"
            if report.audited
            else f"table replaced with {self.service.count()} entries (not read first at this size)"
        )
        log.info(
            "restored %d of %d persisted mappings in %.3f s (%d dropped, %d refused by the"
            " policy); kernel: %s",
            self.service.count(),
            len(persisted),
            time.perf_counter() - started,
            len(dropped),
            len(refused.removed),
            kernel,
        )
        last_address = self.store.get_meta(ADDRESS_KEY)
        same_address = last_address == str(self.external.current)
        self.service.restore_epoch(kept_mappings=bool(self.service.count()) and same_address)
        self.store.set_meta(ADDRESS_KEY, str(self.external.current))
        await self.pxp.start()
        if self.pinholes is not None and self.pcp6 is not None:
            await self.pinholes.restore(now=time.monotonic())
            await self.pcp6.start()
        if self.upnp is not None:
            await self.upnp.start()
        await self.control.start()

    async def stop(self) -> None:
        """Close sockets; keep or flush kernel entries as configured."""
        if self.upnp is not None:
            await self.upnp.stop()
        await self.control.close()
        if self.upstream is not None:
            await self.upstream.close()
        if self.admin is not None:
            await self.admin.stop()
        flush = self.config.flush_on_stop
        await self.backend.close(flush=flush)
        if self.pinholes is not None:
            await self.pinholes.stop(flush=flush)
        if flush:
            self.store.clear()
            log.info('flushed all mappings (nftables.on_stop = "flush")')
        else:
            log.info("kept %d mappings in the kernel and the lease store", self.service.count())
        self.store.close()
        self.lock.release()

    async def reload(self) -> None:
        """SIGHUP: reopen the audit log, load the policy file again; keep the old policy if
        the new one is invalid."""
        try:
            await self.reload_checked()
        except (PolicyFileError, OSError) as error:
            log.error("policy reload failed; keeping the current policy: %s", error)

    async def reload_checked(self) -> dict[str, Any]:
        """What SIGHUP does, raising PolicyFileError or OSError (`igd-server reload`)."""
        reloading()
        try:
            await self.reopen_logs()
            return await self.reload_policy()
        finally:
            settle_heap()
            ready(f"serving {self.service.count()} mappings")

    async def reload_policy(self) -> dict[str, Any]:
        """Load the policy file again (PolicyFileError or OSError: the old policy stays)."""
        digest = file_digest(self.config.policy_file)
        policy = Policy.load(self.config.policy_file)
        issues = policy.address_issues(self.config.external_addresses)
        if issues:
            raise PolicyFileError(issues)
        for warning in policy.warnings(wall=time.time()):
            log.warning("policy %s", warning)
        self.policy = policy
        change = await self.service.reload(policy)
        if self.pinholes is not None:
            await self.pinholes.set_policy(policy, now=time.monotonic())
        self.policy_digest = digest
        self.policy_loaded = time.time()
        self.store.set_meta(POLICY_KEY, digest)
        log.info(
            "policy reloaded from %s: %d rules, %d forwards; %d mappings removed, %d forward"
            " entries installed",
            self.config.policy_file,
            len(policy.rules),
            len(policy.forwards),
            len(change.removed),
            len(change.added),
        )
        return {
            "policy": str(self.config.policy_file),
            "sha256": digest,
            "rules": len(policy.rules),
            "forwards": len(policy.forwards),
            "removed": [mapping_row(m, time.monotonic()) for m in change.removed],
        }

    async def reopen_logs(self) -> None:
        """Reopen the audit log (logrotate renamed it; SIGHUP or `igd-server reload`)."""
        if self.audit is not None:
            await self.audit.reopen()

    async def list_mappings(self) -> list[dict[str, Any]]:
        """The current mappings with their traffic, for `igd-server list`."""
        try:
            counts = await self.backend.counters()
        except BackendError as error:
            log.error("cannot read the traffic counters: %s", error)
            counts = {}
        now = time.monotonic()
        rows = []
        for m in self.service.mappings():
            packets, octets = counts.get(m.key, (0, 0))
            rows.append(
                mapping_row(m, now)
                | {
                    # Behind a double NAT: where the Internet reaches it (server/upstream.py).
                    "public": self.upstream.endpoint(m) if self.upstream is not None else None,
                    "packets": packets,
                    "bytes": octets,
                }
            )
        return rows

    def list_pinholes(self) -> list[dict[str, Any]]:
        """The open IPv6 pinholes, for the control socket's `pinholes` command."""
        if self.pinholes is None:
            return []
        now = time.monotonic()
        return [pinhole_row(h, now) for h in self.pinholes.pinholes()]

    def status(self) -> dict[str, Any]:
        """A summary for `igd-server status`."""
        by_mechanism = Counter(str(m.owner.mechanism) for m in self.service.mappings())
        return {
            "version": igd.__version__,
            "uptime": round(time.monotonic() - self.started),
            "external_address": str(self.external.current) if self.external.current else None,
            # None: [ipv6] is off.
            "pinholes": self.pinholes.count() if self.pinholes is not None else None,
            "external_addresses": [str(a) for a in self.config.external_addresses],
            "epoch": self.service.epoch(),
            "mappings": self.service.count(),
            "by_mechanism": dict(sorted(by_mechanism.items())),
            "policy": str(self.config.policy_file),
            "policy_sha256": self.policy_digest,
            "policy_loaded": timestamp(self.policy_loaded),
            "rules": len(self.policy.rules),
            "kernel_restores": self.kernel_restores,
            "pinhole_kernel_restores": (
                self.pinholes.kernel_restores if self.pinholes is not None else None
            ),
            "upstream": self.upstream.status() if self.upstream is not None else None,
            "audit_file": str(self.config.audit_file) if self.config.audit_file else None,
        }

    def own_addresses(self) -> frozenset[IPv4Address]:
        """Every address of the gateway's own: on its interfaces, and network.external_addresses."""
        names = [*self.config.internal_interfaces, self.config.external_interface]
        found = {entry.ip for name in names for entry in ipv4_interfaces(name)}
        found |= {iface.address for iface in self.interfaces}
        if self.external.current is not None:
            found.add(self.external.current)
        return frozenset(found | set(self.config.external_addresses))

    def destinations(self) -> frozenset[IPv4Address]:
        """The addresses the WAN reaches the gateway's default address at: the external
        interface's own (all of them, vetted or not, but network.external_addresses, which
        have mappings of their own), the reported override, and the configured extras."""
        found = {a.ip for a in ipv4_interfaces(self.config.external_interface)}
        if self.config.external_address is not None:
            found.add(self.config.external_address)
        found |= set(self.config.extra_external_addresses)
        return frozenset(found - set(self.config.external_addresses))

    def _admin_server(self) -> AdminServer:
        """The web console and /metrics; AdminListenError if its address is reachable from
        the WAN or not the gateway's loopback or LAN address."""
        config = self.config
        address, _ = config.admin_listen
        external = (
            self.destinations()
            | set(config.external_addresses)
            | {entry.ip for entry in ipv4_interfaces(config.external_interface)}
        )
        internal = {
            name: frozenset(entry.ip for entry in ipv4_interfaces(name))
            for name in config.internal_interfaces
        }
        return AdminServer(
            self.service,
            listen=config.admin_listen,
            policy=lambda: self.policy,
            external=lambda: self.external.current,
            password_hash=config.admin_password_hash,
            names=config.admin_names,
            device=listener_device(address, internal, external),
        )

    def _refresh_host_ports(self, now: float) -> None:
        # Read at request time (at most every hostports.MAX_AGE s): a port the gateway
        # serves on its external address is never handed to a LAN host.
        self.service.set_host_ports(self.host_ports.current(now=now))

    async def _watch_address(self) -> None:
        while True:
            await asyncio.sleep(self.config.address_poll_interval)
            try:
                # The DNAT rule follows the external address (one small set, not per mapping).
                await self.backend.set_destinations(self.destinations())
            except BackendError as error:
                log.error("cannot update the DNAT destination addresses: %s", error)
            await self._readdress6()
            previous = self.external.current
            changed = self.external.refresh()
            try:
                await self.service.readdress(self.own_addresses())
            except BackendError as error:
                log.error("could not remove mappings after an address change: %s", error)
            if changed:
                # RFC 6887 §8.5: a new external address starts a new epoch; the service tells
                # its subscribers (RFC 6886 §3.2.1 announcements, §14.2 Mapping Update, GENA).
                self.store.set_meta(ADDRESS_KEY, str(self.external.current))
                self.service.address_changed(previous, self.external.current)

    def _kernel_restores(self) -> dict[str, int]:
        """Restores per kernel table, for the metrics."""
        counts = {f"ip {self.config.nftables_table}": self.kernel_restores}
        if self.pinholes is not None:
            counts[f"ip6 {self.config.ipv6.nftables_table}"] = self.pinholes.kernel_restores
        return counts

    async def _restore_kernel(self, reason: str) -> None:
        # Another program removed (part of) our table: a firewall reload or `nft flush
        # ruleset`. Recreate it from the mapping table in memory (the truth: no store read,
        # no policy run), forwarding first, counters after.
        started = time.perf_counter()
        forwarding: list[float] = []
        self.kernel_restores += 1
        log.warning("nftables: %s; restoring table and mappings", reason)
        try:
            wanted = list(self.service.mappings())
            await self.backend.restore(
                wanted,
                now=self.service.now(),
                forwarding=lambda: forwarding.append(time.perf_counter() - started),
            )
        except BackendError as error:
            log.error("could not restore the nftables table: %s", error)
            return
        log.warning(
            "nftables table restored with %d mappings in %.0f ms, forwarding after %.0f ms"
            " (restore %d since start)",
            len(wanted),
            (time.perf_counter() - started) * 1000,
            (forwarding[0] if forwarding else float("nan")) * 1000,
            self.kernel_restores,
        )

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
