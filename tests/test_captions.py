"""`blipsearch caption`, `index --caption`, caption search (alone and hybrid) and caption export."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from indexer.search import RRF_K, SearchOptions, Searcher, search_captions
from indexer.store import IndexStore, StoreConfig
from retrieval.captioner import CaptionOptions
from retrieval.query import TextQuery
from tests.conftest import ROOT, children, make_images, run_cli, wait_gone


def index(folder, idx, model, *extra):
    return run_cli("index", str(folder), "--index", str(idx), "--model", str(model), "-q", "--json", *extra,
                   check=True)


def caption(idx, model, *extra):
    result = run_cli("caption", "--index", str(idx), "--caption-model", str(model), "--json", "-q",
                     "--max-new-tokens", "6", *extra, check=True)
    return json.loads(result.stdout)


def stored_captions(idx) -> dict[str, tuple[str, str, float]]:
    """path -> (caption, prompt, created_at), read straight from SQLite."""
    with sqlite3.connect(idx / "catalog.sqlite") as conn:
        rows = conn.execute(
            "SELECT f.path, c.caption, c.prompt, c.created_at FROM files f JOIN captions c ON c.embedding_id = f.embedding_id"
        ).fetchall()
    return {path: (text, prompt, created) for path, text, prompt, created in rows}


def test_a_prompt_that_is_not_utf8_is_one_clear_error(tmp_path, tiny_model, caption_model):
    """A Latin-1 prompt from a UTF-8 terminal: the tokenizer raised a TypeError."""
    make_images(tmp_path / "photos", 1, seed=30)
    index(tmp_path / "photos", tmp_path / "idx", tiny_model)
    result = run_cli("caption", "--index", str(tmp_path / "idx"), "--caption-model", str(caption_model),
                     "--prompt", "caf\udce9")
    assert (result.returncode, result.stderr) == \
        (2, "Error: --prompt 'caf\\xe9' is not valid UTF-8 text without NUL characters\n")


def test_caption_command_stores_what_the_captioner_writes(tmp_path, tiny_model, caption_model, captioner):
    paths = make_images(tmp_path / "photos", 7, seed=31)
    index(tmp_path / "photos", tmp_path / "idx", tiny_model)
    (tmp_path / "photos" / "img0006.jpg").unlink()  # vanished since indexing
    # Replaced since indexing: its caption would be filed under the content it was indexed with.
    Image.new("RGB", (40, 30), (0, 90, 0)).save(paths[5])
    summary = caption(tmp_path / "idx", caption_model, "--batch-size", "4")
    assert (summary["captioned"], summary["missing"], summary["changed"]) == (5, 1, 1)
    assert summary["changed_files"] == [str(paths[5])] and summary["failed"] == 0
    stored = stored_captions(tmp_path / "idx")
    pixels = np.stack([captioner.transform(Image.open(p).convert("RGB")) for p in paths[:5]])
    expected = captioner.caption(pixels, CaptionOptions(max_new_tokens=6))
    assert {str(p): stored[str(p)][0] for p in paths[:5]} == dict(zip(map(str, paths[:5]), expected))
    assert str(paths[5]) not in stored
    assert caption(tmp_path / "idx", caption_model)["captioned"] == 0  # incremental: nothing left
    # Another prompt: only with --overwrite, and then for every image.
    assert caption(tmp_path / "idx", caption_model, "--prompt", "a photo of")["captioned"] == 0
    assert caption(tmp_path / "idx", caption_model, "--prompt", "a photo of", "--overwrite")["captioned"] == 5
    assert {v[1] for v in stored_captions(tmp_path / "idx").values()} == {"a photo of"}
    for path in paths[:4]:  # many gone: a few named and a count, as search does, not a line each
        path.unlink()
    run = run_cli("caption", "--index", str(tmp_path / "idx"), "--caption-model", str(caption_model), "-q",
                  "--max-new-tokens", "6", "--overwrite", check=True)
    told = run.stderr.splitlines()
    assert "warning: and 2 more gone from disk" in told
    assert len([line for line in told if line.endswith("is gone from disk; not captioned")]) == 3
    assert any("blipsearch forget FOLDER" in line for line in told)
    assert f"warning: {paths[5]} has changed since it was indexed; not captioned" in told
    assert "(blipsearch index FOLDER reads changed files again)" in told
    assert run.stdout.startswith("captioned 1, missing 5, changed 1, failed 0 in ")


def test_index_caption_equals_caption_command(tmp_path, tiny_model, caption_model):
    make_images(tmp_path / "photos", 5, seed=32)
    summary = json.loads(index(tmp_path / "photos", tmp_path / "a", tiny_model, "--caption", "--caption-model",
                               str(caption_model), "--max-new-tokens", "6").stdout)
    assert summary["captioned"] == 5
    index(tmp_path / "photos", tmp_path / "b", tiny_model)
    caption(tmp_path / "b", caption_model)
    with_index = {p: v[0] for p, v in stored_captions(tmp_path / "a").items()}
    afterwards = {p: v[0] for p, v in stored_captions(tmp_path / "b").items()}
    assert with_index == afterwards and len(with_index) == 5


def test_kill_dash_nine_while_captioning_then_resume(tmp_path, tiny_model, caption_model):
    make_images(tmp_path / "photos", 60, seed=33)
    index(tmp_path / "photos", tmp_path / "idx", tiny_model)
    idx = tmp_path / "idx"
    command = [sys.executable, "-m", "api.cli", "caption", "--index", str(idx), "--caption-model", str(caption_model),
               "--batch-size", "2", "--workers", "1", "--max-new-tokens", "40", "-q", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(stored_captions(idx)) < 6 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "captioning finished before it could be killed"
    workers = children(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert workers and wait_gone(workers) == [], "decode workers outlived their killed run"
    before = stored_captions(idx)
    assert 0 < len(before) < 60
    final = run_cli(*command[3:], check=True, timeout=300)  # the same command, forked from the warm parent
    assert json.loads(final.stdout)["captioned"] == 60 - len(before)  # no finished batch again
    after = stored_captions(idx)
    assert len(after) == 60
    assert all(after[path] == before[path] for path in before)  # untouched, same timestamps
    with sqlite3.connect(idx / "catalog.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM captions").fetchone()[0] == 60


@pytest.fixture
def captioned(tmp_path, retriever):
    """An index whose captions are set by hand, so full-text matches are known."""
    make_images(tmp_path / "photos", 12, seed=34)
    store = IndexStore.open(StoreConfig(tmp_path / "idx"), create=True)
    from indexer.pipeline import IndexConfig, Indexer

    Indexer(store, retriever, IndexConfig(batch_size=4)).run([str(tmp_path / "photos")])
    yield store, Searcher(store, retriever)
    store.close()


def set_captions(store, texts: dict[str, str]) -> None:
    rows = {r.path: r.embedding_id for r in store.catalog.files()}
    store.catalog.captions.write({rows[p]: t for p, t in texts.items()}, "by-hand", "")


def test_caption_only_search_ranks_by_relevance(captioned):
    store, _ = captioned
    paths = sorted(r.path for r in store.catalog.files())
    set_captions(store, {paths[0]: "a zebra on a road", paths[1]: "a zebra and a giraffe in a zebra herd",
                         paths[2]: "a cat on a sofa"})
    response = search_captions(store.catalog, "zebra giraffe", SearchOptions(k=5, rerank=False, score="itc"))
    assert [r.path for r in response.results] == [paths[1], paths[0]]
    assert response.results[0].caption == "a zebra and a giraffe in a zebra herd"
    assert response.results[0].score > response.results[1].score and response.results[0].itc_score is None


def test_hybrid_fuses_ranks_as_documented(captioned):
    store, searcher = captioned
    query = TextQuery.parse(["a red circle"])
    visual = searcher.search_text(query, SearchOptions(k=12, candidates=12, score="itm"))
    last = visual.results[-1].path
    set_captions(store, {last: "a red circle", visual.results[0].path: "a blue square"})
    hybrid = searcher.search_text(query, SearchOptions(k=12, candidates=12, score="itm", hybrid=True))
    visual_rank = {r.path: i for i, r in enumerate(visual.results, 1)}
    for result in hybrid.results:
        expected = 1 / (RRF_K + visual_rank[result.path])
        if result.caption_rank:
            expected += 1 / (RRF_K + result.caption_rank)
        assert result.score == pytest.approx(expected)
    assert [r.path for r in hybrid.results].index(last) < len(visual.results) - 1  # the caption lifted it
    assert next(r for r in hybrid.results if r.path == last).caption == "a red circle"


def test_hybrid_matches_captions_of_the_positive_texts_only(captioned):
    """A text weighted -1 is one to get away from: captions naming it must not lift an image."""
    store, searcher = captioned
    paths = sorted(r.path for r in store.catalog.files())
    set_captions(store, {paths[0]: "zebra herd", paths[1]: "red circle"})
    query = TextQuery.parse(["red circle", "-1:zebra"])
    hybrid = searcher.search_text(query, SearchOptions(k=12, candidates=12, score="itm", hybrid=True))
    ranked = {r.path: r.caption_rank for r in hybrid.results}
    assert ranked[paths[1]] == 1 and ranked.get(paths[0]) is None


def test_captions_in_search_output_and_every_export_format(tmp_path, tiny_model, caption_model):
    make_images(tmp_path / "photos", 4, seed=35)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not an image")
    index(tmp_path / "photos", tmp_path / "idx", tiny_model)
    caption(tmp_path / "idx", caption_model, "--prompt", "a photo of")
    common = ["--index", str(tmp_path / "idx")]
    found = json.loads(run_cli("search", "a red circle", "--model", str(tiny_model), "--json", *common,
                               check=True).stdout)
    stored = stored_captions(tmp_path / "idx")
    assert all(r["caption"] == stored[r["path"]][0] for r in found["results"])
    rows = [json.loads(line) for line in run_cli("export", *common, check=True).stdout.splitlines()]
    by_path = {r["path"]: r for r in rows}
    assert by_path[str(tmp_path / "photos" / "broken.jpg")]["caption"] is None
    for path, (text, prompt, created) in stored.items():
        assert (by_path[path]["caption"], by_path[path]["caption_prompt"]) == (text, prompt)
        assert by_path[path]["caption_model"] == str(caption_model) and by_path[path]["captioned_at"] == created
    table = list(csv.DictReader(io.StringIO(run_cli("export", "--format", "csv", *common, check=True).stdout)))
    assert {r["path"]: r["caption"] for r in table if r["status"] == "indexed"} == {p: v[0] for p, v in stored.items()}
    import pyarrow.parquet as pq

    run_cli("export", "--format", "parquet", "-o", str(tmp_path / "c.parquet"), *common, check=True)
    parquet = pq.read_table(tmp_path / "c.parquet").to_pylist()
    assert [{k: r[k] for k in ("path", "caption", "caption_prompt")} for r in parquet] == \
        [{k: r[k] for k in ("path", "caption", "caption_prompt")} for r in rows]
    assert run_cli("export", "--format", "parquet", *common).returncode == 2  # needs -o
    for fmt in ("csv", "parquet"):
        nowhere = run_cli("export", "--format", fmt, "-o", str(tmp_path / "no" / f"c.{fmt}"), *common)
        assert nowhere.returncode == 2 and "Traceback" not in nowhere.stderr
        assert f"cannot write {tmp_path / 'no' / f'c.{fmt}'}: No such file or directory" in nowhere.stderr


def test_missing_caption_model_is_one_clear_sentence(tmp_path, tiny_model):
    make_images(tmp_path / "photos", 2, seed=36)
    index(tmp_path / "photos", tmp_path / "idx", tiny_model)
    result = run_cli("caption", "--index", str(tmp_path / "idx"), "--caption-model", str(tmp_path / "no-such-model"))
    assert result.returncode == 2
    assert result.stderr.startswith("Error: model") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3
    # the option that names it, not --model
    assert "--caption-model DIR" in result.stderr and "--model" not in result.stderr.replace("--caption-model", "")
    bad = run_cli("caption", "--index", str(tmp_path / "idx"), "--caption-model", str(tmp_path), "--num-beams", "0")
    assert bad.returncode == 2 and "--num-beams" in bad.stderr
