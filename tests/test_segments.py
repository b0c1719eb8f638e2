"""SegmentedIndex: a saved base changed through a delta searches as one index over its live images
(brute-force numpy), saves its changes without rewriting the base, and merges when due."""

from __future__ import annotations

import os

import numpy as np
import pytest

from retrieval.index import MaxSimIndex
from retrieval.segments import DeltaPolicy, SegmentedIndex, delta_path, file_stamp, saved_delta
from tests.test_index import brute_force, source, unit

Q, D = 32, 16
DELTA_ALWAYS = DeltaPolicy(whole_below_bytes=0, max_fraction=1.0)
# hnsw and ivf-flat search every image here (ef_search, nprobe = nlist): exact, so comparable as such
KINDS = ["flat-fp16", "flat-fp32", "hnsw:ef_search=4096", "ivf-flat:nlist=4,nprobe=4", "sq8"]


def saved_base(spec: str, path, count: int = 40, seed: int = 0):
    """A base of `count` images saved whole at `path`: (keys, vectors)."""
    rng = np.random.default_rng(seed)
    keys = np.arange(count, dtype=np.int64) * 2
    vectors = unit(rng.standard_normal((count, Q, D)))
    index = MaxSimIndex(D, Q, spec)
    sample = vectors.reshape(-1, D)
    index.rebuild(lambda: [(keys, vectors)], count * Q, sample)
    index.save(path)
    return keys, vectors


def changed(index: SegmentedIndex, keys, vectors, rng):
    """Add 6 images, remove 3 base images and 1 new one, and give base images keys[5] and keys[9] new
    vectors: the live (keys, vectors) after."""
    live = dict(zip(keys.tolist(), vectors))
    new_keys = np.arange(1001, 1007, dtype=np.int64)
    new_vectors = unit(rng.standard_normal((6, Q, D)))
    index.add(new_keys, new_vectors)
    live.update(zip(new_keys.tolist(), new_vectors))
    gone = [int(keys[1]), int(keys[7]), int(keys[30]), 1003]
    assert index.remove(np.asarray(gone)) == 4
    for key in gone:
        del live[key]
    replaced = unit(rng.standard_normal((2, Q, D)))
    index.remove(keys[5:6])  # removed from the base, then added back with other vectors
    index.add(keys[5:6], replaced[:1])
    index.add(keys[9:10], replaced[1:])  # added again, without a removal first
    live[int(keys[5])], live[int(keys[9])] = replaced
    ordered = sorted(live)
    return np.asarray(ordered, np.int64), np.stack([live[k] for k in ordered])


def assert_searches_as(index: SegmentedIndex, keys, vectors, rng, n: int = 5) -> None:
    assert index.keys().tolist() == keys.tolist() and index.ntotal == len(keys) * Q
    for query in unit(rng.standard_normal((4, D))):
        for want_n in (n, len(keys)):
            hits = index.search(query, want_n, exact=source(keys, vectors))[0]
            want_keys, want_scores, _ = brute_force(vectors, keys, query, want_n)
            assert hits.keys.tolist() == want_keys.tolist()
            np.testing.assert_allclose(hits.scores, want_scores, atol=1e-6)


@pytest.mark.parametrize("spec", KINDS)
def test_changes_through_a_delta_search_as_one_index_and_leave_the_base_file_alone(spec, tmp_path):
    path = tmp_path / "vectors.faiss"
    keys, vectors = saved_base(spec, path)
    stamp = file_stamp(path)
    rng = np.random.default_rng(1)
    index = SegmentedIndex.load(path, D, Q, spec, mmap=True)
    live_keys, live_vectors = changed(index, keys, vectors, rng)
    assert_searches_as(index, live_keys, live_vectors, rng)
    assert index.base._mapped_from == path  # changed without reading the file into memory

    assert not index.whole_save_due(path, DeltaPolicy(0, 1.0, max_bytes=index.delta_bytes()))
    assert index.save(path, DELTA_ALWAYS) is False
    assert file_stamp(path) == stamp and delta_path(path).exists()  # the base is not written again
    assert saved_delta(path) == (7 * Q, 5)  # 6 added, 1 of them removed, 2 replaced; 5 base images skipped
    reloaded = SegmentedIndex.load(path, D, Q, spec, mmap=True)
    assert_searches_as(reloaded, live_keys, live_vectors, rng)

    assert reloaded.whole_save_due(path, DeltaPolicy(0, 1.0, max_bytes=reloaded.delta_bytes() - 1))
    assert reloaded.save(path, DeltaPolicy(whole_below_bytes=0, max_fraction=0.01)) is True  # due: merged
    assert file_stamp(path) != stamp and not delta_path(path).exists()
    merged = SegmentedIndex.load(path, D, Q, spec)
    assert merged.delta.ntotal == 0 and len(merged.skipped) == 0
    assert merged.base.index.ntotal == len(live_keys) * Q  # the re-added key's old vectors are gone
    assert_searches_as(merged, live_keys, live_vectors, rng)


def test_a_small_base_is_written_whole_and_a_delta_of_a_replaced_base_is_ignored(tmp_path):
    path = tmp_path / "vectors.faiss"
    keys, vectors = saved_base("flat-fp16", path)
    rng = np.random.default_rng(2)
    index = SegmentedIndex.load(path, D, Q, "flat-fp16")
    index.add(np.asarray([999]), unit(rng.standard_normal((1, Q, D))))
    assert index.save(path, DeltaPolicy(whole_below_bytes=os.path.getsize(path) + 1)) is True
    assert not delta_path(path).exists()

    index.add(np.asarray([1001]), unit(rng.standard_normal((1, Q, D))))
    assert index.save(path, DELTA_ALWAYS) is False
    assert SegmentedIndex.load(path, D, Q, "flat-fp16").ntotal == (len(keys) + 2) * Q
    # A crash after a whole save replaced the base, before it removed the delta: the new base holds
    # the delta's images already, and the delta names the older base.
    stale = delta_path(path).read_bytes()
    saved_base("flat-fp16", path, seed=3)
    delta_path(path).write_bytes(stale)
    assert saved_delta(path) == (0, 0)
    assert SegmentedIndex.load(path, D, Q, "flat-fp16").keys().tolist() == keys.tolist()
    delta_path(path).write_bytes(b"not a delta")  # unreadable: as none (the catalog refills what it lacks)
    assert SegmentedIndex.load(path, D, Q, "flat-fp16").ntotal == len(keys) * Q
    with open(delta_path(path), "wb") as handle:  # an archive, but not of a delta
        np.savez(handle, base=np.zeros((3, 2)), skipped=np.zeros(1), delta=np.zeros(3, np.uint8))
    assert SegmentedIndex.load(path, D, Q, "flat-fp16").ntotal == len(keys) * Q


def test_a_file_of_the_older_format_is_written_whole_at_its_first_change(tmp_path):
    path = tmp_path / "vectors.faiss"
    keys, _ = saved_base("flat-fp16", path)
    data = bytearray(path.read_bytes())
    data[:4] = b"IxM2"  # FAISS's IndexIDMap2, which blipsearch saved before 2026-12-02
    path.write_bytes(data)
    index = SegmentedIndex.load(path, D, Q, "flat-fp16", mmap=True)
    index.remove(keys[:1])
    assert index.save(path, DELTA_ALWAYS) is True and path.read_bytes()[:4] == b"IxMp"


def test_a_rebuild_is_saved_whole(tmp_path):
    path = tmp_path / "vectors.faiss"
    keys, vectors = saved_base("flat-fp16", path)
    index = SegmentedIndex.load(path, D, Q, "flat-fp16", mmap=True)
    index.remove(keys[:2])
    index.rebuild(lambda: [(keys[2:], vectors[2:])], (len(keys) - 2) * Q, vectors[:0].reshape(0, D), index.spec)
    assert index.save(path, DELTA_ALWAYS) is True
    assert SegmentedIndex.load(path, D, Q, "flat-fp16").keys().tolist() == keys[2:].tolist()


def test_skipped_near_ties_stay_out_of_the_fp16_range_search(tmp_path):
    """300 images that fp16 scores alike overflow the k-NN list, so flat-fp16 finds its rivals by a
    range search, which takes no selector: skipped images must not come back from it."""
    from tests.test_index import near_ties

    path = tmp_path / "vectors.faiss"
    vectors = near_ties(300, np.random.default_rng(4))
    keys = np.arange(300, dtype=np.int64)
    index = MaxSimIndex(D, Q, "flat-fp16")
    index.add(keys, vectors)
    index.save(path)
    segmented = SegmentedIndex.load(path, D, Q, "flat-fp16", mmap=True)
    segmented.remove(keys[-5:])  # the five best
    query = np.eye(D, dtype=np.float32)[0]
    hits = segmented.search(query, 3, exact=source(keys[:-5], vectors[:-5]))[0]  # a skipped key: KeyError
    assert hits.keys.tolist() == [294, 293, 292]


SAVER = """
import sys
import numpy as np
from retrieval.segments import DeltaPolicy, SegmentedIndex
from tests.test_index import unit

path, Q, D = sys.argv[1], 32, 16
first = int(SegmentedIndex.load(path, D, Q, "flat-fp16").keys().max()) + 1  # where the killed run stopped
rng = np.random.default_rng(first)
for key in range(first, first + 100000):
    index = SegmentedIndex.load(path, D, Q, "flat-fp16", mmap=True)
    index.add(np.asarray([key]), unit(rng.standard_normal((1, Q, D))))
    index.remove(np.asarray([key - 1000]))  # from the base, or from the delta
    whole = key % 7 == 0  # now and then merged and written whole: both kinds of write are killed
    index.save(path, DeltaPolicy(whole_below_bytes=1 << 40 if whole else 0, max_fraction=1.0))
    print(key, flush=True)
"""


def test_kill_dash_nine_while_saving_loses_no_finished_save(tmp_path):
    """A process that saves one change after another (each a delta, every seventh the whole file) is
    killed at a random moment, twelve times, each time started again on what it left: the files then
    hold every change it reported saved, and at most the one it was saving; never a duplicate, never
    an unreadable index."""
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    path = tmp_path / "vectors.faiss"
    base = MaxSimIndex(D, Q, "flat-fp16")
    base.add(np.arange(1000), unit(np.random.default_rng(6).standard_normal((1000, Q, D))))
    base.save(path)
    rng = np.random.default_rng(7)
    for _ in range(12):
        process = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                                   text=True)
        reported = [int(process.stdout.readline()) for _ in range(3)]
        time.sleep(rng.uniform(0, 0.08))  # about ten saves: the kill lands anywhere in one
        process.kill()
        reported += [int(line) for line in process.stdout.read().split()]
        process.wait()
        index = SegmentedIndex.load(path, D, Q, "flat-fp16")
        keys = index.keys()
        held_last = int(keys.max())
        assert held_last in (reported[-1], reported[-1] + 1)
        assert keys.tolist() == list(range(held_last - 999, held_last + 1))  # a window of 1,000: nothing lost
        assert index.ntotal == 1000 * Q
        assert len(index.search(np.eye(D, dtype=np.float32)[0], 5)[0].keys) == 5


@pytest.mark.parametrize("n", [5, 100])
def test_skipped_images_stay_out_of_gpu_searches(n, monkeypatch):
    """FAISS's GPU indexes take no selector: a stand-in GPU copy (the CPU index searched without one)
    returns skipped images, which the search masks; where the vectors the GPU returned then hold too
    few images (all of them skipped, for n = 5: 129 vectors, 4 images), the CPU searches.
    tests/test_gpu.py searches a real GPU."""
    from retrieval import faiss_index

    class StandIn:
        def __init__(self, index):
            self.index = index

        def search(self, queries, k):
            return self.index.search(queries, min(k, faiss_index.GPU_MAX_K))

    monkeypatch.setattr(faiss_index, "to_gpu", StandIn)
    rng = np.random.default_rng(8)
    keys = np.arange(200, dtype=np.int64)
    vectors = unit(np.repeat(rng.standard_normal((200, 1, D)), Q, axis=1))  # 32 alike vectors an image
    query = unit(rng.standard_normal(D))
    index = MaxSimIndex(D, Q, "flat-fp32")
    index.add(keys, vectors)
    assert index.use_gpu()
    skipped = brute_force(vectors, keys, query, 20)[0]  # the 20 best
    index.skip(skipped)
    live = np.setdiff1d(keys, skipped)
    hits = index.search(query, n)[0]
    assert hits.keys.tolist() == brute_force(vectors[live], live, query, n)[0].tolist()


def test_the_skip_selector_is_used_only_where_needed_built_once_and_shared_by_threads(monkeypatch):
    """A search first runs without FAISS's selector (it slows a scan by about a third) and masks what
    it skips; only where too few images are left does it search with the selector. That is built once
    per change of the skipped ids (0.44 s for 3.2 M of them), where it was built at every search and
    kept in an attribute that a concurrent search could replace, and free, while FAISS used it."""
    from concurrent.futures import ThreadPoolExecutor

    from retrieval import faiss_index

    built = []
    skip_selector = faiss_index.skip_selector
    monkeypatch.setattr(faiss_index, "skip_selector", lambda ids: built.append(len(ids)) or skip_selector(ids))
    rng = np.random.default_rng(9)
    keys = np.arange(300, dtype=np.int64)
    queries = unit(rng.standard_normal((64, D)))
    for alike in (False, True):  # alike: 32 equal vectors an image, so the skipped best fill the top
        vectors = unit(np.repeat(rng.standard_normal((300, 1, D)), Q, axis=1) if alike
                       else rng.standard_normal((300, Q, D)))
        index = MaxSimIndex(D, Q, "flat-fp16")
        index.add(keys, vectors)
        index.skip(keys[::3])
        live = np.setdiff1d(keys, keys[::3])
        with ThreadPoolExecutor(4) as pool:
            found = list(pool.map(lambda q: index.search(q, 5, exact=source(live, vectors[live]))[0].keys.tolist(),
                                  queries))
        assert found == [brute_force(vectors[live], live, q, 5)[0].tolist() for q in queries]
        if not alike:
            assert built == []  # the search without the selector held enough images every time
    assert 1 <= len(built) <= 4 and set(built) == {100 * Q}  # once (or once a thread, racing at first)
    index.skip(keys[1:2])
    index.search(queries[0], 5)
    assert built[-1] == 101 * Q


def test_a_failed_save_removes_its_temporary_file_and_keeps_the_old_files(tmp_path, monkeypatch):
    """A full disk (or Ctrl-C) mid-save: the old file and delta stay as they were, and no temporary
    file is left (beside a FAISS file, one is as large as the file)."""
    import errno

    path = tmp_path / "vectors.faiss"
    keys, _ = saved_base("flat-fp16", path)
    index = SegmentedIndex.load(path, D, Q, "flat-fp16", mmap=True)
    index.remove(keys[:1])
    assert index.save(path, DELTA_ALWAYS) is False
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    index.remove(keys[1:2])

    def full(_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    for policy in (DELTA_ALWAYS, DeltaPolicy(whole_below_bytes=1 << 40)):  # the delta, then the whole file
        with pytest.raises(OSError, match="No space"):
            index.save(path, policy)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved
