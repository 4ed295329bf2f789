"""Channel documents, waves and the choice a host makes (cerulean.protocol.update)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cerulean.protocol.update import (
    DEFAULT_WAVES,
    ChannelDoc,
    ChannelEntry,
    ProtocolError,
    ReleaseDoc,
    choose,
    parse_version,
    utc_iso,
    version_key,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def entry(version: str, hours_ago: float = 0, state: str = "active",
          waves: list[tuple[int, float]] | None = None) -> ChannelEntry:
    return ChannelEntry("vm", version, utc_iso(NOW - timedelta(hours=hours_ago)),
                        list(DEFAULT_WAVES) if waves is None else waves, state)


def test_versions_compare_as_numbers() -> None:
    assert version_key("13.20261126.10") > version_key("13.20261126.9")
    assert version_key("14.20200101.0") > version_key("13.20991231.5")
    for bad in ("13.2026112.0", "13.20261126", "v13.20261126.0", "13.20261126.0-rc1"):
        with pytest.raises(ProtocolError):
            parse_version(bad)


def test_waves_widen_with_time() -> None:
    e = entry("13.20261126.1")
    assert e.fraction(NOW) == 0.01
    assert e.fraction(NOW + timedelta(hours=5)) == 0.05
    assert e.fraction(NOW + timedelta(hours=30)) == 0.25
    assert e.fraction(NOW + timedelta(days=3)) == 1.0
    assert entry("13.20261126.1", state="paused").fraction(NOW + timedelta(days=9)) == 0.0


def test_choose_takes_the_newest_eligible_release() -> None:
    doc = ChannelDoc("stable", [entry("13.20261120.0", 200), entry("13.20261125.0", 30),
                                entry("13.20261126.0", 1)])
    early, late = 0.001, 0.2
    assert choose(doc, "vm", "13.20261120.0", early, NOW).entry.version == "13.20261126.0"
    got = choose(doc, "vm", "13.20261120.0", late, NOW)
    assert got.entry is not None and got.entry.version == "13.20261125.0"
    none = choose(doc, "vm", "13.20261126.0", early, NOW)
    assert none.entry is None and "newest" in none.reason
    assert choose(doc, "edge", "13.20261120.0", early, NOW).entry is None


def test_choose_skips_paused_withdrawn_and_failed_releases() -> None:
    doc = ChannelDoc("stable", [entry("13.20261125.0", 100), entry("13.20261126.0", 100)])
    doc.entries[1].state = "withdrawn"
    got = choose(doc, "vm", "13.20261120.0", 0.5, NOW)
    assert got.entry is not None and got.entry.version == "13.20261125.0"
    doc.entries[0].state = "paused"
    got = choose(doc, "vm", "13.20261120.0", 0.5, NOW)
    assert got.entry is None and "paused" in got.reason and "withdrawn" in got.reason
    doc.entries[0].state = "active"
    got = choose(doc, "vm", "13.20261120.0", 0.5, NOW, skip=frozenset({"13.20261125.0"}))
    assert got.entry is None and "failed on this host" in got.reason


def test_channel_documents_round_trip_and_reject_nonsense() -> None:
    doc = ChannelDoc("lts", [entry("13.20261126.0", 2, waves=[(0, 1.0)])])
    assert ChannelDoc.from_json(doc.to_json()).to_json() == doc.to_json()
    bad = doc.to_json()
    bad["releases"][0]["waves"] = [[0, 1.5]]
    with pytest.raises(ProtocolError, match="fraction"):
        ChannelDoc.from_json(bad)
    bad = doc.to_json()
    bad["releases"][0]["state"] = "maybe"
    with pytest.raises(ProtocolError, match="state"):
        ChannelDoc.from_json(bad)
    with pytest.raises(ProtocolError):
        ReleaseDoc.from_json({"image": "vm", "version": "13.20261126.0", "created": "x",
                              "arches": {"amd64": {"roothash": "zz", "parts": {}}}})
