"""``cerulean demo``: the whole story on one machine.

It starts a fleet server (SQLite), boots a Cerulean disk image in QEMU with the
systemd credential ``cerulean.fleet`` (the way a cloud's user data would hand
it in), waits until the image's agent has enrolled by itself and reported its
inventory, alerts and compliance, and prints the dashboard's address and login.
The server and the VM keep running until Ctrl-C.

Everything lives in one directory (default ``out/fleet-demo``): the fleet's data,
the login (``demo-login``, mode 0600), the server's log and the VM's console.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cerulean.errors import CeruleanError
from cerulean.testbed import process
from cerulean.testbed.guest import credential_args
from cerulean.testbed.qemu import QemuConfig, prepare

GROUP = "demo"
GUEST_HOST = "10.0.2.2"  # this machine, as QEMU's user network shows it to the guest
COMPLIANCE_WAIT_S = 600


def _cli(*args: str, stdin: str = "") -> str:
    r = subprocess.run([sys.executable, "-m", "cerulean.cli", *args], input=stdin,
                       text=True, capture_output=True)
    if r.returncode != 0:
        raise CeruleanError(f"`cerulean {' '.join(args[:2])}` failed: "
                            f"{(r.stderr or r.stdout).strip()}")
    return r.stdout


class Api:
    def __init__(self, url: str, token: str, ca: Path) -> None:
        self.url, self.token = url, token
        self.ctx = ssl.create_default_context(cafile=str(ca))

    def get(self, path: str) -> Any:
        req = urllib.request.Request(self.url + path,
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, context=self.ctx, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: Any) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     method="POST", headers={
                                         "Authorization": f"Bearer {self.token}",
                                         "Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=self.ctx, timeout=10) as r:
            return json.loads(r.read())


def _login(data: Path) -> tuple[str, str]:
    """(password, API token) of the demo's admin, made once and kept in the directory."""
    path = data / "demo-login"
    if path.exists():
        saved = json.loads(path.read_text())
        return saved["password"], saved["token"]
    password = secrets.token_urlsafe(12)
    token = _cli("fleet", "user", "add", "admin", "--role", "admin", "--password-stdin",
                 "--data", str(data), stdin=password + "\n").strip()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"password": password, "token": token}, f)
    return password, token


def _wait_up(api: Api, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise CeruleanError(f"The fleet server stopped: {process.tail(log, 5)}")
        try:
            api.get("/api/v1/health")
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise CeruleanError("The fleet server did not answer within a minute.")


@dataclass
class LocalFleet:
    api: Api
    url: str  # as this machine reaches it
    password: str  # the admin's
    server: subprocess.Popen[bytes]
    log: Path

    def guest_credential(self, group: str, labels: dict[str, str]) -> str:
        """The ``cerulean.fleet`` credential a QEMU guest enrolls with (one use, 2 hours)."""
        created = self.api.post("/api/v1/enrollment-tokens", {
            "group": group, "uses": 1, "hours": 2, "labels": labels})
        port = self.url.rsplit(":", 1)[1]
        return json.dumps({"server": f"https://{GUEST_HOST}:{port}",
                           "token": created["token"], "ca-sha256": created["ca_sha256"]})


@contextmanager
def local_fleet(data: Path, port: int, log: Path) -> Iterator[LocalFleet]:
    """A fleet server of its own (SQLite) in *data*, made the first time, serving on
    127.0.0.1:*port* (which QEMU guests reach as GUEST_HOST); stopped on exit."""
    url = f"https://localhost:{port}"
    if not (data / "fleet.toml").exists():
        _cli("fleet", "init", "--data", str(data), "--listen", f"127.0.0.1:{port}",
             "--public-url", url, "--name", "localhost", "--name", "127.0.0.1",
             "--name", GUEST_HOST)
    password, token = _login(data)
    api = Api(url, token, data / "ca.crt")
    with open(log, "ab") as out:
        # Stopped below; should this process be killed outright, the kernel stops it.
        server = subprocess.Popen([sys.executable, "-m", "cerulean.cli", "fleet", "serve",
                                   "--data", str(data)], stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=process.die_with_parent(signal.SIGTERM))
    try:
        _wait_up(api, server, log)
        yield LocalFleet(api, url, password, server, log)
    finally:
        process.stop(server, 10)


def run_demo(disk: Path, data: Path, port: int = 8443, timeout_s: float = 1200,
             wait: bool = True, say: Callable[[str], None] = print) -> int:
    if not disk.is_file():
        raise CeruleanError(f"{disk} does not exist: build it with `cerulean build "
                            "images/vm.toml --arch amd64 --format qcow2`.")
    data.mkdir(parents=True, exist_ok=True)
    fleet_dir = data / "fleet"
    vm: subprocess.Popen[bytes] | None = None
    work: Path | None = None  # the VM's overlay disk and firmware variables
    try:
        with local_fleet(fleet_dir, port, data / "server.log") as fleet:
            api = fleet.api
            say(f"Fleet server on {fleet.url} (log: {fleet.log})")
            credential = fleet.guest_credential(GROUP, {"environment": "cloud",
                                                        "region": "local"})
            before = {h["id"] for h in api.get(f"/api/v1/hosts?group={GROUP}")["hosts"]}
            work = Path(tempfile.mkdtemp(prefix="cerulean-demo-"))
            console = data / "vm-console.log"
            # The first policy run comes 15 minutes after boot; the demo brings it forward.
            cfg = QemuConfig(extra_args=(
                *credential_args("cerulean.fleet", credential),
                *credential_args("systemd.unit-dropin.cerulean-policy.timer",
                                 "[Timer]\nOnBootSec=30s\nRandomizedDelaySec=0\n")))
            launch = prepare(disk, cfg, work, console=console)
            vm = process.start(launch.argv, stderr=data / "qemu.stderr")
            say(f"Booting {disk.name} in QEMU ({launch.accel.accel}); its agent enrolls by "
                f"itself with the credential cerulean.fleet (console: {console})")
            host = _wait_for_host(api, before, vm, timeout_s, say, console)
            say("")
            say(f"  Dashboard:  {fleet.url}/hosts/{host['id']}")
            say(f"  Log in as:  admin / {fleet.password}   (also in "
                f"{fleet_dir / 'demo-login'})")
            say(f"  Host:       {host['hostname']} ({host['os']}), {host['packages']} "
                f"packages, {host['open_alerts']} open alerts, compliance "
                f"{host['compliance'] or 'on its first policy run'}")
            say("  The browser will warn about the fleet's own CA: " + str(fleet_dir / "ca.crt"))
            if wait:
                say("Press Ctrl-C to stop the VM and the server.")
                while vm.poll() is None and fleet.server.poll() is None:
                    time.sleep(2)
            return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if vm is not None:
            process.stop(vm, 10)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def _wait_for_host(api: Api, before: set[str], vm: subprocess.Popen[bytes],
                   timeout_s: float, say: Callable[[str], None],
                   console: Path | None = None) -> dict[str, Any]:
    with _Progress(console) as progress:
        return _poll_host(api, before, vm, timeout_s, say, progress)


class _Progress:
    """On a terminal, one status line: how long the demo has waited and the VM's console."""

    def __init__(self, console: Path | None) -> None:
        from rich.console import Console

        self.con = Console(stderr=True, highlight=False)
        self.console = console
        self.started = time.monotonic()
        self.status = self.con.status("", spinner="dots") if self.con.is_terminal else None

    def __enter__(self) -> _Progress:
        if self.status is not None:
            self.status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.stop()

    def update(self, state: str) -> None:
        if self.status is None:
            return
        from rich.markup import escape

        from cerulean.testbed.console import scan

        line = ""
        if self.console is not None and self.console.exists():
            with self.console.open("rb") as f:
                f.seek(max(0, self.console.stat().st_size - 4096))
                line = scan(f.read()).last_line
        room = max(20, self.con.width - len(state) - 16)
        line = line if len(line) <= room else line[:room - 1] + "…"
        self.status.update(f"{state} ({time.monotonic() - self.started:.0f} s)  "
                           f"[dim]{escape(line)}[/]")


def _poll_host(api: Api, before: set[str], vm: subprocess.Popen[bytes], timeout_s: float,
               say: Callable[[str], None], progress: _Progress) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    said = ""
    inventory_at = 0.0
    while time.monotonic() < deadline:
        if vm.poll() is not None:
            raise CeruleanError(f"The VM stopped (exit {vm.returncode}) before it enrolled.")
        hosts = [h for h in api.get(f"/api/v1/hosts?group={GROUP}")["hosts"]
                 if h["id"] not in before]
        state = "waiting for the VM to enroll"
        if hosts:
            h = hosts[0]
            state = f"{h['hostname']} enrolled; waiting for its inventory"
            if h["packages"]:
                inventory_at = inventory_at or time.monotonic()
                state = f"{h['hostname']} reported {h['packages']} packages; waiting for " \
                        "its first compliance result"
                # The policy run's result comes with a later report; it may be slow
                # under emulation, so the demo does not wait for it for ever.
                if h["compliance"] or time.monotonic() - inventory_at > COMPLIANCE_WAIT_S:
                    return dict(h)
        if state != said:
            say(state)
            said = state
        progress.update(state)
        time.sleep(3)
    raise CeruleanError(f"The VM did not enroll within {timeout_s:.0f} s; see its console.")
