"""`blipsearch eval`: recall over a captioned set, checked against transformers' own scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.evaluate import Pairs, evaluate, recall_at
from tests.conftest import make_images, run_cli


def test_recall_at_counts_the_best_correct_rank():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.1, 0.2, 0.3]])
    # query 0 finds item 0 first; query 1 finds its item 2 last; query 2 has two correct items, one second.
    recalls = recall_at(scores, [{0}, {2}, {0, 1}])
    assert recalls[1] == pytest.approx(1 / 3) and recalls[5] == recalls[10] == 1.0
    assert recall_at(scores, [{2}, {2}, {2}])[1] == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths = make_images(root / "images", 6, seed=71)
    words = ["red", "blue", "green", "dark", "bright", "small"]
    with open(root / "pairs.jsonl", "w") as handle:
        for path, word in zip(paths, words):
            handle.write(json.dumps({"image": f"images/{path.name}", "captions": [f"a {word} circle", f"{word} shapes"]}) + "\n")
    return root / "pairs.jsonl"


def test_recalls_equal_those_of_transformers_scores(retriever, tiny_model, pairs_file):
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    pairs = Pairs.read(pairs_file)
    model = Blip2ForImageTextRetrieval.from_pretrained(str(tiny_model)).eval()
    processor = AutoProcessor.from_pretrained(str(tiny_model))
    itc = np.zeros((len(pairs.texts), len(pairs.images)))
    itm = np.zeros_like(itc)
    for n, path in enumerate(pairs.images):
        image = Image.open(path).convert("RGB")
        for t, text in enumerate(pairs.texts):
            inputs = processor(images=image, text=text, return_tensors="pt")
            with torch.no_grad():
                itc[t, n] = model(**inputs, use_image_text_matching_head=False).logits_per_image.item()
                itm[t, n] = model(**inputs, use_image_text_matching_head=True).logits_per_image[0, 1].item()
    k = 3
    result = evaluate(retriever, pairs, itm_candidates=k)
    images_of = [{int(i)} for i in pairs.text_image]
    texts_of = [set(np.flatnonzero(pairs.text_image == n).tolist()) for n in range(len(pairs.images))]
    assert result["itc"]["text_to_image"] == recall_at(itc, images_of)
    assert result["itc"]["image_to_text"] == recall_at(itc.T, texts_of)

    def reranked(scores, logits):
        out = np.full(scores.shape, -np.inf)
        for q, row in enumerate(scores):
            top = np.argsort(-row, kind="stable")[:k]
            out[q, top] = logits[q, top] + row[top]
        return out

    assert result["itc+itm"]["text_to_image"] == recall_at(reranked(itc, itm), images_of)
    assert result["itc+itm"]["image_to_text"] == recall_at(reranked(itc.T, itm.T), texts_of)


def test_eval_command(tiny_model, pairs_file, tmp_path):
    result = run_cli("eval", "--pairs", str(pairs_file), "--model", str(tiny_model), "--json", check=True)
    body = json.loads(result.stdout)
    assert body["images"] == 6 and body["texts"] == 12
    assert set(body["itc"]["text_to_image"]) == {"1", "5", "10"} and body["ms_per_query"]["itc+itm"] > 0
    (tmp_path / "bad.jsonl").write_text('{"picture": "x.jpg"}\n')
    bad = run_cli("eval", "--pairs", str(tmp_path / "bad.jsonl"), "--model", str(tiny_model))
    assert bad.returncode == 2 and "bad.jsonl:1" in bad.stderr
