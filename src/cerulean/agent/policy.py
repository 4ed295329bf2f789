"""Compliance policies: checks made of rules (:mod:`cerulean.agent.rules`), a score, and
machine-runnable fixes.

A policy is data (the agent reads it from YAML files; here it is already a
mapping)::

    policy: {id: cerulean-baseline, name: ..., description: ...}
    checks:
      - id: ssh-no-root-login
        title: SSH does not accept root logins
        rationale: ...
        compliance: {cis-debian: ["5.1.20"]}
        condition: all            # all | any | none of the rules hold
        applies: ['package:openssh-server']   # optional: else "notapplicable"
        rules:
          - 'f:/etc/ssh/sshd_config -> r:^\\s*PermitRootLogin\\s+no'
        fix:
          - set-line: {file: /etc/ssh/sshd_config, match: '^\\s*#?\\s*PermitRootLogin\\b',
                       line: PermitRootLogin no}
          - command: [systemctl, reload, ssh.service]

A check with ``applies`` (rule lines, all of which must hold) is only judged
where they hold; elsewhere its result is ``notapplicable`` and it counts in
neither the score nor the exit code.

Fixes are a short list of structured actions, never shell text:

- ``set-line``: ``file``, ``match`` (regex), ``line``: the first matching line
  becomes ``line`` and the other matches go; with none, ``line`` is appended;
- ``remove-line``: ``file``, ``match``: removes every matching line;
- ``sysctl``: ``key``, ``value``: writes ``/etc/sysctl.d/99-cerulean-policy.conf``
  and sets it now;
- ``mode``: ``path``, ``mode`` (an octal string), optional ``owner``, ``group``;
- ``service``: ``unit``, ``enabled`` and/or ``active`` (true or false):
  systemctl enable or disable, start or stop;
- ``command``: a list, the program and its arguments: runs it (no shell, 60 s).

Profiles (policies by name) live in ``/usr/lib/cerulean/policies`` (shipped) and
``/etc/cerulean/policies`` (the host's own; a file of the same name replaces a
shipped one, an empty one turns it off); :func:`profiles` lists them.

Modes: ``audit`` only checks; ``enforce`` fixes what fails once and then only
reports drift; ``autocorrect`` fixes whatever fails, every time.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import re
import secrets
import stat
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cerulean.agent.rules import (
    MAX_FILE_BYTES,
    READ_FLAGS,
    Host,
    Rule,
    RuleError,
    evaluate,
    parse_rule,
)
from cerulean.agent.saferegex import RegexError, bounded, compile_safe
from cerulean.errors import CeruleanError

MODES = ("audit", "enforce", "autocorrect")
PROFILE_DIRS = ("usr/lib/cerulean/policies", "etc/cerulean/policies")
CONDITIONS = ("all", "any", "none")
# What a profile's name may be, wherever it comes from (agent.toml, the fleet): a plain
# name, looked up only among the files of PROFILE_DIRS, never a path.
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SYSCTL_FILE = "/etc/sysctl.d/99-cerulean-policy.conf"
ACTIONS: dict[str, dict[str, type]] = {
    "set-line": {"file": str, "match": str, "line": str},
    "remove-line": {"file": str, "match": str},
    "sysctl": {"key": str, "value": str},
    "mode": {"path": str, "mode": str, "owner": str, "group": str},
    "service": {"unit": str, "enabled": bool, "active": bool},
}
REQUIRED = {"set-line": ("file", "match", "line"), "remove-line": ("file", "match"),
            "sysctl": ("key", "value"), "mode": ("path", "mode"), "service": ("unit",)}


class PolicyError(CeruleanError):
    pass


@dataclass(frozen=True)
class Action:
    kind: str
    args: Mapping[str, Any]

    def describe(self) -> str:
        if self.kind == "command":
            return "run " + " ".join(self.args["argv"])
        return self.kind + " " + ", ".join(f"{k}={v}" for k, v in self.args.items())


@dataclass(frozen=True)
class PolicyCheck:
    id: str
    title: str
    condition: str
    rules: tuple[Rule, ...]
    fix: tuple[Action, ...] = ()
    rationale: str = ""
    remediation: str = ""
    compliance: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    applies: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class Policy:
    id: str
    name: str
    description: str
    checks: tuple[PolicyCheck, ...]


def _action(raw: Any, where: str) -> Action:
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise PolicyError(f"{where}: a fix step is a mapping with one action, such as "
                          "'set-line: {...}'.")
    ((kind, args),) = raw.items()
    if kind == "command":
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise PolicyError(f"{where}: 'command' takes a list of strings (the program and "
                              "its arguments).")
        return Action("command", {"argv": tuple(args)})
    if kind not in ACTIONS:
        raise PolicyError(f"{where}: unknown fix action {kind!r}; known: "
                          f"{', '.join([*ACTIONS, 'command'])}.")
    if not isinstance(args, Mapping):
        raise PolicyError(f"{where}: '{kind}' takes a mapping of arguments.")
    for k, v in args.items():
        if k not in ACTIONS[kind]:
            raise PolicyError(f"{where}: '{kind}' has no argument {k!r}; valid: "
                              f"{', '.join(ACTIONS[kind])}.")
        if not isinstance(v, ACTIONS[kind][k]):
            raise PolicyError(f"{where}: '{kind}.{k}' must be a {ACTIONS[kind][k].__name__}.")
    missing = [k for k in REQUIRED[kind] if k not in args]
    if missing:
        raise PolicyError(f"{where}: '{kind}' needs {', '.join(missing)}.")
    if kind == "service" and "enabled" not in args and "active" not in args:
        raise PolicyError(f"{where}: 'service' needs 'enabled' or 'active'.")
    if kind in ("set-line", "remove-line"):
        try:
            compile_safe(args["match"])
        except RegexError as e:
            raise PolicyError(f"{where}: '{kind}.match': {e}") from None
    if kind == "mode" and not re.fullmatch(r"[0-7]{3,4}", args["mode"]):
        raise PolicyError(f"{where}: 'mode.mode' must be an octal mode such as \"0640\".")
    return Action(kind, dict(args))


def load_policy(data: Any, source: str = "the policy") -> Policy:
    """A validated :class:`Policy` from its parsed YAML, or one PolicyError sentence."""
    if not isinstance(data, Mapping) or not isinstance(data.get("policy"), Mapping):
        raise PolicyError(f"{source}: a policy needs a 'policy' mapping (id, name).")
    head = data["policy"]
    pid = head.get("id")
    if not isinstance(pid, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", pid):
        raise PolicyError(f"{source}: 'policy.id' must be lower-case letters, digits, '.', "
                          "'_' or '-'.")
    raw_checks = data.get("checks")
    if not isinstance(raw_checks, list) or not raw_checks:
        raise PolicyError(f"{source}: 'checks' must be a non-empty list.")
    checks, seen = [], set()
    for i, c in enumerate(raw_checks, start=1):
        where = f"{source}, check {i}"
        if not isinstance(c, Mapping):
            raise PolicyError(f"{where}: a check is a mapping.")
        cid = c.get("id")
        if not isinstance(cid, (str, int)) or str(cid) in seen:
            raise PolicyError(f"{where}: every check needs its own 'id'.")
        seen.add(str(cid))
        where = f"{source}, check {cid}"
        if not isinstance(c.get("title"), str):
            raise PolicyError(f"{where}: 'title' is missing.")
        condition = c.get("condition", "all")
        if condition not in CONDITIONS:
            raise PolicyError(f"{where}: 'condition' must be one of {', '.join(CONDITIONS)}.")
        rules = c.get("rules")
        if not isinstance(rules, list) or not rules or not all(isinstance(r, str) for r in rules):
            raise PolicyError(f"{where}: 'rules' must be a non-empty list of rule lines.")
        applies = c.get("applies") or []
        if not isinstance(applies, list) or not all(isinstance(r, str) for r in applies):
            raise PolicyError(f"{where}: 'applies' must be a list of rule lines.")
        try:
            parsed = tuple(parse_rule(r) for r in rules)
            preconditions = tuple(parse_rule(r) for r in applies)
        except RuleError as e:
            raise PolicyError(f"{where}: {e}") from None
        fixes = c.get("fix") or []
        if not isinstance(fixes, list):
            raise PolicyError(f"{where}: 'fix' must be a list of actions.")
        compliance = c.get("compliance") or {}
        if not isinstance(compliance, Mapping) or not all(
                isinstance(v, list) for v in compliance.values()):
            raise PolicyError(f"{where}: 'compliance' maps a standard to a list of IDs.")
        checks.append(PolicyCheck(
            str(cid), c["title"], condition, parsed,
            tuple(_action(f, f"{where}, fix {n}") for n, f in enumerate(fixes, start=1)),
            str(c.get("rationale", "")), str(c.get("remediation", "")),
            {str(k): tuple(str(x) for x in v) for k, v in compliance.items()},
            preconditions))
    return Policy(pid, str(head.get("name", pid)), str(head.get("description", "")),
                  tuple(checks))


def profiles(root: Path = Path("/")) -> dict[str, Path]:
    """The profiles on this host: the file name without ``.yaml`` → its file."""
    from cerulean.agent.yamlfile import layered

    return {f.stem: f for f in layered([root / d for d in PROFILE_DIRS])}


def is_profile_name(name: object) -> bool:
    """Whether *name* is a plain profile name (:data:`PROFILE_NAME`), not a path."""
    return isinstance(name, str) and PROFILE_NAME.fullmatch(name) is not None \
        and name not in (".", "..")


def load_profile(name: str, root: Path = Path("/"), *, allow_path: bool = False) -> Policy:
    """The profile *name* (see :func:`profiles`). Only with *allow_path* (a file named on
    the command line) may it be the path of a policy file; names from the configuration
    or the fleet are plain names, looked up only in the profile directories."""
    from cerulean.agent.yamlfile import YamlError, load

    path = None
    if allow_path and ("/" in name or name.endswith(".yaml")):
        path = Path(name)
    elif not is_profile_name(name):
        raise PolicyError(f"{name[:100]!r} is not a profile name (letters, digits, '.', '_' "
                          "and '-'); a policy from the configuration or the fleet is named, "
                          "never given by its path.")
    found = profiles(root)
    path = path or found.get(name)
    if path is None:
        known = ", ".join(sorted(found)) or "none"
        raise PolicyError(f"There is no policy profile {name!r} (this host has: {known}); "
                          "give a profile name or the path of a policy file.")
    try:
        return load_policy(load(path), str(path))
    except YamlError as e:
        raise PolicyError(str(e)) from None


@dataclass(frozen=True)
class RuleResult:
    rule: str
    held: bool
    evidence: str


@dataclass(frozen=True)
class CheckResult:
    id: str
    title: str
    result: str  # passed | failed | error | notapplicable
    rules: tuple[RuleResult, ...]
    compliance: Mapping[str, tuple[str, ...]]
    message: str = ""  # for errors

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "result": self.result,
                "compliance": {k: list(v) for k, v in self.compliance.items()},
                "message": self.message,
                "rules": [{"rule": r.rule, "held": r.held, "evidence": r.evidence}
                          for r in self.rules]}


@dataclass(frozen=True)
class Report:
    policy: str
    results: tuple[CheckResult, ...]

    def count(self, result: str) -> int:
        return sum(1 for r in self.results if r.result == result)

    @property
    def score(self) -> float:
        """Passed checks as a percentage of those that passed or failed."""
        judged = self.count("passed") + self.count("failed")
        return round(100 * self.count("passed") / judged, 1) if judged else 100.0

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "score": self.score, "passed": self.count("passed"),
                "failed": self.count("failed"), "errors": self.count("error"),
                "notapplicable": self.count("notapplicable"),
                "checks": [r.to_json() for r in self.results]}


    @property
    def clean(self) -> bool:
        """Nothing failed and nothing could not be checked (the exit code's 0)."""
        return self.count("failed") == 0 and self.count("error") == 0


def check(c: PolicyCheck, host: Host) -> CheckResult:
    outcomes = []
    try:
        for rule in c.applies:
            o = evaluate(rule, host)
            if not o.passed:
                return CheckResult(c.id, c.title, "notapplicable",
                                   (RuleResult(rule.text, False, o.evidence),), c.compliance)
        for rule in c.rules:
            o = evaluate(rule, host)
            outcomes.append(RuleResult(rule.text, o.passed, o.evidence))
    except RuleError as e:
        return CheckResult(c.id, c.title, "error", tuple(outcomes), c.compliance, str(e))
    except OSError as e:  # a loop of links, an I/O error: this check, not the whole run
        return CheckResult(c.id, c.title, "error", tuple(outcomes), c.compliance,
                           f"{e.filename or 'a file'} cannot be read: {e.strerror or e}.")
    held = [o.held for o in outcomes]
    ok = all(held) if c.condition == "all" else any(held) if c.condition == "any" \
        else not any(held)
    return CheckResult(c.id, c.title, "passed" if ok else "failed", tuple(outcomes),
                       c.compliance)


def run_policy(policy: Policy, host: Host) -> Report:
    once = host.cached()  # a command several checks read runs once per pass
    return Report(policy.id, tuple(check(c, once) for c in policy.checks))


@dataclass
class Fixer:
    """Carries out fix actions on *host* (its root; commands run on the real system)."""

    host: Host
    run: Callable[[Sequence[str]], tuple[int, str]] | None = None

    def _cmd(self, argv: Sequence[str]) -> None:
        if self.run is not None:
            rc, out = self.run(argv)
        else:
            try:
                r = subprocess.run(list(argv), capture_output=True, text=True, timeout=60,
                                   check=False, errors="replace")
                rc, out = r.returncode, r.stdout + r.stderr
            except (OSError, subprocess.TimeoutExpired) as e:
                rc, out = 127, str(e)
        if rc != 0:
            tail = (out.strip().splitlines() or [f"exit {rc}"])[-1]
            raise PolicyError(f"{' '.join(argv)} failed: {tail}")

    def _parent(self, path: str, create: bool) -> tuple[int, str]:
        """An O_PATH descriptor of *path*'s directory and its last name, reached from the
        host's root one component at a time without following a symbolic link, so a fix
        never lands outside the directory it names (missing directories are made, 0755,
        when *create*). The caller closes the descriptor."""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise PolicyError(f"{path} is not a plain absolute path; the fix leaves it alone.")
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        fd = os.open(self.host.root, flags)
        try:
            for i, part in enumerate(parts[:-1]):
                where = "/" + "/".join(parts[:i + 1])
                try:
                    nxt = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nxt = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
                except (NotADirectoryError, OSError) as e:
                    if isinstance(e, NotADirectoryError) or e.errno == errno.ELOOP:
                        raise PolicyError(f"{where} is a symbolic link or not a directory; "
                                          f"the fix of {path} does not go through it.") \
                            from None
                    raise
                os.close(fd)
                fd = nxt
            return fd, parts[-1]
        except BaseException:
            os.close(fd)
            raise

    def _rewrite(self, path: str, change: Callable[[list[str]], list[str]]) -> None:
        """Replace *path*'s lines atomically, keeping its mode and owner. A symbolic link
        is refused (the fix would replace the link, not what it points to), and so is a
        path through one (see :meth:`_parent`)."""
        dfd, name = self._parent(path, create=True)
        try:
            self._rewrite_in(dfd, name, path, change)
        finally:
            os.close(dfd)

    def _rewrite_in(self, dfd: int, name: str, path: str,
                    change: Callable[[list[str]], list[str]]) -> None:
        st: os.stat_result | None = None
        try:
            fd = os.open(name, READ_FLAGS | os.O_NOFOLLOW, dir_fd=dfd)
        except FileNotFoundError:
            fd = -1
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise PolicyError(f"{path} is not a regular file (a link or something else); "
                                  "the fix leaves it alone.") from None
            raise
        data = b""
        if fd >= 0:
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise PolicyError(f"{path} is not a regular file (a link or something "
                                      "else); the fix leaves it alone.")
                if st.st_size > MAX_FILE_BYTES:
                    raise PolicyError(f"{path} is larger than {MAX_FILE_BYTES >> 20} MiB; the "
                                      "fix leaves it alone.")
                with os.fdopen(os.dup(fd), "rb") as f:
                    data = f.read(MAX_FILE_BYTES + 1)
            finally:
                os.close(fd)
        try:
            old = data.decode()
        except UnicodeDecodeError:
            raise PolicyError(f"{path} is not UTF-8 text; the fix leaves it alone.") from None
        lines = change(old.splitlines())
        new = "\n".join(lines) + ("\n" if lines else "")
        if new == old:
            return
        tmp = f".{name}.{secrets.token_hex(6)}"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=dfd)
        try:
            if st is not None:
                os.fchown(out, st.st_uid, st.st_gid)
                os.fchmod(out, stat.S_IMODE(st.st_mode))
            else:
                os.fchmod(out, 0o644)
            with os.fdopen(out, "wb") as f:
                f.write(new.encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise

    def _set_mode(self, path: str, mode: int, owner: str | None, group: str | None) -> None:
        """chmod (and chown) *path* itself: never a link's target, never through a link."""
        dfd, name = self._parent(path, create=False)
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise PolicyError(f"{path} is a symbolic link; the fix does not change what "
                                  "it points to.")
            # The descriptor names this very inode: chmod through /proc/self/fd reaches it
            # and nothing else (fchmod does not take an O_PATH descriptor).
            here = f"/proc/self/fd/{fd}"
            os.chmod(here, mode)
            if owner is not None or group is not None:
                uid = pwd.getpwnam(owner).pw_uid if owner is not None else -1
                gid = grp.getgrnam(group).gr_gid if group is not None else -1
                os.chown(here, uid, gid)
        finally:
            os.close(fd)

    def apply(self, action: Action) -> None:
        a = action.args
        if action.kind == "set-line":
            rx = compile_safe(a["match"])

            def set_line(lines: list[str]) -> list[str]:
                hits = [i for i, line in enumerate(lines) if rx.search(bounded(line))]
                if not hits:
                    return [*lines, a["line"]]
                others = set(hits[1:])
                return [a["line"] if i == hits[0] else line for i, line in enumerate(lines)
                        if i not in others]

            self._rewrite(a["file"], set_line)
        elif action.kind == "remove-line":
            rx = compile_safe(a["match"])
            self._rewrite(a["file"], lambda lines: [x for x in lines
                                                    if not rx.search(bounded(x))])
        elif action.kind == "sysctl":
            key = a["key"]
            line = f"{key} = {a['value']}"
            self._rewrite(SYSCTL_FILE, lambda lines: [
                *[x for x in lines if x.split("=")[0].strip() != key], line])
            self._cmd(["sysctl", "-q", "-w", f"{key}={a['value']}"])
        elif action.kind == "mode":
            self._set_mode(a["path"], int(a["mode"], 8), a.get("owner"), a.get("group"))
        elif action.kind == "service":
            if "enabled" in a:
                self._cmd(["systemctl", "enable" if a["enabled"] else "disable", a["unit"]])
            if "active" in a:
                self._cmd(["systemctl", "start" if a["active"] else "stop", a["unit"]])
        else:
            self._cmd(a["argv"])


@dataclass(frozen=True)
class FixResult:
    check: str
    actions: tuple[str, ...]
    error: str = ""


def fix(policy: Policy, report: Report, fixer: Fixer, mode: str,
        fixed_before: set[str] | frozenset[str] = frozenset()) -> list[FixResult]:
    """Fix the failed checks that *mode* allows: none in audit, each once in enforce (not
    those in *fixed_before*), all of them in autocorrect. Checks without a fix are left."""
    if mode not in MODES:
        raise PolicyError(f"The mode {mode!r} is not one of {', '.join(MODES)}.")
    if mode == "audit":
        return []
    by_id = {c.id: c for c in policy.checks}
    out = []
    for r in report.results:
        c = by_id[r.id]
        if r.result != "failed" or not c.fix:
            continue
        if mode == "enforce" and c.id in fixed_before:
            continue
        done: list[str] = []
        try:
            for action in c.fix:
                fixer.apply(action)
                done.append(action.describe())
        except (PolicyError, OSError, KeyError) as e:
            out.append(FixResult(c.id, tuple(done), str(e)))
            continue
        out.append(FixResult(c.id, tuple(done)))
    return out
