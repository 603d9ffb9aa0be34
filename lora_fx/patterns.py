"""Regular expressions that come from files, matched in bounded time.

Rule names (rules files), PEFT's rank_pattern / alpha_pattern keys, target_modules and exclude_modules are regexes
written by other people. Python's `re` backtracks: `(.|.)*Z` takes time doubling with each character of a module
name, so one such key would hang a loader forever. Patterns are therefore compiled by `re` (so exactly the syntax
PEFT and the rest of Python accept is accepted) and matched by the `regex` package, whose matcher takes a timeout.
A match that runs out of time raises SlowPattern; callers turn it into a RuleError / AdapterFileError that names the
file and field. Real module names are matched in microseconds, so the limit only ever stops a runaway pattern.
"""

from __future__ import annotations

import functools
import re

import regex

#: Seconds one match of one pattern against one name may take (real patterns take microseconds).
MATCH_SECONDS = 1.0

#: What to tell the user about a pattern that ran out of time.
SLOW_FIX = ("simplify the pattern: avoid repetition of alternatives that overlap, such as (.|.)* or (a+)+; "
            "list the names instead, e.g. 'q_proj|v_proj'")


class SlowPattern(Exception):
    """A pattern did not finish matching one name within MATCH_SECONDS (it backtracks exponentially)."""

    def __init__(self, pattern: str, name: str):
        super().__init__(f"the pattern {pattern!r} did not finish matching {name!r} within {MATCH_SECONDS:g} s "
                         f"(it backtracks exponentially)")
        self.pattern, self.name = pattern, name


def check_syntax(pattern: str) -> None:
    """Raise re.error when `pattern` is not a valid Python regex (what PEFT and lora_fx accept)."""
    re.compile(pattern)


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> "regex.Pattern":
    re.compile(pattern)  # the syntax Python's re accepts, no more: the regex package accepts some extra syntax
    return regex.compile(pattern, flags=regex.VERSION0)


def fullmatch(pattern: str, name: str, *, shown: str | None = None) -> bool:
    """re.fullmatch(pattern, name) is not None, in bounded time. `shown`: the pattern as the user wrote it (for
    SlowPattern's message; `pattern` may be wrapped)."""
    try:
        return _compiled(pattern).fullmatch(name, timeout=MATCH_SECONDS) is not None
    except TimeoutError:
        raise SlowPattern(shown or pattern, name) from None


def match(pattern: str, name: str, *, shown: str | None = None) -> "regex.Match | None":
    """re.match(pattern, name), in bounded time."""
    try:
        return _compiled(pattern).match(name, timeout=MATCH_SECONDS)
    except TimeoutError:
        raise SlowPattern(shown or pattern, name) from None
