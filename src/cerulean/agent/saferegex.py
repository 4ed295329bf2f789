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

Without nesting, two repetitions in turn that can share characters still multiply:
``a*a*b`` or ``.*x.*y`` on a long line cost the cube of its length in a search. Those
are refused too (see ``_linked``; a pattern anchored with ``^`` is tried at one place
only, so there one such pair is allowed), which leaves at most a quadratic cost, and
callers match at most :data:`MAX_MATCH_CHARS` characters of a line or field
(:func:`bounded`).
"""

from __future__ import annotations

import functools
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
            # A conditional chooses between branches the way an alternation does, and
            # its repetitions were not judged as such: refused, nothing needs one.
            return "it uses a conditional group ('(?(1)...)')"
    return None


def _codes(node: Any, out: set[int]) -> set[int]:
    """Every code point the parsed pattern names: literals, and the ends and middle of
    ranges (so that classes outside the sample are compared on their own characters)."""
    if isinstance(node, tuple) and len(node) == 2 and node[0] in (
            _c.LITERAL, _c.NOT_LITERAL, _c.RANGE):
        op, av = node
        if op is _c.RANGE:
            out.update((av[0], av[1], (av[0] + av[1]) // 2))
        else:
            out.add(av)
        return out
    if isinstance(node, list | tuple) or type(node).__name__ == "SubPattern":
        for item in node:
            _codes(item, out)
    return out


# -- two repetitions in turn over the same characters ---------------------------------------
#
# a*a*b against a line of a's tries every way of sharing the a's between the two stars:
# n**2 per start, n**3 for a search; .*x.*y against a line of x's likewise. A pattern is
# read as a sequence of items; a repetition is "linked" to an earlier one when their
# characters overlap and every item that must match between them could also be taken by
# the earlier one. Two linked repetitions are refused, so what is left backtracks over
# one repetition at a time. Character classes are compared over a sample of code points
# (Latin, some Unicode spaces and the pattern's own literals): an overlap can be found
# where there is none (a refusal to rewrite the pattern), not missed where there is one
# in that sample.

_IGNORECASE, _DOTALL, _MULTILINE = int(re.IGNORECASE), int(re.DOTALL), int(re.MULTILINE)
_SAMPLE = (*range(0x250), 0x85, 0xA0, 0x2003, 0x2028, 0x3000, 0x4E2D)


def _category(cat: Any, ch: str) -> bool:
    name = str(cat)
    want = not name.startswith("CATEGORY_NOT_")
    if "DIGIT" in name:
        return ch.isdecimal() == want
    if "SPACE" in name:
        return ch.isspace() == want
    if "WORD" in name:
        return (ch.isalnum() or ch == "_") == want
    if "LINEBREAK" in name:
        return (ch == "\n") == want
    return True  # unknown: it may match anything


def _one(op: Any, av: Any, ch: str, flags: int) -> bool:
    """Whether the single-character item (op, av) may match *ch*."""
    fold = bool(flags & _IGNORECASE)

    def same(code: int) -> bool:
        return chr(code) == ch or (fold and chr(code).lower() == ch.lower())

    if op is _c.LITERAL:
        return same(av)
    if op is _c.NOT_LITERAL:
        return not same(av) or fold
    if op is _c.ANY:
        return ch != "\n" or bool(flags & _DOTALL)
    if op is _c.IN:
        negate = bool(av) and av[0][0] is _c.NEGATE
        hit = False
        for sop, sav in av[1:] if negate else av:
            if sop is _c.LITERAL:
                hit = hit or same(sav)
            elif sop is _c.RANGE:
                hit = hit or sav[0] <= ord(ch) <= sav[1] or (
                    fold and (sav[0] <= ord(ch.lower()) <= sav[1]
                              or sav[0] <= ord(ch.upper()[0]) <= sav[1]))
            elif sop is _c.CATEGORY:
                hit = hit or _category(sav, ch)
            else:
                hit = True
        return hit != negate or (negate and fold)
    return True


_SINGLE = (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN)


class _Unhashed:
    """An item's argument passed through the cache: equal to every other (the cache key
    is its repr), so lists can go through lru_cache."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Unhashed)

    def __hash__(self) -> int:
        return 0


@functools.lru_cache(maxsize=4096)
def _single(op: Any, key: str, av: Any, flags: int, sample: tuple[int, ...]
            ) -> frozenset[int]:
    return frozenset(c for c in sample if _one(op, av.value, chr(c), flags))


def _chars(items: Any, flags: int, sample: tuple[int, ...]) -> frozenset[int]:
    """The sample characters anything in *items* may match (an over-estimate)."""
    out: set[int] = set()
    for op, av in items:
        if op in _SINGLE:
            out |= _single(op, repr(av), _Unhashed(av), flags, sample)
        elif op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
            continue
        else:
            for sub in _subpatterns(op, av):
                out |= _chars(sub, flags, sample)
            if op in (_c.GROUPREF, getattr(_c, "GROUPREF_IGNORE", None)):
                out.update(sample)
    return frozenset(out)


def _subpatterns(op: Any, av: Any) -> list[Any]:
    if op in _REPEATS or op is _POSSESSIVE:
        return [av[2]]
    if op is _c.SUBPATTERN:
        return [av[-1]]
    if op is _c.BRANCH:
        return list(av[1])
    if op is _ATOMIC:
        return [av]
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return [av[1]]
    if op is _c.GROUPREF_EXISTS:
        return [x for x in av[1:] if x is not None]
    return []


def _nullable(items: Any) -> bool:
    """Whether *items* may match the empty string (when unsure: yes)."""
    for op, av in items:
        if op in _SINGLE:
            return False
        if (op in _REPEATS or op is _POSSESSIVE) and av[0] >= 1 and not _nullable(av[2]):
            return False
        if op in (_c.SUBPATTERN, _ATOMIC) and not _nullable(_subpatterns(op, av)[0]):
            return False
        if op is _c.BRANCH and not any(_nullable(b) for b in av[1]):
            return False
    return True


def _repeats(items: Any) -> bool:
    """Whether *items* hold a repetition that may repeat (or a back-reference)."""
    for op, av in items:
        if (op in _REPEATS and av[1] > 1) or op is _c.GROUPREF:
            return True
        if any(_repeats(sub) for sub in _subpatterns(op, av)):
            return True
    return False


def _first(items: Any, flags: int, sample: tuple[int, ...]) -> frozenset[int]:
    """The sample characters a match of *items* may start with (an over-estimate)."""
    out: set[int] = set()
    for op, av in items:
        if op in _SINGLE:
            return frozenset(out | _chars([(op, av)], flags, sample))
        if op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
            continue
        if op is _c.GROUPREF or op not in (*_REPEATS, _POSSESSIVE, _c.SUBPATTERN, _ATOMIC,
                                           _c.BRANCH, _c.GROUPREF_EXISTS):
            return frozenset(sample)
        for sub in _subpatterns(op, av):
            out |= _first(sub, flags, sample)
        if not _nullable([(op, av)]):
            return frozenset(out)
    return frozenset(out)


def _linked(items: Any, flags: int, sample: tuple[int, ...], most: int = 1) -> bool:
    """Whether more than *most* linked repetitions follow each other in *items*, or in any
    part of it (see above). Right after a repetition, what follows is linked to it when it
    may start with a character the repetition may start with (it can take over the
    repetition's last round, or the other way round); further on, when it may start with
    any character of the repetition."""
    # repetitions still linked to what follows: [characters, first characters, chain
    # length, nothing mandatory since]
    open_: list[list[Any]] = []

    def reach(o: list[Any], first: frozenset[int]) -> bool:
        return bool((o[1] if o[3] else o[0]) & first)

    def must(chars: frozenset[int], first: frozenset[int]) -> None:
        open_[:] = [[o[0], o[1], o[2], False] for o in open_
                    if (reach(o, first) if o[3] else o[0] & chars)]

    def repetition(chars: frozenset[int], first: frozenset[int]) -> bool:
        chain = 1 + max((o[2] for o in open_ if reach(o, first)), default=0)
        open_.append([chars, first, chain, True])
        return chain > most

    def walk(seq: Any, optional: bool) -> bool:
        for op, av in seq:
            block = [(op, av)]
            if op in _SINGLE:
                if not optional:
                    chars = _chars(block, flags, sample)
                    must(chars, chars)
            elif op in _REPEATS and av[1] > 1:
                chars, first = _chars(av[2], flags, sample), _first(av[2], flags, sample)
                if av[0] >= 1 and not optional and not _nullable(av[2]):
                    must(chars, first)
                if repetition(chars, first):
                    return True
            elif op in _REPEATS:  # x? : what it holds may be skipped
                if walk(av[2], True):
                    return True
            elif op is _c.SUBPATTERN:
                if walk(av[-1], optional):
                    return True
            elif op is _c.GROUPREF:
                if repetition(frozenset(sample), frozenset(sample)):
                    return True
            elif op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
                continue
            else:  # a branch, an atomic group, a possessive repetition: one block
                chars, first = _chars(block, flags, sample), _first(block, flags, sample)
                if not optional and not _nullable(block):
                    must(chars, first)
                if op is _c.BRANCH and _repeats(block) and repetition(chars, first):
                    return True
        return False

    if walk(items, False):
        return True
    return any(_linked(sub, flags, sample) for op, av in items
               for sub in _subpatterns(op, av))


def _anchored(items: Any, flags: int) -> bool:
    """Whether a search can only start at the text's beginning (a leading ^ or \\A)."""
    first = list(items)[:1]
    return bool(first) and first[0][0] is _c.AT and (
        first[0][1] is _c.AT_BEGINNING_STRING
        or (first[0][1] is _c.AT_BEGINNING and not flags & _MULTILINE))


@functools.lru_cache(maxsize=1024)
def compile_safe(pattern: str) -> re.Pattern[str]:
    """*pattern* compiled, or a RegexError (one sentence) when it is not a valid regex or
    could take exponential time (see the module's docstring)."""
    try:
        rx = re.compile(pattern)
        parsed = _p.parse(pattern)
    except re.error as e:
        raise RegexError(f"{pattern!r} is not a valid regex ({e}).") from None
    why = _problem(parsed, False)
    if not why:
        sample = tuple(sorted(set(_SAMPLE) | {ord(ch) for ch in pattern}
                              | _codes(parsed, set())))
        # A search tries every start: one repetition at a time, quadratic in the text. A
        # pattern anchored at the start is tried once: two linked ones, quadratic too.
        items = list(parsed)
        if _linked(items, rx.flags, sample, 2 if _anchored(items, rx.flags) else 1):
            raise RegexError(
                f"{pattern!r} could take too long on a long line (two repetitions in turn "
                "can take the same characters, as in a*a*b or .*x.*y); narrow one of them, "
                "as in [^x]*x.*y, or anchor the pattern with ^.")
    if why and "conditional" in why:
        raise RegexError(f"{pattern!r} uses a conditional group ('(?(1)...)'), which is not "
                         "accepted; write it as two rules or an alternation.")
    if why:
        raise RegexError(f"{pattern!r} could take exponential time ({why}); make the "
                         "repeated part atomic, as in '(?>a+)+' for '(a+)+'.")
    return rx


def bounded(text: str) -> str:
    """The part of *text* a regex is matched against (:data:`MAX_MATCH_CHARS`)."""
    return text if len(text) <= MAX_MATCH_CHARS else text[:MAX_MATCH_CHARS]
