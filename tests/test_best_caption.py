"""Captions chosen among the beam search's candidates by ITC: the candidates against transformers' own
`generate`, the choice against transformers' own ITC scores, and the CLI's `--candidates`."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.best_caption import BestOfCaptions
from retrieval.captioner import CaptionOptions
from retrieval.errors import UsageError
from tests.conftest import make_images, run_cli

COUNT = 4


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return [Image.open(p).convert("RGB") for p in make_images(tmp_path_factory.mktemp("best"), 5, seed=41)]


@pytest.mark.parametrize("options", [CaptionOptions(max_new_tokens=6), CaptionOptions(prompt="a photo of", max_new_tokens=5)])
def test_candidates_are_the_beam_searchs_best(captioner, caption_model, images, options):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(str(caption_model)).eval()
    processor = AutoProcessor.from_pretrained(str(caption_model))
    pixels = np.stack([captioner.transform(im) for im in images])
    ours = captioner.caption_candidates(pixels, options, COUNT)
    assert ours[0][0] == captioner.caption(pixels[:1], replace(options, num_beams=COUNT))[0]
    for image, candidates in zip(images, ours):
        inputs = processor(images=image, text=options.prompt or None, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=options.max_new_tokens, num_beams=COUNT,
                                       num_return_sequences=COUNT, do_sample=False)
        if options.prompt:
            generated = generated[:, inputs["input_ids"].shape[1]:]
        assert candidates == [t.strip() for t in processor.batch_decode(generated, skip_special_tokens=True)]


@pytest.mark.parametrize("prompt", ["", "a photo of"])
def test_keeps_the_candidate_transformers_itc_ranks_first(captioner, retriever, tiny_model, images, prompt):
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    model = Blip2ForImageTextRetrieval.from_pretrained(str(tiny_model)).eval()
    processor = AutoProcessor.from_pretrained(str(tiny_model))
    options = CaptionOptions(prompt=prompt, max_new_tokens=6)
    pixels = np.stack([captioner.transform(im) for im in images])
    candidates = captioner.caption_candidates(pixels, options, COUNT)
    chosen = BestOfCaptions(captioner, retriever, COUNT).caption(pixels, options)
    for image, texts, kept in zip(images, candidates, chosen):
        inputs = processor(images=image, text=[f"{prompt} {t}".strip() for t in texts], return_tensors="pt", padding=True)
        with torch.no_grad():
            itc = model(**inputs, use_image_text_matching_head=False).logits_per_image.numpy().ravel()
        assert kept == texts[int(itc.argmax())]
    # the choice is not always the beam search's own first: otherwise this test could not tell
    assert any(kept != texts[0] for texts, kept in zip(candidates, chosen))


def test_needs_models_that_prepare_images_alike(captioner, retriever):
    other = SimpleNamespace(name="other", transform=replace(captioner.transform, height=99, width=99))
    with pytest.raises(UsageError, match="prepares images as the caption model"):
        BestOfCaptions(other, retriever, COUNT)


def _stored(idx) -> dict[str, tuple[str, str]]:
    with sqlite3.connect(idx / "catalog.sqlite") as conn:
        return dict(conn.execute("SELECT f.path, c.caption || ' | ' || c.model FROM files f "
                                 "JOIN captions c ON c.embedding_id = f.embedding_id"))


def test_caption_command_and_index_caption_with_candidates(tmp_path, tiny_model, caption_model):
    make_images(tmp_path / "photos", 4, seed=42)
    index = ("index", str(tmp_path / "photos"), "--model", str(tiny_model), "-q")
    run_cli(*index, "--index", str(tmp_path / "a"), check=True)
    common = ("caption", "--index", str(tmp_path / "a"), "--caption-model", str(caption_model), "--max-new-tokens", "6")
    summary = json.loads(run_cli(*common, "--candidates", "3", "--json", "-q", check=True).stdout)
    assert summary["captioned"] == 4
    stored = _stored(tmp_path / "a")  # the index's own retrieval model chose
    assert {v.split(" | ")[1] for v in stored.values()} == {f"{caption_model} (best of 3 by {tiny_model})"}
    run_cli(*index, "--index", str(tmp_path / "b"), "--caption", "--caption-model", str(caption_model),
            "--max-new-tokens", "6", "--candidates", "3", check=True)
    assert _stored(tmp_path / "b") == stored  # while indexing: the same captions, the same record
    for bad, message in (("0", "--candidates must be between 1 and 16"), ("17", "--candidates must be between 1 and 16")):
        result = run_cli(*common, "--candidates", bad)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    result = run_cli(*index, "--index", str(tmp_path / "c"), "--candidates", "3")
    assert result.returncode == 2 and "add --caption" in result.stderr
