"""Regular expressions from rule and policy files, refused when they could take exponential
time.

Python's ``re`` backtracks, and has no time limit: ``(a+)+$`` against a long line of
``a`` that does not end the line tries every way of splitting it, 2**n of them. That
blow-up needs a repetition whose body can match the same text in more than one way: a
quantifier inside a quantifier (``(a+)+``, ``(a{1,2})*``) or an alternation inside one
(``(a|ab)*``). :func:`compile_safe` refuses both at load time, with one sentence naming the
pattern. An atomic group ``(?>...)``, a possessive quantifier (``a++``) and a lookaround
cannot be backtracked into once they matched, so what they hold counts on its own: the
same pattern written ``(?>a+)+$`` is accepted, and costs at most a polynomial in the
length of the text.

What is left (``.*x.*y`` is quadratic) is bounded by the text: callers match at most
:data:`MAX_MATCH_CHARS` characters of a line or field (:func:`bounded`).
"""

from __future__ import annotations

import importlib
import re
from typing import Any

# The characters of one line (policy rules, fixes) or one event field (detection rules)
# a regex is matched against; the rest of a longer one is not looked at. With nested
# quantifiers refused, a match costs at most a small polynomial in this.
MAX_MATCH_CHARS = 4096

# The parser re.compile itself uses (private, but the only one there is).
_c = importlib.import_module("re._constants")
_p = importlib.import_module("re._parser")
_REPEATS = tuple(getattr(_c, n) for n in ("MAX_REPEAT", "MIN_REPEAT") if hasattr(_c, n))
_POSSESSIVE = getattr(_c, "POSSESSIVE_REPEAT", None)
_ATOMIC = getattr(_c, "ATOMIC_GROUP", None)


class RegexError(ValueError):
    """A pattern that is not a regex, or one that could take exponential time."""


def _problem(items: Any, repeated: bool) -> str | None:
    """Why *items* (a parsed pattern) could backtrack exponentially; *repeated*: they are
    the body, or inside the body, of a quantifier that may repeat."""
    for op, av in items:
        if op in _REPEATS or (_POSSESSIVE is not None and op is _POSSESSIVE):
            _lo, hi, body = av
            repeats = hi > 1
            if repeats and repeated and op is not _POSSESSIVE:
                return "it repeats a quantifier inside a quantifier"
            # a possessive quantifier is atomic: its body is judged on its own
            inner = _problem(body, repeats or (repeated and op is not _POSSESSIVE))
            if inner:
                return inner
        elif op is _c.BRANCH:
            if repeated:
                return "it repeats an alternation ('|') inside a quantifier"
            for branch in av[1]:
                if (inner := _problem(branch, repeated)):
                    return inner
        elif op is _c.SUBPATTERN:
            if (inner := _problem(av[-1], repeated)):
                return inner
        elif _ATOMIC is not None and op is _ATOMIC:
            if (inner := _problem(av, False)):
                return inner
        elif op in (_c.ASSERT, _c.ASSERT_NOT):  # lookarounds are atomic too
            if (inner := _problem(av[1], False)):
                return inner
        elif op is _c.GROUPREF_EXISTS:
            for part in av[1:]:
                if part is not None and (inner := _problem(part, repeated)):
                    return inner
    return None


def compile_safe(pattern: str) -> re.Pattern[str]:
    """*pattern* compiled, or a RegexError (one sentence) when it is not a valid regex or
    could take exponential time (see the module's docstring)."""
    try:
        rx = re.compile(pattern)
        parsed = _p.parse(pattern)
    except re.error as e:
        raise RegexError(f"{pattern!r} is not a valid regex ({e}).") from None
    why = _problem(parsed, False)
    if why:
        raise RegexError(f"{pattern!r} could take exponential time ({why}); make the "
                         "repeated part atomic, as in '(?>a+)+' for '(a+)+'.")
    return rx


def bounded(text: str) -> str:
    """The part of *text* a regex is matched against (:data:`MAX_MATCH_CHARS`)."""
    return text if len(text) <= MAX_MATCH_CHARS else text[:MAX_MATCH_CHARS]
