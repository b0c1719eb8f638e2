"""BLIP-2 stage 1: the Q-Former learns to pull from a frozen image encoder what the text needs, by
three objectives sharing one set of weights, each with its own attention mask (BLIP-2 §3.2, LAVIS
`blip2_qformer.py`):

- ITC, image-text contrastive: queries see the image, text sees only itself (unimodal masks); an
  image's score for a text is the max over its 32 query embeddings; in-batch negatives.
- ITM, image-text matching: queries and text see each other (bidirectional mask); binary
  match/no-match on the mean of the query outputs, with hard negatives drawn from ITC's scores.
- ITG, image-grounded text generation: text sees the queries and the text before it (multimodal
  causal mask), queries never see the text; the caption's next-token loss, [DEC] as first token.

The forward passes call the model's own modules in the order `Blip2ForImageTextRetrieval.forward`
does, so what is trained here is what inference computes; tests check that against transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from retrieval.train.loop import Progress, Schedule, batches, optimise, paired_batches
from retrieval.train.negatives import NegativeBank, Negatives, in_batch
from retrieval.train.text import text_cls, trimmed

LABEL_SMOOTHING = 0.1  # LAVIS uses 0.1 for ITC and ITG
SWAP_SHARE = 0.5  # with swaps: the share of ITM's negative texts that are the image's swapped caption


@dataclass(frozen=True)
class Stage1Losses:
    itc: Any
    itm: Any
    itg: Any
    match: Any = None  # with attribute matching: its loss, already weighted

    @property
    def total(self):
        total = self.itc + self.itm + self.itg
        return total if self.match is None else total + self.match


def _lm_head(hidden: int, embeddings: Any):
    """BERT's LM prediction head, its decoder tied to the word embeddings (as LAVIS ties them)."""
    import torch
    from torch import nn

    class LMHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12))
            self.bias = nn.Parameter(torch.zeros(embeddings.weight.shape[0]))

        def forward(self, states):
            return self.transform(states) @ embeddings.weight.t() + self.bias

    return LMHead()


class Stage1:
    """The three objectives over a `Blip2ForImageTextRetrieval` whose ViT is frozen."""

    def __init__(self, model: Any, bos_token_id: int, match_weight: float = 0.0, attributes: int = 0,
                 mining_temperature: float = 0.0) -> None:
        import torch

        self.model = model
        self.bos_token_id = bos_token_id
        self.log_temperature = torch.nn.Parameter(torch.tensor(0.07).log())
        hidden = model.config.qformer_config.hidden_size
        self.itg_head = _lm_head(hidden, model.embeddings.word_embeddings)
        # Attribute matching, a training-only head beside ITM's: from the same query outputs, which of
        # the text's attributes (layout; colour, shape, size of each thing) the image has. One match
        # bit says only that something is wrong; these say what, one attribute at a time, as the
        # encoders' pre-training labelled them, so that ITM's features bind colour to thing the same
        # way for pairs never seen together. Made only when used: the default recipe stays bit-identical.
        self.match_weight = match_weight
        self.match_head = torch.nn.Linear(hidden, attributes) if match_weight else None
        # ITM's in-batch negatives drawn by softmax(cosine / this) when set; LAVIS: ITC's own temperature
        self.mining_temperature = mining_temperature

    def parameters(self):
        model = self.model
        yield from (p for name, p in model.named_parameters() if not name.startswith("vision_model."))
        yield self.log_temperature
        yield from self.itg_head.parameters()  # its decoder is the word embeddings, already yielded
        if self.match_head is not None:
            yield from self.match_head.parameters()

    # -- the three forward passes --------------------------------------------------------------
    def image_embeds(self, features):
        """(B, P, Dv) ViT features -> (B, Q, D) normalised query embeddings, as ITC inference."""
        import torch

        model = self.model
        queries = model.query_tokens.expand(features.shape[0], -1, -1)
        mask = torch.ones(features.shape[:-1], dtype=torch.long)
        out = model.qformer(query_embeds=queries, encoder_hidden_states=features, encoder_attention_mask=mask)
        return torch.nn.functional.normalize(model.vision_projection(out.last_hidden_state), dim=-1)

    def text_embeds(self, input_ids, attention_mask):
        import torch

        cls = text_cls(self.model, input_ids, attention_mask)
        return torch.nn.functional.normalize(self.model.text_projection(cls), dim=-1)

    def itm_logits(self, features, input_ids, attention_mask):
        """(B, 2) match logits for paired images and texts, as ITM inference."""
        return self.model.itm_head(self.itm_states(features, input_ids, attention_mask)).mean(dim=1)

    def itm_states(self, features, input_ids, attention_mask):
        """(B, Q, H) the query outputs that ITM's head reads: queries and text see each other."""
        import torch

        model = self.model
        queries = model.query_tokens.expand(features.shape[0], -1, -1)
        query_mask = torch.ones(queries.shape[:-1], dtype=torch.long)
        out = model.qformer(
            query_embeds=model.embeddings(input_ids=input_ids, query_embeds=queries),
            query_length=queries.shape[1],
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            encoder_hidden_states=features,
            encoder_attention_mask=torch.ones(features.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        return out[:, : queries.shape[1], :]

    def itg_logits(self, features, input_ids, attention_mask):
        """Next-token logits (B, L, V) for the text, its first token replaced by [DEC]."""
        import torch

        model = self.model
        batch, length = input_ids.shape
        queries = model.query_tokens.expand(batch, -1, -1)
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.bos_token_id
        out = model.qformer(
            query_embeds=model.embeddings(input_ids=decoder_ids, query_embeds=queries),
            query_length=queries.shape[1],
            attention_mask=multimodal_causal_mask(queries.shape[1], attention_mask, features.dtype),
            encoder_hidden_states=features,
            encoder_attention_mask=torch.ones(features.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        return self.itg_head(out[:, queries.shape[1] :, :])

    # -- the losses ----------------------------------------------------------------------------
    def losses(self, pairs: "Pairs", index, generator, bank: NegativeBank | None = None) -> Stage1Losses:
        """The three losses on the rows `index` of `pairs`; ITM's negatives from the batch, or from
        `bank` (the whole set) when given. Pairs of one group count as positives, never negatives."""
        import torch
        from torch.nn import functional as F

        features = pairs.features[index]
        input_ids, attention_mask = trimmed(pairs.input_ids[index], pairs.attention_mask[index])
        image = self.image_embeds(features)  # (B, Q, D)
        text = self.text_embeds(input_ids, attention_mask)  # (B, D)
        temperature = self.log_temperature.exp().clamp(0.001, 0.5)
        cosine = _max_sim(image, text)
        sim_i2t = cosine / temperature
        positive = pairs.groups[index][:, None] == pairs.groups[index][None, :]
        targets = positive.float() / positive.sum(dim=1, keepdim=True)
        swap = None if pairs.swaps is None else _one_swap_each(pairs.swaps[index], generator)
        i2t, i2t_targets = sim_i2t, targets
        if swap is not None and (swap >= 0).any():  # NegCLIP: each image's swapped caption, one more text
            rows = swap[swap >= 0]
            swapped = self.text_embeds(*trimmed(pairs.input_ids[rows], pairs.attention_mask[rows]))
            i2t = torch.cat([sim_i2t, _max_sim(image, swapped) / temperature], 1)
            also = pairs.groups[index][:, None] == pairs.groups[rows][None, :]  # a swap may be another's caption
            i2t_targets = torch.cat([positive, also], 1).float()
            i2t_targets = i2t_targets / i2t_targets.sum(dim=1, keepdim=True)
        itc = (F.cross_entropy(i2t, i2t_targets, label_smoothing=LABEL_SMOOTHING)
               + F.cross_entropy(sim_i2t.t(), targets, label_smoothing=LABEL_SMOOTHING)) / 2

        if bank is None:
            mining = cosine / self.mining_temperature if self.mining_temperature else sim_i2t
            negatives = in_batch(index, mining.detach(), pairs.groups, generator)
        else:
            negatives = bank.pick(index, image.detach(), text.detach(), temperature.detach(), generator)
        if swap is not None:  # ITM: half the negative texts a swap, where the image has one
            use = (swap >= 0) & (torch.rand(len(index), generator=generator) < SWAP_SHARE)
            negatives = Negatives(images=negatives.images, texts=torch.where(use, swap, negatives.texts))
        rows = torch.cat([index, index, negatives.texts])
        itm_ids, itm_mask = trimmed(pairs.input_ids[rows], pairs.attention_mask[rows])
        states = self.itm_states(torch.cat([features, pairs.features[negatives.images], features]), itm_ids, itm_mask)
        batch = len(index)
        labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)])
        itm = F.cross_entropy(self.model.itm_head(states).mean(dim=1), labels)
        match = None
        if self.match_head is not None:
            agree = attribute_agreement(pairs, torch.cat([index, negatives.images, index]), rows)
            match = self.match_weight * F.binary_cross_entropy_with_logits(self.match_head(states).mean(dim=1), agree)

        next_token = self.itg_logits(features, input_ids, attention_mask)[:, :-1]
        targets_itg = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        itg = F.cross_entropy(next_token.reshape(-1, next_token.shape[-1]), targets_itg.reshape(-1),
                              ignore_index=-100, label_smoothing=LABEL_SMOOTHING)
        return Stage1Losses(itc, itm, itg, match)


@dataclass(frozen=True)
class Pairs:
    """The training set as stage 1 reads it: cached ViT features (N, P, Dv), padded caption tokens
    (N + F, L), and `groups` (N + F,): captions of the same scene share a number. Rows past N are
    foils, text with no image, drawn only as ITM's negative texts by a `NegativeBank`, or as the
    `swaps` (N, S) of each image (rows of its swapped captions, -1 padding): with them, each image's ITC
    also sees one of its swaps as a negative text, and half its ITM negatives are one."""

    features: Any
    input_ids: Any
    attention_mask: Any
    groups: Any
    swaps: Any = None
    image_attributes: Any = None  # (N, A) `attributes` of each image: for attribute matching
    text_attributes: Any = None  # (N + F, A) the same read from each text (`caption_attributes`)
    partners: list[int] | None = None  # each image's swap twin (-1: none), batched with it


def attribute_agreement(pairs: Pairs, image_rows, text_rows):
    """(B, A) 1.0 where image `image_rows[b]` has attribute a as text `text_rows[b]` says, else 0.0."""
    return (pairs.image_attributes[image_rows] == pairs.text_attributes[text_rows]).float()


def _max_sim(image, text):
    """(B, T) ITC similarity of images' query embeddings (B, Q, D) with texts (T, D): the best query's.
    The same numbers as `negatives._max_over_queries`, not the same bits; the shipped checkpoints
    were trained with this one."""
    import torch

    return torch.einsum("iqd,td->itq", image, text).max(dim=2).values


def swap_matrix(swap_rows: list[list[int]]):
    """`Pairs.swaps` of per-image row lists: (N, S), -1 padding."""
    import torch

    widest = max(1, max(map(len, swap_rows)))
    return torch.tensor([rows + [-1] * (widest - len(rows)) for rows in swap_rows])


def _one_swap_each(swaps, generator):
    """(B,) one of each row's swaps (-1 padded), drawn uniformly; -1 where a row has none."""
    import torch

    counts = (swaps >= 0).sum(dim=1)
    pick = (torch.rand(len(swaps), generator=generator) * counts).long().clamp(max=swaps.shape[1] - 1)
    return torch.where(counts > 0, swaps.gather(1, pick[:, None]).squeeze(1), torch.full_like(counts, -1))


def multimodal_causal_mask(num_queries: int, text_mask, dtype):
    """Additive (B, 1, Q+L, Q+L) mask: queries see queries; text sees queries and earlier text."""
    import torch

    batch, length = text_mask.shape
    allowed = torch.zeros(batch, num_queries + length, num_queries + length, dtype=torch.bool)
    allowed[:, :, :num_queries] = True
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    allowed[:, num_queries:, num_queries:] = causal & text_mask[:, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def train_stage1(model: Any, pairs: Pairs, bos_token_id: int, schedule: Schedule, seed: int = 0,
                 progress: Progress | None = None, from_bank: bool = False, match_weight: float = 0.0,
                 mining_temperature: float = 0.0) -> dict[str, float]:
    """Trains the Q-Former, query tokens and heads of `model` on `pairs`; ITM's hard negatives mined
    from each batch as LAVIS does or, `from_bank`, from the whole set and its foils (`NegativeBank`);
    with `match_weight`, attribute matching beside ITM (`Pairs` must then hold the attributes)."""
    import torch

    attributes = pairs.image_attributes.shape[1] if match_weight else 0
    stage = Stage1(model, bos_token_id, match_weight, attributes, mining_temperature)
    model.vision_model.requires_grad_(False)
    model.train()
    if pairs.partners:
        order = paired_batches(pairs.partners, schedule.batch_size, seed)
    else:
        order = batches(len(pairs.features), schedule.batch_size, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    bank = NegativeBank(pairs.features, pairs.input_ids, pairs.attention_mask, pairs.groups) if from_bank else None
    last: dict[str, float] = {}

    def loss_at(step: int):
        if bank is not None and step % bank.refresh_every == 0:
            bank.refresh(stage)
        losses = stage.losses(pairs, next(order), generator, bank)
        last.update(itc=float(losses.itc.detach()), itm=float(losses.itm.detach()), itg=float(losses.itg.detach()))
        if losses.match is not None:
            last["match"] = float(losses.match.detach())
        return losses.total

    last["total"] = optimise(stage.parameters(), schedule, loss_at, "Q-Former stage 1", progress)
    last["temperature"] = float(stage.log_temperature.detach().exp())
    model.eval()
    return last
