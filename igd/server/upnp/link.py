"""What WANCommonInterfaceConfig reports about the external interface, read from the kernel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_NET_DEV = Path("/proc/net/dev")  # per network namespace, unlike a sysfs mounted elsewhere
SYS_NET = Path("/sys/class/net")
UI4 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Counters:
    """Interface byte and packet counters, wrapped to UPnP's ui4 as the services require."""

    bytes_received: int = 0
    packets_received: int = 0
    bytes_sent: int = 0
    packets_sent: int = 0


def counters(interface: str, source: Path = PROC_NET_DEV) -> Counters:
    """The interface's counters now; zeros when it is unknown."""
    try:
        lines = source.read_text().splitlines()[2:]
    except OSError:
        return Counters()
    for line in lines:
        name, _, fields = line.partition(":")
        if name.strip() != interface:
            continue
        values = fields.split()
        if len(values) < 10:
            break
        # /proc/net/dev: receive bytes, packets, ... (8 fields), then transmit bytes, packets.
        return Counters(
            int(values[0]) & UI4, int(values[1]) & UI4, int(values[8]) & UI4, int(values[9]) & UI4
        )
    return Counters()


def link_up(interface: str, base: Path = SYS_NET) -> bool:
    """Whether the interface's operational state is up (veths and tunnels say "unknown")."""
    try:
        state = (base / interface / "operstate").read_text().strip()
    except OSError:
        return False
    return state in ("up", "unknown")


def max_bit_rate(interface: str, base: Path = SYS_NET) -> int:
    """The link speed in bit/s, 0 when the driver does not say (virtual links)."""
    try:
        speed = int((base / interface / "speed").read_text().strip())
    except (OSError, ValueError):
        return 0
    return min(UI4, speed * 1_000_000) if speed > 0 else 0
