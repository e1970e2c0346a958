"""A UPnP gateway on loopback for server tests: the real service, memory backend, lease store."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import aiohttp

from igd.gateway import Gateway
from igd.policy import Policy
from igd.proto import soap
from igd.proto.description import ServiceKind, service_type
from igd.proto.soap import SoapFault, SoapRequest, SoapResponse
from igd.server.backends.memory import MemoryBackend
from igd.server.interfaces import ExternalAddress, InternalInterface
from igd.server.pxp import RateLimiter
from igd.server.service import Service
from igd.server.store import LeaseStore
from igd.server.upnp import UpnpServer

LOOPBACK = InternalInterface("lo", IPv4Address("127.0.0.1"), (IPv4Network("127.0.0.0/8"),))
CLIENT = IPv4Address("127.0.0.1")
OTHER = IPv4Address("127.0.0.2")
POLICY = """
[defaults]
action = "deny"
max_lease = 3600
min_lease = 2
max_mappings_per_client = 4
[[rules]]
name = "no telnet"
action = "deny"
internal_ports = "23"
[[rules]]
name = "loopback"
action = "allow"
clients = ["127.0.0.0/8"]
external_ports = "1024-65535"
"""
WAN_IP = ServiceKind.WAN_IP_CONNECTION


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Rig:
    """The gateway and an HTTP session that talks to it like a control point."""

    service: Service
    backend: MemoryBackend
    external: ExternalAddress
    upnp: UpnpServer
    port: int
    session: aiohttp.ClientSession

    @classmethod
    def make(
        cls,
        tmp: Path,
        policy: str = POLICY,
        igd_version: int | None = None,
        limiter: RateLimiter | None = None,
    ) -> Rig:
        backend = MemoryBackend()
        store = LeaseStore(tmp / "leases.sqlite")
        service = Service(Gateway(Policy.parse(policy)), backend, store)
        external = ExternalAddress("lo", override=IPv4Address("198.51.100.7"), allow_private=True)
        external.refresh()
        port = free_port()
        upnp = UpnpServer(
            service,
            external,
            [LOOPBACK],
            external_interface="lo",
            http_port=port,
            igd_version=igd_version,
            store=store,
            limiter=limiter,
        )
        return cls(service, backend, external, upnp, port, aiohttp.ClientSession())

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, version: int, role: str, kind: ServiceKind = WAN_IP) -> str:
        urls = self.upnp.urls[version]
        path = {"control": urls.control, "event": urls.event, "scpd": urls.scpd}[role](kind)
        return self.base + path

    async def call(
        self,
        action: str,
        version: int = 2,
        kind: ServiceKind = WAN_IP,
        *,
        header_version: int | None = None,
        source: str = "127.0.0.1",
        **arguments: object,
    ) -> SoapResponse | SoapFault:
        """Invoke an action; the response or the fault (HTTP 500)."""
        kind_version = version if kind is WAN_IP else 1
        stype = service_type(kind, header_version or kind_version)
        if action == soap.QUERY_STATE_VARIABLE:
            stype = soap.CONTROL_NS
        body = soap.encode_request(
            SoapRequest(stype, action, tuple((k, str(v)) for k, v in arguments.items()))
        )
        headers = {
            "SOAPACTION": soap.soap_action_header(stype, action),
            "Content-Type": 'text/xml; charset="utf-8"',
        }
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(self.url(version, "control", kind), data=body, headers=headers) as reply,
        ):
            data = await reply.read()
        decoded = soap.decode_response(data)
        assert (reply.status == 500) == isinstance(decoded, SoapFault), reply.status
        return decoded

    async def close(self) -> None:
        await self.session.close()
        await self.upnp.stop()


def add_args(port: int, internal: str = "127.0.0.1", **overrides: object) -> dict[str, object]:
    """AddPortMapping arguments for a TCP mapping of `port` to the same internal port."""
    args: dict[str, object] = {
        "NewRemoteHost": "",
        "NewExternalPort": port,
        "NewProtocol": "TCP",
        "NewInternalPort": port,
        "NewInternalClient": internal,
        "NewEnabled": 1,
        "NewPortMappingDescription": "test",
        "NewLeaseDuration": 600,
    }
    args.update(overrides)
    return args
