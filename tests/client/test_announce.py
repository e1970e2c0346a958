"""Announcements the client listens for: SSDP NOTIFY parsing, and a BOOTID change that
re-creates UPnP mappings (the same device only, once per restart)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from igd.client.announce import SsdpNotify, parse_announcement, parse_notify
from igd.client.mapper import PortMapper
from igd.model import Mechanism
from igd.proto import ssdp
from tests.strategies import tricky_text

ROOT = "uuid:11111111-2222-3333-4444-555555555555"
LOCATION = "http://192.168.77.1:5000/abc/igd2/desc.xml"


def _notify(nts: str, boot_id: int, usn: str = f"{ROOT}::upnp:rootdevice") -> bytes:
    advertising = ssdp.Advertising(LOCATION, "Linux UPnP/1.1 test", boot_id, 7)
    return ssdp.encode_notify(ssdp.SsdpTarget("upnp:rootdevice", usn), nts, advertising)


def test_alive_and_byebye_carry_the_boot_id() -> None:
    alive = parse_notify(_notify(ssdp.ALIVE, 41))
    assert alive == SsdpNotify(ssdp.ALIVE, f"{ROOT}::upnp:rootdevice", 41, LOCATION)
    assert parse_notify(_notify(ssdp.BYEBYE, 42)) == SsdpNotify(
        ssdp.BYEBYE, f"{ROOT}::upnp:rootdevice", 42
    )


def test_update_searches_and_junk_are_not_restarts() -> None:
    # ssdp:update announces NEXTBOOTID: the device has not restarted yet (UDA 1.1 §1.2.4).
    update = _notify(ssdp.ALIVE, 5).replace(b"ssdp:alive", b"ssdp:update")
    assert parse_notify(update) is None
    assert parse_notify(ssdp.encode_search("ssdp:all")) is None
    no_boot = b"NOTIFY * HTTP/1.1\r\nNTS: ssdp:alive\r\nUSN: x\r\n\r\n"
    assert parse_notify(no_boot) is None
    assert parse_notify(b"\xff\xfe") is None


@dataclass
class _Client:
    location: str = LOCATION
    udns: frozenset[str] = frozenset({ROOT, "uuid:wan-device"})


@dataclass
class _Mapping:
    mechanism: Mechanism
    recovered: list[bool] = field(default_factory=list)

    def recover(self, delay: float = 0.0) -> None:
        self.recovered.append(True)


def _mapper(boot_id: int | None) -> tuple[PortMapper, _Mapping, _Mapping]:
    mapper = PortMapper("192.168.77.1", recovery_delay=0.0, listen=False)
    upnp, pcp = _Mapping(Mechanism.UPNP), _Mapping(Mechanism.PCP)
    mapper._upnp, mapper._restarts.boot = _Client(), boot_id  # type: ignore[assignment]
    mapper.mappings = [upnp, pcp]  # type: ignore[list-item]
    return mapper, upnp, pcp


async def _hear(mapper: PortMapper, *messages: bytes) -> None:
    for data in messages:
        notify = parse_notify(data)
        assert notify is not None
        mapper._restarts.notified(notify)
    await asyncio.sleep(0.01)  # the recovery task


def test_new_boot_id_recreates_upnp_mappings_once() -> None:
    async def run() -> tuple[Any, ...]:
        mapper, upnp, pcp = _mapper(boot_id=7)
        await _hear(mapper, _notify(ssdp.ALIVE, 7), _notify(ssdp.ALIVE, 7))
        before = list(upnp.recovered)
        # A restart: byebye then alive, both with the new BOOTID (IGD:2 §1.2).
        await _hear(mapper, _notify(ssdp.BYEBYE, 8), _notify(ssdp.ALIVE, 8))
        return before, upnp.recovered, pcp.recovered, mapper._restarts.boot

    assert asyncio.run(run()) == ([], [True], [], 8)


def test_other_devices_on_the_router_are_ignored_and_a_first_boot_id_is_a_baseline() -> None:
    async def run() -> tuple[Any, ...]:
        mapper, upnp, _ = _mapper(boot_id=None)
        media_server = "uuid:99999999-0000-0000-0000-000000000000::upnp:rootdevice"
        await _hear(mapper, _notify(ssdp.ALIVE, 500, usn=media_server))
        await _hear(mapper, _notify(ssdp.ALIVE, 3))  # no BOOTID in the search reply
        return upnp.recovered, mapper._restarts.boot

    assert asyncio.run(run()) == ([], 3)


@pytest.mark.fuzz
@given(st.binary(max_size=200), tricky_text)
def test_what_the_client_hears_never_raises(data: bytes, boot: str) -> None:
    # The listeners run these in datagram_received: an exception would end in asyncio's log.
    parse_announcement(data)
    parse_notify(data)
    notify = _notify(ssdp.ALIVE, 1).replace(
        b"BOOTID.UPNP.ORG: 1", f"BOOTID.UPNP.ORG: {boot}".encode()
    )
    parsed = parse_notify(notify)
    assert parsed is None or parsed.boot_id >= 0
