"""Headless Debian Chromium driven by Selenium through /usr/bin/chromedriver: nothing is downloaded
at run time (Selenium Manager is never asked), and the flags keep Chromium off the network."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
QUIET_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1100",
)


def missing_browser() -> str:
    """Why the browser test cannot run here ("" when it can); `make test` installs both."""
    absent = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if not absent:
        return ""
    return f"{' and '.join(absent)} missing: apt-get install chromium chromium-driver (make test does)"


def start_chromium() -> webdriver.Chrome:
    """A headless Chromium with a fresh profile that records every network request it makes."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in QUIET_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='glipv2_chromium_')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def requested_urls(driver: webdriver.Chrome) -> list[str]:
    """URLs of the requests the page sent since the last call (Chrome's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def save_screenshot(driver: webdriver.Chrome, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path
