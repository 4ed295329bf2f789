"""``cerulean fleet simulate``: many agents from one process, to load a fleet server.

Each simulated host does what a real agent does, over the network:

- it makes its own key and certificate request, and enrolls with the token;
- over mTLS, with its own certificate, it checks in: a batch holding its
  metrics, its inventory on the first check-in (a few hundred packages), and
  now and then an alert. Like the agent, it opens a new TLS connection for each
  check-in; with *keep_alive* it keeps one connection open instead, as an agent
  that checks in every few seconds would;
- it keeps each report in memory until the server acknowledges it, and sends
  it again if the check-in failed.

At the end, every host asks the server how many of its reports it holds
(``GET /agent/self``). That number must equal what the host had acknowledged:
nothing acknowledged may be lost, and nothing counted twice.

The simulator speaks HTTP/1.1 itself, over uvloop's streams, so that the CPU it
shares with a server on the same machine goes to the load rather than to itself.

Check-ins run closed-loop: *concurrency* of them are in flight at any time,
each host waiting *interval* seconds between its own check-ins. The result
gives check-ins per second and latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import ssl
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cerulean.errors import CeruleanError
from cerulean.protocol.fleet import CA_PATH, ENROLL_PATH, REPORTS_PATH, SELF_PATH, ca_fingerprint

PACKAGES = [[f"pkg{i:03d}", f"1.{i}.{i % 7}-1", "amd64"] for i in range(300)]


class SimulateError(CeruleanError):
    pass


class HTTPStatusError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


class Conn:
    """One client's HTTP/1.1 connection to the server over TLS: JSON requests with a
    Content-Length, answers with one (as uvicorn sends them). With *keep*, the
    connection stays open for the next request; a kept connection the server has closed
    meanwhile is opened again once."""

    def __init__(self, url: str, ctx: ssl.SSLContext, keep: bool = False,
                 timeout: float = 30.0) -> None:
        u = urlsplit(url)
        if u.scheme != "https" or not u.hostname:
            raise SimulateError(f"{url!r} is not an https:// server address.")
        self.host, self.port, self.netloc = u.hostname, u.port or 443, u.netloc
        self.ctx, self.keep, self.timeout = ctx, keep, timeout
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON (or text) answer; HTTPStatusError for a status of 400 or more."""
        data = b"" if body is None else json.dumps(body).encode()
        reused = self._w is not None
        try:
            return await asyncio.wait_for(self._once(method, path, data), self.timeout)
        except (OSError, asyncio.IncompleteReadError) as e:
            self.close()
            if not reused or (isinstance(e, asyncio.IncompleteReadError) and e.partial):
                raise
        # The server closed the idle connection as this request went out. Every request
        # the simulator makes may be sent twice (reports are stored once by their ID).
        return await asyncio.wait_for(self._once(method, path, data), self.timeout)

    async def _once(self, method: str, path: str, data: bytes) -> Any:
        if self._w is None:
            self._r, self._w = await asyncio.open_connection(self.host, self.port,
                                                             ssl=self.ctx)
        assert self._r is not None
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.netloc}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                + ("" if self.keep else "Connection: close\r\n") + "\r\n")
        self._w.write(head.encode() + data)
        raw = await self._r.readuntil(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in lines:
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        if "content-length" not in headers:
            raise SimulateError("The server answered without a Content-Length.")
        payload = await self._r.readexactly(int(headers["content-length"]))
        if not self.keep or headers.get("connection", "").lower() == "close":
            self.close()
        answer: Any = payload.decode()
        if headers.get("content-type", "").startswith("application/json"):
            answer = json.loads(payload)
        if status >= 400:
            raise HTTPStatusError(status, answer)
        return answer

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
        self._r = self._w = None


# What a request may fail with: the connection, the time, the answer or its status.
FAILURES = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
            HTTPStatusError, SimulateError)


@dataclass
class SimHost:
    name: str
    ctx: ssl.SSLContext | None = None
    host_id: str = ""
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    seq: int = 0
    conn: Conn | None = None
    pending: list[dict[str, Any]] = field(default_factory=list)
    acknowledged: int = 0
    checkins: int = 0

    def report(self, kind: str, body: dict[str, Any]) -> None:
        self.seq += 1
        self.pending.append({"id": f"{self.host_id}:{self.epoch}:{self.seq}", "kind": kind,
                             "created": time.time(), "body": body})


@dataclass
class Result:
    hosts: int
    enrolled: int
    enroll_seconds: float
    checkins: int
    failed_checkins: int
    seconds: float
    latencies_ms: list[float]
    reports_made: int
    reports_acknowledged: int
    reports_on_server: int
    reports_pending: int
    mismatched_hosts: int
    errors: dict[str, int]
    later_ms: list[float] = field(default_factory=list)  # check-ins after a host's first

    @property
    def rate(self) -> float:
        return self.checkins / self.seconds if self.seconds else 0.0

    def percentile(self, p: float, of: list[float] | None = None) -> float:
        xs = sorted(self.latencies_ms if of is None else of)
        return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else 0.0

    @property
    def lost(self) -> int:
        """Acknowledged by the server but not held by it (must be 0)."""
        return max(0, self.reports_acknowledged - self.reports_on_server)

    def to_json(self) -> dict[str, Any]:
        return {"hosts": self.hosts, "enrolled": self.enrolled,
                "enroll_seconds": round(self.enroll_seconds, 1),
                "checkins": self.checkins, "failed_checkins": self.failed_checkins,
                "seconds": round(self.seconds, 1), "checkins_per_second": round(self.rate, 1),
                "p50_ms": round(self.percentile(50), 1), "p99_ms": round(self.percentile(99), 1),
                # Without each host's first check-in, which carries its whole inventory.
                "later_p50_ms": round(self.percentile(50, self.later_ms), 1),
                "later_p99_ms": round(self.percentile(99, self.later_ms), 1),
                "mean_ms": round(statistics.fmean(self.latencies_ms), 1)
                if self.latencies_ms else 0.0,
                "reports_made": self.reports_made,
                "reports_acknowledged": self.reports_acknowledged,
                "reports_on_server": self.reports_on_server,
                "reports_pending": self.reports_pending, "lost": self.lost,
                "mismatched_hosts": self.mismatched_hosts, "errors": self.errors}


def _key_and_csr(name: str) -> tuple[bytes, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            csr.public_bytes(serialization.Encoding.PEM).decode())


def _client_ctx(ca_pem: str, cert_pem: str, key_pem: bytes, work: Path, name: str
                ) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.check_hostname = False  # the simulator may name the server by any address
    cert, key = work / f"{name}.crt", work / f"{name}.key"
    cert.write_text(cert_pem)
    key.write_bytes(key_pem)
    ctx.load_cert_chain(cert, key)
    cert.unlink()
    key.unlink()
    return ctx


class Simulator:
    def __init__(self, server: str, token: str, ca_sha256: str, hosts: int, work: Path,
                 concurrency: int = 64, interval: float = 0.0, alert_every: int = 20,
                 timeout: float = 30.0, say: Callable[[str], None] = print,
                 keep_alive: bool = False) -> None:
        self.server, self.token, self.ca_sha256 = server.rstrip("/"), token, ca_sha256
        self.n, self.work, self.concurrency = hosts, work, concurrency
        self.interval, self.alert_every, self.timeout, self.say = (interval, alert_every,
                                                                   timeout, say)
        self.keep_alive = keep_alive
        self.hosts: list[SimHost] = []
        self.errors: dict[str, int] = {}
        self._sem = asyncio.Semaphore(concurrency)
        self.ca_pem = ""

    def _error(self, e: BaseException) -> None:
        key = type(e).__name__
        if isinstance(e, HTTPStatusError):
            key = f"HTTP {e.status}"
        self.errors[key] = self.errors.get(key, 0) + 1

    async def fetch_ca(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        self.ca_pem = str(await Conn(self.server, ctx, timeout=self.timeout)
                          .request("GET", CA_PATH))
        if ca_fingerprint(ssl.PEM_cert_to_DER_cert(self.ca_pem)) != self.ca_sha256.lower():
            raise SimulateError("The server's CA does not match --ca-sha256.")

    async def _enroll_one(self, ctx: ssl.SSLContext, h: SimHost) -> None:
        key, csr = await asyncio.to_thread(_key_and_csr, h.name)
        d = await Conn(self.server, ctx, timeout=self.timeout).request("POST", ENROLL_PATH, {
            "token": self.token, "csr": csr, "hostname": h.name,
            "machine_id": secrets.token_hex(16)})
        h.host_id = d["host_id"]
        h.ctx = _client_ctx(self.ca_pem, d["certificate"], key, self.work, h.name)
        h.conn = Conn(self.server, h.ctx, self.keep_alive, self.timeout)
        h.report("inventory", {"hostname": h.name, "os_release": {
            "PRETTY_NAME": "Cerulean Linux (simulated)", "IMAGE_ID": "vm",
            "IMAGE_VERSION": "1.20261101.0"}, "arch": "x86_64", "kernel": "6.12.0",
            "update": {"image": "vm", "version": "1.20261101.0", "channel": "stable"},
            "packages": PACKAGES})

    async def enroll(self) -> float:
        await self.fetch_ca()
        ctx = ssl.create_default_context(cadata=self.ca_pem)
        ctx.check_hostname = False
        self.hosts = [SimHost(f"sim-{i:05d}") for i in range(self.n)]
        start = time.monotonic()
        sem = asyncio.Semaphore(self.concurrency)

        async def one(h: SimHost) -> None:
            async with sem:
                for attempt in range(5):
                    try:
                        await self._enroll_one(ctx, h)
                        return
                    except FAILURES as e:
                        self._error(e)
                        await asyncio.sleep(0.5 * (attempt + 1))
        tasks = [asyncio.create_task(one(h)) for h in self.hosts]
        for done, t in enumerate(asyncio.as_completed(tasks), start=1):
            await t
            if done % max(1, self.n // 10) == 0:
                self.say(f"enrolled {done}/{self.n}")
        self.hosts = [h for h in self.hosts if h.ctx is not None]
        return time.monotonic() - start

    async def _checkin(self, h: SimHost, latencies: list[float], later: list[float]) -> bool:
        h.checkins += 1
        h.report("metrics", {"node_load1": random.random(), "node_memory_used_bytes":
                             random.randint(1 << 28, 1 << 30), "cerulean_alerts": h.seq})
        if self.alert_every and h.checkins % self.alert_every == 0:
            h.report("alert", {"rule": "ssh-login-failures", "priority": "warning",
                               "message": "5 failed SSH logins from 198.51.100.7",
                               "time": time.time(), "evidence": {"source.ip": "198.51.100.7"}})
        t = await self._send(h)
        if t is None:
            return False
        latencies.append(t)
        if h.checkins > 1:
            later.append(t)
        return True

    async def _send(self, h: SimHost) -> float | None:
        """Send one batch of *h*'s pending reports and forget what the server acknowledged;
        the time it took in ms, or None if it failed."""
        assert h.conn is not None
        batch = h.pending[:500]
        t0 = time.monotonic()
        try:
            ack = await h.conn.request("POST", REPORTS_PATH, {"reports": batch, "dropped": 0})
        except FAILURES as e:
            self._error(e)
            return None
        done = set(ack.get("acknowledged", []))
        h.acknowledged += sum(1 for m in batch if m["id"] in done)
        h.pending = [m for m in h.pending if m["id"] not in done]
        return (time.monotonic() - t0) * 1000

    async def run(self, seconds: float) -> tuple[int, int, float, list[float], list[float]]:
        latencies: list[float] = []
        later: list[float] = []
        ok = failed = 0
        now = time.monotonic()
        end = now + seconds
        # With an interval, hosts start at random points within it, as a fleet's agents
        # do: a steady load from the start rather than all of them at once.
        next_at = {h.host_id: now + random.uniform(0, self.interval) for h in self.hosts}
        queue: asyncio.Queue[SimHost] = asyncio.Queue()
        for h in sorted(self.hosts, key=lambda h: next_at[h.host_id]):
            queue.put_nowait(h)

        async def worker() -> None:
            nonlocal ok, failed
            while time.monotonic() < end:
                h = await queue.get()
                wait = next_at[h.host_id] - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(min(wait, max(0.0, end - time.monotonic())))
                if time.monotonic() >= end:
                    queue.put_nowait(h)
                    return
                if await self._checkin(h, latencies, later):
                    ok += 1
                else:
                    failed += 1
                next_at[h.host_id] = time.monotonic() + self.interval
                queue.put_nowait(h)

        start = time.monotonic()
        report = asyncio.create_task(self._progress(end, lambda: ok))
        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(self.hosts)))))
        report.cancel()
        return ok, failed, time.monotonic() - start, latencies, later

    async def _progress(self, end: float, count: Callable[[], int]) -> None:
        last, t = 0, time.monotonic()
        while time.monotonic() < end:
            await asyncio.sleep(10)
            n, now = count(), time.monotonic()
            self.say(f"{n} check-ins, {(n - last) / (now - t):.0f}/s in the last "
                     f"{now - t:.0f} s")
            last, t = n, now

    async def drain(self, rounds: int = 5) -> None:
        """Send what is still pending (after a server restart, say) until none is left."""
        for _ in range(rounds):
            todo = [h for h in self.hosts if h.pending]
            if not todo:
                return
            await asyncio.gather(*(self._resend(h) for h in todo))
            await asyncio.sleep(1)

    async def _resend(self, h: SimHost) -> None:
        async with self._sem:
            while h.pending:
                if await self._send(h) is None:
                    return

    async def server_counts(self) -> tuple[int, int]:
        """(reports the server holds for these hosts, hosts whose count differs)."""
        sem = asyncio.Semaphore(self.concurrency)
        total = mismatched = 0

        async def one(h: SimHost) -> None:
            nonlocal total, mismatched
            assert h.ctx is not None
            async with sem:
                for attempt in range(5):
                    try:
                        c = Conn(self.server, h.ctx, timeout=self.timeout)
                        n = int((await c.request("GET", SELF_PATH))["reports"])
                        break
                    except (*FAILURES, KeyError, TypeError) as e:
                        self._error(e)
                        await asyncio.sleep(1 + attempt)
                else:
                    mismatched += 1
                    return
                total += n
                if n != h.acknowledged:
                    mismatched += 1
        await asyncio.gather(*(one(h) for h in self.hosts))
        return total, mismatched


def simulate(server: str, token: str, ca_sha256: str, hosts: int, seconds: float, work: Path,
             concurrency: int = 64, interval: float = 0.0,
             say: Callable[[str], None] = print,
             during: Callable[[Simulator], Any] | None = None,
             keep_alive: bool = False) -> Result:
    """Enroll *hosts* simulated agents, run check-ins for *seconds*, resend what is pending
    and compare with what the server holds. *during* (tests, benchmarks) runs in a thread
    while the check-ins run, such as a server restart. With *keep_alive* each host keeps
    its connection open between check-ins."""
    sim = Simulator(server, token, ca_sha256, hosts, work, concurrency, interval, say=say,
                    keep_alive=keep_alive)

    async def main() -> Result:
        enroll_s = await sim.enroll()
        say(f"{len(sim.hosts)} hosts enrolled in {enroll_s:.1f} s; checking in for "
            f"{seconds:g} s")
        side = asyncio.create_task(asyncio.to_thread(during, sim)) if during else None
        ok, failed, took, lat, later = await sim.run(seconds)
        if side is not None:
            await side
        await sim.drain()
        on_server, mismatched = await sim.server_counts()
        return Result(hosts, len(sim.hosts), enroll_s, ok, failed, took, lat,
                      sum(h.seq for h in sim.hosts), sum(h.acknowledged for h in sim.hosts),
                      on_server, sum(len(h.pending) for h in sim.hosts), mismatched,
                      dict(sim.errors), later)

    async def closing() -> Result:
        try:
            return await main()
        finally:
            for h in sim.hosts:
                if h.conn is not None:
                    h.conn.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(closing())
