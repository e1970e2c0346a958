"""`igd-server init DIR` and `igd-server unit`: the example files shipped with the package
(igd/server/data/), filled in for this machine."""

from __future__ import annotations

import contextlib
import shutil
import socket
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from igd.server.interfaces import ipv4_interfaces

UNIT_NAME = "igd-server.service"
DEFAULT_EXEC = "/usr/local/bin/igd-server"


def data(name: str) -> str:
    """The text of a file shipped in igd/server/data/."""
    return resources.files("igd.server").joinpath("data", name).read_text()


@dataclass(frozen=True, slots=True)
class Detected:
    """Interfaces guessed from the routing table and addresses; None when not found."""

    external: str | None
    internal: tuple[str, ...]


def default_route_interface(routes: Path = Path("/proc/net/route")) -> str | None:
    """The interface of the IPv4 default route, if there is one."""
    with contextlib.suppress(OSError):
        for line in routes.read_text().splitlines()[1:]:
            fields = line.split()
            # "Iface Destination Gateway Flags ...": destination 00000000 is the default route.
            if len(fields) > 2 and fields[1] == "00000000":
                return fields[0]
    return None


def detect(names: list[str] | None = None) -> Detected:
    """WAN: the default route's interface; LAN: every other one with a private address."""
    external = default_route_interface()
    if names is None:
        names = [name for _, name in socket.if_nameindex()]
    internal = []
    for name in names:
        if name == external:
            continue
        addresses = ipv4_interfaces(name)
        if any(a.ip.is_private and not a.ip.is_loopback for a in addresses):
            internal.append(name)
    return Detected(external, tuple(internal))


def render_config(directory: Path, found: Detected) -> str:
    """config.toml for `directory`, with the detected interfaces or placeholders."""
    external_note = internal_note = ""
    if found.external is None:
        external_note = "\n# NOT DETECTED (no default route): set it before starting."
    if not found.internal:
        internal_note = "\n# NOT DETECTED (no interface with a private address): set it."
    internal = found.internal or ("br-lan",)
    return Template(data("config.toml")).substitute(
        config_path=directory / "config.toml",
        external_interface=found.external or "eth0",
        external_note=external_note,
        internal_interfaces=", ".join(f'"{name}"' for name in internal),
        internal_note=internal_note,
        policy_file=directory / "policy.toml",
    )


def render_policy(directory: Path) -> str:
    """policy.toml: the home-router policy, its commands naming `directory`."""
    return Template(data("policy.toml")).safe_substitute(policy_path=directory / "policy.toml")


def render_unit(executable: str | None = None) -> str:
    """The systemd unit, its ExecStart pointing at `executable` (this igd-server by default)."""
    if executable is None:
        executable = current_executable()
    return data(UNIT_NAME).replace(f"ExecStart={DEFAULT_EXEC} ", f"ExecStart={executable} ")


def current_executable() -> str:
    """The igd-server script of this installation (next to the running Python)."""
    beside = Path(sys.executable).parent / "igd-server"
    if beside.is_file():
        return str(beside)
    return shutil.which("igd-server") or DEFAULT_EXEC


def write_examples(directory: Path, found: Detected) -> list[tuple[Path, bool]]:
    """Write config.toml and policy.toml into `directory` unless present; (path, written)."""
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    results = []
    for name, text in (
        ("config.toml", render_config(directory, found)),
        ("policy.toml", render_policy(directory)),
    ):
        path = directory / name
        try:
            with path.open("x") as out:  # "x": fails if the file exists
                out.write(text)
        except FileExistsError:
            results.append((path, False))
            continue
        results.append((path, True))
    return results


def lan_hint(found: Detected) -> str:
    """A one-line summary of what was detected, for `init`'s output."""
    lan = ", ".join(found.internal) or "none"
    return f"detected WAN interface {found.external or 'none'}, LAN interfaces {lan}"
