"""Relearning attack: a few fine-tuning steps on part of the forget set, or on related text, and how much of
the forgotten data comes back (Hu et al. 2024, arXiv 2406.13356; Deeb & Roger 2024, arXiv 2410.08827).

Each point of the curve is its own fine-tune: `relearn(model, features, k)` deep-copies the model (any LoRA
adapter merged in: the attacker holds the weights and trains all of them) and runs `loku.finetune.finetune`
for exactly k optimizer steps of `batch_size` examples, drawn from `features` in a seeded order, cycling when
k x batch_size exceeds them. `finetune`'s linear learning-rate decay spans the k steps, so a point is what an
attacker with a budget of k steps gets; the points do not share one training run (the k = 25 model is not the
k = 10 model trained 15 steps more), which costs sum(steps) steps instead of max(steps). k = 0 is the model
itself (a plain copy). The input model is never modified.

`split_forget` divides the forget set into the part the attacker relearns on and the part held out to see
whether relearning one part brings the other back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import LokuError

DEFAULT_STEPS = (0, 10, 25, 50)


@dataclass(frozen=True)
class RelearnSettings:
    """How the attacker fine-tunes: steps of `batch_size` examples at learning rate `lr` (AdamW, linear decay
    over the run, gradient norm clipped to `max_grad_norm`), example order seeded by `seed`."""

    lr: float = 1e-4
    batch_size: int = 4
    seed: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None

    def __post_init__(self):
        if not self.lr > 0:
            raise LokuError(f"relearning learning rate must be positive, got {self.lr}: e.g. --relearn-lr 1e-4")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise LokuError(f"relearning batch size must be a positive integer, got {self.batch_size!r}")


def check_steps(steps) -> tuple[int, ...]:
    """Sorted distinct non-negative step counts, or a LokuError."""
    try:
        values = sorted({int(s) for s in steps})
    except (TypeError, ValueError):
        raise LokuError(f"relearning steps must be integers, got {steps!r}: e.g. --relearn-steps 0,10,25,50") from None
    if not values or values[0] < 0:
        raise LokuError(f"relearning steps must be >= 0, got {steps!r}: e.g. --relearn-steps 0,10,25,50")
    return tuple(values)


def split_forget(n: int, fraction: float = 0.5, seed: int = 0) -> tuple[list[int], list[int]]:
    """(indices relearned on, indices held out) of an n-example forget set, seeded; both parts non-empty."""
    if n < 2:
        raise LokuError(f"relearning on part of the forget set needs at least 2 examples, got {n}: give a larger "
                        "forget set or relearn on related data only")
    if not 0 < fraction < 1:
        raise LokuError(f"relearning fraction must be between 0 and 1, got {fraction}: e.g. 0.5")
    order = list(range(n))
    random.Random(f"relearn-split/{seed}").shuffle(order)
    k = min(max(1, round(fraction * n)), n - 1)
    return sorted(order[:k]), sorted(order[k:])


def step_examples(features: list[dict], steps: int, batch_size: int, seed: int) -> list[dict]:
    """steps x batch_size features: seeded permutations of `features`, one after another (each example once per
    pass, as epochs would)."""
    out, rng, need = [], random.Random(f"relearn-order/{seed}"), steps * batch_size
    while len(out) < need:
        order = list(range(len(features)))
        rng.shuffle(order)
        out += [features[i] for i in order]
    return out[:need]


def relearn(model, features: list[dict], pad_id: int, steps: int, settings: RelearnSettings = RelearnSettings()):
    """A copy of `model` (adapter merged) fine-tuned on `features` for exactly `steps` optimizer steps; the input
    model is untouched. Under `accelerate launch` a step takes batch_size examples per process."""
    from ..distributed import rank_world
    from ..finetune import finetune
    from .quantize import merged_copy

    if not features:
        raise LokuError("the relearning set is empty: give it at least one example")
    attacked = merged_copy(model)
    for p in attacked.parameters():
        p.requires_grad_(True)
    if steps > 0:
        world = rank_world()[1]
        examples = step_examples(features, steps * world, settings.batch_size, settings.seed)
        finetune(attacked, examples, pad_id, epochs=1, lr=settings.lr, batch_size=settings.batch_size,
                 seed=settings.seed, mixed_precision=settings.mixed_precision, max_grad_norm=settings.max_grad_norm,
                 progress=False, description=f"relearn {steps} steps")
    for p in attacked.parameters():
        p.requires_grad_(False)
    return attacked.eval()


def relearning_curve(model, features: list[dict], pad_id: int, measure, steps=DEFAULT_STEPS,
                     settings: RelearnSettings = RelearnSettings(), log=None) -> list[dict]:
    """[{"steps": k, **measure(relearned model)}] for k in `steps` (increasing); each model is freed before the
    next is trained."""
    points = []
    for k in check_steps(steps):
        attacked = relearn(model, features, pad_id, k, settings)
        points.append({"steps": k, **measure(attacked)})
        del attacked
        if log:
            log(f"  relearned {k} steps")
    return points

