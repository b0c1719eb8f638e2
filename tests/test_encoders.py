"""The stage-wise encoders against transformers' own Blip2ForImageTextRetrieval, on a tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_images

TEXTS = ["a red circle", "two dogs on the beach near a large tree", "a photo of a blue car at night"]


@pytest.fixture(scope="module")
def reference(tiny_model):
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    model = Blip2ForImageTextRetrieval.from_pretrained(str(tiny_model)).eval()
    return model, AutoProcessor.from_pretrained(str(tiny_model))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in make_images(tmp_path_factory.mktemp("enc"), 4, seed=3)]


def test_transform_matches_processor(retriever, reference, images):
    _, processor = reference
    expected = processor(images=images, return_tensors="np")["pixel_values"]
    mine = np.stack([retriever.transform(im) for im in images])
    np.testing.assert_allclose(mine, expected, atol=1e-5)


def test_shapes_and_normalisation(retriever, images):
    pixels = np.stack([retriever.transform(im) for im in images])
    encoding = retriever.encode_images(pixels, keep_vit=True)
    assert encoding.query_embeds.shape == (4, 32, 16)
    np.testing.assert_allclose(np.linalg.norm(encoding.query_embeds, axis=-1), 1.0, atol=1e-5)
    texts = retriever.encode_texts(TEXTS)
    assert texts.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=-1), 1.0, atol=1e-5)
    assert encoding.vit_features.shape[:2] == (4, 257)
    # The 32 queries must not collapse into one vector, or max-sim would mean nothing.
    assert encoding.query_embeds.std(axis=1).mean() > 0.01


def test_half_precision_vectors_are_unit_vectors(tiny_model, images):
    """On a GPU the model runs in fp16; normalised in fp16, vectors came out up to 6e-4 off unit length
    (the index refuses 1e-3, and its exact-search bounds assume unit vectors). fp16 on the CPU here."""
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    half = Blip2Retriever.load(ModelConfig(name=str(tiny_model), device="cpu", dtype="float16"))
    pixels = np.stack([half.transform(im) for im in images] * 4)
    vectors = np.concatenate([half.encode_images(pixels).query_embeds.reshape(-1, 16), half.encode_texts(TEXTS)])
    assert vectors.dtype == np.float32 and np.abs(np.linalg.norm(vectors, axis=-1) - 1).max() < 1e-6


def test_itc_max_sim_equals_transformers(retriever, reference, images):
    model, processor = reference
    pixels = np.stack([retriever.transform(im) for im in images])
    sims = np.einsum("bqd,td->btq", retriever.encode_images(pixels).query_embeds, retriever.encode_texts(TEXTS))
    for i, image in enumerate(images):
        inputs = processor(images=image, text=TEXTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            expected = model(**inputs, use_image_text_matching_head=False).logits_per_image.numpy().ravel()
        np.testing.assert_allclose(sims[i].max(axis=-1), expected, atol=1e-5)


def test_itm_equals_transformers_softmax(retriever, reference, images):
    model, processor = reference
    pixels = np.stack([retriever.transform(im) for im in images])
    vit = retriever.vit_features(pixels)
    for text in TEXTS:
        mine = retriever.itm_probabilities(vit, [text])
        for i, image in enumerate(images):
            inputs = processor(images=image, text=text, return_tensors="pt")
            with torch.no_grad():
                logits = model(**inputs, use_image_text_matching_head=True).logits_per_image
            assert abs(torch.softmax(logits, dim=1)[0, 1].item() - mine[i]) < 1e-5


def test_itm_paired_texts_and_batching_agree(retriever, images):
    pixels = np.stack([retriever.transform(im) for im in images[:3]])
    vit = retriever.vit_features(pixels)
    paired = retriever.itm_probabilities(vit, TEXTS)
    one_by_one = [retriever.itm_probabilities(vit[i : i + 1], [TEXTS[i]])[0] for i in range(3)]
    np.testing.assert_allclose(paired, one_by_one, atol=1e-5)
    batched = retriever.encode_texts(TEXTS)
    single = np.concatenate([retriever.encode_texts([t]) for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_texts_are_read_as_lavis_prepared_the_captions_blip2_learned_from(retriever, reference, images):
    """LAVIS's caption processor: lower case, . ! " ( ) * # : ; ~ as spaces, at most 50 words. A query's
    punctuation, never seen in training, moved its embedding."""
    from retrieval.encoders import as_trained

    assert as_trained('A Dog (running) on "the" beach!  ~Sunset*#: ok;') == "a dog running on the beach sunset ok"
    assert as_trained("don't, stop? a-b") == "don't, stop? a-b"  # what LAVIS keeps
    assert as_trained(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))
    raw, plain = 'A red circle (on a blue background)!', "a red circle on a blue background"
    np.testing.assert_array_equal(retriever.encode_texts([raw]), retriever.encode_texts([plain]))
    model, processor = reference  # transformers' own model, given the text as LAVIS prepares it
    image = images[0]
    inputs = processor(images=image, text=[as_trained(raw)], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs, use_image_text_matching_head=False).logits_per_image.numpy().ravel()
    sims = retriever.encode_images(retriever.transform(image)[None]).query_embeds[0] @ retriever.encode_texts([raw])[0]
    np.testing.assert_allclose(sims.max(), expected[0], atol=1e-5)
    vit = retriever.vit_features(retriever.transform(image)[None])
    np.testing.assert_array_equal(retriever.itm_logits(vit, [raw]), retriever.itm_logits(vit, [plain]))


def test_text_truncated_to_35_tokens(retriever):
    long = " ".join(["red"] * 100)
    ids, _ = retriever._tokenize([long])
    assert ids.shape[1] == 35


def test_transform_read_from_the_processor_file_without_loading(tiny_model, retriever, tmp_path):
    """Decoding starts before the model loads, so the file-derived transform must equal the processor's."""
    import json

    from transformers import BlipImageProcessor

    from retrieval.preprocess import ImageTransform, peek_transform

    assert peek_transform(str(tiny_model)) == retriever.transform
    # The layout of Salesforce/blip2-itm-vit-g's preprocessor_config.json.
    hub_style = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.4, 0.3],
                 "image_std": [0.2, 0.3, 0.25], "image_processor_type": "BlipImageProcessor", "resample": 3,
                 "rescale_factor": 0.00392156862745098, "size": {"height": 364, "width": 364}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hub_style))
    expected = ImageTransform.from_processor(BlipImageProcessor(**hub_style))
    assert ImageTransform.from_config_file(tmp_path / "preprocessor_config.json") == expected
    del hub_style["image_std"]  # left to a default: load the processor instead
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hub_style))
    assert ImageTransform.from_config_file(tmp_path / "preprocessor_config.json") is None
    assert peek_transform(str(tmp_path / "missing")) is None
