"""One optimizer step: forward passes over its micro-batches, the loss, backward, clipping, the update."""

from __future__ import annotations

import contextlib

import torch

from .. import methods
from ..errors import LokuError
from ..losses import cross_entropy, unit_counts
from ..methods import LossInputs, Method, MethodRun
from ..methods.constrained import mean_retain_loss

Pair = tuple[dict, "dict | None"]   # (forget or training batch, retain batch)

# Fine-tuning is a method of one term: cross-entropy on its examples, which take the forget slot.
FINE_TUNING = Method("fine-tune", lambda x, s: {"forget": cross_entropy(x.forget_logits, x.forget_labels)},
                     "cross-entropy on the training examples")
# ... and on a second stream of examples (general text mixed in), one batch of it with each training batch.
FINE_TUNING_MIXED = Method("fine-tune", lambda x, s: {"forget": cross_entropy(x.forget_logits, x.forget_labels),
                                                      "retain": cross_entropy(x.retain_logits, x.retain_labels)},
                           "cross-entropy on the training examples and on a mixed-in stream", needs_retain=True)


def forward(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def alternates(batch: dict) -> dict | None:
    """DPO's preferred answers, row for row with the forget batch (None for other methods)."""
    return {k[4:]: v for k, v in batch.items() if k.startswith("alt_")} if "alt_input_ids" in batch else None


def shard(batch: dict[str, torch.Tensor], rank: int, world: int, device) -> dict[str, torch.Tensor]:
    """This process's rows of a global batch (rows rank, rank + world, ...). A last batch too small to
    give every process a row repeats its first rows, as accelerate's even_batches does."""
    n = batch["input_ids"].shape[0]
    rows = list(range(rank, n, world)) or [rank % n]
    return {k: v[rows].to(device) for k, v in batch.items()}


def step_scales(micro: list[Pair], units: dict, sum_over_processes, world: int,
                accumulation: int) -> list[dict[str, float]]:
    """Per micro-batch and term, the factor that makes an optimizer step the mean over every token (or
    sequence, ...) it saw, in all its micro-batches and processes, as Hugging Face Trainer's num_items_in_batch:
    local count x processes x accumulation / the step's count (`loku.losses.global_mean_scales` with the
    micro-batches of the step in the sum). accelerate's backward divides each loss by the accumulation steps,
    DDP averages the processes' gradients. A short last step of an epoch averages only its own micro-batches."""
    counts = [unit_counts(units, f["labels"], r["labels"] if r is not None else None) for f, r in micro]
    local = torch.tensor([[c[k] for k in units] for c in counts], dtype=torch.float64,
                         device=micro[0][0]["labels"].device)                                 # (micro-batches, terms)
    total = sum_over_processes(local.sum(0)) if world > 1 else local.sum(0)                  # (terms,)
    scale = torch.where(total > 0, local * (world * accumulation) / total, 1.0)
    return [dict(zip(units, row)) for row in scale.tolist()]


class OptimizerStep:
    """Runs one optimizer step over a list of micro-batches; the last one syncs the gradients and updates.
    What a method needs beyond logits (hidden states, its own backward, ...) goes through its `MethodRun`."""

    def __init__(self, accelerator, model, optimizer, scheduler, run: MethodRun, reference=None,
                 max_grad_norm: float = 1.0, kept: str = ""):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.run, self.reference, self.max_grad_norm, self.kept = run, reference, max_grad_norm, kept
        self.units = methods.loss_units(run.method, run.cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]   # after prepare: FSDP2 replaced them
        self.unwrapped = accelerator.unwrap_model(model)

    def __call__(self, micro: list[Pair], epoch: int, step: int) -> tuple[dict[str, float], int]:
        """(the step's loss terms, mean over processes; the tokens this process saw)."""
        acc = self.accelerator
        world, rank, device = acc.num_processes, acc.process_index, acc.device
        micro = [(shard(f, rank, world, device), shard(r, rank, world, device)
                  if r is not None and self.run.method.needs_retain else None) for f, r in micro]
        scales = step_scales(micro, self.units, lambda t: acc.reduce(t, reduction="sum"), world,
                             acc.gradient_accumulation_steps)
        totals, tokens = {}, 0
        for i, ((forget, retain), scale) in enumerate(zip(micro, scales)):
            ends_step = i == len(micro) - 1
            acc.sync_gradients = ends_step   # accelerate counts micro-batches; here an epoch's last one ends a step
            with contextlib.nullcontext() if ends_step else acc.no_sync(self.model):
                terms = self._terms(forget, retain, scale)
                _check_finite(terms, epoch, step, self.kept)
                self.run.backward(terms, acc.backward, self.params, ends_step)
            totals = {k: totals.get(k, 0.0) + v.detach() / acc.gradient_accumulation_steps for k, v in terms.items()}
            tokens += sum(int(b["attention_mask"].sum()) for b in (forget, retain) if b is not None)
        if self.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(self.params, self.max_grad_norm)
            if norm is not None and not torch.isfinite(torch.as_tensor(norm)):   # None: DeepSpeed clips itself
                raise LokuError(f"gradient norm became {float(norm)} at epoch {epoch + 1} step {step + 1}: "
                                f"lower --lr or check the data{self.kept}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if world > 1:
            totals = dict(zip(totals, acc.reduce(torch.stack(list(totals.values())).float(), reduction="mean")))
        return {k: float(v) for k, v in totals.items()}, tokens

    def _terms(self, forget: dict, retain: dict | None, scale: dict[str, float]) -> dict[str, torch.Tensor]:
        run, alt = self.run, alternates(forget)
        run.prestep(self.unwrapped, retain)
        with run.capture(self.unwrapped) as hidden:
            x = LossInputs(forward(self.model, forget), forget["labels"], state=run.state,
                           forget_attention=forget["attention_mask"], forget_hidden=hidden)
        if alt is not None:
            x.alt_logits, x.alt_labels = forward(self.model, alt), alt["labels"]
        if retain is not None:
            with run.capture(self.unwrapped) as hidden:
                x.retain_logits, x.retain_labels = forward(self.model, retain), retain["labels"]
            x.retain_attention, x.retain_hidden = retain["attention_mask"], hidden
        on = run.method.reference_on if self.reference is not None else ()
        if "forget" in on:
            x.ref_forget_logits, x.ref_forget_hidden = self.reference(forget)
        if retain is not None and "retain" in on:
            x.ref_retain_logits, x.ref_retain_hidden = self.reference.retain(retain)
        if alt is not None and "alt" in on:
            x.ref_alt_logits = self.reference(alt)[0]
        terms = methods.method_loss(run.method, x, run.cfg)
        parts = {k: v * scale.get(k, 1.0) for k, v in terms.items() if k != "loss"}   # sibl's penalty: unscaled
        return {"loss": sum(parts.values()), **parts}

    def epoch_end(self, epoch: int, batches) -> None:
        """The method's end of `epoch` (pdu's dual update from the mean retain loss over the epoch's batches)."""
        device = self.accelerator.device
        self.run.epoch_end(epoch + 1, lambda: mean_retain_loss(self.unwrapped, batches.epoch(epoch), device))


def _check_finite(terms: dict[str, torch.Tensor], epoch: int, step: int, kept: str) -> None:
    """Stop on NaN/inf, naming the step and the loss term, rather than training on garbage."""
    bad = [k for k, v in terms.items() if not torch.isfinite(v)]
    if bad:
        name = next((k for k in bad if k != "loss"), "loss")
        raise LokuError(f"loss term {name!r} became {float(terms[name])} at epoch {epoch + 1} step {step + 1} "
                        f"(terms: {({k: float(v) for k, v in terms.items()})}): lower --lr or check the data{kept}")
