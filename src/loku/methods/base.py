"""What every method is made of: the loop's outputs (`LossInputs`), the method's description (`Method`), the
registry, and `method_loss`, the loop's one call.

Adding a method is one function and, if it has settings, one settings class, in the module of its family:

    @dataclass(frozen=True)
    class MySettings:
        beta: float = setting(1.0, "what beta does.", bound="positive")

    @method("mine", "one line for `loku list methods`", settings=MySettings, needs_retain=True)
    def mine(x: LossInputs, s: MySettings):
        return {"forget": some_loss(x.forget_logits, x.forget_labels, s.beta), "retain": retain_ce(x)}

A method returns its terms unweighted; `method_loss` multiplies the forget term by `forget_weight` (None:
the method's own default) and the retain term by `retain_weight` (or by the method's dual variable, for the
constrained methods that adapt it), and adds "loss". Every setting becomes the config key and flag
`<method>_<setting>` (`mine_beta`, `--mine-beta`) of `UnlearnConfig`.

Methods that need more than logits say so in their `Method` fields, and the loop provides it through
`loku.methods.run.MethodRun` (hidden states through forward hooks, a set-up before training, their own
backward pass); see that module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config_base import hints
from ..losses import cross_entropy
from ..registry import Registry


@dataclass
class LossInputs:
    """What the loop hands a method: model outputs on the forget (and retain) batch, and the frozen
    start model's outputs where the method needs them.

    Hidden states (`*_hidden`) are keyed by the method's taps (`Method.taps`): module name, or
    "name:input" for a module's input. `alt_*`: the forget questions answered with refusals (DPO's preferred
    answers), row for row with the forget batch. `state`: the method's `MethodState` (dual variables, a
    control vector, a classifier head), kept by the loop across steps."""

    forget_logits: torch.Tensor
    forget_labels: torch.Tensor
    retain_logits: torch.Tensor | None = None
    retain_labels: torch.Tensor | None = None
    ref_forget_logits: torch.Tensor | None = None
    ref_retain_logits: torch.Tensor | None = None
    forget_attention: torch.Tensor | None = None
    retain_attention: torch.Tensor | None = None
    forget_hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    retain_hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    ref_forget_hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    ref_retain_hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    alt_logits: torch.Tensor | None = None
    alt_labels: torch.Tensor | None = None
    ref_alt_logits: torch.Tensor | None = None
    state: "MethodState | None" = None


@dataclass
class MethodState:
    """What a method keeps between steps. `values` (numbers) and `tensors` are saved in checkpoints and put
    back on resume; `cache` (modules, masks, taps) is rebuilt by the method's set-up."""

    values: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    retain_weight: float | None = None   # the dual variable that replaces retain_weight (pdu, sibl)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[LossInputs, object], dict[str, torch.Tensor]]   # unweighted terms: "forget" (and "retain")
    summary: str
    settings: type | None = None       # dataclass of the method's own settings
    needs_retain: bool = False
    needs_reference: bool = False      # forward passes of the frozen start model
    reference_on: tuple[str, ...] = ("forget", "retain", "alt")   # the batches whose frozen outputs it reads
    forget_answers: str | None = None  # "idk": forget questions are answered with refusals; "idk-pair": both
    ascent: bool = False               # the forget term is -cross-entropy: unbounded below, so divergence is watched
    forget_mean_over: str = "tokens"   # what the forget term averages: "tokens" or "sequences" (NPO, SimNPO)
    default_init: str = "default"      # the LoRA initialisation `--init auto` picks
    forget_weight: float = 1.0         # the forget term's coefficient unless the config sets forget_weight
    units: Callable[[object], dict[str, Any]] | None = None   # per-term mean units when they depend on settings
    # ---- what the loop does beyond one forward pass per batch (loku.methods.run) ----
    check: Callable[[object, object], None] | None = None   # (settings, cfg): refuse a config before anything runs
    reference: Callable[[object], bool] | None = None       # needs_reference that depends on the settings (gru)
    taps: Callable[[object, Any], list[str]] | None = None  # (settings, model) -> module names whose outputs it reads
    trainable: Callable[[object, Any], list[str]] | None = None   # (settings, model) -> the only modules that train
    adapters: bool = True              # False: no LoRA is added; the method trains its own module (t3)
    setup: Callable[..., None] | None = None      # (settings, ctx: SetupContext, state) before the LoRA set-up
    attach: Callable[..., None] | None = None     # (settings, model, state) after it, on the model that trains
    prestep: Callable[..., None] | None = None    # (settings, model, retain batch, state) before a step's forwards
    backward: Callable[..., None] | None = None   # (settings, terms, backward, params, state, sync) for loss.backward
    epoch_end: Callable[..., None] | None = None  # (settings, state, epoch, retain_loss: () -> float)
    save: Callable[..., None] | None = None       # (settings, model, state, directory): what the method adds to a run
    edits_base: bool = False           # set-up rewrites the base weights: the run also writes the merged model
    single_process: bool = False       # its gradient surgery needs one process's whole gradients (gru, sibl)
    double_backward: bool = False      # differentiates its gradient (sibl): forwards on the math attention kernel

    def settings_of(self, cfg=None):
        """This method's settings from a config's `<method>_<setting>` values (defaults without a config)."""
        if self.settings is None:
            return None
        if cfg is None:
            return self.settings()
        return self.settings(**{f.name: getattr(cfg, f"{self.name}_{f.name}")
                                for f in dataclasses.fields(self.settings)})

    def uses_reference(self, cfg=None) -> bool:
        """Whether a run of this method with `cfg`'s settings needs the frozen start model."""
        return self.reference(self.settings_of(cfg)) if self.reference is not None else self.needs_reference


METHODS: Registry[Method] = Registry("method")


def method(name: str, summary: str, **flags):
    def wrap(fn):
        METHODS.register(name, Method(name, fn, summary, **flags))
        return fn
    return wrap


def get_method(name: str) -> Method:
    return METHODS[name]


def forget_weight(m: Method, cfg) -> float:
    value = getattr(cfg, "forget_weight", None) if cfg is not None else None
    return m.forget_weight if value is None else value


def method_loss(m: Method, x: LossInputs, cfg) -> dict[str, torch.Tensor]:
    """The method's terms on one batch, each times its weight, and their sum as "loss". The training loop
    calls only this: weights and settings come from `cfg` (an UnlearnConfig) in this one place. A method's
    dual variable (`x.state.retain_weight`, read before the method updates it) replaces retain_weight;
    any further term (a constant penalty) counts once."""
    retain = getattr(cfg, "retain_weight", 1.0) if cfg is not None else 1.0
    if x.state is not None and x.state.retain_weight is not None:
        retain = x.state.retain_weight
    weights = {"forget": forget_weight(m, cfg), "retain": retain}
    terms = m.fn(x, m.settings_of(cfg))
    weighted = {k: weights.get(k, 1.0) * v for k, v in terms.items()}
    return {"loss": sum(weighted.values()), **weighted}


def loss_units(m: Method, cfg=None) -> dict[str, Any]:
    """What each term averages over (`loku.losses.unit_counts`): the loop weighs processes and micro-batches
    by these counts so that a step's gradient is that of one mean over everything it saw."""
    if m.units is not None:
        return m.units(m.settings_of(cfg))
    return {"forget": m.forget_mean_over, "retain": "tokens"}


def setting_fields() -> list[tuple[str, type, dataclasses.Field]]:
    """(config key, type, field) of every registered method's settings: `npo_beta`, `simnpo_margin`, ...
    `UnlearnConfig` adds these as its own fields, so each is a YAML key and a flag."""
    out = []
    for name, m in METHODS.items():
        if m.settings is None:
            continue
        types = hints(m.settings)
        for f in dataclasses.fields(m.settings):
            info = dict(f.metadata)
            info["help"] = f"{name}: {info.get('help', '')}"
            info.setdefault("group", "Method settings")
            out.append((f"{name}_{f.name}", types[f.name], dataclasses.field(default=f.default, metadata=info)))
    return out


def retain_ce(x: LossInputs) -> torch.Tensor:
    return cross_entropy(x.retain_logits, x.retain_labels)
