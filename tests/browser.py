"""Headless Chromium for the tests that open a page: Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium, which is told where both are and so downloads nothing (``ESRFARM_CHROMIUM`` and
``ESRFARM_CHROMEDRIVER`` point elsewhere)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = os.environ.get("ESRFARM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ESRFARM_CHROMEDRIVER", "/usr/bin/chromedriver")


@contextmanager
def chromium(window: str = "1280,2400") -> Iterator[webdriver.Chrome]:
    """A headless browser that keeps the page's console log (``driver.get_log("browser")``)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    assert not missing, (
        f"{missing} not found: install Debian's chromium and chromium-driver (as .ci/run does)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={window}", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
