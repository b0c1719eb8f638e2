"""The BLIP image transform as a small picklable value: PIL image in, normalised CHW float32 out, in
two steps (resize to uint8 in decode workers, normalise where the model runs).

It is built from the checkpoint's own image-processor settings and reproduces transformers'
PIL `BlipImageProcessor` (resize -> rescale -> normalise), tested against it. Owning it lets decode
workers run it without importing torch or transformers, and keeps results identical on machines
where transformers would pick its torchvision backend instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ImageTransform:
    height: int
    width: int
    resample: int  # a PIL.Image.Resampling value
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_processor(cls, processor: Any) -> "ImageTransform":
        """From a `Blip2Processor` or its `image_processor`."""
        ip = getattr(processor, "image_processor", processor)
        size = ip.size
        height = size["height"] if "height" in size else size["shortest_edge"]
        width = size["width"] if "width" in size else size["shortest_edge"]
        if not (ip.do_resize and ip.do_rescale and ip.do_normalize):
            raise ValueError("blipsearch expects a BLIP image processor that resizes, rescales and normalises")
        return cls(
            height=int(height),
            width=int(width),
            resample=int(ip.resample),
            rescale_factor=float(ip.rescale_factor),
            mean=tuple(float(m) for m in ip.image_mean),
            std=tuple(float(s) for s in ip.image_std),
        )

    @classmethod
    def from_config_file(cls, path: Path) -> "ImageTransform | None":
        """From a checkpoint's `preprocessor_config.json` or `processor_config.json`, without importing
        transformers, when it states every setting explicitly (None otherwise: load the processor)."""
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
        config = config.get("image_processor", config)
        size = config.get("size") or {}
        needed = ("resample", "rescale_factor", "image_mean", "image_std")
        if config.get("image_processor_type") not in (None, "BlipImageProcessor") or not all(k in config for k in needed):
            return None
        if not all(config.get(k, True) for k in ("do_resize", "do_rescale", "do_normalize")):
            return None
        height, width = size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge"))
        if height is None or width is None:
            return None
        return cls(
            height=int(height),
            width=int(width),
            resample=int(config["resample"]),
            rescale_factor=float(config["rescale_factor"]),
            mean=tuple(float(m) for m in config["image_mean"]),
            std=tuple(float(v) for v in config["image_std"]),
        )

    def __call__(self, image: Any) -> np.ndarray:
        """An RGB PIL image -> (3, H, W) float32 model input."""
        return self.normalise(self.resize(image))

    def resize(self, image: Any) -> np.ndarray:
        """An RGB PIL image -> (3, H, W) uint8 at the model's size, before rescaling and normalising:
        what decode workers send, a quarter of the bytes of the float input."""
        resized = np.asarray(image.resize((self.width, self.height), resample=self.resample))
        return np.ascontiguousarray(resized.transpose(2, 0, 1))

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """(..., 3, H, W) uint8 from `resize` -> float32 model input."""
        # Pixels are uint8, so rescale + normalise is a 256-entry table per channel: the same float32
        # arithmetic as the processor's, done once per value instead of once per pixel.
        channels = np.arange(3)[:, None, None]
        return self._tables[channels, pixels]

    def to_tensor(self, pixels: Any, device: Any, dtype: Any):
        """(B, 3, H, W) model input as a torch tensor on `device` in `dtype`: float input as it is, uint8
        from `resize` sent as uint8 (a quarter of the bytes) and normalised there."""
        import torch

        tensor = torch.as_tensor(pixels).to(device)
        if tensor.dtype == torch.uint8:
            # The tables' float32 operations in the same order, so the values are identical (tested).
            f32 = {"dtype": torch.float32, "device": device}
            mean = torch.tensor(self.mean, **f32)[:, None, None]
            std = torch.tensor(self.std, **f32)[:, None, None]
            tensor = (tensor.to(torch.float32) * torch.tensor(self.rescale_factor, **f32) - mean) / std
        return tensor.to(dtype)

    @property
    def _tables(self) -> np.ndarray:
        values = np.arange(256, dtype=np.float32)[None, :] * np.float32(self.rescale_factor)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None]
        return (values - mean) / np.asarray(self.std, dtype=np.float32)[:, None]


def peek_transform(model_name: str) -> ImageTransform | None:
    """The transform of model `model_name` from its processor file on this machine, before (and
    without) loading the model, so decoding can start while it loads; None if that is not possible."""
    from retrieval.loading import local_file

    for filename in ("preprocessor_config.json", "processor_config.json"):
        path = local_file(model_name, filename)
        if path is not None:
            return ImageTransform.from_config_file(path)
    return None
