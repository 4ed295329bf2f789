"""Addresses, as the agent's and the fleet's settings write them."""

from __future__ import annotations


def split_host_port(value: str, default_host: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (the *default_host*);
    None if *value* is none of these."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]") or default_host, int(port)
