"""The admin console end to end: the real daemon in the gateway namespace, headless Chromium
in the same namespace pointed at the admin listener, natpmpc and upnpc on LAN hosts, a WAN
host connecting through the gateway."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from selenium.webdriver.common.by import By

from igd.server.admin.auth import hash_password
from lab import Lab
from lab.demo import DemoError, connect, natpmp_map, start_service
from tests.lab.browser import browser
from tests.lab.test_natpmp_gateway import kernel

ADMIN_PORT = 9351
# upnpc refuses to map behind a reserved (TEST-NET) external address.
PUBLIC_LOOKING_WAN = "100.128.7.0/24"
PAGE = f"http://127.0.0.1:{ADMIN_PORT}/"
# Where the screenshots go: docs/img when IGD_SCREENSHOTS names it, else the lab's work dir.
SCREENSHOTS = os.environ.get("IGD_SCREENSHOTS")


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A lab of our own prefix whose WAN upnpc takes for public."""
    with Lab(prefix=f"igdcons{secrets.token_hex(3)}", wan_network=PUBLIC_LOOKING_WAN) as built:
        yield built


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = condition()
        except Exception:  # the page is between two renders
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def shoot(driver: Any, lab: Lab, name: str) -> Path:
    folder = Path(SCREENSHOTS) if SCREENSHOTS else lab.workdir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    driver.save_screenshot(str(path))
    return path


def row(driver: Any, port: int, protocol: str = "tcp") -> Any:
    rows = driver.find_elements(By.CSS_SELECTOR, f'#mappings tr[data-port="{port}"]'
                                f'[data-protocol="{protocol}"]')  # fmt: skip
    return rows[0] if rows else None


def cells(driver: Any, port: int, protocol: str = "tcp") -> list[str] | None:
    """The texts of a mapping's row (None if it is not shown); the page re-renders every
    2 s, so a stale row is read again by the caller's wait."""
    found = row(driver, port, protocol)
    return None if found is None else [c.text for c in found.find_elements(By.TAG_NAME, "td")]


def click_delete(driver: Any, port: int) -> bool:
    found = row(driver, port)
    if found is None:
        return False
    found.find_element(By.CSS_SELECTOR, "button.delete").click()
    return True


def scrape(lab: Lab) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = PAGE + "metrics"
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
    text = lab.python(lab.gateway, code).stdout
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_console_shows_deletes_and_lists_refusals(lab: Lab, gateway: Any) -> None:
    gateway(admin={"enabled": True}, upnp={"enabled": True, "igd_version": 2})
    service = start_service(lab, lab.lan[0], 8080)
    try:
        with browser(lab, lab.gateway) as driver:
            driver.get(PAGE)
            wait_until(lambda: driver.find_element(By.ID, "empty").is_displayed(), 10,
                       "the empty table")  # fmt: skip
            natpmp_map(lab, lab.lan[0], 18080, 8080)
            natpmp_map(lab, lab.lan[1], 27015, 27015, "udp", 7200)
            upnpc = ["upnpc", "-m", "eth0", "-e", "media server", "-a", lab.lan[1].address,
                     "32400", "32400", "tcp", "3600"]  # fmt: skip
            lab.run(lab.lan[1], upnpc, timeout=30)
            shown = wait_until(lambda: cells(driver, 18080), 10, "the mapping on the page")
            assert shown[:5] == ["18080", "TCP", f"{lab.lan[0].address}:8080",
                                 lab.lan[0].address, "natpmp"]  # fmt: skip
            assert shown[6] == "lab LAN to self"
            upnp = wait_until(lambda: cells(driver, 32400), 10, "the UPnP mapping")
            assert (upnp[4], upnp[5]) == ("upnp", "media server")
            assert "hello from the LAN service" in connect(
                lab, lab.wan[0], lab.gateway.external_address, 18080
            )
            with pytest.raises(DemoError):
                natpmp_map(lab, lab.lan[0], 23, 23)
            refused = wait_until(
                lambda: [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#refusals tbody tr")
                         if "no telnet" in r.text], 10, "the refusal on the page")  # fmt: skip
            assert lab.lan[0].address in refused[0] and "policy-denied" in refused[0]
            driver.find_element(By.ID, "filter").send_keys("")  # focus away from the URL bar
            shoot(driver, lab, "console.png")

            # A click on a heading sorts by it; a second click reverses.
            def ports() -> list[int]:
                found = driver.find_elements(By.CSS_SELECTOR, "#mappings tbody tr")
                return [int(r.get_attribute("data-port")) for r in found]

            driver.find_element(By.CSS_SELECTOR, 'th[data-key="external_port"]').click()
            wait_until(lambda: ports() == [32400, 27015, 18080], 5, "descending ports")
            driver.find_element(By.CSS_SELECTOR, 'th[data-key="mechanism"]').click()
            wait_until(lambda: ports()[-1] == 32400, 5, "sorted by mechanism")

            # Filtering narrows the table to what matches.
            driver.find_element(By.ID, "filter").send_keys("27015")
            wait_until(lambda: row(driver, 18080) is None, 5, "the filter")
            assert wait_until(lambda: cells(driver, 27015, "udp"), 5, "the UDP row")
            driver.find_element(By.ID, "filter").clear()
            driver.find_element(By.ID, "filter").send_keys(" ")

            wait_until(lambda: click_delete(driver, 18080), 5, "the delete button")
            wait_until(lambda: row(driver, 18080) is None, 10, "the row to go")
            assert all(e.external_port != 18080 for e in kernel(lab))
            with pytest.raises(DemoError):
                connect(lab, lab.wan[0], lab.gateway.external_address, 18080)

            # The explain form answers as `igd-server policy explain` does.
            form = driver.find_element(By.ID, "explain")
            form.find_element(By.NAME, "client").send_keys(lab.lan[0].address)
            form.find_element(By.NAME, "internal_port").send_keys("23")
            form.find_element(By.CSS_SELECTOR, "button").click()
            result = wait_until(
                lambda: driver.find_element(By.ID, "explain-result").text, 5, "the explanation"
            )
            assert result.startswith("DENY") and "no telnet" in result
            driver.set_window_size(1360, 1200)  # the answer below the form, in the picture
            shoot(driver, lab, "console-explain.png")

            # Flush, confirmed in the dialog, empties the table, the kernel and the page.
            driver.find_element(By.ID, "flush").click()
            wait_until(lambda: driver.switch_to.alert, 5, "the confirmation").accept()
            wait_until(lambda: driver.find_element(By.ID, "empty").is_displayed(), 10,
                       "the empty table")  # fmt: skip
            assert kernel(lab) == set()

        samples = scrape(lab)
        assert samples[("igd_grants_total", (("mechanism", "natpmp"),
                                             ("rule", "lab LAN to self")))] == 2  # fmt: skip
        assert samples[("igd_refusals_total", (("mechanism", "natpmp"),
                        ("reason", "policy-denied"), ("rule", "no telnet")))] == 1  # fmt: skip
        assert samples[("igd_removals_total", (("cause", "deleted-by-admin"),))] == 3
        assert samples[("igd_request_seconds_count", (("mechanism", "natpmp"),))] == 3
        assert samples[("igd_commit_seconds_count", (("stage", "kernel"),))] >= 3
        assert samples[("igd_grants_total", (("mechanism", "upnp"),
                                             ("rule", "lab LAN to self")))] == 1  # fmt: skip
        assert samples[("igd_mappings", (("mechanism", "natpmp"), ("protocol", "udp")))] == 0
    finally:
        service.kill()


def test_lan_listener_needs_a_password_and_is_not_reachable_from_the_wan(
    lab: Lab, gateway: Any
) -> None:
    listen = f"{lab.gateway.address}:{ADMIN_PORT}"
    gateway(admin={"enabled": True, "listen": listen, "password_hash": hash_password("s3cret-pw")})
    page = f"http://{listen}/"
    probe = (
        "import urllib.request, urllib.error\n"
        "class Stay(urllib.request.HTTPRedirectHandler):\n"
        "    def redirect_request(self, *a, **k): return None\n"
        "try:\n"
        f"    urllib.request.build_opener(Stay).open({page!r}, timeout=3)\n"
        "except urllib.error.HTTPError as e: print(e.code, e.headers.get('Location'))\n"
        "except OSError as e: print('unreachable', e)\n"
    )
    assert lab.python(lab.lan[0], probe).stdout.strip() == "303 /login"
    # A WAN host that routes the LAN prefix to the gateway: the kernel would deliver its
    # packets to the LAN address, but the listener is bound to the LAN interface.
    wan = lab.wan[0]
    lab.run(wan, ["ip", "route", "replace", str(lab.lan_network), "via",
                  lab.gateway.external_address])  # fmt: skip
    assert lab.python(wan, probe, timeout=30).stdout.startswith("unreachable")
    # ... and the gateway's external address serves no console either.
    outside = probe.replace(lab.gateway.address, lab.gateway.external_address)
    assert lab.python(wan, outside, timeout=30).stdout.startswith("unreachable")


def test_refuses_to_listen_on_the_external_address(lab: Lab, gateway: Any) -> None:
    listen = f"{lab.gateway.external_address}:{ADMIN_PORT}"
    proc = gateway(
        admin={"enabled": True, "listen": listen, "password_hash": hash_password("s3cret-pw")},
        wait=False,
    )
    assert proc.wait(timeout=30) == 2
    log = lab.gateway_log()
    assert "refusing to start" in log and "address of the external interface" in log
    assert "Traceback" not in log
