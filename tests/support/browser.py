"""A headless Chromium driven by Selenium, for the dashboard tests.

Debian's `chromium` and `chromium-driver` only (browser downloads from the internet fail
here, and Selenium Manager must not try): both executables are given explicitly. Where they
are missing the tests skip saying how to install them, and fail instead when
MAILBOX_TEST_REQUIRE_SERVICES names "browser" (tests/support/services.py). With
MAILBOX_SCREENSHOTS set to a directory, `screenshot` saves pages there (that is how
docs/screenshots/ is made: `MAILBOX_SCREENSHOTS=docs/screenshots pytest
tests/e2e/test_dashboard.py`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.support.services import require

T = TypeVar("T")
INSTALL = ("run `apt-get install -y chromium chromium-driver` as root (.ci/run does), then "
           "`make test`")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1360,900")


def executables() -> tuple[str, str]:
    """(chromium, chromedriver), or a skip (a failure where the browser is required)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver))
               if path is None]
    if missing or chromium is None or driver is None:
        require("browser", f"{' and '.join(missing)} not found: {INSTALL}")
    try:
        import selenium  # noqa: F401
    except ImportError:
        require("browser", "selenium is not installed: pip install '.[dev]'")
    return chromium, driver


@contextmanager
def chrome(profile: Path) -> Iterator[Any]:
    """A fresh headless Chromium with its own profile directory."""
    chromium, driver_path = executables()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(executable_path=driver_path, log_output=str(profile) + ".driver.log")
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(predicate: Callable[[], T | None], timeout_s: float = 30, what: str = "",
             interval_s: float = 0.05) -> T:
    """Poll until `predicate` returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the element is not there yet, a stale reference, ...
            last = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}"
                         + (f" (last error: {last})" if last else ""))


def screenshot(driver: Any, name: str) -> None:
    """Save the page as `<MAILBOX_SCREENSHOTS>/<name>.png` when that variable is set."""
    target = os.environ.get("MAILBOX_SCREENSHOTS")
    if not target:
        return
    Path(target).mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1360, max(700, min(int(height) + 40, 1800)))
    driver.save_screenshot(str(Path(target) / f"{name}.png"))
    driver.set_window_size(1360, 900)
