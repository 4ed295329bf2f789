"""The host's link to the fleet server: enrollment, its certificate, and sending reports.

Enrollment (``cerulean agent enroll --server URL --token T --ca-sha256 H``):

1. fetch the fleet CA from the server and refuse it unless its SHA-256 is the
   one the administrator gave with the token;
2. make an ECDSA P-256 key on this host (it never leaves ``/var/lib/cerulean/fleet``)
   and a signing request for it;
3. send both with the token over TLS checked against that CA; keep the host ID
   and certificate the server returns.

From then on every call is mTLS with that certificate, renewed at half its
life. :func:`sync` collects what is new (inventory, alerts and other audit-trail
heads, compliance results, metrics) into the outbox
(:mod:`cerulean.agent.outbox`) and delivers the outbox: a report leaves the
host's disk only once the server has acknowledged it.

Standard library, plus python3-cryptography for the key and the request.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cerulean.agent.outbox import Message, Outbox, OutboxError
from cerulean.errors import CeruleanError, NetworkError, VerificationError
from cerulean.protocol.fleet import (
    CA_PATH,
    ENROLL_PATH,
    RENEW_PATH,
    REPORTS_PATH,
    SELF_PATH,
    EnrollRequest,
    ca_fingerprint,
)

STATE = "var/lib/cerulean/fleet"
TIMEOUT = 30.0
# Audit-trail batches (READ_ENTRIES each) one round queues and sends at most while the
# trail is ahead of what was queued and the fleet takes what is sent.
CATCH_UP_BATCHES = 20


class FleetLinkError(CeruleanError):
    pass


def state_dir(root: Path = Path("/")) -> Path:
    return root / STATE


@dataclass(frozen=True)
class Enrollment:
    server: str
    host_id: str
    not_after: str
    renew_after: str


def load_enrollment(root: Path = Path("/")) -> Enrollment | None:
    try:
        data = json.loads((state_dir(root) / "enrollment.json").read_text())
        return Enrollment(data["server"], data["host_id"], data["not_after"],
                          data["renew_after"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FleetLinkError(f"{state_dir(root) / 'enrollment.json'} cannot be read ({e}); "
                             "enroll this host again.") from e


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_server(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https" or not u.hostname or u.path not in ("", "/") or u.query:
        raise FleetLinkError(f"{url!r} is not a fleet server address like "
                             "https://fleet.example.com:8443.")
    return f"https://{u.netloc}"


def _new_key_and_csr(hostname: str) -> tuple[bytes, str]:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as e:
        raise FleetLinkError("Enrolling needs python3-cryptography; install it first.") from e
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])]))
           .sign(key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem_key, csr.public_bytes(serialization.Encoding.PEM).decode()


def _request(ctx: ssl.SSLContext, url: str, body: Any | None = None,
             timeout: float = TIMEOUT) -> Any:
    data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json",
                                          "User-Agent": "cerulean-agent"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
            raw = r.read()
            ctype = r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail")
        except (ValueError, AttributeError, OSError):
            detail = None
        if not isinstance(detail, str):
            detail = f"HTTP {e.code} {e.reason}"
        raise FleetLinkError(f"The fleet server refused: {detail.rstrip('.')}.") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise NetworkError(f"The fleet server at {url.split('/api/')[0]} cannot be reached: "
                           f"{reason}.") from e
    return json.loads(raw) if "json" in ctype else raw.decode()


def fetch_ca(server: str, expected: str) -> str:
    """The fleet CA (PEM), after checking it against *expected* (``sha256:HEX``)."""
    want = expected.lower()
    if not want.startswith("sha256:") or len(want) != 71:
        raise FleetLinkError("--ca-sha256 must be 'sha256:' and 64 hex digits, as `cerulean "
                             "fleet token create` prints it.")
    # Nothing is trusted yet: the hash below decides.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    pem = _request(ctx, server + CA_PATH)
    if not isinstance(pem, str):
        raise FleetLinkError("The fleet server did not send its CA certificate.")
    try:
        der = ssl.PEM_cert_to_DER_cert(pem)
    except ValueError as e:
        raise FleetLinkError("The fleet server's CA is not a PEM certificate.") from e
    got = ca_fingerprint(der)
    if got != want:
        raise VerificationError(f"The fleet server's CA is {got}, not the {want} you were "
                                "given: refusing to enroll (wrong server, or someone in "
                                "between).")
    return pem


def enroll(server: str, token: str, ca_sha256: str, root: Path = Path("/"),
           hostname: str | None = None) -> Enrollment:
    server = check_server(server)
    ca = fetch_ca(server, ca_sha256)
    d = state_dir(root)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(d / "ca.crt", ca.encode(), 0o644)
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    hostname = hostname or socket.gethostname()
    key, csr = _new_key_and_csr(hostname)
    machine_id = ""
    with contextlib.suppress(OSError):
        machine_id = (root / "etc/machine-id").read_text().strip()[:64]
    resp = _request(ctx, server + ENROLL_PATH,
                    asdict(EnrollRequest(token, csr, hostname, machine_id)))
    return _keep(d, server, key, resp)


CREDENTIAL = "cerulean.fleet"


def enroll_from_credential(root: Path = Path("/")) -> Enrollment | None:
    """Enroll with the systemd credential ``cerulean.fleet`` (JSON: server, token,
    ca-sha256), as a cloud's user data or a hypervisor's SMBIOS strings hand it in; None
    when there is none. Zero-touch: the host joins its fleet on first boot."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    path = (Path(creds) / CREDENTIAL if creds
            else root / "run/credentials/@system" / CREDENTIAL)
    try:
        data = json.loads(path.read_text())
        server, token, ca = data["server"], data["token"], data["ca-sha256"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FleetLinkError(f"The credential {CREDENTIAL} is not JSON with server, token "
                             f"and ca-sha256 ({e}).") from e
    return enroll(str(server), str(token), str(ca), root)


def _keep(d: Path, server: str, key: bytes, resp: Any) -> Enrollment:
    try:
        e = Enrollment(server, str(resp["host_id"]), str(resp["not_after"]),
                       str(resp["renew_after"]))
        cert = str(resp["certificate"]).encode()
    except (KeyError, TypeError) as err:
        raise FleetLinkError("The fleet server's answer has no certificate.") from err
    # Key first, then certificate, then the record: a crash in between leaves the old
    # pair's record pointing at files that still match, or the new complete set.
    _write(d / "host.key.new", key)
    _write(d / "host.crt.new", cert, 0o644)
    os.replace(d / "host.key.new", d / "host.key")
    os.replace(d / "host.crt.new", d / "host.crt")
    _write(d / "enrollment.json", json.dumps(asdict(e), indent=2).encode(), 0o644)
    return e


class Link:
    """An enrolled host's mTLS connection settings to its fleet server."""

    def __init__(self, root: Path = Path("/"), timeout: float = TIMEOUT) -> None:
        e = load_enrollment(root)
        if e is None:
            raise FleetLinkError("This host is not enrolled in a fleet; run `cerulean agent "
                                 "enroll --server URL --token TOKEN --ca-sha256 HASH`.")
        self.root, self.enrollment, self.timeout = root, e, timeout
        self.dir = state_dir(root)
        self._ctx: ssl.SSLContext | None = None
        self.desired: dict[str, Any] | None = None  # from the last acknowledgement

    @property
    def ctx(self) -> ssl.SSLContext:
        if self._ctx is None:
            ctx = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
            ctx.load_cert_chain(self.dir / "host.crt", self.dir / "host.key")
            self._ctx = ctx
        return self._ctx

    def call(self, path: str, body: Any | None = None) -> Any:
        return _request(self.ctx, self.enrollment.server + path, body, self.timeout)

    def renew_if_due(self, now: datetime | None = None) -> bool:
        now = now or datetime.now(UTC)
        if now < datetime.fromisoformat(self.enrollment.renew_after):
            return False
        key, csr = _new_key_and_csr(socket.gethostname())
        resp = self.call(RENEW_PATH, {"csr": csr})
        self.enrollment = _keep(self.dir, self.enrollment.server, key, resp)
        self._ctx = None
        return True

    def whoami(self) -> dict[str, Any]:
        out: dict[str, Any] = self.call(SELF_PATH)
        return out

    def send(self, msgs: list[Message], dropped: int) -> set[str]:
        """Deliver one batch; the IDs the server acknowledged or rejected for good (a
        rejected report would be rejected again: it is not kept)."""
        body = {"reports": [{"id": m.id, "kind": m.kind, "created": m.created,
                             "body": m.body} for m in msgs], "dropped": dropped}
        try:
            ack = self.call(REPORTS_PATH, body)
        except NetworkError as e:
            raise OSError(str(e)) from e
        if isinstance(ack.get("desired"), dict):
            self.desired = ack["desired"]
        done = set(ack.get("acknowledged", []))
        done |= {r.get("id") for r in ack.get("rejected", []) if isinstance(r, dict)}
        return done

    def outbox(self) -> Outbox:
        return Outbox(self.dir / "outbox.db", self.enrollment.host_id)


# -- what the host reports -----------------------------------------------------------------

def packages(root: Path) -> list[list[str]]:
    """Installed packages from dpkg's status database: [name, version, architecture]."""
    from cerulean.agent.cves import dpkg_status

    out = []
    try:
        text = dpkg_status(root).read_text(errors="replace")
    except OSError:
        return []
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            k, sep, v = line.partition(":")
            if sep and not line.startswith((" ", "\t")):
                fields[k] = v.strip()
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            out.append([fields["Package"], fields.get("Version", ""),
                        fields.get("Architecture", "")])
    return sorted(out)


def update_state(root: Path = Path("/")) -> dict[str, Any]:
    """The updater's view of this host: image, version, channel, slot, staged and failed
    releases (what a fleet rollout follows)."""
    from cerulean.agent.update.host import Host, load_config, load_state

    host = Host(root)
    update: dict[str, Any] = {}
    with contextlib.suppress(CeruleanError, OSError):
        update = {"image": host.image, "version": host.version}
    with contextlib.suppress(CeruleanError, OSError):
        cfg = load_config(host)
        update |= {"channel": cfg.channel, "target": cfg.target or None, "hold": cfg.hold}
    with contextlib.suppress(CeruleanError, OSError, ValueError):
        st = load_state(host)
        update |= {"staged": (st.staged or {}).get("version"), "last": st.last or None,
                   "failed_releases": st.bad}
    if root == Path("/"):
        from cerulean.agent.daemon import booted_slot

        update["slot"] = booted_slot() or None
    return update


def inventory(root: Path = Path("/"), hostname: str | None = None) -> dict[str, Any]:
    from cerulean.agent.update.host import Host

    return {"hostname": hostname or socket.gethostname(), "os_release": Host(root).os_release(),
            "arch": platform.machine(), "kernel": platform.release(),
            "update": update_state(root), "packages": packages(root)}


def metric_values(root: Path = Path("/")) -> dict[str, float]:
    """The host's metrics as name{labels} → value (at most 200)."""
    from cerulean.agent import metrics

    out: dict[str, float] = {}
    for fam in metrics.collect(root):
        for labels, value in fam.samples:
            tag = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            out[f"{fam.name}{{{tag}}}" if tag else fam.name] = float(value)
            if len(out) >= 200:
                return out
    return out


# What one report may carry: the fleet server refuses an alert message over 2,000
# characters, and a single hostile alert (a 1 MiB command line) must not block the rest.
MAX_ALERT_MESSAGE = 2000  # characters of an alert's message
# Characters of any other text in an alert or compliance report (above what detection
# already keeps, detect.MAX_EVIDENCE_TEXT and its marker: those alerts go as they are).
MAX_REPORT_TEXT = 8192
MAX_REPORT_ITEMS = 1000  # entries of a list or mapping in an alert or compliance report
MAX_REPORT_DEPTH = 8  # nesting of an alert's evidence; deeper values become text
MAX_ALERT_BYTES = 64 << 10  # an alert report's JSON; past it the evidence is summarised


def _clean(text: str) -> tuple[str, bool]:
    """*text* as the fleet can store it: a file name that is not UTF-8 (a lone surrogate
    here) or holds a NUL byte is written with backslash escapes (and counted as cut), so
    that no name a user can give a file makes the server refuse a report."""
    if "\x00" not in text:
        try:
            text.encode("utf-8")
            return text, False
        except UnicodeEncodeError:
            pass
    return (text.encode("utf-8", "backslashreplace")
            .decode("utf-8").replace("\x00", "\\x00")), True


def _bounded(value: Any, depth: int = 0) -> tuple[Any, bool]:
    """*value* with every text, list and mapping cut to the limits above (a text ends
    with a marker saying how much was cut); and whether anything was cut."""
    if isinstance(value, str):
        value, unclean = _clean(value)
        if len(value) <= MAX_REPORT_TEXT:
            return value, unclean
        return (value[:MAX_REPORT_TEXT]
                + f"…[{len(value) - MAX_REPORT_TEXT} more characters]"), True
    if isinstance(value, bool | int | float) or value is None:
        return value, False
    if depth >= MAX_REPORT_DEPTH or not isinstance(value, list | tuple | dict):
        return _bounded(str(value)[:MAX_REPORT_TEXT + 1], depth)[0], True
    cut = len(value) > MAX_REPORT_ITEMS
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in list(value.items())[:MAX_REPORT_ITEMS]:
            key, kcut = _bounded(str(k), depth + 1)
            out[key], vcut = _bounded(v, depth + 1)
            cut = cut or kcut or vcut
        return out, cut
    items = []
    for v in value[:MAX_REPORT_ITEMS]:
        item, vcut = _bounded(v, depth + 1)
        items.append(item)
        cut = cut or vcut
    return items, cut


def fit_alert(detail: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """An alert (an ``alert.*`` audit entry's detail) as a report: texts and lists cut,
    the message within what the fleet takes, and evidence that is still too large
    replaced by a summary. Returns the report and whether anything was cut."""
    body, cut = _bounded(detail)
    rule = body.get("rule")
    if isinstance(rule, str) and len(rule) > 128:
        body["rule"], cut = rule[:128], True
    message = body.get("message")
    if isinstance(message, str) and len(message) > MAX_ALERT_MESSAGE:
        marker = f"…[{len(message) - MAX_ALERT_MESSAGE + 40} more characters]"
        body["message"] = message[:MAX_ALERT_MESSAGE - len(marker)] + marker
        cut = True
    size = len(json.dumps(body, separators=(",", ":")).encode())
    if size > MAX_ALERT_BYTES:
        body = {k: body[k] for k in ("rule", "priority", "tags", "message", "time")
                if k in body}
        body["evidence"] = {"truncated": f"the alert was {size} bytes; its evidence is in "
                                         "the host's audit trail"}
        cut = True
    if cut:
        body["truncated"] = True
    return body, cut


def _oversized_alert(entry: dict[str, Any]) -> dict[str, Any]:
    rule = str(entry.get("action", "alert.unknown")).removeprefix("alert.")[:128]
    return {"rule": rule, "priority": "warning", "tags": ["agent-health"],
            "message": f"An alert of rule {rule} was {entry['oversized']} bytes, too large "
                       f"to read; it is entry {entry['seq']} of the host's audit trail.",
            "time": entry.get("time", ""), "truncated": True,
            "evidence": {"audit-seq": entry["seq"], "bytes": entry["oversized"]}}


def health_alert(root: Path, rule: str, message: str, evidence: dict[str, Any],
                 priority: str = "warning") -> bool:
    """Write an alert about the agent itself (``alert.RULE`` in the audit trail, which
    the next round sends to the fleet); False if the trail cannot be written."""
    from cerulean.agent.audit import AuditLog
    from cerulean.agent.update.host import Host

    try:
        AuditLog(Host(root).audit_log).append("fleet", f"alert.{rule}", {
            "rule": rule, "priority": priority, "tags": ["agent-health"], "message": message,
            "time": time.time(), "evidence": evidence})
    except (OSError, CeruleanError):
        return False
    return True


def collect(box: Outbox, root: Path = Path("/"), now: float | None = None,
            inventory_every: float = 3600.0, hostname: str | None = None,
            errors: list[str] | None = None) -> dict[str, int]:
    """Put into *box* what the fleet has not had yet; returns how many of each kind.

    Each part (inventory, the audit trail, compliance, metrics) is queued on its own: one
    that fails is named in *errors* and the others still go. The audit trail is read
    from its cursor, a bounded batch a round; an alert too large for a report is cut or
    summarised, and one that cannot be queued at all is passed over (the cursor never
    sticks on it), each counted and said in an ``alert.agent-report-truncated`` entry.
    """
    now = time.time() if now is None else now
    put = {"inventory": 0, "alert": 0, "audit": 0, "compliance": 0, "metrics": 0}
    errors = [] if errors is None else errors
    for part, step in (("inventory", _collect_inventory), ("audit trail", _collect_trail),
                       ("compliance", _collect_compliance), ("metrics", _collect_metrics)):
        try:
            step(box, root, now, inventory_every, hostname, put)
        except Exception as e:  # one part must not stop the others
            errors.append(f"the {part} could not be queued: {e}")
    return put


def _collect_inventory(box: Outbox, root: Path, now: float, every: float,
                       hostname: str | None, put: dict[str, int]) -> None:
    # Hourly, and at once when the update state moves (a rollout follows it).
    inv = inventory(root, hostname)
    digest = hashlib.sha256(json.dumps([inv["update"], inv["packages"]], sort_keys=True)
                            .encode()).hexdigest()
    if now - float(box.get("inventory-at", "0")) >= every \
            or digest != box.get("inventory-hash"):
        box.put("inventory", inv, {"inventory-at": str(now), "inventory-hash": digest})
        put["inventory"] += 1


def _collect_trail(box: Outbox, root: Path, now: float, every: float,
                   hostname: str | None, put: dict[str, int]) -> None:
    # Alerts and the audit trail's head, from the trail itself: whatever process raised
    # an alert (the agent, the policy timer), it is sent once, in order.
    from cerulean.agent.audit import READ_ENTRIES, AuditLog, read_after
    from cerulean.agent.update.host import Host
    from cerulean.errors import CeruleanError as _Err

    last = int(box.get("audit-seq", "0"))
    path = Host(root).audit_log
    entries, offset = read_after(path, last, int(box.get("audit-offset", "0")))
    if last and entries and int(entries[0].get("seq", 0)) > last + 1:
        # The live file starts after the cursor: it was rotated, and the entries in
        # between are in archived segments, which the trail's own reader walks.
        entries, offset = list(AuditLog(path).entries_after(last, READ_ENTRIES)), 0
        gap = int(entries[0].get("seq", 0)) - last - 1 if entries else 0
        if gap > 0:
            # Even the archived segments start after the cursor: the oldest were
            # removed before they were sent. The fleet sees it at the head
            # (fleet.audit-trail-unchecked); this host says how many.
            box.count("audit-pruned-unsent", gap)
            health_alert(root, "agent-report-lost",
                         f"{gap} audit entr{'ies' if gap != 1 else 'y'} (from {last + 1}) "
                         "were archived away before they reached the fleet: the trail "
                         "grew faster than it was sent. They are gone from this host.",
                         {"first": last + 1, "count": gap})
    head = None
    cut: list[int] = []
    lost: list[int] = []
    for i, entry in enumerate(entries):
        seq = int(entry.get("seq", 0))
        head = entry
        # The offset note moves with the last entry of the batch only.
        notes = {"audit-seq": str(seq)}
        if i == len(entries) - 1:
            notes["audit-offset"] = str(offset)
        action = str(entry.get("action", ""))
        if not action.startswith("alert."):
            continue
        if "oversized" in entry:
            body, trimmed = _oversized_alert(entry), True
        elif isinstance(entry.get("detail"), dict):
            body, trimmed = fit_alert(entry["detail"])
        else:
            continue
        try:
            box.put("alert", body, notes)
        except (OutboxError, _Err, ValueError, TypeError):
            lost.append(seq)  # never sendable: passed over, not retried for ever
            box.set_notes(notes)
            continue
        put["alert"] += 1
        if trimmed:
            cut.append(seq)
    if head is None and str(offset) != box.get("audit-offset", "0"):
        box.set_notes({"audit-offset": str(offset)})  # past entries already sent
    # The head, with the entry at the head reported before (so the fleet can check that it
    # extends that one) or word that the trail no longer holds it.
    report = AuditLog(path).anchor(head, box.get("audit-head"))
    if report is not None:
        box.put("audit", report, {"audit-seq": str(report["seq"]), "audit-offset": str(offset),
                                  "audit-head": f"{report['seq']}:{report['hash']}"})
        put["audit"] += 1
    if cut or lost:
        box.count("truncated", len(cut))
        box.count("unsendable", len(lost))
        what = []
        if cut:
            what.append(f"{len(cut)} cut short (entries {_seqs(cut)})")
        if lost:
            what.append(f"{len(lost)} not sent at all (entries {_seqs(lost)})")
        health_alert(root, "agent-report-truncated",
                     "Alerts too large for a fleet report: " + "; ".join(what)
                     + ". The whole alerts are in the host's audit trail.",
                     {"truncated": cut[:100], "unsendable": lost[:100]})


def _trail_behind(box: Outbox, root: Path) -> bool:
    """Whether the audit trail holds entries after the last one queued."""
    from cerulean.agent.audit import AuditLog
    from cerulean.agent.update.host import Host

    try:
        return AuditLog(Host(root).audit_log).head()[0] > int(box.get("audit-seq", "0"))
    except Exception:  # a damaged head file, say: no catching up; the round goes on
        return False


def _seqs(seqs: list[int]) -> str:
    return ", ".join(map(str, seqs[:10])) + (", …" if len(seqs) > 10 else "")


def _collect_compliance(box: Outbox, root: Path, now: float, every: float,
                        hostname: str | None, put: dict[str, int]) -> None:
    from cerulean.agent.compliance import last_reports

    for profile, rep in sorted(last_reports(root).items()):
        key = f"compliance-at:{profile}"
        if float(rep.get("time", 0)) <= float(box.get(key, "0")):
            continue
        failures = {c["id"]: c.get("rules", []) for c in rep.get("checks", [])
                    if c.get("result") in ("failed", "error")}
        failures, trimmed = _bounded(failures)
        body = {
            "profile": profile, "score": rep.get("score", 0), "passed": rep.get("passed", 0),
            "failed": rep.get("failed", 0), "errors": rep.get("errors", 0),
            "notapplicable": rep.get("notapplicable", 0), "mode": rep.get("mode", "audit"),
            "time": rep.get("time"), "failures": failures}
        if trimmed:
            body["truncated"] = True
            box.count("truncated", 1)
        try:
            box.put("compliance", body, {key: str(rep.get("time", 0))})
        except OutboxError:
            body["failures"] = {"truncated": "too many failures for one report"}
            box.put("compliance", body, {key: str(rep.get("time", 0))})
        put["compliance"] += 1


def _collect_metrics(box: Outbox, root: Path, now: float, every: float,
                     hostname: str | None, put: dict[str, int]) -> None:
    values = metric_values(root)
    for name, value in sorted(box.counters().items()):
        values[f"cerulean_fleet_outbox_{name.replace('-', '_')}_total"] = float(value)
    values["cerulean_fleet_outbox_bytes"] = float(box.disk_bytes())
    box.put("metrics", values)
    put["metrics"] += 1


@dataclass(frozen=True)
class SyncResult:
    queued: dict[str, int]
    delivered: int
    failed: int
    pending: int
    renewed: bool
    error: str = ""
    changed: tuple[str, ...] = ()  # the fleet layers rewritten this round


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a TOML basic string


def check_desired(desired: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The update and agent settings of a Desired answer, each value checked as the updater
    and the agent would check it; raises FleetLinkError on anything else."""
    from cerulean.agent.policy import MODES, is_profile_name
    from cerulean.protocol.fleet import DESIRED_AGENT_KEYS, DESIRED_UPDATE_KEYS
    from cerulean.protocol.update import CHANNELS, is_version
    from cerulean.protocol.window import WindowError, parse_window

    update, agent = desired.get("update") or {}, desired.get("agent") or {}
    if not isinstance(update, dict) or not isinstance(agent, dict) \
            or set(update) - set(DESIRED_UPDATE_KEYS) or set(agent) - set(DESIRED_AGENT_KEYS):
        raise FleetLinkError("The fleet sent settings this agent does not know.")
    if "channel" in update and update["channel"] not in CHANNELS:
        raise FleetLinkError(f"The fleet sent an unknown channel {update['channel']!r}.")
    if update.get("target") and not is_version(str(update["target"])):
        raise FleetLinkError(f"The fleet sent a bad target {update['target']!r}.")
    if "hold" in update and not isinstance(update["hold"], bool):
        raise FleetLinkError("The fleet sent a 'hold' that is not true or false.")
    try:
        parse_window(str(update.get("window", "")))
    except WindowError as e:
        raise FleetLinkError(f"The fleet sent a bad window: {e}") from e
    if "policies" in agent and not (isinstance(agent["policies"], list) and all(
            is_profile_name(p) for p in agent["policies"])):  # names, never paths
        raise FleetLinkError("The fleet sent 'policies' that are not profile names.")
    if "policy-mode" in agent and agent["policy-mode"] not in MODES:
        raise FleetLinkError(f"The fleet sent an unknown policy mode {agent['policy-mode']!r}.")
    return update, agent


def apply_desired(root: Path, desired: dict[str, Any]) -> tuple[str, ...]:
    """Write what the fleet says into /var/lib/cerulean/fleet/{update,agent}.toml (removed
    when the fleet sets nothing) and record each change in the audit trail."""
    from cerulean.agent.audit import AuditLog
    from cerulean.agent.update.host import Host

    update, agent = check_desired(desired)
    changed = []
    for name, values in (("update.toml", update), ("agent.toml", agent)):
        path = state_dir(root) / name
        text = "".join(f"{k} = {_toml_value(v)}\n" for k, v in sorted(values.items()))
        text = ("# Written by the Cerulean agent from the fleet's answer; do not edit.\n"
                + text) if values else ""
        try:
            old = path.read_text()
        except FileNotFoundError:
            old = ""
        if old == text:
            continue
        if text:
            _write(path, text.encode(), 0o644)
        else:
            path.unlink(missing_ok=True)
        changed.append(name)
        AuditLog(Host(root).audit_log).append(
            "fleet", "fleet.assigned", {"file": str(path), "settings": values,
                                        "rollout": desired.get("rollout", "")})
    return tuple(changed)


def sync(root: Path = Path("/"), link: Link | None = None,
         hostname: str | None = None) -> SyncResult:
    """One round: renew the certificate if due, queue what is new, deliver the outbox.
    (*hostname*: report this name instead of the system's, for tests.)"""
    link = link or Link(root)
    # One round at a time (the service's loop and `cerulean agent report`): the cursors
    # of what was queued are read before they are moved.
    lock = open(link.dir / "sync.lock", "a")  # noqa: SIM115 - held to the end
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _sync(root, link, hostname)
    finally:
        lock.close()


def _sync(root: Path, link: Link, hostname: str | None) -> SyncResult:
    renewed, error = False, ""
    try:
        renewed = link.renew_if_due()
    except (NetworkError, FleetLinkError) as e:
        error = str(e)
    box = link.outbox()
    try:
        # Queuing and delivering are apart: whatever goes wrong while queuing, what is
        # already in the outbox is still delivered.
        problems: list[str] = []
        queued = collect(box, root, hostname=hostname, errors=problems)
        if box.events:
            health_alert(root, "agent-outbox-degraded",
                         "The fleet outbox looked after itself: " + "; ".join(box.events)
                         + ".", {"events": box.events[:20]})
        delivered, failed = box.deliver(link.send)
        # While the fleet takes what is sent and the audit trail is ahead of what was
        # queued (a burst of alerts), more of it goes now rather than a batch a round.
        for _ in range(CATCH_UP_BATCHES):
            if failed or not _trail_behind(box, root):
                break
            try:
                _collect_trail(box, root, time.time(), 0.0, hostname, queued)
            except Exception as e:
                problems.append(f"the audit trail could not be queued: {e}")
                break
            more, failed = box.deliver(link.send)
            delivered += more
        pending = box.pending()
    finally:
        box.close()
    error = error or "; ".join(problems)
    changed: tuple[str, ...] = ()
    if link.desired is not None:
        try:
            changed = apply_desired(root, link.desired)
        except FleetLinkError as e:
            error = error or str(e)
    return SyncResult(queued, delivered, failed, pending, renewed, error, changed)
