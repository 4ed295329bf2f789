"""``cerulean fleet simulate``: many agents from one process, to load a fleet server.

Each simulated host does what a real agent does, over the network:

- it makes its own key and certificate request, and enrolls with the token;
- over mTLS, with its own certificate, it checks in: a batch holding its
  metrics, its inventory on the first check-in (a few hundred packages), and
  now and then an alert. Like the agent, it opens a new TLS connection for each
  check-in;
- it keeps each report in memory until the server acknowledges it, and sends
  it again if the check-in failed.

At the end, every host asks the server how many of its reports it holds
(``GET /agent/self``). That number must equal what the host had acknowledged:
nothing acknowledged may be lost, and nothing counted twice.

Check-ins run closed-loop: *concurrency* of them are in flight at any time,
each host waiting *interval* seconds between its own check-ins. The result
gives check-ins per second and latency percentiles.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import ssl
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cerulean.errors import CeruleanError
from cerulean.protocol.fleet import CA_PATH, ENROLL_PATH, REPORTS_PATH, SELF_PATH, ca_fingerprint

PACKAGES = [[f"pkg{i:03d}", f"1.{i}.{i % 7}-1", "amd64"] for i in range(300)]


class SimulateError(CeruleanError):
    pass


@dataclass
class SimHost:
    name: str
    ctx: ssl.SSLContext | None = None
    host_id: str = ""
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    seq: int = 0
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

    @property
    def rate(self) -> float:
        return self.checkins / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return 0.0
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]

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
                 timeout: float = 30.0, say: Callable[[str], None] = print) -> None:
        self.server, self.token, self.ca_sha256 = server.rstrip("/"), token, ca_sha256
        self.n, self.work, self.concurrency = hosts, work, concurrency
        self.interval, self.alert_every, self.timeout, self.say = (interval, alert_every,
                                                                   timeout, say)
        self.hosts: list[SimHost] = []
        self.errors: dict[str, int] = {}
        self._sem = asyncio.Semaphore(concurrency)
        self.ca_pem = ""

    def _error(self, e: BaseException) -> None:
        key = type(e).__name__
        if isinstance(e, httpx.HTTPStatusError):
            key = f"HTTP {e.response.status_code}"
        self.errors[key] = self.errors.get(key, 0) + 1

    def fetch_ca(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        r = httpx.get(self.server + CA_PATH, verify=ctx, timeout=self.timeout)
        r.raise_for_status()
        self.ca_pem = r.text
        if ca_fingerprint(ssl.PEM_cert_to_DER_cert(self.ca_pem)) != self.ca_sha256.lower():
            raise SimulateError("The server's CA does not match --ca-sha256.")

    async def _enroll_one(self, client: httpx.AsyncClient, h: SimHost) -> None:
        key, csr = await asyncio.to_thread(_key_and_csr, h.name)
        r = await client.post(self.server + ENROLL_PATH, json={
            "token": self.token, "csr": csr, "hostname": h.name,
            "machine_id": secrets.token_hex(16)})
        r.raise_for_status()
        d = r.json()
        h.host_id = d["host_id"]
        h.ctx = _client_ctx(self.ca_pem, d["certificate"], key, self.work, h.name)
        h.report("inventory", {"hostname": h.name, "os_release": {
            "PRETTY_NAME": "Cerulean Linux (simulated)", "IMAGE_ID": "vm",
            "IMAGE_VERSION": "1.20261101.0"}, "arch": "x86_64", "kernel": "6.12.0",
            "update": {"image": "vm", "version": "1.20261101.0", "channel": "stable"},
            "packages": PACKAGES})

    async def enroll(self) -> float:
        self.fetch_ca()
        ctx = ssl.create_default_context(cadata=self.ca_pem)
        ctx.check_hostname = False
        self.hosts = [SimHost(f"sim-{i:05d}") for i in range(self.n)]
        start = time.monotonic()
        sem = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(verify=ctx, timeout=self.timeout) as client:
            async def one(h: SimHost) -> None:
                async with sem:
                    for attempt in range(5):
                        try:
                            await self._enroll_one(client, h)
                            return
                        except (httpx.HTTPError, OSError) as e:
                            self._error(e)
                            await asyncio.sleep(0.5 * (attempt + 1))
            tasks = [asyncio.create_task(one(h)) for h in self.hosts]
            for done, t in enumerate(asyncio.as_completed(tasks), start=1):
                await t
                if done % max(1, self.n // 10) == 0:
                    self.say(f"enrolled {done}/{self.n}")
        self.hosts = [h for h in self.hosts if h.ctx is not None]
        return time.monotonic() - start

    async def _checkin(self, h: SimHost, latencies: list[float]) -> bool:
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
        return True

    async def _send(self, h: SimHost) -> float | None:
        """Send one batch of *h*'s pending reports and forget what the server acknowledged;
        the time it took in ms, or None if it failed."""
        assert h.ctx is not None
        batch = h.pending[:500]
        t0 = time.monotonic()
        try:
            # A new TLS connection for each check-in, as the agent makes it.
            async with httpx.AsyncClient(verify=h.ctx, timeout=self.timeout,
                                         limits=httpx.Limits(max_keepalive_connections=0)
                                         ) as c:
                r = await c.post(self.server + REPORTS_PATH,
                                 json={"reports": batch, "dropped": 0})
                r.raise_for_status()
                ack = r.json()
        except (httpx.HTTPError, OSError, ValueError) as e:
            self._error(e)
            return None
        done = set(ack.get("acknowledged", []))
        h.acknowledged += sum(1 for m in batch if m["id"] in done)
        h.pending = [m for m in h.pending if m["id"] not in done]
        return (time.monotonic() - t0) * 1000

    async def run(self, seconds: float) -> tuple[int, int, float, list[float]]:
        latencies: list[float] = []
        ok = failed = 0
        end = time.monotonic() + seconds
        queue: asyncio.Queue[SimHost] = asyncio.Queue()
        for h in random.sample(self.hosts, len(self.hosts)):
            queue.put_nowait(h)
        next_at = {h.host_id: 0.0 for h in self.hosts}

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
                if await self._checkin(h, latencies):
                    ok += 1
                else:
                    failed += 1
                next_at[h.host_id] = time.monotonic() + self.interval
                queue.put_nowait(h)

        start = time.monotonic()
        report = asyncio.create_task(self._progress(end, lambda: ok))
        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(self.hosts)))))
        report.cancel()
        return ok, failed, time.monotonic() - start, latencies

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
                        async with httpx.AsyncClient(verify=h.ctx, timeout=self.timeout) as c:
                            r = await c.get(self.server + SELF_PATH)
                            r.raise_for_status()
                            n = int(r.json()["reports"])
                            break
                    except (httpx.HTTPError, OSError, ValueError) as e:
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
             during: Callable[[Simulator], Any] | None = None) -> Result:
    """Enroll *hosts* simulated agents, run check-ins for *seconds*, resend what is pending
    and compare with what the server holds. *during* (tests, benchmarks) runs in a thread
    while the check-ins run, such as a server restart."""
    sim = Simulator(server, token, ca_sha256, hosts, work, concurrency, interval, say=say)

    async def main() -> Result:
        enroll_s = await sim.enroll()
        say(f"{len(sim.hosts)} hosts enrolled in {enroll_s:.1f} s; checking in for "
            f"{seconds:g} s")
        side = asyncio.create_task(asyncio.to_thread(during, sim)) if during else None
        ok, failed, took, lat = await sim.run(seconds)
        if side is not None:
            await side
        await sim.drain()
        on_server, mismatched = await sim.server_counts()
        return Result(hosts, len(sim.hosts), enroll_s, ok, failed, took, lat,
                      sum(h.seq for h in sim.hosts), sum(h.acknowledged for h in sim.hosts),
                      on_server, sum(len(h.pending) for h in sim.hosts), mismatched,
                      dict(sim.errors))

    return asyncio.run(main())
