"""`blipsearch index` end to end: bad files, incremental runs, reuse, removal, model identity, the lock."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from api.cli import _export_skipped_command
from tests.conftest import assert_consistent, make_images, run_cli


def index(folder, index_dir, model, *extra, expect=0):
    result = run_cli("index", str(folder), "--index", str(index_dir), "--model", str(model), "--json", "-q", *extra)
    assert result.returncode == expect, result.stderr
    return json.loads(result.stdout) if expect == 0 else result


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "photos"
    make_images(images, 6)
    make_images(images / "nested" / "deeper", 2, seed=9)
    make_images(images / ".thumbnails", 2, seed=11)  # hidden: never walked
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.bin").write_bytes(b"not an image at all")
    good = (images / "img0000.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("RGBA", (30, 30), (0, 255, 0, 100)).save(images / "alpha.png")
    Image.new("RGB", (300, 300)).save(images / "huge.png")
    return images


def test_first_run_indexes_and_records_reasons(folder, tmp_path, tiny_model):
    summary = index(folder, tmp_path / "idx", tiny_model, "--max-megapixels", "0.05")
    assert summary["indexed"] == 9  # 6 + 2 nested + alpha.png
    assert summary["skipped_by_reason"] == {"empty": 1, "not-an-image": 1, "too-large": 1, "truncated": 1}
    assert_consistent(tmp_path / "idx")
    rows = [json.loads(line) for line in run_cli("export", "--index", str(tmp_path / "idx"), check=True).stdout.splitlines()]
    assert len(rows) == 13 and not any(".thumbnails" in r["path"] for r in rows)
    for row in rows:
        assert (row["status"] == "indexed") == (row["error"] is None)
        assert {"path", "size", "mtime_ns", "content_hash", "width", "height", "format"} <= row.keys()
    csv_out = tmp_path / "catalog.csv"
    run_cli("export", "--index", str(tmp_path / "idx"), "--format", "csv", "-o", str(csv_out), check=True)
    assert csv_out.read_text().splitlines()[0].startswith("path,status,error")
    skipped = run_cli("export", "--index", str(tmp_path / "idx"), "--status", "skipped", check=True).stdout
    assert sorted((Path(r["path"]).name, r["error"].split(":")[0]) for r in map(json.loads, skipped.splitlines())) == \
        [("empty.jpg", "empty"), ("huge.png", "too-large"), ("notes.bin", "not-an-image"), ("truncated.jpg", "truncated")]
    nested = run_cli("export", "--index", str(tmp_path / "idx"), "--path", f"{folder}/nested/*", "--format", "csv",
                     check=True).stdout.splitlines()
    assert len(nested) == 3 and all("/nested/deeper/" in line for line in nested[1:])
    status = json.loads(run_cli("status", "--index", str(tmp_path / "idx"), "--json", check=True).stdout)
    assert status["indexed"] == 9 and status["skipped"] == 4 and status["num_queries"] == 32
    assert status["path_trigram_index"] is False  # SQLite: such globs read every path


def test_a_run_that_skips_files_says_how_to_list_them(folder, tmp_path, tiny_model):
    """`index` printed how many files it skipped, by reason, and not where to see which."""
    idx = tmp_path / "my idx"  # a space: the command shown must still run as printed
    result = run_cli("index", str(folder), "--index", str(idx), "--model", str(tiny_model), "-q", check=True)
    [hint] = [line for line in result.stderr.splitlines() if line.startswith("the skipped files, and why: ")]
    command = shlex.split(hint.split(": ", 1)[1])
    assert command[:2] == ["blipsearch", "export"]
    listed = [json.loads(line) for line in run_cli(*command[1:], check=True).stdout.splitlines()]
    assert sorted(Path(row["path"]).name for row in listed) == ["empty.jpg", "notes.bin", "truncated.jpg"]
    again = run_cli("index", str(folder), "--index", str(idx), "--model", str(tiny_model), "-q", check=True)
    assert "the skipped files" not in again.stderr  # none skipped by this run: nothing to say
    shared = SimpleNamespace(directory=Path("/x"), config=SimpleNamespace(catalog_url="postgresql+psycopg://me:pw@h/db"))
    assert _export_skipped_command(shared) == \
        "blipsearch export --index /x --catalog-url 'postgresql+psycopg://me:***@h/db' --status skipped"


def test_a_file_skipped_for_the_runs_limits_is_tried_again(folder, tmp_path, tiny_model):
    """`too-large` says to raise --max-megapixels; the re-run that does must index the file, though it
    is unchanged. Skips for the file's own bytes (empty, truncated, not an image) stand."""
    idx = tmp_path / "idx"
    index(folder, idx, tiny_model, "--max-megapixels", "0.05")
    still = index(folder, idx, tiny_model, "--max-megapixels", "0.05")
    assert still["skipped_by_reason"] == {"too-large": 1} and still["unchanged"] == 12
    raised = index(folder, idx, tiny_model)
    assert raised["indexed"] == 1 and raised["skipped"] == 0 and raised["unchanged"] == 12
    assert index(folder, idx, tiny_model)["unchanged"] == 13
    assert_consistent(idx)


def test_symbolic_links_are_followed_only_when_asked_and_said_when_not(tmp_path, tiny_model):
    """Before, links to photos or folders were left out without a word."""
    make_images(tmp_path / "elsewhere", 2, seed=12)
    make_images(tmp_path / "photos", 1, seed=13)
    os.symlink(tmp_path / "elsewhere", tmp_path / "photos" / "linked-folder")
    os.symlink(tmp_path / "elsewhere" / "img0000.jpg", tmp_path / "photos" / "linked.jpg")
    os.symlink(tmp_path / "nowhere", tmp_path / "photos" / "dangling.jpg")  # not worth a note
    result = run_cli("index", str(tmp_path / "photos"), "--index", str(tmp_path / "idx"), "--model", str(tiny_model),
                     "--json", "-q", check=True)
    assert json.loads(result.stdout)["indexed"] == 1 and json.loads(result.stdout)["links_not_followed"] == 2
    assert ("note: 2 symbolic link(s) to files or folders were not followed; --follow-symlinks indexes what they "
            "point to") in result.stderr
    followed = index(tmp_path / "photos", tmp_path / "idx", tiny_model, "--follow-symlinks")
    assert followed["indexed"] == 2 and followed["reused"] == 1 and followed["links_not_followed"] == 0
    again = index(tmp_path / "photos", tmp_path / "idx", tiny_model)  # kept: a cron run without the flag
    assert again["removed"] == 0 and again["unchanged"] == 4
    unfollowed = index(tmp_path / "photos", tmp_path / "idx", tiny_model, "--no-follow-symlinks")
    assert unfollowed["removed"] == 3 and unfollowed["links_not_followed"] == 2


def test_excludes_are_kept_for_later_runs(tmp_path, tiny_model):
    """`index` without folders re-indexes as before: files excluded once stay out of a cron run that
    does not repeat --exclude, until --no-exclude drops the globs."""
    make_images(tmp_path / "photos" / "keep", 2, seed=24)
    make_images(tmp_path / "photos" / "cache", 3, seed=25)
    idx = tmp_path / "idx"
    assert index(tmp_path / "photos", idx, tiny_model, "--exclude", "cache")["indexed"] == 2
    again = run_cli("index", "--index", str(idx), "--model", str(tiny_model), "--json", "-q", check=True)
    assert json.loads(again.stdout)["indexed"] == 0 and json.loads(again.stdout)["unchanged"] == 2
    status = json.loads(run_cli("status", "--index", str(idx), "--json", check=True).stdout)
    assert status["excludes"] == ["cache"] and status["follow_symlinks"] is False
    assert index(tmp_path / "photos", idx, tiny_model, "--no-exclude")["indexed"] == 3


def test_export_writes_through_links_pipes_and_devices(tmp_path, tiny_model):
    """-o replaced its target by renaming a temporary file over it: over /dev/stdout or a FIFO that put a
    regular file in its place (as root, in /dev), and a symbolic link became a file."""
    import stat
    import threading

    make_images(tmp_path / "photos", 2, seed=3)
    idx = tmp_path / "idx"
    index(tmp_path / "photos", idx, tiny_model)
    (tmp_path / "real.jsonl").write_text("old\n")
    os.symlink("real.jsonl", tmp_path / "link.jsonl")
    run_cli("export", "--index", str(idx), "-o", str(tmp_path / "link.jsonl"), check=True)
    assert os.readlink(tmp_path / "link.jsonl") == "real.jsonl"
    assert len((tmp_path / "real.jsonl").read_text().splitlines()) == 2
    os.mkfifo(tmp_path / "fifo")
    received = []
    reader = threading.Thread(target=lambda: received.append((tmp_path / "fifo").read_text()), daemon=True)
    reader.start()
    run_cli("export", "--index", str(idx), "--format", "csv", "-o", str(tmp_path / "fifo"), check=True)
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode) and len(received[0].splitlines()) == 3
    assert sorted(os.listdir(tmp_path)) == ["fifo", "idx", "link.jsonl", "photos", "real.jsonl"]  # no .tmp left


def test_incremental_rename_duplicate_change_delete(folder, tmp_path, tiny_model):
    idx = tmp_path / "idx"
    index(folder, idx, tiny_model)

    def saved():
        return (idx / "vectors.faiss").stat().st_ino, (idx / "vectors.faiss").stat().st_mtime_ns

    first = saved()
    again = index(folder, idx, tiny_model)
    assert again["indexed"] == 0 and again["reused"] == 0 and again["unchanged"] == 13
    assert saved() == first  # nothing new, the file in step: neither read nor rewritten (16 GB at 1M images)
    # Saved by an earlier blipsearch (FAISS's IndexIDMap2, whose reverse id map every search's open
    # rebuilt): the next run saves it once as now, though nothing changed.
    older = bytearray((idx / "vectors.faiss").read_bytes())
    older[:4] = b"IxM2"
    (idx / "vectors.faiss").write_bytes(older)
    synced = json.loads((idx / "vectors.json").read_text())
    synced["file"] = [(idx / "vectors.faiss").stat().st_size, (idx / "vectors.faiss").stat().st_mtime_ns]
    (idx / "vectors.json").write_text(json.dumps(synced))
    first = saved()
    index(folder, idx, tiny_model)
    assert saved() != first and (idx / "vectors.faiss").read_bytes()[:4] == b"IxMp"
    first = saved()
    index(folder, idx, tiny_model)
    assert saved() == first
    (idx / "vectors.json").unlink()  # not known to be in step (as after a killed run): reconciled and saved
    index(folder, idx, tiny_model)
    assert saved() != first and (idx / "vectors.json").exists()

    os.rename(folder / "img0001.jpg", folder / "renamed.jpg")
    shutil.copy(folder / "img0002.jpg", folder / "copy-of-2.jpg")
    make_images(tmp_path / "new", 1, seed=42)[0].replace(folder / "img0003.jpg")  # new content, same name
    (folder / "img0004.jpg").unlink()
    summary = index(folder, idx, tiny_model)
    assert summary["reused"] == 2  # the rename and the duplicate: no model run
    assert summary["indexed"] == 1  # the changed file only
    assert summary["removed"] == 2  # the old name and the deleted file
    assert_consistent(idx)
    exported = run_cli("export", "--index", str(idx), check=True).stdout.splitlines()
    rows = {os.path.relpath(r["path"], folder): r for r in map(json.loads, exported)}
    assert rows["copy-of-2.jpg"]["content_hash"] == rows["img0002.jpg"]["content_hash"]
    assert "img0004.jpg" not in rows and "img0001.jpg" not in rows


def test_touch_without_change_is_not_reembedded(folder, tmp_path, tiny_model):
    idx = tmp_path / "idx"
    index(folder, idx, tiny_model)
    os.utime(folder / "img0000.jpg", ns=(1, 1))
    summary = index(folder, idx, tiny_model)
    assert summary["indexed"] == 0 and summary["reused"] == 0 and summary["unchanged"] == 13


def test_other_model_is_refused(folder, tmp_path, tiny_model):
    from retrieval.tiny import make_retrieval

    idx = tmp_path / "idx"
    index(folder, idx, tiny_model)
    other = make_retrieval(tmp_path / "other-model", seed=1)
    result = index(folder, idx, other, expect=2)
    assert "was built with model" in result.stderr and "Traceback" not in result.stderr
    searched = run_cli("search", "a red circle", "--index", str(idx), "--model", str(other))
    assert searched.returncode == 2 and "was built with model" in searched.stderr


def test_second_writer_gets_busy_error(folder, tmp_path, tiny_model):
    from filelock import FileLock

    idx = tmp_path / "idx"
    idx.mkdir()
    with FileLock(str(idx / "index.lock")):
        result = index(folder, idx, tiny_model, expect=3)
    assert "busy" in result.stderr


def test_wrong_path_is_a_clear_error(tmp_path, tiny_model):
    result = index(tmp_path / "nope", tmp_path / "idx", tiny_model, expect=2)
    assert "no such file or directory" in result.stderr and "Traceback" not in result.stderr
    os.mkfifo(tmp_path / "pipe.jpg")  # before: walked as a folder that could not be read, and kept as a root
    for special, kind in ((tmp_path / "pipe.jpg", "a named pipe"), ("/dev/null", "a device")):
        refused = index(special, tmp_path / "idx", tiny_model, expect=2)
        assert refused.stderr == f"Error: {special}: not a folder or a regular file ({kind}); give folders or " \
                                 "image files\n"
    assert not (tmp_path / "idx").exists()
    make_images(tmp_path / "photos", 1)
    (tmp_path / "a-file").write_text("")
    blocked = index(tmp_path / "photos", tmp_path / "a-file" / "idx", tiny_model, expect=2)
    assert blocked.stderr == f"Error: cannot create the index directory {tmp_path}/a-file/idx: Not a directory\n"
    unset = run_cli("index", "", "--index", str(tmp_path / "idx"), "--model", str(tiny_model))  # "$PHOTOS" unset
    assert unset.returncode == 2 and "a path is empty (an unset shell variable?)" in unset.stderr


def test_a_path_postgresql_cannot_index_is_skipped_and_named(tmp_path, tiny_model, catalog_url):
    """PostgreSQL's btree on files.path holds about 2,700 bytes a value: a longer path (Linux allows
    4,095) failed its whole batch, on every run. It is skipped there with a warning; SQLite keeps it."""
    photos = tmp_path / "photos"
    make_images(photos, 3, seed=12)
    rng = random.Random(0)  # names PostgreSQL cannot compress below its limit, as repeated ones would be
    deep = photos.joinpath(*("".join(rng.choices(string.ascii_letters, k=250)) for _ in range(11)))  # ~2,800 bytes
    far = make_images(deep, 1, seed=13)[0]
    args = ["index", str(photos), "--index", str(tmp_path / "idx"), "--model", str(tiny_model), "--json", "-q",
            "--catalog-url", catalog_url]
    for run in range(2):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        if catalog_url.startswith("postgresql"):
            assert summary["skipped_by_reason"] == {"path-too-long": 1} and summary["paths_too_long"] == [str(far)]
            assert "1 file(s) not indexed, because their paths are longer than the 2600 bytes" in result.stderr
        else:
            assert summary["skipped"] == 0 and summary["paths_too_long"] == []
        assert (summary["indexed"], summary["unchanged"], summary["removed"]) == \
            ((3 if catalog_url.startswith("postgresql") else 4, 0, 0) if run == 0 else (0, summary["unchanged"], 0))
    refused = run_cli("index", str(deep), "--index", str(tmp_path / "idx"), "--catalog-url", catalog_url)
    assert refused.returncode == 2 and "the path is longer than the 2600 bytes the catalog keeps" in refused.stderr


def test_a_name_that_is_not_utf8_is_skipped_and_named(folder, tmp_path, tiny_model):
    """Linux names are bytes; the catalog's text columns take UTF-8 only. Such a file is left out with
    a warning that names it; the rest is indexed, and a root with such a name is refused up front."""
    shutil.copy(folder / "img0000.jpg", os.fsdecode(bytes(folder) + b"/caf\xe9.jpg"))  # Latin-1 "café"
    idx = tmp_path / "idx"
    for run in range(2):  # the second run finds it again and removes nothing
        result = run_cli("index", str(folder), "--index", str(idx), "--model", str(tiny_model), "--json", "-q")
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["skipped_by_reason"]["name-not-utf8"] == 1
        assert summary["names_not_utf8"] == [f"{folder}/caf\\xe9.jpg"]
        assert summary["indexed"] == (10 if run == 0 else 0) and summary["removed"] == 0
        assert "not valid UTF-8" in result.stderr and f"{folder}/caf\\xe9.jpg" in result.stderr
    assert_consistent(idx)
    rows = [json.loads(line) for line in run_cli("export", "--index", str(idx), check=True).stdout.splitlines()]
    assert len(rows) == 13 and not any("caf" in r["path"] for r in rows)

    root = os.fsdecode(bytes(tmp_path) + b"/\xff")
    os.mkdir(root)
    refused = run_cli("index", root, "--index", str(idx), "--model", str(tiny_model))
    assert refused.returncode == 2 and f"{tmp_path}/\\xff: the name is not valid UTF-8" in refused.stderr
    assert "Traceback" not in refused.stderr
    refused = run_cli("forget", root, "--index", str(idx))  # was a UnicodeEncodeError from the database driver
    assert (refused.returncode, refused.stderr) == (2, f"Error: nothing is indexed at {tmp_path}/\\xff\n")


def test_an_index_inside_the_folder_does_not_index_itself(folder, tmp_path, tiny_model):
    """`index . --index idx`: the catalog, its journal and the server's thumbnails are not photos."""
    idx = folder / "idx"
    first = index(folder, idx, tiny_model)
    (idx / "thumbnails").mkdir()
    shutil.copy(folder / "img0000.jpg", idx / "thumbnails" / "0123abcd.jpg")
    again = index(folder, idx, tiny_model)
    assert first["indexed"] == 10 and first["skipped"] == 3
    assert again["indexed"] == 0 and again["skipped"] == 0 and again["unchanged"] == 13
    rows = [json.loads(line) for line in run_cli("export", "--index", str(idx), check=True).stdout.splitlines()]
    assert len(rows) == 13 and not any(r["path"].startswith(str(idx)) for r in rows)


def test_a_file_given_as_a_root_is_unchanged_the_second_time(tmp_path, tiny_model):
    photo = make_images(tmp_path / "photos", 1, seed=24)[0]
    first = index(photo, tmp_path / "idx", tiny_model)
    again = index(photo, tmp_path / "idx", tiny_model)  # was read, hashed and "reused" every time
    assert (first["indexed"], again["unchanged"], again["reused"]) == (1, 1, 0)


def test_index_without_paths_and_forget(tmp_path, tiny_model):
    """`index` alone re-indexes the folders it was given, leaving one that is gone (an unplugged drive
    looks the same) as it is; `forget` removes that one's files whether or not it exists."""
    kept, gone, idx = tmp_path / "kept", tmp_path / "gone", tmp_path / "idx"
    make_images(kept, 3, seed=21)
    make_images(gone, 4, seed=22)
    refused = run_cli("index", "--index", str(idx), "--model", str(tiny_model))
    assert refused.returncode == 2 and "no index at" in refused.stderr
    index(kept, idx, tiny_model, str(gone))
    make_images(kept / "new", 1, seed=23)
    shutil.rmtree(gone)
    searched = run_cli("search", "a red circle", "--index", str(idx), "--model", str(tiny_model), "-k", "10")
    warnings = [line for line in searched.stderr.splitlines() if line.startswith("warning:")]
    assert warnings[-1] == "warning: and 1 more gone from disk" and len(warnings) == 4
    assert "blipsearch forget FOLDER" in searched.stderr
    again = run_cli("index", "--index", str(idx), "--json", "-q")  # a cron line: the index's own model
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["indexed"] == 1 and json.loads(again.stdout)["removed"] == 0
    assert f"warning: {gone} is gone" in again.stderr and f"blipsearch forget {gone}" in again.stderr
    def roots():
        return json.loads(run_cli("status", "--index", str(idx), "--json", check=True).stdout)["roots"]

    assert roots() == sorted([str(gone), str(kept)])
    from tests.conftest import ROOT  # commands run there: a relative --index is named in full, not as given

    relative = run_cli("status", "--index", os.path.relpath(idx, ROOT), "--json", check=True)
    assert json.loads(relative.stdout)["index"] == str(idx)
    empty = run_cli("forget", "", "--index", str(idx))  # not the folder it runs in
    assert empty.returncode == 2 and "a path is empty" in empty.stderr and roots() == sorted([str(gone), str(kept)])
    forgotten = run_cli("forget", str(gone), "--index", str(idx), "--json", check=True)
    assert json.loads(forgotten.stdout) == {"files": 4, "images": 4, "roots": [str(gone)], "still_walked": []}
    assert roots() == [str(kept)]
    rows = [json.loads(line) for line in run_cli("export", "--index", str(idx), check=True).stdout.splitlines()]
    assert len(rows) == 4 and all(r["path"].startswith(str(kept)) for r in rows)
    assert_consistent(idx)
    inside = run_cli("forget", str(kept / "new"), "--index", str(idx), check=True)  # still there: it comes back
    assert inside.stdout == "forgot 1 files (1 images no other file shares)\n"
    assert inside.stderr == (f"note: {kept / 'new'} is still on disk, inside a folder blipsearch index walks: its next "
                             "run adds it again (move it out, or exclude it: blipsearch index --exclude GLOB, kept "
                             "for later runs)\n")
    assert index(kept, idx, tiny_model)["indexed"] == 1
    twice = run_cli("forget", str(gone), "--index", str(idx))
    assert twice.returncode == 2 and twice.stderr == f"Error: nothing is indexed at {gone}\n"
    shutil.rmtree(kept)
    none_left = run_cli("index", "--index", str(idx), "--model", str(tiny_model))
    assert none_left.returncode == 2 and "every folder this index was given is gone" in none_left.stderr


def test_decoding_starts_while_the_model_loads(tmp_path, retriever, monkeypatch):
    """The embedder arrives as a Future; decoded batches wait for it, then land as usual. The model
    runs with the threads the balancer leaves it, and torch gets its own count back at the end."""
    import threading
    import time
    from concurrent.futures import Future

    import torch

    from indexer.pipeline import IndexConfig, Indexer
    from indexer.store import IndexStore, StoreConfig
    from indexer.threads import ThreadBalancer

    make_images(tmp_path / "photos", 10, seed=3)
    loading: Future = Future()
    store = IndexStore.open(StoreConfig(tmp_path / "idx"), create=True)
    decoded_before_model = []

    def finish_loading():
        time.sleep(3)
        decoded_before_model.append(store.catalog.counts()["files"])
        loading.set_result(retriever)

    threading.Thread(target=finish_loading).start()
    config = IndexConfig(batch_size=2, prefetch_images=100)
    threads_in_run = []

    def squeeze(balancer, *_):  # as if the decoders were always behind
        balancer._set(1)
        threads_in_run.append(torch.get_num_threads())

    monkeypatch.setattr(ThreadBalancer, "observe", squeeze)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = Indexer(store, loading, config, transform=retriever.transform).run([str(tmp_path / "photos")])
        assert threads_in_run and set(threads_in_run) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    store.close()
    assert summary.indexed == 10 and decoded_before_model == [0]  # nothing written before the model
    assert summary.decoded_before_model == 10  # all decoded while it loaded
    assert 0 < summary.seconds["model_wait"] < 3.5
    assert_consistent(tmp_path / "idx")


def test_a_model_that_fails_to_load_writes_nothing(tmp_path, retriever):
    from concurrent.futures import Future

    from indexer.pipeline import IndexConfig, Indexer
    from indexer.store import IndexStore, StoreConfig
    from retrieval.errors import ModelNotFoundError

    make_images(tmp_path / "photos", 4, seed=3)
    failed: Future = Future()
    failed.set_exception(ModelNotFoundError("x/y", "/cache", "the model hub cannot be reached"))
    store = IndexStore.open(StoreConfig(tmp_path / "idx"), create=True)
    with pytest.raises(ModelNotFoundError):
        Indexer(store, failed, IndexConfig(batch_size=2), transform=retriever.transform).run([str(tmp_path / "photos")])
    assert store.catalog.counts()["files"] == 0 and store.catalog.model() is None
    store.close()


def test_a_folder_that_cannot_be_read_keeps_what_was_indexed_there(tmp_path, retriever, monkeypatch, capsys):
    """A folder whose listing fails (a permission changed, a network mount's hiccup) was walked past
    silently, so its files looked deleted and were dropped with their vectors, to be embedded again
    later. As root, permissions cannot be taken away here, so the walk's listing fails by a patch."""
    from api.cli import _print_index_summary
    from indexer.pipeline import IndexConfig, Indexer
    from indexer.store import IndexStore, StoreConfig

    make_images(tmp_path / "photos" / "locked", 3, seed=14)
    make_images(tmp_path / "photos" / "open", 2, seed=15)
    locked, listing = str(tmp_path / "photos" / "locked"), os.scandir

    def scandir(path):
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return listing(path)

    store = IndexStore.open(StoreConfig(tmp_path / "idx"), create=True)
    try:
        Indexer(store, retriever, IndexConfig()).run([str(tmp_path / "photos")])
        monkeypatch.setattr(os, "scandir", scandir)
        summary = Indexer(store, retriever, IndexConfig()).run([str(tmp_path / "photos")])
        _print_index_summary(store, summary, with_captions=False, as_json=False)
        assert summary.removed == 0 and summary.unreadable == [locked] and len(store.catalog.files()) == 5
        monkeypatch.undo()
        shutil.rmtree(locked)  # truly gone: removed
        assert Indexer(store, retriever, IndexConfig()).run([str(tmp_path / "photos")]).removed == 3
    finally:
        store.close()
    assert (f"warning: could not read 1 folder(s) or file(s); what was indexed there is kept until they can be "
            f"read: {locked}") in capsys.readouterr().err
    assert_consistent(tmp_path / "idx")


def test_a_root_found_empty_keeps_its_files(tmp_path, tiny_model):
    """An unmounted drive leaves its mount point an empty folder: every file there looked deleted and was
    dropped with its vectors, to be embedded again once the drive is back."""
    make_images(tmp_path / "drive", 2, seed=16)
    make_images(tmp_path / "photos", 1, seed=17)
    idx = tmp_path / "idx"
    index(tmp_path / "drive", idx, tiny_model, str(tmp_path / "photos"))
    saved = tmp_path / "saved"
    shutil.move(tmp_path / "drive", saved)
    (tmp_path / "drive").mkdir()  # the mount point, without its drive
    os.unlink(tmp_path / "photos" / "img0000.jpg")  # deleted from a root that is not empty: removed
    make_images(tmp_path / "photos" / "new", 1, seed=18)
    result = run_cli("index", "--index", str(idx), "--model", str(tiny_model), "--json", "-q", check=True)
    summary = json.loads(result.stdout)
    assert summary["removed"] == 1 and summary["roots_found_empty"] == [str(tmp_path / "drive")]
    assert (f"warning: {tmp_path / 'drive'} is empty, but files were indexed there (an unmounted drive?); they "
            f"are kept: blipsearch forget {tmp_path / 'drive'} removes them") in result.stderr
    os.rmdir(tmp_path / "drive")
    shutil.move(saved, tmp_path / "drive")  # back: nothing to embed again
    assert index(tmp_path / "drive", idx, tiny_model)["unchanged"] == 2
    assert_consistent(idx)


def test_a_run_with_more_files_to_do_than_it_holds_streams_them_in_a_second_pass(tmp_path, retriever, monkeypatch):
    """Past `TODO_HELD` files to do, the first pass only counts them and a second streams them, the
    catalog read a few rows at a time while the run writes: the outcome must be a single pass's."""
    from indexer import compare, pipeline
    from indexer.pipeline import IndexConfig, Indexer
    from indexer.store import IndexStore, StoreConfig

    photos = tmp_path / "photos"
    make_images(photos / "a", 5, seed=20)
    make_images(photos / "b", 4, seed=21)
    (photos / "b" / "broken.jpg").write_bytes(b"not an image")
    stores = {name: IndexStore.open(StoreConfig(tmp_path / name), create=True) for name in ("held", "streamed")}
    passes, totals = [], []

    class Counted(compare.Comparison):
        def __iter__(self):
            passes.append(self)
            return super().__iter__()

    class Totals(pipeline.NoProgress):
        def start(self, total: int) -> None:
            totals.append(total)

    def run(name):
        with monkeypatch.context() as patch:
            if name == "streamed":
                patch.setattr(compare, "TODO_HELD", 2)
                patch.setattr(compare, "PAGE_ROWS", 2)
            patch.setattr(pipeline, "Comparison", Counted)
            passes.clear()
            summary = Indexer(stores[name], retriever, IndexConfig(batch_size=3), Totals()).run([str(photos)])
        return {k: v for k, v in summary.as_dict().items() if k != "seconds"}, len(passes)

    try:
        assert run("held") == (run("streamed")[0], 1)
        make_images(photos / "c", 3, seed=22)  # new
        shutil.rmtree(photos / "b")  # gone, with its broken file
        (photos / "a" / "img0000.jpg").rename(photos / "moved.jpg")  # moved: reuses its vectors
        os.utime(photos / "a" / "img0001.jpg", ns=(1, 1))  # touched, same bytes
        held, streamed = run("held"), run("streamed")
        assert held == (streamed[0], 1) and streamed[1] == 2
        # removed: b's 5 files and the moved file's old path
        assert held[0]["indexed"] == 3 and held[0]["reused"] == 1 and held[0]["removed"] == 6
        assert totals[-2:] == [5, 5]
        catalogs = [{(r.path, r.content_hash, r.status) for r in store.catalog.files()} for store in stores.values()]
        assert catalogs[0] == catalogs[1] and len(catalogs[0]) == 8
    finally:
        for store in stores.values():
            store.close()
    assert_consistent(tmp_path / "held") and assert_consistent(tmp_path / "streamed")
