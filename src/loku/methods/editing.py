"""LMCleaner: remove what the training steps that saw the forget examples contributed to the weights, from
the training's recorded trajectory, before any further training (Algorithm 1 of the LMCleaner paper, as
OpenUnlearning's `lmcleaner_core.compute_correction` implements it).

The trajectory is an input loku cannot make up: it is recorded while the model is fine-tuned. loku reads it
in its own safe format (OpenUnlearning's logger writes pickles, which loku does not load), a directory:

    trajectory.json      {"format": "loku-trajectory", "version": 1, "parameters": ["model.embed_tokens.weight", ...],
                          "steps": [{"lr": 1e-5, "examples": [3, 17]}, ...]}
    examples.jsonl       the training examples, one a line ({"text": ...} or {"question": ..., "answer": ...})
    updates.safetensors  "<step>": u[t] = theta[t+1] - theta[t], the recorded weights flattened in that order

`TrajectoryWriter` records one while you train (see its docstring).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config_base import setting
from ..data.batches import collate
from ..data.text import tokenize_example
from ..errors import LokuError
from ..losses import cross_entropy, upcast
from .base import LossInputs, MethodState, method, retain_ce

FORMAT = "loku-trajectory"


class TrajectoryWriter:
    """Records a training run for LMCleaner:

        writer = TrajectoryWriter(directory, training_examples, names)   # names: the weights to record
        for step, batch_indices in ...:
            before = writer.snapshot(model)
            ... one optimizer step on those examples ...
            writer.step(model, before, lr, batch_indices)
        writer.close()
    """

    def __init__(self, directory: str | Path, examples: list[dict], names: list[str]):
        self.dir, self.examples, self.names = Path(directory), examples, list(names)
        self.steps: list[dict] = []
        self.updates: dict[str, torch.Tensor] = {}

    def snapshot(self, model) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        return {n: params[n].detach().clone() for n in self.names}

    def step(self, model, before: dict[str, torch.Tensor], lr: float, examples: list[int]) -> None:
        params = dict(model.named_parameters())
        u = torch.cat([upcast(params[n].detach() - before[n]).reshape(-1).cpu() for n in self.names])
        self.updates[str(len(self.steps))] = u
        self.steps.append({"lr": float(lr), "examples": [int(i) for i in examples]})

    def close(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        save_file(self.updates, str(self.dir / "updates.safetensors"))
        with open(self.dir / "examples.jsonl", "w", encoding="utf-8") as f:
            for e in self.examples:
                f.write(json.dumps(e) + "\n")
        (self.dir / "trajectory.json").write_text(json.dumps({"format": FORMAT, "version": 1, "parameters": self.names,
                                                               "steps": self.steps}))
        return self.dir


class Trajectory:
    """A recorded trajectory, read lazily (one step's update at a time)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        meta_path = self.dir / "trajectory.json"
        for part in ("trajectory.json", "examples.jsonl", "updates.safetensors"):
            if not (self.dir / part).is_file():
                raise LokuError(f"LMCleaner trajectory {self.dir} has no {part}: pass --lmcleaner-trajectory DIR "
                                "as recorded by loku.methods.editing.TrajectoryWriter")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LokuError(f"{meta_path} is not valid JSON ({e.msg}): record the trajectory again") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("steps"), list) \
                or not isinstance(meta.get("parameters"), list):
            raise LokuError(f"{meta_path} is not a loku trajectory (format {FORMAT!r} with a list of steps): record "
                            "it with loku.methods.editing.TrajectoryWriter")
        self.steps = meta["steps"]
        self.examples = [json.loads(line) for line in
                         (self.dir / "examples.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        self.names = meta["parameters"]
        self._file = safe_open(str(self.dir / "updates.safetensors"), framework="pt")
        if set(self._file.keys()) != {str(t) for t in range(len(self.steps))}:
            raise LokuError(f"{self.dir / 'updates.safetensors'} does not hold one update per step of {meta_path}: "
                            "record the trajectory again")

    def __len__(self) -> int:
        return len(self.steps)

    def update(self, t: int) -> torch.Tensor:
        """u[t], flat over the recorded weights in order, float32."""
        return upcast(self._file.get_tensor(str(t)))

    def steps_with(self, forget: list[dict]) -> list[int]:
        """The steps whose batch held one of the `forget` examples (each must be a recorded example)."""
        index = {json.dumps(e, sort_keys=True): i for i, e in enumerate(self.examples)}
        wanted = set()
        for k, e in enumerate(forget, start=1):
            if "input_ids" in e:
                raise LokuError("lmcleaner finds each forget example among the recorded training examples by its "
                                "text, but the forget examples came tokenized (input_ids/labels): pass them as the "
                                "training saw them (text or question/answer records)")
            key = json.dumps({f: e[f] for f in ("text", "question", "answer") if f in e}, sort_keys=True)
            if key not in index:
                raise LokuError(f"forget example {k} is not among the trajectory's training examples "
                                f"({self.dir / 'examples.jsonl'}): LMCleaner removes only what that training saw")
            wanted.add(index[key])
        return [t for t, s in enumerate(self.steps) if wanted & set(s["examples"])]


def _flat_params(params) -> torch.Tensor:
    return torch.cat([upcast(p.detach().reshape(-1)) for p in params])


@torch.no_grad()
def _set_flat(params, vector: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(vector[offset:offset + n].view_as(p))
        offset += n


def hvp_fisher(loss_fn, params, v: torch.Tensor) -> torch.Tensor:
    """H v ~ g (g . v) with g the gradient of the batch loss (the paper's Algorithm 1; OpenUnlearning
    `hvp_fisher`)."""
    g = torch.cat([upcast(x.reshape(-1)) for x in torch.autograd.grad(loss_fn(), params)])
    return g * torch.dot(g, v)


def hvp_exact(loss_fn, params, v: torch.Tensor) -> torch.Tensor:
    """H v by double backward (OpenUnlearning's "GGN" mode computes this exact product)."""
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    dot = torch.cat([upcast(g.reshape(-1)) for g in grads]) @ v
    return torch.cat([upcast(x.reshape(-1)) for x in torch.autograd.grad(dot, params)])


def lmcleaner_correction(params, trajectory: Trajectory, tz: int, tau: int, K: int, batch_loss,
                         mode: str = "fisher", damping: float = 0.0, historical: bool = True) -> torch.Tensor:
    """The correction v for forget step tz (flat over the recorded weights `params`): v = -u[tz], then for s = tz+1 .. min(tz+K, tau-1)
    v <- v - eta_s H[s] v - eta_s damping v, with H[s] on step s's batch at theta[s] = theta[tau] - sum_{t>=s} u[t]
    (`historical`; else at the current weights). The weights are back at theta[tau] on return."""
    hvp = hvp_fisher if mode == "fisher" else hvp_exact
    like = {"device": params[0].device, "dtype": upcast(params[0]).dtype}    # float32, or float64 for a float64 model

    def u(t):
        return trajectory.update(t).to(**like)
    v = -u(tz)
    start, end = tz + 1, min(tz + K, tau - 1)
    theta_tau = _flat_params(params) if historical and end >= start else None
    if theta_tau is not None:
        theta = theta_tau - sum(u(t) for t in range(start, tau))
        _set_flat(params, theta)
    try:
        for s in range(start, end + 1):
            with torch.enable_grad():
                hv = hvp(lambda: batch_loss(s), params, v)
            eta = trajectory.steps[s]["lr"]
            v = v - eta * hv
            if damping > 0:
                v = v - eta * damping * v
            if theta_tau is not None:
                theta = theta + u(s)
                _set_flat(params, theta)
    finally:
        if theta_tau is not None:
            _set_flat(params, theta_tau)
    return v


def privacy_sigma(delta_det: float, epsilon: float, delta: float) -> float:
    """sigma = delta_det / epsilon x sqrt(2 ln(1.25 / delta)) (the paper's Theorem 2)."""
    return delta_det / epsilon * math.sqrt(2 * math.log(1.25 / delta))


@dataclass(frozen=True)
class LMCleanerSettings:
    trajectory: str | None = setting(None, "directory of the fine-tuning's recorded trajectory (README: "
                                     "trajectory.json, examples.jsonl, updates.safetensors).",
                                     default_text="none: required")
    K: int = setting(800, "truncation window: steps the removed update is propagated through "
                     "(OpenUnlearning LMCleanerBatchLevel: 800).", bound="positive")
    hessian_mode: str = setting("fisher", "Hessian-vector products: fisher (g g^T v, the paper's) or exact "
                                "(double backward; OpenUnlearning's GGN).", choices=("fisher", "exact"))
    damping: float = setting(0.0, "damping lambda: v -= eta lambda v each step (0: the paper's).",
                             bound="non-negative")
    max_step: int | None = setting(None, "treat the trajectory as ending at this step (tau).",
                                   default_text="its last step", bound="non-negative")
    epsilon: float = setting(0.0, "privacy epsilon: > 0 adds N(0, sigma^2) noise to each correction "
                             "(certified unlearning; 0: none).", bound="non-negative")
    delta: float = setting(1e-5, "privacy delta.", bound="positive")
    historical: bool = setting(True, "take each Hessian at that step's recorded weights (the paper's; "
                               "off: at the final weights).")


def _lmcleaner_check(s: LMCleanerSettings, cfg) -> None:
    if not s.trajectory:
        raise LokuError("lmcleaner needs --lmcleaner-trajectory DIR: the fine-tuning's recorded trajectory "
                        "(recorded while training, see README)")
    if not Path(s.trajectory).is_dir():
        raise LokuError(f"lmcleaner trajectory {s.trajectory} does not exist or is not a directory: check "
                        "--lmcleaner-trajectory")


def _lmcleaner_setup(s: LMCleanerSettings, ctx, state: MethodState) -> None:
    """Applies every correction to the model's weights, in order of the forget steps (OpenUnlearning
    `LMCleanerBatchLevel._apply_unlearning`)."""
    traj = Trajectory(s.trajectory)
    named = dict(ctx.model.named_parameters())
    missing = [n for n in traj.names if n not in named]
    if missing or not traj.names:
        raise LokuError(f"the trajectory records weights this model lacks ({', '.join(missing[:3]) or 'none'}): "
                        "pass the model it was recorded on")
    params = [named[n] for n in traj.names]
    size = sum(p.numel() for p in params)
    if traj.update(0).numel() != size:
        raise LokuError(f"the trajectory's updates have {traj.update(0).numel()} values, the model's recorded weights "
                        f"{size}: pass the model it was recorded on")
    tau = len(traj) if s.max_step is None else min(s.max_step, len(traj))
    steps = [t for t in traj.steps_with(ctx.forget) if t <= tau]

    def batch_loss(step: int) -> torch.Tensor:
        feats = [tokenize_example(traj.examples[i], ctx.tokenizer, ctx.max_length, ctx.prompt_format)
                 for i in traj.steps[step]["examples"]]
        batch = {k: v.to(ctx.device) for k, v in collate(feats, ctx.tokenizer.pad_token_id).items()}
        with sdpa_kernel(SDPBackend.MATH):   # exact Hessian-vector products differentiate the attention's backward
            logits = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
        return cross_entropy(logits, batch["labels"])

    generator = torch.Generator(device=params[0].device).manual_seed(ctx.seed)
    for tz in steps:
        v = lmcleaner_correction(params, traj, tz, tau, s.K, batch_loss, s.hessian_mode, s.damping, s.historical)
        if s.epsilon > 0:
            sigma = privacy_sigma(float(v.norm()), s.epsilon, s.delta)
            v = v + sigma * torch.randn(v.shape, generator=generator, device=v.device)
        with torch.no_grad():
            _set_flat(params, _flat_params(params) + v)
    state.values["corrected_steps"] = float(len(steps))


@method("lmcleaner", "remove the forget steps' updates from a recorded fine-tuning trajectory, then retain CE",
        settings=LMCleanerSettings, needs_retain=True, check=_lmcleaner_check, setup=_lmcleaner_setup,
        edits_base=True, units=lambda s: {"retain": "tokens"})
def lmcleaner(x: LossInputs, s: LMCleanerSettings):
    return {"retain": retain_ce(x)}
