"""Load BLIP-2 checkpoints from a hub id or a local directory through one code path.

`from_pretrained` already accepts both; what this module adds is the user-facing contract: a
missing model becomes one `ModelNotFoundError` that says where we looked and what to do,
instead of a traceback after half a minute of network retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from retrieval.config import DTYPES, DEVICES, ModelConfig
from retrieval.errors import ModelNotFoundError, UsageError


@dataclass(frozen=True)
class ModelIdentity:
    """What an index records about the model that made its vectors, to refuse mixing models."""

    name: str
    fingerprint: str
    embed_dim: int
    num_queries: int


@dataclass(frozen=True)
class Loaded:
    model: Any
    processor: Any
    device: str
    dtype: Any  # torch.dtype


def resolve_device(requested: str) -> str:
    import torch

    if requested not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}, not {requested!r}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return requested


def resolve_dtype(requested: str, device: str):
    import torch

    if requested not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {requested!r}")
    if requested == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, requested)


def hub_cache_dir() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return HF_HUB_CACHE


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (./x, /abs, a/b/c, ~/x) can only be a path."""
    return not _HUB_ID.match(name) or name.startswith(".")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub, so an offline machine fails in seconds, not after minutes of retries."""
    from huggingface_hub.constants import ENDPOINT, HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        return False
    url = urlparse(ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_findable(name: str, option: str = "--model", architecture: str | None = None) -> None:
    """Raise ModelNotFoundError at once when model `name` cannot be loaded: a directory without a
    config.json, a path that is no directory, a hub id neither cached nor reachable, or a checkpoint
    of the other BLIP-2 class than `architecture`. It imports neither torch nor transformers, so a
    mistyped model is told in about a second, not after the libraries' imports (5-7 s on two cores)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(name, str(path.absolute()), "the directory has no config.json", option=option,
                                     local=True)
        _require_architecture(name, path / "config.json", architecture, option)
        return
    if _looks_like_path(name) or path.exists():
        reason = "a file, not a directory" if path.exists() else "no such directory"
        raise ModelNotFoundError(name, str(path.absolute()), reason, option=option, local=True)
    cached_config = local_file(name, "config.json")
    if cached_config is None and not _hub_reachable():
        raise ModelNotFoundError(name, hub_cache_dir(), "the model hub cannot be reached", option=option)
    if cached_config is not None:
        _require_architecture(name, cached_config, architecture, option)


# BLIP-2 classes whose checkpoints lack the other's parts. Only these are refused: a checkpoint
# that names some other class (a conversion, a fine-tune) is left for from_pretrained to judge.
_LACKS_PARTS_OF = {
    "Blip2ForImageTextRetrieval": {"Blip2ForConditionalGeneration"},
    "Blip2ForConditionalGeneration": {"Blip2ForImageTextRetrieval"},
}


def _require_architecture(name: str, config_file: Path, architecture: str | None, option: str) -> None:
    # transformers would build the class anyway, with random weights for every part the checkpoint
    # lacks: a caption model passed as --model would index with untrained ITC heads, silently.
    try:
        written_for = set(json.loads(config_file.read_text()).get("architectures") or [])
    except (OSError, ValueError, AttributeError):
        return  # from_pretrained reports an unreadable config in its own words
    if written_for and written_for <= _LACKS_PARTS_OF.get(architecture or "", set()):
        raise ModelNotFoundError(name, str(config_file.parent.absolute()),
                                 f"its config.json is for {', '.join(sorted(written_for))}, not {architecture}",
                                 option=option, local=True)


def _from_pretrained(cls: Any, name: str, option: str = "--model", **kwargs: Any) -> Any:
    """`cls.from_pretrained(name)` for a directory or a hub id that `require_findable` passed; local
    files and the cache first. A missing model's error tells the user to pass `option`, the
    command-line option that names it."""
    from safetensors import SafetensorError  # a corrupt or truncated weights file

    load_errors = (OSError, ValueError, SafetensorError)
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return cls.from_pretrained(str(path), **kwargs)
        except load_errors as exc:
            raise ModelNotFoundError(name, str(path.absolute()), _first_line(exc), option=option, local=True) from exc
    try:
        return cls.from_pretrained(name, local_files_only=True, **kwargs)
    except load_errors:
        pass
    if not _hub_reachable():
        raise ModelNotFoundError(name, hub_cache_dir(), "the model hub cannot be reached", option=option)
    try:
        return cls.from_pretrained(name, **kwargs)
    except load_errors as exc:
        raise ModelNotFoundError(name, hub_cache_dir(), _first_line(exc), option=option) from exc


def local_file(name: str, filename: str) -> Path | None:
    """`filename` of model `name` if it is on this machine (a directory, or the hub cache); no network."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    if _looks_like_path(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, filename)
    return Path(cached) if isinstance(cached, str) else None


def _first_line(exc: BaseException) -> str:
    """The error's first line; its first sentence where the line is long (transformers' advice about the
    hub, on a local directory, would be cut mid-sentence)."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    line = text[0].split(". ")[0] if len(text[0]) > 200 else text[0]
    return line[:200].rstrip(".")


def _quiet_hub_logs() -> None:
    # Retry chatter and per-load progress bars would bury our own output and one-sentence errors.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


# the command-line option that names a model of this class, where it is not --model
OPTION_OF = {"Blip2ForConditionalGeneration": "--caption-model"}


def load(model_cls_name: str, config: ModelConfig) -> Loaded:
    """Load `transformers.<model_cls_name>` and its processor on the configured device and dtype."""
    option = OPTION_OF.get(model_cls_name, "--model")
    require_findable(config.name, option, model_cls_name)
    import torch
    import transformers

    _quiet_hub_logs()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model_cls = getattr(transformers, model_cls_name)
    if dtype == torch.bfloat16 and model_cls._keep_in_fp32_modules:
        # transformers keeps the query tokens and the Q-Former in fp32 for fp16 loads only. Kept for
        # bf16 too, the Q-Former computes as in fp16 runs, and the fingerprint (which reads them)
        # stays the model's: an index built in fp32 or fp16 refused --dtype bfloat16 as another model.
        model_cls = type(model_cls.__name__, (model_cls,),
                         {"_keep_in_fp32_modules_strict": set(model_cls._keep_in_fp32_modules)})
    model = _from_pretrained(model_cls, config.name, option, dtype=dtype)
    processor = _from_pretrained(transformers.AutoProcessor, config.name, option)
    _require_tokenizer(processor.tokenizer, config.name, option, pads=model_cls_name == "Blip2ForImageTextRetrieval")
    model.to(device).eval()
    return Loaded(model=model, processor=processor, device=device, dtype=dtype)


def _require_tokenizer(tokenizer: Any, name: str, option: str, pads: bool) -> None:
    """transformers loads a checkpoint whose tokenizer files are missing anyway. Without tokenizer.json
    (and vocab.txt) it builds a BertTokenizer of its special tokens alone, which reads every word as
    [UNK]: every query embeds alike and searches return noise, silently. Without tokenizer_config.json
    it may guess another tokenizer class, with no padding token, which batches of texts need."""
    where = str(Path(name).expanduser().absolute()) if Path(name).expanduser().is_dir() else name
    if len(tokenizer) - len(set(tokenizer.all_special_ids)) < 2:
        raise ModelNotFoundError(name, where, "its tokenizer has no vocabulary (tokenizer.json or vocab.txt is "
                                 "missing); download the model again", option=option, local=True)
    if pads and tokenizer.pad_token is None:
        raise ModelNotFoundError(name, where, "its tokenizer has no padding token (tokenizer_config.json is "
                                 "missing?); download the model again", option=option, local=True)


def fingerprint(model: Any) -> str:
    """A short hash of weights that every load keeps in fp32 (query tokens, Q-Former norm).

    Hashing parameters rather than files makes a hub id and a downloaded copy of it agree, and tells
    two checkpoints with the same config but different weights apart.
    """
    digest = hashlib.sha256()
    for tensor in (model.query_tokens, model.qformer.layernorm.weight, model.qformer.layernorm.bias):
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
