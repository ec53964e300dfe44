"""Fisher statistics that tell FILA which weights hold the forget set (and VILA's cheaper variant).

Phase one of a data-driven LoRA initialisation (phase two, the factors, is `loku.fila`): a plain dict
keyed by module name (`model.layers.0.self_attn.q_proj`), each value shaped like the weight in the
(out, in) convention, for the forget set and the retain set. It can be saved (safetensors + metadata)
and reused when model, data and settings are the same.

Loss: the paper's code (csm9493/efficient-llm-unlearning, TOFU/measure_importance.py) takes the
gradient of the plain Hugging Face `output.loss` on *both* sets, i.e. the mean next-token
cross-entropy; on the forget set that is its NLL, not the unlearning objective (IHL/GA). We do the
same (`loku.losses.cross_entropy`); the sign would not matter anyway, the gradient is squared.
Tokens: we count targets after the shift (labels[:, 1:] != -100), the ones the loss averages over;
the paper counts before the shift, which differs only where a sequence's first label is unmasked.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from rich.progress import track
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .distributed import is_main, rank_world, sum_over_ranks
from .errors import LokuError
from .io import atomic_path
from .losses import cross_entropy
from .lora import LoraPlan, conv1d_type, targeted_modules, weight_of
from .models import model_device
from .registry import unknown_choice

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (logits, labels) -> mean token loss
Pair = tuple[dict, "dict | None"]                                # (forget_batch, retain_batch)
FORMAT = "loku-fisher/1"
IGNORE = -100
# Config keys that change with how a model was loaded, not with what it computes.
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "_commit_hash",
             "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal"}


class _Computed(Mapping):
    """A read-only mapping whose values are computed when read; membership and iteration see only the keys."""

    def __init__(self, keys: Mapping):
        self._keys = keys

    def __contains__(self, name) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class LiftedFisher(_Computed):
    """VILA statistics kept factored, name -> (F_B (out, r), F_A (r, in)); reading one module lifts it to
    F_B @ F_A (out, in). The whole model's statistics are never expanded at once, which is VILA's saving."""

    def __init__(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(factors)
        self.factors = factors

    def __getitem__(self, name: str) -> torch.Tensor:
        FB, FA = self.factors[name]
        return FB @ FA

    def shape(self, name: str) -> tuple[int, int]:
        FB, FA = self.factors[name]
        return (FB.shape[0], FA.shape[1])


class relative_importance(_Computed):   # noqa: N801 (a function to its callers)
    """FILA's importance of each weight for the forget set relative to the retain set, F_forget / (eps +
    F_retain) (out, in), computed one module at a time when read (a third full copy of the statistics for all
    modules at once is what made FILA's peak memory). eps (the paper's 1e-5) keeps weights that the retain
    set never touches from dividing by zero."""

    def __init__(self, stats: "FisherStats", eps: float = 1e-5):
        super().__init__(stats.forget)
        self.stats, self.eps = stats, eps

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.stats.forget[name] / (self.eps + self.stats.retain[name])


def _shape(side: Mapping, name: str) -> tuple[int, int]:
    return side.shape(name) if isinstance(side, LiftedFisher) else tuple(side[name].shape)


@dataclass
class FisherStats:
    """Per-module Fisher statistics, each (out, in) float32 and already divided by the token count."""

    forget: Mapping[str, torch.Tensor]   # a dict, or a LiftedFisher for VILA
    retain: Mapping[str, torch.Tensor]
    forget_tokens: int
    retain_tokens: int
    meta: dict[str, str] = field(default_factory=dict)  # kind, model identity, data hash, settings

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "fila")

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: _shape(self.forget, n) for n in self.forget}

    def save(self, path: str | Path) -> Path:
        tensors = {}
        for side, d in (("forget", self.forget), ("retain", self.retain)):
            if isinstance(d, LiftedFisher):   # kept factored on disk too: side/name/B and side/name/A
                for n, (FB, FA) in d.factors.items():
                    tensors[f"{side}/{n}/B"], tensors[f"{side}/{n}/A"] = FB, FA
            else:
                tensors.update({f"{side}/{n}": t for n, t in d.items()})
        tensors = {k: t.detach().float().cpu().contiguous() for k, t in tensors.items()}
        meta = {**self.meta, "format": FORMAT, "forget_tokens": str(self.forget_tokens),
                "retain_tokens": str(self.retain_tokens)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "FisherStats":
        path = Path(path)
        if not path.is_file():
            raise LokuError(f"Fisher statistics file {path} does not exist: check the path or compute it first")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for a damaged or foreign file
            raise LokuError(f"{path} is not a readable safetensors file ({e}): delete it to recompute") from None
        if meta.pop("format", None) != FORMAT:
            raise LokuError(f"{path} is not a loku Fisher statistics file: pass another path or delete it")
        sides = {}
        for side in ("forget", "retain"):
            keys = [k.split("/") for k in tensors if k.startswith(side + "/")]
            if keys and all(len(k) == 3 for k in keys):
                sides[side] = LiftedFisher({k[1]: (tensors[f"{side}/{k[1]}/B"], tensors[f"{side}/{k[1]}/A"])
                                            for k in keys if k[2] == "B"})
            else:
                sides[side] = {k[1]: tensors["/".join(k)] for k in keys}
        return cls(sides["forget"], sides["retain"], int(meta.pop("forget_tokens")), int(meta.pop("retain_tokens")),
                   meta)

    def check_model(self, model: nn.Module, source: str = "the Fisher statistics") -> None:
        """Raise LokuError unless these statistics were computed on `model` (same modules, shapes, config
        and weights): statistics of another model would silently steer FILA to the wrong weights."""
        modules = dict(model.named_modules())
        for name, shape in self.shapes().items():
            if name not in modules or not hasattr(modules[name], "weight"):
                raise LokuError(f"{source} are for another model: it has no module {name!r}; "
                                f"delete the file or pass the one computed for this model")
            here = tuple(weight_of(modules[name]).shape)
            if here != shape:
                raise LokuError(f"{source} are for another model: module {name} is {shape} there but {here} "
                                f"here; delete the file or pass the one computed for this model")
        ident = model_identity(model, {n: modules[n] for n in self.forget})
        for key, what in (("config_sha256", "its config"), ("weights_sha256", "its weights")):
            if key in self.meta and self.meta[key] != ident[key]:
                raise LokuError(f"{source} are for another model ({what} differ from this one): delete the "
                                f"file or pass the one computed for this model")


# ---------------------------------------------------------------------------------------------- modules

def target_weights(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Full module name -> Linear/Conv1D module for `names` (full names or suffixes, as peft matches them), sorted."""
    return dict(sorted(targeted_modules(model, list(names)).items()))


def model_identity(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, str]:
    """What makes statistics valid for a model: its config, a fingerprint of the targeted weights (the
    first 64 values of each: two checkpoints of one architecture differ there), names and shapes."""
    cfg = getattr(model, "config", None)
    cfg = {k: v for k, v in (cfg.to_dict() if cfg is not None else {}).items() if k not in _VOLATILE}
    h = hashlib.sha256()
    for name, m in sorted(modules.items()):
        w = m.weight.detach().reshape(-1)[:64].float().cpu()
        h.update(name.encode() + str(tuple(m.weight.shape)).encode() + w.numpy().tobytes())
    shapes = {n: list(weight_of(m).shape) for n, m in sorted(modules.items())}
    return {"config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
            "weights_sha256": h.hexdigest(), "modules": json.dumps(shapes)}


def _hash_batch(h, batch: dict | None) -> None:
    if batch is None:
        h.update(b"none")
        return
    for k in sorted(batch):
        t = batch[k].detach().cpu().contiguous()
        h.update(k.encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())


def data_hash(batch_pairs: Iterable[Pair]) -> str:
    """sha256 of every batch's tensors in order (batch boundaries matter: gradients are per batch)."""
    h = hashlib.sha256()
    for forget, retain in batch_pairs:
        _hash_batch(h, forget)
        _hash_batch(h, retain)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- gradients

def _my_pairs(batch_pairs: Iterable[Pair]) -> tuple[list[Pair], str]:
    """(the pairs this process computes, the hash of all pairs). Under several processes each takes every
    world-th pair and the sums are all-reduced after (`_reduce`): the same statistics as one process."""
    pairs = list(batch_pairs)
    if any(retain is None for _, retain in pairs):
        raise LokuError("Fisher statistics weigh the forget set against the retain set: pass --retain FILE "
                        "(or use --init default)")
    rank, world = rank_world()
    return pairs[rank::world], data_hash(pairs)


def _reduce(sums: list[torch.Tensor], counts: dict[str, int]) -> dict[str, int]:
    """Sum the per-process partial sums (in place) and token counts over all processes."""
    if rank_world()[1] == 1:
        return counts
    n = torch.tensor([counts["forget"], counts["retain"]], dtype=torch.float64, device=sums[0].device)
    sum_over_ranks([*sums, n])
    return {"forget": int(n[0]), "retain": int(n[1])}


def _batch_losses(model: nn.Module, batch_pairs: Iterable[Pair], loss_fn: LossFn, progress: bool,
                  description: str):
    """Yields (side, n_tokens, the batch's mean token loss) for every forget and retain batch, ready for a
    backward pass. Eval mode (no dropout, so the numbers are reproducible)."""
    device = model_device(model)
    for forget, retain in track(batch_pairs, description, disable=not progress):
        for side, batch in (("forget", forget), ("retain", retain)):
            batch = {k: v.to(device) for k, v in batch.items()}
            n_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
            if n_tokens == 0:   # nothing to learn from: it would add zero to both sums
                continue
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits                      # (B, T, V)
            yield side, n_tokens, loss_fn(logits, batch["labels"])


@contextmanager
def _grads_only(model: nn.Module, trainable: list[torch.Tensor]):
    """Within the block only `trainable` needs grad and the model is in eval mode; both restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training, keep = model.training, set(map(id, trainable))
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _settings(kind: str, loss_fn: LossFn | None, dtype: torch.dtype, **vila) -> dict:
    """What else (besides model and data) the numbers depend on; a cache hit needs all of it equal."""
    fn = loss_fn or cross_entropy
    out = {"loss": f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}", "dtype": str(dtype)}
    if kind == "vila":
        out.update(rank=vila["rank"], scaling=float(vila["scaling"]), std=float(vila["std"]), seed=vila["seed"])
    return out


def _finish(kind: str, model, modules, sums: dict, counts: dict, data_sha256: str, settings: dict) -> FisherStats:
    for side in ("forget", "retain"):
        if counts[side] == 0:
            raise LokuError(f"the {side} batches hold no target token (every label is -100): give {side} "
                            f"examples with text to learn from")
    meta = {"kind": kind, **model_identity(model, modules), "data_sha256": data_sha256,
            "settings": json.dumps(settings, sort_keys=True)}
    return FisherStats(sums["forget"], sums["retain"], counts["forget"], counts["retain"], meta)


def fisher_statistics(model: nn.Module, batch_pairs: Iterable[Pair], module_names: Iterable[str],
                      loss_fn: LossFn | None = None, progress: bool = True,
                      device: str | torch.device | None = None) -> FisherStats:
    """FILA's empirical Fisher diagonal: for each targeted weight, over forget and retain separately,
    F = sum_b n_b * g_b**2 / sum_b n_b, with g_b the gradient of batch b's mean token loss and n_b its
    target-token count. Float32 accumulators on `device` (default: the weight's own; "cpu" saves
    accelerator memory on large models). Only the targeted weights get gradients during the pass.
    Under several processes (accelerate launch) each computes every world-th pair and the sums and token
    counts are all-reduced: every process gets the statistics one process would compute."""
    loss_fn = loss_fn or cross_entropy
    modules = target_weights(model, module_names)
    conv = {n for n, m in modules.items() if isinstance(m, conv1d_type())}
    params = {n: m.weight for n, m in modules.items()}
    sums = {side: {n: torch.zeros(weight_of(m).shape, dtype=torch.float32, device=device or m.weight.device)
                   for n, m in modules.items()} for side in ("forget", "retain")}   # each (out, in)
    counts = {"forget": 0, "retain": 0}
    mine, data_sha256 = _my_pairs(batch_pairs)
    now = {"side": "forget", "n": 0}

    def consume(name: str):
        def hook(p: torch.Tensor) -> None:   # right after p's gradient is complete: square, add, free it
            g = p.grad.T if name in conv else p.grad                        # (out, in)
            sums[now["side"]][name].add_(g.float().pow(2).mul_(now["n"]).to(sums[now["side"]][name].device))
            p.grad = None
        return hook

    # Streamed: each weight's gradient is folded into the sums as soon as backward completes it, so at most
    # one module's gradient is alive at a time, never the whole model's.
    # (Registered inside _grads_only: a hook needs its weight to require grad, and a frozen model's does not.)
    handles = []
    try:
        with _grads_only(model, list(params.values())):
            handles = [p.register_post_accumulate_grad_hook(consume(n)) for n, p in params.items()]
            for side, n_tokens, loss in _batch_losses(model, mine, loss_fn, progress, "Fisher (fila)"):
                now.update(side=side, n=n_tokens)
                loss.backward()
                counts[side] += n_tokens
    finally:
        for h in handles:
            h.remove()
        for p in params.values():
            p.grad = None
    counts = _reduce([t for side in sums.values() for t in side.values()], counts)
    for side in sums:
        for t in sums[side].values():
            t.div_(max(counts[side], 1))
    settings = _settings("fila", loss_fn, next(iter(params.values())).dtype)
    return _finish("fila", model, modules, sums, counts, data_sha256, settings)


def vila_factors(shapes: dict[str, tuple[int, int]], rank: int, std: float = 0.05,
                 seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random LoRA factors A (rank, in), B (out, rank) ~ N(0, std^2), drawn in name order from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, i, generator=g) * std, torch.randn(o, rank, generator=g) * std)
            for n, (o, i) in sorted(shapes.items())}


def vila_statistics(model: nn.Module, batch_pairs: Iterable[Pair], module_names: Iterable[str], rank: int = 8,
                    scaling: float = 1.0, std: float = 0.05, seed: int = 0,
                    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                    loss_fn: LossFn | None = None, progress: bool = True) -> FisherStats:
    """VILA (Kim et al. 2025, "Improving Fisher Information Estimation and Efficiency for LoRA-based LLM
    Unlearning"; its code: kyj93790/VILA): Fisher information is the *variance* of the score, so use
    E[g^2] - E[g]^2 (token-weighted over batches, clamped at 0) instead of FILA's raw second moment, and
    take it over random LoRA factors only (A, B ~ N(0, 0.05^2), added as y += scaling * B A x while
    measuring, as VILA does), so no full-weight gradient is ever held. Lifted to the weight's shape as
    F_B @ F_A: (out, r) @ (r, in) -> (out, in), so the rest of FILA is shared.
    VILA's code runs 10 passes over the data with fixed factors; pass the pairs repeated for that."""
    loss_fn = loss_fn or cross_entropy
    modules = target_weights(model, module_names)
    shapes = {n: tuple(weight_of(m).shape) for n, m in modules.items()}
    factors = factors if factors is not None else vila_factors(shapes, rank, std, seed)
    params, hooks = {}, []
    for name, m in modules.items():
        A, B = factors[name]
        A = A.detach().to(m.weight.device, m.weight.dtype).requires_grad_(True)   # (r, in)
        B = B.detach().to(m.weight.device, m.weight.dtype).requires_grad_(True)   # (out, r)
        params[f"{name}/A"], params[f"{name}/B"] = A, B

        def hook(mod, inputs, out, A=A, B=B):
            x = inputs[0]                                                       # (..., in)
            return out + scaling * F.linear(F.linear(x, A), B)                   # (..., out)
        hooks.append(m.register_forward_hook(hook))
    first = {k: torch.zeros(v.shape, dtype=torch.float32, device=v.device) for k, v in params.items()}
    sums = {side: {"g": {k: t.clone() for k, t in first.items()}, "g2": {k: t.clone() for k, t in first.items()}}
            for side in ("forget", "retain")}
    counts = {"forget": 0, "retain": 0}
    mine, data_sha256 = _my_pairs(batch_pairs)
    try:
        with _grads_only(model, []):
            for side, n_tokens, loss in _batch_losses(model, mine, loss_fn, progress, "Fisher (vila)"):
                grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
                for k, g in grads.items():
                    sums[side]["g"][k] += g.float() * n_tokens
                    sums[side]["g2"][k] += g.float().pow(2) * n_tokens
                counts[side] += n_tokens
    finally:
        for h in hooks:
            h.remove()
    counts = _reduce([t for side in sums.values() for part in side.values() for t in part.values()], counts)
    lifted = {}
    for side in ("forget", "retain"):
        n = max(counts[side], 1)
        var = {k: (sums[side]["g2"][k] / n - (sums[side]["g"][k] / n).pow(2)).clamp_(min=0) for k in params}
        lifted[side] = LiftedFisher({name: (var[f"{name}/B"], var[f"{name}/A"]) for name in modules})
    settings = _settings("vila", loss_fn, next(iter(modules.values())).weight.dtype, rank=rank, scaling=scaling,
                         std=std, seed=seed)
    return _finish("vila", model, modules, lifted, counts, data_sha256, settings)


def cached_statistics(path: str | Path, model: nn.Module, batch_pairs: Iterable[Pair], module_names: Iterable[str],
                      method: str = "fila", **kwargs) -> tuple[FisherStats, bool]:
    """Reuse the statistics at `path` when model, modules, data and settings match (returns (stats, True));
    otherwise compute, save there and return (stats, False). A file for another model raises LokuError
    instead of being overwritten: it is more likely a wrong path than a stale cache."""
    compute = statistics_function(method)
    pairs = list(batch_pairs)
    modules = target_weights(model, module_names)
    names = sorted(modules)
    path = Path(path)
    if path.exists() and kwargs.get("factors") is None:   # hand-given VILA factors are not part of the key
        old = FisherStats.load(path)
        old.check_model(model, source=f"the Fisher statistics in {path}")
        args = inspect.signature(compute).bind(model, pairs, names, **kwargs)
        args.apply_defaults()
        args = dict(args.arguments)
        want = _settings(method, args.pop("loss_fn"), next(iter(modules.values())).weight.dtype, **args)
        if (old.kind == method and sorted(old.forget) == names and old.meta.get("data_sha256") == data_hash(pairs)
                and json.loads(old.meta.get("settings", "{}")) == want):
            return old, True
    stats = compute(model, pairs, names, **kwargs)
    if is_main():   # every process holds the same reduced statistics; one writes them
        stats.save(path)
    return stats, False


STATISTICS = ("fila", "vila")   # the kinds of statistics (a cache file's "kind")


def statistics_function(kind: str, what: str = "Fisher method") -> Callable[..., FisherStats]:
    """The function that computes `kind`'s statistics (the one place that chooses it)."""
    if kind not in STATISTICS:
        raise unknown_choice(what, kind, STATISTICS)
    return fisher_statistics if kind == "fila" else vila_statistics


def run_statistics(kind: str, model: nn.Module, batch_pairs: list[Pair], plan: LoraPlan, *,
                   cache: str | Path | None = None, progress: bool = True, **kwargs) -> FisherStats:
    """The statistics a `kind` ("fila", "vila") initialisation of `plan`'s modules starts from: VILA measures
    with the plan's rank and scaling (those the adapter trains with). From `cache` when it matches there."""
    statistics_function(kind)
    if kind == "vila":
        if len(batch_pairs) < 2:   # E[g^2] - E[g]^2 over one batch is 0: the init would explode
            raise LokuError(f"VILA's statistics are variances over batches, but the forget set makes "
                            f"{len(batch_pairs)} batch: lower --batch-size so it makes at least 2, or use fila")
        kwargs = {"rank": plan.rank, "scaling": plan.scaling, **kwargs}
    if cache is not None:
        return cached_statistics(cache, model, batch_pairs, plan.module_names, kind, progress=progress, **kwargs)[0]
    return statistics_function(kind)(model, batch_pairs, plan.module_names, progress=progress, **kwargs)
