"""T3 (temper-then-tilt): the model stays frozen; a small classifier head learns, per next token, whether the
context looks like retain (1) or forget (0) data; generation then tilts the model's distribution by it:
log p_base / base_temp + guidance_scale x log sigmoid(classifier logit). OpenUnlearning `src/model/t3.py` and
`src/trainer/unlearn/t3.py`.

In loku the head is a submodule of the model (`t3_head`), the only weights that train; it reads the input of the
output head (the final hidden states) through a tap, and `guide` makes the model's own forward return the
tilted logits in eval mode (right-padded batches, as loku pads them), so every evaluation sees the unlearned
model. A run writes the head to `t3/` beside the (unchanged) model; `load_guidance` puts it back."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..config_base import setting
from ..errors import LokuError
from ..losses import IGNORE, upcast
from .base import LossInputs, MethodState, method

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "id": nn.Identity}


class GuidanceHead(nn.Module):
    """hidden -> hidden_size (-> hidden_size ...) -> vocabulary logits, as OpenUnlearning's DataSplitClassifier."""

    def __init__(self, input_dim: int, vocab: int, hidden_size: int = 100, num_hidden_layers: int = 1,
                 activation: str = "id", bias: bool = False):
        super().__init__()
        layers = [nn.Linear(input_dim, hidden_size, bias=bias), ACTIVATIONS[activation]()]
        for _ in range(num_hidden_layers - 1):
            layers += [nn.Linear(hidden_size, hidden_size, bias=bias), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(hidden_size, vocab, bias=False))
        self.proj = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:          # (B, T, d) -> (B, T, V)
        return self.proj(hidden)

    def target_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The logit of `tokens` only, without the (B, T, V) output. (B, T, d), (B, T) -> (B, T)"""
        x = self.proj[:-1](hidden)
        return (x * self.proj[-1].weight[tokens]).sum(-1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Running mean over the prefix up to each position (padding left out). (B, T, d)"""
    if attention_mask is None:
        steps = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
        return hidden.cumsum(1) / steps.view(1, -1, 1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).cumsum(1) / mask.cumsum(1).clamp_min(1)


def classifier_terms(head: GuidanceHead, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of binary cross-entropies with logits, count) over the next-token targets of one batch, each
    classified as `target` (1 retain, 0 forget). OpenUnlearning `T3._prep_classifier_loss_from_tokens`."""
    pooled = mean_pool(hidden.detach(), attention_mask)[:, :-1]               # (B, T-1, d)
    shifted = labels[:, 1:]
    valid = shifted != IGNORE
    logits = upcast(head.target_logits(pooled.to(head.proj[0].weight.dtype), shifted.clamp(min=0)))   # (B, T-1)
    bce = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none")
    return (bce * valid).sum(), valid.sum()


def guided_logits(base_logits: torch.Tensor, classifier_logits: torch.Tensor, guidance_scale: float = 1.0,
                  base_temp: float = 1.0) -> torch.Tensor:
    """log_softmax(base) / base_temp + guidance_scale x log sigmoid(classifier) (T3CausalLM._guide_logits)."""
    return F.log_softmax(upcast(base_logits), -1) / base_temp + guidance_scale * F.logsigmoid(upcast(classifier_logits))


@dataclass(frozen=True)
class T3Settings:
    guidance_scale: float = setting(1.0, "weight of the classifier's log-probability in the tilted logits "
                                    "(OpenUnlearning T3.yaml: 1).", bound="non-negative")
    base_temp: float = setting(1.0, "temperature of the model's log-probabilities (T3.yaml: 1).", bound="positive")
    hidden_size: int = setting(100, "the classifier head's width (T3.yaml guidance_cfg: 100).", bound="positive")
    num_hidden_layers: int = setting(1, "its hidden layers (T3.yaml: 1).", bound="positive")
    activation: str = setting("id", "its activation (T3.yaml: id).", choices=tuple(ACTIVATIONS))
    bias: bool = setting(False, "biases in its hidden layers (T3.yaml: false).")


def _head_tap(model) -> str:
    head = model.get_output_embeddings()
    return next(n for n, m in model.named_modules() if m is head) + ":input"


def _t3_check(s: T3Settings, cfg) -> None:
    if s.num_hidden_layers > 1 and s.activation == "id":
        raise LokuError("t3 with more than one hidden layer needs a nonlinearity: pass --t3-activation relu (or "
                        "--t3-num-hidden-layers 1)")
    if getattr(cfg, "init", "auto") in ("fila", "vila"):
        raise LokuError(f"t3 trains a classifier head on the frozen model, so --init {cfg.init} has nothing to "
                        "initialise: drop --init")


def new_head(s: T3Settings, model, seed: int) -> GuidanceHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = GuidanceHead(model.config.hidden_size, model.get_output_embeddings().weight.shape[0], s.hidden_size,
                            s.num_hidden_layers, s.activation, s.bias)
    p = next(model.parameters())
    return head.to(device=p.device, dtype=p.dtype)


def guide(model, head: GuidanceHead, s: T3Settings):
    """Makes `model`'s forward return T3's tilted logits whenever it runs in eval mode (a hook on its output
    head, pooling the final hidden states over the prefix). Returns the hook's handle."""
    def tilt(module, args, output):
        if module.training:
            return None
        hidden = args[0]
        return guided_logits(output, head(mean_pool(hidden).to(head.proj[0].weight.dtype)), s.guidance_scale,
                             s.base_temp).to(output.dtype)
    return model.get_output_embeddings().register_forward_hook(tilt)


def _t3_setup(s: T3Settings, ctx, state: MethodState) -> None:
    model = ctx.model
    if not hasattr(model, "t3_head"):
        model.t3_head = new_head(s, model, ctx.seed)
    state.cache["tap"] = _head_tap(model)
    state.cache["head"] = model.t3_head
    state.cache["hook"] = guide(model, model.t3_head, s)


def save_guidance(s: T3Settings, model, state: MethodState, directory: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.cache["head"].state_dict().items()},
              str(directory / "head.safetensors"))
    (directory / "t3.json").write_text(json.dumps(asdict(s), indent=1))


def load_guidance(model, directory: str | Path) -> GuidanceHead:
    """Puts a run's T3 head (its `t3/` directory) on `model`, whose eval-mode logits are then the tilted ones."""
    directory = Path(directory)
    if not (directory / "head.safetensors").is_file() or not (directory / "t3.json").is_file():
        raise LokuError(f"{directory} is not a T3 head (head.safetensors and t3.json): pass a run's t3/ directory")
    s = T3Settings(**json.loads((directory / "t3.json").read_text()))
    head = new_head(s, model, 0)
    head.load_state_dict(load_file(str(directory / "head.safetensors")))
    model.t3_head = head
    guide(model, head, s)
    return head


@method("t3", "temper-then-tilt: a classifier head on the frozen model tilts its next-token distribution away "
        "from forget data", settings=T3Settings, needs_retain=True, check=_t3_check, setup=_t3_setup,
        taps=lambda s, state: [state.cache["tap"]], trainable=lambda s, state: ["t3_head"], adapters=False,
        save=lambda s, model, state, directory: save_guidance(s, model, state, directory),
        units=lambda s: {"forget": "pooled", "retain": "pooled"})
def t3(x: LossInputs, s: T3Settings):
    head, tap = x.state.cache["head"], x.state.cache["tap"]
    retain_sum, retain_n = classifier_terms(head, x.retain_hidden[tap], x.retain_attention, x.retain_labels, 1.0)
    forget_sum, forget_n = classifier_terms(head, x.forget_hidden[tap], x.forget_attention, x.forget_labels, 0.0)
    n = (retain_n + forget_n).clamp(min=1)
    return {"forget": forget_sum / n, "retain": retain_sum / n}
