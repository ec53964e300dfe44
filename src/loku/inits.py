"""LoRA initialisations by name (`--init`): how the adapters start. Add one with `register_init`: its
`start(model, plan, pairs, cfg, progress)` takes the plain model, the `LoraPlan`, the first epoch's (forget,
retain) batches if it `needs_batches` and the run's config; it returns the peft model and, if it
`rewrites_base`, the starting factors {module: (A0, B0)} that `loku.fila.export_original_adapter` needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .fila import fila_init
from .lora import wrap_lora
from .registry import Registry


@dataclass(frozen=True)
class Init:
    name: str
    summary: str
    start: Callable
    needs_batches: bool = False   # a pass over the first epoch's batches (Fisher statistics) before training
    rewrites_base: bool = False   # then "adapters off" is no longer the start model


INITS: Registry[Init] = Registry("init")


def register_init(name: str, summary: str, start: Callable, **flags) -> None:
    INITS.register(name, Init(name, summary, start, **flags))


def _fisher_init(kind: str) -> Callable:
    def start(model, plan, pairs, cfg, progress: bool):
        on_cpu = {"device": "cpu"} if cfg.fisher_on_cpu and kind == "fila" else {}   # VILA's sums are rank-sized
        return fila_init(model, pairs, plan=plan, method=kind, eps=cfg.fisher_eps, svd=cfg.fila_svd,
                         cache=cfg.fisher_cache, progress=progress, **on_cpu)
    return start


register_init("default", "peft's LoRA start: A random, B = 0",
              lambda model, plan, pairs, cfg, progress: (wrap_lora(model, plan), None))
register_init("fila", "LoKU's FILA: factors from the Fisher importance of forget over retain", _fisher_init("fila"),
              needs_batches=True, rewrites_base=True)
register_init("vila", "VILA: FILA from the Fisher variance over random LoRA factors (cheaper)", _fisher_init("vila"),
              needs_batches=True, rewrites_base=True)
