"""Methods that hold the retain loss to a budget with a dual variable (the retain term's weight, adapted as
training runs): pdu (primal-dual) and sibl (sparse bilevel augmented Lagrangian)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config_base import setting
from ..errors import LokuError
from ..losses import IGNORE, cross_entropy, upcast
from .base import LossInputs, MethodState, method, retain_ce


def margin_flattening(logits: torch.Tensor) -> torch.Tensor:
    """Per position: the largest logit minus the mean logit, float32. (B, T)"""
    logits = upcast(logits)
    return logits.max(dim=-1).values - logits.mean(dim=-1)


# ------------------------------------------------------------------------------------------- pdu

def pdu_forget_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """OpenUnlearning `PDU.compute_loss`'s forget term: (max logit - mean logit)^2 averaged over the positions
    whose own label is kept (labels != -100, not shifted: the reference masks the logits by the unshifted
    labels)."""
    mask = labels != IGNORE                                                    # (B, T)
    return (margin_flattening(logits) ** 2 * mask).sum() / mask.sum()


@dataclass(frozen=True)
class PDUSettings:
    retain_loss_eps: float | None = setting(None, "the retain loss budget: the dual variable grows while the "
                                            "retain cross-entropy exceeds it (OpenUnlearning PDU.yaml: required, "
                                            "e.g. the start model's retain loss).", default_text="none: required")
    primal_dual: bool = setting(True, "adapt the retain weight by dual ascent (PDU.yaml: true); off: a fixed "
                                "weight --retain-weight.")
    dual_step_size: float = setting(1.0, "dual ascent step: weight += step x (retain loss - eps) "
                                    "(PDU.yaml: 1).", bound="non-negative")
    dual_update_upon: str = setting("step", "when the dual variable moves: every step (on that step's retain "
                                    "loss) or every epoch (on the epoch's mean retain loss) (PDU.yaml: step).",
                                    choices=("step", "epoch"))
    dual_warmup_epochs: int = setting(5, "epochs before the dual variable starts to move (PDU.yaml: 5).",
                                      bound="non-negative")


def _pdu_check(s: PDUSettings, cfg) -> None:
    if s.retain_loss_eps is None:
        raise LokuError("pdu needs --pdu-retain-loss-eps: the retain loss budget its dual ascent holds the model "
                        "to (OpenUnlearning leaves it required), e.g. the start model's retain cross-entropy")


def _pdu_setup(s: PDUSettings, ctx, state: MethodState) -> None:
    state.retain_weight = ctx.retain_weight          # OpenUnlearning: preferences = [gamma, alpha]
    state.values["can_update"] = float(s.dual_warmup_epochs == 0)


def _pdu_epoch_end(s: PDUSettings, state: MethodState, epoch: int, retain_loss) -> None:
    # OpenUnlearning's DualOptimizationCallback (registered only for primal_dual): after warm-up epochs, enable
    # the per-step updates, or update on the epoch's mean retain loss.
    if not s.primal_dual or epoch < s.dual_warmup_epochs:
        return
    state.values["can_update"] = 1.0
    if s.dual_update_upon == "epoch":
        state.retain_weight = max(0.0, state.retain_weight + s.dual_step_size * (retain_loss() - s.retain_loss_eps))


@method("pdu", "primal-dual unlearning: flatten forget logits, retain loss held to a budget by a dual variable",
        settings=PDUSettings, needs_retain=True, check=_pdu_check, setup=_pdu_setup, epoch_end=_pdu_epoch_end,
        units=lambda s: {"forget": "labels", "retain": "tokens"})
def pdu(x: LossInputs, s: PDUSettings):
    retain = retain_ce(x) - s.retain_loss_eps
    state = x.state
    if s.primal_dual and state.values["can_update"] and s.dual_update_upon == "step":
        # after this step's loss took the current weight, as PDU.final_loss_value
        state.retain_weight = max(0.0, state.retain_weight + s.dual_step_size * float(retain.detach()))
    return {"forget": pdu_forget_loss(x.forget_logits, x.forget_labels), "retain": retain}


@torch.no_grad()
def mean_retain_loss(model, pairs, device) -> float:
    """Mean over batches of the retain cross-entropy, in eval mode (PDU's per-epoch dual update)."""
    training, total, n = model.training, 0.0, 0
    model.eval()
    for _, retain in pairs:
        out = model(input_ids=retain["input_ids"].to(device), attention_mask=retain["attention_mask"].to(device),
                    use_cache=False)
        total += float(cross_entropy(out.logits, retain["labels"].to(device)))
        n += 1
    model.train(training)
    return total / max(n, 1)


# ------------------------------------------------------------------------------------------- sibl

def magnitude_masks(named_params, sparsity: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """OpenUnlearning `SparsityManager._layerwise_magnitude` over the trainable weights: each weight matrix keeps
    the entries at or above its `sparsity` quantile of |w| (estimated from 1M sampled entries past 10M);
    biases and vectors are kept whole. 1 = updated, 0 = frozen."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in named_params:
        if "weight" in name and p.dim() >= 2:
            flat = upcast(p.detach().abs().reshape(-1))
            if flat.numel() > 10_000_000:
                flat = flat[torch.randperm(flat.numel(), generator=g)[:1_000_000].to(flat.device)]
            masks[name] = (p.detach().abs() >= torch.quantile(flat, sparsity)).to(p.dtype)
        else:
            masks[name] = torch.ones_like(p)
    return masks


def conjugate_gradient(hvp, b: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
    """Solve H x = b with scipy's conjugate gradient (maxiter `iters`, atol `tol`, rtol 0), H given by `hvp`,
    as OpenUnlearning's `SIBL.conjugate_gradient_scipy`."""
    from scipy.sparse.linalg import LinearOperator, cg   # here: its import takes ~2 s, and `loku` imports methods at start

    device, dtype = b.device, b.dtype

    def matvec(v):
        return hvp(torch.from_numpy(np.asarray(v)).to(device=device, dtype=dtype)).detach().cpu().numpy()

    operator = LinearOperator((b.numel(), b.numel()), matvec=matvec, dtype=b.detach().cpu().numpy().dtype)
    x, _ = cg(operator, b.detach().cpu().numpy(), maxiter=iters, atol=tol, rtol=0)
    return torch.from_numpy(x).to(device=device, dtype=dtype)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def hvp(grads, params, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Hessian-vector product from gradients taken with create_graph=True: d/dparams (grads . v)."""
    return torch.autograd.grad(flat(grads) @ v, params, retain_graph=True)


def sibl_outer_gradient(alm: torch.Tensor, inner: torch.Tensor, params: list, mask: torch.Tensor,
                        implicit: bool, cg_iters: int, cg_tol: float) -> torch.Tensor:
    """The outer gradient of SIBL (OpenUnlearning `SIBL.outer_step`), flat: g = grad(alm), minus, with the
    implicit correction, H_alm h where h solves (M H_inner M) h = M grad(inner) by conjugate gradient
    (M the sparsity mask)."""
    g_alm = torch.autograd.grad(alm, params, create_graph=implicit, retain_graph=True)
    g = flat(g_alm).detach()
    if not implicit:
        return g
    g_inner = torch.autograd.grad(inner, params, create_graph=True, retain_graph=True)
    v = flat(g_inner).detach() * mask
    h = conjugate_gradient(lambda vec: flat(hvp(g_inner, params, vec * mask)) * mask, v, cg_iters, cg_tol)
    return g - flat(hvp(g_alm, params, h))


@dataclass(frozen=True)
class SIBLSettings:
    epsilon: float = setting(0.1, "the retain loss budget (SIBL.yaml: 0.1).", bound="non-negative")
    rho: float = setting(1.0, "augmented-Lagrangian penalty and dual step (SIBL.yaml: 1).", bound="non-negative")
    K: int = setting(10, "inner steps of masked SGD on the retain batch before each outer step (SIBL.yaml: 10).",
                     bound="non-negative")
    eta_theta: float = setting(1e-4, "outer learning rate: SIBL makes its own SGD update, --lr is not used "
                               "(SIBL.yaml: 1e-4).", bound="positive")
    eta_in: float = setting(1e-4, "inner learning rate (SIBL.yaml: 1e-4).", bound="positive")
    gamma: float = setting(1e-4, "L1 coefficient of the inner (retain) objective (SIBL.yaml: 1e-4).",
                           bound="non-negative")
    use_sparsity: bool = setting(True, "update only the largest-magnitude weights (SIBL.yaml: true).")
    sparsity: float = setting(0.9, "fraction of each weight matrix kept frozen (SIBL.yaml: 0.9).",
                              bound="non-negative")
    use_implicit: bool = setting(True, "implicit-differentiation correction by conjugate gradient "
                                 "(SIBL.yaml: true).")
    cg_iters: int = setting(10, "conjugate-gradient iterations (SIBL.yaml: 10).", bound="positive")
    cg_tol: float = setting(1e-3, "conjugate-gradient absolute tolerance (SIBL.yaml: 1e-3).", bound="positive")


def _sibl_check(s: SIBLSettings, cfg) -> None:
    if not s.sparsity < 1:
        raise LokuError(f"sibl-sparsity must be below 1, got {s.sparsity}: pass e.g. --sibl-sparsity 0.9")
    if getattr(cfg, "grad_accum", 1) != 1:
        raise LokuError("sibl makes its own update on every batch: drop --grad-accum (or set it to 1)")


def _sibl_setup(s: SIBLSettings, ctx, state: MethodState) -> None:
    state.retain_weight = 0.0                      # the dual variable lambda starts at 0


def _sibl_attach(s: SIBLSettings, model, state: MethodState) -> None:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    masks = magnitude_masks(named, s.sparsity) if s.use_sparsity else {n: torch.ones_like(p) for n, p in named}
    state.cache["params"] = [p for _, p in named]
    state.cache["masks"] = [masks[n] for n, _ in named]


def _l1(params, masks) -> torch.Tensor:
    return sum((p.abs() * m).sum() for p, m in zip(params, masks))


def _sibl_prestep(s: SIBLSettings, model, retain: dict, state: MethodState) -> None:
    """K inner steps of masked SGD on the retain batch: cross-entropy + gamma x L1 (SIBL.inner_loop)."""
    params, masks = state.cache["params"], state.cache["masks"]
    for _ in range(s.K):
        logits = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"], use_cache=False).logits
        loss = cross_entropy(logits, retain["labels"]) + s.gamma * _l1(params, masks)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g, m in zip(params, grads, masks):
                if g is not None:
                    p.sub_(s.eta_in * g * m)


def _sibl_backward(s: SIBLSettings, terms: dict, backward, params, state: MethodState, sync: bool) -> None:
    """The outer step in place of backward + the optimizer: p -= eta_theta x mask x outer gradient; the
    optimizer then finds no gradient and leaves the weights alone."""
    params, masks = state.cache["params"], state.cache["masks"]
    mask = flat(masks)
    inner = state.cache.pop("retain_ce") + s.gamma * _l1(params, masks)
    g = sibl_outer_gradient(terms["loss"], inner, params, mask, s.use_implicit, s.cg_iters, s.cg_tol)
    with torch.no_grad():
        offset = 0
        for p, m in zip(params, masks):
            n = p.numel()
            p.sub_(s.eta_theta * g[offset:offset + n].view_as(p) * m)
            p.grad = None
            offset += n


@method("sibl", "sparse bilevel augmented Lagrangian: inner retain steps, outer flattening with implicit gradient",
        settings=SIBLSettings, needs_retain=True, check=_sibl_check, setup=_sibl_setup, attach=_sibl_attach,
        prestep=_sibl_prestep, backward=_sibl_backward, single_process=True, double_backward=True,
        units=lambda s: {"forget": "positions", "retain": "tokens"})
def sibl(x: LossInputs, s: SIBLSettings):
    retain = retain_ce(x)
    x.state.cache["retain_ce"] = retain
    residual = float(retain.detach()) - s.epsilon
    penalty = torch.tensor(0.5 * s.rho * residual ** 2, device=retain.device)   # a number: no gradient
    x.state.retain_weight = max(0.0, x.state.retain_weight + s.rho * residual)  # after this step took the weight
    return {"forget": margin_flattening(x.forget_logits).mean(), "retain": retain, "penalty": penalty}
