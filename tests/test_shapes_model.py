"""The small BLIP-2 that ships in retrieval/checkpoints: standard checkpoints, and it works on scenes
it never saw, some with colour-shape pairs absent from all its training images. The thresholds are
regression guards a little under the measured quality (benchmarks/RESULTS.md has the full numbers)."""

from __future__ import annotations

import re

import pytest

from retrieval.checkpoints import SHAPES_CAPTION, SHAPES_RETRIEVAL
from tests.conftest import run_cli

# Measured on the 500 scenes `blipsearch train` evaluates on: ITC R@1 0.952; after ITM re-ranking by the
# fusion calibrated on the validation split, 0.958 (by LAVIS's rule, 0.846).
ITC_R1_GUARD, ITM_R1_GUARD = 0.92, 0.9
# Measured on 120 other held-out scenes: captions exact 0.600, the best of 16 by ITC 0.758; the demo: 40 of 40.
CAPTION_GUARD, BEST_OF_16_GUARD, DEMO_GUARD = 0.55, 0.72, 36


def test_shipped_checkpoints_are_plain_transformers_checkpoints():
    import json

    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    for directory, cls in ((SHAPES_RETRIEVAL, Blip2ForImageTextRetrieval), (SHAPES_CAPTION, Blip2ForConditionalGeneration)):
        assert json.loads((directory / "config.json").read_text())["architectures"] == [cls.__name__]
        model = cls.from_pretrained(directory)
        assert model.config.num_query_tokens == 32
    size = sum(f.stat().st_size for d in (SHAPES_RETRIEVAL, SHAPES_CAPTION) for f in d.iterdir())
    assert size < 12_000_000, size  # "a few MB" in the repository


@pytest.fixture(scope="module")
def train_test_split(tmp_path_factory):
    """The held-out split `blipsearch train` writes and reports on (seed 0 + 1), so RESULTS' numbers."""
    from indexer.evaluate import Pairs
    from indexer.synthetic import make_dataset

    _, test = make_dataset(tmp_path_factory.mktemp("train-test"), 0, 500, seed=1)
    return Pairs.read(test)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from indexer.evaluate import Pairs
    from indexer.synthetic import make_dataset

    _, test = make_dataset(tmp_path_factory.mktemp("held-out"), 0, 120, seed=77)
    return Pairs.read(test)


def test_shipped_model_ranks_held_out_scenes_and_itm_reranking_improves_on_itc(train_test_split):
    """The issue's targets, on the split `train` reports: R@1 after ITM re-ranking at least 0.9 and
    above ITC's, with the fusion `train` calibrated on its validation split (another seed)."""
    from indexer.evaluate import evaluate
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    retriever = Blip2Retriever.load(ModelConfig(name=str(SHAPES_RETRIEVAL), device="cpu"))
    assert retriever.fusion.calibrated  # blipsearch_fusion.json ships beside the checkpoint
    result = evaluate(retriever, train_test_split)
    itc, itm = result["itc"]["text_to_image"], result["itc+itm"]["text_to_image"]
    assert itc[1] >= ITC_R1_GUARD and itm[1] >= ITM_R1_GUARD and itm[1] > itc[1], result
    assert result["itc+itm"]["image_to_text"][1] > result["itc"]["image_to_text"][1], result
    assert itc[5] >= 0.95 and itm[5] >= 0.95, result


@pytest.fixture(scope="module")
def captioner():
    from retrieval.captioner import Blip2Captioner
    from retrieval.config import ModelConfig

    return Blip2Captioner.load(ModelConfig(name=str(SHAPES_CAPTION), device="cpu"))


def test_shipped_captioner_names_colours_and_shapes(captioner, held_out):
    from indexer.evaluate import evaluate_captions
    from indexer.synthetic import colour_shapes

    result = evaluate_captions(captioner, held_out, colour_shapes)
    assert result["exact"] >= CAPTION_GUARD, result


def test_captions_chosen_by_itc_beat_the_captioners_first_choice(captioner, held_out):
    from indexer.evaluate import evaluate_captions
    from indexer.synthetic import colour_shapes
    from retrieval.best_caption import BestOfCaptions
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    retriever = Blip2Retriever.load(ModelConfig(name=str(SHAPES_RETRIEVAL), device="cpu"))
    first = evaluate_captions(captioner, held_out, colour_shapes)["exact"]
    best = evaluate_captions(BestOfCaptions(captioner, retriever, 16), held_out, colour_shapes)["exact"]
    assert best >= BEST_OF_16_GUARD and best > first, (best, first)


def test_demo_indexes_captions_and_finds_described_images(tmp_path):
    result = run_cli("demo", "--dir", str(tmp_path), check=True, timeout=600)
    assert "indexed 40, captioned 40" in result.stderr
    found = re.search(r"came first for (\d+) of 40", result.stdout)
    assert found and int(found.group(1)) >= DEMO_GUARD, result.stdout
    assert result.stdout.count("caption: '") >= 4  # every printed result shows its stored caption
    again = run_cli("demo", "--dir", str(tmp_path), check=True, timeout=600)  # a re-run reuses the index
    assert "indexed 0, captioned 0, unchanged 40" in again.stderr



def test_demo_with_a_model_of_other_image_size_captions_first_choices(tmp_path, tiny_model):
    """The tiny model reads 224 px, the shipped captioner 64 px: ITC cannot choose among the captions,
    and the demo stopped, telling the user to leave out a --candidates they never gave."""
    result = run_cli("demo", "--dir", str(tmp_path), "--model", str(tiny_model), check=True, timeout=600)
    assert "indexed 40, captioned 40" in result.stderr
    assert "note: captions are the caption model's first choices" in result.stderr
