"""LoRA initialisations by name (`--init`): how the adapters start. Add one with `register_init`.

An initialisation takes the plain model, the resolved `LoraPlan`, the first epoch's (forget, retain)
batches when it `needs_batches`, and the run's config; it returns the peft model and, when it
`rewrites_base` (the base weights become a residual), the starting factors {module: (A0, B0)} that
`loku.fila.export_original_adapter` needs to write an adapter for the original weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .fila import Factors, fila_init
from .lora import LoraPlan, wrap_lora
from .registry import Registry

Start = Callable[..., "tuple[object, Factors | None]"]   # (model, plan, pairs, cfg, progress) -> (peft model, factors)


@dataclass(frozen=True)
class Init:
    name: str
    summary: str
    start: Start
    needs_batches: bool = False   # a pass over the first epoch's batches (Fisher statistics) before training
    rewrites_base: bool = False   # base weights become a residual: the start model is no longer "adapters off"


INITS: Registry[Init] = Registry("init")


def register_init(name: str, summary: str, **flags):
    def wrap(fn: Start) -> Start:
        INITS.register(name, Init(name, summary, fn, **flags))
        return fn
    return wrap


@register_init("default", "peft's LoRA start: A random, B = 0")
def _default(model, plan: LoraPlan, pairs, cfg, progress: bool):
    return wrap_lora(model, plan), None


def _fisher_init(kind: str) -> Start:
    def start(model, plan: LoraPlan, pairs, cfg, progress: bool):
        on_cpu = {"device": "cpu"} if cfg.fisher_on_cpu and kind == "fila" else {}   # VILA's sums are rank-sized
        return fila_init(model, pairs, plan=plan, method=kind, eps=cfg.fisher_eps, svd=cfg.fila_svd,
                         cache=cfg.fisher_cache, progress=progress, **on_cpu)
    return start


for _kind, _summary in (("fila", "LoKU's FILA: factors from the Fisher importance of forget over retain"),
                        ("vila", "VILA: FILA from the Fisher variance over random LoRA factors (cheaper)")):
    register_init(_kind, _summary, needs_batches=True, rewrites_base=True)(_fisher_init(_kind))
