"""Set-up of a training run, in the order it happens: settings and accelerator, batches, model (LoRA plan and
initialisation), frozen reference, optimizer and schedule."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from .. import models
from ..data.batches import PairedBatches
from ..data.text import tokenize_examples
from ..distributed import launched, prepare_reference, start_accelerator
from ..errors import LokuError
from ..inits import INITS
from ..lora import plan_lora
from ..methods import MethodRun, set_trainable
from ..models import check_max_length, check_tokenizer_fits, ensure_pad_token
from .step import forward


@dataclass
class TrainSettings:
    """The loop's settings; UnlearnConfig has the same fields (`of`), fine-tuning passes them directly."""

    epochs: int = 5
    lr: float = 1e-5
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str | None = None   # None: the launch configuration's, else no
    save_every: int = 0                  # checkpoint every N optimizer steps (0: each epoch only)

    @classmethod
    def of(cls, cfg) -> "TrainSettings":
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def start(settings: TrainSettings):
    """(accelerator, engine): seeded, mixed precision as asked else the launch configuration's."""
    set_seed(settings.seed)
    if not launched():   # one process: accelerate would keep the first run's mixed precision and refuse another
        AcceleratorState._reset_state()
    return start_accelerator(settings.grad_accum, settings.mixed_precision, settings.batch_size)


def model_to_train(cfg, model=None, tokenizer=None, inplace: bool = False):
    """(model, tokenizer): `cfg.model` loaded, or the caller's, checked against each other. The caller's model
    is copied first, so it stays as it was, unless `inplace` (it is then trained and, with FILA, rewritten)."""
    if model is None:
        model, tokenizer = models.load_model(cfg.model, trust_remote_code=cfg.trust_remote_code,
                                             allow_pickle=cfg.allow_pickle)
        inplace = True   # nobody else holds it
    elif tokenizer is None:
        raise LokuError("a model object was given without its tokenizer: pass tokenizer= too")
    ensure_pad_token(tokenizer)
    check_tokenizer_fits(model, tokenizer)
    check_max_length(model, cfg.max_length)
    return (model if inplace else copy.deepcopy(model)), tokenizer


def run_batches(cfg, forget: list[dict], retain: list[dict] | None, tokenizer, world: int) -> PairedBatches:
    """The run's batches (`loku fisher` takes its statistics on these too, so they are a cache hit for the run).
    A global batch is batch_size x processes, each process taking its share (`step.shard`): N processes see
    exactly the examples one process would see with an N times larger batch."""
    forget = tokenize_examples(forget, tokenizer, cfg.max_length, "forget", cfg.prompt_format)
    retain = tokenize_examples(retain, tokenizer, cfg.max_length, "retain", cfg.prompt_format) if retain else None
    return PairedBatches(forget, retain, cfg.batch_size * world, tokenizer.pad_token_id, cfg.seed,
                         (cfg.retain_batch_size or cfg.batch_size) * world, cfg.retain_every_step)


def place_model(cfg, model, accelerator, engine):
    """The model on the accelerator (and without a generation cache), unless an engine will place it: FSDP
    and DeepSpeed shard from the CPU copy. A Fisher pass runs on the accelerator, not on the CPU the weights
    loaded to: under an engine that is one whole copy per GPU until it shards (README: or take the statistics
    first)."""
    model.config.use_cache = False
    return model.to(accelerator.device) if engine is None or (cfg.lora and INITS[cfg.resolved_init].needs_batches) \
        else model


def prepare_policy(cfg, model, batches: PairedBatches, progress: bool, only: list[str] | None = None,
                   adapters: bool = True):
    """(model to train, LoraPlan or None, starting factors or None): full fine-tuning, or LoRA planned once
    and started by the chosen initialisation (loku.inits). `only`: the modules a method trains alone (full
    fine-tuning of just those; the LoRA targets unless cfg.lora_targets); `adapters` False: no LoRA (t3)."""
    if not (cfg.lora and adapters):
        return (model.requires_grad_(True) if only is None else set_trainable(model, only)), None, None
    init = INITS[cfg.resolved_init]
    plan = plan_lora(model, cfg.lora_targets or only, cfg.lora_rank, cfg.alpha)
    pairs = list(batches.epoch(0)) if init.needs_batches else None
    model, initial = init.start(model, plan, pairs, cfg, progress)
    return model, plan, initial


def frozen_copy(method, cfg, model):
    """A frozen copy of the start model for methods that compare against it (KL, NPO, ...), taken after the
    method's set-up and the initialisation, so at step 0 it computes what the policy computes. Plain LoRA needs
    none: the policy with its adapters switched off is the start model. Full fine-tuning moves the weights,
    FILA rewrites them."""
    if not method.uses_reference(cfg) or (cfg.lora and method.adapters and not INITS[cfg.resolved_init].rewrites_base):
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


class FrozenReference:
    """(logits, tapped hidden states) of the frozen start model, under the autocast the policy runs under and in
    eval mode (no dropout): at step 0 they equal the policy's exactly. `frozen` (`frozen_copy`) is laid out by
    the engine in use (sharded under FSDP and ZeRO-3); without it, the prepared policy with its adapters off.
    `constant_retain` (`PairedBatches.constant_retain`): every step's retain batch is the same, so its outputs
    are computed once (the demo: a fifth of an unlearning step's compute)."""

    def __init__(self, accelerator, policy, run: MethodRun, frozen=None, constant_retain: bool = False):
        self.accelerator, self.policy, self.run = accelerator, accelerator.unwrap_model(policy), run
        self.copy = prepare_reference(accelerator, frozen) if frozen is not None else None
        self.constant_retain, self._retain = constant_retain, None

    def retain(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The outputs on a retain batch, kept for the next step when every step's retain batch is the same (the
        frozen model in eval mode gives the same outputs again; checked on the token ids)."""
        if not self.constant_retain:
            return self(batch)
        if self._retain is None or not torch.equal(self._retain[0], batch["input_ids"]):
            self._retain = (batch["input_ids"], self(batch))
        return self._retain[1]

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict]:
        with self.accelerator.autocast():
            if self.copy is not None:
                with self.run.capture(self.copy) as hidden:
                    return forward(self.copy, batch), hidden
            training = self.policy.training
            try:
                with self.policy.disable_adapter(), self.run.capture(self.policy) as hidden:
                    return forward(self.policy.eval(), batch), hidden
            finally:
                self.policy.train(training)


def prepare_optimizer(accelerator, model, settings: TrainSettings, steps_per_epoch: int):
    """(prepared model, optimizer, scheduler): AdamW over the trainable weights, a linear schedule whose length is
    the optimizer steps that will run (so the rate reaches 0 after the last), then accelerate's prepare."""
    from transformers import get_linear_schedule_with_warmup   # transformers adds ~2 s to `loku`'s start

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, steps_per_epoch * settings.epochs)
    # The scheduler stays outside accelerate: it would step once per process, assuming a sharded loader.
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler
