"""`--path` globs: the parsed form must match exactly what fnmatch matches (the search's own test), and
so must the SQL the catalog runs (tests/test_catalog.py runs it on SQLite and PostgreSQL)."""

from __future__ import annotations

import fnmatch
import itertools
import random
import re

import pytest
from sqlalchemy import column

from indexer import path_glob

SHORT_STRINGS = ["".join(p) for n in range(4) for p in itertools.product("ab-!^[]\\", repeat=n)]


def regex_matches(glob: str):
    """The regular expression `sql_condition` gives PostgreSQL, read by Python's re (both read it
    alike: that is what `path_glob._regex` promises), or None for a glob that matches nothing."""
    tokens = path_glob._tokens(glob)
    if path_glob.NEVER in tokens:
        return lambda s: False
    return re.compile(path_glob._regex(tokens), re.DOTALL).match


@pytest.mark.parametrize("glob", [
    "[a-Z!-x]",  # a reversed range leaves '!' first: fnmatch then negates, and re reads '-' as itself
    "[!]", "[]", "[z-a]", "[!z-a]", "[a-]", "[-a]", "[!-a]", "[a--]", "[]-a]", "[!]-a]", "[\\]", "a[b",
    "*[!a]*", "[[]", "[^a]", "[a-c-e]", "[!!]", "[a&&b]", "?*?", "**a**",
])
def test_named_corners_match_as_fnmatch(glob):
    matches = regex_matches(glob)
    assert [s for s in SHORT_STRINGS + ["a-b", "~", "&", "\n"] if matches(s)] == \
        [s for s in SHORT_STRINGS + ["a-b", "~", "&", "\n"] if fnmatch.fnmatchcase(s, glob)]


def test_random_globs_match_as_fnmatch():
    """Every string of up to three characters from the globs' own alphabet, for 3000 random globs."""
    rng = random.Random(0)
    for _ in range(3000):
        glob = "".join(rng.choice("ab-!^[]*?\\Z") for _ in range(rng.randint(1, 8)))
        matches = regex_matches(glob)
        wrong = [s for s in SHORT_STRINGS if bool(matches(s)) != fnmatch.fnmatchcase(s, glob)]
        assert not wrong, (glob, wrong[:3])


def test_the_regex_escapes_every_character_that_is_not_alphanumeric():
    assert path_glob._regex(path_glob._tokens("/a.b*[!x-z]?é😀")) == \
        "\\A\\u002fa\\u002eb.*[^x-z].\\u00e9\\U0001f600\\Z"


@pytest.mark.parametrize("glob, start", [("/p/2019/*.jpg", "/p/2019/"), ("*x", ""), ("/a/b", "/a/b"), ("/a[bc]", "/a")])
def test_literal_start(glob, start):
    assert path_glob.literal_start(glob) == start


def test_a_glob_no_catalog_path_can_match_is_false_in_sql():
    for glob in ["/p/\udce9*", "/p/\x00*"]:
        assert str(path_glob.sql_condition(column("path"), glob, "postgresql")) == "false"


def test_a_folder_means_the_files_under_it(tmp_path):
    (tmp_path / "2019").mkdir()
    (tmp_path / "2019" / "a.jpg").write_bytes(b"")
    assert path_glob.folder_files(f"{tmp_path}/2019") == f"{tmp_path}/2019/*"
    assert path_glob.folder_files(f"{tmp_path}/gone/") == f"{tmp_path}/gone/*"  # said so, there or not
    assert path_glob.folder_files(f"{tmp_path}/gone") == f"{tmp_path}/gone"  # maybe a file, once
    assert path_glob.folder_files(f"{tmp_path}/2019/a.jpg") == f"{tmp_path}/2019/a.jpg"
    assert path_glob.folder_files(f"{tmp_path}/201[9]") == f"{tmp_path}/201[9]"  # a glob already
    assert path_glob.folder_files("*2019") == "*2019"
