"""GENA headers: callbacks (CallStranger), timeouts, SEQ wrap, property sets."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from igd.proto import gena
from igd.proto.errors import DecodeError
from tests.strategies import tricky_text


def test_callbacks_parse_in_order() -> None:
    assert gena.parse_callbacks("<http://a/1><http://b/2>") == ["http://a/1", "http://b/2"]
    for bad in ("", "http://a/", "<http://a/> junk"):
        with pytest.raises(DecodeError):
            gena.parse_callbacks(bad)


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("http://192.168.1.10:49152/evt", ("192.168.1.10", 49152, "/evt")),
        ("http://192.168.1.10/", ("192.168.1.10", 80, "/")),
        ("https://192.168.1.10/", None),
        ("http://router.example/", None),
        ("http://user@192.168.1.10/", None),
        ("http://192.168.001.010/", None),
        ("http://[::1]/", None),
        ("http://192.168.1.10:99999/", None),
    ],
)
def test_callback_targets_are_literal_ipv4_http_only(
    url: str, target: tuple[str, int, str] | None
) -> None:
    found = gena.callback_target(url)
    if target is None:
        assert found is None
    else:
        assert found == gena.CallbackTarget(IPv4Address(target[0]), target[1], target[2])


def test_timeouts() -> None:
    assert gena.parse_timeout(None) == 1800
    assert gena.parse_timeout("Second-60") == 1800
    assert gena.parse_timeout("second-3600") == 3600
    assert gena.parse_timeout("Second-infinite") == 1800
    assert gena.parse_timeout("Second-99999999") == gena.MAX_TIMEOUT
    with pytest.raises(DecodeError):
        gena.parse_timeout("forever")


def test_seq_wraps_to_one() -> None:
    assert gena.next_seq(0) == 1 and gena.next_seq(0xFFFFFFFF) == 1


def test_propertyset_round_trip_with_escaping() -> None:
    body = gena.encode_propertyset([("A", "<&>"), ("PortMappingNumberOfEntries", "3")])
    assert gena.decode_propertyset(body) == {"A": "<&>", "PortMappingNumberOfEntries": "3"}


@pytest.mark.fuzz
@given(
    st.one_of(
        tricky_text,
        st.lists(tricky_text, max_size=4).map(lambda urls: "".join(f"<{u}>" for u in urls)),
        tricky_text.map(lambda t: f"<http://192.168.1.10:{t}/>"),
        tricky_text.map(lambda t: f"<http://{t}/>"),
    )
)
def test_callback_headers_raise_only_decode_error(header: str) -> None:
    try:
        urls = gena.parse_callbacks(header)
    except DecodeError:
        return
    for url in urls:
        target = gena.callback_target(url)  # None or a literal address: never an exception
        assert target is None or 0 <= target.port <= 65535


@pytest.mark.fuzz
@given(st.one_of(tricky_text, tricky_text.map(lambda t: f"Second-{t}")))
def test_timeout_headers_raise_only_decode_error(header: str) -> None:
    try:
        seconds = gena.parse_timeout(header)
    except DecodeError:
        return
    assert gena.MIN_TIMEOUT <= seconds <= gena.MAX_TIMEOUT


@pytest.mark.fuzz
@given(st.one_of(st.binary(max_size=300), tricky_text.map(str.encode)))
def test_event_bodies_raise_only_decode_error(body: bytes) -> None:
    try:
        gena.decode_propertyset(body)
    except DecodeError:
        pass
