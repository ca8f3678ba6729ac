"""Headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) for the report's browser
test and the README's screenshots (scripts/screenshots.py).

    apt-get install chromium           # once; Playwright's own browser download is never used

Every request a page makes is recorded; one that is not on this machine (file:, data:, or
loopback) is blocked before it leaves the browser and listed in `blocked`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

CHROMIUM = Path("/usr/bin/chromium")
# The flags that work on these machines: without the background-networking ones Chromium keeps
# trying to reach Google's hosts, which the closed network refuses.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass
class Traffic:
    requested: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


def is_local(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in ("file", "data", "blob", "about") or (parsed.hostname or "") in LOCAL_HOSTS


@contextlib.contextmanager
def page(width: int = 1200, height: int = 900) -> Iterator[tuple[object, Traffic]]:
    """(a Playwright page, its traffic record) in a fresh headless Chromium."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: install Debian's Chromium with `apt-get install chromium`")
    traffic = Traffic()

    def route(r):
        if is_local(r.request.url):
            r.continue_()
        else:
            traffic.blocked.append(r.request.url)
            r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            tab = browser.new_page(viewport={"width": width, "height": height})
            tab.on("request", lambda r: traffic.requested.append(r.url))
            tab.route("**/*", route)
            yield tab, traffic
        finally:
            browser.close()
