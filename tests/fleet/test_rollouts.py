"""Rollouts, policy assignment and compliance reports through a real fleet server, with the
agent's own code on host directories that play the updater's part (os-release and
state.json), on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from cerulean.agent import fleetlink
from cerulean.agent.compliance import STORE, PolicyStore
from cerulean.agent.daemon import load_agent_config
from cerulean.agent.policy import CheckResult, Report, RuleResult
from cerulean.agent.update.host import Host, load_config
from support.fleet_server import Fleet, cli

from .test_fleet_server import host_root

pytestmark = pytest.mark.fleet


def cerulean_host(tmp_path: Path, name: str, version: str = "1.20261101.0") -> Path:
    root = host_root(tmp_path, name)
    (root / "usr/lib").mkdir(parents=True)
    set_version(root, version)
    return root


def set_version(root: Path, version: str) -> None:
    (root / "usr/lib/os-release").write_text(
        f'PRETTY_NAME="Cerulean Linux"\nID=cerulean\nIMAGE_ID=vm\nIMAGE_VERSION={version}\n')


def give_up(root: Path, version: str) -> None:
    """What the updater leaves behind when a release failed its health check."""
    d = root / "var/lib/cerulean/update"
    d.mkdir(parents=True, exist_ok=True)
    (d / "state.json").write_text(json.dumps({"bad": {version: "health check failed"}}))


def fleet_update(root: Path) -> dict[str, object]:
    cfg = load_config(Host(root))
    return {"channel": cfg.channel, "target": cfg.target, "hold": cfg.hold,
            "window": cfg.window}


def enroll_group(fleet: Fleet, tmp_path: Path, group: str, n: int) -> dict[str, Path]:
    token = fleet.enrollment_token(group, uses=n)
    roots = {}
    for i in range(n):
        root = cerulean_host(tmp_path, f"{group}-{i}")
        fleetlink.enroll(fleet.url, token, fleet.ca_sha256, root=root, hostname=f"{group}-{i}")
        roots[fleetlink.Link(root).enrollment.host_id] = root
    return roots


def sync_all(roots: dict[str, Path]) -> None:
    for root in roots.values():
        r = fleetlink.sync(root, hostname=root.name)
        assert r.error == "" and r.failed == 0


def test_a_rollout_goes_wave_by_wave_and_hosts_outside_the_open_waves_hold(
        fleet: Fleet, tmp_path: Path) -> None:
    roots = enroll_group(fleet, tmp_path, "web", 8)
    sync_all(roots)
    status, r = fleet.api("POST", "/api/v1/rollouts", {
        "name": "November security", "group": "web", "target": "1.20261120.0", "waves": [25, 100],
        "soak_minutes": 0, "max_failure_percent": 50, "window": "daily 01:00-05:00"})
    # The first wave is a quarter of the hosts by their hashes (it may be none of 8).
    assert status == 201 and r["state"] == "running", r
    assert set(r["hosts"]) <= {"updating", "waiting"} and sum(r["hosts"].values()) == 8
    rid = r["id"]
    # A second rollout for the same group waits until this one ends.
    assert fleet.api("POST", "/api/v1/rollouts", {"name": "x", "group": "web"})[0] == 409

    _, d = fleet.api("GET", f"/api/v1/rollouts/{rid}")
    # The hosts of the open waves. (When no host's hash falls in the first quarter, that
    # wave is empty and the rollout has already opened the next.)
    first = {h["host_id"] for h in d["per_host"] if h["wave"] <= d["wave"]}
    sync_all(roots)
    for hid, root in roots.items():
        want = {"channel": "stable", "target": "1.20261120.0", "hold": hid not in first,
                "window": "daily 01:00-05:00"}
        assert fleet_update(root) == want, hid

    if d["wave"] == 0:
        # The first wave updates; the second opens and its hosts are let go.
        for hid in first:
            set_version(roots[hid], "1.20261120.0")
        sync_all(roots)
        _, d = fleet.api("GET", f"/api/v1/rollouts/{rid}")
        assert d["wave"] == 1 and d["state"] == "running"
        assert d["per_wave"][0] == {"done": len(first)}
        sync_all(roots)
    assert all(fleet_update(root)["hold"] is False for root in roots.values())

    for root in roots.values():
        set_version(root, "1.20261120.0")
    sync_all(roots)
    _, d = fleet.api("GET", f"/api/v1/rollouts/{rid}")
    assert (d["state"], d["hosts"]) == ("completed", {"done": 8})
    _, entries = fleet.api("GET", "/api/v1/audit")
    assert [e["action"] for e in entries if e["action"].startswith("rollout.")] == [
        "rollout.created", "rollout.wave-opened", "rollout.completed"]


def test_a_rollout_pauses_by_itself_when_too_many_hosts_fail(
        fleet: Fleet, tmp_path: Path) -> None:
    roots = enroll_group(fleet, tmp_path, "edge", 4)
    sync_all(roots)
    _, r = fleet.api("POST", "/api/v1/rollouts", {
        "name": "edge 1.2", "group": "edge", "target": "1.20261125.0", "waves": [100],
        "soak_minutes": 0, "max_failure_percent": 25})
    rid = r["id"]
    hosts = list(roots.values())
    set_version(hosts[0], "1.20261125.0")
    give_up(hosts[1], "1.20261125.0")
    give_up(hosts[2], "1.20261125.0")
    sync_all(roots)
    _, d = fleet.api("GET", f"/api/v1/rollouts/{rid}")
    assert d["state"] == "paused" and "2 of 3 finished hosts failed" in d["reason"]
    sync_all(roots)
    # The host that has not moved yet is held; the one that is done is not.
    assert fleet_update(hosts[3])["hold"] is True
    assert fleet_update(hosts[0])["hold"] is False

    # An operator looks, resumes (it pauses again at once: nothing changed), then aborts.
    assert fleet.api("POST", f"/api/v1/rollouts/{rid}/resume")[1]["state"] == "running"
    assert fleet.api("GET", f"/api/v1/rollouts/{rid}")[1]["state"] == "paused"
    assert fleet.api("POST", f"/api/v1/rollouts/{rid}/abort")[1]["state"] == "aborted"
    assert fleet.api("POST", f"/api/v1/rollouts/{rid}/abort")[0] == 409
    assert fleet.api("POST", f"/api/v1/rollouts/{rid}/explode")[0] == 400
    _, entries = fleet.api("GET", "/api/v1/audit")
    paused = [e for e in entries if e["action"] == "rollout.paused"]
    assert paused[0]["actor"] == "fleet" and paused[0]["detail"]["automatic"] is True


def test_a_group_policy_reaches_its_hosts_and_auditors_get_reports(
        fleet: Fleet, tmp_path: Path) -> None:
    roots = enroll_group(fleet, tmp_path, "db", 2)
    status, g = fleet.api("PUT", "/api/v1/groups/db/policy",
                          {"profiles": ["cis-debian12-l1-server"], "mode": "enforce"})
    assert status == 200 and (g["profiles"], g["mode"], g["hosts"]) == (
        ["cis-debian12-l1-server"], "enforce", 2)
    assert fleet.api("PUT", "/api/v1/groups/db/policy",
                     {"profiles": ["x"], "mode": "yolo"})[0] == 400
    one, two = roots.values()
    store = PolicyStore(one / STORE)
    store.save(Report("cis-debian12-l1-server", (
        CheckResult("sshd-permit-root", "no root login", "failed",
                    (RuleResult("f:/etc/ssh/sshd_config -> r:^PermitRootLogin no", False,
                                "=cmd|' /C calc'!A0"),), {}),
        CheckResult("tmp-noexec", "noexec /tmp", "passed", (), {}))), "enforce", time.time() - 60)
    store.close()
    sync_all(roots)
    for root in (one, two):
        cfg = load_agent_config(root)
        assert (cfg.policies, cfg.policy_mode) == (["cis-debian12-l1-server"], "enforce")
    # The host's audit trail says what the fleet set.
    trail = (one / "var/lib/cerulean/audit/audit.jsonl").read_text()
    assert '"action":"fleet.assigned"' in trail

    req = urllib.request.Request(
        fleet.url + "/api/v1/compliance/report?group=db&format=csv",
        headers={"Authorization": f"Bearer {fleet.admin}"})
    with urllib.request.urlopen(req, context=fleet.ctx()) as resp:
        assert resp.headers["Content-Type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(resp.read().decode())))
    assert [(r["profile"], r["check"], r["score"]) for r in rows] == [
        ("cis-debian12-l1-server", "sshd-permit-root", "50")]
    assert rows[0]["evidence"] == ("f:/etc/ssh/sshd_config -> r:^PermitRootLogin no: "
                                   "=cmd|' /C calc'!A0")
    req = urllib.request.Request(
        fleet.url + "/api/v1/compliance/report?group=db&format=html",
        headers={"Authorization": f"Bearer {fleet.admin}"})
    with urllib.request.urlopen(req, context=fleet.ctx()) as resp:
        page = resp.read().decode()
    assert "sshd-permit-root" in page and "<script" not in page
    status, hist = fleet.api("GET", "/api/v1/compliance/history?group=db")
    assert status == 200 and [(h["profile"], h["score"], h["hosts"]) for h in hist] == [
        ("cis-debian12-l1-server", 50.0, 1)]


def release_repository(tmp_path: Path) -> Any:
    """An update repository whose stable channel has two releases that fix CVEs."""
    from datetime import UTC, datetime

    from cerulean.protocol.update import (
        ChannelDoc,
        ChannelEntry,
        PackageChange,
        ReleaseDoc,
        release_path,
        utc_iso,
    )
    from cerulean.release.repo import Repository

    repo = Repository.create(tmp_path / "repo", tmp_path / "keys")
    cves = {"1.20261101.0": ("CVE-2026-1111",),
            "1.20261120.0": ("CVE-2026-2222", "CVE-2026-3333")}
    repo.add_targets({release_path("vm", v): json.dumps(ReleaseDoc(
        "vm", v, "2026-11-20T00:00:00Z", None, {},
        (PackageChange("openssl", "3.5.1-1", "3.5.1-2", c),)).to_json()).encode()
        for v, c in cves.items()})
    repo.save_channel(ChannelDoc("stable", [
        ChannelEntry("vm", v, utc_iso(datetime.now(UTC)), [(0, 1.0)]) for v in cves]))
    return repo


def test_rollouts_choose_from_the_update_repository(fleet: Fleet, tmp_path: Path) -> None:

    repo = release_repository(tmp_path)
    # Without a root to verify it by (a fleet.toml from before update-root), the fleet
    # does not read it, and says what to do.
    toml = fleet.data / "fleet.toml"
    toml.write_text(toml.read_text().replace('update-repo = ""',
                                             f'update-repo = "{repo.path}"'))
    fleet.kill_and_restart()
    status, body = fleet.api("GET", "/api/v1/releases")
    assert status == 503 and body["detail"].startswith(
        "The fleet has an update-repo but no update-root to verify it by")
    cli("fleet", "init", "--data", str(fleet.data), "--update-repo", str(repo.path),
        "--update-root", str(repo.meta / "1.root.json"))
    fleet.kill_and_restart()
    status, rel = fleet.api("GET", "/api/v1/releases")
    assert status == 200 and [(r["channel"], r["version"], r["cves"], r["cve_count"])
                              for r in rel] == [
        ("stable", "1.20261120.0", ["CVE-2026-2222", "CVE-2026-3333"], 2),
        ("stable", "1.20261101.0", ["CVE-2026-1111"], 1)]
    enroll_group(fleet, tmp_path, "web", 1)
    status, body = fleet.api("POST", "/api/v1/rollouts", {
        "name": "typo", "group": "web", "target": "1.20261121.0"})
    assert status == 400 and body["detail"] == (
        "Release 1.20261121.0 is not in the stable channel of the update repository "
        "(newest there: 1.20261120.0, 1.20261101.0).")
    assert fleet.api("POST", "/api/v1/rollouts", {
        "name": "ok", "group": "web", "target": "1.20261120.0"})[0] == 201
    # A channel document changed behind the targets metadata's back is refused.
    tampered = repo.target_file("channels/stable.json")
    tampered.write_bytes(tampered.read_bytes().replace(b"1.20261120.0", b"1.20261199.0"))
    (repo.path / "metadata/timestamp.json").touch()
    status, body = fleet.api("GET", "/api/v1/releases")
    assert status == 503 and body["detail"] == (
        "The update repository's channels/stable.json does not match its signed length and "
        "hash; refusing it.")
