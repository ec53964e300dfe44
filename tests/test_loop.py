"""The one training loop: gradient accumulation across epoch ends, the frozen reference at step 0, and a
caller's model left as it was."""

import copy
import json
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import loku.methods
from conftest import tiny_llama
from loku import UnlearnConfig, unlearn
from loku.data.records import make_records, record_text
from loku.data.text import tokenize_examples
from loku.finetune import finetune, finetuned_copy
from loku.losses import kl_divergence, sequence_logprob

TEXTS = [record_text(r) for r in make_records(12, seed=9)]
# Unequal token lengths, so that a mean over micro-batch means differs from the mean over their tokens.
UNEQUAL = [t + " And some more words here." * (i % 3) for i, t in enumerate(TEXTS)]


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def test_accumulation_steps_end_at_epoch_ends(tokenizer, tmp_path):
    """5 forget examples, batch 1, grad_accum 2, 2 epochs: each epoch is 3 optimizer steps (2 + 2 + 1 micro-
    batches; the epoch's last micro-batch ends a step, as in Hugging Face Trainer), so 6 in all, one metrics
    line each; the linear schedule is planned for those 6, so the learning rate is 0 after the last; and no
    gradient is pending when the per-epoch callback sees the model."""
    pending = []

    def no_pending_gradients(epoch, model):
        pending.append([n for n, p in model.named_parameters() if p.grad is not None])

    cfg = UnlearnConfig(method="ga", init="default", epochs=2, batch_size=1, grad_accum=2, lr=1e-3,
                        out=str(tmp_path / "run"))
    res = unlearn(cfg, tiny_llama(len(tokenizer)), tokenizer, progress=False, forget=TEXTS[:5],
                  callbacks=[no_pending_gradients])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if line["kind"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert [s["epoch"] for s in steps] == [1, 1, 1, 2, 2, 2]
    assert steps[0]["lr"] == pytest.approx(1e-3 * 5 / 6) and steps[-1]["lr"] == 0.0
    assert pending == [[], []] and len(res.history) == 2


@pytest.mark.parametrize("method", ["ga", "npo"])   # a token mean, and a sequence mean with a reference
def test_accumulation_1x4_equals_4x1_for_unequal_lengths(tokenizer, method):
    """One batch of 4 and 4 accumulated micro-batches of 1 give the same gradient at the optimizer step (TRL's
    test of gradient accumulation). The micro-batch losses are weighted by their share of the step's tokens (or
    sequences), as Hugging Face Trainer does with num_items_in_batch (transformers/trainer.py,
    `_get_num_items_in_batch` and `training_step`); a plain mean of micro-batch means would weigh a short
    example like a long one."""
    base, runs = tiny_llama(len(tokenizer), seed=5), []
    for batch_size, accumulation in ((4, 1), (1, 4)):
        grads = []
        hook = register_optimizer_step_pre_hook(
            lambda opt, args, kwargs: grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
        cfg = UnlearnConfig(method=method, init="default", epochs=2, lr=1e-2, batch_size=batch_size,
                            grad_accum=accumulation)
        try:
            res = unlearn(cfg, base, tokenizer, progress=False, forget=UNEQUAL[:4], retain=UNEQUAL[4:8])
        finally:
            hook.remove()
        runs.append((res.history, grads))
    (h1, g1), (h4, g4) = runs
    assert len(g1) == len(g4) == 2   # one optimizer step per epoch either way
    for a, b in zip(g1[0], g4[0]):   # the first step: both start from the same weights
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.abs().max()))
    assert [h["loss"] for h in h4] == pytest.approx([h["loss"] for h in h1], rel=1e-5)


def first_loss_inputs(monkeypatch) -> list:
    """Record what the loop hands the method on its first call (the only place methods are called)."""
    seen, method_loss = [], loku.methods.method_loss

    def recording(method, x, cfg):
        seen.append(copy.copy(x))
        return method_loss(method, x, cfg)
    monkeypatch.setattr(loku.methods, "method_loss", recording)
    return seen


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("start", ["lora", "fila", "full"])
def test_reference_equals_the_policy_at_step_0(tokenizer, monkeypatch, start, precision):
    """The frozen start model runs under the policy's autocast, in eval mode, and (FILA) is taken after the
    initialisation: at the first step NPO's log ratio (forget batch) and kl's retain KL (retain batch) are exactly 0.
    Each method's reference runs only on the batches it reads (`Method.reference_on`)."""
    seen = first_loss_inputs(monkeypatch)
    for method in ("npo", "kl"):
        cfg = UnlearnConfig(method=method, epochs=1, batch_size=4, lora=start != "full",
                            init="default" if start == "lora" else "auto" if start == "full" else "fila",
                            mixed_precision=precision)
        unlearn(cfg, tiny_llama(len(tokenizer)), tokenizer, progress=False, forget=UNEQUAL[:4], retain=UNEQUAL[4:8])
    npo, kl = seen[0], seen[1]
    log_ratio = sequence_logprob(npo.forget_logits, npo.forget_labels) - sequence_logprob(npo.ref_forget_logits,
                                                                                          npo.forget_labels)
    assert torch.equal(log_ratio, torch.zeros_like(log_ratio))
    assert torch.equal(npo.forget_logits.float(), npo.ref_forget_logits.float())
    assert kl_divergence(kl.ref_retain_logits, kl.retain_logits, kl.retain_labels).item() == 0.0
    assert npo.ref_retain_logits is None and kl.ref_forget_logits is None


def test_a_retain_batch_that_is_the_whole_retain_set_runs_the_reference_once(tokenizer, monkeypatch):
    """retain_batch_size = the retain set (the demo): every step's retain batch is the same, so the frozen
    model's outputs on it are computed at the first step and reused; the adapters are bit-identical to a run
    that recomputes them at every step."""
    from loku.data.batches import PairedBatches
    from loku.training.setup import FrozenReference

    calls, call = [], FrozenReference.__call__
    monkeypatch.setattr(FrozenReference, "__call__", lambda self, batch: calls.append(batch) or call(self, batch))
    cfg = UnlearnConfig(method="ihl", ihl_retain_loss="ce+kl", init="default", epochs=2, batch_size=2, lr=1e-2,
                        retain_batch_size=4)

    def run():
        calls.clear()
        res = unlearn(cfg, tiny_llama(len(tokenizer), seed=8), tokenizer, progress=False, forget=UNEQUAL[:8],
                      retain=UNEQUAL[8:12])
        return lora_weights(res.model), len(calls), res.history
    cached, n_cached, history = run()
    monkeypatch.setattr(PairedBatches, "constant_retain", property(lambda self: False))
    fresh, n_fresh, history_fresh = run()
    assert (n_cached, n_fresh) == (1, 8)   # 4 steps an epoch, 2 epochs; ihl reads no forget reference
    assert cached.keys() == fresh.keys() and cached
    assert all(torch.equal(cached[k], fresh[k]) for k in cached)
    terms = [[h[k] for k in ("loss", "forget", "retain")] for h in history]
    assert terms == [[h[k] for k in ("loss", "forget", "retain")] for h in history_fresh]
    assert all(h["retain"] > 0 for h in history)


@pytest.mark.parametrize("start", ["lora", "full"])
def test_reference_runs_in_eval_mode(tokenizer, monkeypatch, start):
    """With attention dropout in the model, the reference's logits are the start model's in eval mode (no
    dropout), while the policy trains with dropout."""
    model = tiny_llama(len(tokenizer))
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    seen = first_loss_inputs(monkeypatch)
    cfg = UnlearnConfig(method="npo", epochs=1, batch_size=4, lora=start == "lora",
                        init="default" if start == "lora" else "auto")
    unlearn(cfg, model, tokenizer, progress=False, forget=UNEQUAL[:4], retain=UNEQUAL[4:8])
    x = seen[0]
    labels = x.forget_labels            # plain text: every real token is a label, padding is -100
    ids = torch.where(labels == -100, tokenizer.pad_token_id, labels)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, attention_mask=(labels != -100).long()).logits
    assert torch.equal(x.ref_forget_logits, expected)
    assert not torch.equal(x.forget_logits, x.ref_forget_logits)   # the policy did train with dropout


@pytest.mark.parametrize("init", ["default", "fila"])
def test_unlearn_leaves_the_given_model_as_it_was(tokenizer, init):
    """Two runs in a row on one loaded model give what two fresh loads give (FILA rewrites base weights and
    peft wraps modules: both happen to a copy), and the model's weights stay bit-identical."""
    model = tiny_llama(len(tokenizer), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = UnlearnConfig(method="ihl", init=init, epochs=2, batch_size=2, lr=1e-2)

    def run(m):
        return lora_weights(unlearn(cfg, m, tokenizer, progress=False, forget=TEXTS[:4], retain=TEXTS[4:8]).model)
    first, second, fresh = run(model), run(model), run(tiny_llama(len(tokenizer), seed=3))
    assert first.keys() == second.keys() == fresh.keys() and first
    assert all(torch.equal(first[k], second[k]) and torch.equal(first[k], fresh[k]) for k in first)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model, "peft_config")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_ihl_with_a_kl_retain_term_pulls_retain_back_to_the_start_model(tokenizer, tmp_path):
    """--ihl-retain-loss kl: the retain term is the KL to a frozen copy of the start model (FILA rewrites the base,
    so the copy is a real one), zero at the first step and positive once the weights moved; the paper's ce
    default needs no reference."""
    from loku.methods import METHODS
    from loku.training.setup import frozen_copy

    cfg = UnlearnConfig(method="ihl", init="fila", epochs=2, batch_size=2, lr=1e-2, ihl_retain_loss="kl",
                        out=str(tmp_path / "run"))
    assert METHODS["ihl"].uses_reference(cfg) and not METHODS["ihl"].uses_reference(UnlearnConfig(method="ihl"))
    assert frozen_copy(METHODS["ihl"], cfg, tiny_llama(len(tokenizer), seed=6)) is not None
    unlearn(cfg, tiny_llama(len(tokenizer), seed=6), tokenizer, progress=False, forget=TEXTS[:4], retain=TEXTS[4:8])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m.get("kind") == "step"]
    assert len(steps) == 4
    assert steps[0]["retain"] == pytest.approx(0.0, abs=1e-6) and steps[-1]["retain"] > 1e-4
    assert all(math.isfinite(m["loss"]) for m in steps)


def test_finetuned_copy_leaves_the_input_as_it_was(tokenizer):
    """The relearning attack's way in: a fine-tuned copy, equal to fine-tuning the model itself in place."""
    model = tiny_llama(len(tokenizer), seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    feats = tokenize_examples([{"text": t} for t in TEXTS[:4]], tokenizer, 64)
    trained, history = finetuned_copy(model, feats, tokenizer.pad_token_id, epochs=2, lr=1e-3, batch_size=2,
                                      progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    finetune(model, feats, tokenizer.pad_token_id, epochs=2, lr=1e-3, batch_size=2, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.state_dict().items())
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]


@pytest.mark.parametrize("init", ["fila", "vila"])
def test_a_frozen_model_unlearns_as_an_unfrozen_one(tokenizer, init):
    """A caller's model with requires_grad off everywhere (as after loading for inference, or after a fine-tune
    of some modules) gives the same adapters as the same model unfrozen, and stays frozen."""
    cfg = UnlearnConfig(method="ihl", init=init, epochs=1, batch_size=2, lr=1e-2)
    frozen = tiny_llama(len(tokenizer), seed=5).requires_grad_(False)

    def run(m):
        return lora_weights(unlearn(cfg, m, tokenizer, progress=False, forget=TEXTS[:4], retain=TEXTS[4:8]).model)
    got, want = run(frozen), run(tiny_llama(len(tokenizer), seed=5))
    assert got.keys() == want.keys() and got
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert not any(p.requires_grad for p in frozen.parameters())
