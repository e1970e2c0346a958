"""Raw NAT-PMP and PCP exchanges from a lab host, for checks real clients cannot make (exact
codes, silence, announcements)."""

from __future__ import annotations

import json

from igd.model import Protocol
from igd.proto import natpmp, pcp
from igd.proto.natpmp import NatPmpMapRequest, NatPmpMapResponse, NatPmpResponse
from igd.proto.pcp import PcpResponse
from lab import Host, Lab

_EXCHANGE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]))
s.sendto(bytes.fromhex(sys.argv[2]), (sys.argv[1], 5351))
try:
    print(s.recvfrom(2048)[0].hex())
except socket.timeout:
    print("none")
"""

_LISTEN = """
import json, socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("224.0.0.1", 5350))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             struct.pack("4s4s", socket.inet_aton("224.0.0.1"), socket.inet_aton(sys.argv[1])))
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
seen = []
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data, source = s.recvfrom(2048)
    except socket.timeout:
        break
    seen.append([source[0], data.hex()])
print(json.dumps(seen), flush=True)
"""


def exchange(
    lab: Lab, host: Host, target: str, request: bytes, timeout: float = 1.0
) -> bytes | None:
    """Send one datagram to target:5351 from host; the reply, or None after timeout."""
    out = lab.python(host, ["-c", _EXCHANGE, target, request.hex(), str(timeout)]).stdout.strip()
    return None if out == "none" else bytes.fromhex(out)


def request_map(
    lab: Lab, host: Host, protocol: Protocol, internal: int, external: int, lifetime: int
) -> NatPmpMapResponse:
    """A NAT-PMP map request from host to the gateway; the decoded answer."""
    wire = natpmp.encode_request(NatPmpMapRequest(protocol, internal, external, lifetime))
    reply = exchange(lab, host, lab.gateway.address, wire)
    assert reply is not None, "the gateway did not answer"
    response = natpmp.decode_response(reply)
    assert isinstance(response, NatPmpMapResponse)
    return response


def listen_for_announcements(lab: Lab, host: Host, seconds: float):  # type: ignore[no-untyped-def]
    """Start listening on 224.0.0.1:5350 in host; call the result to get what arrived."""
    import subprocess

    proc = lab.python_popen(
        host, ["-c", _LISTEN, host.address, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    def collect() -> list[tuple[str, NatPmpResponse | PcpResponse]]:
        out, _ = proc.communicate(timeout=seconds + 10)
        seen: list[tuple[str, NatPmpResponse | PcpResponse]] = []
        for source, data in json.loads(out):
            wire = bytes.fromhex(data)
            decode = pcp.decode_response if wire[0] == pcp.VERSION else natpmp.decode_response
            seen.append((source, decode(wire)))
        return seen

    return collect


_SESSION = """
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
target = (sys.argv[1], 5351)
replies = []
for request in sys.argv[3:]:
    s.sendto(bytes.fromhex(request), target)
    s.settimeout(2)
    replies.append(s.recvfrom(2048)[0].hex())
print(json.dumps(replies), flush=True)
end = time.monotonic() + float(sys.argv[2])
later = []
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        later.append(s.recvfrom(2048)[0].hex())
    except socket.timeout:
        break
print(json.dumps(later), flush=True)
"""


class Session:
    """PCP requests sent from one socket of a lab host, which then keeps listening for
    unsolicited responses (Mapping Update) for a while."""

    def __init__(self, lab: Lab, host: Host, requests: list[bytes], listen: float) -> None:
        import subprocess

        argv = ["-c", _SESSION, lab.gateway.address, str(listen), *(r.hex() for r in requests)]
        self._proc = lab.python_popen(host, argv, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        assert line, "the PCP session got no answer"
        self.replies = [pcp.decode_response(bytes.fromhex(h)) for h in json.loads(line)]
        self._listen = listen

    def later(self) -> list[PcpResponse]:
        """What arrived unsolicited after the replies."""
        out, _ = self._proc.communicate(timeout=self._listen + 10)
        return [pcp.decode_response(bytes.fromhex(h)) for h in json.loads(out)]
