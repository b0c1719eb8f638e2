"""Stage-2 captions against transformers' own `Blip2ForConditionalGeneration.generate`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.captioner import CaptionOptions
from retrieval.errors import UsageError
from tests.conftest import make_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return [Image.open(p).convert("RGB") for p in make_images(tmp_path_factory.mktemp("cap"), 6, seed=13)]


@pytest.fixture(scope="module")
def reference(caption_model):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(str(caption_model)).eval()
    return model, AutoProcessor.from_pretrained(str(caption_model))


@pytest.mark.parametrize("options", [
    CaptionOptions(max_new_tokens=8),
    CaptionOptions(prompt="a photo of", max_new_tokens=6),
    CaptionOptions(max_new_tokens=5, num_beams=3),
])
def test_caption_equals_transformers_generate(captioner, reference, images, options):
    model, processor = reference
    ours = captioner.caption(np.stack([captioner.transform(im) for im in images]), options)
    for image, caption in zip(images, ours):
        inputs = processor(images=image, text=options.prompt or None, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=options.max_new_tokens,
                                       num_beams=options.num_beams, do_sample=False)
        if options.prompt:  # transformers returns prompt + caption; blipsearch stores the caption
            generated = generated[:, inputs["input_ids"].shape[1]:]
        assert caption == processor.batch_decode(generated, skip_special_tokens=True)[0].strip()
    assert len(set(ours)) > 1  # the tiny model's captions do depend on the image


def test_batched_equals_one_by_one(captioner, images):
    options = CaptionOptions(max_new_tokens=8)
    pixels = np.stack([captioner.transform(im) for im in images])
    assert captioner.caption(pixels, options) == [captioner.caption(p[None], options)[0] for p in pixels]


@pytest.mark.parametrize("options", [CaptionOptions(max_new_tokens=0), CaptionOptions(num_beams=99),
                                     CaptionOptions(prompt="x" * 2000)])
def test_absurd_options_are_usage_errors(captioner, options):
    with pytest.raises(UsageError):
        captioner.caption(np.zeros((1, 3, 224, 224), np.float32), options)


def test_captions_stop_where_the_language_model_has_no_more_positions(captioner, reference, images):
    """The tiny LM has 128 positions, 32 of them the image tokens': 512 new tokens after a prompt ran off
    its position table (an IndexError). They now stop where it ends, as transformers' generate does when
    asked for exactly that many; a prompt that leaves no room is a clear error."""
    model, processor = reference
    options = CaptionOptions(prompt="a photo of", max_new_tokens=512)
    room = captioner.new_tokens(options)
    prompt_tokens = len(processor.tokenizer(options.prompt)["input_ids"])
    assert room == model.config.text_config.max_position_embeddings - model.config.num_query_tokens - prompt_tokens
    ours = captioner.caption(captioner.transform(images[0])[None], options)[0]
    inputs = processor(images=images[0], text=options.prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=room, do_sample=False)
    assert ours == processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    with pytest.raises(UsageError, match="leaves no room in the language model's 128 positions"):
        captioner.caption(captioner.transform(images[0])[None], CaptionOptions(prompt="word " * 150))
