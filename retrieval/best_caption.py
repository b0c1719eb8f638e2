"""Captions chosen by the retrieval model: the caption model proposes several (its beam search's best
`candidates`), and the one whose text ITC scores highest against the image is kept, as DALL-E kept
the samples CLIP ranked first and BLIP's CapFilt keeps the captions its ITM head accepts.

The language model decodes a caption word by word and can commit to a wrong colour or shape early;
ITC judges the whole sentence against the whole image. On the shapes model the right caption is
among 16 beams far more often than it is the first (`benchmarks/RESULTS.md`).

A `BestOfCaptions` is a captioner like `Blip2Captioner` (same `name`, `transform`, `caption`), so every
captioning pipeline takes it unchanged. Its name says how captions were chosen, so that the catalog
keeps them apart from the caption model's own first choices."""

from __future__ import annotations

from typing import Any

import numpy as np

from retrieval.errors import UsageError


class BestOfCaptions:
    def __init__(self, captioner: Any, retriever: Any, candidates: int) -> None:
        if captioner.transform != retriever.transform:
            raise UsageError(
                f"choosing captions needs a retrieval model that prepares images as the caption model does "
                f"({retriever.identity.name}: {retriever.transform.height}x{retriever.transform.width} px, "
                f"{captioner.name}: {captioner.transform.height}x{captioner.transform.width} px, or other "
                "normalisation); pick a matching pair or leave out --candidates")
        self.captioner = captioner
        self.retriever = retriever
        self.candidates = candidates
        self.transform = captioner.transform
        self.name = f"{captioner.name} (best of {candidates} by {retriever.identity.name})"

    def caption(self, pixel_values: np.ndarray, options: Any) -> list[str]:
        """(B, 3, H, W) model inputs -> for each image the candidate caption ITC ranks first."""
        proposed = self.captioner.caption_candidates(pixel_values, options, self.candidates)
        images = self.retriever.encode_images(pixel_values).query_embeds  # (B, Q, D)
        # the prompt is part of what the caption says ("a photo of" + "a red circle"), so ITC reads both
        whole = [f"{options.prompt} {text}".strip() for texts in proposed for text in texts]
        texts = self.retriever.encode_texts(whole).reshape(len(proposed), self.candidates, -1)  # (B, C, D)
        scores = np.einsum("bqd,bcd->bcq", images, texts).max(axis=2)  # ITC: the best query's similarity
        return [texts_of[int(best)] for texts_of, best in zip(proposed, scores.argmax(axis=1))]
