"""
Headless Chromium for the browser tests: Debian's C{chromium} driven by Playwright (no browser
download is possible here). A missing browser fails the test, never skips it: C{tests/run}
installs it. Every page's JavaScript errors are collected, and each test's screenshots are
kept under L{SCREENSHOTS} (the last run's), whose path the tests print.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

#: Where the last run's screenshots are kept (gitignored).
SCREENSHOTS = Path(__file__).parent / ".screenshots"
#: The README's screenshots.
DOCS = Path(__file__).parent.parent / "docs"
#: A phone-sized viewport: the pages must be readable on one.
PHONE = {"width": 390, "height": 740}
#: Milliseconds Playwright waits for what a test expects to appear.
EXPECT_MS = 15_000


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is needed for the browser tests: run tests/run"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


class PageErrors(list):
    """Uncaught exceptions and console errors of the pages it watches."""

    def watch(self, page) -> None:
        page.on("pageerror", lambda error: self.append(f"pageerror: {error}"))
        page.on(
            "console",
            lambda message: (
                self.append(f"console: {message.text}") if message.type == "error" else None
            ),
        )


@pytest.fixture
def page_errors():
    """Collects JavaScript errors; a test that saw any fails at teardown."""
    errors = PageErrors()
    yield errors
    assert not errors, f"JavaScript errors: {errors}"


@pytest.fixture
def new_page(browser, page_errors):
    """C{new_page(**context_options)}: a page in its own context (own sessionStorage)."""
    contexts = []

    def make(**options):
        context = browser.new_context(**options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(EXPECT_MS)
        page_errors.watch(page)
        return page

    yield make
    for context in contexts:
        context.close()


def screenshot(page, name: str, docs: bool = False) -> Path:
    """
    Keep a screenshot of C{page} under L{SCREENSHOTS}; with C{TWISTNET_DOCS_SCREENSHOTS=1}
    in the environment, also the README's copy in docs/ (so a plain run changes no file).
    """
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    if docs and os.environ.get("TWISTNET_DOCS_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / f"{name}.png")
    return path
