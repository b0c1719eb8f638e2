"""ITM's hard negatives, mined by ITC similarity: for each image a text, for each text an image, drawn
with probability softmax(similarity / temperature) over the candidates that do not match (BLIP-2 §3.2,
LAVIS `blip2_qformer.py`).

LAVIS draws them from the batch (`in_batch`), gathered across GPUs: thousands of pairs. A CPU batch
of 96 random scenes seldom holds a caption one attribute away from an image's own, so `NegativeBank`
can mine from the whole training set instead, as a batch of every pair would: it keeps the ITC
embeddings of every image and of every distinct caption, recomputed without gradients every
`refresh_every` steps (stale between refreshes, as a momentum queue is; good enough to rank
candidates by). Its texts may include foils, captions with no image, drawn only as negative texts.

Which candidates match is given by `groups`: pairs whose captions describe the same scene share a
group, whatever the wording ("A above B", "B below A"), so a paraphrase is never taught as a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Negatives:
    """Rows into the training set: `images[i]` is the negative image of text i, `texts[i]` the
    negative text of image i."""

    images: Any
    texts: Any


def hard_negatives(similarity, positive, generator):
    """For each row, one column drawn with probability softmax(similarity) over its non-positives."""
    import torch

    with torch.no_grad():
        weights = torch.softmax(similarity.float(), dim=1).masked_fill(positive, 0) + 1e-12 * (~positive)
        weights[weights.sum(dim=1) == 0] = 1.0  # every candidate matches: nothing better to draw
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def in_batch(index, sim_i2t, groups, generator) -> Negatives:
    """LAVIS's choice: negatives from the batch `index`, by its (B, B) ITC logits `sim_i2t`."""
    positive = groups[index][:, None] == groups[index][None, :]
    return Negatives(images=index[hard_negatives(sim_i2t.t(), positive, generator)],
                     texts=index[hard_negatives(sim_i2t, positive, generator)])


class NegativeBank:
    """ITC embeddings of the whole training set, to mine each batch's negatives from all of it."""

    def __init__(self, features, input_ids, attention_mask, groups, refresh_every: int = 50, chunk: int = 512) -> None:
        self.features, self.input_ids, self.attention_mask, self.groups = features, input_ids, attention_mask, groups
        self.refresh_every, self.chunk = refresh_every, chunk
        # one row per distinct caption, so a common caption is not drawn more often than a rare one
        self.text_rows = _first_rows(input_ids).sort().values
        self.image_embeds = self.text_embeds = None

    def refresh(self, stage: Any) -> None:
        import torch

        with torch.no_grad():
            self.image_embeds = torch.cat([stage.image_embeds(self.features[i : i + self.chunk])
                                           for i in range(0, len(self.features), self.chunk)])
            rows = self.text_rows
            self.text_embeds = torch.cat([stage.text_embeds(self.input_ids[rows[i : i + self.chunk]],
                                                            self.attention_mask[rows[i : i + self.chunk]])
                                          for i in range(0, len(rows), self.chunk)])

    def pick(self, index, image, text, temperature, generator) -> Negatives:
        """Negatives for the batch `index`, whose ITC embeddings are `image` (B, Q, D) and `text` (B, D)."""
        import torch

        with torch.no_grad():
            group = self.groups[index][:, None]
            sim_texts = _max_over_queries(image, self.text_embeds) / temperature
            texts = self.text_rows[hard_negatives(sim_texts, group == self.groups[self.text_rows][None, :], generator)]
            sim_images = _max_over_queries(self.image_embeds, text).t() / temperature
            images = hard_negatives(sim_images, group == self.groups[None, : len(self.features)], generator)
        return Negatives(images=images, texts=texts)


def _max_over_queries(image, text):
    """(N, T) ITC similarity of N images' query embeddings (N, Q, D) with T texts (T, D): the best query's.
    One matrix product, then the max: twice as fast as einsum's (N, T, Q) layout here."""
    n, q, d = image.shape
    return (image.reshape(n * q, d) @ text.t()).reshape(n, q, -1).amax(dim=1)


def _first_rows(input_ids):
    """The first row holding each distinct row of `input_ids`."""
    import torch

    _, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(inverse), dtype=torch.long)
    return first.scatter_reduce_(0, inverse, torch.arange(len(inverse)), reduce="amin")
