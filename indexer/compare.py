"""The walk and the catalog compared in one pass, both in path order: which files to (re)index, how
many are unchanged, which are gone from disk.

Neither side is held in memory: the walk yields one folder's listing at a time and the catalog one
page of rows, so re-walking an index of a hundred million files costs the memory of its largest
folder, not of its catalog. Only the ids of gone files are kept (8 bytes each), because they are
removed last: a file moved in the same run first reuses its vectors by content hash.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Iterator

from indexer.catalog import Catalog, FileRow
from indexer.decode import RETRIED
from indexer.schema import SKIPPED
from indexer.walk import FoundFile, Missing, Noticed, WalkOptions, empty_folder, walk_sorted


PAGE_ROWS = 5000  # catalog rows read at a time
# Files to do that one pass keeps; beyond them a second pass streams them (`files_to_do`). About 1 KB
# each, so tens of MB at most.
TODO_HELD = 50_000
WALK_REPORT = 1000  # files between two calls of `Comparison.on_walked`


@dataclass(frozen=True)
class Todo:
    found: FoundFile
    row: FileRow | None  # the catalog's row for the path, if it has one


class Comparison:
    """Iterate to walk: yields the files to (re)index; once done, the other fields say the rest."""

    def __init__(self, catalog: Catalog, roots: list[str], options: WalkOptions, skip_dirs: tuple[str, ...] = (),
                 on_walked: Callable[[int], None] | None = None):
        """`on_walked(count)` hears how many files the walk found so far, every `WALK_REPORT` of them:
        a walk of millions of files takes minutes, which a progress display should show."""
        self.catalog, self.roots, self.options, self.skip_dirs = catalog, roots, options, skip_dirs
        self.on_walked = on_walked
        self.walked = 0
        self.noticed = Noticed()
        self.unchanged = 0
        self.gone = array("q")  # ids of the catalog's files gone from disk
        self.missing = Missing(self.noticed.unreadable, [root for root in roots if empty_folder(root)])

    def __iter__(self) -> Iterator[Todo]:
        rows = self.catalog.iter_under(self.roots, PAGE_ROWS)
        row = next(rows, None)
        for found in walk_sorted(self.roots, self.options, self.noticed, self.skip_dirs, self.catalog.max_path_bytes):
            self.walked += 1
            if self.on_walked is not None and self.walked % WALK_REPORT == 0:
                self.on_walked(self.walked)
            while row is not None and row.path < found.path:
                self._not_found(row)
                row = next(rows, None)
            current = None
            if row is not None and row.path == found.path:
                current, row = row, next(rows, None)
            if unchanged(found, current):
                self.unchanged += 1
            else:
                yield Todo(found, current)
        while row is not None:
            self._not_found(row)
            row = next(rows, None)

    def _not_found(self, row: FileRow) -> None:
        # Safe to decide now: the walk notices an unreadable folder before any path sorting after it.
        if self.missing.gone(row.path):
            self.gone.append(row.id)


def files_to_do(first: Comparison, again: Callable[[], Comparison]) -> tuple[Comparison, Iterable[Todo], int]:
    """(the comparison whose counts the summary reports, the files to do, how many). A pass holds up to
    `TODO_HELD` files to do; when there are more, it only counts them (for the progress bar) and a
    second pass streams them while they are decoded. So a first run over a hundred million files walks
    twice (stat only, quick beside decoding them) and holds no list of them, and a re-run with a few
    changes walks once."""
    stream = iter(first)
    held = list(islice(stream, TODO_HELD))
    more = sum(1 for _ in stream)
    if not more:
        return first, held, len(held)
    second = again()  # its counts are those of the files it yields, so the summary takes them
    return second, second, len(held) + more


def unchanged(found: FoundFile, row: FileRow | None) -> bool:
    """Nothing to redo for this file: the same size and mtime as its row, and not skipped for a reason
    worth another try (`decode.RETRIED`)."""
    if row is None or row.size != found.size or row.mtime_ns != found.mtime_ns:
        return False
    return not (row.status == SKIPPED and (row.error or "").partition(":")[0] in RETRIED)
