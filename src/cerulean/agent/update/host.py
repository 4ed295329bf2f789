"""Where the updater finds things on a host, its configuration and its state.

Configuration is TOML, read in this order, later files winning key by key:
``/usr/lib/cerulean/update.toml`` (from the image definition's [update]),
``/etc/cerulean/update.toml`` (the administrator's), the systemd
credential ``cerulean.update`` (handed in by a hypervisor or cloud), and
``/var/lib/cerulean/fleet/update.toml`` (what the host's fleet rollout says,
written by the agent; the fleet has the last word). Keys:

    url         base URL of the update repository ("" = updates off)
    channel     stable | lts | preview
    window      maintenance window for reboots (see cerulean.protocol.window)
    reboot      true: reboot into a staged update inside the window
    never       true: never download or apply anything
    boot-tries  boot attempts a new release gets before it is given up (1..9)
    target      "" (the newest offered) or the one release to move to, nothing newer
    hold        true: start no new update (a fleet rollout is paused or has not
                reached this host); a staged one still finishes

State lives in ``/var/lib/cerulean/update/state.json`` (shared by both slots, with
a copy in ``state.json.bak`` that a damaged field is recovered from);
every result the updater records also goes into the audit trail
(:mod:`cerulean.agent.audit`, ``/var/lib/cerulean/audit/audit.jsonl``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cerulean.agent.fileio import fsync_dir, write_atomic
from cerulean.agent.settings import read_layers
from cerulean.agent.update.errors import UpdateError
from cerulean.protocol.update import CHANNELS, is_version, utc_iso
from cerulean.protocol.window import WindowError, parse_window

KEYS = {"url": str, "channel": str, "window": str, "reboot": bool, "never": bool,
        "boot-tries": int, "target": str, "hold": bool}
FLEET_LAYER = "/var/lib/cerulean/fleet/update.toml"


@dataclass
class Config:
    url: str = ""
    channel: str = "stable"
    window: str = ""
    reboot: bool = True
    never: bool = False
    boot_tries: int = 3
    target: str = ""
    hold: bool = False
    sources: list[str] = field(default_factory=list)


@dataclass
class Host:
    """Paths of one host; tests point *root* at a directory."""

    root: Path = Path("/")

    def p(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def state_dir(self) -> Path:
        return self.p("/var/lib/cerulean/update")

    @property
    def audit_log(self) -> Path:
        return self.p("/var/lib/cerulean/audit/audit.jsonl")

    @property
    def trusted_root(self) -> Path:
        return self.p("/usr/share/cerulean/update/root.json")

    def config_files(self) -> list[Path]:
        files = [self.p("/usr/lib/cerulean/update.toml"), self.p("/etc/cerulean/update.toml")]
        # The credential as the service sees it, or (from a shell) as the system got it.
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        files.append(Path(creds) / "cerulean.update" if creds
                     else self.p("/run/credentials/@system/cerulean.update"))
        files.append(self.p(FLEET_LAYER))
        return files

    def os_release(self) -> dict[str, str]:
        out = {}
        try:
            text = self.p("/usr/lib/os-release").read_text()
        except OSError:
            return {}
        for line in text.splitlines():
            k, sep, v = line.partition("=")
            if sep:
                out[k.strip()] = v.strip().strip('"')
        return out

    @property
    def version(self) -> str:
        v = self.os_release().get("IMAGE_VERSION", "")
        if not v:
            raise UpdateError("This host is not a Cerulean system image (its os-release has no "
                              "IMAGE_VERSION): the agent reports here, it does not update.")
        if not is_version(v):
            raise UpdateError(f"This host's IMAGE_VERSION {v!r} is not a release version.")
        return v

    @property
    def image(self) -> str:
        name = self.os_release().get("IMAGE_ID", "")
        if not name:
            raise UpdateError("This host's os-release has no IMAGE_ID.")
        return name

    def cmdline(self) -> str:
        return self.p("/proc/cmdline").read_text()


def load_config(host: Host) -> Config:
    cfg = Config()
    values, cfg.sources = read_layers(host.config_files(), KEYS, UpdateError)
    for k, v in values.items():
        setattr(cfg, k.replace("-", "_"), v)
    if cfg.channel not in CHANNELS:
        raise UpdateError(f"The update channel {cfg.channel!r} is not one of "
                          f"{', '.join(CHANNELS)}.")
    if not 1 <= cfg.boot_tries <= 9:
        raise UpdateError("'boot-tries' must be between 1 and 9.")
    if cfg.target and not is_version(cfg.target):
        raise UpdateError(f"'target' must be a release version such as 1.20261127.0, not "
                          f"{cfg.target!r}.")
    try:
        parse_window(cfg.window)
    except WindowError as e:
        raise UpdateError(f"The maintenance window is not valid: {e}") from e
    return cfg


@dataclass
class State:
    """What the updater remembers across boots."""

    bad: dict[str, str] = field(default_factory=dict)  # version -> why
    staged: dict[str, str] | None = None  # version, slot, from, uki_size, uki_sha256
    last: dict[str, str] = field(default_factory=dict)  # {"time", "result", "message"}
    history: list[dict[str, str]] = field(default_factory=list)
    # version -> installs of it that failed for a reason of the release's (see updater)
    install_failures: dict[str, int] = field(default_factory=dict)
    recorded: list[dict[str, str]] = field(default_factory=list)  # this run's (not saved)
    # What loading found damaged and how it was recovered (not saved; a run records it).
    repairs: list[str] = field(default_factory=list)

    def record(self, result: str, message: str, now: datetime | None = None) -> None:
        self.last = {"time": utc_iso(now or datetime.now(UTC)), "result": result,
                     "message": message}
        self.history = [*self.history, self.last][-50:]
        self.recorded.append(self.last)


STATE_FILE = "state.json"
BACKUP_FILE = "state.json.bak"


def _strings(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                       for k, x in v.items())


# Each field of state.json: whether a value is valid, and its value when there is none.
FIELDS: dict[str, tuple[Callable[[Any], bool], Callable[[], Any]]] = {
    "bad": (lambda v: _strings(v) and all(is_version(k) for k in v), dict),
    "staged": (lambda v: v is None or (_strings(v) and is_version(v.get("version", ""))
                                       and v.get("uki_size", "0").isdigit()
                                       and re.fullmatch(r"[0-9a-f]{64}|",
                                                        v.get("uki_sha256", "")) is not None),
               lambda: None),
    "last": (_strings, dict),
    "history": (lambda v: isinstance(v, list) and all(_strings(h) for h in v), list),
    "install_failures": (lambda v: isinstance(v, dict) and all(
        is_version(k) and isinstance(n, int) and not isinstance(n, bool) and n > 0
        for k, n in v.items()), dict),
}
WHAT = {"bad": "the failed releases", "staged": "the staged release",
        "last": "the last result", "history": "the history",
        "install_failures": "the count of failed installs"}


def _read_state(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The JSON object in *path* (None: missing or unreadable) and what is wrong with it."""
    try:
        d: Any = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    except ValueError:
        return None, "not valid JSON (cut short?)"
    if not isinstance(d, dict):
        return None, "not a JSON object"
    return d, ""


def load_state(host: Host) -> State:
    """state.json, checked field by field; what is damaged there comes from its copy
    state.json.bak, and what is damaged in both starts empty. Never raises: the health
    check and the fallback it drives must keep working whatever the file holds."""
    paths = [host.state_dir / STATE_FILE, host.state_dir / BACKUP_FILE]
    docs = [_read_state(p) for p in paths]
    if all(why == "missing" for _, why in docs):
        return State()
    values: dict[str, Any] = {}
    damaged: tuple[list[str], list[str]] = ([], [])
    lost: list[str] = []
    for name, (valid, empty) in FIELDS.items():
        present = [d for d, _ in docs if d is not None]
        if present and all(name not in d for d in present):
            values[name] = empty()  # written before this field existed
            continue
        for i, (d, _) in enumerate(docs):
            if d is not None and name in d and valid(d[name]):
                values[name] = d[name]
                break
            if d is not None:
                damaged[i].append(name)  # wrongly typed, or missing where the copy has it
        else:
            values[name] = empty()
            lost.append(name)
    state = State(values["bad"], values["staged"], values["last"], values["history"],
                  values["install_failures"])
    main, backup = docs[0][1] or ", ".join(damaged[0]), docs[1][1] or ", ".join(damaged[1])
    if not main and not lost:
        return state  # state.json is whole (a damaged copy is rewritten with it)
    if not lost and docs[0][0] is None:
        state.repairs.append(f"{paths[0]} was {main}; recovered it from {paths[1].name}.")
    elif not lost:
        state.repairs.append(f"{paths[0]} had damaged fields ({main}); recovered them from "
                             f"{paths[1].name}.")
    else:
        state.repairs.append(
            f"{paths[0]} ({main}) and {paths[1].name} ({backup or 'damaged'}) are both "
            f"damaged; started afresh without {', '.join(WHAT[n] for n in lost)} (boot "
            "counting and the health check's fallback work as before).")
    return state


def save_state(host: Host, state: State) -> None:
    """state.json, then its copy state.json.bak, each whole or not at all: a cut or a
    damaged file leaves at least one good copy."""
    host.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = json.dumps({"bad": state.bad, "staged": state.staged, "last": state.last,
                       "history": state.history, "install_failures": state.install_failures},
                      indent=2, sort_keys=True).encode() + b"\n"
    for name in (STATE_FILE, BACKUP_FILE):
        write_atomic(host.state_dir / name, data, durable=True)
        fsync_dir(host.state_dir)


def seed(host: Host) -> float:
    """The host's place in rollout waves: random once, kept (machine IDs may be transient)."""
    path = host.state_dir / "seed"
    try:
        text = path.read_text().strip()
        value = int(text, 16)
    except (OSError, ValueError):
        host.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = secrets.token_hex(8)
        path.write_text(text + "\n")
        value = int(text, 16)
    return value / 2**64
