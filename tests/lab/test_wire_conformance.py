"""Every answer the daemon in the lab sends on UDP 5351 is a whole, well-formed message.

A LAN host sends the corpus of tests/answers.py (good and bad requests, other versions,
unknown opcodes, truncated and oversize ones) and seeded mutations of it to the running
daemon; Wireshark's dissector reads every answer without complaint, our decoders agree, and
the daemon is still serving, with no traceback in its log.
"""

from __future__ import annotations

import json
import os
import random
import secrets
from ipaddress import IPv4Address

from igd.model import Protocol
from lab import Host, Lab
from tests.answers import check_answers, corpus, mutations
from tests.lab.conftest import StartGateway
from tests.lab.probe import request_map

MUTATIONS = 120

# One socket, one request at a time: stray datagrams are drained before each send, so an
# answer is always the answer to the request just sent (None: silence within the wait).
_EXCHANGE_ALL = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
target, wait = (sys.argv[1], 5351), float(sys.argv[2])
answers = []
for request in json.load(sys.stdin):
    s.setblocking(False)
    try:
        while True:
            s.recv(4096)
    except BlockingIOError:
        pass
    s.settimeout(wait)
    s.sendto(bytes.fromhex(request), target)
    try:
        answers.append(s.recv(65536).hex())
    except socket.timeout:
        answers.append(None)
print(json.dumps(answers))
"""


def exchange_all(lab: Lab, host: Host, requests: list[bytes]) -> list[bytes | None]:
    """Send each request from `host` to the gateway in turn; the answer to each."""
    argv = ["-c", _EXCHANGE_ALL, lab.gateway.address, "0.25"]
    stdin = json.dumps([r.hex() for r in requests])
    out = lab.python(host, argv, input=stdin, timeout=120).stdout
    return [None if a is None else bytes.fromhex(a) for a in json.loads(out)]


def test_every_answer_of_the_running_daemon_is_well_formed(lab: Lab, gateway: StartGateway) -> None:
    seed = int(os.environ.get("IGD_WIRE_SEED") or secrets.randbits(32))
    print(f"wire conformance seed {seed} (IGD_WIRE_SEED={seed} repeats the mutations)")
    proc = gateway(limits={"requests_per_second_per_client": 1000, "burst_per_client": 1000})
    lan = lab.lan[0]
    client = IPv4Address(lan.address)
    requests = corpus(client) + mutations(client, random.Random(seed), MUTATIONS)
    answers = exchange_all(lab, lan, requests)
    answered = check_answers(requests, answers)
    assert answered > len(corpus(client)) // 2, f"seed {seed}: only {answered} answers"
    assert proc.poll() is None, "the daemon is still running"
    assert request_map(lab, lab.lan[1], Protocol.UDP, 7000, 7000, 60).result == 0
    assert "Traceback" not in lab.gateway_log()
