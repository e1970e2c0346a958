"""UPnP pieces that need no router: port choice and the GetListOfPortMappings document."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from igd.client.errors import ProtocolError
from igd.client.upnp import choose_port, parse_port_listing
from tests.strategies import tricky_text

LISTING = """<?xml version="1.0" encoding="UTF-8"?>
<p:PortMappingList xmlns:p="urn:schemas-upnp-org:gw:WANIPConnection"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<p:PortMappingEntry><p:NewRemoteHost></p:NewRemoteHost><p:NewExternalPort>8080</p:NewExternalPort>
<p:NewProtocol>TCP</p:NewProtocol><p:NewInternalPort>80</p:NewInternalPort>
<p:NewInternalClient>192.168.77.10</p:NewInternalClient><p:NewEnabled>1</p:NewEnabled>
<p:NewDescription>web</p:NewDescription><p:NewLeaseTime>600</p:NewLeaseTime>
</p:PortMappingEntry></p:PortMappingList>"""


FIELDS = (
    "NewRemoteHost",
    "NewExternalPort",
    "NewProtocol",
    "NewInternalPort",
    "NewInternalClient",
    "NewEnabled",
    "NewDescription",
    "NewLeaseTime",
)


def test_parse_port_listing() -> None:
    [entry] = parse_port_listing(LISTING)
    assert (entry.external_port, entry.protocol, entry.internal_port) == (8080, "tcp", 80)
    assert (entry.internal_client, entry.description, entry.lease) == ("192.168.77.10", "web", 600)
    assert parse_port_listing("") == []


def test_parse_port_listing_refuses_entities() -> None:
    bomb = '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>'
    with pytest.raises(ProtocolError):
        parse_port_listing(bomb)


def test_no_low_or_zero_external_port_unless_asked() -> None:
    rng = random.Random(1)
    assert choose_port(8080, None, rng) == 8080
    assert all(choose_port(80, None, rng) >= 1024 for _ in range(200))
    assert choose_port(80, 80, rng) == 80  # asked for explicitly


@pytest.mark.fuzz
@given(st.dictionaries(st.sampled_from(FIELDS), tricky_text), st.text(max_size=80))
def test_port_listings_raise_only_protocol_error(fields: dict[str, str], junk: str) -> None:
    entry = "".join(f"<{name}>{value}</{name}>" for name, value in fields.items())
    for text in (
        f"<PortMappingList><PortMappingEntry>{entry}</PortMappingEntry></PortMappingList>",
        junk,
    ):
        try:
            parse_port_listing(text)
        except ProtocolError:
            pass
