"""The web dashboard in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
log in, filter hosts, open a host, start and pause a rollout, read a compliance report, see
the releases of the update repository and the CVEs they fix."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cerulean.agent import fleetlink
from cerulean.agent.audit import AuditLog
from cerulean.agent.compliance import STORE, PolicyStore
from cerulean.agent.policy import CheckResult, Report, RuleResult
from support.fleet_server import Fleet, cli

from .test_rollouts import cerulean_host, release_repository

pytestmark = pytest.mark.fleet
CHROMIUM = "/usr/bin/chromium"
PASSWORD = "correct horse battery staple"


@pytest.fixture(params=["sqlite"])
def database(request: pytest.FixtureRequest) -> str:
    return ""  # the browser tests need one database; both run the API tests


@pytest.fixture
def page(fleet: Fleet) -> Iterator[object]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing (make test installs Debian's chromium).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        # The fleet's CA is not one the browser knows.
        context = browser.new_context(ignore_https_errors=True, base_url=fleet.url)
        p = context.new_page()
        p.set_default_timeout(30000)
        yield p
        context.close()
        browser.close()


def _host(fleet: Fleet, tmp_path: Path, name: str, token: str, score_fail: bool) -> str:
    root = cerulean_host(tmp_path, name)
    fleetlink.enroll(fleet.url, token, fleet.ca_sha256, root=root, hostname=name)
    if score_fail:
        AuditLog(root / "var/lib/cerulean/audit/audit.jsonl").append(
            "guard", "alert.new-uid0-account",
            {"rule": "new-uid0-account", "priority": "critical", "tags": [],
             "message": "toor has UID 0", "time": time.time(), "evidence": {"user": "toor"}})
    store = PolicyStore(root / STORE)
    store.save(Report("cerulean-baseline", (
        CheckResult("ssh-no-root", "no root login", "failed" if score_fail else "passed",
                    (RuleResult("f:/etc/ssh/sshd_config", not score_fail,
                                "PermitRootLogin yes"),), {}),
        CheckResult("tmp-noexec", "noexec /tmp", "passed", (), {}))), "audit", time.time())
    store.close()
    assert fleetlink.sync(root, hostname=name).error == ""
    return fleetlink.Link(root).enrollment.host_id


def test_dashboard_login_hosts_host_rollout_and_report(page, fleet: Fleet,  # type: ignore[no-untyped-def]
                                                       tmp_path: Path) -> None:
    from playwright.sync_api import expect

    cli("fleet", "user", "add", "olga", "--role", "operator", "--password-stdin",
        "--data", str(fleet.data), stdin=PASSWORD + "\n")
    cloud = fleet.enrollment_token("web", uses=2, environment="cloud")
    edge = fleet.enrollment_token("kiosk", uses=1, environment="edge")
    _host(fleet, tmp_path, "web-1", cloud, score_fail=False)
    _host(fleet, tmp_path, "web-2", cloud, score_fail=True)
    kiosk = _host(fleet, tmp_path, "kiosk-1", edge, score_fail=True)

    # Not logged in: every page sends the browser to the login form.
    page.goto("/hosts")
    expect(page).to_have_url(re.compile(r"/login$"))
    page.fill("input[name=name]", "olga")
    page.fill("input[name=password]", "wrong password")
    page.click("button[type=submit]")
    expect(page.get_by_role("alert")).to_have_text("Wrong name or password.")
    page.fill("input[name=name]", "olga")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("#hosts-total")).to_have_text("3")
    expect(page.locator("#alerts-open")).to_have_text("2")

    # Filter the hosts.
    page.click("text=Hosts")
    expect(page.locator("#host-count")).to_have_text("3 hosts")
    page.select_option("select[name=environment]", "edge")
    page.click("text=Filter")
    expect(page.locator("#host-count")).to_have_text("1 host")
    expect(page.locator("#hosts")).to_contain_text("environment=edge")

    # Open the host: its packages, compliance score and alert.
    page.click(f"a[href='/hosts/{kiosk}']")
    expect(page.locator("#hostname")).to_have_text(re.compile(r".+"))
    expect(page.locator("#compliance .score")).to_have_text("50%")
    expect(page.locator("#alerts")).to_contain_text("new-uid0-account")
    count = int(page.locator("#package-count").inner_text())
    assert count == len(fleetlink.packages(tmp_path / "kiosk-1")) > 50

    # Start a rollout to the web group, then pause it.
    page.click("text=Rollouts")
    page.fill("#new-rollout input[name=name]", "web 1.20261120")
    page.select_option("#new-rollout select[name=group]", "web")
    page.fill("#new-rollout input[name=target]", "1.20261120.0")
    page.fill("#new-rollout input[name=waves]", "50,100")
    page.click("#new-rollout button[type=submit]")
    expect(page.locator("#rollout-state")).to_have_text("running")
    expect(page.locator("#rollout-hosts")).to_contain_text("web-2")
    page.click("#pause")
    expect(page.locator("#rollout-state")).to_have_text("paused")
    expect(page.locator("#rollout-reason")).to_have_text("paused by olga")
    status, body = fleet.api("GET", "/api/v1/rollouts?group=web")
    assert status == 200 and body[0]["state"] == "paused"

    # Read the compliance report of the web group.
    page.click("text=Policies")
    page.click("#groups >> text=HTML >> nth=1")
    expect(page.locator("h1")).to_have_text("Compliance of group web")
    expect(page.locator("body")).to_contain_text("ssh-no-root")
    expect(page.locator("body")).to_contain_text("PermitRootLogin yes")

    # The audit log shows what olga did, and its chain holds.
    page.goto("/audit")
    page.click("#verify")
    expect(page.locator("#chain")).to_contain_text("intact")
    expect(page.locator("#audit")).to_contain_text("rollout.paused")
    expect(page.locator("#audit")).to_contain_text("olga")


def test_forms_need_the_session_token(page, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    cli("fleet", "user", "add", "olga", "--role", "operator", "--password-stdin",
        "--data", str(fleet.data), stdin=PASSWORD + "\n")
    page.goto("/login")
    page.fill("input[name=name]", "olga")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    r = page.request.post("/policies", form={"csrf": "forged", "group": "web",
                                             "profiles": "cerulean-baseline",
                                             "mode": "enforce"}, max_redirects=0)
    assert r.status == 303 and "out+of+date" in r.headers["location"]
    assert fleet.api("GET", "/api/v1/groups")[1] == []


def _log_in(page, name: str) -> None:  # type: ignore[no-untyped-def]
    page.goto("/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")


def test_people_and_tokens_are_made_in_the_dashboard(  # type: ignore[no-untyped-def]
        page, fleet: Fleet, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    cli("fleet", "user", "add", "ada", "--role", "admin", "--password-stdin",
        "--data", str(fleet.data), stdin=PASSWORD + "\n")
    _log_in(page, "ada")
    page.click("text=Access")
    # An enrollment token, shown once with its command; a host enrolls with it.
    page.fill("#new-enrollment-token input[name=group]", "lab")
    page.select_option("#new-enrollment-token select[name=environment]", "on-prem")
    page.click("#new-enrollment-token button[type=submit]")
    token = page.locator("#secret").inner_text()
    expect(page.locator("#command")).to_contain_text(f"--token {token} --ca-sha256 "
                                                     f"{fleet.ca_sha256}")
    expect(page.locator("#enrollment-tokens")).to_contain_text("environment=on-prem")
    host_id = _host(fleet, tmp_path, "lab-1", token, score_fail=False)
    status, body = fleet.api("GET", f"/api/v1/hosts/{host_id}")
    assert status == 200 and body["group"] == "lab"
    assert body["labels"]["environment"] == "on-prem"

    # A user who may log in, then an API token for them that works.
    page.fill("#new-user input[name=name]", "otto")
    page.select_option("#new-user select[name=role]", "auditor")
    page.fill("#new-user input[name=password]", "short")
    # The browser would refuse it itself; the server must too.
    page.locator("#new-user input[name=password]").evaluate(
        "e => e.removeAttribute('minlength')")
    page.click("#new-user button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("at least 12 characters")
    page.fill("#new-user input[name=name]", "otto")
    page.select_option("#new-user select[name=role]", "auditor")
    page.fill("#new-user input[name=password]", PASSWORD)
    page.click("#new-user button[type=submit]")
    expect(page.locator("#users")).to_contain_text("otto")
    page.select_option("#new-api-token select[name=user]", "otto")
    page.select_option("#new-api-token select[name=role]", "auditor")
    page.fill("#new-api-token input[name=days]", "7")
    page.click("#new-api-token button[type=submit]")
    api_token = page.locator("#secret").inner_text()
    assert fleet.api("GET", "/api/v1/whoami", token=api_token) == (
        200, {"name": "otto", "role": "auditor"})
    # The token cannot be more than its user.
    page.select_option("#new-api-token select[name=user]", "otto")
    page.select_option("#new-api-token select[name=role]", "admin")
    page.click("#new-api-token button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("cannot be given the admin role")
    actions = [e["action"] for e in fleet.api("GET", "/api/v1/audit")[1]]
    assert {"enrollment-token.created", "user.created", "api-token.created"} <= set(actions)

    # otto, an auditor, sees the tokens but none of the forms.
    page.click("text=Log out")
    _log_in(page, "otto")
    page.goto("/access")
    expect(page.locator("#enrollment-tokens")).to_contain_text("lab")
    assert page.locator("#new-enrollment-token").count() == 0
    assert page.locator("#new-user").count() == 0


def test_releases_show_the_cves_they_fix(  # type: ignore[no-untyped-def]
        page, fleet: Fleet, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    repo = release_repository(tmp_path)
    cli("fleet", "init", "--data", str(fleet.data), "--update-repo", str(repo.path),
        "--update-root", str(repo.meta / "1.root.json"))
    fleet.kill_and_restart()
    cli("fleet", "user", "add", "otto", "--role", "auditor", "--password-stdin",
        "--data", str(fleet.data), stdin=PASSWORD + "\n")
    _log_in(page, "otto")
    page.click("text=Rollouts")
    rows = page.locator("#releases-table tr")
    expect(rows).to_have_count(3)
    newest, older = rows.nth(1), rows.nth(2)
    expect(newest).to_contain_text("1.20261120.0")
    expect(newest.locator(".cves summary")).to_have_text("2 CVEs")
    expect(older.locator(".cves summary")).to_have_text("1 CVE")
    # The list opens on a click; each CVE links to Debian's security tracker.
    link = newest.locator(".cves a", has_text="CVE-2026-3333")
    expect(link).not_to_be_visible()
    newest.locator(".cves summary").click()
    expect(link).to_be_visible()
    assert link.get_attribute("href") == (
        "https://security-tracker.debian.org/tracker/CVE-2026-3333")
    assert page.locator(".error").count() == 0

    # A repository that no longer verifies: the page says why instead of listing it.
    tampered = repo.target_file("channels/stable.json")
    tampered.write_bytes(tampered.read_bytes().replace(b"1.20261101.0", b"1.20261102.0"))
    (repo.path / "metadata/timestamp.json").touch()
    page.reload()
    expect(page.get_by_role("alert")).to_have_text(
        "The update repository's channels/stable.json does not match its signed length and "
        "hash; refusing it.")
    assert page.locator("#releases-table").count() == 0
