"""GENA headers: callbacks (CallStranger), timeouts, SEQ wrap, property sets."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from igd.proto import gena
from igd.proto.errors import DecodeError


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
