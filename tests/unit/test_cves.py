"""The host's CVE report (cerulean.agent.cves), against a Security Tracker fixture."""

from __future__ import annotations

import copy
import itertools
import json
import random
from pathlib import Path

import pytest
from debian.debian_support import Version, version_compare

from cerulean.agent import cves
from cerulean.debian.lock import read_lock

ROOT = Path(__file__).resolve().parents[2]

STATUS = """\
Package: openssl
Status: install ok installed
Architecture: amd64
Version: 3.5.1-1
Description: Secure Sockets Layer toolkit

Package: libssl3t64
Status: install ok installed
Architecture: amd64
Source: openssl
Version: 3.5.1-1
Description: Secure Sockets Layer toolkit - shared libraries
 More text: with a colon.

Package: linux-image-6.12.57+deb13-cloud-amd64
Status: install ok installed
Architecture: amd64
Source: linux-signed-amd64 (6.12.57+1)
Version: 6.12.57-1
Built-Using: linux (= 6.12.57-1)

Package: bash
Status: install ok installed
Architecture: amd64
Version: 5.2.37-2+b5
Source: bash (5.2.37-2)

Package: removed-one
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1
"""

TRACKER = {
    "openssl": {
        "CVE-2026-0001": {"description": "fixed in a security update",
                          "releases": {"trixie": {"status": "resolved", "urgency": "high",
                                                  "fixed_version": "3.5.1-1+deb13u1"}}},
        "CVE-2025-0002": {"releases": {"trixie": {"status": "resolved", "urgency": "medium",
                                                  "fixed_version": "3.5.0-1"}}},
        "CVE-2026-0003": {"description": "no fix yet",
                          "releases": {"trixie": {"status": "open", "urgency": "low"}}},
        "CVE-2024-0004": {"releases": {"trixie": {"status": "resolved", "urgency": "low",
                                                  "fixed_version": "0"}}},
        "CVE-2026-0005": {"releases": {"bookworm": {"status": "open", "urgency": "high"}}},
    },
    "linux": {
        "CVE-2026-0006": {"releases": {"trixie": {"status": "resolved",
                                                  "urgency": "not yet assigned",
                                                  "fixed_version": "6.12.118-1"}}},
    },
    "bash": {"CVE-2026-0007": {"releases": {"trixie": {"status": "undetermined",
                                                       "urgency": "unimportant"}}}},
    "removed-one": {"CVE-2026-0008": {"releases": {"trixie": {"status": "open",
                                                              "urgency": "high"}}}},
}


def test_installed_packages_from_dpkg_status(tmp_path: Path) -> None:
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_text(STATUS)
    pkgs = {p.name: p for p in cves.installed_packages(tmp_path)}
    assert sorted(pkgs) == ["bash", "libssl3t64", "linux-image-6.12.57+deb13-cloud-amd64",
                            "openssl"]
    assert (pkgs["libssl3t64"].source, pkgs["libssl3t64"].source_version) == \
        ("openssl", "3.5.1-1")
    assert pkgs["bash"].source_version == "5.2.37-2" and pkgs["bash"].version == "5.2.37-2+b5"
    kernel = pkgs["linux-image-6.12.57+deb13-cloud-amd64"]
    assert (kernel.source, kernel.source_version) == ("linux-signed-amd64", "6.12.57+1")
    assert kernel.built_using == (("linux", "6.12.57-1"),)


def test_a_system_image_reports_the_packages_of_the_release_it_runs(tmp_path: Path) -> None:
    """/var/lib/dpkg stays as the first release wrote it; the /usr copy is the running
    release's, and both the CVE report and the fleet inventory read it."""
    from cerulean.agent.fleetlink import packages

    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_text(STATUS)
    newer = STATUS.replace("Version: 5.2.37-2+b5", "Version: 5.2.37-2+b6")
    assert newer != STATUS
    (tmp_path / cves.USR_DPKG_STATUS).parent.mkdir(parents=True)
    (tmp_path / cves.USR_DPKG_STATUS).write_text(newer)
    pkgs = {p.name: p.version for p in cves.installed_packages(tmp_path)}
    assert pkgs["bash"] == "5.2.37-2+b6"
    assert next(p[:2] for p in packages(tmp_path) if p[0] == "bash") == ["bash", "5.2.37-2+b6"]


def test_report_lists_what_affects_the_host_worst_first(tmp_path: Path) -> None:
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_text(STATUS)
    fixture = tmp_path / "tracker.json"
    fixture.write_text(json.dumps(TRACKER))
    found = cves.affecting(cves.installed_packages(tmp_path), cves.load_tracker(fixture))
    assert [(f.cve, f.status, f.severity) for f in found] == [
        ("CVE-2026-0001", "fix-available", "high"),
        ("CVE-2026-0003", "no-fix-yet", "low"),
        ("CVE-2026-0006", "fix-available", "not yet assigned"),
        ("CVE-2026-0007", "undetermined", "unimportant"),
    ]
    first = found[0]
    assert first.packages == ("libssl3t64", "openssl") and first.installed == "3.5.1-1"
    assert first.fixed_version == "3.5.1-1+deb13u1"
    assert first.to_json()["description"] == "fixed in a security update"
    # On bookworm's data only the bookworm entry counts.
    assert [f.cve for f in cves.affecting(cves.installed_packages(tmp_path), TRACKER,
                                          release="bookworm")] == ["CVE-2026-0005"]


def test_a_tracker_file_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "t.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not the Security Tracker's JSON"):
        cves.load_tracker(bad)


@pytest.mark.parametrize(("a", "b", "want"), [
    ("1.0", "1.0", 0), ("1.0-1", "1.0-2", -1), ("1:1.0", "2.0", 1), ("1.0~rc1", "1.0", -1),
    ("1.0+b1", "1.0", 1), ("2.30-1", "2.4-1", 1), ("1.0a", "1.0", 1), ("1.0", "1.0.0", -1),
    ("3.5.1-1+deb13u1", "3.5.1-1", 1), ("6.12.118+1", "6.12.57+1", 1), ("0:1.0", "1.0", 0),
    ("1.0-1~bpo13+1", "1.0-1", -1), ("1.001", "1.1", 0), ("a", "~", 1), ("1.0+", "1.0-", 1),
])
def test_versions_compare_as_dpkg_compares_them(a: str, b: str, want: int) -> None:
    assert cves.compare_versions(a, b) == want
    assert cves.compare_versions(b, a) == -want


def valid(v: str) -> bool:
    try:
        Version(v)
    except ValueError:
        return False
    return True


def test_versions_agree_with_python_debian_on_real_and_random_versions() -> None:
    real = sorted({p.version for lock in ("vm", "edge") for pkgs in
                   read_lock(ROOT / "images" / f"{lock}.lock").packages.values()
                   for p in pkgs})
    rng = random.Random(5)
    alphabet = "0123456789.+~-abz:"
    made = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))).strip(":-")
            or "0" for _ in range(300)]
    made = [v for v in made if v[0].isdigit() and valid(v)]
    assert len(made) > 100
    pairs = list(itertools.combinations(real[:80], 2)) + list(itertools.pairwise(made))
    for a, b in pairs:
        want = version_compare(a, b)
        want = (want > 0) - (want < 0)
        assert cves.compare_versions(a, b) == want, (a, b)


def test_cli_report_on_this_machine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cerulean cve report` reads this machine's real dpkg status."""
    from cerulean.agent import cli

    bash = next(p for p in cves.installed_packages() if p.name == "bash")
    fixture = tmp_path / "tracker.json"
    fixture.write_text(json.dumps({"bash": {
        "CVE-2026-9999": {"releases": {"testing": {"status": "resolved", "urgency": "high",
                                                   "fixed_version": f"{bash.source_version}+z"}}},
        "CVE-2026-9998": {"releases": {"testing": {"status": "resolved", "urgency": "high",
                                                   "fixed_version": bash.source_version}}}}}))
    assert cli.main(["cve", "report", "--tracker", str(fixture), "--release", "testing"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["CVE-2026-9999", "high", "bash"]
    assert out[-1].startswith("1 CVE affects") and "1 with a fix available" in out[-1]
    assert cli.main(["cve", "report", "--tracker", str(fixture), "--release", "testing",
                     "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [f["cve"] for f in doc["findings"]] == ["CVE-2026-9999"] and doc["packages"] > 10
    assert cli.main(["cve", "report", "--tracker", str(tmp_path / "nope.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert cli.main(["cve", "report", "--tracker", str(tmp_path / "bad.json")]) == 1
    assert "is not the Security Tracker's JSON" in capsys.readouterr().err


class Tracker:
    """A local web server with the tracker's JSON, an ETag, and a log of its requests."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.body = json.dumps(TRACKER).encode()
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(dict(self.headers))
                etag = f'"{len(outer.body)}"'
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/tracker/data/json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_tracker_url_is_fetched_once_and_kept_while_fresh(tmp_path: Path) -> None:
    web = Tracker()
    cache = tmp_path / "cache/tracker.json"
    now = [1000.0]
    said: list[str] = []

    def fetch() -> Path:
        return cves.fetch_tracker(web.url, cache, max_age=3600, say=said.append,
                                  clock=lambda: now[0])

    try:
        assert cves.load_tracker(fetch()) == TRACKER and len(web.requests) == 1
        now[0] += 600
        fetch()
        assert len(web.requests) == 1  # fresh: not asked again
        now[0] += 3600
        fetch()
        assert web.requests[-1]["If-None-Match"] == f'"{len(web.body)}"'  # answered 304
        web.body = b'{"broken": '  # a bad document never replaces the good copy
        now[0] += 3600
        assert cves.load_tracker(fetch()) == TRACKER
        assert said and "could not be fetched" in said[-1]
    finally:
        web.server.shutdown()
        web.server.server_close()
    now[0] += 3600
    assert cves.load_tracker(fetch()) == TRACKER  # the server is gone: the cached copy
    with pytest.raises(cves.TrackerError, match="could not be fetched"):
        cves.fetch_tracker(web.url, tmp_path / "empty/t.json")
    with pytest.raises(cves.TrackerError, match="not an https:// URL"):
        cves.fetch_tracker("http://tracker.example/json", cache)


def test_a_malformed_version_in_the_tracker_skips_that_record_only(tmp_path: Path) -> None:
    """One bad epoch ("x:1.0") used to end the whole report with a ValueError."""
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_text(STATUS)
    tracker = copy.deepcopy(TRACKER)
    bad = {"releases": {"trixie": {"status": "resolved", "fixed_version": "x:9.9",
                                   "urgency": "high"}}}
    tracker["openssl"]["CVE-2026-9999"] = bad
    tracker["openssl"]["CVE-2026-9998"] = {"releases": {"trixie": {
        "status": "resolved", "fixed_version": 42, "urgency": "high"}}}
    skipped: list[str] = []
    found = cves.affecting(cves.installed_packages(tmp_path), tracker, skipped=skipped)
    assert [f.cve for f in found] == ["CVE-2026-0001", "CVE-2026-0003", "CVE-2026-0006",
                                      "CVE-2026-0007"]
    assert len(skipped) == 2 and "CVE-2026-9999 of openssl: cannot compare" in skipped[0]
