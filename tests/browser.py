"""Debian's Chromium, driven by Playwright's sync API on a thread of its own, from Twisted tests.

Playwright's sync API must be used from one thread; trial's reactor must not block. A Browser
owns a one-thread pool: every call runs there, and the test gets a Deferred. So a test can drive
the page, then kill Redis from the reactor, then drive the page again.

The browser is Debian's ``/usr/bin/chromium`` (``apt-get install chromium``); Playwright's own
browser download is never used. A missing browser or package fails the test with the command
that installs it: a browser test that did not run is not a pass.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


def missing() -> str:
    """Why browser tests cannot run here, or "" when they can."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing: apt-get install -y chromium"
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is missing: pip install '.[test]'"
    return ""


class Browser:
    """One Chromium with one page; ``call(fn)`` runs ``fn(page)`` on the browser's thread."""

    def __init__(self, width: int = 1280, height: int = 800):
        self.size = {"width": width, "height": height}
        self.pool = ThreadPool(1, 1, name="browser")
        self.page: Any = None
        self.requests: list[str] = []  # every URL the page asked for
        self.console: list[str] = []  # console errors (a CSP violation is one)

    def start(self) -> Deferred:
        self.pool.start()
        return self.call(lambda _: self._open())

    def _open(self) -> None:
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        self._context = self._browser.new_context(viewport=self.size)
        self.page = self._context.new_page()
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda message: self.console.append(message.text)
                     if message.type == "error" else None)

    def call(self, fn: Callable[[Any], Any], *args: Any) -> Deferred:
        return threads.deferToThreadPool(reactor, self.pool, fn, self.page, *args)

    def stop(self) -> Deferred:
        def close(_: Any) -> None:
            for part in ("_context", "_browser"):
                if hasattr(self, part):
                    getattr(self, part).close()
            if hasattr(self, "_playwright"):
                self._playwright.stop()

        d = threads.deferToThreadPool(reactor, self.pool, close, None)
        d.addBoth(lambda result: (self.pool.stop(), result)[1])
        return d
