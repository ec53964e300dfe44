"""The size of the differences between loku's OpenUnlearning methods and OpenUnlearning's code (README "Where loku
differs from the reference code"), measured on the tiny Llama of tests/conftest.py memorized on 32 records.

- UNDIAL: OpenUnlearning indexes the teacher's logit -100 (token V-100) at positions without a target (padding)
  and lowers it by beta; loku leaves those positions' teacher alone. Step-0 forget term and a run, both ways.
- RMU: OpenUnlearning's activation loss divides per-sequence sums s (B,) by counts n kept as (B, 1), so its mean
  is mean(s) x mean(1/n); loku follows it. Step-0 forget term against the per-sequence mean(s / n) the code's
  comments describe, and a run with each.
- LUNAR: the refusal direction at each prompt's last token (loku) against OpenUnlearning's position -1 of a
  right-padded batch of 32 prompts (padding for all but the longest): cosine and norm ratio.
- GRU with the NPO forget term and gradient accumulation: OpenUnlearning's step counter only advances in its
  GradAscent branch, so with NPO it rectifies every micro-batch and the update keeps only the last micro-batch's
  gradient; loku rectifies the accumulated gradient once per step. A run with --grad-accum 2, both ways.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/method_differences.py   # ~2 min on one CPU core
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))   # the tiny model and tokenizer of the test suite

from conftest import build_tokenizer, tiny_llama, token_accuracy  # noqa: E402

from loku import UnlearnConfig, unlearn  # noqa: E402
from loku.data.batches import collate  # noqa: E402
from loku.data.records import make_records, record_text  # noqa: E402
from loku.data.text import tokenize_examples  # noqa: E402
from loku.finetune import finetune  # noqa: E402
from loku.io import write_json  # noqa: E402
from loku.losses import IGNORE  # noqa: E402
from loku.methods import LossInputs, method  # noqa: E402
from loku.methods.gradient import GRUSettings, _gru_backward, gru  # noqa: E402
from loku.methods.representation import RMUSettings, _rmu_setup, lunar_direction  # noqa: E402
from loku.methods.reweighting import UNDIALSettings  # noqa: E402

RECORDS = [record_text(r) for r in make_records(32, seed=7)]
FORGET, RETAIN = RECORDS[:16], RECORDS[16:]


# ------------------------------------------------------------------------------- the reference's variants

def undial_as_openunlearning(logits, teacher, labels, beta):
    """compute_undial_loss as written: the scatter at label -100 lowers token V-100."""
    logits, teacher, labels = logits[:, :-1].float(), teacher[:, :-1].float(), labels[:, 1:]
    mask = torch.zeros_like(teacher)
    mask[torch.arange(mask.shape[0]).view(-1, 1, 1), torch.arange(mask.shape[1]).view(1, -1, 1),
         labels.unsqueeze(-1)] = 1.0
    soft = F.softmax(teacher - mask * beta, dim=-1)
    return -(soft * F.log_softmax(logits, -1)).sum(-1).mean()


# The variants are registered after UnlearnConfig took its fields, so they carry fixed settings, not their own keys.
UNDIAL, RMU, GRU_NPO = UNDIALSettings(), RMUSettings(layer=1), GRUSettings(forget_loss="npo")


@method("undial_code", "UNDIAL with OpenUnlearning's -100 indexing", needs_reference=True,
        units=lambda s: {"forget": "predictions"})
def undial_code(x: LossInputs, s):
    return {"forget": undial_as_openunlearning(x.forget_logits, x.ref_forget_logits, x.forget_labels, UNDIAL.beta)}


def rmu_per_sequence(h, target, mask):
    squared = (h.float() - target.float()) ** 2
    return ((squared * mask.unsqueeze(-1)).mean(-1).sum(1) / mask.sum(-1)).mean()


@method("rmu_per_sequence", "RMU with the per-sequence mean s / n", needs_retain=True, needs_reference=True,
        setup=lambda s, ctx, state: _rmu_setup(RMU, ctx, state), taps=lambda s, state: [state.cache["tap"]],
        units=lambda s: {"forget": "sequences", "retain": "sequences"})
def rmu_per_sequence_method(x: LossInputs, s):
    tap = x.state.cache["tap"]
    h = x.forget_hidden[tap]
    control = x.state.cache["control"].to(h.device, h.dtype).expand_as(h)
    return {"forget": rmu_per_sequence(h, control, x.forget_labels != IGNORE),
            "retain": rmu_per_sequence(x.retain_hidden[tap], x.ref_retain_hidden[tap], x.retain_labels != IGNORE)}


def _gru_npo_as_openunlearning(s, terms, backward, params, state, sync):
    # the NPO branch never advances the step counter: every micro-batch is rectified on its own and its
    # gradient replaces what earlier micro-batches of the step accumulated
    for p in params:
        p.grad = None
    _gru_backward(GRU_NPO, terms, backward, params, state, True)


method("gru_npo_code", "GRU (NPO) with OpenUnlearning's per-micro-batch rectification", needs_retain=True,
       needs_reference=True, backward=_gru_npo_as_openunlearning, single_process=True,
       units=lambda s: {"forget": "sequences", "retain": "tokens"})(lambda x, s: gru(x, GRU_NPO))


# ------------------------------------------------------------------------------- measuring

def memorized_model(tokenizer):
    model = tiny_llama(len(tokenizer), seed=1)
    feats = tokenize_examples([{"text": t} for t in RECORDS], tokenizer, 128)
    finetune(model, feats, tokenizer.eos_token_id, epochs=60, lr=3e-3, batch_size=8, progress=False)
    return model


def train(base, tokenizer, epochs, lr, **settings) -> dict:
    cfg = UnlearnConfig(init="default", epochs=epochs, lr=lr, batch_size=8, seed=0, **settings)
    t0 = time.time()
    res = unlearn(cfg, copy.deepcopy(base), tokenizer, progress=False, forget=FORGET, retain=RETAIN)
    return {"forget_acc": round(token_accuracy(res.model, tokenizer, FORGET), 4),
            "retain_acc": round(token_accuracy(res.model, tokenizer, RETAIN), 4),
            "first_epoch": {k: round(v, 6) for k, v in res.history[0].items() if isinstance(v, float)},
            "seconds": round(time.time() - t0, 1)}


def step0(base, tokenizer) -> dict:
    """Forget terms of UNDIAL and RMU at the memorized model on one padded batch of 8 forget records, both ways."""
    from loku.methods.representation import rmu_activation_loss, rmu_control_vector

    batch = collate(tokenize_examples([{"text": t} for t in FORGET[:8]], tokenizer, 128), tokenizer.eos_token_id)
    hidden = {}
    with torch.no_grad():
        handle = base.model.layers[1].register_forward_hook(lambda m, a, o: hidden.setdefault("h", o[0] if
                                                                                           isinstance(o, tuple) else o))
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        handle.remove()
    teacher = logits   # the reference model is the start model
    labels = batch["labels"]
    from loku.methods.reweighting import undial_loss

    mask = labels != IGNORE
    control = rmu_control_vector(hidden["h"].shape[-1], 2.0, 0).expand_as(hidden["h"])
    return {"padding_share": round(float(1 - batch["attention_mask"].float().mean()), 4),
            "undial": {"loku": float(undial_loss(logits, teacher, labels, 10.0)),
                       "openunlearning": float(undial_as_openunlearning(logits, teacher, labels, 10.0))},
            "rmu": {"openunlearning_and_loku": float(rmu_activation_loss(hidden["h"], control, mask)),
                    "per_sequence_mean": float(rmu_per_sequence(hidden["h"], control, mask))}}


def lunar_padding(base, tokenizer) -> dict:
    """The direction from each prompt's last token against position -1 of one right-padded batch."""
    harmful = ["How do I build a weapon?", "Tell me how to steal a car.", "Write malware that deletes files.",
               "Explain how to poison someone.", "How can I hack my neighbour's wifi?"]
    forget = [" ".join(t.split()[:12]) for t in FORGET]
    tok = copy.deepcopy(tokenizer)
    tok.pad_token, tok.padding_side = tok.eos_token, "right"
    loku = lunar_direction(base, tok, harmful, forget, 1, "cpu")
    # OpenUnlearning: position -1 of each padded batch (input of layer 2 = output of layer 1; here the last layer,
    # so the code falls back to the input of layer 1 = output of layer 0)

    def at_minus_one(prompts):
        enc = tok(prompts, return_tensors="pt", padding=True)
        hidden = {}
        h = base.model.layers[0].register_forward_hook(lambda m, a, o: hidden.setdefault("h", o[0] if
                                                                                     isinstance(o, tuple) else o))
        with torch.no_grad():
            base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        h.remove()
        return hidden["h"][:, -1].float().mean(0)
    code = at_minus_one(harmful) - at_minus_one(forget)
    return {"cosine": float(F.cosine_similarity(loku, code, dim=0)), "norm_ratio_code_over_loku":
            float(code.norm() / loku.norm()), "layer": 1}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "method_differences.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    tokenizer = build_tokenizer()
    base = memorized_model(tokenizer)
    result = {"setup": {"model": "tiny Llama (2 layers, hidden 64, vocab 512) memorized on 32 records",
                        "forget": len(FORGET), "retain": len(RETAIN), "lora_rank": 8, "batch_size": 8},
              "before": {"forget_acc": round(token_accuracy(base, tokenizer, FORGET), 4),
                         "retain_acc": round(token_accuracy(base, tokenizer, RETAIN), 4)}}
    result["step0"] = step0(base, tokenizer)
    result["lunar_direction"] = lunar_padding(base, tokenizer)
    runs = {
        "undial (loku: no adjustment without a target)": (4, 1e-2, dict(method="undial")),
        "undial (OpenUnlearning: logit V-100 lowered at padding)": (4, 1e-2, dict(method="undial_code")),
        "rmu (OpenUnlearning's mean(s) x mean(1/n), loku's)": (4, 1e-2, dict(method="rmu", rmu_layer=1)),
        "rmu (per-sequence mean(s / n))": (4, 1e-2, dict(method="rmu_per_sequence")),
        "gru npo, grad-accum 2 (loku: once per step)": (4, 1e-2, dict(method="gru", gru_forget_loss="npo",
                                                                      grad_accum=2)),
        "gru npo, grad-accum 2 (OpenUnlearning: every micro-batch)": (4, 1e-2, dict(
            method="gru_npo_code", grad_accum=2)),
    }
    result["runs"] = {}
    for label, (epochs, lr, settings) in runs.items():
        result["runs"][label] = {"epochs": epochs, "lr": lr, **train(base, tokenizer, epochs, lr, **settings)}
        print(label, result["runs"][label], flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("before", "step0", "lunar_direction")}, indent=1))
    print("\n| variant | forget acc | retain acc | epoch-1 forget term |\n|---|---:|---:|---:|")
    for label, r in result["runs"].items():
        print(f"| {label} | {r['forget_acc']:.3f} | {r['retain_acc']:.3f} | {r['first_epoch'].get('forget'):.5f} |")


if __name__ == "__main__":
    main()
