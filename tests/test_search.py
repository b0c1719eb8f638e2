"""Search against an independent reference: transformers' Blip2ForImageTextRetrieval, image by image."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.pipeline import IndexConfig, Indexer
from indexer.search import Searcher, SearchOptions
from indexer.store import IndexStore, StoreConfig
from retrieval.errors import UsageError
from retrieval.query import TextQuery
from tests.conftest import make_images, run_cli

QUERY = "a red circle on a blue background"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, retriever):
    root = tmp_path_factory.mktemp("search")
    paths = make_images(root / "photos", 40, seed=21)
    store = IndexStore.open(StoreConfig(root / "idx"), create=True)
    Indexer(store, retriever, IndexConfig(batch_size=8)).run([str(root / "photos")])
    yield root, paths, Searcher(store, retriever)
    store.close()


@pytest.fixture(scope="module")
def reference_scores(tiny_model, indexed):
    """ITC logits_per_image and ITM softmax from transformers, one image at a time."""
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    model = Blip2ForImageTextRetrieval.from_pretrained(str(tiny_model)).eval()
    processor = AutoProcessor.from_pretrained(str(tiny_model))
    itc, itm = {}, {}
    for path in indexed[1]:
        inputs = processor(images=Image.open(path).convert("RGB"), text=QUERY, return_tensors="pt")
        with torch.no_grad():
            itc[str(path)] = model(**inputs, use_image_text_matching_head=False).logits_per_image.item()
            logits = model(**inputs, use_image_text_matching_head=True).logits_per_image
            itm[str(path)] = torch.softmax(logits, dim=1)[0, 1].item()
    return itc, itm


def test_itc_ranking_equals_transformers(indexed, reference_scores):
    _, paths, searcher = indexed
    itc, _ = reference_scores
    response = searcher.search_text(TextQuery.parse([QUERY]), SearchOptions(k=len(paths), rerank=False, score="itc"))
    expected = sorted(itc, key=lambda p: -itc[p])
    assert [r.path for r in response.results] == expected
    for result in response.results:
        assert abs(result.itc_score - itc[result.path]) < 1e-5
        assert result.score == result.itc_score and result.itm_score is None and 0 <= result.query_slot < 32


def test_top_k_is_exact_for_every_k(indexed, reference_scores):
    _, _, searcher = indexed
    itc, _ = reference_scores
    expected = sorted(itc, key=lambda p: -itc[p])
    for k in (1, 2, 5, 13):
        response = searcher.search_text(TextQuery.parse([QUERY]), SearchOptions(k=k, rerank=False, score="itc"))
        assert [r.path for r in response.results] == expected[:k]


def test_itm_rerank_equals_transformers_softmax(indexed, reference_scores):
    _, paths, searcher = indexed
    itc, itm = reference_scores
    candidates = 12
    response = searcher.search_text(TextQuery.parse([QUERY]), SearchOptions(k=candidates, candidates=candidates))
    top_itc = sorted(itc, key=lambda p: -itc[p])[:candidates]
    assert {r.path for r in response.results} == set(top_itc)  # ITM re-ranks exactly the ITC candidates
    for result in response.results:
        assert abs(result.itm_score - itm[result.path]) < 1e-5
        assert result.score == result.itm_score
    assert [r.path for r in response.results] == sorted(top_itc, key=lambda p: -itm[p])


def test_itm_plus_itc_score(indexed):
    _, _, searcher = indexed
    response = searcher.search_text(TextQuery.parse([QUERY]), SearchOptions(k=5, score="itm+itc"))
    scores = [r.score for r in response.results]
    assert scores == sorted(scores, reverse=True)
    for r in response.results:
        logit_gap = np.log(r.itm_score / (1 - r.itm_score))  # = l1 - l0, not l1 itself
        assert np.isfinite(logit_gap) and r.score != r.itc_score


def test_a_calibrated_model_reranks_by_its_fusion_unless_told_otherwise(indexed, reference_scores, tiny_model, retriever):
    """With a fusion file, the default score is ITM log-odds + weight x ITC (transformers' logits)."""
    import copy

    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    from retrieval.fusion import Fusion

    root, paths, searcher = indexed
    calibrated = copy.copy(retriever)
    calibrated.fusion = Fusion(3.0)
    fused = Searcher(searcher.store, calibrated).search_text(TextQuery.parse([QUERY]), SearchOptions(k=5, candidates=12))
    model = Blip2ForImageTextRetrieval.from_pretrained(str(tiny_model)).eval()
    processor = AutoProcessor.from_pretrained(str(tiny_model))
    itc, _ = reference_scores
    top = sorted(itc, key=lambda p: -itc[p])[:12]
    expected = {}
    for path in top:
        inputs = processor(images=Image.open(path).convert("RGB"), text=QUERY, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs, use_image_text_matching_head=True).logits_per_image[0]
        expected[path] = float(logits[1] - logits[0]) + 3.0 * itc[path]
    assert [r.path for r in fused.results] == sorted(top, key=lambda p: -expected[p])[:5]
    for result in fused.results:
        assert result.score == pytest.approx(expected[result.path], abs=1e-4)
    told = Searcher(searcher.store, calibrated).search_text(TextQuery.parse([QUERY]), SearchOptions(k=5, score="itm"))
    assert all(r.score == r.itm_score for r in told.results)


@pytest.mark.parametrize("texts, negatives", [
    (["a red circle"], ["a blue square"]),
    (["a red circle", "3:a dog"], []),
    (["0.5:a green triangle", "a yellow background"], ["a black square", "a cat"]),
])
def test_query_arithmetic_equals_brute_force(indexed, retriever, texts, negatives):
    """Weighted sum of text vectors minus the --not vectors, normalised, scored by max-sim."""
    _, paths, searcher = indexed
    query = TextQuery.parse(texts, negatives)
    options = SearchOptions(k=len(paths), rerank=False, score="itc")
    response = searcher.search_text(query, options)
    weights = np.asarray(query.weights, np.float32)[:, None]
    vector = (weights * retriever.encode_texts(list(query.texts))).sum(axis=0)
    if negatives:
        vector = vector - retriever.encode_texts(negatives).sum(axis=0)
    vector /= np.linalg.norm(vector)
    catalog = searcher.store.catalog
    rows = {row.path: row for row in catalog.files()}
    ids, vectors = catalog.vectors([rows[str(p)].embedding_id for p in paths], 32, vector.shape[0])
    best = dict(zip(ids.tolist(), (vectors @ vector).max(axis=1)))
    expected = {str(p): best[rows[str(p)].embedding_id] for p in paths}
    assert [r.path for r in response.results] == sorted(expected, key=lambda p: -expected[p])
    for result in response.results:
        assert abs(result.itc_score - expected[result.path]) < 1e-5
    plain = searcher.search_text(TextQuery.parse(texts[:1]), options)
    assert [r.itc_score for r in plain.results] != [r.itc_score for r in response.results]


def test_query_weights_parse():
    query = TextQuery.parse(["2:a red car", "at night", "ratio 16:9 photo", "-1.5: rain"], ["fog"])
    assert query.texts == ("a red car", "at night", "ratio 16:9 photo", "rain")
    assert query.weights == (2.0, 1.0, 1.0, -1.5)
    assert query.negatives == ("fog",)
    odd = TextQuery.parse(["nan: grandma's garden", "inf:inity pool", "1e999:x", "0.5:a cat"])
    assert odd.texts == ("nan: grandma's garden", "inf:inity pool", "1e999:x", "a cat")
    assert odd.weights == (1.0, 1.0, 1.0, 0.5)


def test_itm_scores_the_positively_weighted_texts():
    query = TextQuery.parse(["2:a red car", "at night", "-1:rain", "0:fog"])
    assert query.itm_texts() == (("a red car", "at night"), (2 / 3, 1 / 3))
    assert TextQuery.parse(["1e308:a", "1e308:b"]).itm_texts() == (("a", "b"), (0.5, 0.5))
    for texts in (["-1:rain"], ["0:fog", "-2:rain"]):
        with pytest.raises(UsageError, match="positive weight"):
            TextQuery.parse(texts)


def test_huge_and_tiny_weights_rank_as_their_ratio(indexed):
    """Weights scale the sum, whose direction alone counts: 1e308 each (inf in float32 products) and
    1e-300 each (0 in float32) rank as 1 each, instead of no results or "the texts cancel out"."""
    _, paths, searcher = indexed
    options = SearchOptions(k=len(paths), candidates=8)
    plain = searcher.search_text(TextQuery.parse(["a red circle", "a dog"]), options)
    for weight in ("1e308", "1e-300"):
        scaled = searcher.search_text(TextQuery.parse([f"{weight}:a red circle", f"{weight}:a dog"]), options)
        assert [r.path for r in scaled.results] == [r.path for r in plain.results]
        assert np.allclose([r.score for r in scaled.results], [r.score for r in plain.results], atol=1e-5)


def test_negatively_weighted_texts_do_not_steer_itm(indexed):
    """ITM judges how well an image matches a text; a text weighted -1 pushes the ITC vector away from
    it but is not scored by ITM, where it would count as a match (or, subtracted, as a negative
    probability)."""
    _, paths, searcher = indexed
    options = SearchOptions(k=8, candidates=8, score="itm")
    alone = searcher.search_text(TextQuery.parse(["a red circle"]), options)
    pushed = searcher.search_text(TextQuery.parse(["2:a red circle", "-1:a dog"]), options)
    itm_alone = {r.path: r.itm_score for r in alone.results}
    shared = [r for r in pushed.results if r.path in itm_alone]
    assert shared and all(abs(r.itm_score - itm_alone[r.path]) < 1e-6 for r in shared)
    assert all(0 <= r.itm_score <= 1 for r in pushed.results)


def test_image_query_excludes_itself(indexed):
    _, paths, searcher = indexed
    response = searcher.search_image(str(paths[3]), SearchOptions(k=5, rerank=False, score="itc"))
    assert len(response.results) == 5 and str(paths[3]) not in [r.path for r in response.results]


def test_images_like_an_indexed_one_from_its_stored_vectors_equal_those_like_its_file(indexed, monkeypatch):
    """`search_similar` (the web page's "More like this") takes the image's vectors from the catalog;
    `search_image` decodes its file and runs the model on it: the same images, the same scores."""
    from dataclasses import replace

    import indexer.search

    _, paths, searcher = indexed
    options = SearchOptions(k=8, path_glob="*img00[0-2]?.jpg")
    by_file = searcher.search_image(str(paths[3]), options)
    row = searcher.store.catalog.files_at([str(paths[3])])[str(paths[3])]
    monkeypatch.setattr(indexer.search, "decode_file", lambda *_: pytest.fail("decoded a file"))
    monkeypatch.setattr(searcher.retriever, "encode_images", lambda *_: pytest.fail("ran the model"), raising=False)
    stored = searcher.search_similar(row, options)
    assert [r.path for r in stored.results] == [r.path for r in by_file.results]
    assert len(stored.results) == 8 and str(paths[3]) not in [r.path for r in stored.results]
    assert [r.score for r in stored.results] == pytest.approx([r.score for r in by_file.results], abs=1e-5)
    with pytest.raises(UsageError, match="was not indexed .corrupt: broken., so it has no vectors to compare"):
        searcher.search_similar(replace(row, status="skipped", embedding_id=None, error="corrupt: broken"), options)


def test_search_by_an_indexed_image_needs_no_model(tiny_model, tmp_path):
    """`search --image` on a file whose content the index holds takes its vectors from the catalog:
    the same results, without loading the model (seconds for the real one). Other files need it."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    paths = make_images(tmp_path / "photos", 6, seed=23)
    common = ["--index", str(tmp_path / "idx"), "-k", "3", "--json"]
    run_cli("index", str(tmp_path / "photos"), "--model", str(model), "-q", *common[:2], check=True)
    loaded = json.loads(run_cli("search", "--image", str(paths[2]), "--model", str(model), *common, check=True).stdout)
    shutil.rmtree(model)  # from here on, loading it is an error
    stored = json.loads(run_cli("search", "--image", str(paths[2]), *common, check=True).stdout)
    assert [r["path"] for r in stored["results"]] == [r["path"] for r in loaded["results"]]
    assert [r["score"] for r in stored["results"]] == pytest.approx([r["score"] for r in loaded["results"]], abs=1e-5)
    shutil.copyfile(paths[2], tmp_path / "a-copy.jpg")  # the same content anywhere: its vectors are known too
    copied = json.loads(run_cli("search", "--image", str(tmp_path / "a-copy.jpg"), *common, check=True).stdout)
    assert copied["results"] == stored["results"]
    Image.new("RGB", (64, 48), (9, 9, 200)).save(paths[2])  # changed since indexing: searched as it is now
    changed = run_cli("search", "--image", str(paths[2]), *common)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr and str(model) in changed.stderr


def test_a_relative_path_glob_is_taken_from_the_current_folder(indexed):
    """The catalog holds absolute paths: --path 'photos/*' matched nothing, silently."""
    from tests.conftest import ROOT

    root, paths, _ = indexed
    relative = os.path.relpath(paths[0].parent, ROOT)  # ../../tmp/...: commands run in the repository
    found = run_cli("search", QUERY, "--index", str(root / "idx"), "-k", "3", "--no-rerank", "--json",
                    "--path", f"{relative}/img000*", check=True)
    assert [os.path.basename(r["path"])[:6] for r in json.loads(found.stdout)["results"]] == ["img000"] * 3
    folder = run_cli("search", QUERY, "--index", str(root / "idx"), "-k", "3", "--no-rerank", "--json",
                     "--path", relative, check=True)  # a folder, no wildcard: the files under it
    assert [os.path.dirname(r["path"]) for r in json.loads(folder.stdout)["results"]] == [str(paths[0].parent)] * 3
    common = ["--index", str(root / "idx"), "--no-rerank"]
    typo = run_cli("search", QUERY, *common, "--path", f"{relative}-typo", check=True)  # says why nothing came
    assert typo.stderr == f"no results: no indexed file is under or matches --path {paths[0].parent}-typo\n"
    strict = run_cli("search", QUERY, *common, "--path", relative, "--min-score", "1000", check=True)
    assert strict.stderr == "no results\n"  # files are there: nothing scored enough


def test_path_filter_and_min_score(indexed):
    _, _, searcher = indexed
    response = searcher.search_text(TextQuery.parse([QUERY]), SearchOptions(k=3, rerank=False, score="itc",
                                                                            path_glob="*img001?.jpg"))
    assert len(response.results) == 3 and all("img001" in r.path for r in response.results)
    high = searcher.search_text(TextQuery.parse([QUERY]), SearchOptions(k=40, rerank=False, score="itc", min_score=2.0))
    assert high.results == []


def test_vanished_file_is_reported_not_a_crash(tmp_path, retriever):
    paths = make_images(tmp_path / "photos", 6, seed=2)
    store = IndexStore.open(StoreConfig(tmp_path / "idx"), create=True)
    try:
        Indexer(store, retriever, IndexConfig()).run([str(tmp_path / "photos")])
        os.unlink(paths[0])
        response = Searcher(store, retriever).search_text(TextQuery.parse([QUERY]), SearchOptions(k=6))
    finally:
        store.close()
    assert response.missing == [str(paths[0])]
    assert len(response.results) == 5 and all(r.itm_score is not None for r in response.results)


def test_a_file_changed_since_indexing_is_named_and_not_scored_as_another(tmp_path, retriever):
    """Re-ranking reads each candidate's file again. An edited or replaced file holds another image: its
    ITM score would be that image's, and the feature cache would keep that image's features under the
    indexed content's hash for every later search. It is left out and named instead; a duplicate that
    still holds the indexed content is scored from that one."""
    import shutil

    from indexer.features import FeatureCache
    from indexer.rerank import Reranker

    paths = make_images(tmp_path / "photos", 6, seed=2)
    duplicate = tmp_path / "photos" / "z-copy-of-1.jpg"  # after it: the file read first for their content
    shutil.copyfile(paths[1], duplicate)
    store = IndexStore.open(StoreConfig(tmp_path / "idx"), create=True)
    try:
        Indexer(store, retriever, IndexConfig()).run([str(tmp_path / "photos")])
        hashes = {row.path: row.content_hash for row in store.catalog.files()}
        query, options = TextQuery.parse([QUERY]), SearchOptions(k=7)
        before = {r.path: r.score for r in Searcher(store, retriever).search_text(query, options).results}
        for path, colour in ((paths[0], (250, 250, 0)), (paths[1], (0, 200, 0))):
            Image.new("RGB", (64, 48), colour).save(path)
        touched = os.stat(paths[2])  # a newer mtime, the same content: not changed
        os.utime(paths[2], ns=(touched.st_atime_ns, touched.st_mtime_ns + 10**9))
        edited, stat = bytearray(paths[3].read_bytes()), os.stat(paths[3])  # the same size and mtime:
        edited[len(edited) // 2] ^= 0xFF  # found by content, when re-ranking reads it
        paths[3].write_bytes(bytes(edited))
        os.utime(paths[3], ns=(stat.st_atime_ns, stat.st_mtime_ns))
        cache = FeatureCache(tmp_path / "features", max_bytes=10**8)
        response = Searcher(store, retriever, Reranker(retriever, cache)).search_text(query, options)
        itc_only = Searcher(store, retriever).search_text(query, SearchOptions(k=7, rerank=False))
    finally:
        store.close()
    assert sorted(response.changed) == [str(paths[0]), str(paths[1]), str(paths[3])] and response.missing == []
    assert sorted(itc_only.changed) == [str(paths[0]), str(paths[1])]  # by their size and mtime, then content
    assert str(paths[2]) in {r.path for r in itc_only.results} and len(itc_only.results) == 5
    after = {r.path: r.score for r in response.results}
    assert set(after) == set(before) - set(response.changed)
    assert after == pytest.approx({path: before[path] for path in after}, abs=1e-6)
    assert cache.get(hashes[str(paths[0])]) is None  # nothing filed under the replaced content's hash
    assert cache.get(hashes[str(duplicate)]) is not None  # the duplicate's own content was


@pytest.mark.parametrize("texts,options", [([""], SearchOptions()), (["ok"], SearchOptions(k=0)),
                                           (["ok"], SearchOptions(k=10**9)), (["ok"], SearchOptions(score="bogus"))])
def test_bad_queries_are_usage_errors(indexed, texts, options):
    _, _, searcher = indexed
    with pytest.raises(UsageError):
        searcher.search_text(TextQuery.parse(texts), options)


def test_cli_json_shape(indexed, tiny_model):
    root = indexed[0]
    result = run_cli("search", QUERY, "--index", str(root / "idx"), "-k", "3", "--json", check=True)
    payload = json.loads(result.stdout)
    assert payload["query"] == QUERY and len(payload["results"]) == 3
    assert set(payload["results"][0]) >= {"path", "score", "itc_score", "itm_score", "query_slot"}
    bad = run_cli("search", "", "--index", str(root / "idx"))
    assert bad.returncode == 2 and "empty" in bad.stderr


@pytest.mark.parametrize("args, message", [
    (["--image", "IMG", "--not", "red"], "--not subtracts texts from a text query; it does not apply to --image"),
    (["--image", "IMG", "--score", "itm"], "--score itm re-ranks a text query by ITM; --image searches by ITC alone"),
    (["a", "--caption-only", "--score", "itm+itc"],
     "--score itm+itc re-ranks a text query by ITM; --caption-only ranks by caption text"),
])
def test_options_that_do_not_apply_are_refused(indexed, args, message):
    """Before, --not was dropped from an image search, and --score itm blamed a --no-rerank never given."""
    root, paths, _ = indexed
    args = [str(paths[0]) if arg == "IMG" else arg for arg in args]
    result = run_cli("search", *args, "--index", str(root / "idx"))
    assert result.returncode == 2 and result.stderr == f"Error: {message}\n"


@pytest.mark.parametrize("args", [["caf\udce9"], [QUERY, "--not", "caf\udce9"], ["caf\udce9", "--caption-only"]])
def test_a_query_that_is_not_utf8_is_one_clear_error(indexed, args):
    """A Latin-1 "café" typed into a UTF-8 terminal: the tokenizer raised a TypeError."""
    result = run_cli("search", *args, "--index", str(indexed[0] / "idx"))
    assert (result.returncode, result.stderr) == \
        (2, "Error: the query text 'caf\\xe9' is not valid UTF-8 (is the terminal's encoding UTF-8?)\n")


@pytest.mark.parametrize("glob", ["{photos}/img001?.jpg", "{photos}/img00[0-2]*", "{photos}/*", "*img003*"])
def test_a_narrow_path_filter_is_scored_exactly_as_faiss_finds_it(indexed, glob, monkeypatch):
    """A --path whose literal start holds few files is served by scoring them exactly; FAISS widening
    its search until enough pass (forced here) must give the same files, scores and slots, and both
    what brute force over the matching files' stored vectors gives."""
    import fnmatch

    from indexer import search

    root, paths, searcher = indexed
    glob = glob.format(photos=paths[0].parent)
    options = SearchOptions(k=7, rerank=False, score="itc", path_glob=glob)
    query = TextQuery.parse([QUERY])

    def found(prefilter_files):
        monkeypatch.setattr(search, "PREFILTER_FILES", prefilter_files)
        return [(r.path, round(r.itc_score, 5), r.query_slot) for r in searcher.search_text(query, options).results]

    exact, widened = found(2000), found(0)
    assert exact == widened and len(exact) == min(7, sum(fnmatch.fnmatch(str(p), glob) for p in paths))
    vector = searcher.retriever.encode_texts([QUERY])[0]
    rows = [r for r in searcher.store.catalog.files() if fnmatch.fnmatch(r.path, glob)]
    _, stored = searcher.store.catalog.vectors([r.embedding_id for r in rows], 32, vector.shape[-1])
    brute = sorted(((float((v @ vector).max()), r.path) for r, v in zip(rows, stored)), reverse=True)[:7]
    assert [path for _, path in brute] == [path for path, _, _ in exact]
