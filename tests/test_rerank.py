"""ITM re-ranking with and without the fp16 ViT feature cache."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import indexer.rerank
from indexer.decode import DecodeOptions, decode_file
from indexer.features import FeatureCache
from indexer.rerank import Reranker
from tests.conftest import make_images, run_cli

TEXT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def files(tmp_path_factory, retriever):
    paths = make_images(tmp_path_factory.mktemp("rerank"), 6, seed=5)
    options = DecodeOptions(retriever.transform, max_pixels=1 << 40)
    return {decode_file(str(p), options).content_hash: str(p) for p in paths}


def test_itm_matches_direct_scoring(retriever, files):
    options = DecodeOptions(retriever.transform, max_pixels=1 << 40)
    pixels = np.stack([decode_file(p, options).pixels for p in files.values()])
    expected = retriever.itm_probabilities(retriever.vit_features(pixels), [TEXT])
    matches = Reranker(retriever, batch_size=4).score(files, [TEXT], [1.0]).matches
    np.testing.assert_allclose([matches[h].probability for h in files], expected, atol=1e-6)


def test_slow_recomputing_without_a_cache_gets_a_note(retriever, files, tmp_path, capsys, monkeypatch):
    """ViT-g on a CPU takes seconds an image (`bench_vitg_cpu`): a search that spent long recomputing
    features says how to keep them. The tiny model is fast, so the threshold is lowered here."""
    import api.cli_search

    cache = FeatureCache(tmp_path / "features", max_bytes=10**8)
    uncached, with_cache = Reranker(retriever), Reranker(retriever, cache)
    for reranker in (uncached, with_cache, with_cache):
        reranker.score(files, [TEXT], [1.0])
    assert uncached.recomputed == len(files) and uncached.recompute_seconds > 0
    assert with_cache.recomputed == len(files)  # the second search found them all in the cache
    monkeypatch.setattr(api.cli_search, "SLOW_RERANK_S", 0.0)
    api.cli_search.slow_rerank_note(uncached, tmp_path / "idx")
    note = capsys.readouterr().err
    assert f"re-ranking decoded {len(files)} images" in note
    assert f"blipsearch index --index {tmp_path / 'idx'} --feature-cache-mb MB" in note
    api.cli_search.slow_rerank_note(with_cache, tmp_path / "idx")  # it has a cache: nothing to say
    monkeypatch.setattr(api.cli_search, "SLOW_RERANK_S", 10.0)
    api.cli_search.slow_rerank_note(uncached, tmp_path / "idx")  # fast enough
    assert capsys.readouterr().err == ""


def test_cache_serves_features_without_decoding(retriever, files, tmp_path, monkeypatch):
    uncached = Reranker(retriever).score(files, [TEXT], [1.0]).matches
    cache = FeatureCache(tmp_path / "features", max_bytes=10**8)
    Reranker(retriever, cache).score(files, [TEXT], [1.0])  # fills it
    assert len(list((tmp_path / "features").glob("*/*.npy"))) == len(files)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a file whose features are cached")

    monkeypatch.setattr(indexer.rerank, "decode_file", no_decoding)
    cached = Reranker(retriever, cache).score(files, [TEXT], [1.0]).matches
    for content_hash in files:  # fp16 features: close, not equal
        assert abs(cached[content_hash].probability - uncached[content_hash].probability) < 2e-3
        assert abs(cached[content_hash].logit - uncached[content_hash].logit) < 1e-2


def test_corrupt_entry_is_recomputed(retriever, files, tmp_path):
    cache = FeatureCache(tmp_path / "features", max_bytes=10**8)
    Reranker(retriever, cache).score(files, [TEXT], [1.0])
    victim = next(iter(files))
    (tmp_path / "features" / victim[:2] / f"{victim}.npy").write_bytes(b"garbage")
    matches = Reranker(retriever, cache).score(files, [TEXT], [1.0]).matches
    assert set(matches) == set(files)


def test_a_cache_that_cannot_be_written_only_costs_its_savings(retriever, files, tmp_path, monkeypatch):
    """A full disk or an unwritable folder must not fail a search: the cache only saves work."""
    uncached = Reranker(retriever).score(files, [TEXT], [1.0]).matches

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    full = FeatureCache(tmp_path / "full", max_bytes=10**8)
    monkeypatch.setattr(np, "save", disk_full)
    matches = Reranker(retriever, full).score(files, [TEXT], [1.0]).matches
    monkeypatch.undo()
    assert full.write_error == "No space left on device" and full.bytes == 0
    assert list((tmp_path / "full").rglob("*")) == [path for path in (tmp_path / "full").iterdir()]  # no .tmp
    (tmp_path / "a-file").write_text("")
    blocked = FeatureCache(tmp_path / "a-file" / "features", max_bytes=10**8)
    assert blocked.write_error == "Not a directory"
    for scored in (matches, Reranker(retriever, blocked).score(files, [TEXT], [1.0]).matches):
        assert {h: m.probability for h, m in scored.items()} == {h: m.probability for h, m in uncached.items()}


def test_cache_evicts_least_recently_used(tmp_path):
    entry = np.zeros((10, 100), np.float32)  # 2,000 bytes in fp16, plus the .npy header
    cache = FeatureCache(tmp_path, max_bytes=5 * 2128)
    for i in range(5):
        cache.put(f"{i:02d}hash", entry)
    import os
    import time

    for i in range(5):  # make recency explicit: entry 0 used last
        os.utime(tmp_path / f"{i:02d}" / f"{i:02d}hash.npy", (time.time() - 100 + i, time.time() - 100 + i))
    assert cache.get("00hash") is not None
    cache.put("05hash", entry)
    assert cache.bytes <= cache.max_bytes
    assert cache.get("00hash") is not None and cache.get("05hash") is not None
    assert cache.get("01hash") is None  # the least recently used went first


def test_eviction_removes_what_killed_writers_left(tmp_path):
    import os
    import time

    cache = FeatureCache(tmp_path, max_bytes=2100)  # one entry of 2,128 bytes puts it over
    (tmp_path / "ab").mkdir()
    stale, fresh = tmp_path / "ab" / ".abhash.npy.1.2.tmp", tmp_path / "ab" / ".abhash.npy.3.4.tmp"
    for tmp in (stale, fresh):
        tmp.write_bytes(b"x" * 100)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    cache.put("cdhash", np.zeros((10, 100), np.float32))  # over the limit: a pass
    assert not stale.exists() and fresh.exists()  # the fresh one may be another process's, being written


def test_two_searches_caching_the_same_image_at_once_both_keep_the_cache(tmp_path, monkeypatch):
    """A server's searches put features from their own threads, and two asking alike put the same
    image's: they shared one temporary file name, so the second rename failed and the cache stopped
    writing for the rest of the server's life (`write_error`)."""
    import threading

    from indexer import features

    cache = FeatureCache(tmp_path, max_bytes=10**8)
    first_writing, second_done = threading.Event(), threading.Event()
    save = np.save

    def save_waiting(handle, array, **kwargs):
        if threading.current_thread().name == "first":  # holds its file open while the second writes
            first_writing.set()
            second_done.wait(10)
        save(handle, array, **kwargs)

    monkeypatch.setattr(features.np, "save", save_waiting)
    vit = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    first = threading.Thread(target=cache.put, args=("ab" * 32, vit), name="first")
    first.start()
    assert first_writing.wait(10)
    cache.put("ab" * 32, vit)
    second_done.set()
    first.join()
    assert cache.write_error is None
    np.testing.assert_array_equal(cache.get("ab" * 32), vit.astype(np.float16))
    assert cache.bytes == sum(entry.stat().st_size for entry in tmp_path.glob("*/*.npy"))


def test_index_fills_the_cache_and_search_runs_with_it(tiny_model, tmp_path):
    make_images(tmp_path / "photos", 5, seed=8)
    common = ["--index", str(tmp_path / "idx"), "--model", str(tiny_model), "--feature-cache-mb", "50"]
    assert run_cli("index", str(tmp_path / "photos"), "-q", *common).returncode == 0
    assert len(list((tmp_path / "idx" / "features").glob("*/*/*.npy"))) == 5
    result = run_cli("search", "a red circle", "-k", "3", "--json", *common)
    assert result.returncode == 0, result.stderr
    shutil.rmtree(tmp_path / "idx" / "features")
    (tmp_path / "idx" / "features").write_text("")  # in the way, as a full disk or a read-only folder would be
    blocked = run_cli("search", "a red circle", "-k", "3", "--json", *common)
    assert blocked.returncode == 0, blocked.stderr
    cached, recomputed = json.loads(result.stdout)["results"], json.loads(blocked.stdout)["results"]
    assert [r["path"] for r in recomputed] == [r["path"] for r in cached]
    assert np.allclose([r["score"] for r in recomputed], [r["score"] for r in cached], atol=2e-3)  # fp16 cache
    assert f"warning: cannot write the feature cache in {tmp_path / 'idx' / 'features'}" in blocked.stderr


def test_decodes_share_the_slots_they_are_given(retriever, monkeypatch):
    """Each search decodes its candidates on a thread per core; a server runs many searches at once
    (and thumbnails), so their decodes take turns on one semaphore, at most one per slot."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from indexer.decode import Skipped
    from tests.conftest import MostAtOnce

    slow_decode = MostAtOnce(Skipped("corrupt", "stand-in"))
    monkeypatch.setattr(indexer.rerank, "decode_file", slow_decode)
    reranker = Reranker(retriever, decode_slots=threading.BoundedSemaphore(2))
    files = {f"h{i}": f"/nowhere/{i}.jpg" for i in range(6)}
    with ThreadPoolExecutor(4) as pool:  # four searches at once, each decoding six candidates
        assert list(pool.map(lambda _: reranker.score(files, ["a red circle"], [1.0]).matches, range(4))) == [{}] * 4
    assert slow_decode.most == 2


def test_the_cache_size_given_to_index_is_kept_for_searches_and_later_runs(tiny_model, tmp_path):
    """`--feature-cache-mb` given once to `index` holds for searches, servers and later runs that do
    not give it (a cache filled by indexing served no search unless each was given the size too)."""
    make_images(tmp_path / "photos", 4, seed=9)
    common = ["--index", str(tmp_path / "idx"), "--model", str(tiny_model)]
    run_cli("index", str(tmp_path / "photos"), "-q", "--feature-cache-mb", "50", *common, check=True)
    cached = sorted((tmp_path / "idx" / "features").glob("*/*/*.npy"))
    assert len(cached) == 4

    def used() -> int:  # the cache marks what it serves as recently used
        return sum(path.stat().st_mtime_ns > 10**9 for path in cached)

    for path in cached:
        os.utime(path, ns=(1, 1))
    run_cli("search", "a red circle", "-k", "2", "--candidates", "4", "--feature-cache-mb", "0", *common, check=True)
    assert used() == 0  # off for this search
    run_cli("search", "a red circle", "-k", "2", "--candidates", "4", *common, check=True)
    assert used() == 4
    make_images(tmp_path / "photos" / "more", 1, seed=10)
    run_cli("index", str(tmp_path / "photos"), "-q", *common, check=True)  # a later run, without the size
    assert len(list((tmp_path / "idx" / "features").glob("*/*/*.npy"))) == 5
    status = json.loads(run_cli("status", "--json", *common[:2], check=True).stdout)
    assert status["feature_cache_mb"] == 50
    run_cli("index", str(tmp_path / "photos"), "-q", "--feature-cache-mb", "0", *common, check=True)
    assert json.loads(run_cli("status", "--json", *common[:2], check=True).stdout)["feature_cache_mb"] == 0
    (tmp_path / "idx" / "index.json").write_text('{"index_type": "flat-fp16", "feature_cache_mb": "lots"}')
    broken = run_cli("search", "a red circle", *common)
    assert broken.returncode == 2 and "feature_cache_mb" in broken.stderr and "Traceback" not in broken.stderr
