"""Rollouts and policy assignment: what each group's hosts should run, and how far they are.

A **rollout** sends one release (``target``, or whatever is newest in
``channel``) to one group, in waves (``[10, 50, 100]`` percent of its hosts). Each
host's place in the order is fixed by a hash of the rollout and host IDs, so a
wave is a stable subset, and a host in wave 1 stays there. The fleet tells
every host of the group what to do (:class:`~cerulean.protocol.fleet.Desired`)
in the answer to its reports:

- a host of an open wave gets the channel, the target and the window;
- every other host of the group gets ``hold``: it starts no update of its own,
  even if the release reaches it through the channel first.

A host's progress comes from its inventory: ``done`` once it runs the target,
``failed`` once the target is among its failed releases (the updater gave it up,
or the host rolled back after a failed health check).

The next wave opens when every host of the open waves is done, failed or
offline (not seen for an hour), and the wave has soaked for ``soak_minutes``.
When more than ``max_failure_percent`` of the finished hosts failed, the
rollout **pauses by itself** (once at least three hosts, or all of a small
wave, have finished): its waves stay closed and its hosts hold until an
operator resumes or aborts it. An aborted rollout holds the hosts that had not
moved yet, until a new rollout for the group says otherwise.

**Policies**: a group's profiles and mode (audit, enforce, autocorrect) reach
its hosts the same way and replace what the hosts' own agent.toml says.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cerulean.fleet.auth import audit
from cerulean.fleet.db import GroupPolicy, Host, Rollout
from cerulean.fleet.hosts import Invalid, check_group
from cerulean.protocol.fleet import Desired
from cerulean.protocol.update import CHANNELS, is_version
from cerulean.protocol.window import WindowError, parse_window

ACTIVE = ("running", "paused")
STATES = ("running", "paused", "aborted", "completed")
MODES = ("audit", "enforce", "autocorrect")
OFFLINE = timedelta(hours=1)
EVALUATE_EVERY = timedelta(seconds=15)
MIN_FINISHED = 3


def rank(rollout_id: int, host_id: str) -> float:
    """The host's place in the rollout's order, in [0, 1)."""
    digest = hashlib.sha256(f"{rollout_id}:{host_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def wave_of(r: Rollout, host_id: str) -> int:
    """The index of the first wave that includes the host."""
    x = rank(r.id, host_id) * 100
    percents = r.waves["percent"]
    return next(i for i, p in enumerate(percents) if x < p or i == len(percents) - 1)


def host_state(r: Rollout, h: Host, now: datetime) -> str:
    if r.target and h.update.get("version") == r.target:
        return "done"
    if not r.target and h.update.get("channel") == r.channel:
        return "done"  # a channel assignment is done once the host follows it
    if r.target and r.target in (h.update.get("failed_releases") or {}):
        return "failed"
    if wave_of(r, h.id) > r.wave:
        return "waiting"
    if h.last_seen is None or h.last_seen < now - OFFLINE:
        return "offline"
    return "updating"


@dataclass(frozen=True)
class Progress:
    hosts: dict[str, int]  # state → count
    waves: list[dict[str, int]]  # per wave: state → count
    by_host: list[tuple[Host, int, str]]  # (host, wave, state)

    @property
    def finished(self) -> int:
        return self.hosts.get("done", 0) + self.hosts.get("failed", 0)


def progress(s: Session, r: Rollout, now: datetime | None = None) -> Progress:
    now = now or datetime.now(UTC)
    rows = s.execute(select(Host).where(Host.group == r.group, Host.revoked.is_(False))
                     .order_by(Host.hostname, Host.id)).scalars()
    by_host = [(h, wave_of(r, h.id), host_state(r, h, now)) for h in rows]
    totals: dict[str, int] = {}
    waves: list[dict[str, int]] = [{} for _ in r.waves["percent"]]
    for _, w, st in by_host:
        totals[st] = totals.get(st, 0) + 1
        waves[w][st] = waves[w].get(st, 0) + 1
    return Progress(totals, waves, by_host)


def check_waves(waves: list[int]) -> list[int]:
    if not waves or len(waves) > 10 or any(not 0 < w <= 100 for w in waves) \
            or waves != sorted(set(waves)) or waves[-1] != 100:
        raise Invalid("'waves' must be rising percentages that end at 100, such as "
                      "[10, 50, 100].")
    return waves


def create(s: Session, actor: str, *, name: str, group: str, channel: str, target: str,
           waves: list[int], soak_minutes: int, max_failure_percent: float,
           window: str) -> Rollout:
    check_group(group)
    if channel not in CHANNELS:
        raise Invalid(f"{channel!r} is not a channel; channels: {', '.join(CHANNELS)}.")
    if target and not is_version(target):
        raise Invalid(f"{target!r} is not a release version such as 1.20261127.0.")
    try:
        parse_window(window)
    except WindowError as e:
        raise Invalid(str(e)) from e
    if not 0 <= soak_minutes <= 7 * 24 * 60:
        raise Invalid("'soak_minutes' must be between 0 and 10080.")
    if not 0 <= max_failure_percent <= 100:
        raise Invalid("'max_failure_percent' must be between 0 and 100.")
    if not 0 < len(name.strip()) <= 100:
        raise Invalid("A rollout needs a name of 1 to 100 characters.")
    busy = s.execute(select(Rollout).where(Rollout.group == group,
                                           Rollout.state.in_(ACTIVE))).scalar()
    if busy is not None:
        raise Conflict(f"Group {group} already has rollout {busy.id} ({busy.state}); "
                       "abort it first.")
    r = Rollout(name=name.strip(), group=group, channel=channel, target=target,
                waves={"percent": check_waves(waves)}, wave=0, soak_minutes=soak_minutes,
                max_failure_percent=max_failure_percent, window=window, state="running",
                reason="", created_by=actor, wave_started_at=datetime.now(UTC))
    s.add(r)
    s.flush()
    forget_group(group)
    audit(s, actor, "rollout.created", {"rollout": r.id, "name": r.name, "group": group,
                                        "channel": channel, "target": target,
                                        "waves": waves})
    return r


class Conflict(Invalid):
    """The request clashes with the current state (HTTP 409)."""


def act(s: Session, actor: str, r: Rollout, action: str) -> Rollout:
    allowed = {"pause": ("running",), "resume": ("paused",), "abort": ACTIVE}
    if action not in allowed:
        raise Invalid(f"{action!r} is not pause, resume or abort.")
    if r.state not in allowed[action]:
        raise Conflict(f"Rollout {r.id} is {r.state}: it cannot be {action}d.")
    r.state = {"pause": "paused", "resume": "running", "abort": "aborted"}[action]
    r.reason = f"{action}d by {actor}"
    if action == "resume":
        r.wave_started_at = datetime.now(UTC)  # the soak time starts again
    audit(s, actor, f"rollout.{action}d", {"rollout": r.id, "group": r.group,
                                           "wave": r.wave})
    return r


def evaluate(s: Session, r: Rollout, now: datetime | None = None,
             force: bool = False) -> Progress | None:
    """Pause on too many failures, open the next wave or complete. Hosts' reports ask at
    most every 15 s (*force*: now, as when someone looks at the rollout)."""
    now = now or datetime.now(UTC)
    if r.state != "running":
        return None
    if not force and r.evaluated_at is not None and now - r.evaluated_at < EVALUATE_EVERY:
        return None
    r.evaluated_at = now
    p = progress(s, r, now)
    released = [(h, w, st) for h, w, st in p.by_host if w <= r.wave]
    failed = sum(1 for _, _, st in released if st == "failed")
    finished = sum(1 for _, _, st in released if st in ("done", "failed"))
    if finished and finished >= min(MIN_FINISHED, len(released)) \
            and failed * 100 > r.max_failure_percent * finished:
        r.state = "paused"
        r.reason = (f"paused by itself: {failed} of {finished} finished hosts failed "
                    f"(more than {r.max_failure_percent:g}%)")
        audit(s, "fleet", "rollout.paused", {"rollout": r.id, "group": r.group,
                                             "failed": failed, "finished": finished,
                                             "automatic": True})
        return p
    settled = all(st in ("done", "failed", "offline") for _, _, st in released)
    soaked = now >= r.wave_started_at + timedelta(minutes=r.soak_minutes)
    if settled and soaked:
        if r.wave + 1 < len(r.waves["percent"]):
            r.wave += 1
            r.wave_started_at = now
            audit(s, "fleet", "rollout.wave-opened", {"rollout": r.id, "group": r.group,
                                                      "wave": r.wave,
                                                      "percent": r.waves["percent"][r.wave]})
        else:
            r.state = "completed"
            r.reason = f"{p.hosts.get('done', 0)} hosts done, {failed} failed"
            audit(s, "fleet", "rollout.completed", {"rollout": r.id, "group": r.group,
                                                    "done": p.hosts.get("done", 0),
                                                    "failed": failed})
    return p


def current(s: Session, group: str) -> Rollout | None:
    """The group's newest rollout (whatever its state)."""
    return s.execute(select(Rollout).where(Rollout.group == group)
                     .order_by(Rollout.id.desc()).limit(1)).scalar()


def assign_policy(s: Session, actor: str, group: str, profiles: list[str],
                  mode: str) -> GroupPolicy:
    check_group(group)
    if mode not in MODES:
        raise Invalid(f"{mode!r} is not a mode; modes: {', '.join(MODES)}.")
    if not profiles or len(profiles) > 20 or not all(
            isinstance(p, str) and 0 < len(p) <= 100 and p.replace("-", "").replace(
                "_", "").isalnum() for p in profiles):
        raise Invalid("'profiles' must list 1 to 20 profile names such as "
                      "cis-debian12-l1-server.")
    row = s.get(GroupPolicy, group)
    if row is None:
        row = GroupPolicy(group=group, profiles={"profiles": profiles}, mode=mode,
                          updated_by=actor)
        s.add(row)
    else:
        row.profiles, row.mode, row.updated_by = {"profiles": profiles}, mode, actor
        row.updated_at = datetime.now(UTC)
    forget_group(group)
    audit(s, actor, "policy.assigned", {"group": group, "profiles": profiles, "mode": mode})
    return row


# Per server process: which rollout is each group's newest (its ID) and the group's
# policy, as found at most GROUP_CACHE_SECONDS ago. The rollout itself is read afresh on
# every check-in, so a pause, resume or abort applies at once. A new rollout or policy
# made in this process applies at once too; one made through another replica reaches
# this one's hosts within that time.
GROUP_CACHE_SECONDS = 5.0
_groups: dict[str, tuple[float, int | None, dict[str, Any]]] = {}


def forget_group(group: str) -> None:
    _groups.pop(group, None)


def _group(s: Session, group: str) -> tuple[int | None, dict[str, Any]]:
    t = time.monotonic()
    hit = _groups.get(group)
    if hit is not None and hit[0] > t:
        return hit[1], hit[2]
    r = current(s, group)
    gp = s.get(GroupPolicy, group)
    agent: dict[str, Any] = {}
    if gp is not None:
        agent = {"policies": list(gp.profiles.get("profiles", [])), "policy-mode": gp.mode}
    if len(_groups) > 10000:
        _groups.clear()
    _groups[group] = (t + GROUP_CACHE_SECONDS, r.id if r else None, agent)
    return (r.id if r else None), agent


def desired(s: Session, host: Host, now: datetime | None = None) -> Desired:
    """What *host* should run now, by its group's rollout and policy."""
    now = now or datetime.now(UTC)
    update: dict[str, Any] = {}
    name = ""
    rollout_id, agent = _group(s, host.group)
    r = s.get(Rollout, rollout_id) if rollout_id is not None else None
    if r is not None:
        evaluate(s, r, now)
        state = host_state(r, host, now)
        name = f"{r.id}:{r.name}"
        if state == "done" or (r.state in ("running", "completed") and state != "waiting"):
            update = {"channel": r.channel, "hold": False}
        else:
            update = {"channel": r.channel, "hold": True}
        if r.target:
            update["target"] = r.target
        if r.window:
            update["window"] = r.window
    return Desired(update, dict(agent), name)
