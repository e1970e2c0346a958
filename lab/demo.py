"""`./dev.sh lab demo`: a LAN service made reachable from the WAN through the daemon, and back.

The steps are plain functions of a built `Lab`, so tests drive the same code the demo shows.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import igd
from lab import Host, Lab, LabError

SERVICE_PORT = 8080
GREETING = "hello from the LAN service"
WAIT_TIMEOUT = 10.0  # seconds the gateway gets to answer NAT-PMP after it starts
NATPMPC_TIMEOUT = 2.0  # natpmpc retries for ~2 minutes on its own; we poll instead
REQUIRED_TOOLS = ("ip", "nft", "natpmpc")

_PUBLIC_ADDRESS = re.compile(r"^Public IP address : (\S+)$", re.MULTILINE)
# natpmpc spells it "liftime".
_MAPPED = re.compile(
    r"^Mapped public port (\d+) protocol (\w+) to local port (\d+) li(?:fe|f)?time (\d+)$",
    re.MULTILINE,
)

# A one-connection-at-a-time TCP service: a greeting plus the peer it saw, so the demo shows
# that the WAN host's own address arrives at the LAN host (DNAT only, no masquerade).
_SERVICE = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    conn, peer = server.accept()
    with conn:
        conn.sendall(f"{sys.argv[2]} (you are {peer[0]})\\n".encode())
"""

_CONNECT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        s.settimeout(float(sys.argv[3]))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
except OSError as exc:
    sys.exit(f"{type(exc).__name__}: {exc.strerror or exc}")
print(data.decode(errors="replace"), end="")
"""


class DemoError(RuntimeError):
    """A demo step did not do what it should; the message says what happened."""


@dataclass(frozen=True, slots=True)
class NatPmpResult:
    """What natpmpc reported for a mapping request."""

    public_port: int
    protocol: str
    private_port: int
    lifetime: int
    output: str


def default_policy() -> Path:
    """policies/lab.toml of this checkout (or of the current directory)."""
    for base in (Path(igd.__file__).resolve().parent.parent, Path.cwd()):
        path = base / "policies" / "lab.toml"
        if path.is_file():
            return path
    raise DemoError("policies/lab.toml not found: run from the repository root")


def igd_server_argv() -> list[str]:
    """How to run `igd-server` with this interpreter's installation."""
    script = Path(sys.executable).parent / "igd-server"
    if script.is_file():
        return [str(script)]
    found = shutil.which("igd-server")
    if found is None:
        raise DemoError("igd-server is not installed: run ./dev.sh setup")
    return [found]


def natpmpc(lab: Lab, host: Host | str, *args: str, timeout: float = NATPMPC_TIMEOUT) -> str:
    """Run `natpmpc -g <gateway> args...` in `host`; its output, DemoError if it fails."""
    argv = ["natpmpc", "-g", lab.gateway.address, *args]
    try:
        proc = lab.run(host, argv, check=False, timeout=timeout)
    except LabError as exc:
        raise DemoError(f"no answer from the gateway: {exc}") from exc
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise DemoError(f"{' '.join(argv)} exited {proc.returncode}:\n{output.rstrip()}")
    return output


def public_address(lab: Lab, host: Host | str) -> str:
    """The external address the gateway reports over NAT-PMP."""
    output = natpmpc(lab, host)
    match = _PUBLIC_ADDRESS.search(output)
    if match is None:
        raise DemoError(f"natpmpc printed no public address:\n{output.rstrip()}")
    return match.group(1)


def wait_for_gateway(
    lab: Lab, host: Host | str | None = None, *, timeout: float = WAIT_TIMEOUT
) -> str:
    """Poll NAT-PMP from `host` (default lan1) until the gateway answers; its public address."""
    host = host or lab.lan[0]
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        proc = lab.gateway_process
        if proc is not None and proc.poll() is not None:
            raise DemoError(f"the gateway exited with code {proc.returncode}\n{log_tail(lab)}")
        try:
            return public_address(lab, host)
        except DemoError as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise DemoError(
                f"the gateway did not answer NAT-PMP within {timeout:.0f} s; last try: {last}\n"
                + log_tail(lab)
            )
        time.sleep(0.2)


def log_tail(lab: Lab, lines: int = 30) -> str:
    """The last lines of the gateway's log, indented, for error messages."""
    text = lab.gateway_log().rstrip().splitlines()[-lines:]
    return "gateway log:\n" + "\n".join(f"  | {line}" for line in text) if text else "(empty log)"


def start_service(
    lab: Lab,
    host: Host | str,
    port: int = SERVICE_PORT,
    greeting: str = GREETING,
    *,
    timeout: float = 5.0,
) -> subprocess.Popen[str]:
    """A TCP service in `host` that answers each connection with `greeting`; waits until bound."""
    proc = lab.python_popen(
        host, ["-c", _SERVICE, str(port), greeting], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    # It prints "ready" in one write once bound; EOF (empty line) means it died.
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    if readable and proc.stdout.readline().strip() == "ready":
        return proc
    name = lab.host(host).name
    if proc.poll() is not None:
        raise DemoError(f"the service on {name} exited with {proc.returncode}")
    raise DemoError(f"the service on {name} did not start in {timeout:.0f} s")


def connect(lab: Lab, host: Host | str, address: str, port: int, *, timeout: float = 3.0) -> str:
    """Connect from `host` to address:port and return what the peer sends; DemoError if not."""
    proc = lab.python(
        host, ["-c", _CONNECT, address, str(port), str(timeout)], check=False, timeout=timeout + 10
    )
    if proc.returncode != 0:
        raise DemoError(proc.stderr.strip() or f"exit {proc.returncode}")
    return proc.stdout


def natpmp_map(
    lab: Lab,
    host: Host | str,
    public_port: int,
    private_port: int,
    protocol: str = "tcp",
    lifetime: int = 3600,
) -> NatPmpResult:
    """Ask for (lifetime > 0) or delete (lifetime 0) a mapping with natpmpc."""
    output = natpmpc(lab, host, "-a", str(public_port), str(private_port), protocol, str(lifetime))
    match = _MAPPED.search(output)
    if match is None:
        raise DemoError(f"natpmpc reported no mapping:\n{output.rstrip()}")
    return NatPmpResult(
        public_port=int(match.group(1)),
        protocol=match.group(2).lower(),
        private_port=int(match.group(3)),
        lifetime=int(match.group(4)),
        output=output,
    )


def list_mappings(lab: Lab, config: Path) -> str:
    """`igd-server list --config <config>` run in the gateway; its output."""
    argv = [*igd_server_argv(), "list", "--config", str(config)]
    proc = lab.run(lab.gateway, argv, check=False, timeout=30)
    if proc.returncode != 0:
        raise DemoError(
            f"igd-server list exited {proc.returncode}:\n{(proc.stdout + proc.stderr).rstrip()}"
        )
    return proc.stdout


class _Steps:
    """Numbered, flushed progress lines."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self.count = 0
        self.current = "start"

    def __call__(self, title: str) -> None:
        self.count += 1
        self.current = title
        self.write(f"[{self.count}] {title}")

    def fail(self, exc: BaseException) -> None:
        self.write(f"FAILED at step [{self.count}] {self.current}:")
        self.show(str(exc))

    def show(self, text: str) -> None:
        for line in text.rstrip().splitlines():
            self.write(f"      {line}")


def check_environment() -> None:
    """DemoError unless we are root and the lab's programs are installed."""
    if os.geteuid() != 0:
        raise DemoError("the demo builds network namespaces: run it as root (./dev.sh demo)")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise DemoError(f"missing programs: {', '.join(missing)}: run ./dev.sh setup")


def run_demo(policy: Path | None = None, *, write: Callable[[str], None] | None = None) -> int:
    """Run every step, print what happens, always tear down; 0 if all steps passed."""
    steps = _Steps(write or (lambda line: print(line, flush=True)))
    failures = (DemoError, LabError, subprocess.CalledProcessError)
    try:
        check_environment()
        policy = policy or default_policy()
        steps("Building the lab (network namespaces: WAN hosts, gateway, LAN hosts)")
        # `with` also tears the lab down on SIGTERM, SIGHUP and Ctrl-C.
        with Lab() as lab:
            try:
                steps.show(lab.describe())
                _run_steps(lab, policy, steps)
            except failures as exc:
                steps.fail(exc)
                return 1
            finally:
                steps(f"Tearing down lab {lab.prefix}")
    except failures as exc:
        steps.fail(exc)
        return 1
    steps.write("Demo passed: the mapping opened the service to the WAN, and closing it closed it.")
    return 0


def _run_steps(lab: Lab, policy: Path, steps: _Steps) -> None:
    lan, wan, gw = lab.lan[0], lab.wan[0], lab.gateway
    port = SERVICE_PORT

    steps(f"Writing the gateway config (policy {policy})")
    config = lab.write_gateway_config(policy)
    steps.show(config.read_text())

    steps(f"Starting the gateway in {gw.ns} (log: {lab.gateway_log_path})")
    lab.start_gateway(config)
    address = wait_for_gateway(lab, lan)
    steps.show(f"the gateway answers NAT-PMP; public address {address}")

    steps(f"Starting a TCP service on {lan.name} ({lan.address}) port {port}")
    start_service(lab, lan, port)

    steps(f"{lan.name}: natpmpc -g {gw.address} -a {port} {port} tcp 3600")
    mapping = natpmp_map(lab, lan, port, port, "tcp", 3600)
    steps.show(mapping.output)
    if mapping.lifetime <= 0:
        raise DemoError(f"the gateway granted lifetime {mapping.lifetime}")

    target = f"{gw.external_address}:{mapping.public_port}"
    steps(f"{wan.name} ({wan.address}) connects to {target}")
    try:
        answer = connect(lab, wan, gw.external_address, mapping.public_port)
    except DemoError as exc:
        raise DemoError(f"connection through the mapping failed: {exc}\n{log_tail(lab)}") from exc
    steps.show(f"the service answered: {answer}")
    if GREETING not in answer:
        raise DemoError(f"expected the greeting {GREETING!r}, got {answer!r}")

    steps(f"igd-server list --config {config}")
    listing = list_mappings(lab, config)
    steps.show(listing or "(no output)")
    if lan.address not in listing:
        raise DemoError(f"the list does not show the mapping for {lan.address}")

    steps(f"{lan.name}: natpmpc -g {gw.address} -a {port} {port} tcp 0 (delete the mapping)")
    steps.show(natpmp_map(lab, lan, port, port, "tcp", 0).output)

    steps("igd-server list again: the mapping is gone")
    listing = list_mappings(lab, config)
    steps.show(listing or "(no output)")
    if lan.address in listing:
        raise DemoError(f"the list still shows a mapping for {lan.address}")

    steps(f"{wan.name} connects to {target} again: it must fail now")
    try:
        answer = connect(lab, wan, gw.external_address, mapping.public_port)
    except DemoError as exc:
        steps.show(f"refused as it should be: {exc}")
    else:
        raise DemoError(f"the service still answers through the deleted mapping: {answer!r}")


def main() -> int:
    """Entry point for `./dev.sh lab demo` without arguments."""
    return run_demo()
