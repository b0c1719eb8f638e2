"""`blipsearch eval`: recall over a captioned set, checked against transformers' own scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.evaluate import Pairs, evaluate, recall_at
from tests.conftest import make_images, run_cli
from tests.hostile import png_claiming


def test_recall_at_counts_the_best_correct_rank():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.1, 0.2, 0.3]])
    # query 0 finds item 0 first; query 1 finds its item 2 last; query 2 has two correct items, one second.
    recalls = recall_at(scores, [{0}, {2}, {0, 1}])
    assert recalls[1] == pytest.approx(1 / 3) and recalls[5] == recalls[10] == 1.0
    assert recall_at(scores, [{2}, {2}, {2}])[1] == pytest.approx(1 / 3)


@pytest.mark.parametrize("line, problem", [
    ('{"image": "a.jpg", "captions": ["x"]', "not JSON (Expecting ',' delimiter at column 37)"),
    ('[{"image": "a.jpg", "captions": ["x"]}]', "not a JSON object"),
    ('{"image": 5, "captions": ["x"]}', '"image" is not a path'),
    ('{"image": "a.jpg", "captions": "a red car"}', '"captions" is a string, not a list of them'),
    ('{"image": "a.jpg", "captions": []}', '"captions" is not a list of texts'),
    ('{"image": "a.jpg", "captions": ["x", ""]}', '"captions" is not a list of texts'),
    ('{"image": "a.jpg", "caption": 5}', '"captions" is not a list of texts'),
])
def test_a_malformed_pair_is_named_with_its_line(tmp_path, line, problem):
    """Before, a string of captions was read as its characters, and a number as the image a traceback."""
    from retrieval.errors import UsageError

    (tmp_path / "pairs.jsonl").write_text('{"image": "b.jpg", "caption": "fine"}\n\n' + line + "\n")
    with pytest.raises(UsageError) as raised:
        Pairs.read(tmp_path / "pairs.jsonl")
    assert str(raised.value).startswith(f"{tmp_path / 'pairs.jsonl'}:3: {problem}; expected ")
    (tmp_path / "latin1.jsonl").write_bytes('{"image": "caf\xe9.jpg", "caption": "x"}'.encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8 text"):
        Pairs.read(tmp_path / "latin1.jsonl")


def test_an_image_on_several_lines_gets_all_their_captions(tmp_path):
    lines = [{"image": "a.jpg", "caption": "one"}, {"image": "b.jpg", "captions": ["two"]},
             {"image": "./a.jpg", "captions": ["three", "four"]}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    pairs = Pairs.read(tmp_path / "pairs.jsonl")
    assert pairs.images == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    assert pairs.texts == ["one", "two", "three", "four"] and pairs.text_image.tolist() == [0, 1, 0, 0]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths = make_images(root / "images", 6, seed=71)
    words = ["red", "blue", "green", "dark", "bright", "small"]
    with open(root / "pairs.jsonl", "w") as handle:
        for path, word in zip(paths, words):
            handle.write(json.dumps({"image": f"images/{path.name}", "captions": [f"a {word} circle", f"{word} shapes"]}) + "\n")
    return root / "pairs.jsonl"


@pytest.fixture(scope="module")
def transformers_scores(tiny_model, pairs_file):
    """(texts, images) ITC scores and (texts, images, 2) ITM logits from transformers, pair by pair."""
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    pairs = Pairs.read(pairs_file)
    model = Blip2ForImageTextRetrieval.from_pretrained(str(tiny_model)).eval()
    processor = AutoProcessor.from_pretrained(str(tiny_model))
    itc = np.zeros((len(pairs.texts), len(pairs.images)))
    itm = np.zeros((*itc.shape, 2))
    for n, path in enumerate(pairs.images):
        image = Image.open(path).convert("RGB")
        for t, text in enumerate(pairs.texts):
            inputs = processor(images=image, text=text, return_tensors="pt")
            with torch.no_grad():
                itc[t, n] = model(**inputs, use_image_text_matching_head=False).logits_per_image.item()
                itm[t, n] = model(**inputs, use_image_text_matching_head=True).logits_per_image[0].numpy()
    return pairs, itc, itm


def _reranked(scores, fused, k):
    """Each query's top k by ITC scored `fused[q, item]`; the rest below them all."""
    out = np.full(scores.shape, -np.inf)
    for q, row in enumerate(scores):
        top = np.argsort(-row, kind="stable")[:k]
        out[q, top] = fused[q, top]
    return out


def _answers(pairs):
    return ([{int(i)} for i in pairs.text_image],
            [set(np.flatnonzero(pairs.text_image == n).tolist()) for n in range(len(pairs.images))])


def test_recalls_equal_those_of_transformers_scores(retriever, transformers_scores):
    pairs, itc, itm = transformers_scores
    k = 3
    result = evaluate(retriever, pairs, itm_candidates=k)
    images_of, texts_of = _answers(pairs)
    assert result["itc"]["text_to_image"] == recall_at(itc, images_of)
    assert result["itc"]["image_to_text"] == recall_at(itc.T, texts_of)
    lavis = itm[..., 1] + itc  # LAVIS: positive ITM logit + ITC, the rule of a model without a fusion file
    assert result["fusion"] == "ITM logit + ITC (LAVIS)"
    assert result["itc+itm"]["text_to_image"] == recall_at(_reranked(itc, lavis, k), images_of)
    assert result["itc+itm"]["image_to_text"] == recall_at(_reranked(itc.T, lavis.T, k), texts_of)


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    import shutil

    return shutil.copytree(tiny_model, tmp_path / "model")


def test_a_calibrated_model_reranks_by_its_weight(model_copy, transformers_scores):
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever
    from retrieval.fusion import FUSION_FILE

    (model_copy / FUSION_FILE).write_text('{"itc_weight": 3.0}')
    retriever = Blip2Retriever.load(ModelConfig(name=str(model_copy), device="cpu"))
    pairs, itc, itm = transformers_scores
    result = evaluate(retriever, pairs, itm_candidates=4)
    fused = itm[..., 1] - itm[..., 0] + 3.0 * itc
    images_of, texts_of = _answers(pairs)
    lavis = recall_at(_reranked(itc.T, itm[..., 1].T + itc.T, 4), texts_of)
    assert recall_at(_reranked(itc.T, fused.T, 4), texts_of) != lavis  # so the rule is told apart
    assert result["fusion"] == "ITM log-odds + 3 x ITC (calibrated)"
    assert result["itc+itm"]["text_to_image"] == recall_at(_reranked(itc, fused, 4), images_of)
    assert result["itc+itm"]["image_to_text"] == recall_at(_reranked(itc.T, fused.T, 4), texts_of)


def test_calibrate_command_measures_each_weight_and_stores_the_best(model_copy, pairs_file, transformers_scores):
    from retrieval.fusion import FUSION_FILE, read_fusion

    result = run_cli("calibrate", "--pairs", str(pairs_file), "--model", str(model_copy), "--itm-candidates", "3",
                     "--json", check=True)
    body = json.loads(result.stdout)
    pairs, itc, itm = transformers_scores
    images_of, texts_of = _answers(pairs)
    for weight, t2i, i2t in zip(body["weights"], body["text_to_image"], body["image_to_text"]):
        fused = itm[..., 1] - itm[..., 0] + weight * itc
        assert t2i == pytest.approx(recall_at(_reranked(itc, fused, 3), images_of)[1])
        assert i2t == pytest.approx(recall_at(_reranked(itc.T, fused.T, 3), texts_of)[1])
    assert body["file"] == str(model_copy / FUSION_FILE)
    assert read_fusion(str(model_copy)).itc_weight == body["chosen"] in body["weights"]
    again = run_cli("eval", "--pairs", str(pairs_file), "--model", str(model_copy), check=True)
    assert f"ITM log-odds + {body['chosen']:g} x ITC (calibrated)" in again.stdout


def test_calibrate_replaces_an_unreadable_fusion_file(model_copy, pairs_file):
    from retrieval.fusion import FUSION_FILE, read_fusion

    (model_copy / FUSION_FILE).write_text("not json")
    broken = run_cli("eval", "--pairs", str(pairs_file), "--model", str(model_copy))
    assert broken.returncode == 2 and FUSION_FILE in broken.stderr and "Traceback" not in broken.stderr
    run_cli("calibrate", "--pairs", str(pairs_file), "--model", str(model_copy), check=True)
    assert read_fusion(str(model_copy)).calibrated


def test_calibrate_needs_a_model_directory(pairs_file):
    result = run_cli("calibrate", "--pairs", str(pairs_file), "--model", "Salesforce/blip2-itm-vit-g")
    assert result.returncode == 2 and "--local-dir DIR" in result.stderr and "Traceback" not in result.stderr


def test_eval_command(tiny_model, pairs_file, tmp_path):
    result = run_cli("eval", "--pairs", str(pairs_file), "--model", str(tiny_model), "--json", check=True)
    body = json.loads(result.stdout)
    assert body["images"] == 6 and body["texts"] == 12
    assert set(body["itc"]["text_to_image"]) == {"1", "5", "10"} and body["ms_per_query"]["itc+itm"] > 0
    (tmp_path / "bad.jsonl").write_text('{"picture": "x.jpg"}\n')
    bad = run_cli("eval", "--pairs", str(tmp_path / "bad.jsonl"), "--model", str(tiny_model))
    assert bad.returncode == 2 and "bad.jsonl:1" in bad.stderr
    (tmp_path / "bomb.png").write_bytes(png_claiming(30_000, 30_000))  # decoded in this process: limited
    (tmp_path / "bomb.jsonl").write_text('{"image": "bomb.png", "caption": "grey"}\n')
    bomb = run_cli("eval", "--pairs", str(tmp_path / "bomb.jsonl"), "--model", str(tiny_model))
    assert (bomb.returncode, bomb.stderr) == (2, f"Error: {tmp_path / 'bomb.png'}: cannot evaluate on this image "
                                                 "(too-large: 30000x30000 is over the 100 MP eval decodes)\n")


def test_calibrate_keeps_the_stored_weight_when_the_pairs_cannot_choose(model_copy, pairs_file, tmp_path):
    """One pair ranks every weight the same: storing the smallest weight (ITM alone) would replace a
    good calibration with the worst guess."""
    from retrieval.fusion import FUSION_FILE

    first = json.loads(pairs_file.read_text().splitlines()[0])
    first["image"] = str((pairs_file.parent / first["image"]).resolve())
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({**first, "captions": first["captions"][:1]}) + "\n")
    (model_copy / FUSION_FILE).write_text('{"itc_weight": 60.0}')
    result = run_cli("calibrate", "--pairs", str(one), "--model", str(model_copy))
    assert result.returncode == 2 and "every weight ranks these 1 texts and 1 images the same" in result.stderr
    assert (model_copy / FUSION_FILE).read_text() == '{"itc_weight": 60.0}'
