"""Index types through the CLI and the store: chosen, kept, converted, budgeted, mapped; always consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, assert_consistent, make_images, run_cli


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("types") / "photos"
    make_images(folder, 40, seed=11)  # 1,280 vectors: enough to train SQ8 and a 16-list IVF
    return folder


def status(index_dir) -> dict:
    return json.loads(run_cli("status", "--index", str(index_dir), "--json", check=True).stdout)


def itc_results(index_dir, model, query="a red circle") -> list[tuple[str, float]]:
    found = run_cli("search", query, "--index", str(index_dir), "--model", str(model), "--no-rerank", "-k", "5",
                    "--json", check=True)
    return [(r["path"], round(r["score"], 5)) for r in json.loads(found.stdout)["results"]]


def test_types_are_chosen_kept_converted_and_budgeted(photos, tiny_model, tmp_path):
    exact, idx = tmp_path / "exact", tmp_path / "idx"
    common = ["--model", str(tiny_model), "-q", "--json"]
    run_cli("index", str(photos), "--index", str(exact), *common, check=True)
    assert status(exact)["index_kind"] == "flat-fp16"

    run_cli("index", str(photos), "--index", str(idx), "--index-type", "sq8", *common, check=True)
    assert (status(idx)["index_type"], status(idx)["index_kind"]) == ("sq8", "sq8")
    assert_consistent(idx)
    assert itc_results(idx, tiny_model) == itc_results(exact, tiny_model)  # exact scores, same images

    # Converting an index re-reads the catalog's vectors: nothing is embedded again.
    converted = run_cli("index", str(photos), "--index", str(idx), "--index-type", "ivf-flat:nlist=16", *common,
                        check=True)
    assert json.loads(converted.stdout)["indexed"] == 0
    assert status(idx)["index_kind"] == "ivf-flat"
    assert_consistent(idx)
    assert itc_results(idx, tiny_model) == itc_results(exact, tiny_model)

    # The type is kept: a plain re-run leaves it as it is.
    run_cli("index", str(photos), "--index", str(idx), *common, check=True)
    assert status(idx)["index_type"] == "ivf-flat:nlist=16"

    over = run_cli("index", str(photos), "--index", str(idx), "--max-index-memory", "10kB", *common)
    assert over.returncode == 2 and "--max-index-memory" in over.stderr and "Traceback" not in over.stderr
    assert status(idx)["index_type"] == "ivf-flat:nlist=16"  # a refused setting is not recorded

    run_cli("index", str(photos), "--index", str(idx), "--max-index-memory", "1GiB", *common, check=True)
    assert (status(idx)["index_type"], status(idx)["index_kind"]) == ("auto", "flat-fp16")
    assert_consistent(idx)


@pytest.mark.parametrize("args, message", [
    (["--index-type", "ivfpq"], "unknown index type"),
    (["--index-type", "ivf-pq:m=7"], "dividing"),
    (["--max-index-memory", "lots"], "is not a size"),
    (["--index-type", "auto"], "needs --max-index-memory"),
])
def test_bad_index_types_are_one_clear_error(args, message, photos, tiny_model, tmp_path):
    result = run_cli("index", str(photos), "--index", str(tmp_path / "idx"), "--model", str(tiny_model), "-q", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_read_only_opens_map_large_files_and_changes_still_work(photos, tiny_model, tmp_path):
    import numpy as np

    from indexer.store import IndexStore, StoreConfig

    run_cli("index", str(photos), "--index", str(tmp_path), "--model", str(tiny_model), "-q",
            "--index-type", "ivf-flat:nlist=16", check=True)
    store = IndexStore.open(StoreConfig(tmp_path, mmap_min_bytes=0))
    try:
        identity = store.catalog.model()
        vectors = store.load_vectors(identity, read_only=True)
        assert vectors.base._mapped_from is not None and vectors.kind == "ivf-flat"
        query = np.eye(identity.embed_dim, dtype=np.float32)[0]
        before = vectors.search(query, 3, store.exact_vectors(identity))[0]
        vectors.remove(before.keys[:1])  # FAISS aborts on writing a mapped IVF: it is skipped instead
        after = vectors.search(query, 3, store.exact_vectors(identity))[0]
        assert vectors.base._mapped_from is not None and before.keys[0] not in after.keys.tolist()
        assert store.load_vectors(identity).ntotal == vectors.ntotal + identity.num_queries  # the file is untouched
    finally:
        store.close()


def test_read_only_opens_map_flat_codes_too(photos, tiny_model, tmp_path):
    """FAISS's IO_FLAG_MMAP maps IVF lists but read flat-fp16, sq8 and HNSW codes whole into memory
    (0.45 s for 0.8 GB, every search); IO_FLAG_MMAP_IFC maps them, which IVF files refuse."""
    import faiss
    import numpy as np

    from indexer.store import IndexStore, StoreConfig

    run_cli("index", str(photos), "--index", str(tmp_path), "--model", str(tiny_model), "-q", check=True)
    store = IndexStore.open(StoreConfig(tmp_path, mmap_min_bytes=0))
    try:
        identity = store.catalog.model()
        vectors = store.load_vectors(identity, read_only=True)
        codes = faiss.downcast_index(vectors.base.index.index).codes
        assert vectors.kind == "flat-fp16" and not codes.is_owned  # a view of the mapped file
        query = np.eye(identity.embed_dim, dtype=np.float32)[0]
        before = vectors.search(query, 3, store.exact_vectors(identity))[0]
        vectors.remove(before.keys[:1])
        assert before.keys[0] not in vectors.search(query, 3, store.exact_vectors(identity))[0].keys.tolist()
    finally:
        store.close()


def test_a_budget_outgrown_stops_writers_but_not_searches():
    from indexer.store import IndexSettings
    from retrieval.errors import UsageError

    auto, fixed = IndexSettings("auto", 1_000_000), IndexSettings("sq8", 1_000_000)
    assert auto.spec_for(10, 32, 256).kind == "flat-fp16"
    for settings in (auto, fixed):
        with pytest.raises(UsageError, match="max-index-memory"):
            settings.spec_for(10_000, 32, 256)
    assert str(auto.spec_for(10_000, 32, 256, strict=False)) == "ivf-pq:m=8"  # the smallest auto takes
    assert fixed.spec_for(10_000, 32, 256, strict=False).kind == "sq8"


def test_a_corrupt_or_truncated_faiss_file_is_rebuilt_from_the_catalog(tiny_model, tmp_path):
    make_images(tmp_path / "photos", 6, seed=12)
    idx = tmp_path / "idx"
    run_cli("index", str(tmp_path / "photos"), "--index", str(idx), "--model", str(tiny_model), "-q", check=True)
    expected = itc_results(idx, tiny_model)
    good = (idx / "vectors.faiss").read_bytes()
    for broken in (b"\x13" * 3000, good[: len(good) // 2]):
        (idx / "vectors.faiss").write_bytes(broken)
        assert itc_results(idx, tiny_model) == expected  # searched from the catalog's vectors
        assert status(idx)["index_kind"] == "unreadable (rebuilt from the catalog)"
    again = run_cli("index", str(tmp_path / "photos"), "--index", str(idx), "--model", str(tiny_model), "--json",
                    "-q", check=True)
    assert json.loads(again.stdout)["unchanged"] == 6  # nothing embedded again, and the file is whole again
    assert (status(idx)["index_kind"], status(idx)["index_vectors"]) == ("flat-fp16", 6 * 32)
    assert_consistent(idx)


def test_index_settings_unreadable_are_one_clear_error_and_unknown_keys_are_ignored(tmp_path):
    from indexer.errors import IndexSettingsError
    from indexer.store import IndexSettings, IndexStore, StoreConfig

    store = IndexStore.open(StoreConfig(tmp_path / "idx"), create=True)
    try:
        settings = tmp_path / "idx" / "index.json"
        settings.write_text('{"index_type": "sq8", "max_memory": null, "added_by_a_newer_version": 1}')
        assert store.settings() == IndexSettings("sq8", None)
        for broken, reason in (("garbage", "Expecting value"), ("[1]", "not a JSON object")):
            settings.write_text(broken)
            with pytest.raises(IndexSettingsError, match=f"index.json cannot be read \\({reason}"):
                store.settings()
    finally:
        store.close()
    result = run_cli("status", "--index", str(tmp_path / "idx"))
    assert result.returncode == 2 and result.stderr.startswith("Error: ") and "Traceback" not in result.stderr


def test_walk_options_are_kept_and_an_unreadable_walk_file_is_one_clear_error(tmp_path):
    from indexer.errors import IndexSettingsError
    from indexer.store import IndexStore, StoreConfig
    from indexer.walk import WalkOptions

    store = IndexStore.open(StoreConfig(tmp_path / "idx"), create=True)
    try:
        assert store.choose_walk(("cache",), follow_symlinks=True) == WalkOptions(("cache",), True)
        assert store.choose_walk() == store.kept_walk() == WalkOptions(("cache",), True)
        assert store.choose_walk(clear_excludes=True) == WalkOptions((), True)
        walk = tmp_path / "idx" / "walk.json"
        for broken, reason in (("garbage", "Expecting value"), ("[1]", "not a JSON object"),
                               ('{"excludes": []}', "KeyError")):
            walk.write_text(broken)
            with pytest.raises(IndexSettingsError, match=f"walk.json cannot be read \\({reason}"):
                store.kept_walk()
    finally:
        store.close()


def test_an_index_that_cannot_be_written_is_searched_but_not_changed(photos, tiny_model, tmp_path):
    """On a read-only mount, index, caption and forget ended in a FileLock traceback. The lock file is
    made unopenable here (a folder in its place), as mounting read-only needs privileges tests lack."""
    idx = tmp_path / "idx"
    run_cli("index", str(photos), "--index", str(idx), "--model", str(tiny_model), "-q", check=True)
    (idx / "index.lock").unlink(missing_ok=True)
    (idx / "index.lock").mkdir()
    searched = run_cli("search", "a red circle", "--index", str(idx), "-k", "2", check=True)
    assert len(searched.stdout.splitlines()) == 2
    for args in (["forget", str(photos)], ["index"], ["caption", "--caption-model", "unused"]):
        refused = run_cli(*args, "--index", str(idx))
        assert refused.returncode == 2 and refused.stderr == (
            f"Error: cannot write to the index at {idx} (Is a directory); it can be searched, not changed\n")


def test_disk_bytes_is_every_file_under_the_index(tmp_path):
    from indexer.store import IndexStore, StoreConfig

    store = IndexStore.open(StoreConfig(tmp_path / "idx"), create=True)
    (tmp_path / "idx" / "thumbnails" / "deep").mkdir(parents=True)
    for i, name in enumerate(["thumbnails/a.jpg", "thumbnails/deep/b.jpg", "c.bin"]):
        (tmp_path / "idx" / name).write_bytes(b"x" * (1000 * (i + 1)))
    expected = sum(path.stat().st_size for path in (tmp_path / "idx").rglob("*") if path.is_file())
    assert store.disk_bytes() == expected and expected >= 6000
    store.close()


def indexed_counting_id_reads(tiny_model, tmp_path, monkeypatch, seed: int):
    """(The store of 6 indexed images, a list that grows by one at each read of the catalog's ids,
    the unwrapped `Catalog.embedding_ids` to read them uncounted.)"""
    from indexer.catalog import Catalog
    from indexer.store import IndexStore, StoreConfig

    make_images(tmp_path / "photos", 6, seed=seed)
    run_cli("index", str(tmp_path / "photos"), "--index", str(tmp_path / "idx"), "--model", str(tiny_model), "-q",
            check=True)
    read = []
    all_ids = Catalog.embedding_ids
    monkeypatch.setattr(Catalog, "embedding_ids", lambda self: read.append(1) or all_ids(self))
    return IndexStore.open(StoreConfig(tmp_path / "idx")), read, all_ids


def test_a_search_of_an_unchanged_catalog_reads_no_ids_and_any_change_is_seen(tiny_model, tmp_path, monkeypatch):
    """Opening for a search reconciled the FAISS file with the catalog by reading every id of both:
    seconds a million images, a hundred-million-image catalog's leaf pages on every `search`. The
    file now records the catalog's vectors version it was reconciled with; while the catalog still
    has it, no id is read. Every change made after, by any writer, is still found."""
    store, read, all_ids = indexed_counting_id_reads(tiny_model, tmp_path, monkeypatch, seed=13)
    identity, catalog = store.catalog.model(), store.catalog
    try:
        synced = json.loads((tmp_path / "idx" / "vectors.json").read_text())
        assert synced["catalog_vectors_version"] == catalog.vectors_version() and synced["images"] == 6
        assert sorted(store.load_vectors(identity, read_only=True).keys()) == all_ids(catalog).tolist()
        assert read == [] and store.vectors_summary()["index_in_step"]  # `blipsearch status` says so
        forgotten = catalog.files()[0]  # another writer forgets an image and has not saved the file yet
        catalog.remove_files([forgotten.id])
        assert not store.vectors_summary()["index_in_step"]
        assert store.load_vectors(identity, read_only=True).keys().tolist() == all_ids(catalog).tolist()
        assert len(read) == 1 and forgotten.embedding_id not in all_ids(catalog).tolist()
        store.save_vectors(store.load_vectors(identity))  # a periodic save: in step, but not recorded so
        assert not (tmp_path / "idx" / "vectors.json").exists()
        store.reconcile_and_save(store.load_vectors(identity), identity)
        read.clear()
        assert store.load_vectors(identity, read_only=True).ntotal == 5 * identity.num_queries and read == []
        synced = json.loads((tmp_path / "idx" / "vectors.json").read_text())
        stat = (tmp_path / "idx" / "vectors.faiss").stat()
        assert synced.pop("files")[0] == [stat.st_ino, stat.st_size, stat.st_mtime_ns]
        (tmp_path / "idx" / "vectors.json").write_text(json.dumps({**synced, "file": [stat.st_size, stat.st_mtime_ns]}))
        assert store.in_step()  # as blipsearch saved it before deltas
        os.utime(tmp_path / "idx" / "vectors.faiss")  # replaced by other means since: not trusted
        store.load_vectors(identity, read_only=True)
        assert len(read) == 1
        with catalog.engine.begin() as conn:  # the version's row removed by hand: reconciled every time
            conn.exec_driver_sql("DELETE FROM meta WHERE key = 'vectors_version'")
        store.reconcile_and_save(store.load_vectors(identity), identity)
        assert not (tmp_path / "idx" / "vectors.json").exists()
        read.clear()
        assert store.load_vectors(identity, read_only=True).ntotal == 5 * identity.num_queries and read == [1]
    finally:
        store.close()


def test_a_search_after_a_killed_run_sees_what_it_committed(tiny_model, tmp_path):
    """A run killed after committing images, before saving the FAISS file, leaves the file recorded as
    in step with a catalog version that the run's first batch replaced."""
    from indexer.store import IndexStore, StoreConfig

    make_images(tmp_path / "photos", 4, seed=14)
    idx = tmp_path / "idx"
    command = ["index", str(tmp_path / "photos"), "--index", str(idx), "--model", str(tiny_model), "-q",
               "--batch-size", "1", "--workers", "1"]
    run_cli(*command, check=True)
    make_images(tmp_path / "photos" / "more", 40, seed=15)
    process = subprocess.Popen([sys.executable, "-m", "api.cli", *command], cwd=ROOT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE)
    store = IndexStore.open(StoreConfig(idx))
    try:
        deadline = time.monotonic() + 120
        while len(store.catalog.embedding_ids()) < 6 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.kill()
        process.wait()
        committed = store.catalog.embedding_ids().tolist()
        assert 6 <= len(committed) < 44, "the run was not killed mid-way"
        identity = store.catalog.model()
        assert sorted(store.load_vectors(identity, read_only=True).keys().tolist()) == committed
    finally:
        store.close()


def test_a_writer_reads_the_catalogs_ids_once_when_the_file_is_in_step(tiny_model, tmp_path, monkeypatch):
    """A writer (`index`, `caption`, `forget`) opened the FAISS file by reconciling it with every id of
    the catalog, read the ids again at each periodic save (to size the index type) and twice at its
    end. In step, it now reads them once: when its last save reconciles."""
    store, read, all_ids = indexed_counting_id_reads(tiny_model, tmp_path, monkeypatch, seed=16)
    identity, catalog = store.catalog.model(), store.catalog
    try:
        index = store.load_vectors(identity)
        assert index.keys().tolist() == all_ids(catalog).tolist() and read == []
        index.remove(index.keys()[:2])  # as if this writer had removed them, not yet in the catalog
        store.save_vectors(index)  # a periodic save
        assert read == []
        store.reconcile_and_save(index, identity)
        assert len(read) == 1 and index.keys().tolist() == all_ids(catalog).tolist()
        read.clear()
        catalog.remove_files([catalog.files()[0].id])  # another writer's change: the file is not in step
        assert store.load_vectors(identity).keys().tolist() == all_ids(catalog).tolist() and len(read) == 1
    finally:
        store.close()


def test_a_writer_saves_its_changes_beside_a_large_file_and_readers_see_them(photos, tiny_model, tmp_path):
    """A writer read the whole FAISS file into memory and wrote it whole again for any change: 16 GB
    each way to add one photo to a million in flat-fp16. A file at least `whole_below_bytes` large is
    now mapped, and a change saved beside it (`SegmentedIndex`), until the delta is due to merge."""
    from indexer.store import IndexStore, StoreConfig
    from retrieval.segments import DeltaPolicy, file_stamp
    from tests.conftest import assert_consistent

    run_cli("index", str(photos), "--index", str(tmp_path), "--model", str(tiny_model), "-q", check=True)
    stamp = file_stamp(tmp_path / "vectors.faiss")
    store = IndexStore.open(StoreConfig(tmp_path, delta=DeltaPolicy(whole_below_bytes=0, max_fraction=0.5)))
    try:
        identity, catalog = store.catalog.model(), store.catalog
        state = store.vectors_stamp()
        forgotten = catalog.files()[:3]
        assert len(catalog.remove_files([f.id for f in forgotten])) == 3  # another writer's removals
        writer = store.load_vectors(identity)
        assert writer.base._mapped_from is not None  # not read into memory
        assert store.reconcile_and_save(writer, identity) is False  # the delta alone
        assert file_stamp(tmp_path / "vectors.faiss") == stamp and store.vectors_stamp() != state
        summary = store.vectors_summary()
        assert summary["index_skipped_images"] == 3 and summary["index_in_step"]
        assert_consistent(tmp_path)
        reader = IndexStore.open(StoreConfig(tmp_path))
        try:
            assert reader.load_vectors(identity, read_only=True).keys().tolist() == catalog.embedding_ids().tolist()
        finally:
            reader.close()
        assert store.left_as_it_is(identity)  # a no-op run leaves both files alone
    finally:
        store.close()
    assert not any(path == f.path for path, _ in itc_results(tmp_path, tiny_model) for f in forgotten)
    again = run_cli("index", "--index", str(tmp_path), "-q", "--json", check=True)  # brings them back
    assert json.loads(again.stdout)["vectors_saved"] == "whole"  # a small file: merged, written whole
    again = run_cli("index", "--index", str(tmp_path), "-q", "--json", check=True)
    assert json.loads(again.stdout)["vectors_saved"] == "unchanged"
    after = status(tmp_path)
    assert after["index_skipped_images"] == 0 and after["index_vectors"] == 40 * 32 and after["index_in_step"]
    assert not (tmp_path / "vectors.delta.npz").exists()
    assert_consistent(tmp_path)


def test_a_writer_removes_the_temporary_files_of_saves_killed_midway(tmp_path):
    """`kill -9` during a save leaves `NAME.tmpPID` beside the file: a FAISS file's is as large as the
    file, and every killed run added one. The next writer removes them when it takes the lock."""
    from indexer.store import IndexStore, StoreConfig

    store = IndexStore.open(StoreConfig(tmp_path), create=True)
    try:
        left = ["vectors.faiss.tmp4304", "vectors.delta.npz.tmp17", "index.json.tmp9", "vectors.json.tmp12"]
        others = ["vectors.faiss.tmp", "vectors.faiss.tmpnotes", "photo.jpg.tmp12"]  # not ours: kept
        for name in left + others:
            (tmp_path / name).write_bytes(b"partial")
        with store.writer_lock():
            pass
        assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == sorted(others)
    finally:
        store.close()
