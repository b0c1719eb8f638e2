"""Pre-training the image encoder by attribute classification, before it is frozen as BLIP-2 freezes
its ViT. Heads read the ViT's outputs after its final layer norm, the features the Q-Former will see:
the [CLS] token classifies the whole scene (layout, the things in it), and every patch token what
covers it (colour, shape, size or background), a dense signal that trains a ViT from scratch in
minutes rather than hours. The heads are thrown away afterwards."""

from __future__ import annotations

from typing import Any

from retrieval.train.loop import Progress, Schedule, batches, optimise


def attribute_heads(hidden: int, classes: tuple[int, ...]):
    from torch import nn

    return nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, n)) for n in classes)


def pretrain_vision(vision_model: Any, pixels: Any, labels: Any, classes: tuple[int, ...], patch_labels: Any,
                    patch_classes: tuple[int, ...], schedule: Schedule, seed: int = 0,
                    progress: Progress | None = None) -> float:
    """Trains `vision_model` (a `Blip2VisionModel`) in place on (N, 3, H, W) pixels, (N, A) scene labels
    of `classes[a]` classes each, and (N, patches, R) patch labels of `patch_classes[r]` classes each.
    Returns the final loss."""
    from torch.nn.functional import cross_entropy

    hidden = vision_model.config.hidden_size
    scene_heads, patch_heads = attribute_heads(hidden, classes), attribute_heads(hidden, patch_classes)
    order = batches(len(pixels), schedule.batch_size, seed)
    vision_model.train()

    def loss_at(step: int):
        index = next(order)
        states = vision_model(pixel_values=pixels[index]).last_hidden_state
        scene, patches = labels[index], patch_labels[index]
        loss = sum(cross_entropy(head(states[:, 0]), scene[:, a]) for a, head in enumerate(scene_heads))
        for r, head in enumerate(patch_heads):
            logits = head(states[:, 1:])
            loss = loss + cross_entropy(logits.reshape(-1, logits.shape[-1]), patches[:, :, r].reshape(-1))
        return loss

    parameters = [*vision_model.parameters(), *scene_heads.parameters(), *patch_heads.parameters()]
    loss = optimise(parameters, schedule, loss_at, "image encoder", progress)
    vision_model.eval().requires_grad_(False)
    return loss


