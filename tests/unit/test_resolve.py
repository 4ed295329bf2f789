"""Tests for cerulean.debian.resolve on small synthetic package universes."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest

from cerulean.debian import resolve as resolve_mod
from cerulean.debian.packages import Package
from cerulean.debian.resolve import (
    ResolveError,
    Universe,
    parse_request,
    resolve,
    version_satisfies,
)

SUITES = ("trixie", "trixie-security", "trixie-updates")


def pkg(
    name: str,
    version: str = "1.0",
    *,
    arch: str = "amd64",
    suite: str = "trixie",
    depends: str = "",
    pre_depends: str = "",
    provides: str = "",
    conflicts: str = "",
    breaks: str = "",
    priority: str = "optional",
    multi_arch: str = "no",
) -> Package:
    return Package(
        name=name,
        version=version,
        arch=arch,
        suite=suite,
        base_url="http://deb.example/debian",
        filename=f"pool/main/{name[0]}/{name}/{name}_{version}_{arch}.deb",
        sha256="0" * 64,
        size=1000,
        source=name,
        source_version=version,
        depends=depends,
        pre_depends=pre_depends,
        provides=provides,
        conflicts=conflicts,
        breaks=breaks,
        multi_arch=multi_arch,
        priority=priority,
    )


def universe(pkgs: Iterable[Package], arch: str = "amd64") -> Universe:
    return Universe.build(list(pkgs), arch, SUITES)


def run(
    pkgs: Iterable[Package],
    requests: Sequence[str],
    exclude: Iterable[str] = (),
    arch: str = "amd64",
) -> dict[str, str]:
    """Resolve and return {name: version}, checking the result is sorted by name."""
    result = resolve(universe(pkgs, arch), requests, exclude=exclude)
    names = [p.name for p in result]
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    return {p.name: p.version for p in result}


def fail(pkgs: Iterable[Package], requests: Sequence[str], exclude: Iterable[str] = ()) -> str:
    with pytest.raises(ResolveError) as exc:
        resolve(universe(pkgs), requests, exclude=exclude)
    msg = str(exc.value)
    assert "Traceback" not in msg
    assert "\n" not in msg
    return msg


@pytest.fixture
def sat_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count how often the SAT fallback runs."""
    calls: list[int] = []
    real: Callable[..., Any] = resolve_mod._sat

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(resolve_mod, "_sat", spy)
    return calls


# 1. Closure, ordering, determinism


def test_depends_and_pre_depends_closure() -> None:
    pkgs = [
        pkg("app", "1.0-1", depends="libfoo (>= 1.0), zlib1g", pre_depends="libc6"),
        pkg("libfoo", "1.2-3", depends="libc6 (>= 2.36), libbar"),
        pkg("libbar", "0.5-1", pre_depends="libc6"),
        pkg("libc6", "2.41-12"),
        pkg("zlib1g", "1:1.3.dfsg-3"),
        pkg("unrelated", "9.9", depends="libc6"),
    ]
    result = resolve(universe(pkgs), ["app"])
    assert [(p.name, p.version) for p in result] == [
        ("app", "1.0-1"),
        ("libbar", "0.5-1"),
        ("libc6", "2.41-12"),
        ("libfoo", "1.2-3"),
        ("zlib1g", "1:1.3.dfsg-3"),
    ]


def test_dependency_cycle_terminates() -> None:
    pkgs = [pkg("a", depends="b"), pkg("b", depends="c"), pkg("c", pre_depends="a")]
    assert run(pkgs, ["a"]) == {"a": "1.0", "b": "1.0", "c": "1.0"}


def _rich_universe() -> list[Package]:
    """Alternatives, virtuals, several versions and suites, and a SAT-only solution."""
    return [
        pkg("app", "2.0-1", depends="libfoo (>= 1.1), mail-transport-agent, pick-a | pick-b"),
        pkg("app", "1.0-1", depends="libfoo"),
        pkg("libfoo", "1.1-1", depends="libc6"),
        pkg("libfoo", "1.1-1+deb13u1", suite="trixie-security", depends="libc6"),
        pkg("libfoo", "1.0-1", depends="libc6"),
        pkg("libc6", "2.41-12"),
        pkg("libc6", "2.41-12", suite="trixie-updates"),
        pkg("exim4", provides="mail-transport-agent", priority="standard"),
        pkg("postfix", provides="mail-transport-agent", priority="optional"),
        pkg("dma", provides="mail-transport-agent", priority="standard"),
        pkg("pick-a", depends="libc6"),
        pkg("pick-b", depends="libc6"),
        pkg("tool", depends="helper"),
        pkg("helper", conflicts="pick-a"),
        pkg("noise", arch="arm64"),
        pkg("docs", arch="all"),
    ]


def test_result_deterministic_when_input_shuffled() -> None:
    pkgs = _rich_universe()
    requests = ["app", "tool", "docs"]
    baseline = [(p.name, p.version, p.suite) for p in resolve(universe(pkgs), requests)]
    assert baseline == [
        ("app", "2.0-1", "trixie"),
        ("dma", "1.0", "trixie"),
        ("docs", "1.0", "trixie"),
        ("helper", "1.0", "trixie"),
        ("libc6", "2.41-12", "trixie"),
        ("libfoo", "1.1-1+deb13u1", "trixie-security"),
        ("pick-b", "1.0", "trixie"),
        ("tool", "1.0", "trixie"),
    ]
    for seed in range(12):
        shuffled = list(pkgs)
        random.Random(seed).shuffle(shuffled)
        got = [(p.name, p.version, p.suite) for p in resolve(universe(shuffled), requests)]
        assert got == baseline, f"seed {seed}"


# 2. Alternatives


def test_alternative_first_available_is_picked(sat_calls: list[int]) -> None:
    pkgs = [pkg("app", depends="a | b"), pkg("a"), pkg("b")]
    assert run(pkgs, ["app"]) == {"app": "1.0", "a": "1.0"}
    assert sat_calls == []


def test_alternative_second_used_when_first_has_no_candidate() -> None:
    pkgs = [pkg("app", depends="missing | a (>= 2) | b"), pkg("a", "1.0"), pkg("b")]
    assert run(pkgs, ["app"]) == {"app": "1.0", "b": "1.0"}


def test_alternative_group_already_satisfied_adds_nothing(sat_calls: list[int]) -> None:
    base = [pkg("a"), pkg("b")]
    # b is needed by an earlier request
    pkgs = [*base, pkg("y", depends="b"), pkg("x", depends="a | b")]
    assert run(pkgs, ["y", "x"]) == {"x": "1.0", "y": "1.0", "b": "1.0"}
    # b is needed by an earlier dependency of the same package
    pkgs = [*base, pkg("x", depends="b, a | b")]
    assert run(pkgs, ["x"]) == {"x": "1.0", "b": "1.0"}
    # b is requested directly
    pkgs = [*base, pkg("x", depends="a | b")]
    assert run(pkgs, ["b", "x"]) == {"x": "1.0", "b": "1.0"}
    assert sat_calls == []


# 3. Version constraints


@pytest.mark.parametrize(
    ("versions", "dep", "expected"),
    [
        (["1.0", "2.0", "3.0"], "lib", "3.0"),
        (["1.0", "2.0", "3.0"], "lib (>= 2.0)", "3.0"),
        (["1.0", "2.0", "3.0"], "lib (<< 3.0)", "2.0"),
        (["1.0", "2.0", "3.0"], "lib (= 2.0)", "2.0"),
        (["1.0", "2.0", "3.0"], "lib (>> 1.0)", "3.0"),
        (["1.0", "2.0", "3.0"], "lib (<= 2.0)", "2.0"),
        (["1.0", "2.0", "3.0"], "lib (<= 1.5)", "1.0"),
        (["1:1.0", "2.0"], "lib", "1:1.0"),
        (["1:1.0", "2.0"], "lib (>= 2.0)", "1:1.0"),
        (["1:1.0", "2.0"], "lib (<< 1:0)", "2.0"),
        (["1:1.0", "2.0"], "lib (= 1:1.0)", "1:1.0"),
        (["2.0~rc1", "2.0"], "lib (<< 2.0)", "2.0~rc1"),
        (["2.0~rc1", "1.9"], "lib (>= 2.0~)", "2.0~rc1"),
        (["2.0~rc1", "2.0"], "lib (>> 2.0~rc1)", "2.0"),
        (["1.0-1", "1.0-1+deb13u1"], "lib (<< 1.0-1+deb13u1)", "1.0-1"),
    ],
)
def test_version_constraints(versions: list[str], dep: str, expected: str) -> None:
    pkgs = [pkg("app", depends=dep), *(pkg("lib", v) for v in versions)]
    assert run(pkgs, ["app"]) == {"app": "1.0", "lib": expected}


def test_version_satisfies_operators() -> None:
    assert version_satisfies("2.0~rc1", ("<<", "2.0"))
    assert not version_satisfies("2.0", ("<<", "2.0~rc1"))
    assert version_satisfies("1:1.0", (">>", "9.9"))
    assert version_satisfies("1.0", ("=", "0:1.0"))
    assert version_satisfies("1.0", ("<", "1.0"))  # obsolete: means <=
    assert version_satisfies("1.0", (">", "1.0"))  # obsolete: means >=
    assert version_satisfies("1.0", None)
    assert not version_satisfies("1.0", ("!=", "2.0"))


def test_unmet_version_constraint_names_chain_and_available_versions() -> None:
    pkgs = [
        pkg("app", depends="libfoo"),
        pkg("libfoo", depends="libbar (>= 3)"),
        pkg("libbar", "1.0"),
        pkg("libbar", "2.0", suite="trixie-security"),
    ]
    msg = fail(pkgs, ["app"])
    assert "app -> libfoo needs libbar (>= 3)" in msg
    assert "2.0, 1.0" in msg
    assert msg.startswith("Cannot install app for amd64: ")


def test_requested_version_constraint_unmet() -> None:
    msg = fail([pkg("lib", "1.0")], ["lib (>= 2)"])
    assert "the request needs lib (>= 2)" in msg
    assert "available 1.0" in msg


# 4. Suites


def test_highest_version_across_suites_wins() -> None:
    for order in (1, -1):
        pkgs = [
            pkg("app", depends="libssl3t64"),
            pkg("libssl3t64", "3.5.1-1"),
            pkg("libssl3t64", "3.5.1-1+deb13u1", suite="trixie-security"),
        ][::order]
        result = {p.name: p for p in resolve(universe(pkgs), ["app"])}
        assert result["libssl3t64"].version == "3.5.1-1+deb13u1"
        assert result["libssl3t64"].suite == "trixie-security"


def test_highest_version_wins_after_sat_fallback(sat_calls: list[int]) -> None:
    # libssl3t64 is first reached by the solver, not by the greedy pass: the solver
    # must still pick the security update, and must not downgrade the request.
    pkgs = [
        pkg("app", "2.0-1", depends="a | b"),
        pkg("app", "1.0-1"),
        pkg("a"),
        pkg("b", depends="libssl3t64"),
        pkg("libssl3t64", "3.5.1-1"),
        pkg("libssl3t64", "3.5.1-1+deb13u1", suite="trixie-security"),
        pkg("tool", depends="helper"),
        pkg("helper", conflicts="a"),
    ]
    for seed in range(5):
        random.Random(seed).shuffle(pkgs)
        result = {p.name: p for p in resolve(universe(pkgs), ["app", "tool"])}
        assert {n: p.version for n, p in result.items()} == {
            "app": "2.0-1",
            "b": "1.0",
            "helper": "1.0",
            "libssl3t64": "3.5.1-1+deb13u1",
            "tool": "1.0",
        }
        assert result["libssl3t64"].suite == "trixie-security"
    assert len(sat_calls) == 5


def test_sat_fallback_uses_older_version_when_needed(sat_calls: list[int]) -> None:
    pkgs = [
        pkg("app", depends="a | b"),
        pkg("a"),
        pkg("b", depends="lib (<< 2)"),
        pkg("lib", "1.0"),
        pkg("lib", "2.0"),
        pkg("tool", depends="helper, lib"),
        pkg("helper", conflicts="a"),
    ]
    assert run(pkgs, ["app", "tool"]) == {
        "app": "1.0",
        "b": "1.0",
        "helper": "1.0",
        "lib": "1.0",
        "tool": "1.0",
    }
    assert sat_calls == [1]


def test_same_version_in_two_suites_keeps_earlier_suite() -> None:
    for order in (1, -1):
        pkgs = [pkg("tzdata", "2025b-4", suite=s) for s in ("trixie-updates", "trixie")][::order]
        [p] = resolve(universe(pkgs), ["tzdata"])
        assert (p.version, p.suite) == ("2025b-4", "trixie")


# 5. Virtual packages


def test_virtual_single_provider() -> None:
    pkgs = [pkg("script", depends="awk"), pkg("mawk", provides="awk")]
    assert run(pkgs, ["script"]) == {"script": "1.0", "mawk": "1.0"}


def test_virtual_provider_by_priority_then_name() -> None:
    pkgs = [
        pkg("script", depends="awk"),
        pkg("aawk", provides="awk", priority="optional"),
        pkg("gawk", provides="awk", priority="optional"),
        pkg("mawk", provides="awk", priority="required"),
    ]
    assert run(pkgs, ["script"]) == {"script": "1.0", "mawk": "1.0"}
    # equal priority: alphabetical
    pkgs = [
        pkg("script", depends="awk"),
        pkg("gawk", provides="awk", priority="optional"),
        pkg("busybox-awk", provides="awk", priority="optional"),
        pkg("original-awk", provides="awk", priority="extra"),
    ]
    assert run(pkgs, ["script"]) == {"script": "1.0", "busybox-awk": "1.0"}


def test_virtual_prefers_provider_already_chosen() -> None:
    pkgs = [
        pkg("script", depends="awk"),
        pkg("gawk", provides="awk", priority="optional"),
        pkg("mawk", provides="awk", priority="required"),
    ]
    assert run(pkgs, ["gawk", "script"]) == {"gawk": "1.0", "script": "1.0"}


def test_versioned_provides() -> None:
    pkgs = [
        pkg("app", depends="foo (>= 2)"),
        pkg("foo-impl", provides="foo (= 2)"),
    ]
    assert run(pkgs, ["app"]) == {"app": "1.0", "foo-impl": "1.0"}
    pkgs = [pkg("app", depends="foo (>= 3)"), pkg("foo-impl", provides="foo (= 2)")]
    msg = fail(pkgs, ["app"])
    assert "app needs foo (>= 3)" in msg


def test_unversioned_provides_does_not_meet_versioned_depends() -> None:
    pkgs = [pkg("app", depends="foo (>= 1)"), pkg("foo-impl", provides="foo")]
    msg = fail(pkgs, ["app"])
    assert "app needs foo (>= 1)" in msg
    # ... but it meets an unversioned one
    pkgs = [pkg("app", depends="foo"), pkg("foo-impl", provides="foo")]
    assert run(pkgs, ["app"]) == {"app": "1.0", "foo-impl": "1.0"}
    # ... and a versioned provider is chosen over an unversioned one
    pkgs = [
        pkg("app", depends="foo (>= 1)"),
        pkg("a-impl", provides="foo"),
        pkg("b-impl", provides="foo (= 1.5)"),
    ]
    assert run(pkgs, ["app"]) == {"app": "1.0", "b-impl": "1.0"}


# 6. Conflicts and Breaks


@pytest.mark.parametrize(
    ("helper", "a"),
    [
        ({"conflicts": "a"}, {}),
        ({"breaks": "a"}, {}),
        ({}, {"conflicts": "helper"}),
        ({}, {"breaks": "helper (<< 5)"}),
    ],
)
def test_sat_fallback_replaces_conflicting_alternative(
    sat_calls: list[int], helper: dict[str, str], a: dict[str, str]
) -> None:
    # Greedy picks a for "a | b" before tool's helper (which clashes with a) is reached.
    pkgs = [
        pkg("app", depends="a | b"),
        pkg("a", **a),
        pkg("b"),
        pkg("tool", depends="helper"),
        pkg("helper", **helper),
    ]
    result = run(pkgs, ["app", "tool"])
    assert result == {"app": "1.0", "b": "1.0", "helper": "1.0", "tool": "1.0"}
    assert "a" not in result
    assert sat_calls == [1]


def test_breaks_with_version_selects_newer() -> None:
    pkgs = [
        pkg("app", depends="x", breaks="x (<< 2)"),
        pkg("x", "1.0"),
        pkg("x", "2.0", suite="trixie-updates"),
    ]
    assert run(pkgs, ["app"]) == {"app": "1.0", "x": "2.0"}


def test_breaks_with_version_forces_newer_via_sat(sat_calls: list[int]) -> None:
    # Greedy takes x 1.0 for old-plugin's first alternative before it reaches app,
    # which breaks it, so the solver must take the second alternative (x 2.0).
    pkgs = [
        pkg("old-plugin", depends="x (<< 2) | plugin-host"),
        pkg("plugin-host", depends="x (>= 2)"),
        pkg("tool", depends="app"),
        pkg("app", breaks="x (<< 2)"),
        pkg("x", "1.0"),
        pkg("x", "2.0"),
    ]
    assert run(pkgs, ["old-plugin", "tool"]) == {
        "app": "1.0",
        "old-plugin": "1.0",
        "plugin-host": "1.0",
        "tool": "1.0",
        "x": "2.0",
    }
    assert sat_calls == [1]


def test_breaks_with_version_does_not_hit_newer() -> None:
    pkgs = [pkg("app", breaks="x (<< 2)"), pkg("x", "2.0")]
    assert run(pkgs, ["app", "x"]) == {"app": "1.0", "x": "2.0"}
    msg = fail([pkg("app", breaks="x (<< 2)"), pkg("x", "1.0")], ["app", "x"])
    assert "the request needs x, but x 1.0 (amd64) conflicts with app 1.0 (amd64)" in msg


def test_conflict_on_virtual_name() -> None:
    pkgs = [
        pkg("app", depends="mta, tool"),
        pkg("exim4", provides="mta", priority="standard"),
        pkg("postfix", provides="mta", priority="optional"),
        pkg("tool", conflicts="exim4"),
    ]
    assert run(pkgs, ["app"]) == {"app": "1.0", "postfix": "1.0", "tool": "1.0"}


def test_self_conflict_through_provides_is_ignored() -> None:
    # The Debian idiom: Provides, Conflicts and Replaces the same virtual name.
    pkgs = [
        pkg("app", depends="mail-transport-agent"),
        pkg("postfix", provides="mail-transport-agent", conflicts="mail-transport-agent"),
    ]
    assert run(pkgs, ["app"]) == {"app": "1.0", "postfix": "1.0"}


# 7. Unsatisfiable conflicts


def test_conflicting_requests_fail() -> None:
    msg = fail([pkg("a", conflicts="b"), pkg("b")], ["a", "b"])
    assert "Cannot install a, b for amd64" in msg
    assert "b 1.0 (amd64) conflicts with a 1.0 (amd64)" in msg


def test_conflicting_dependencies_fail_with_chain() -> None:
    pkgs = [
        pkg("app", depends="x"),
        pkg("x", depends="y"),
        pkg("y", depends="z"),
        pkg("z", breaks="x"),
    ]
    msg = fail(pkgs, ["app"])
    assert "app -> x -> y needs z" in msg
    assert "z 1.0 (amd64) conflicts with x 1.0 (amd64)" in msg


def test_conflicting_versions_of_one_name_fail() -> None:
    pkgs = [
        pkg("app", depends="lib (<< 2), tool"),
        pkg("tool", depends="lib (>= 2)"),
        pkg("lib", "1.0"),
        pkg("lib", "2.0"),
    ]
    msg = fail(pkgs, ["app"])
    assert "app -> tool needs lib (>= 2)" in msg
    assert "lib 2.0 (amd64) clashes with lib 1.0 (amd64), already chosen" in msg


# 8. Missing packages


def test_missing_package() -> None:
    msg = fail([pkg("a")], ["nope"])
    assert "no suite has a package called 'nope'" in msg


def test_missing_dependency() -> None:
    msg = fail([pkg("app", depends="lib, nope"), pkg("lib")], ["app"])
    assert "app needs nope, but no suite has a package called 'nope'" in msg


# 9. Architecture


def test_other_architecture_ignored() -> None:
    pkgs = [
        pkg("app", depends="lib"),
        pkg("lib", "1.0"),
        pkg("lib", "2.0", arch="arm64"),
        pkg("armonly", arch="arm64"),
    ]
    assert run(pkgs, ["app"]) == {"app": "1.0", "lib": "1.0"}
    msg = fail(pkgs, ["armonly"])
    assert "no suite has a package called 'armonly'" in msg
    assert run(pkgs, ["armonly"], arch="arm64") == {"armonly": "1.0"}


def test_arch_all_used() -> None:
    pkgs = [pkg("app", depends="app-data"), pkg("app-data", arch="all")]
    result = resolve(universe(pkgs), ["app"])
    assert [(p.name, p.arch) for p in result] == [("app", "amd64"), ("app-data", "all")]
    assert run(pkgs, ["app-data"], arch="arm64") == {"app-data": "1.0"}


def test_arch_restricted_dependencies() -> None:
    pkgs = [
        pkg(
            "app",
            arch="all",
            depends=(
                "only-amd [amd64], not-amd [!amd64], only-arm [arm64], not-arm [!arm64], "
                "either [arm64 amd64], skip-arm [arm64] | fallback"
            ),
        ),
        *(
            pkg(n, arch="all")
            for n in ("only-amd", "not-amd", "only-arm", "not-arm", "either", "skip-arm")
        ),
        pkg("fallback", arch="all"),
    ]
    assert set(run(pkgs, ["app"])) == {"app", "only-amd", "not-arm", "either", "fallback"}
    assert set(run(pkgs, ["app"], arch="arm64")) == {
        "app",
        "not-amd",
        "only-arm",
        "either",
        "skip-arm",
    }


def test_archqual_any_satisfied() -> None:
    pkgs = [
        pkg("tool", arch="all", depends="python3:any (>= 3.11), libc6:amd64"),
        pkg("python3", "3.13.5-1", multi_arch="allowed"),
        pkg("libc6", "2.41-12", multi_arch="same"),
    ]
    assert run(pkgs, ["tool"]) == {"tool": "1.0", "python3": "3.13.5-1", "libc6": "2.41-12"}


# 10. Exclude


def test_excluded_dependency_counts_as_met() -> None:
    pkgs = [
        pkg("app", depends="libfoo, bar"),
        pkg("libfoo", depends="libdeep"),
        pkg("libdeep"),
        pkg("bar"),
    ]
    assert run(pkgs, ["app"], exclude=["libfoo"]) == {"app": "1.0", "bar": "1.0"}


def test_excluded_alternative_counts_as_met() -> None:
    pkgs = [pkg("app", depends="a | b"), pkg("a"), pkg("b")]
    assert run(pkgs, ["app"], exclude=["b"]) == {"app": "1.0"}


def test_excluded_provider_meets_virtual() -> None:
    pkgs = [
        pkg("script", depends="awk"),
        pkg("mawk", provides="awk", priority="required"),
        pkg("gawk", provides="awk"),
    ]
    assert run(pkgs, ["script"], exclude=["mawk"]) == {"script": "1.0"}


def test_excluded_package_unmet_even_via_sat() -> None:
    # An excluded package is never installed, even when requested.
    msg = fail([pkg("a")], ["a"], exclude=["a"])
    assert "a is excluded" in msg


# 11. Requests


def test_request_exact_version() -> None:
    pkgs = [pkg("lib", "1.0-1"), pkg("lib", "2.0-1"), pkg("lib", "1:0.1-1")]
    assert run(pkgs, ["lib=1.0-1"]) == {"lib": "1.0-1"}
    assert run(pkgs, ["lib = 2.0-1"]) == {"lib": "2.0-1"}
    assert run(pkgs, ["lib"]) == {"lib": "1:0.1-1"}


def test_request_with_constraint() -> None:
    pkgs = [pkg("lib", "1.0-1"), pkg("lib", "2.0-1"), pkg("lib", "3.0-1")]
    assert run(pkgs, ["lib (>= 2)"]) == {"lib": "3.0-1"}
    assert run(pkgs, ["lib (<< 3)"]) == {"lib": "2.0-1"}
    assert run(pkgs, [" lib (>= 2) "]) == {"lib": "3.0-1"}


def test_request_exact_version_missing() -> None:
    msg = fail([pkg("lib", "1.0-1")], ["lib=9.9"])
    assert "lib (= 9.9)" in msg and "1.0-1" in msg


@pytest.mark.parametrize(
    "text", ["Bad Name!", "", "   ", "a | b", "a, b", "lib=", "lib (>= )", "UPPER", "a b"]
)
def test_bad_request_rejected(text: str) -> None:
    with pytest.raises(ResolveError, match="is not a package name"):
        parse_request(text)
    with pytest.raises(ResolveError, match="is not a package name"):
        resolve(universe([pkg("a"), pkg("b"), pkg("lib")]), [text])


def test_parse_request_forms() -> None:
    assert parse_request("lib=1.0-1")["version"] == ("=", "1.0-1")
    assert parse_request("lib (>= 2)")["version"] == (">=", "2")
    assert parse_request("python3:any")["name"] == "python3"
    assert parse_request("g++")["name"] == "g++"
    assert parse_request("libstdc++6=14.2.0-19")["name"] == "libstdc++6"
