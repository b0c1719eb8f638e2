"""serve's thumbnail folder: kept under its limit, the least recently shown removed first."""

from __future__ import annotations

import hashlib
import os
import threading
import time

from api.thumbnails import RENEW_AFTER_S, ThumbnailCache, evict
from tests.conftest import make_images

HOUR = 3600


def aged(path, hours: float) -> None:
    when = time.time() - hours * HOUR
    os.utime(path, (when, when))


def test_evict_removes_the_least_recently_shown_down_to_nine_tenths(tmp_path):
    for i in range(10):  # thumb0 shown longest ago
        (tmp_path / f"thumb{i}.jpg").write_bytes(b"x" * 1000)
        aged(tmp_path / f"thumb{i}.jpg", 10 - i)
    (tmp_path / ".thumb0.jpg.9.9.tmp").write_bytes(b"x" * 500)  # left by a process killed mid-write
    aged(tmp_path / ".thumb0.jpg.9.9.tmp", 2)
    (tmp_path / ".thumb1.jpg.9.9.tmp").write_bytes(b"x" * 500)  # being written now
    (tmp_path / "notes.txt").write_bytes(b"x" * 5000)  # not ours

    assert evict(tmp_path, 10_000) == 10_000  # at the limit: nothing removed
    assert evict(tmp_path, 5_000) == 4000
    assert sorted(os.listdir(tmp_path)) == [".thumb1.jpg.9.9.tmp", "notes.txt"] + [f"thumb{i}.jpg" for i in range(6, 10)]
    assert evict(tmp_path, 0) == 0 and sorted(os.listdir(tmp_path)) == [".thumb1.jpg.9.9.tmp", "notes.txt"]


def hashes_of(images) -> list[str]:
    """The content hashes the index gives them: a thumbnail is made only of the content so hashed."""
    return [hashlib.sha256(path.read_bytes()).hexdigest() for path in images]


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_cache_stays_under_its_limit_keeping_what_was_shown_last(tmp_path):
    """A crawler viewing every image made a thumbnail of each, kept for ever: a terabyte for a hundred
    million images. The folder now stays under its limit, and a thumbnail viewed again is kept over
    those made after it but not viewed since."""
    images = make_images(tmp_path / "photos", 7, seed=3)
    h = hashes_of(images)
    probe = ThumbnailCache(tmp_path / "probe", 10**9, threading.BoundedSemaphore(1))
    sizes = [len(probe.get(h[i], str(path))) for i, path in enumerate(images)]
    limit = int((sizes[0] + sum(sizes[4:])) / 0.9) + 1  # h0 and h4-h6 fit in nine tenths; all seven do not
    (tmp_path / "idx").mkdir()
    folder = tmp_path / "idx" / "thumbnails"
    cache = ThumbnailCache(folder, limit, threading.BoundedSemaphore(1))

    first = cache.get(h[0], str(images[0]))
    aged(folder / f"{h[0]}.jpg", 2)  # shown two hours ago
    for i in (1, 2, 3):
        assert cache.get(h[i], str(images[i]))[:2] == b"\xff\xd8"
        aged(folder / f"{h[i]}.jpg", 1)  # made an hour ago, not shown since
    assert cache.get(h[0], "/gone/image.jpg") == first  # from the folder, and renewed: over an hour old
    assert time.time() - (folder / f"{h[0]}.jpg").stat().st_mtime < 60
    for i in (4, 5, 6):
        cache.get(h[i], str(images[i]))
        wait_until(lambda: not cache._evicting)
    assert sorted(os.listdir(folder)) == sorted(f"{h[i]}.jpg" for i in (0, 4, 5, 6))
    assert sum(entry.stat().st_size for entry in os.scandir(folder)) == sizes[0] + sum(sizes[4:]) <= limit


def test_thumbnails_made_while_the_folder_is_listed_count_towards_its_limit(tmp_path, monkeypatch):
    """The first view starts a pass listing the folder; thumbnails written meanwhile may be missed by
    it, and were not counted either (this test's race failed the test above once), so the folder
    could outgrow its limit by all a long listing missed."""
    from api import thumbnails

    images = make_images(tmp_path / "photos", 4, seed=5)
    h = hashes_of(images)
    probe = ThumbnailCache(tmp_path / "probe", 10**9, threading.BoundedSemaphore(1))
    sizes = [len(probe.get(h[i], str(path))) for i, path in enumerate(images)]
    listed, go_on = threading.Event(), threading.Event()

    def slow_evict(directory, max_bytes):  # lists the folder, then takes its time to say so
        kept = evict(directory, max_bytes)
        listed.set()
        go_on.wait(30)
        return kept

    monkeypatch.setattr(thumbnails, "evict", slow_evict)
    limit = sum(sizes[:3]) + 1  # three fit, four do not
    cache = ThumbnailCache(tmp_path / "thumbnails", limit, threading.BoundedSemaphore(1))
    cache.get(h[0], str(images[0]))
    assert listed.wait(30)
    for i in (1, 2):
        cache.get(h[i], str(images[i]))
    go_on.set()
    wait_until(lambda: not cache._evicting)
    cache.get(h[3], str(images[3]))
    wait_until(lambda: not cache._evicting)
    assert sum(entry.stat().st_size for entry in os.scandir(tmp_path / "thumbnails")) <= limit


def test_a_recent_view_does_not_write(tmp_path):
    images = make_images(tmp_path / "photos", 1)
    [h] = hashes_of(images)
    cache = ThumbnailCache(tmp_path / "thumbnails", 10**6, threading.BoundedSemaphore(1))
    cache.get(h, str(images[0]))
    aged(tmp_path / "thumbnails" / f"{h}.jpg", (RENEW_AFTER_S - 60) / HOUR)
    before = (tmp_path / "thumbnails" / f"{h}.jpg").stat().st_mtime
    cache.get(h, str(images[0]))
    assert (tmp_path / "thumbnails" / f"{h}.jpg").stat().st_mtime == before


def test_a_limit_of_zero_keeps_none(tmp_path):
    images = make_images(tmp_path / "photos", 2)
    cache = ThumbnailCache(tmp_path / "thumbnails", 0, threading.BoundedSemaphore(1))
    assert cache.get(hashes_of(images)[0], str(images[0]))[:2] == b"\xff\xd8"
    assert os.listdir(tmp_path / "thumbnails") == []
