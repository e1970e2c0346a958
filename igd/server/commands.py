"""The admin's commands on the control socket (igd/server/control.py): list, status, delete,
flush and reload, each checking its arguments and acting through the service's door.

Removals go through `Service.delete`/`Service.flush`, so they reach the kernel and the lease
store before the answer, are logged, and are published as `MappingRemoved(cause=ADMIN)` like
any other removal (GENA subscribers and the audit log see them).
"""

from __future__ import annotations

import logging
import time
from ipaddress import AddressValueError, IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any

from igd.events import RemovalCause
from igd.model import REQUESTED, Mapping, MappingKey, Mechanism, Protocol, RemoteFilter
from igd.pinhole import Pinhole
from igd.policy import PolicyFileError
from igd.server.backends import BackendError
from igd.server.control import Command, CommandError
from igd.server.pinholes import CommitError as PinholeCommitError

if TYPE_CHECKING:
    from igd.server.daemon import Daemon

log = logging.getLogger("igd.control")


def mapping_row(mapping: Mapping, now: float) -> dict[str, Any]:
    """One mapping as `igd-server list --json` shows it."""
    return {
        "protocol": str(mapping.protocol),
        "external_port": mapping.external_port,
        "remote_host": str(mapping.key.remote_host) if mapping.key.remote_host else None,
        "internal_address": str(mapping.internal_address),
        "internal_port": mapping.internal_port,
        "lease_remaining": mapping.remaining(now),
        "mechanism": str(mapping.owner.mechanism),
        "client": str(mapping.owner.client),
        "description": mapping.description,
        "remote_sources": [_source(f) for f in mapping.filters],
        # None: the default external address (what GetExternalIPAddress and NAT-PMP say).
        "external_address": str(mapping.external_address) if mapping.external_address else None,
    }


def pinhole_row(hole: Pinhole, now: float) -> dict[str, Any]:
    """One pinhole as `igd-server list --pinholes --json` shows it."""
    return {
        "internal_address": str(hole.key.internal_address),
        "protocol": str(hole.key.protocol),
        "internal_port": hole.key.internal_port,
        "remote": [f"{f.network} port {f.port or 'any'}" for f in hole.admits],
        "lease_remaining": hole.remaining(now),
        "mechanism": str(hole.owner.mechanism),
        "client": str(hole.owner.client),
        "description": hole.description,
    }


def _source(remote: RemoteFilter) -> str:
    """A FILTER as text: the network, and its port when one is named."""
    return str(remote.network) + (f" port {remote.port}" if remote.port else "")


def admin_commands(daemon: Daemon) -> dict[str, Command]:
    """The control socket's commands for this daemon."""
    service = daemon.service

    async def listing(args: dict[str, Any]) -> Any:
        _no_args(args, ())
        return await daemon.list_mappings()

    async def status(args: dict[str, Any]) -> Any:
        _no_args(args, ())
        return daemon.status()

    async def delete(args: dict[str, Any]) -> Any:
        _no_args(args, ("protocol", "external_port", "remote_host", "external_address"))
        key = MappingKey(
            _protocol(args.get("protocol")),
            _port(args.get("external_port")),
            _address(args.get("remote_host"), "remote_host"),
            _address(args.get("external_address"), "external_address"),
        )
        held = service.holder(key)
        if held is not None and held.is_static:
            raise CommandError(
                f"{key.protocol} {key.external_port} is a static forward of the policy file:"
                " remove it there and reload"
            )
        try:
            mapping = await service.delete(key)
        except BackendError as error:
            raise CommandError(
                f"not deleted (the kernel or the lease store refused): {error}"
            ) from None
        if mapping is None:
            remote = f" from {key.remote_host}" if key.remote_host else ""
            raise CommandError(f"no mapping {key.protocol} {key.external_port}{remote}")
        log.info("admin deleted %s %d", key.protocol, key.external_port)
        return mapping_row(mapping, time.monotonic())

    async def flush(args: dict[str, Any]) -> Any:
        _no_args(args, ("client", "mechanism"))
        client = _address(args.get("client"), "client")
        mechanism = _mechanism(args.get("mechanism"))
        now = time.monotonic()
        try:
            change = await service.flush(client=client, mechanism=mechanism)
        except BackendError as error:
            raise CommandError(
                f"nothing flushed (the kernel or the lease store refused): {error}"
            ) from None
        log.info(
            "admin flushed %d mappings (client %s, mechanism %s)",
            len(change.removed),
            client or "any",
            mechanism or "any",
        )
        return {"removed": [mapping_row(m, now) for m in change.removed]}

    async def reload(args: dict[str, Any]) -> Any:
        _no_args(args, ())
        try:
            return await daemon.reload_checked()
        except PolicyFileError as error:
            log.error("policy reload failed; keeping the current policy: %s", error)
            raise CommandError(
                f"policy not reloaded; keeping the current policy:\n{error}"
            ) from None
        except OSError as error:
            log.error("policy reload failed; keeping the current policy: %s", error)
            raise CommandError(
                f"policy not reloaded; keeping the current policy: {error}"
            ) from None

    async def pinholes(args: dict[str, Any]) -> Any:
        _no_args(args, ())
        return daemon.list_pinholes()

    async def delete_pinhole(args: dict[str, Any]) -> Any:
        _no_args(args, ("protocol", "internal_address", "internal_port"))
        protocol = _protocol(args.get("protocol"))
        port = _port(args.get("internal_port"), "internal port")
        address = _address6(args.get("internal_address"))
        if daemon.pinholes is None:
            raise CommandError("IPv6 pinholes are off ([ipv6] enabled = false)")
        # Every pinhole to this internal endpoint, whatever remote host it admits.
        holes = [
            h
            for h in daemon.pinholes.pinholes()
            if (h.key.internal_address, h.key.protocol, h.key.internal_port)
            == (address, protocol, port)
        ]
        if not holes:
            raise CommandError(f"no pinhole {protocol} [{address}]:{port}")
        now = time.monotonic()
        try:
            await daemon.pinholes.remove([h.key for h in holes], cause=RemovalCause.ADMIN, now=now)
        except PinholeCommitError as error:
            raise CommandError(
                f"not deleted (the kernel or the lease store refused): {error}"
            ) from None
        log.info("admin deleted pinhole %s [%s]:%d", protocol, address, port)
        return {"removed": [pinhole_row(h, now) for h in holes]}

    return {
        "list": listing,
        "pinholes": pinholes,
        "delete-pinhole": delete_pinhole,
        "status": status,
        "delete": delete,
        "flush": flush,
        "reload": reload,
    }


def _no_args(args: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        shown = ", ".join(repr(name[:40]) for name in unknown[:5])
        takes = ", ".join(allowed) if allowed else "nothing"
        raise CommandError(f"unknown argument {shown} (this command takes {takes})")


def _protocol(value: object) -> Protocol:
    if isinstance(value, str) and value.lower() in ("tcp", "udp"):
        return Protocol(value.lower())
    raise CommandError(f"protocol: want tcp or udp, not {_show(value)}")


def _port(value: object, name: str = "external port") -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise CommandError(f"{name}: want 1-65535, not {_show(value)}")


def _address6(value: object) -> IPv6Address:
    if isinstance(value, str):
        try:
            return IPv6Address(value)
        except ValueError:
            pass
    raise CommandError(f"internal address: want an IPv6 address, not {_show(value)}")


def _address(value: object, name: str) -> IPv4Address | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return IPv4Address(value)
        except AddressValueError:
            pass
    raise CommandError(f"{name}: want an IPv4 address, not {_show(value)}")


def _mechanism(value: object) -> Mechanism | None:
    if value is None:
        return None
    # Static forwards are the policy file's: no flush removes them.
    names = [str(m) for m in REQUESTED]
    if isinstance(value, str) and value.lower() in names:
        return Mechanism(value.lower())
    raise CommandError(f"mechanism: want {', '.join(names)}, not {_show(value)}")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."
