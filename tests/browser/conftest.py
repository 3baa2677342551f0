"""Fixtures of the real-browser tests (see tests/support/browser.py for the shape).

A missing browser, ``unshare`` or root FAILS these tests with what to install: CI installs
all of it (deploy/install.sh), so a skip would only hide a broken machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.browser import agents_bundle, missing_browser_tools


@pytest.fixture(scope="session")
def browser_tools() -> None:
    missing = missing_browser_tools()
    if missing:
        pytest.fail("browser tests need: " + "; ".join(missing), pytrace=False)


@pytest.fixture(scope="session")
def agents_sdk_bundle(browser_tools: None) -> Path:
    """deploy/browser/build/agents-realtime.js, built (npm ci + esbuild) if it is not yet."""
    try:
        return agents_bundle()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
