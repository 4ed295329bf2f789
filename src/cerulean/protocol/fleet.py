"""The wire between a host's agent and the fleet server (standard library only).

Both sides import these types: the server (FastAPI) builds its OpenAPI document
and checks request bodies from them, the agent fills them in and sends them as
JSON. Paths are under :data:`API` (``/api/v1``); everything but
:data:`ENROLL_PATH` and :data:`CA_PATH` needs the host's client certificate
(mTLS) or, for people and scripts, an API token.

Enrollment: the agent makes its own key and sends a certificate signing
request with a one-time enrollment token; the server answers with the host's
ID and a short-lived certificate from the fleet's CA. The agent first fetches
the CA and checks it against the SHA-256 the administrator gave it with the
token (``--ca-sha256``), so no network attacker can put itself in between.

Reports: what the agent's outbox holds is sent in batches of
:class:`Report`. Each report's ID is made on the host and unique for ever; the
server stores a report once and acknowledges every ID it now holds, so a batch
sent twice (a lost acknowledgement) is counted once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

API = "/api/v1"
ENROLL_PATH = f"{API}/enroll"
CA_PATH = f"{API}/ca"
RENEW_PATH = f"{API}/agent/renew"
REPORTS_PATH = f"{API}/agent/reports"
SELF_PATH = f"{API}/agent/self"

# What an agent reports, least important first (the outbox drops those first when full).
REPORT_KINDS = ("metrics", "inventory", "compliance", "alert", "audit")
# An alert's priority, least urgent first (the agent's detection rules use the same).
PRIORITIES = ("info", "notice", "warning", "error", "critical")
MAX_BATCH = 500
MAX_REPORT_BYTES = 4 << 20
# The largest request body each call takes (the server answers 413 past it, before it
# reads more). A batch of reports holds up to MAX_REPORT_BYTES of reports, or one report
# of that size, with room for JSON written with spaces; enrollment, read before any
# credential is checked, takes the least.
MAX_REPORTS_BODY = 2 * MAX_REPORT_BYTES
MAX_ENROLL_BODY = 16 << 10
MAX_BODY = 1 << 20  # any other call

# An enrollment token: "cet_" + 8 hex (its public ID) + "_" + 32 url-safe characters.
ENROLL_TOKEN = re.compile(r"^cet_([0-9a-f]{8})_([A-Za-z0-9_-]{32,64})$")
# An API token for people and scripts: "cat_" + 8 hex + "_" + secret.
API_TOKEN = re.compile(r"^cat_([0-9a-f]{8})_([A-Za-z0-9_-]{32,64})$")
REPORT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}:[0-9a-f]{1,32}:[0-9]{1,18}$")
HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def ca_fingerprint(der: bytes) -> str:
    """How an administrator names the fleet's CA: the SHA-256 of its DER certificate."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class EnrollRequest:
    token: str
    csr: str  # PEM certificate signing request for a key the host made itself
    hostname: str
    machine_id: str = ""


@dataclass(frozen=True)
class EnrollResponse:
    host_id: str
    certificate: str  # PEM, issued by the fleet CA; its common name is host_id
    ca: str  # PEM
    not_after: str  # ISO 8601, UTC
    renew_after: str  # ISO 8601, UTC: when the agent should ask for a new one


@dataclass(frozen=True)
class RenewRequest:
    csr: str


@dataclass(frozen=True)
class Report:
    id: str  # host-id:epoch:sequence (see cerulean.agent.outbox)
    kind: str  # one of REPORT_KINDS
    created: float  # seconds since the epoch, on the host's clock
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportBatch:
    reports: list[Report]
    dropped: int = 0  # reports the host's outbox had to drop so far (it was full)


@dataclass(frozen=True)
class Rejected:
    id: str
    reason: str


# What the fleet may set on a host, by the host's own configuration keys: the updater's
# (update.toml) and the agent's (agent.toml). Anything else the agent ignores.
DESIRED_UPDATE_KEYS = ("channel", "target", "window", "hold")
DESIRED_AGENT_KEYS = ("policies", "policy-mode")


@dataclass(frozen=True)
class Desired:
    """What the host's group says it should run: written by the agent to
    /var/lib/cerulean/fleet/{update,agent}.toml, which win over the host's own files. An
    empty mapping means the fleet sets nothing there (the host's own settings apply)."""

    update: dict[str, Any] = field(default_factory=dict)  # DESIRED_UPDATE_KEYS
    agent: dict[str, Any] = field(default_factory=dict)  # DESIRED_AGENT_KEYS
    rollout: str = ""  # the rollout behind *update*, for the host's audit trail


@dataclass(frozen=True)
class ReportAck:
    acknowledged: list[str]  # the server holds these; the agent may forget them
    rejected: list[Rejected] = field(default_factory=list)  # never resend these
    duplicates: int = 0  # how many of the acknowledged it already had
    desired: Desired | None = None


@dataclass(frozen=True)
class HostSelf:
    host_id: str
    hostname: str
    group: str
    labels: dict[str, str]
    certificate_not_after: str
    reports: int
