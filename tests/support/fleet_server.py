"""A real fleet server on this machine's loopback, as the fleet and vm tests start it.

The server runs as its own process (``cerulean fleet serve``) on data made with
``cerulean fleet init``; :class:`Fleet` is the handle the tests call its API with.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cerulean.fleet.pgtemp import TempPostgres


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Fleet:
    data: Path
    url: str
    admin: str  # an admin's API token
    ca_sha256: str
    proc: subprocess.Popen[bytes]
    log: Path
    postgres: TempPostgres | None = None  # the database's server, when it is PostgreSQL

    def ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.data / "ca.crt"))

    def api(self, method: str, path: str, body: Any = None, token: str | None = None,
            ctx: ssl.SSLContext | None = None) -> tuple[int, Any]:
        """(status, JSON body) of one call; token None: the admin's, "" none at all."""
        token = self.admin if token is None else token
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, context=ctx or self.ctx(), timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def enrollment_token(self, group: str = "web", uses: int = 1, **labels: str) -> str:
        status, body = self.api("POST", "/api/v1/enrollment-tokens",
                                {"group": group, "uses": uses, "labels": labels})
        assert status == 201, body
        return str(body["token"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def kill_and_restart(self) -> None:
        """kill -9, then start the server again on the same data."""
        self.proc.kill()
        self.proc.wait(20)
        self.proc = start_server(self.data, self.log)
        wait_ready(self.url, self.ctx(), self.proc)


def cli(*args: str, stdin: str = "") -> str:
    r = subprocess.run([sys.executable, "-m", "cerulean.cli", *args], input=stdin, text=True,
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def start_server(data: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cerulean.cli", "fleet", "serve",
                                 "--data", str(data)], stdout=out, stderr=subprocess.STDOUT)
    return proc


def wait_ready(url: str, ctx: ssl.SSLContext, proc: subprocess.Popen[bytes],
               timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the fleet server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/api/v1/health", context=ctx, timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise AssertionError("the fleet server did not answer within a minute")


def launch(tmp_path: Path, *, names: tuple[str, ...] = (), database: str = "",
           public_url: bool = True, postgres: TempPostgres | None = None,
           init_args: tuple[str, ...] = ()) -> Fleet:
    """``fleet init`` in *tmp_path*/fleet, an admin, and the server, answering.

    *names* are extra names for the server's certificate (10.0.2.2 for a QEMU guest);
    *database* is a PostgreSQL URL, or empty for the data directory's SQLite;
    *init_args* go to ``fleet init`` as they are.
    """
    data, port = tmp_path / "fleet", free_port()
    args = ["fleet", "init", "--data", str(data), "--listen", f"127.0.0.1:{port}"]
    if public_url:
        args += ["--public-url", f"https://localhost:{port}"]
    for name in names:
        args += ["--name", name]
    if database:
        args += ["--database", database]
    out = cli(*args, *init_args)
    ca_sha256 = next(w for w in out.split() if w.startswith("sha256:"))
    admin = cli("fleet", "user", "add", "root-admin", "--role", "admin", "--data",
                str(data)).strip()
    log = tmp_path / "server.log"
    proc = start_server(data, log)
    f = Fleet(data, f"https://localhost:{port}", admin, ca_sha256, proc, log, postgres)
    try:
        wait_ready(f.url, f.ctx(), proc)
    except BaseException:
        f.stop()
        raise
    return f
