"""FILA: LoRA factors initialised from Fisher importance, and their conversion back to a plain adapter.

Phase two after `loku.fisher`. For each targeted weight W (out, in) with importance I (out, in), the
adapter starts on the rank-r part of W that matters most for the forget set: the best rank-r fit of
W under row weights w = sqrt(sum_j I_ij) (a row-weighted low-rank approximation, solved exactly by
an SVD of diag(w) W). The base layer keeps the rest, W_res = W - s B A, so the model's outputs are
unchanged at step 0 and training moves only the important directions.

Because the base weight is rewritten, a trained FILA adapter only works on W_res. `export_original_adapter`
turns it into a standard rank-2r PEFT adapter for the ORIGINAL weights:
dW = s (B A - B0 A0) = s [B | -B0] [A ; A0].
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import LokuError
from .fisher import Pair, relative_importance, run_statistics, statistics_function
from .lora import LoraPlan, conv1d_type, plan_lora, weight_of, wrap_lora

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]   # module name -> (A0 (r, in), B0 (out, r))
ROW_FLOOR = 1e-6   # rows with weight below ROW_FLOOR * max row weight are lifted to it (no 1/0 in B)


def _randomized_svd(M: torch.Tensor, rank: int, oversample: int = 10, n_iter: int = 4, seed: int = 0):
    """Top-`rank` SVD of M (m, n) by torch.svd_lowrank (Halko et al. 2011), on a forked RNG seeded with `seed`:
    reproducible, and the global RNG the training run uses is left as it was."""
    with torch.random.fork_rng(devices=[M.device] if M.device.type == "cuda" else []):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(M, q=min(rank + oversample, *M.shape), niter=n_iter)   # (m, q), (q,), (n, q)
    return U[:, :rank], S[:rank], V[:, :rank].T


def _top_svd(M: torch.Tensor, rank: int):
    """Exact top-`rank` SVD of M (m, n) in float64: a direct eigensolver (LAPACK dsyevr, no sampling) on the
    smaller Gram matrix, asked for the top `rank` eigenpairs only, then the other side as M v / s. About 3x
    faster on CPU than a full SVD of M, and as exact for the directions kept; when the r-th singular value is
    below 1e-6 of the first (Gram squaring would cost digits there) it falls back to torch's full SVD."""
    import scipy.linalg

    M64 = M.double()
    tall = M.shape[0] >= M.shape[1]
    G = M64.T @ M64 if tall else M64 @ M64.T                                       # (k, k), k = min(m, n)
    k = G.shape[0]
    if G.device.type == "cpu":
        vals, vecs = scipy.linalg.eigh(G.numpy(), subset_by_index=[k - rank, k - 1], driver="evr")
        vals, vecs = torch.from_numpy(vals), torch.from_numpy(vecs)
    else:
        vals, vecs = torch.linalg.eigh(G)
        vals, vecs = vals[k - rank:], vecs[:, k - rank:]
    S = vals.flip(0).clamp(min=0).sqrt()                                            # (r,) descending
    vecs = vecs.flip(1)                                                             # (k, r)
    if S[-1] <= 1e-6 * S[0]:
        U, S, Vh = torch.linalg.svd(M64, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    if tall:
        return (M64 @ vecs) / S, S, vecs.T                                         # U (m, r), S, Vh (r, n)
    return vecs, S, ((M64.T @ vecs) / S).T


def fila_factors(weight: torch.Tensor, importance: torch.Tensor, rank: int, scaling: float, svd: str = "exact",
                 *, name: str = "weight", compute_dtype: torch.dtype = torch.float32):
    """(W (out, in), I (out, in), r, s) -> (A (r, in), B (out, r), residual (out, in)), in W's dtype.

    w = sqrt(I.sum(1)); U S V^T = rank-r SVD of diag(w) W; A = sqrt(S/s) V^T; B = diag(1/w) U sqrt(S/s);
    residual = W - s B A. Then s B A = diag(1/w) U S V^T minimises ||diag(w) (W - X)||_F over rank-r X,
    the error being the sum of the tail S^2. Rows whose w is below ROW_FLOOR * max(w) (no importance)
    are lifted to that floor: they barely count in the fit and B stays finite there.
    svd="exact" (default) is a direct solver in float64 (`_top_svd`); svd="randomized" is faster still on large
    weights but approximate; the residual keeps W = residual + s B A either way."""
    out_f, in_f = weight.shape
    if rank < 1 or rank > min(out_f, in_f):
        raise LokuError(f"LoRA rank {rank} does not fit module {name} of shape ({out_f}, {in_f}): "
                        f"use a rank between 1 and {min(out_f, in_f)} or drop that module from the targets")
    if tuple(importance.shape) != (out_f, in_f):
        raise LokuError(f"Fisher statistics for {name} have shape {tuple(importance.shape)} but its weight is "
                        f"({out_f}, {in_f}): they are from another model; recompute them for this one")
    if not scaling > 0:
        raise LokuError(f"LoRA scaling must be positive, got {scaling!r}: check lora_alpha")
    if svd not in ("exact", "randomized"):
        raise LokuError(f"unknown svd {svd!r}: choose exact or randomized")
    I = importance.to(weight.device, compute_dtype)
    if not torch.isfinite(I).all() or (I < 0).any():
        raise LokuError(f"importance of {name} has negative or non-finite values: recompute the Fisher statistics")
    w = I.sum(dim=1).sqrt()                                                         # (out,)
    if w.max() <= 0:
        raise LokuError(f"importance of {name} is all zero (the forget set gives it no gradient): check the "
                        f"forget data or drop {name} from the targets")
    w = w.clamp(min=float(w.max()) * ROW_FLOOR)
    W = weight.detach().to(compute_dtype)                                           # (out, in)
    M = w[:, None] * W                                                              # diag(w) W
    if svd == "exact":
        U, S, Vh = (t.to(compute_dtype) for t in _top_svd(M, rank))                # (out, r), (r,), (r, in)
    else:
        U, S, Vh = _randomized_svd(M, rank)
    root = (S / scaling).sqrt()                                                     # (r,)
    A = (root[:, None] * Vh).to(weight.dtype)                                       # (r, in)
    B = ((U / w[:, None]) * root[None, :]).to(weight.dtype)                         # (out, r)
    # The residual uses the factors as stored, so the model computes exactly W (up to W's own rounding).
    residual = (W - scaling * B.to(compute_dtype) @ A.to(compute_dtype)).to(weight.dtype)
    return A, B, residual


# ---------------------------------------------------------------------------------------------- peft

def lora_layers(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[str, nn.Module]]:
    """Plain module name (as in the unwrapped model) -> (name inside peft_model, peft LoraLayer)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for full, m in peft_model.named_modules():
        if isinstance(m, LoraLayer) and adapter_name in m.lora_A:
            plain = full.split("base_model.model.", 1)[-1]
            out[plain] = (full, m)
    if not out:
        raise LokuError(f"the model has no LoRA adapter named {adapter_name!r}: wrap it with peft first "
                        f"(loku.lora.add_lora) or pass the right adapter_name")
    return out


def _check_layer(name: str, layer: nn.Module, adapter: str) -> None:
    base = layer.get_base_layer()
    if not isinstance(base, (nn.Linear, conv1d_type())):
        raise LokuError(f"FILA initialises Linear/Conv1D layers, but {name} is a {type(base).__name__}: "
                        f"drop it from the targets")
    if getattr(layer, "use_dora", {}).get(adapter, False):
        raise LokuError(f"FILA rewrites the base weight, which DoRA's magnitude depends on ({name}): "
                        f"use plain LoRA")
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise LokuError(f"FILA's conversion covers weights only, but {name} has a LoRA bias: set lora_bias=False")


@torch.no_grad()
def apply_fila(peft_model: nn.Module, importance: dict[str, torch.Tensor], adapter_name: str = "default",
               svd: str = "exact") -> Factors:
    """Write FILA factors into peft's LoRA modules (lora_A, lora_B) and the residual into each base layer,
    Linear or Conv1D. Outputs are unchanged. Returns the starting factors {name: (A0, B0)} of every LoRA
    layer (on CPU), which `export_original_adapter` needs; layers without importance keep peft's init."""
    layers = lora_layers(peft_model, adapter_name)
    unknown = sorted(set(importance) - set(layers))
    if unknown:
        raise LokuError(f"Fisher statistics name modules without a LoRA adapter ({', '.join(unknown[:3])}): "
                        f"those with one are {', '.join(sorted(layers)[:6])}{' ...' if len(layers) > 6 else ''}")
    initial: Factors = {}
    for name, (_, layer) in layers.items():
        _check_layer(name, layer, adapter_name)
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if name in importance:
            base = layer.get_base_layer()
            A, B, residual = fila_factors(weight_of(base), importance[name], lora_A.weight.shape[0],
                                          layer.scaling[adapter_name], svd, name=name)
            lora_A.weight.copy_(A)
            lora_B.weight.copy_(B)
            weight_of(base).copy_(residual)   # (out, in) into a Linear (out, in) or a Conv1D (in, out)
        initial[name] = (lora_A.weight.detach().cpu().clone(), lora_B.weight.detach().cpu().clone())
    return initial


def fila_init(model: nn.Module, batch_pairs: Iterable[Pair], rank: int | None = None, alpha: float | None = None,
              target_modules: list[str] | None = None, method: str = "fila", eps: float = 1e-5,
              svd: str = "exact", dropout: float = 0.0, cache: str | Path | None = None, progress: bool = True,
              plan: LoraPlan | None = None, **stats_kwargs):
    """Plain model -> (peft model initialised with FILA or VILA, initial factors for the export).
    Statistics on the plain model (reused from `cache` when it matches), then peft LoRA and the factors.
    `plan` (loku.lora.plan_lora), else one made from rank, alpha and targets (short or full names)."""
    statistics_function(method, "init method")
    plan = plan or plan_lora(model, target_modules, rank, alpha)
    stats = run_statistics(method, model, list(batch_pairs), plan, cache=cache, progress=progress, **stats_kwargs)
    peft_model = wrap_lora(model, plan, dropout)
    wrapped = set(lora_layers(peft_model))
    if wrapped != set(plan.module_names):
        raise LokuError(f"peft wrapped other modules than the targets ({sorted(wrapped ^ set(plan.module_names))[:3]}"
                        "): pass full module names as targets")
    return peft_model, apply_fila(peft_model, relative_importance(stats, eps), svd=svd)


# ---------------------------------------------------------------------------------------------- export

def _layer_tensor(state_dict, full: str, layer: nn.Module, part: str, adapter_name: str) -> torch.Tensor:
    """A LoRA layer's weight ("lora_A", "lora_B" or "base_layer"): from `state_dict` (keys of the peft model's
    own state_dict, e.g. gathered from FSDP shards) when given, else from the layer itself."""
    if state_dict is not None:
        return state_dict[f"{full}.{part}.weight" if part == "base_layer" else f"{full}.{part}.{adapter_name}.weight"]
    if part == "base_layer":
        return weight_of(layer.get_base_layer())
    return getattr(layer, part)[adapter_name].weight.detach()


def original_adapter_tensors(peft_model: nn.Module, initial_factors: Factors, adapter_name: str = "default",
                             state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The rank-2r state dict (peft's saved key names) of dW = s (B A - B0 A0) = s [B | -B0] [A ; A0].
    `state_dict`: the trained weights, when the model's own are shards (FSDP, DeepSpeed)."""
    layers = lora_layers(peft_model, adapter_name)
    if set(layers) != set(initial_factors):
        diff = sorted(set(layers) ^ set(initial_factors))
        raise LokuError(f"the initial factors do not belong to this adapter (they differ at "
                        f"{', '.join(diff[:3])}): pass the factors apply_fila/fila_init returned for this model")
    out = {}
    for name, (full, layer) in layers.items():
        A, B = (_layer_tensor(state_dict, full, layer, part, adapter_name) for part in ("lora_A", "lora_B"))
        A0, B0 = (t.to(A.device, A.dtype) for t in initial_factors[name])
        if A0.shape != A.shape or B0.shape != B.shape:
            raise LokuError(f"initial factors of {name} are {tuple(A0.shape)}/{tuple(B0.shape)} but the adapter's "
                            f"are {tuple(A.shape)}/{tuple(B.shape)}: pass the factors of this adapter")
        out[f"{full}.lora_A.weight"] = torch.cat([A, A0], dim=0).cpu().contiguous()     # (2r, in)
        out[f"{full}.lora_B.weight"] = torch.cat([B, -B0], dim=1).cpu().contiguous()    # (out, 2r)
    return out


def export_original_adapter(peft_model: nn.Module, initial_factors: Factors, out_dir: str | Path,
                            adapter_name: str = "default", state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a standard PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for the
    ORIGINAL base model: `PeftModel.from_pretrained(original_model, out_dir)` then reproduces the trained
    FILA model. Rank 2r with alpha rescaled so the LoRA scaling s stays the same."""
    tensors = original_adapter_tensors(peft_model, initial_factors, adapter_name, state_dict)
    cfg = copy.deepcopy(peft_model.peft_config[adapter_name])
    # s = alpha / r (or alpha / sqrt(r) with rsLoRA); doubling r must leave s as it was.
    grow = 2 ** 0.5 if cfg.use_rslora else 2.0
    cfg.r, cfg.lora_alpha = 2 * cfg.r, cfg.lora_alpha * grow
    cfg.rank_pattern = {k: 2 * v for k, v in (cfg.rank_pattern or {}).items()}
    cfg.alpha_pattern = {k: v * grow for k, v in (cfg.alpha_pattern or {}).items()}
    cfg.init_lora_weights, cfg.inference_mode = True, True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


@torch.no_grad()
def save_merged(peft_model: nn.Module, out_dir: str | Path, adapter_name: str = "default", tokenizer=None,
                state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the trained model with the adapter merged in (each layer residual + s B A = original + dW), as a
    plain transformers model directory, without changing `peft_model` (peft's merge_and_unload would rewrite
    it in place). `state_dict`: the peft model's full weights when its own are shards (FSDP, DeepSpeed)."""
    base = peft_model.get_base_model()
    own = base.state_dict().items() if state_dict is None else \
        ((k.split("base_model.model.", 1)[-1], v) for k, v in state_dict.items())
    # adapter tensors (lora_A/B, magnitude, ...) are folded into the weight
    state = {k.replace(".base_layer.", "."): v for k, v in own if ".lora_" not in k}
    for name, (full, layer) in lora_layers(peft_model, adapter_name).items():
        W, A, B = (_layer_tensor(state_dict, full, layer, part, adapter_name)
                   for part in ("base_layer", "lora_A", "lora_B"))
        conv = isinstance(layer.get_base_layer(), conv1d_type())
        if state_dict is not None and conv:
            W = W.T   # weight_of gives (out, in); a Conv1D's saved weight is (in, out)
        merged = (W.float() + layer.scaling[adapter_name] * B.float() @ A.float()).to(W.dtype)   # (out, in)
        state[f"{name}.weight"] = merged.T.contiguous() if conv else merged
    out_dir = Path(out_dir)
    base.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir
