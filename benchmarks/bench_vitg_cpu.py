"""A model of `Salesforce/blip2-itm-vit-g`'s size on the CPU: a search whose ITM re-ranking recomputes
each candidate's ViT features from its file (baseline) against one that finds them in the feature
cache that indexing filled (`index --feature-cache-mb`), as whole `blipsearch search` processes,
best of 2; and what indexing costs an image in float32 and bfloat16.

The hub cannot be reached from this project's machines, so the model is built here with random
weights from the real architecture (ViT-g/14: 39 layers of width 1408 at 224 px; a 12-layer
Q-Former of width 768 with 32 queries; 256-d ITC; 1.17 B parameters, 4.4 GiB in float32) and saved
in the real layout; `--model DIR` uses another (the real one, where it is downloaded). Random weights
cost the same time as trained ones; the rankings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from indexer.demo import make_demo_images

# ViT-g/14 as BLIP-2 uses it (transformers' Blip2VisionConfig), in both checkpoints
VISION_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)


def build_model(directory: Path) -> Path:
    import torch
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor, Blip2QFormerConfig

    from retrieval.tiny import bert_tokenizer, image_processor, quiet

    quiet()  # no progress bar on saving
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = bert_tokenizer(Path(scratch))
    qformer = Blip2QFormerConfig(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408,
                                 max_position_embeddings=512, use_qformer_text_input=True, pad_token_id=0)
    config = Blip2Config(vision_config=VISION_G, qformer_config=qformer.to_dict(), num_query_tokens=32,
                         image_text_hidden_size=256)
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.02)  # transformers starts them at zero: 32 identical queries
    model.save_pretrained(directory)
    Blip2Processor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(directory)
    return directory


def build_captioner(directory: Path) -> Path:
    """`Salesforce/blip2-opt-2.7b`'s architecture: ViT-g, the Q-Former, OPT-2.7b (32 layers of width
    2560). The tokenizer is the tiny checkpoints' (about 400 tokens), so the language model's output
    layer is that wide instead of 50,272: about 5% less computation a token."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig, OPTConfig

    from retrieval.tiny import bpe_tokenizer, image_processor, quiet

    quiet()
    processor = Blip2Processor(image_processor=image_processor(), tokenizer=bpe_tokenizer(), num_query_tokens=32)
    tokenizer = processor.tokenizer
    qformer = Blip2QFormerConfig(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408)
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                     num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    config = Blip2Config(vision_config=VISION_G, qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=32, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def blipsearch(*args: str) -> tuple[float, str]:
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, check=True)
    return time.perf_counter() - began, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--model", type=Path, default=None, help="a retrieval checkpoint (default: built here)")
    parser.add_argument("--caption", action="store_true",
                        help="also caption the images with a model of blip2-opt-2.7b's size (15 GB, built here)")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="caption length (random weights never stop)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    try:
        model = args.model or build_model(work / "model")
        make_demo_images(work / "images", args.images)
        cache_mb = str(args.images * 2)  # room for every image's features (0.72 MB each for ViT-g)
        index_seconds = {}
        for dtype in ("float32", "bfloat16"):
            _, out = blipsearch("index", str(work / "images"), "--index", str(work / f"idx-{dtype}"), "--model",
                                str(model), "--json", "-q", "--dtype", dtype, "--feature-cache-mb", cache_mb)
            index_seconds[dtype] = json.loads(out)["seconds"]["model"] / args.images
        query = ["search", "a small red circle", "--index", str(work / "idx-float32"), "-k", "5", "--json"]
        recomputed = min(blipsearch(*query, "--feature-cache-mb", "0")[0] for _ in range(2))
        cached = min(blipsearch(*query)[0] for _ in range(2))
        loading = min(blipsearch(*query, "--no-rerank")[0] for _ in range(2))
        print(f"model of blip2-itm-vit-g's size, {args.images} images, CPU:")
        print(f"  index, model time an image: float32 {index_seconds['float32']:.2f} s, "
              f"bfloat16 {index_seconds['bfloat16']:.2f} s")
        print(f"  search re-ranking {min(args.images, 32)} candidates, whole process (best of 2):")
        print(f"    ViT recomputed from the files: {recomputed:6.1f} s")
        print(f"    features from the cache:       {cached:6.1f} s")
        print(f"    no re-ranking (start, load):   {loading:6.1f} s")
        print(f"ratio recomputed / cached: {recomputed / cached:.1f}x "
              f"(re-ranking alone: {(recomputed - loading) / max(cached - loading, 1e-3):.0f}x)")
        if args.caption:
            captioner = build_captioner(work / "captioner")
            for dtype in ("float32", "bfloat16"):
                seconds, out = blipsearch("caption", "--index", str(work / f"idx-{dtype}"), "--caption-model",
                                          str(captioner), "--json", "-q", "--dtype", dtype,
                                          "--max-new-tokens", str(args.max_new_tokens))
                done = json.loads(out)["captioned"]
                print(f"  caption, {args.max_new_tokens} new tokens each, {dtype}: {done} images in {seconds:.0f} s "
                      f"(whole process), {seconds / max(done, 1):.1f} s an image")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
