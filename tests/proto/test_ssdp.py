"""SSDP: tolerant M-SEARCH parsing, which targets answer, lower versions echoed, messages."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from igd.proto import ssdp
from igd.proto.description import DeviceTree
from igd.proto.errors import DecodeError
from tests.strategies import tricky_text

UUID = "3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b"
TREE2 = DeviceTree.build(UUID, 2)
TREE1 = DeviceTree.build(UUID, 1)
IGD = "urn:schemas-upnp-org:device:InternetGatewayDevice:{}"
WANIP = "urn:schemas-upnp-org:service:WANIPConnection:{}"


def test_tolerant_parsing_of_a_terse_search() -> None:
    search = ssdp.decode_search(
        b'M-SEARCH * HTTP/1.1\r\nHOST:239.255.255.250:1900\r\nman:"ssdp:discover"\r\n'
        b"st:upnp:rootdevice\r\nMx:  3 \r\n\r\n"
    )
    assert (search.target, search.mx, search.multicast) == ("upnp:rootdevice", 3, True)


def test_search_without_mx_and_unicast_search() -> None:
    search = ssdp.decode_search(
        ssdp.encode_search("ssdp:all", mx=None).replace(
            b"239.255.255.250:1900", b"192.168.1.1:1900"
        )
    )
    assert search.mx is None and not search.multicast


@pytest.mark.parametrize(
    "data",
    [
        b"NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n\r\n",
        b"M-SEARCH * HTTP/1.1\r\nST: ssdp:all\r\nMX: 1\r\n\r\n",  # no MAN
        b'M-SEARCH * HTTP/1.1\r\nMAN: "ssdp:discover"\r\nMX: 1\r\n\r\n',  # no ST
        b'M-SEARCH * HTTP/1.1\r\nMAN: "ssdp:discover"\r\nST: a\r\nMX: -1\r\n\r\n',
        # Unicode digits pass str.isdigit() (and "\u0663" even int()); MX is ASCII digits.
        'M-SEARCH * HTTP/1.1\r\nMAN: "ssdp:discover"\r\nST: a\r\nMX: \u00b2\r\n\r\n'.encode(),
        'M-SEARCH * HTTP/1.1\r\nMAN: "ssdp:discover"\r\nST: a\r\nMX: \u0663\r\n\r\n'.encode(),
        b"\xff\xfe",
    ],
)
def test_what_is_not_a_search(data: bytes) -> None:
    with pytest.raises(DecodeError):
        ssdp.decode_search(data)


@pytest.mark.fuzz
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    try:
        ssdp.decode_search(data)
    except DecodeError:
        pass


SEARCH = {"HOST": ssdp.HOST, "MAN": '"ssdp:discover"', "ST": "ssdp:all", "MX": "1"}


@pytest.mark.fuzz
@given(
    # A valid search with some of its header values replaced (arbitrary bytes above seldom
    # get as far as the values).
    st.fixed_dictionaries({}, optional={name: tricky_text for name in [*SEARCH, "USER-AGENT"]}),
    st.sampled_from(["\r\n", "\n"]),
)
@example({"MX": "\u00b2"}, "\r\n")  # passed str.isdigit(), then int() raised ValueError
def test_searches_with_arbitrary_header_values_raise_only_decode_error(
    headers: dict[str, str], newline: str
) -> None:
    lines = ["M-SEARCH * HTTP/1.1"] + [f"{k}: {v}" for k, v in (SEARCH | headers).items()]
    try:
        search = ssdp.decode_search((newline.join(lines) + newline * 2).encode())
    except DecodeError:
        return
    # What the responder does next with a decoded search must not raise either.
    assert search.mx is None or (0 <= search.mx < 10**6)
    for tree in (TREE1, TREE2):
        ssdp.search_answers(search.target, tree)
        ssdp.asks_lower_version(search.target, tree)


def test_advertisement_set_is_3_plus_2d_plus_k() -> None:
    assert len(ssdp.advertisement_set(TREE2)) == 3 + 2 * 2 + 3
    assert len(ssdp.search_answers("ssdp:all", TREE2)) == 10


def test_lower_versions_are_answered_with_the_version_asked() -> None:
    [answer] = ssdp.search_answers(IGD.format(1), TREE2)
    assert answer.target == IGD.format(1)
    assert answer.usn == f"uuid:{UUID}::{IGD.format(1)}"
    assert ssdp.asks_lower_version(IGD.format(1), TREE2)
    assert ssdp.asks_lower_version(WANIP.format(1), TREE2)
    assert not ssdp.asks_lower_version(IGD.format(2), TREE2)
    assert ssdp.search_answers(IGD.format(3), TREE2) == []
    assert ssdp.search_answers(IGD.format(2), TREE1) == []
    assert ssdp.search_answers(WANIP.format(2), TREE2)[0].usn.startswith(TREE2.connection.udn)
    assert ssdp.search_answers(f"uuid:{UUID}", TREE2)[0].usn == f"uuid:{UUID}"
    assert ssdp.search_answers("urn:example-com:device:Thing:1", TREE2) == []


def test_response_and_notify_headers() -> None:
    adv = ssdp.Advertising(
        "http://192.168.1.1:5000/x/igd2/desc.xml", "Linux/6 UPnP/1.1 igd/1", 7, 42
    )
    [root] = ssdp.search_answers("upnp:rootdevice", TREE2)
    start, headers = ssdp.decode_message(ssdp.encode_search_response(root, adv, "today"))
    assert start == "HTTP/1.1 200 OK"
    assert headers["EXT"] == "" and headers["BOOTID.UPNP.ORG"] == "7"
    assert headers["CONFIGID.UPNP.ORG"] == "42" and headers["CACHE-CONTROL"] == "max-age=1800"
    _, alive = ssdp.decode_message(ssdp.encode_notify(root, ssdp.ALIVE, adv))
    assert alive["NTS"] == "ssdp:alive" and alive["LOCATION"] == adv.location
    _, bye = ssdp.decode_message(ssdp.encode_notify(root, ssdp.BYEBYE, adv))
    assert bye["NTS"] == "ssdp:byebye" and "LOCATION" not in bye
