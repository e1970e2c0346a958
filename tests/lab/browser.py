"""Headless Chromium in a lab namespace, driven from the test process.

Debian's chromedriver runs in the namespace (so the browser sees that namespace's network,
e.g. the gateway's loopback admin listener); two socat relays over a Unix socket in the lab's
work directory carry the WebDriver protocol to the test's own namespace. Selenium runs with
SE_OFFLINE=true: nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options

from lab import Host, Lab

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DRIVER_PORT = 9515
START_TIMEOUT = 20.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for(port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(
                    b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                )
                if b"ready" in conn.recv(4096):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("chromedriver did not come up in the lab namespace")
        time.sleep(0.2)


@contextlib.contextmanager
def browser(
    lab: Lab, host: Host, *, width: int = 1360, height: int = 1000
) -> Iterator[webdriver.Remote]:
    """A headless Chromium running in `host`'s namespace."""
    os.environ["SE_OFFLINE"] = "true"
    work = lab.workdir
    relay = work / "webdriver.sock"
    relay.unlink(missing_ok=True)
    profile = work / "chromium-profile"
    lab.popen(host, [CHROMEDRIVER, f"--port={DRIVER_PORT}"], stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)  # fmt: skip
    lab.popen(host, ["socat", f"UNIX-LISTEN:{relay},fork", f"TCP:127.0.0.1:{DRIVER_PORT}"])
    port = _free_port()
    local = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"UNIX-CONNECT:{relay}"],
        start_new_session=True,
    )
    driver = None
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not Path(relay).exists():
            if time.monotonic() > deadline:
                raise AssertionError("the WebDriver relay did not start")
            time.sleep(0.1)
        _wait_for(port, deadline)
        options = Options()
        options.binary_location = CHROMIUM
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", f"--window-size={width},{height}",
                         f"--user-data-dir={profile}", "--no-first-run",
                         "--disable-background-networking", "--disable-extensions"):  # fmt: skip
            options.add_argument(argument)
        driver = webdriver.Remote(command_executor=f"http://127.0.0.1:{port}", options=options)
        yield driver
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        local.kill()
        local.wait()
