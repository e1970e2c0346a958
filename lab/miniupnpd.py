"""Debian's miniupnpd-nftables as the lab's reference gateway: its config, its nftables
chains, start as a daemon, wait until it answers, stop.

    with Lab(wan_network=PUBLIC_LOOKING_WAN) as lab, Miniupnpd(lab, MiniupnpdOptions()) as mini:
        ...  # NAT-PMP and PCP answer on the gateway's LAN address

It runs as a router runs it, a daemon, not with `-d`: `-d` turns on debug logging through
syslog, and with no syslog socket (as in the lab) glibc writes every line to /dev/console,
which then costs more than the mapping itself. The lab's teardown kills it too (it kills
every process in its namespaces), but `stop` is quicker and removes its tables.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from lab import Lab
from lab.demo import DemoError, public_address
from lab.netns import LabError

# miniupnpd refuses private and reserved WAN addresses (documentation ranges too), so its lab
# gets one just past RFC 6598's 100.64.0.0/10. It exists only inside the lab.
PUBLIC_LOOKING_WAN = "100.128.7.0/24"
UUID = "3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b"
FAMILY, TABLE = "inet", "filter"
DNAT_CHAIN = "prerouting_miniupnpd"
READY_TIMEOUT = 10.0  # for the daemon to write its pid file, then to answer
NFT_TIMEOUT = 120.0  # listing or deleting a chain of tens of thousands of rules

# The same chains miniupnpd's nft_init.sh makes, in one table; the config names them.
RULESET = f"""
table {FAMILY} {TABLE} {{
  chain forward {{ type filter hook forward priority 0; policy accept; jump miniupnpd; }}
  chain miniupnpd {{ }}
  chain prerouting {{ type nat hook prerouting priority -100; jump {DNAT_CHAIN}; }}
  chain postrouting {{ type nat hook postrouting priority 100; jump postrouting_miniupnpd; }}
  chain {DNAT_CHAIN} {{ }}
  chain postrouting_miniupnpd {{ }}
}}
"""

# A GET of the root description from a LAN host: exits 0 once miniupnpd's HTTP server answers.
_FETCH = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=1.0) as answer:
    sys.exit(0 if b"InternetGatewayDevice" in answer.read() else 1)
"""


class MiniupnpdError(LabError):
    """miniupnpd did not start or answer; the message says what it printed."""


@dataclass(frozen=True, slots=True)
class MiniupnpdOptions:
    """What the config turns on; the defaults are NAT-PMP and PCP only, in secure mode."""

    natpmp: bool = True  # NAT-PMP and PCP: 2.3.1 has one switch for both
    upnp: bool = False
    http_port: int | None = None  # required with upnp, so the description URL is known
    secure_mode: bool = True  # a client maps only to its own address
    allow_lan: bool = True  # allow the LAN's ports 1024-65535 and deny everything else
    min_lifetime: int | None = None  # None: miniupnpd's default (120 s)
    system_uptime: bool = False  # report the system's uptime, not the daemon's
    clean_ruleset_interval: int | None = None  # 0: never clean; None: its default
    lease_file: bool = False  # keep its leases in <workdir>/<name>.leases
    ipv6: bool = False  # SSDP, HTTP and PCP on the LAN's IPv6 address too: UPnP pinholes

    def __post_init__(self) -> None:
        if self.upnp and self.http_port is None:
            raise ValueError("UPnP needs an http_port")


class Miniupnpd:
    """One miniupnpd in `lab`'s gateway; its files are `<workdir>/<name>.{conf,pid,log}`."""

    def __init__(
        self, lab: Lab, options: MiniupnpdOptions | None = None, *, name: str = "miniupnpd"
    ) -> None:
        self.lab = lab
        self.options = options or MiniupnpdOptions()
        self.conf = lab.workdir / f"{name}.conf"
        self.pidfile = self.conf.with_suffix(".pid")
        self.logfile = self.conf.with_suffix(".log")
        self.leasefile = self.conf.with_suffix(".leases")
        self.pid: int | None = None

    @property
    def description_url(self) -> str:
        """Where its UPnP root description is (it has no random path, unlike igd-server)."""
        return f"http://{self.lab.gateway.address}:{self.options.http_port}/rootDesc.xml"

    def config_text(self) -> str:
        """The config file for the lab's gateway and these options."""
        gw, opts = self.lab.gateway, self.options

        def yes(flag: bool) -> str:
            return "yes" if flag else "no"

        lines = [
            f"ext_ifname={gw.external_interface}",
            f"listening_ip={gw.interface}",
            f"enable_natpmp={yes(opts.natpmp)}",
            f"enable_upnp={yes(opts.upnp)}",
            f"secure_mode={yes(opts.secure_mode)}",
            f"uuid={UUID}",
            f"upnp_table_name={TABLE}",
            f"upnp_nat_table_name={TABLE}",
            "upnp_forward_chain=miniupnpd",
            f"upnp_nat_chain={DNAT_CHAIN}",
            "upnp_nat_postrouting_chain=postrouting_miniupnpd",
        ]
        if opts.http_port is not None:
            lines.append(f"http_port={opts.http_port}")
        if opts.ipv6:
            # Not ipv6_listening_ip: with it 2.3.1 serves HTTP on that IPv6 address only,
            # and IPv4 control points lose the description.
            lines.append("ipv6_disable=no")
        if opts.system_uptime:
            lines.append("system_uptime=yes")
        if opts.clean_ruleset_interval is not None:
            lines.append(f"clean_ruleset_interval={opts.clean_ruleset_interval}")
        if opts.min_lifetime is not None:
            lines.append(f"min_lifetime={opts.min_lifetime}")
        if opts.lease_file:
            lines.append(f"lease_file={self.leasefile}")
        if opts.allow_lan:
            lines.append(f"allow 1024-65535 {self.lab.lan_network} 1024-65535")
            lines.append("deny 0-65535 0.0.0.0/0 0-65535")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = READY_TIMEOUT) -> int:
        """Write the config, create the chains, start it and wait until it answers; its pid."""
        self.conf.write_text(self.config_text())
        self.lab.run(self.lab.gateway, ["nft", "-f", "-"], input=RULESET)
        self.pidfile.unlink(missing_ok=True)  # no earlier run's pid, which may be a zombie's
        argv = ["miniupnpd", "-f", str(self.conf), "-P", str(self.pidfile)]
        try:
            with self.logfile.open("ab") as log:
                proc = self.lab.popen(self.lab.gateway, argv, stdout=log, stderr=log)
            proc.wait(timeout=timeout)  # the parent exits once the daemon has forked
            self.pid = self._wait_for_pid(timeout)
            self._wait_until_it_answers(timeout)
        except BaseException:
            self.stop()
            raise
        return self.pid

    def stop(self) -> None:
        """SIGKILL it, wait (bounded) until it is gone, then delete its table."""
        # Not SIGTERM: it would delete its rules one by one, re-reading its chain for each,
        # which takes minutes at a few thousand mappings.
        pid, self.pid = self.pid, None
        if pid is not None and _is_miniupnpd(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline and _running(pid):
                time.sleep(0.02)
        # Adding first makes the delete succeed whether or not the table is there.
        script = f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
        self.lab.run(self.lab.gateway, ["nft", "-f", "-"], input=script, timeout=NFT_TIMEOUT)

    def dnat_rules(self) -> str:
        """Its DNAT rules as text, one a line (empty when it holds no mapping)."""
        argv = ["nft", "list", "chain", FAMILY, TABLE, DNAT_CHAIN]
        out = self.lab.run(self.lab.gateway, argv, timeout=NFT_TIMEOUT).stdout
        return "\n".join(line for line in out.splitlines() if "dnat" in line)

    def rule_count(self) -> int:
        """The number of rules in its DNAT chain: one per mapping."""
        argv = ["nft", "-j", "list", "chain", FAMILY, TABLE, DNAT_CHAIN]
        out = self.lab.run(self.lab.gateway, argv, timeout=NFT_TIMEOUT).stdout
        return sum(1 for obj in json.loads(out)["nftables"] if "rule" in obj)

    def __enter__(self) -> Miniupnpd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_for_pid(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.pidfile.read_text().strip() if self.pidfile.exists() else ""
            if text.isdigit() and _is_miniupnpd(int(text)):
                return int(text)
            time.sleep(0.05)
        raise MiniupnpdError(f"miniupnpd did not start: {self._log()}")

    def _wait_until_it_answers(self, timeout: float) -> None:
        """Until NAT-PMP (if on) and the UPnP description (if on) answer from a LAN host."""
        lan = self.lab.lan[0]
        deadline = time.monotonic() + timeout
        natpmp, upnp = self.options.natpmp, self.options.upnp
        while natpmp or upnp:
            if self.pid is None or not _running(self.pid):
                raise MiniupnpdError(f"miniupnpd exited: {self._log()}")
            if natpmp:
                with contextlib.suppress(DemoError):
                    public_address(self.lab, lan)
                    natpmp = False
            if upnp and not natpmp:
                fetch = self.lab.python(lan, ["-c", _FETCH, self.description_url], check=False)
                upnp = fetch.returncode != 0
            if (natpmp or upnp) and time.monotonic() > deadline:
                raise MiniupnpdError(f"miniupnpd did not answer within {timeout:.0f} s")
            time.sleep(0.05)

    def _log(self) -> str:
        text = self.logfile.read_text(errors="replace").strip() if self.logfile.exists() else ""
        return text or "(nothing on stderr; as a daemon it logs to syslog)"


def version() -> str | None:
    """The installed miniupnpd-nftables version, or None if it is missing."""
    if shutil.which("miniupnpd") is None:
        return None
    argv = ["dpkg-query", "-W", "-f", "${Version}", "miniupnpd-nftables"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "(version unknown)"


def _is_miniupnpd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "miniupnpd"
    except OSError:
        return False


def _running(pid: int) -> bool:
    """Whether `pid` is alive and not a zombie (nobody may reap the daemon)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
