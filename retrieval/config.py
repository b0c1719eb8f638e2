"""Model settings, built once at the edge and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_RETRIEVAL_MODEL = "Salesforce/blip2-itm-vit-g"
DEFAULT_CAPTION_MODEL = "Salesforce/blip2-opt-2.7b"
# LAVIS truncates ITC/ITM text to 35 tokens (blip2_qformer.py: max_txt_len=32 + specials); we follow it.
DEFAULT_MAX_TEXT_TOKENS = 35

ENV_MODEL = "BLIPSEARCH_MODEL"
ENV_CAPTION_MODEL = "BLIPSEARCH_CAPTION_MODEL"
ENV_DEVICE = "BLIPSEARCH_DEVICE"

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to load and where to run it.

    `name` is a hub id or a local directory: both go through the same loader.
    `device`/`dtype` may be "auto": CUDA with fp16 when present, else CPU with fp32.
    """

    name: str = DEFAULT_RETRIEVAL_MODEL
    device: str = "auto"
    dtype: str = "auto"
    max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS

    def __post_init__(self) -> None:
        # An index records its model's name for later runs, and the catalog each caption's model: a
        # directory given relative to this folder ('models/blip2') would name nothing to a run from
        # another one (cron's). Symbolic links are kept, so a link moved to a new model is followed.
        directory = os.path.expanduser(self.name)
        if os.path.isdir(directory):
            object.__setattr__(self, "name", os.path.abspath(directory))

    @classmethod
    def retrieval(cls, name: str | None = None, device: str | None = None, dtype: str | None = None) -> "ModelConfig":
        return cls(
            name=name or os.environ.get(ENV_MODEL) or DEFAULT_RETRIEVAL_MODEL,
            device=device or os.environ.get(ENV_DEVICE) or "auto",
            dtype=dtype or "auto",
        )

    @classmethod
    def captioning(cls, name: str | None = None, device: str | None = None, dtype: str | None = None) -> "ModelConfig":
        return cls(
            name=name or os.environ.get(ENV_CAPTION_MODEL) or DEFAULT_CAPTION_MODEL,
            device=device or os.environ.get(ENV_DEVICE) or "auto",
            dtype=dtype or "auto",
        )
