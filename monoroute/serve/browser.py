"""Headless Chromium through selenium, for the browser tests and `monoroute bench serve`.

Debian's `chromium` and `chromium-driver` packages (.ci/run installs them); nothing is downloaded.
"""
from __future__ import annotations

import shutil


def find_chromium() -> tuple[str, str] | None:
    """(chromium binary, chromedriver) where both are installed, else None."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def headless_chromium(width: int = 1400, height: int = 1000):
    """A selenium Chrome driver on headless Chromium (sandbox off: CI runs as root), or None."""
    found = find_chromium()
    if found is None:
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.binary_location = found[0]
    driver = webdriver.Chrome(service=Service(found[1]), options=opts)
    driver.set_page_load_timeout(60)
    return driver
