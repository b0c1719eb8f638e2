"""An optional on-disk cache of ViT features for ITM re-ranking: fp16, size-limited, off by default.

Re-ranking needs each candidate's ViT features (257 x 1408 for ViT-g: 0.7 MB in fp16). Without the
cache they are recomputed from the file (decode + ViT); with it, a repeated candidate costs one file
read. Entries are keyed by content hash under a folder named by the model fingerprint, written to a
temporary file and renamed (readers never see half an entry), and evicted least-recently-used
(reads refresh the mtime) when the folder grows past its limit. fp16 moves ITM logits by about 1e-3.
The cache only saves work: where it cannot be written (a full disk, a read-only index) features are
recomputed as without it, and `write_error` says why.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURES_DIR = "features"
STALE_TEMPORARY_S = 3600  # a temporary file this old was left by a process that died mid-write


@dataclass(frozen=True)
class FeatureCacheConfig:
    max_bytes: int  # 0 disables the cache

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError("the feature cache size cannot be negative")


class FeatureCache:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.write_error: str | None = None  # set by the first write that failed; no more are tried
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.write_error = exc.strerror or str(exc)
        self._lock = threading.Lock()  # a server's searches put from their own threads
        self._bytes = sum(size for _, size, _ in self._entries())

    @classmethod
    def for_model(cls, index_dir: Path, fingerprint: str, config: FeatureCacheConfig) -> "FeatureCache | None":
        if config.max_bytes == 0:
            return None
        return cls(Path(index_dir) / FEATURES_DIR / fingerprint[:16], config.max_bytes)

    def _path(self, content_hash: str) -> Path:
        return self.directory / content_hash[:2] / f"{content_hash}.npy"

    def get(self, content_hash: str) -> np.ndarray | None:
        path = self._path(content_hash)
        try:
            features = np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # absent, evicted meanwhile, or unreadable: recompute
            return None
        try:
            os.utime(path)  # recently used
        except OSError:  # a read-only cache still serves what it holds
            pass
        return features

    def put(self, content_hash: str, features: np.ndarray) -> None:
        array = np.ascontiguousarray(features, dtype=np.float16)
        if array.nbytes > self.max_bytes or self.write_error:
            return
        path = self._path(content_hash)
        # Its own name per thread: two searches putting the same image at once renamed one file twice.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            with self._lock:
                replaced = _size(path)  # the same image put again: counted once
                os.replace(tmp, path)
                self._bytes += path.stat().st_size - replaced
                over = self._bytes > self.max_bytes
        except OSError as exc:
            self.write_error = exc.strerror or str(exc)
            with contextlib.suppress(OSError):  # absent, or its folder is not one
                tmp.unlink()
            return
        if over:
            self._evict(target=int(self.max_bytes * 0.9))

    def _entries(self) -> list[tuple[Path, int, float]]:
        out = []
        for path in self.directory.glob("*/*.npy"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            out.append((path, stat.st_size, stat.st_mtime))
        return out

    def _evict(self, target: int) -> None:
        """Delete least recently used entries until the cache holds at most `target` bytes."""
        with self._lock:  # one pass at a time, and no put counted meanwhile then lost
            _remove_stale_temporaries(self.directory)
            entries = sorted(self._entries(), key=lambda entry: entry[2])
            total = sum(size for _, size, _ in entries)
            for path, size, _ in entries:
                if total <= target:
                    break
                path.unlink(missing_ok=True)
                total -= size
            self._bytes = total

    @property
    def bytes(self) -> int:
        return self._bytes


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _remove_stale_temporaries(directory: Path) -> None:
    """Entries a process killed mid-write left under their temporary names: listed by no pass, so
    never evicted, they would take room outside the limit for ever."""
    now = time.time()
    for tmp in directory.glob("*/.*.tmp"):
        with contextlib.suppress(OSError):  # removed meanwhile, or still being written by another
            if now - tmp.stat().st_mtime > STALE_TEMPORARY_S:
                tmp.unlink()
