"""Random and mutated bytes at the live HTTP server and SSDP socket: no traceback in the log,
and the gateway still answers afterwards. `./dev.sh fuzz` runs it with many more inputs."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator

import pytest
from hypothesis import settings

from igd.proto import soap, ssdp
from igd.server.upnp import http
from igd.server.upnp.ssdp import SsdpResponder
from tests.server.upnp.rig import Rig
from tests.server.upnp.test_ssdp_abuse import searcher, started, unicast

# Inputs per run: the hypothesis profile's example count (100 normally, far more with
# --hypothesis-profile=fuzz), times these factors.
HTTP_PER_EXAMPLE = 2
SSDP_PER_EXAMPLE = 10
INTERESTING = [
    b"",
    b"\x00",
    b"\xc2\xb2",  # "²": str.isdigit() but not int()
    b"\xd9\xa3",  # Arabic-Indic three
    b"-1",
    b"0",
    b"99999999999999999999",
    b"A" * 3000,
    b"%00",
    b"\r\n",
    b"\n\n",
    b"&lol;",
    b'<!DOCTYPE a [<!ENTITY x "y">]>',
    b"]]>",
    b"\xff\xfe",
    b"chunked",
    b"Content-Length: 5",
    b"Transfer-Encoding: chunked",
]


def mutate(rng: random.Random, seed: bytes) -> bytes:
    """One random change or a few to a valid message (or plain random bytes)."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        at = rng.randrange(len(data) + 1)
        if choice == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif choice == 1:
            del data[at:]
        elif choice == 2:
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        elif choice == 3:
            data[at:at] = rng.choice(INTERESTING)
        elif choice == 4:
            end = min(len(data), at + rng.randint(1, 12))
            data[at:end] = rng.choice(INTERESTING)
        else:
            return rng.randbytes(rng.randint(0, 300))
    return bytes(data)


def http_corpus(rig: Rig) -> list[bytes]:
    """Valid requests of every kind the server takes, as raw bytes."""
    host = f"Host: 127.0.0.1:{rig.port}\r\n"
    body = soap.encode_request(
        soap.SoapRequest(
            "urn:schemas-upnp-org:service:WANIPConnection:2",
            "AddPortMapping",
            (
                ("NewRemoteHost", ""),
                ("NewExternalPort", "20000"),
                ("NewProtocol", "TCP"),
                ("NewInternalPort", "20000"),
                ("NewInternalClient", "127.0.3.1"),
                ("NewEnabled", "1"),
                ("NewPortMappingDescription", "fuzz"),
                ("NewLeaseDuration", "60"),
            ),
        )
    )
    control = rig.url(2, "control").removeprefix(rig.base)
    return [
        f"GET {rig.upnp.urls[2].description} HTTP/1.1\r\n{host}\r\n".encode(),
        (
            f"POST {control} HTTP/1.1\r\n{host}Content-Type: text/xml\r\n"
            'SOAPACTION: "urn:schemas-upnp-org:service:WANIPConnection:2#AddPortMapping"\r\n'
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body,
        (
            f"SUBSCRIBE {rig.url(2, 'event').removeprefix(rig.base)} HTTP/1.1\r\n{host}"
            "NT: upnp:event\r\nCALLBACK: <http://127.0.3.1:9/>\r\nTIMEOUT: Second-1800\r\n\r\n"
        ).encode(),
        (
            f"UNSUBSCRIBE {rig.url(2, 'event').removeprefix(rig.base)} HTTP/1.1\r\n{host}"
            "SID: uuid:00000000-0000-0000-0000-000000000000\r\n\r\n"
        ).encode(),
    ]


async def exchange(port: int, source: str, data: bytes) -> bytes:
    """Send bytes on a fresh connection; what comes back until the server closes it."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError:
        return b""
    try:
        writer.write(data)  # no half-close: aiohttp closes at once on end of input
        return await asyncio.wait_for(reader.read(), 10)
    except (ConnectionError, TimeoutError):
        return b""
    finally:
        writer.close()


def problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR or r.exc_info or "Traceback" in r.getMessage()
    ]


@pytest.fixture
async def responder(rig: Rig) -> AsyncIterator[SsdpResponder]:
    made = await started(rig)
    yield made
    made.close()


@pytest.mark.fuzz
async def test_random_bytes_at_the_http_server(
    rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short timeouts: a mutated request often promises more than it sends.
    await rig.upnp.http.close()
    monkeypatch.setattr(http, "HEADER_TIMEOUT", 0.3)
    monkeypatch.setattr(http, "BODY_TIMEOUT", 0.3)
    await rig.upnp.http.start(rig.upnp.interfaces)
    caplog.set_level(logging.DEBUG)
    seed = int(os.environ.get("IGD_FUZZ_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    corpus = http_corpus(rig)
    count = settings.default.max_examples * HTTP_PER_EXAMPLE
    sent = [mutate(rng, rng.choice(corpus)) for _ in range(count)]
    for start in range(0, count, 64):  # 64 at a time, from as many addresses
        batch = sent[start : start + 64]
        answers = await asyncio.gather(
            *(exchange(rig.port, f"127.0.3.{1 + i}", data) for i, data in enumerate(batch))
        )
        for data, answer in zip(batch, answers, strict=True):
            assert answer == b"" or answer.startswith(b"HTTP/"), (seed, data, answer[:200])
    assert not problems(caplog), (seed, problems(caplog)[:3])
    assert isinstance(await rig.call("GetExternalIPAddress"), soap.SoapResponse)


@pytest.mark.fuzz
async def test_random_bytes_at_the_ssdp_socket(
    responder: SsdpResponder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seed = int(os.environ.get("IGD_FUZZ_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    corpus = [
        ssdp.encode_search(ssdp.ALL, 1),
        ssdp.encode_search(ssdp.ROOT_DEVICE, None, "Microsoft-Windows/10.0 UPnP/1.0"),
        unicast("urn:schemas-upnp-org:device:InternetGatewayDevice:1", responder.port),
        unicast("urn:schemas-upnp-org:service:WANIPConnection:2", responder.port),
    ]
    senders = [await searcher(f"127.0.4.{i}") for i in range(1, 17)]
    count = settings.default.max_examples * SSDP_PER_EXAMPLE
    for i in range(count):
        senders[i % len(senders)].send(mutate(rng, rng.choice(corpus)), responder.port)
        if i % 64 == 63:
            await asyncio.sleep(0.005)  # within the socket's receive buffer
    good = await searcher("127.0.4.200")
    await asyncio.sleep(0.1)
    good.send(unicast(ssdp.ROOT_DEVICE, responder.port), responder.port)
    assert len(await good.answers(1)) == 1
    assert not problems(caplog), (seed, problems(caplog)[:3])
