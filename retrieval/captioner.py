"""BLIP-2 stage 2: the Q-Former's 32 query outputs become a soft prompt for a frozen LLM, which writes a
caption. Batched generation over many images with one (optional) text prompt.

Inputs are built the way `Blip2Processor` builds them: `num_query_tokens` image tokens, then the
tokenised prompt. One prompt serves the whole batch, so the sequences need no padding. Without a
prompt, `generate` starts from the image tokens and the LLM's BOS, as transformers does. The stored
caption is the continuation alone; the prompt is kept beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.config import ModelConfig
from retrieval.errors import UsageError
from retrieval.loading import load
from retrieval.preprocess import ImageTransform
from retrieval.query import is_utf8, printable

MAX_NEW_TOKENS = 512
MAX_BEAMS = 16


@dataclass(frozen=True)
class CaptionOptions:
    prompt: str = ""  # e.g. "a photo of"; the caption continues it
    max_new_tokens: int = 30
    num_beams: int = 1  # 1: greedy

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise UsageError(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS}, not {self.max_new_tokens}")
        if not 1 <= self.num_beams <= MAX_BEAMS:
            raise UsageError(f"--num-beams must be between 1 and {MAX_BEAMS}, not {self.num_beams}")
        if len(self.prompt) > 1000:
            raise UsageError("--prompt is longer than 1000 characters")
        if not is_utf8(self.prompt) or "\x00" in self.prompt:  # the catalog stores it beside each caption
            raise UsageError(f"--prompt '{printable(self.prompt)}' is not valid UTF-8 text without NUL characters")


def check_candidates(count: int) -> None:
    """How many captions per image a beam search can be asked for."""
    if not 1 <= count <= MAX_BEAMS:
        raise UsageError(f"--candidates must be between 1 and {MAX_BEAMS}, not {count}")


class Blip2Captioner:
    """Captions on a loaded `Blip2ForConditionalGeneration`."""

    def __init__(self, model: Any, processor: Any, device: str, name: str) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.transform = ImageTransform.from_processor(processor)
        self.device = device
        self.name = name

    @classmethod
    def load(cls, config: ModelConfig) -> "Blip2Captioner":
        loaded = load("Blip2ForConditionalGeneration", config)
        return cls(loaded.model, loaded.processor, loaded.device, config.name)

    def _input_ids(self, prompt: str, batch: int):
        import torch

        image_token = getattr(self.processor, "image_token", None)
        image_ids = self.tokenizer(
            (image_token.content if image_token is not None else "<image>") * self.model.config.num_query_tokens,
            add_special_tokens=False,
        )["input_ids"]
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        ids = torch.tensor([image_ids + prompt_ids] * batch, dtype=torch.long, device=self.device)
        return ids, torch.ones_like(ids)

    def new_tokens(self, options: CaptionOptions) -> int:
        """`options.max_new_tokens`, or fewer where the language model has no more positions after the
        image tokens and the prompt: it cannot write past them (a small LM, as the shapes demo's, has 64)."""
        limit = getattr(self.model.config.text_config, "max_position_embeddings", None)
        if limit is None:  # an encoder-decoder LM (Flan-T5): relative positions, no such limit
            return options.max_new_tokens
        prompt_tokens = len(self.tokenizer(options.prompt)["input_ids"]) if options.prompt else 1  # or BOS
        room = limit - self.model.config.num_query_tokens - prompt_tokens
        if room < 1:
            raise UsageError(f"the prompt is {prompt_tokens} tokens, which with the {self.model.config.num_query_tokens} "
                             f"image tokens leaves no room in the language model's {limit} positions; shorten it")
        return min(options.max_new_tokens, room)

    def caption(self, pixel_values: np.ndarray, options: CaptionOptions) -> list[str]:
        """(B, 3, H, W) model inputs (float, or uint8 from a decoder) -> B captions (the prompt not repeated)."""
        return [texts[0] for texts in self.caption_candidates(pixel_values, options, 1)]

    def caption_candidates(self, pixel_values: np.ndarray, options: CaptionOptions, count: int) -> list[list[str]]:
        """B lists of `count` captions each, the beam search's best first (its width at least `count`)."""
        import torch

        options.validate()
        check_candidates(count)
        max_new_tokens = self.new_tokens(options)
        dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        pixels = self.transform.to_tensor(pixel_values, self.device, dtype)
        prompt = {}
        if options.prompt:
            input_ids, attention_mask = self._input_ids(options.prompt, pixels.shape[0])
            prompt = {"input_ids": input_ids, "attention_mask": attention_mask}
        with torch.inference_mode():
            generated = self.model.generate(
                pixel_values=pixels, max_new_tokens=max_new_tokens, num_beams=max(options.num_beams, count),
                num_return_sequences=count, do_sample=False, **prompt,
            )
        if prompt and torch.equal(generated[:, : input_ids.shape[1]], input_ids.repeat_interleave(count, dim=0)):
            generated = generated[:, input_ids.shape[1] :]  # generate returns the prompt, then the caption
        texts = [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]
        return [texts[i : i + count] for i in range(0, len(texts), count)]
