"""BLIP-2 stage 2: the stage-1 Q-Former and a new linear projection learn to turn an image into a soft
prompt of 32 vectors that a frozen language model continues with the caption.

The input is laid out as `Blip2ForConditionalGeneration.generate` lays it out without a prompt: the
32 image-token positions (replaced by the projected query outputs), the LM's BOS, then the caption
and EOS, where generation is to stop. Loss on the caption and EOS only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from retrieval.train.loop import Progress, Schedule, batches, optimise


@dataclass(frozen=True)
class WordNoise:
    """Teacher forcing with some input words made unreliable: at `positions` ((N, L) bool, the rows of
    `caption_inputs`), each input token becomes, with probability `share`, one of `choices` drawn at
    random (itself, now and then); the labels stay. Used on colour words (`last_word_positions`):
    training never shows a yellow square, so a captioner that reads "yellow" before naming the
    shape learns that "square" never follows it; with the colour word sometimes wrong, the shape has
    to come from the image."""

    positions: Any
    choices: Any
    share: float

    def apply(self, input_ids: Any, rows: Any, generator: Any):
        """`input_ids` (rows `rows` of the full inputs, perhaps cut shorter) with this noise drawn."""
        import torch

        hit = self.positions[rows, : input_ids.shape[1]] & (torch.rand(input_ids.shape, generator=generator) < self.share)
        if not hit.any():
            return input_ids
        noisy = input_ids.clone()
        noisy[hit] = self.choices[torch.randint(len(self.choices), (int(hit.sum()),), generator=generator)]
        return noisy


def last_word_positions(input_ids: Any, word_ids: Any):
    """(N, L) bool: the last token of each row that is one of `word_ids`. For colour words, the one
    colour of a caption of one kind of thing, and the second thing's of two: that one can be wrong
    without making the caption ambiguous, as the first thing and the relation already say which
    thing comes second; the first colour is what says which of two things the caption starts from."""
    import torch

    found = torch.isin(input_ids, word_ids)
    rank = found.cumsum(dim=1)
    return found & (rank == rank[:, -1:])


def word_ids(tokenizer: Any, words: Any):
    """The token of each word as it stands inside a caption (after a space); each must be one token."""
    import torch

    ids = [tokenizer(f" {word}", add_special_tokens=False)["input_ids"] for word in words]
    if any(len(found) != 1 for found in ids):
        raise ValueError(f"each word must be one token: {dict(zip(words, ids))}")
    return torch.tensor([found[0] for found in ids])


def caption_inputs(model: Any, caption_tokens: list[list[int]]):
    """(input_ids, attention_mask, labels), each (N, Q + 1 + longest caption + 1), right-padded."""
    import torch

    config = model.config
    text = config.text_config
    queries = config.num_query_tokens
    longest = max(len(tokens) for tokens in caption_tokens)
    width = queries + 1 + longest + 1
    input_ids = torch.full((len(caption_tokens), width), text.pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for row, tokens in enumerate(caption_tokens):
        sequence = [config.image_token_index] * queries + [text.bos_token_id, *tokens, text.eos_token_id]
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
        labels[row, queries + 1 : len(sequence)] = torch.tensor([*tokens, text.eos_token_id])
    return input_ids, mask, labels


def caption_loss(model: Any, features: Any, input_ids: Any, attention_mask: Any, labels: Any):
    """The captioning loss of `Blip2ForConditionalGeneration.forward`, from cached ViT features."""
    import torch
    from torch.nn import functional as F

    queries = model.query_tokens.expand(features.shape[0], -1, -1)
    query_output = model.qformer(
        query_embeds=queries, encoder_hidden_states=features,
        encoder_attention_mask=torch.ones(features.shape[:-1], dtype=torch.long),
    ).last_hidden_state
    soft_prompt = model.language_projection(query_output)
    embeds = model.get_input_embeddings()(input_ids)
    image_positions = (input_ids == model.config.image_token_index).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_positions, soft_prompt.to(embeds.dtype))
    logits = model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def train_stage2(model: Any, features: Any, input_ids: Any, attention_mask: Any, labels: Any,
                 schedule: Schedule, seed: int = 0, progress: Progress | None = None, qformer: bool = True,
                 noise: WordNoise | None = None) -> float:
    """Trains Q-Former, query tokens and projection of `model` (the projection alone unless `qformer`:
    the stage-1 query outputs kept as they are), on inputs with `noise` when given; the ViT and the
    LM stay frozen."""
    import torch

    model.vision_model.requires_grad_(False)
    model.language_model.requires_grad_(False)
    if not qformer:
        model.qformer.requires_grad_(False)
        model.query_tokens.requires_grad_(False)
    model.train()
    order = batches(len(features), schedule.batch_size, seed)
    draws = torch.Generator().manual_seed(seed + 1)  # its own stream: the batches do not depend on the noise

    def loss_at(step: int):
        index = next(order)
        length = int(attention_mask[index].sum(dim=1).max())
        ids = input_ids[index, :length]
        if noise is not None:
            ids = noise.apply(ids, index, draws)
        return caption_loss(model, features[index], ids, attention_mask[index, :length], labels[index, :length])

    trainable = [*model.qformer.parameters(), model.query_tokens] if qformer else []
    trainable += [*model.language_projection.parameters()]
    loss = optimise(trainable, schedule, loss_at, "Q-Former stage 2", progress)
    model.eval()
    return loss
