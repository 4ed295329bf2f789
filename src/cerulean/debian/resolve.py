"""Dependency resolution: from requested packages to an install closure.

How it works (also described in DESIGN.md):

1. Candidates. For every package name, the candidates are its versions across
   all configured suites, highest first (python-debian's version ordering), so
   a fix in trixie-security or trixie-updates wins over the release version.
   Provides make a package a candidate for a virtual name as well.
2. Greedy closure, the way apt would choose. Starting from the requested
   packages in order, every Pre-Depends and Depends group not yet satisfied by
   the packages chosen so far is satisfied by its first alternative that has
   a candidate compatible with everything chosen (version constraints,
   Conflicts and Breaks in both directions, one version per name). Virtual
   names prefer a provider already chosen, then the provider with the higher
   Priority, then the alphabetically first. The result is deterministic.
3. SAT when greedy is not enough. If the greedy pass hits a Conflicts or
   Breaks dead end, the whole problem over every reachable candidate is
   handed to a SAT solver (PySAT): one variable per candidate, a clause per
   dependency group, at-most-one version per name, and a binary clause per
   conflict. The greedy choices are given to the solver as preferred phases so
   its answer stays close to apt's, and the answer is then trimmed to the
   closure actually needed by the requests.
4. Failure. A request that cannot be met names the chain of dependencies from
   the request to the relation that broke, e.g. ``python3 -> python3.13 ->
   libexpat1 (>= 2.6)``, and why that relation could not be met.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cmp_to_key
from typing import TYPE_CHECKING, TypeAlias

from debian.deb822 import PkgRelation
from debian.debian_support import version_compare

from cerulean.debian.packages import Package
from cerulean.errors import CeruleanError

if TYPE_CHECKING:
    # python-debian's parsed relation: name, version, archqual, arch, restrictions
    Relation: TypeAlias = PkgRelation.ParsedRelation
else:
    Relation = dict
Group = list[Relation]  # alternatives: any one satisfies the group

PRIORITY_RANK = {"required": 0, "important": 1, "standard": 2, "optional": 3, "extra": 4}


class ResolveError(CeruleanError):
    """The requested packages cannot be installed together."""


def _cmp(a: str, b: str) -> int:
    return int(version_compare(a, b))


def version_satisfies(version: str, constraint: tuple[str, str] | None) -> bool:
    if constraint is None:
        return True
    op, want = constraint[0], constraint[1]
    c = _cmp(version, want)
    return {
        "<<": c < 0,
        "<=": c <= 0,
        "=": c == 0,
        ">=": c >= 0,
        ">>": c > 0,
        "<": c <= 0,  # obsolete spellings, as dpkg reads them
        ">": c >= 0,
    }.get(op, False)


def format_relation(rel: Relation) -> str:
    s = str(rel["name"])
    if rel.get("archqual"):
        s += f":{rel['archqual']}"
    v = rel.get("version")
    if v:
        s += f" ({v[0]} {v[1]})"
    return s


def format_group(group: Group) -> str:
    return " | ".join(format_relation(r) for r in group)


def parse_relations(text: str, arch: str) -> list[Group]:
    """Parse a relation field, dropping alternatives restricted to other architectures."""
    if not text.strip():
        return []
    groups: list[Group] = []
    for group in PkgRelation.parse_relations(text):
        kept = [r for r in group if _arch_ok(r, arch)]
        if kept:
            groups.append(kept)
    return groups


def _arch_ok(rel: Relation, arch: str) -> bool:
    restr = rel.get("arch")
    if not restr:
        return True
    enabled = [r.arch for r in restr if r.enabled]
    disabled = [r.arch for r in restr if not r.enabled]
    if enabled:
        return arch in enabled
    return arch not in disabled


@dataclass
class Universe:
    """Every package available for one architecture, indexed for resolution."""

    arch: str
    by_name: dict[str, list[Package]] = field(default_factory=dict)
    providers: dict[str, list[tuple[Package, str | None]]] = field(default_factory=dict)
    _rels: dict[tuple[str, str, str], dict[str, list[Group]]] = field(default_factory=dict)

    @classmethod
    def build(cls, packages: Iterable[Package], arch: str, suites: Sequence[str]) -> Universe:
        u = cls(arch)
        order = {s: i for i, s in enumerate(suites)}
        unique: dict[tuple[str, str], Package] = {}
        for p in packages:
            if p.arch not in (arch, "all"):
                continue
            key = (p.name, p.version)
            old = unique.get(key)
            # The same version in two suites is the same file; keep the earlier suite.
            if old is None or order.get(p.suite, 99) < order.get(old.suite, 99):
                unique[key] = p
        for p in unique.values():
            u.by_name.setdefault(p.name, []).append(p)
        for lst in u.by_name.values():
            lst.sort(key=cmp_to_key(lambda a, b: _cmp(b.version, a.version)))
        for name in sorted(u.by_name):
            for p in u.by_name[name]:
                for group in PkgRelation.parse_relations(p.provides) if p.provides else []:
                    for rel in group:
                        pv = rel.get("version")
                        ver = pv[1] if pv else None
                        u.providers.setdefault(rel["name"], []).append((p, ver))
        return u

    def relations(self, p: Package) -> dict[str, list[Group]]:
        key = (p.name, p.version, p.arch)
        r = self._rels.get(key)
        if r is None:
            r = {
                "depends": parse_relations(p.pre_depends, self.arch)
                + parse_relations(p.depends, self.arch),
                "conflicts": parse_relations(p.conflicts, self.arch)
                + parse_relations(p.breaks, self.arch),
            }
            self._rels[key] = r
        return r

    def satisfies(self, p: Package, rel: Relation) -> bool:
        if p.name == rel["name"] and version_satisfies(p.version, rel.get("version")):
            return True
        for prov, ver in self.providers.get(rel["name"], []):
            if prov is p:
                if rel.get("version") is None:
                    return True
                if ver is not None and version_satisfies(ver, rel["version"]):
                    return True
        return False

    def candidates(self, rel: Relation, chosen: dict[str, Package] | None = None) -> list[Package]:
        """Packages satisfying *rel*, in preference order."""
        real = [p for p in self.by_name.get(rel["name"], []) if self.satisfies(p, rel)]
        virt: list[Package] = []
        seen = {id(p) for p in real}
        provs = sorted(
            self.providers.get(rel["name"], []),
            key=lambda pv: (
                0 if chosen is not None and chosen.get(pv[0].name) is pv[0] else 1,
                PRIORITY_RANK.get(pv[0].priority, 5),
                pv[0].name,
            ),
        )
        for prov, _ in provs:
            if id(prov) not in seen and self.satisfies(prov, rel):
                seen.add(id(prov))
                virt.append(prov)
        return real + virt


def _conflicts(u: Universe, a: Package, b: Package) -> Relation | None:
    """The relation by which *a* conflicts with or breaks *b*, if any."""
    if a.name == b.name:
        return None
    for group in u.relations(a)["conflicts"]:
        for rel in group:
            if u.satisfies(b, rel):
                return rel
    return None


@dataclass
class _Fail:
    chain: list[str]
    group: Group
    reason: str


def _excluded(group: Group, exclude: frozenset[str]) -> bool:
    return any(rel["name"] in exclude for rel in group)


def _greedy(
    u: Universe, requests: list[Relation], exclude: frozenset[str]
) -> tuple[dict[str, Package], _Fail | None]:
    chosen: dict[str, Package] = {}
    queue: deque[tuple[Group, list[str]]] = deque(([r], []) for r in requests)
    while queue:
        group, chain = queue.popleft()
        if chain and _excluded(group, exclude):
            continue
        if any(any(u.satisfies(p, rel) for p in chosen.values()) for rel in group):
            continue
        picked: Package | None = None
        reasons: list[str] = []
        for rel in group:
            cands = u.candidates(rel, chosen)
            if not cands:
                if rel["name"] in u.by_name:
                    have = ", ".join(p.version for p in u.by_name[rel["name"]])
                    reasons.append(f"{format_relation(rel)} is not met by the available {have}")
                else:
                    reasons.append(f"no suite has a package called '{rel['name']}'")
                continue
            for c in cands:
                if c.name in exclude:
                    reasons.append(f"{c.name} is excluded")
                    continue
                if c.name in chosen:
                    reasons.append(f"{c.label} clashes with {chosen[c.name].label}, already chosen")
                    continue
                clash = next(
                    (
                        (o, r)
                        for o in chosen.values()
                        for r in (_conflicts(u, c, o), _conflicts(u, o, c))
                        if r is not None
                    ),
                    None,
                )
                if clash is not None:
                    reasons.append(f"{c.label} conflicts with {clash[0].label}")
                    continue
                picked = c
                break
            if picked is not None:
                break
        if picked is None:
            return chosen, _Fail(chain, group, "; ".join(dict.fromkeys(reasons)))
        chosen[picked.name] = picked
        here = [*chain, picked.name]
        for dep in u.relations(picked)["depends"]:
            queue.append((dep, here))
    return chosen, None


def _deps(u: Universe, p: Package, exclude: frozenset[str]) -> list[Group]:
    return [g for g in u.relations(p)["depends"] if not _excluded(g, exclude)]


def _reachable(u: Universe, requests: list[Relation], exclude: frozenset[str]) -> list[Package]:
    seen: dict[int, Package] = {}
    queue: deque[Package] = deque()
    for r in requests:
        for c in u.candidates(r):
            if id(c) not in seen and c.name not in exclude:
                seen[id(c)] = c
                queue.append(c)
    while queue:
        p = queue.popleft()
        for group in _deps(u, p, exclude):
            for rel in group:
                for c in u.candidates(rel):
                    if id(c) not in seen and c.name not in exclude:
                        seen[id(c)] = c
                        queue.append(c)
    return sorted(seen.values(), key=lambda p: (p.name, p.version))


def _sat(
    u: Universe, requests: list[Relation], hint: dict[str, Package], exclude: frozenset[str]
) -> dict[str, Package] | None:
    from pysat.solvers import Solver

    pool = _reachable(u, requests, exclude)
    var = {id(p): i + 1 for i, p in enumerate(pool)}
    clauses: list[list[int]] = []
    for r in requests:
        clauses.append([var[id(c)] for c in u.candidates(r) if id(c) in var])
    by_name: dict[str, list[Package]] = {}
    for p in pool:
        by_name.setdefault(p.name, []).append(p)
        for group in _deps(u, p, exclude):
            alts = {var[id(c)] for rel in group for c in u.candidates(rel) if id(c) in var}
            clauses.append([-var[id(p)], *sorted(alts)])
    for versions in by_name.values():
        for i, a in enumerate(versions):
            for b in versions[i + 1 :]:
                clauses.append([-var[id(a)], -var[id(b)]])
    for a in pool:
        for group in u.relations(a)["conflicts"]:
            for rel in group:
                for b in u.candidates(rel):
                    if b.name != a.name and id(b) in var:
                        clauses.append([-var[id(a)], -var[id(b)]])
    hinted = {id(p) for p in hint.values()}
    # Phases only guide the search, so also rule out every version below the highest
    # of its name wherever possible: a fix in trixie-security must not be lost here.
    older = [
        -var[id(p)]
        for name in sorted(by_name)
        for p in [q for q in u.by_name[name] if id(q) in var][1:]
    ]
    with Solver(name="minisat22", bootstrap_with=clauses) as s:
        s.set_phases([var[id(p)] if id(p) in hinted else -var[id(p)] for p in pool])
        if not s.solve():
            return None
        keep = older
        if not s.solve(assumptions=older):
            keep = []
            for lit in older:
                if s.solve(assumptions=[*keep, lit]):
                    keep.append(lit)
            s.solve(assumptions=keep)
        model = {lit for lit in (s.get_model() or []) if lit > 0}
    on = {p.name: p for p in pool if var[id(p)] in model}
    # Keep only what the requests need, choosing among satisfied alternatives in order.
    needed: dict[str, Package] = {}
    queue: deque[Group] = deque([r] for r in requests)
    while queue:
        group = queue.popleft()
        if any(any(u.satisfies(p, rel) for p in needed.values()) for rel in group):
            continue
        pick = next(
            (c for rel in group for c in u.candidates(rel, on) if on.get(c.name) is c), None
        )
        if pick is None:
            return None
        needed[pick.name] = pick
        queue.extend(_deps(u, pick, exclude))
    return needed


def parse_request(text: str) -> Relation:
    """'name', 'name=version' or 'name (>= version)' as a relation."""
    t = text.strip()
    if "=" in t and "(" not in t:
        name, _, ver = t.partition("=")
        t = f"{name.strip()} (= {ver.strip()})"
    groups = PkgRelation.parse_relations(t)
    if (
        len(groups) != 1
        or len(groups[0]) != 1
        or not re.fullmatch(r"[a-z0-9][a-z0-9+.-]*", groups[0][0].get("name") or "")
    ):
        raise ResolveError(f"The package request {text!r} is not a package name.")
    rel: Relation = groups[0][0]
    return rel


def resolve(
    u: Universe, requests: Sequence[str], exclude: Iterable[str] = ()
) -> list[Package]:
    """The install closure of *requests*, sorted by name.

    Dependencies on an *exclude*d package count as met without installing it.
    """
    rels = [parse_request(r) for r in requests]
    excluded = set(exclude)
    # A virtual name an excluded package provides (awk for mawk) counts as met too.
    provided = {
        virt
        for virt, provs in u.providers.items()
        if any(p.name in excluded for p, _ in provs)
    }
    ex = frozenset(excluded | provided)
    chosen, fail = _greedy(u, rels, ex)
    if fail is not None:
        solved = _sat(u, rels, chosen, ex)
        if solved is None:
            via = " -> ".join(fail.chain) if fail.chain else "the request"
            raise ResolveError(
                f"Cannot install {', '.join(requests)} for {u.arch}: "
                f"{via} needs {format_group(fail.group)}, but {fail.reason}."
            )
        chosen = solved
    return sorted(chosen.values(), key=lambda p: p.name)
