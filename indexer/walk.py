"""Find candidate files under the roots: recursive, hidden and excluded directories skipped.

Files are recognised as images by content later (the decoder sniffs them), so the walk keeps
every regular file except ones whose extension says they certainly are not images.
"""

from __future__ import annotations

import fnmatch
import heapq
import os
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISBLK, S_ISCHR, S_ISFIFO, S_ISSOCK
from typing import Iterator

from indexer.errors import IndexNotFoundError
from retrieval.errors import UsageError
from retrieval.query import is_utf8, printable

# Extensions that are never images; everything else is offered to the decoder to sniff.
_NOT_IMAGES = frozenset(
    ".txt .md .json .jsonl .csv .tsv .xml .html .htm .css .js .py .c .h .sh .log .ini .cfg .toml .yaml .yml "
    ".pdf .doc .docx .xls .xlsx .ppt .pptx .zip .gz .tar .bz2 .xz .7z .rar .mp3 .wav .flac .ogg .m4a .mp4 .mov "
    ".avi .mkv .webm .db .sqlite .faiss .lock .pyc .so .o .exe .dll .iso".split()
)


@dataclass(frozen=True)
class WalkOptions:
    excludes: tuple[str, ...] = ()
    follow_symlinks: bool = False


@dataclass(frozen=True)
class FoundFile:
    path: str  # absolute, normalised
    size: int
    mtime_ns: int


@dataclass
class Missing:
    """Sorts the catalog's paths a walk did not find into gone and kept. Kept: those at or under what
    could not be read (a permission, a network mount's hiccup: not found, but maybe not gone), and
    those under a root found empty, which is held back with them: an unmounted drive's mount point
    looks just so, and dropping its files would cost embedding them all again."""

    unreadable: set[str]  # as the walk noticed them
    empty_roots: list[str]  # `empty_folder` before the walk
    held: set[str] = field(default_factory=set)  # empty roots with catalog paths under them

    def gone(self, path: str) -> bool:
        if any(at_or_under(path, place) for place in self.unreadable):
            return False
        root = next((root for root in self.empty_roots if at_or_under(path, root)), None)
        if root is not None:
            self.held.add(root)
        return root is None

    def held_roots(self) -> list[str]:
        return sorted(self.held)


@dataclass
class Noticed:
    """What a walk passes by without yielding."""

    links: set[str] = field(default_factory=set)
    unreadable: set[str] = field(default_factory=set)
    names_not_utf8: set[str] = field(default_factory=set)  # as `shown` prints them
    paths_too_long: set[str] = field(default_factory=set)  # over MAX_PATH_BYTES

    def unreadable_shown(self) -> list[str]:
        return sorted(map(shown, self.unreadable))

    def failed(self, path: str, exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):  # one that vanished meanwhile is simply gone
            self.unreadable.add(path)


# PostgreSQL's btree index on files.path holds values of up to about 2,700 bytes: a longer path failed
# its whole batch, on every run. A PostgreSQL catalog keeps paths of up to 2,600 bytes (Linux allows
# 4,095); SQLite has no such limit, and an index there keeps what it holds. Roots, few and given by
# hand, are held to it everywhere.
MAX_PATH_BYTES = 2600


def too_long(path: str, limit: int | None = MAX_PATH_BYTES) -> bool:
    return limit is not None and len(path.encode("utf-8", "surrogateescape")) > limit


def storable(path: str) -> bool:
    """Whether the catalog can hold `path`. A Linux name is bytes; one that is not valid UTF-8 reaches
    Python with lone surrogates in place of its bad bytes, which no SQL text column accepts. (A name
    never holds NUL; text from elsewhere, such as a glob sent over HTTP, may, and PostgreSQL refuses it.)"""
    return is_utf8(path) and "\x00" not in path


def shown(path: str) -> str:
    """`path` fit to print: bytes that are not UTF-8 as \\xff escapes."""
    return printable(path)


def at_or_under(path: str, folder: str) -> bool:
    """`path` is `folder` or lies under it (a trailing slash on `folder` or not)."""
    folder = folder.rstrip("/")
    return path == folder or path.startswith(folder + "/")


def catalog_path(raw: str) -> str:
    """A path as the catalog records it (absolute, symlinked folders resolved), whether or not it
    still exists."""
    if not raw.strip():
        # Path("") is the current directory: `blipsearch index "$PHOTOS"` with the variable unset
        # would index (or `forget` would drop) whatever folder the command happens to run in.
        raise UsageError("a path is empty (an unset shell variable?); give the folder by name, '.' for this one")
    return str(Path(raw).expanduser().resolve())


def resolve_roots(paths: list[str]) -> list[str]:
    roots = []
    for raw in paths:
        if raw.strip() and not Path(raw).expanduser().exists():
            raise IndexNotFoundError(f"{shown(raw)}: no such file or directory")
        root = catalog_path(raw)
        if os.path.exists(root) and not (os.path.isdir(root) or os.path.isfile(root)):
            # A pipe, socket or device has nothing to walk; walked, it read as an unreadable folder.
            raise UsageError(f"{shown(raw)}: not a folder or a regular file ({_kind(root)}); give folders or "
                             "image files")
        if not storable(root):
            raise UsageError(f"{shown(root)}: the name is not valid UTF-8, and the catalog keeps names as UTF-8 "
                             "text; rename it (for example with convmv)")
        if too_long(root):
            raise UsageError(f"{shown(root)[:200]}...: the path is longer than the {MAX_PATH_BYTES} bytes the "
                             "catalog keeps; move the folder higher up")
        roots.append(root)
    return roots


def _kind(path: str) -> str:
    mode = os.stat(path).st_mode
    for test, name in ((S_ISFIFO, "a named pipe"), (S_ISSOCK, "a socket"), (S_ISCHR, "a device"), (S_ISBLK, "a device")):
        if test(mode):
            return name
    return "a special file"


def recorded_roots(roots: list[str]) -> tuple[list[str], list[str]]:
    """`index` without paths: (the recorded roots still there, those gone). One that is gone is left
    in the index, since an unplugged drive looks the same as a deleted folder."""
    if not roots:
        raise UsageError("give the folders to index: this index has none yet")
    present = [root for root in roots if os.path.exists(root)]
    gone = [root for root in roots if root not in present]
    if not present:
        raise UsageError(f"every folder this index was given is gone: {', '.join(gone)}; "
                         "blipsearch forget FOLDER removes one from the index")
    return present, gone


def _excluded(path: str, name: str, excludes: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(path, pattern) for pattern in excludes)


def walk_sorted(roots: list[str], options: WalkOptions, noticed: "Noticed", skip_dirs: tuple[str, ...] = (),
                max_path_bytes: int | None = None) -> Iterator[FoundFile]:
    """Every candidate file under `roots` that the catalog can name, once each, in path order: Python's
    str order, which is UTF-8 byte order, the order the catalog lists paths in (`Catalog.iter_under`).
    What the walk passes by goes to `noticed`, each folder before any path that sorts after it.
    `skip_dirs` are never entered: the index's own directory, which may lie inside a root. Paths
    longer than `max_path_bytes` (the catalog's `max_path_bytes`) are noticed, not yielded."""
    skipped = set()
    for directory in skip_dirs:
        try:
            stat = os.stat(directory)
            skipped.add((stat.st_dev, stat.st_ino))
        except OSError:
            continue
    previous = None
    streams = [_walk_one(root, options, skipped, noticed) for root in roots]
    for found in heapq.merge(*streams, key=lambda f: f.path):
        if found.path == previous:  # overlapping roots find a file twice
            continue
        previous = found.path
        if not storable(found.path):
            noticed.names_not_utf8.add(shown(found.path))
        elif too_long(found.path, max_path_bytes):
            noticed.paths_too_long.add(found.path)
        else:
            yield found


def empty_folder(path: str) -> bool:
    """A folder with nothing in it at all, as a mount point without its drive (not one whose files are
    all hidden, excluded or not images)."""
    if not os.path.isdir(path):
        return False
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:  # unreadable: the walk noted it
        return False


def _walk_one(root: str, options: WalkOptions, skip_dirs: set[tuple[int, int]],
              noticed: Noticed) -> Iterator[FoundFile]:
    """The candidate files under `root` in path order: each folder's entries sorted as their paths
    sort, a folder's name with its '/' (so 'a.jpg' comes before the folder 'a' and its 'a/b.jpg')."""
    if os.path.isfile(root):
        try:
            stat = os.stat(root)
        except OSError as exc:
            noticed.failed(root, exc)
            return
        yield FoundFile(root, stat.st_size, stat.st_mtime_ns)
        return
    seen_dirs = set(skip_dirs)  # (device, inode): a directory is entered once, a skipped one never
    stack = [iter(_listing(root, options, seen_dirs, noticed))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif entry.name.endswith("/"):
            stack.append(iter(_listing(entry.path, options, seen_dirs, noticed)))
        else:
            try:
                stat = os.stat(entry.path, follow_symlinks=options.follow_symlinks)
            except OSError as exc:
                noticed.failed(entry.path, exc)
                continue
            yield FoundFile(entry.path, stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class _Entry:
    name: str  # a folder's with a trailing '/', so that entries sort as the paths under them
    path: str


def _listing(directory: str, options: WalkOptions, seen_dirs: set[tuple[int, int]],
             noticed: Noticed) -> list[_Entry]:
    """The folders and candidate files in `directory`, sorted; nothing for one entered already."""
    try:
        stat = os.stat(directory)
        if (stat.st_dev, stat.st_ino) in seen_dirs:  # symlink loops
            return []
        seen_dirs.add((stat.st_dev, stat.st_ino))
        entries = list(os.scandir(directory))
    except OSError as exc:
        noticed.failed(directory, exc)
        return []
    kept = []
    for entry in entries:
        if entry.name.startswith(".") or _excluded(entry.path, entry.name, options.excludes):
            continue
        try:
            if entry.is_dir(follow_symlinks=options.follow_symlinks):
                kept.append(_Entry(entry.name + "/", entry.path))
            elif entry.is_file(follow_symlinks=options.follow_symlinks):
                if os.path.splitext(entry.name)[1].lower() not in _NOT_IMAGES:
                    kept.append(_Entry(entry.name, entry.path))
            elif entry.is_symlink() and (entry.is_dir() or entry.is_file()):  # not dangling
                noticed.links.add(entry.path)
        except OSError as exc:
            noticed.failed(entry.path, exc)
    return sorted(kept, key=lambda e: e.name)
