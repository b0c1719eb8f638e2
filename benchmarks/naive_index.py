"""The baseline for bench_index: what a first script would do. One image at a time: open, the
checkpoint's processor, ViT -> Q-Former -> projection, keep the vectors. No catalog, no FAISS.

Run: python -m benchmarks.naive_index MODEL_DIR OUT.npy IMAGE...
"""

from __future__ import annotations

import sys

import numpy as np


def main(model_dir: str, out: str, paths: list[str]) -> None:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    model = Blip2ForImageTextRetrieval.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    vectors = []
    for path in paths:
        pixels = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            vit = model.vision_model(pixel_values=pixels).last_hidden_state
            queries = model.qformer(query_embeds=model.query_tokens, encoder_hidden_states=vit).last_hidden_state
            vectors.append(torch.nn.functional.normalize(model.vision_projection(queries), dim=-1)[0].numpy())
    np.save(out, np.stack(vectors))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
