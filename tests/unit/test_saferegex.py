"""Regexes from rule and policy files (cerulean.agent.saferegex): what could take too long
is refused when the file loads."""

from __future__ import annotations

import pytest

from cerulean.agent.saferegex import RegexError, compile_safe


@pytest.mark.parametrize(("pattern", "why"), [
    # Conditionals hold repetitions the way alternations do: 24 s on 800 characters.
    (r"(x)?(?(1)|a*)(?(1)|a*)(?(1)|a*)b", "conditional group"),
    # Classes outside the sampled code points are compared on their own characters.
    (r"[\u0400-\u04ff]*[\u0400-\u04ff]*x", "two repetitions in turn"),
    (r"[\U0001F600-\U0001F64F]+[\U0001F620-\U0001F6FF]+!", "two repetitions in turn"),
])
def test_what_was_accepted_and_blew_up_is_refused(pattern: str, why: str) -> None:
    with pytest.raises(RegexError, match=why):
        compile_safe(pattern)


@pytest.mark.parametrize("pattern", [
    r"[\u0400-\u040f]*[\u0450-\u045f]*x",  # classes apart: no overlap
    r"^\s*PermitRootLogin\s+no", r"[^x]*x.*y", r"\d+\.\d+",
])
def test_safe_patterns_still_load(pattern: str) -> None:
    compile_safe(pattern)
