"""One optimisation loop for every stage: AdamW, linear warm-up then cosine decay, progress reports."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

Progress = Callable[[str, int, int, float], None]  # stage, step, steps, loss


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    batch_size: int
    warmup: float = 0.05  # share of steps
    weight_decay: float = 0.05


def optimise(parameters: Iterable, schedule: Schedule, loss_at: Callable[[int], "object"], stage: str,
             progress: Progress | None = None, report_every: int = 25) -> float:
    """Runs `schedule.steps` steps of `loss_at(step).backward()`; returns the mean loss of the last 10%."""
    import torch

    parameters = [p for p in parameters if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=schedule.lr, weight_decay=schedule.weight_decay)
    warmup = max(1, int(schedule.steps * schedule.warmup))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, schedule.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    tail, running = [], None
    for step in range(schedule.steps):
        loss = loss_at(step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        scheduler.step()
        value = float(loss.detach())
        running = value if running is None else 0.9 * running + 0.1 * value
        if step >= schedule.steps * 0.9:
            tail.append(value)
        if progress and (step % report_every == 0 or step == schedule.steps - 1):
            progress(stage, step + 1, schedule.steps, running)
    return sum(tail) / max(1, len(tail))


def batches(count: int, batch_size: int, seed: int):
    """Index tensors of `batch_size` (of all `count` when there are fewer), epoch after epoch, each
    epoch a fresh permutation."""
    import torch

    if count < 1:
        raise ValueError("no examples to draw batches from")
    size = min(batch_size, count)  # a full batch from fewer examples would never come: no endless loop
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - size + 1, size):
            yield order[start : start + size]


def paired_batches(partners: list[int], batch_size: int, seed: int):
    """As `batches`, over examples of which some come in pairs (`partners[i]`: i's partner, or -1),
    a pair always in one batch: each epoch a fresh permutation of the singles and pairs, batches
    filled to at most `batch_size`, so that in-batch negatives include each example's partner."""
    import torch

    units = [[i] if j < 0 else [i, j] for i, j in enumerate(partners) if j < 0 or i < j]
    if not units:
        raise ValueError("no examples to draw batches from")
    size = max(min(batch_size, len(partners)), max(map(len, units)))  # as `batches`: never wait forever
    generator = torch.Generator().manual_seed(seed)
    while True:
        batch: list[int] = []
        for unit in torch.randperm(len(units), generator=generator).tolist():
            if len(batch) + len(units[unit]) > size:
                yield torch.tensor(batch)
                batch = []
            batch += units[unit]
            if len(batch) == size:
                yield torch.tensor(batch)
                batch = []
        # the epoch's last, partly filled batch is left out, as `batches` leaves out the remainder
