"""Tiny BLIP-2 checkpoints with random weights, in the real checkpoints' file layout.

The model hubs are out of reach offline, so tests and first-time users build these instead. Each is
written with `save_pretrained` (config, safetensors, processor, tokenizer) and read back through the
very loader that reads `Salesforce/blip2-itm-vit-g` and `Salesforce/blip2-opt-2.7b`. The configs
mirror the real ones' structure: 224 px images in 14 px patches, 32 query tokens, a BERT WordPiece
tokenizer with a `[DEC]` bos token for the Q-Former (retrieval, `use_qformer_text_input=True`), and an
OPT decoder with a byte-level BPE tokenizer and an `<image>` placeholder token (captioning).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

RETRIEVAL_DIR = "blip2-itm-tiny"
CAPTION_DIR = "blip2-opt-tiny"

# Enough words that the tests' and the demo's sentences tokenize into whole words.
_WORDS = """a an the of in on at with and or not no to is are photo picture image two three four one
red green blue yellow orange purple black white gray brown pink small large big tiny circle square
triangle star cat cats dog dogs car cars tree trees house sky sea beach mountain city street person
people man woman child bird birds flower flowers sunset night day snow water boat bike food table
above below left right near next top bottom background dark light striped plain bright""".split()


def bert_tokenizer(directory: Path, words: list[str] = _WORDS):
    """A BERT WordPiece tokenizer over letters and `words`, with BLIP-2's `[DEC]` bos token."""
    import inspect

    from transformers import BertTokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punctuation = list(".,!?'\"-:;()")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + punctuation
    vocab += ["##" + ch for ch in letters] + sorted(set(words) - set(letters) - set(vocab))
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
        tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    else:
        vocab_file = directory / "vocab.txt"
        vocab_file.write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def bpe_tokenizer(corpus: list[str] | None = None):
    """A byte-level BPE tokenizer with OPT's special tokens, trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar is three blank lines when stdout is not a terminal
    )
    corpus = corpus or [" ".join(_WORDS)] * 4 + [f"a photo of a {w}" for w in _WORDS]
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def image_processor(size: int = 224):
    from transformers import BlipImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return BlipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD
    )


def _vision_and_qformer(vocab_size: int, use_text_input: bool):
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True,
    )
    qformer = Blip2QFormerConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, cross_attention_frequency=2, max_position_embeddings=64,
        use_qformer_text_input=use_text_input, pad_token_id=0,
    )
    return vision, qformer


def _randomize(model, seed: int) -> None:
    """Seeded fan-in scaled weights, so random features still depend on the image and the text.

    transformers' own init leaves some tiny-config weights near zero (the patch embedding) and the
    query tokens at exactly zero, which would make every image and all 32 queries look the same.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "query_tokens":
                param.copy_(torch.randn(param.shape, generator=generator))
            elif param.dim() >= 2:
                fan_in = param[0].numel() if param.dim() > 2 or "embed" not in name else param.shape[1]
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
            elif "norm" in name.lower() and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def make_retrieval(directory: str | Path, seed: int = 0) -> Path:
    """A tiny `Blip2ForImageTextRetrieval` checkpoint like Salesforce/blip2-itm-vit-g."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor

    quiet()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = bert_tokenizer(Path(scratch))
    processor = Blip2Processor(image_processor=image_processor(), tokenizer=tokenizer)
    vision, qformer = _vision_and_qformer(len(processor.tokenizer), use_text_input=True)
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
        num_query_tokens=32, image_text_hidden_size=16,
    )
    model = Blip2ForImageTextRetrieval(config).eval()
    _randomize(model, seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def make_captioner(directory: str | Path, seed: int = 0) -> Path:
    """A tiny `Blip2ForConditionalGeneration` checkpoint like Salesforce/blip2-opt-2.7b."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig

    quiet()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    processor = Blip2Processor(image_processor=image_processor(), tokenizer=bpe_tokenizer(), num_query_tokens=32)
    tokenizer = processor.tokenizer
    vocab_size = len(tokenizer)
    vision, qformer = _vision_and_qformer(30523, use_text_input=False)
    text = OPTConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=32, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(config).eval()
    _randomize(model, seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def make_tiny(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Both checkpoints under `directory`; returns (retrieval_dir, caption_dir)."""
    directory = Path(directory)
    return make_retrieval(directory / RETRIEVAL_DIR, seed), make_captioner(directory / CAPTION_DIR, seed)
