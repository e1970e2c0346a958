"""igd-server as a service in the namespace lab: one instance per namespace, clear refusals
before the kernel is touched, waiting for an interface on request, and the daemon started the
way the systemd unit starts it (its capabilities only, an unprivileged user, READY=1)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from igd.server.examples import render_unit
from lab import Lab
from lab.demo import connect, igd_server_argv, natpmp_map, start_service, wait_for_gateway
from tests.lab.conftest import LAB_POLICY, StartGateway

NOBODY = 65534
EXIT_TIMEOUT = 15.0


def tables(lab: Lab) -> list[str]:
    """Names of the nftables tables in the gateway."""
    out = lab.run(lab.gateway, ["nft", "-j", "list", "tables"]).stdout
    return [t["table"]["name"] for t in json.loads(out)["nftables"] if "table" in t]


def listed_ports(lab: Lab, config: Path) -> list[int]:
    argv = [*igd_server_argv(), "list", "--json", "--config", str(config)]
    return [m["external_port"] for m in json.loads(lab.run(lab.gateway, argv).stdout)]


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = EXIT_TIMEOUT) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("the daemon did not refuse to start") from None


def test_second_instance_refuses_and_touches_nothing(lab: Lab, gateway: StartGateway) -> None:
    live = gateway()
    natpmp_map(lab, "lan1", 9000, 8080)
    start_service(lab, "lan1", 8080)
    wan_view = connect(lab, "wan1", lab.gateway.external_address, 9000)
    live_config = lab.gateway_config
    assert live_config is not None
    # A dry run with its own state directory and table, and a real run with the live one's
    # own configuration: both refuse, naming the live daemon.
    other = lab.write_gateway_config(
        LAB_POLICY,
        filename="other.toml",
        state={"directory": str(lab.workdir / "other-state")},
        nftables={"table": "igdother"},
    )
    for argv in (["--dry-run", "--config", str(other)], ["--config", str(live_config)]):
        second = lab.run(lab.gateway, [*igd_server_argv(), *argv], check=False, timeout=30)
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith("igd-server: refusing to start: another igd-server")
        assert f"pid {live.pid} holds" in second.stderr
        assert len(second.stderr.splitlines()) == 1
    # The live daemon still owns its socket, its control socket, its kernel entries.
    assert not (lab.workdir / "other-state").exists()
    assert listed_ports(lab, live_config) == [9000]
    assert connect(lab, "wan1", lab.gateway.external_address, 9000) == wan_view
    assert tables(lab) == ["igd"]
    assert live.poll() is None
    wait_for_gateway(lab)  # NAT-PMP answers from the live daemon still


@pytest.mark.parametrize(
    ("kind", "port", "sections", "what"),
    [
        (socket.SOCK_DGRAM, 5351, {}, "UDP 5351 on br-lan (NAT-PMP/PCP)"),
        (
            socket.SOCK_STREAM,
            5000,
            {"upnp": {"enabled": True}},
            "TCP 192.168.77.1:5000 on br-lan (UPnP)",
        ),
    ],
)
def test_busy_port_is_named_before_the_kernel_is_touched(
    lab: Lab,
    gateway: StartGateway,
    kind: socket.SocketKind,
    port: int,
    sections: dict[str, dict[str, object]],
    what: str,
) -> None:
    listen = "s.listen()" if kind == socket.SOCK_STREAM else ""
    holder = lab.python_popen(
        "gw",
        "import socket, sys\n"
        f"s = socket.socket(socket.AF_INET, {int(kind)})\n"
        f"s.bind(('0.0.0.0', {port}))\n{listen}\n"
        "print('bound', flush=True)\nsys.stdin.read()",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"bound\n"
    daemon = gateway(wait=False, **sections)
    assert wait_exit(daemon) == 2
    log = lab.gateway_log()
    assert f"refusing to start: {what} is already in use by python" in log
    assert f"(pid {holder.pid})" in log
    assert "Traceback" not in log
    assert tables(lab) == []  # the kernel was not touched


def test_missing_interface_refuses_in_one_line(lab: Lab, gateway: StartGateway) -> None:
    daemon = gateway(wait=False, network={"external_interface": "wan9"})
    assert wait_exit(daemon) == 2
    refusal = [line for line in lab.gateway_log().splitlines() if "refusing" in line]
    assert refusal == [
        "igd-server: refusing to start: external interface 'wan9' does not exist"
        " (or set network.wait_for_interfaces = true)"
    ]
    assert "ready" not in lab.gateway_log()
    assert tables(lab) == []


def test_waits_for_an_interface_when_asked(lab: Lab, gateway: StartGateway) -> None:
    daemon = gateway(
        wait=False,
        network={"external_interface": "wan9", "wait_for_interfaces": True},
    )
    deadline = time.monotonic() + EXIT_TIMEOUT
    while "waiting for interfaces" not in lab.gateway_log():
        assert daemon.poll() is None and time.monotonic() < deadline, lab.gateway_log()
        time.sleep(0.1)
    assert "external interface 'wan9' does not exist" in lab.gateway_log()
    assert tables(lab) == []  # nothing done while waiting
    lab.run("gw", ["ip", "link", "add", "wan9", "type", "veth", "peer", "name", "wan9p"])
    lab.run("gw", ["ip", "addr", "add", "198.51.100.1/24", "dev", "wan9"])
    lab.run("gw", ["ip", "link", "set", "wan9", "up"])
    assert wait_for_gateway(lab) == "198.51.100.1"
    assert tables(lab) == ["igd"]


def test_start_log_is_quiet_and_one_line_per_record(lab: Lab, gateway: StartGateway) -> None:
    gateway()
    log = lab.gateway_log()
    assert "changed: None" not in log
    assert f"external address on wan0: {lab.gateway.external_address}" in log
    # Every line after the command line is one record with its timestamp (not under systemd).
    for line in log.splitlines()[1:]:
        assert line[:4].isdigit() and " igd." in line, line


# -- the systemd unit's way of starting ---------------------------------------------------


def unit_capabilities() -> str:
    """The unit's capability set, as setpriv's list: `-all,+net_admin,...`."""
    for line in render_unit("/bin/true").splitlines():
        if line.startswith("CapabilityBoundingSet="):
            caps = line.split("=", 1)[1].split()
            return "-all," + ",".join(f"+{c.removeprefix('CAP_').lower()}" for c in caps)
    raise AssertionError("the unit sets no CapabilityBoundingSet")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can read (the lab's own files are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="igd-unit-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Development tools the daemon never imports: left out of the copy python_for may make.
_DEV_ONLY = ("mypy*", "mypyc", "ruff*", "hypothesis*", "_hypothesis*", "selenium*", "pip*",
             "setuptools*", "pygments*", "*pytest*", "__editable__*", "__pycache__")  # fmt: skip


def python_for(lab: Lab, user: list[str], shared: Path) -> tuple[list[str], dict[str, str]]:
    """An interpreter `user` can run with this checkout importable, and its environment."""
    probe = lab.run("gw", [*user, sys.executable, "-c", "import igd.server.cli"], check=False)
    if probe.returncode == 0:
        return [sys.executable], {}
    # This Python lives where the user cannot go (pyenv under /root): Debian's python3.11 with
    # this checkout and the virtual environment's packages on its path.
    site = next(p for p in sys.path if p.endswith("site-packages"))
    repo = Path(__file__).resolve().parents[2]
    path = f"{repo}:{site}"
    probe = lab.run(
        "gw",
        [*user, "env", f"PYTHONPATH={path}", "/usr/bin/python3", "-c", "import igd.server.cli"],
        check=False,
    )
    if probe.returncode == 0:
        return ["/usr/bin/python3"], {"PYTHONPATH": path}
    # The checkout itself is private (a clone in a 0700 directory, as `mktemp -d` makes):
    # a copy of the package and of what it imports, where the user can read them.
    copy = shared / "python"
    shutil.copytree(site, copy, ignore=shutil.ignore_patterns(*_DEV_ONLY))
    shutil.copytree(repo / "igd", copy / "igd", ignore=shutil.ignore_patterns("__pycache__"))
    return ["/usr/bin/python3"], {"PYTHONPATH": str(copy)}


def test_daemon_started_as_the_unit_does_maps_a_port(lab: Lab, shared_dir: Path) -> None:
    caps = unit_capabilities()
    user = [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        f"--bounding-set={caps}",
        "--no-new-privs",
        "--",
    ]
    state, run_dir = shared_dir / "state", shared_dir / "run"
    for path in (state, run_dir):
        path.mkdir(mode=0o700)
        os.chown(path, NOBODY, NOBODY)  # what StateDirectory= and RuntimeDirectory= do
    policy = shared_dir / "policy.toml"
    policy.write_text(LAB_POLICY.read_text())
    config = lab.write_gateway_config(policy, state={"directory": str(state)})
    shutil.copy(config, shared_dir / "config.toml")
    notify_path = shared_dir / "notify"
    python, env = python_for(lab, user, shared_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(notify_path))
        os.chmod(notify_path, 0o666)
        manager.settimeout(EXIT_TIMEOUT)
        env = {
            **os.environ,
            **env,
            "NOTIFY_SOCKET": str(notify_path),
            "RUNTIME_DIRECTORY": str(run_dir),
            "INVOCATION_ID": "0" * 32,
        }
        argv = [
            *user,
            *python,
            "-m",
            "igd.server",
            "run",
            "--config",
            str(shared_dir / "config.toml"),
        ]
        with lab.gateway_log_path.open("ab") as log:
            daemon = lab.popen("gw", argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            ready = manager.recv(1024)
        except TimeoutError:
            raise AssertionError(f"no READY=1:\n{lab.gateway_log()}") from None
        assert ready.startswith(b"READY=1\n"), ready
        natpmp_map(lab, "lan1", 9100, 8080)
        start_service(lab, "lan1", 8080)
        assert "hello" in connect(lab, "wan1", lab.gateway.external_address, 9100)
        status = lab.run("gw", ["cat", f"/proc/{daemon.pid}/status"]).stdout
        assert f"Uid:\t{NOBODY}\t{NOBODY}" in status
        daemon.send_signal(1)  # SIGHUP, what ExecReload sends: the policy is read again
        assert manager.recv(1024).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert manager.recv(1024).startswith(b"READY=1\nSTATUS=serving 1 mappings")
        daemon.terminate()
        assert manager.recv(1024) == b"STOPPING=1"
        assert daemon.wait(EXIT_TIMEOUT) == 0
    log = lab.gateway_log()
    assert "Traceback" not in log
    assert (state / "leases.sqlite").stat().st_uid == NOBODY


def test_lab_up_serves_upnpc_out_of_the_box() -> None:
    """`./dev.sh lab up`, then the printed commands: upnpc finds a valid IGD and maps."""
    prefix = f"igdup{os.urandom(3).hex()}"
    lab_cli = [sys.executable, "-m", "lab"]
    repo = Path(__file__).resolve().parents[2]
    up = subprocess.run(
        [*lab_cli, "up", "--prefix", prefix], capture_output=True, text=True, cwd=repo, timeout=60
    )
    gateway = None
    try:
        assert up.returncode == 0, up.stderr
        start = next(line for line in up.stdout.splitlines() if "Start the gateway:" in line)
        argv = start.split("./dev.sh lab exec", 1)[1].split()
        ask = next(line for line in up.stdout.splitlines() if "upnpc -m eth0 -a" in line)
        gateway = subprocess.Popen(
            [*lab_cli, "exec", *argv],
            cwd=repo,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        upnpc = [*lab_cli, "exec", "--prefix", prefix, "lan1", "--", "upnpc", "-m", "eth0"]
        deadline = time.monotonic() + 20
        while True:
            status = subprocess.run([*upnpc, "-s"], capture_output=True, text=True, cwd=repo)
            if "Found valid IGD" in status.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert "Found valid IGD" in status.stdout, status.stdout
        mapped = subprocess.run(
            [*lab_cli, "exec", *ask.split("./dev.sh lab exec", 1)[1].split()],
            capture_output=True,
            text=True,
            cwd=repo,
        )
        assert "is redirected to internal" in mapped.stdout, mapped.stdout
    finally:
        if gateway is not None:
            os.killpg(gateway.pid, 15)
            gateway.wait(10)
        subprocess.run([*lab_cli, "down", "--prefix", prefix], cwd=repo, capture_output=True)
