"""Checkpoints that ship with blipsearch: the small BLIP-2 trained by `blipsearch train` on the
synthetic shapes data (see retrieval/train). Standard transformers directories, loaded like any other."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES_RETRIEVAL = HERE / "blip2-itm-shapes"  # Blip2ForImageTextRetrieval
SHAPES_CAPTION = HERE / "blip2-opt-shapes"  # Blip2ForConditionalGeneration
