"""`--path` globs over the catalog's absolute paths: which paths one matches, by fnmatch's rules (`*`
and `?` match any characters, '/' included; `[a-z]`, `[!a-z]` classes; case-sensitive), and the same
test as SQL, so that the catalog can find, count and page matching files in the database itself.

SQLite's LIKE ignores ASCII case and neither database's LIKE has classes, so LIKE alone would match
`*.JPG` to 'a.jpg' on SQLite but not on PostgreSQL, and `img[0-9].jpg` to nothing. Here LIKE only
narrows (it matches a superset: a class becomes one any-character), and the exact test follows:
SQLite's GLOB where the glob has no class (the same rules as fnmatch's for `*` and `?`), else
fnmatch itself registered as a SQLite function; on PostgreSQL LIKE where there is no class
(case-sensitive there), else a regular expression built from the glob's parsed classes."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

from sqlalchemy import and_, false, func

from indexer.walk import storable

SQLITE_FUNCTION = "blipsearch_fnmatch"


def matches(path: str, glob: str) -> bool:
    return fnmatch.fnmatchcase(path, glob)


def sqlite_fnmatch(path: str | None, glob: str | None) -> int:
    """`matches` as a SQLite function (registered on each connection by `indexer.database`)."""
    return int(path is not None and glob is not None and matches(path, glob))


def anchored(glob: str) -> bool:
    """Whether `glob` can match the catalog's absolute paths as it is: absolute, or from a wildcard."""
    return glob.startswith(("/", "*", "?", "["))


def literal_start(glob: str) -> str:
    """What every path `glob` matches begins with: the glob up to its first wildcard."""
    wildcards = [at for at in (glob.find(c) for c in "*?[") if at >= 0]
    return glob[: min(wildcards)] if wildcards else glob


def folder_files(glob: str) -> str:
    """A glob naming a folder as the glob of every file under it: one ending in '/', or one with no
    wildcard where there is a folder. `--path ~/Pictures/2019` matched only a file of that name, and
    so nothing, when the user meant the photos in it."""
    if glob.endswith("/"):
        return glob + "*"
    if literal_start(glob) == glob and os.path.isdir(glob):
        return glob + "/*"
    return glob


def conditions(column, glob: str, dialect: str) -> list:
    """SQL conditions on the path `column` true exactly where `glob` matches: `sql_condition`, and the
    range of the path index that the glob's literal start spans, where that is absolute (else every
    path is read)."""
    found = [sql_condition(column, glob, dialect)]
    start = literal_start(glob)
    if storable(glob) and start.startswith("/") and start[-1] != chr(0x10FFFF):
        upper = start[:-1] + chr(ord(start[-1]) + 1)  # the first string after all that begin with start
        found += [column >= start, column < upper]
    return found


def sql_condition(column, glob: str, dialect: str):
    """A SQL condition true exactly where `matches(column's value, glob)` is."""
    if not storable(glob):  # it matches no path the catalog holds, and the database would refuse it
        return false()
    tokens = _tokens(glob)
    if NEVER in tokens:  # an empty class such as [z-a]
        return false()
    if dialect == "sqlite":
        if "[" not in glob:
            return column.op("GLOB")(glob)
        return and_(_like(column, tokens), getattr(func, SQLITE_FUNCTION)(column, glob) == 1)
    if any(isinstance(t, _Class) for t in tokens):
        return and_(_like(column, tokens), column.regexp_match(_regex(tokens)))
    return _like(column, tokens)


# -- parsing: fnmatch.translate's reading of a glob (CPython 3.11), kept as tokens -------------------
STAR, ANY, NEVER = "*", "?", None  # a literal character is a one-character string other than these


@dataclass(frozen=True)
class _Class:
    negated: bool
    ranges: tuple[tuple[str, str], ...]  # inclusive; one character is (c, c)


def _tokens(glob: str) -> list:
    """The glob as STAR, ANY, NEVER, literal characters and _Class, read as fnmatch.translate reads it
    (an unclosed '[' is a literal, '-' ranges, a reversed range dropped), so both tests agree."""
    tokens: list = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        i += 1
        if c == "*":
            if not tokens or tokens[-1] != STAR:
                tokens.append(STAR)
        elif c == "?":
            tokens.append(ANY)
        elif c == "[":
            j = i
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                tokens.append("[")
            else:
                tokens.append(_class(glob, i, j))
                i = j + 1
        else:
            tokens.append(c)
    return tokens


def _class(glob: str, i: int, j: int):
    """The class glob[i:j] (between the brackets) as fnmatch.translate writes it for re, then read
    as re reads a class."""
    stuff = glob[i:j]
    if "-" in stuff:  # fnmatch's split into chunks joined by range hyphens, reversed ranges removed
        chunks = []
        k = i + 2 if glob[i] == "!" else i + 1
        while True:
            k = glob.find("-", k, j)
            if k < 0:
                break
            chunks.append(glob[i:k])
            i, k = k + 1, k + 3
        chunk = glob[i:j]
        if chunk:
            chunks.append(chunk)
        else:
            chunks[-1] += "-"
        for k in range(len(chunks) - 1, 0, -1):
            if chunks[k - 1][-1] > chunks[k][0]:
                chunks[k - 1] = chunks[k - 1][:-1] + chunks[k][1:]
                del chunks[k]
        body = [c for at, chunk in enumerate(chunks) for c in ([_HYPHEN] if at else []) + list(chunk)]
    else:
        body = list(stuff)
    if not body:
        return NEVER  # an empty range never matches
    if body == ["!"]:
        return ANY  # a negated empty range matches any one character
    negated = body[0] == "!"
    return _Class(negated, tuple(_read_class(body[1:] if negated else body)))


_HYPHEN = object()  # a range's unescaped '-' in the class body fnmatch writes


def _read_class(body: list) -> list[tuple[str, str]]:
    """re's reading of a class body: an item, and where a range hyphen and another item follow, the
    range between them. Chunks are never empty, so two range hyphens never meet and none ends the
    body; one can begin it, where a reversed range left '!' first ('[a-Z!-x]'): re reads it as '-'."""
    ranges: list[tuple[str, str]] = []
    at = 0
    while at < len(body):
        lo = "-" if body[at] is _HYPHEN else body[at]
        if at + 2 < len(body) and body[at + 1] is _HYPHEN:
            ranges.append((lo, body[at + 2]))
            at += 3
        else:
            ranges.append((lo, lo))
            at += 1
    return ranges


# -- SQL: LIKE's superset, and the regular expression ---------------------------------------------
def _like(column, tokens: list):
    pattern = "".join("%" if t == STAR else "_" if t == ANY or isinstance(t, _Class) else _like_literal(t)
                      for t in tokens)
    return column.like(pattern, escape="\\")


def _like_literal(c: str) -> str:
    return "\\" + c if c in "\\%_" else c


def _regex(tokens: list) -> str:
    """A regular expression that PostgreSQL and Python's re read alike: every character that is not
    ASCII alphanumeric written as a \\u or \\U escape, '.' matching any character (PostgreSQL's
    default; re needs DOTALL), anchored at both ends of the string."""
    parts = []
    for t in tokens:
        if t == STAR:
            parts.append(".*")
        elif t == ANY:
            parts.append(".")
        elif isinstance(t, _Class):
            body = "".join(_esc(lo) if lo == hi else f"{_esc(lo)}-{_esc(hi)}" for lo, hi in t.ranges)
            parts.append(f"[{'^' if t.negated else ''}{body}]")
        else:
            parts.append(_esc(t))
    return "\\A" + "".join(parts) + "\\Z"


def _esc(c: str) -> str:
    if c.isascii() and c.isalnum():
        return c
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"
