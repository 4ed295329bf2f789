"""Servers the tests start on loopback are reached directly: no proxy in between
(httpx and urllib honour the proxy variables a CI machine may set)."""

from __future__ import annotations

import os

import pytest

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
NO_PROXY = "127.0.0.1,localhost"


def no_proxy(monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """Drop the proxy variables for loopback: for the test (*monkeypatch*), or for the rest
    of the process (a benchmark)."""
    for var in PROXY_VARS:
        if monkeypatch is not None:
            monkeypatch.delenv(var, raising=False)
        else:
            os.environ.pop(var, None)
    if monkeypatch is not None:
        monkeypatch.setenv("NO_PROXY", NO_PROXY)
    else:
        os.environ["NO_PROXY"] = NO_PROXY
