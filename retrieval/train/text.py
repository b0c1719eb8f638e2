"""Pre-training the Q-Former's text side before stage 1, as BLIP-2 starts its Q-Former from BERT-base:
a text encoder that already reads word order. Trained from scratch by ITC alone, it reads a caption
as a bag of words ("a red circle above a blue square" and "a blue circle above a red square" got the
same embedding, cosine 1.000), and stage 1 then has no reason to keep in the query outputs which thing
has which colour, though the frozen ViT's [CLS] encodes it (`benchmarks/diagnose_shapes_model.py`).

The objective is the ViT's, read from words instead of pixels: the [CLS] output of the text path
classifies the scene the caption describes (layout; colour, shape and size of its first and second
thing), which depends on which word goes with which. It trains the word and position embeddings, the
self-attention and the text feed-forward layers; cross-attention and the queries' feed-forward layers
are left for stage 1. The heads are thrown away afterwards."""

from __future__ import annotations

from typing import Any

from retrieval.train.loop import Progress, Schedule, batches, optimise
from retrieval.train.vision import attribute_heads


def text_cls(model: Any, input_ids: Any, attention_mask: Any):
    """(B, H) the [CLS] output of a `Blip2ForImageTextRetrieval`'s text path, before ITC's projection."""
    out = model.qformer(query_embeds=model.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask)
    return out.last_hidden_state[:, 0, :]


def trimmed(input_ids, attention_mask):
    """Tokens cut to the longest text among them: padding columns cost compute and change nothing."""
    length = int(attention_mask.sum(dim=1).max())
    return input_ids[:, :length], attention_mask[:, :length]


def pretrain_text(model: Any, input_ids: Any, attention_mask: Any, labels: Any, classes: tuple[int, ...],
                  schedule: Schedule, seed: int = 0, progress: Progress | None = None) -> float:
    """Trains the text path of `model` in place on padded (N, L) tokens and (N, A) scene labels of
    `classes[a]` classes each. Returns the final loss."""
    from torch.nn.functional import cross_entropy

    heads = attribute_heads(model.config.qformer_config.hidden_size, classes)
    order = batches(len(input_ids), schedule.batch_size, seed)
    model.train()

    def loss_at(step: int):
        index = next(order)
        cls = text_cls(model, *trimmed(input_ids[index], attention_mask[index]))
        return sum(cross_entropy(head(cls), labels[index, a]) for a, head in enumerate(heads))

    parameters = [p for name, p in model.named_parameters() if not name.startswith("vision_model.")]
    return optimise([*parameters, *heads.parameters()], schedule, loss_at, "text encoder", progress)
