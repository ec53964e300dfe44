"""Typed run configuration: validated on construction; YAML is only its saved form."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import LokuError


@dataclass
class UnlearnConfig:
    """Everything one unlearning run needs; `loku unlearn` flags and YAML keys share these names."""

    forget: str = ""                     # file of data to forget (.csv/.jsonl/.json/.txt)
    retain: str | None = None            # file of data to keep; needed by every method but ga
    allow_overlap: bool = field(default=False, metadata={"help": (
        "Train even when forget and retain share examples (refused by default: the model cannot both forget "
        "and keep them).")})
    model: str = "smollm2-135m"          # hub id, local directory, .gguf file or embedded name
    out: str = ""                        # new run directory
    method: str = "ihl"
    text_column: str = "text"
    refusals: str | None = None          # idk: file of refusal answers, one a line (default: built-in)
    max_length: int = 256
    lora: bool = True                    # False: full fine-tuning
    lora_rank: int = 8
    lora_alpha: float | None = None      # default 2 * rank
    lora_targets: list[str] | None = None  # default: every linear layer but the output head
    init: str = "auto"                   # auto | default | fila | vila (auto: fila for ihl with LoRA)
    fisher_eps: float = 1e-5
    fila_svd: str = "exact"              # exact | randomized (much faster on large layers)
    fisher_cache: str | None = None      # safetensors file of Fisher statistics, reused when it matches
    fisher_on_cpu: bool = False          # FILA's two fp32 Fisher sums in CPU memory (large models on one GPU)
    epochs: int = 5
    lr: float = 2e-4
    batch_size: int = 8
    retain_batch_size: int | None = None
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    divergence_bound: float = 20.0       # ascent methods: forget cross-entropy (nats) past which a run is reported diverged
    retain_weight: float = 1.0
    npo_beta: float = 0.1
    simnpo_beta: float = 4.5
    simnpo_gamma: float = 0.125
    seed: int = 0
    mixed_precision: str | None = None   # no | bf16 | fp16; None: the launch config's, else no
    save_merged: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    save_every: int = 0                  # checkpoint every N steps (0: each epoch only)
    extra: dict = field(default_factory=dict)  # free-form notes carried into the saved config

    def __post_init__(self):
        from .losses import METHODS

        _check_types(self)
        METHODS[self.method]  # raises with "did you mean"
        positive = {"lora_rank": self.lora_rank, "epochs": self.epochs, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "max_length": self.max_length}
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                default = next(f.default for f in dataclasses.fields(self) if f.name == name)
                raise LokuError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}: pass "
                                f"--{name.replace('_', '-')} 1 or more (default {default})")
        if not self.lr > 0:
            raise LokuError(f"lr must be positive, got {self.lr!r}: pass e.g. --lr 2e-4")
        if self.init not in ("auto", "default", "fila", "vila"):
            raise LokuError(f"unknown init {self.init!r}: choose auto, default, fila or vila")
        if self.fila_svd not in ("exact", "randomized"):
            raise LokuError(f"unknown fila_svd {self.fila_svd!r}: choose exact or randomized")
        if self.init in ("fila", "vila") and not self.lora:
            raise LokuError(f"--init {self.init} initialises LoRA adapters: drop --full or use --init default")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise LokuError(f"unknown mixed precision {self.mixed_precision!r}: choose no, bf16 or fp16")

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def resolved_init(self) -> str:
        if not self.lora:
            return "none"
        if self.init == "auto":
            return "fila" if self.method == "ihl" and _fila_available() else "default"
        return self.init

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "UnlearnConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise LokuError(f"{source}: unknown key {key!r}{hint}: valid keys are {', '.join(names)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "UnlearnConfig":
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8-sig")
            data = yaml.safe_load(text) or {}
        except FileNotFoundError:
            raise LokuError(f"config file {path} does not exist: check the path") from None
        except IsADirectoryError:
            raise LokuError(f"config {path} is a directory: pass a YAML file") from None
        except UnicodeDecodeError:
            raise LokuError(f"config file {path} is not UTF-8 text: save it as UTF-8 YAML") from None
        except yaml.YAMLError as e:
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise LokuError(f"{path}{where} is not valid YAML ({problem or ' '.join(str(e).split())}): "
                            "fix the file") from None
        if not isinstance(data, dict):
            raise LokuError(f"{path} must hold a mapping of option: value (one `key: value` a line), "
                            f"not a YAML {type(data).__name__}")
        try:
            return cls.from_dict(data, source=str(path))
        except LokuError as e:
            if str(e).startswith(str(path)):
                raise
            raise LokuError(f"{path}: {e}") from None


# What each annotation accepts; YAML 1.1 reads `1e-4` (no dot) as a string, so floats take numeric text.
_KINDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
          "list[str]": "a list of strings", "dict": "a mapping"}
_SAMPLES = {"str": "file.csv", "int": 1, "float": 1.0, "bool": True, "list[str]": ["q_proj", "v_proj"],
            "dict": {"note": "..."}}


def _check_types(cfg: UnlearnConfig) -> None:
    """Raise LokuError naming the field, the value and the expected type; coerce numbers to float."""
    for f in dataclasses.fields(cfg):
        kind, optional = str(f.type).replace(" | None", ""), "None" in str(f.type)
        value = getattr(cfg, f.name)
        if value is None and optional:
            continue
        ok = {"str": lambda v: isinstance(v, str),
              "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool),
              "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
              "dict": lambda v: isinstance(v, dict)}.get(kind)
        if kind == "str" and isinstance(value, os.PathLike):   # Path objects from the Python API
            setattr(cfg, f.name, os.fspath(value))
            continue
        if kind == "float":
            number = _as_float(value)
            if number is not None:
                setattr(cfg, f.name, number)
                continue
        elif ok is not None and ok(value):
            continue
        sample = f.default if f.default not in (None, dataclasses.MISSING) else _SAMPLES.get(kind)
        example = f"{f.name}: {json.dumps(sample)}"   # JSON is YAML, and reads unambiguously
        raise LokuError(f"{f.name} must be {_KINDS.get(kind, kind)}{' or null' if optional else ''}, got "
                        f"{value!r}: write e.g. `{example}`")


def _as_float(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _fila_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("loku.fila") is not None
