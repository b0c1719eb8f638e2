"""serve's thumbnails: made once per content (keyed by content hash) and kept in the index directory's
`thumbnails/` folder, up to a size limit, the least recently shown removed first.

Thumbnails are made only for images someone views, but a crawler or a long-lived server views many:
a 256 px JPEG is some 10-30 kB, so a hundred million would be terabytes. So the folder is kept under
`max_bytes`: when what this server knows it added takes it over, a background pass lists the folder
(a stat per file), and removes the oldest until it is under nine tenths of the limit. "Oldest" is
by modification time, which a view renews when it is over an hour old: an hour's precision for a
write per hour, not one per view. Several servers may share the folder; each keeps it under its own
limit, and a thumbnail one removes is made again by the next view.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from indexer import decode
from indexer.decode import Skipped

THUMBNAIL_PX = 256
RENEW_AFTER_S = 3600  # a view marks a thumbnail recent when it was last marked over an hour ago
STALE_TEMPORARY_S = 3600  # a temporary file this old was left by a process that died mid-write
KEEP_FRACTION = 0.9  # eviction stops here, so that one more thumbnail does not start it again


class ThumbnailCache:
    def __init__(self, directory: Path, max_bytes: int, decode_slots: threading.BoundedSemaphore) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.decode_slots = decode_slots
        self._lock = threading.Lock()
        self._kept_bytes: int | None = None  # in the folder, as far as this server knows; None: not listed yet
        self._evicting = False
        self._added_while_listing = 0  # bytes written during an eviction's pass, which may not have seen them
        try:
            directory.mkdir(exist_ok=True)
        except OSError:  # a read-only index: thumbnails are made for each request instead
            pass

    def get(self, content_hash: str, image_path: str) -> bytes | Skipped:
        """The JPEG thumbnail of the image at `image_path`, whose content hash is `content_hash`; why
        not, for a file that can no longer be read as an image or holds other content now. Kept for
        the next view where the folder can keep it (not when full, read-only, or `max_bytes` is 0)."""
        kept = self.directory / f"{content_hash}.jpg"
        jpeg = _read_renewing(kept)
        if jpeg is not None:
            return jpeg
        with self.decode_slots:
            jpeg = decode.thumbnail_jpeg(image_path, THUMBNAIL_PX, content_hash)
        if not isinstance(jpeg, Skipped) and self.max_bytes > 0 and _write(kept, jpeg):
            self._added(len(jpeg))
        return jpeg

    def _added(self, size: int) -> None:
        with self._lock:
            if self._kept_bytes is not None:
                self._kept_bytes += size
            if self._evicting:
                self._added_while_listing += size
            start = not self._evicting and (self._kept_bytes is None or self._kept_bytes > self.max_bytes)
            self._evicting = self._evicting or start
        if start:
            threading.Thread(target=self._evict, name="blipsearch-thumbnails", daemon=True).start()

    def _evict(self) -> None:
        try:
            kept_bytes = evict(self.directory, self.max_bytes)
            with self._lock:
                # Counted again if the pass listed them: too many bytes only bring the next pass sooner,
                # too few let the folder grow past its limit by what a long listing missed.
                self._kept_bytes = kept_bytes + self._added_while_listing
        except OSError:  # the folder unreadable: this server tries again with its next thumbnail
            pass
        finally:
            with self._lock:
                self._evicting, self._added_while_listing = False, 0


def evict(directory: Path, max_bytes: int) -> int:
    """Removes the least recently shown thumbnails in `directory` while they take over `max_bytes`,
    down to KEEP_FRACTION of it, and temporary files left by dead processes; the bytes kept."""
    now, kept = time.time(), []
    with os.scandir(directory) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile, by another server
                stat = entry.stat(follow_symlinks=False)
                if entry.name.endswith(".tmp") and now - stat.st_mtime > STALE_TEMPORARY_S:
                    os.unlink(entry.path)
                elif entry.name.endswith(".jpg") and entry.is_file(follow_symlinks=False):
                    kept.append((stat.st_mtime, stat.st_size, entry.path))
    kept_bytes = sum(size for _, size, _ in kept)
    if kept_bytes <= max_bytes:
        return kept_bytes
    for _, size, path in sorted(kept):
        if kept_bytes <= max_bytes * KEEP_FRACTION:
            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        kept_bytes -= size
    return kept_bytes


def _read_renewing(kept: Path) -> bytes | None:
    """A kept thumbnail's bytes, marked recently shown; None when there is none (or it went meanwhile)."""
    try:
        with open(kept, "rb") as handle:
            modified = os.fstat(handle.fileno()).st_mtime
            jpeg = handle.read()
    except OSError:
        return None
    if time.time() - modified > RENEW_AFTER_S:
        with contextlib.suppress(OSError):  # a read-only index: it stays as old as it was
            os.utime(kept)
    return jpeg


def _write(kept: Path, jpeg: bytes) -> bool:
    """Whether `jpeg` could be kept at `kept`: written whole under a temporary name, then renamed,
    so that no reader sees part of it."""
    temporary = kept.with_name(f".{kept.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        temporary.write_bytes(jpeg)
        os.replace(temporary, kept)
    except OSError:  # a full disk, a read-only index, no folder
        with contextlib.suppress(OSError):
            temporary.unlink()
        return False
    return True
