"""The sorted walk and its one-pass comparison with the catalog, checked against a plain in-memory
comparison (every walked path in a set, every catalog row in a dict)."""

from __future__ import annotations

import os

import pytest

from indexer import compare
from indexer.catalog import Catalog, FileEntry, sqlite_url
from indexer.compare import Comparison
from indexer.schema import SKIPPED
from indexer.walk import Noticed, WalkOptions, walk_sorted

NAMES = ["a b.jpg", "a-1.jpg", "a.jpg", "a0.jpg", "B.jpg", "b.jpg", "é.jpg", "z.jpg", "\u4e2d.jpg",
         "\U0001f600.jpg", "x&y/c.jpg", "x/a.jpg", "a.d/e.jpg", "a/b.jpg", "a/sub/c.jpg", "a/sub.jpg"]


def tree(root, names=NAMES) -> list[str]:
    """Files named `names` under `root`, each holding its name; returns their paths."""
    paths = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
        paths.append(str(path))
    return paths


def test_walk_sorted_yields_pythons_path_order_once_across_overlapping_roots(tmp_path):
    """Entries are sorted as their paths sort: the folder 'a' after 'a.jpg' and 'a.d', since '/' > '.'."""
    paths = tree(tmp_path)
    roots = [str(tmp_path / "a"), str(tmp_path), str(tmp_path / "a.jpg")]
    walked = [f.path for f in walk_sorted(roots, WalkOptions(), Noticed())]
    assert walked == sorted(paths)


def entry(path: str, size: int, mtime_ns: int) -> FileEntry:
    return FileEntry(path=path, size=size, mtime_ns=mtime_ns, content_hash=None, status=SKIPPED,
                     error="corrupt: broken", width=None, height=None, format=None)


def stat_entry(path: str) -> FileEntry:
    stat = os.stat(path)
    return entry(path, stat.st_size, stat.st_mtime_ns)


@pytest.fixture
def catalog(tmp_path):
    opened = Catalog.open(sqlite_url(tmp_path / "catalog.sqlite"))
    yield opened
    opened.close()


@pytest.mark.parametrize("page", [1, 2, 5000])
def test_comparison_agrees_with_an_in_memory_one_while_the_run_writes_between_pages(tmp_path, catalog, page,
                                                                                   monkeypatch):
    """Every file is yielded or counted unchanged once, whatever the page size, though each yielded file
    is written to the catalog at once, as the pipeline does, between the pages the comparison reads."""
    monkeypatch.setattr(compare, "PAGE_ROWS", page)
    root = tmp_path / "photos"
    paths = tree(root)
    catalog.write_batch([stat_entry(p) for p in paths[::2]], {})  # half known as they are
    catalog.write_batch([entry(p, 1, 1) for p in paths[1::4]], {})  # a quarter known, changed since
    gone = [str(root / "a" / "gone.jpg"), str(root / "gone.jpg"), str(root / "zz" / "gone.jpg"),
            str(tmp_path / "elsewhere.jpg")]
    catalog.write_batch([entry(p, 1, 1) for p in gone], {})
    known = {row.path: row for row in catalog.files()}

    comparison = Comparison(catalog, [str(root)], WalkOptions())
    yielded = []
    for todo in comparison:
        yielded.append(todo.found.path)
        assert todo.row == known.get(todo.found.path)
        catalog.write_batch([stat_entry(todo.found.path)], {})

    assert yielded == sorted(p for p in paths if p not in paths[::2])
    assert comparison.unchanged == len(paths[::2])
    assert sorted(comparison.gone) == sorted(known[p].id for p in gone[:3])  # not the file outside the root


def test_unreadable_folders_keep_their_rows_even_when_the_walk_sorts_them_last(tmp_path, catalog, monkeypatch):
    """The decision that a row is gone is taken as the streams pass it, so the walk must have tried the
    folder by then: 'a/' sorts after 'a.jpg' and 'a.d/', and its rows after theirs."""
    monkeypatch.setattr(compare, "PAGE_ROWS", 1)
    root = tmp_path / "photos"
    paths = tree(root)
    catalog.write_batch([stat_entry(p) for p in paths], {})
    locked, listing = str(root / "a" / "sub"), os.scandir

    def scandir(path):
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    comparison = Comparison(catalog, [str(root)], WalkOptions())
    assert list(comparison) == [] and len(comparison.gone) == 0
    assert comparison.noticed.unreadable_shown() == [locked]


def test_the_walk_is_reported_as_it_goes(tmp_path, catalog, monkeypatch):
    """A walk of millions of files takes minutes: the progress display hears of it along the way."""
    monkeypatch.setattr(compare, "WALK_REPORT", 4)
    paths = tree(tmp_path / "photos")
    heard = []
    comparison = Comparison(catalog, [str(tmp_path / "photos")], WalkOptions(), on_walked=heard.append)
    assert len(list(comparison)) == len(paths) == comparison.walked == 16
    assert heard == [4, 8, 12, 16]
