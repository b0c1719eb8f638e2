"""Pre-training the small decoder language model on caption text, before it is frozen for stage 2.

Captions are packed into long sequences, each after the BOS/EOS token `</s>`, the way language models
read documents back to back, so every position up to the packed length is trained: in stage 2 the
caption starts after the 32 soft-prompt positions, not at position 0."""

from __future__ import annotations

from typing import Any

from retrieval.train.loop import Progress, Schedule, batches, optimise


def pack(token_lists: list[list[int]], separator: int, length: int):
    """Concatenates `[separator] + tokens` for every list and cuts the stream into rows of `length`."""
    import torch

    stream = [token for tokens in token_lists for token in [separator, *tokens]]
    rows = len(stream) // length
    return torch.tensor(stream[: rows * length], dtype=torch.long).view(rows, length)


def pretrain_language_model(language_model: Any, sequences: Any, schedule: Schedule, seed: int = 0,
                            progress: Progress | None = None) -> float:
    """Next-token training of an `OPTForCausalLM` on packed (N, L) token rows; frozen afterwards."""
    order = batches(len(sequences), schedule.batch_size, seed)
    language_model.train()

    def loss_at(step: int):
        rows = sequences[next(order)]
        return language_model(input_ids=rows, labels=rows).loss

    loss = optimise(language_model.parameters(), schedule, loss_at, "language model", progress)
    language_model.eval().requires_grad_(False)
    return loss
