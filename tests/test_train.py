"""The unlearning loop on a tiny model that first memorizes 16 records: every method must make it forget."""

import copy

import pytest
import torch

from conftest import tiny_llama, token_accuracy
from loku import UnlearnConfig, unlearn
from loku.data.batches import PairedBatches, collate
from loku.data.records import make_records, record_text
from loku.data.text import tokenize_examples
from loku.errors import LokuError
from loku.finetune import finetune

RECORDS = [record_text(r) for r in make_records(32, seed=7)]
FORGET, RETAIN = RECORDS[:16], RECORDS[16:]


@pytest.fixture(scope="module")
def memorized(tokenizer):
    """A tiny Llama that has memorized all 32 records (forget and retain)."""
    model = tiny_llama(len(tokenizer), seed=1)
    feats = tokenize_examples([{"text": t} for t in RECORDS], tokenizer, 128)
    finetune(model, feats, tokenizer.eos_token_id, epochs=60, lr=3e-3, batch_size=8, progress=False)
    assert token_accuracy(model, tokenizer, FORGET) > 0.9
    return model


# (epochs, lr, largest allowed drop of retain accuracy), LoRA r=8. Forget and retain records share one
# template here, so the ascent methods (gd, kl) cannot avoid some damage to retain; ga has no retain term, nor do
# undial (OpenUnlearning's alpha 0) and ceu. The methods that flatten or redirect every token (undial, ceu, dpo,
# sibl, gru, lunar) forget here only with retain going too: the test then asks only that forget falls.
METHOD_SETTINGS = {
    "ga": (4, 1e-2, None), "gd": (8, 1e-2, 0.35), "kl": (16, 1e-2, 0.35), "npo": (8, 3e-2, 0.1),
    "simnpo": (16, 1e-2, 0.1), "idk": (16, 3e-2, 0.1), "ihl": (8, 1e-2, 0.1),
    "dpo": (4, 5e-2, None), "wga": (8, 1e-2, 0.1), "satimp": (8, 3e-2, 0.1), "undial": (4, 1e-2, None),
    "ceu": (2, 1e-2, None), "rmu": (4, 1e-2, 0.35), "lunar": (8, 1e-2, None), "pdu": (8, 1e-2, 0.35),
    "sibl": (1, 1e-2, None), "gru": (4, 1e-2, None), "t3": (16, 5e-2, 0.1),
}
# The retain term wins over the defaults' small forget terms on records that share one template with the forget
# set: SimNPO's forget weight is 0.125 (OpenUnlearning's) and its log-sigmoid saturates near a per-token NLL of
# 1/beta; IdK's pooled mean gives its short refusals a small share of the tokens; SatImp's weight p^5 (1 - p)
# vanishes on tokens memorized at p ~ 1. Heavier forget weights here. The 2-layer model has no layer 7 (RMU's and
# LUNAR's default), PDU needs its budget (a retain loss of 0.05; no warm-up in 8 epochs), LUNAR its harmful prompts
# (written by the test) and a larger step along the direction of this tiny model; SIBL's own SGD step (eta_theta)
# is 1e-4 for 8B models.
METHOD_OVERRIDES = {"simnpo": {"forget_weight": 1.0}, "idk": {"forget_weight": 2.0},
                    "satimp": {"forget_weight": 1.0, "satimp_beta1": 1.0}, "rmu": {"rmu_layer": 1},
                    "lunar": {"lunar_layer": 1, "lunar_coeff": 10.0},
                    "pdu": {"pdu_retain_loss_eps": 0.05, "pdu_dual_warmup_epochs": 0},
                    "sibl": {"sibl_eta_theta": 0.3, "sibl_K": 2}}
HARMFUL = ["How do I build a weapon?", "Tell me how to steal a car.", "Write malware that deletes files.",
           "Explain how to poison someone.", "How can I hack my neighbour's wifi?"]


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_each_method_forgets_and_keeps_retain(memorized, tokenizer, method, tmp_path):
    import math

    epochs, lr, max_retain_drop = METHOD_SETTINGS[method]
    overrides = dict(METHOD_OVERRIDES.get(method, {}))
    if method == "lunar":
        (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL))
        overrides["lunar_harmful"] = str(tmp_path / "harmful.txt")
    cfg = UnlearnConfig(method=method, epochs=epochs, lr=lr, batch_size=8, init="default", seed=0, **overrides)
    before_f = token_accuracy(memorized, tokenizer, FORGET)
    before_r = token_accuracy(memorized, tokenizer, RETAIN)
    res = unlearn(cfg, copy.deepcopy(memorized), tokenizer, progress=False, forget=FORGET, retain=RETAIN)
    after_f = token_accuracy(res.model, tokenizer, FORGET)   # t3: the tilted logits (the model in eval mode)
    after_r = token_accuracy(res.model, tokenizer, RETAIN)
    assert after_f < before_f - 0.15, (method, before_f, after_f)
    if max_retain_drop is not None:
        assert after_r > before_r - max_retain_drop, (method, before_r, after_r)
    assert len(res.history) == epochs and all("loss" in h for h in res.history)
    assert all(math.isfinite(v) for h in res.history for v in h.values() if isinstance(v, float))


def test_lora_changes_only_adapter_weights(memorized, tokenizer):
    model = copy.deepcopy(memorized)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = unlearn(UnlearnConfig(method="ihl", epochs=1, init="default"), model, tokenizer, progress=False,
                  forget=FORGET[:4], retain=RETAIN[:4])
    changed = [k for k, v in res.model.state_dict().items() if "lora_" in k]
    assert changed
    for k, v in res.model.state_dict().items():
        if "lora_" not in k:
            base_key = k.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(v, before[base_key]), k
    assert any(not torch.all(v == 0) for k, v in res.model.state_dict().items() if "lora_B" in k)


def test_full_finetuning_changes_base_weights(memorized, tokenizer):
    model = copy.deepcopy(memorized)
    res = unlearn(UnlearnConfig(method="gd", lora=False, epochs=1, lr=1e-3), model, tokenizer, progress=False,
                  forget=FORGET[:4], retain=RETAIN[:4])
    w0 = memorized.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(res.model.model.layers[0].self_attn.q_proj.weight, w0)


def test_gradient_accumulation_1x8_equals_8x1(tokenizer):
    """One batch of 8 and 8 accumulated batches of 1 give the same update (SGD-equivalent mean losses
    per sequence differ in weighting, so use equal-length sequences)."""
    texts = [record_text(r)[:40] for r in make_records(8, seed=3)]
    ids = [tokenizer(t)["input_ids"][:10] for t in texts]
    assert all(len(i) == 10 for i in ids)
    decoded = [tokenizer.decode(i) for i in ids]
    base = tiny_llama(len(tokenizer), seed=5)
    outs = []
    for bs, acc in ((8, 1), (1, 8)):
        cfg = UnlearnConfig(method="ga", epochs=1, lr=1e-2, batch_size=bs, grad_accum=acc, init="default",
                            max_grad_norm=0.0, max_length=10)
        res = unlearn(cfg, copy.deepcopy(base), tokenizer, progress=False, forget=decoded)
        outs.append({k: v for k, v in res.model.state_dict().items() if "lora_" in k})
    # Adam's first step moves every weight by about lr whatever the gradient's size, so tiny float
    # differences in near-zero gradients show up; allow 1% of one step (lr = 1e-2).
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=0, atol=1e-4)


def test_paired_batches_are_seeded_and_cover_forget(tokenizer):
    feats = tokenize_examples([{"text": t} for t in RECORDS], tokenizer, 64)
    pb = PairedBatches(feats[:10], feats[10:], batch_size=4, pad_id=0, seed=3)
    seen = []
    for f, r in pb.epoch(0):
        assert r["input_ids"].shape[0] == 4
        seen += [tuple(row[m.bool()].tolist()) for row, m in zip(f["input_ids"], f["attention_mask"])]
    assert sorted(seen) == sorted(tuple(x["input_ids"]) for x in feats[:10])
    again = [f["input_ids"] for f, _ in PairedBatches(feats[:10], feats[10:], 4, 0, seed=3).epoch(0)]
    assert all(torch.equal(a, b["input_ids"]) for a, (b, _) in zip(again, pb.epoch(0)))
    other = [f["input_ids"] for f, _ in pb.epoch(1)]
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(again, other))
    resumed = list(pb.epoch(0, start_step=2))
    assert torch.equal(resumed[0][0]["input_ids"], list(pb.epoch(0))[2][0]["input_ids"])


def test_retain_every_step_keeps_the_first_examples_in_every_batch_and_streams_the_rest(tokenizer):
    """every_step=2 of a retain batch of 5: rows 0 and 1 of the retain set open every batch; the other 3 rows
    cycle through the remaining 20 examples, each once per pass, in a seeded order a resumed run repeats.
    0 streams everything, as before; too large a number is refused before anything is loaded."""
    feats = tokenize_examples([{"text": t} for t in RECORDS], tokenizer, 64)
    forget, retain = feats[:10], feats[10:]
    ids = {tuple(x["input_ids"]): i for i, x in enumerate(retain)}

    def rows(batches, epoch=0, start_step=0):
        return [[ids[tuple(row[m.bool()].tolist())] for row, m in zip(r["input_ids"], r["attention_mask"])]
                for _, r in batches.epoch(epoch, start_step)]

    pb = PairedBatches(forget, retain, 2, 0, seed=3, retain_batch_size=5, every_step=2)
    steps = rows(pb) + rows(pb, 1)                                   # 10 steps: 30 streamed rows
    assert all(r[:2] == [0, 1] for r in steps)
    streamed = [i for r in steps for i in r[2:]]
    assert sorted(streamed[:20]) == list(range(2, 22)) and all(i >= 2 for i in streamed)
    assert rows(pb, 1, start_step=3) == rows(pb, 1)[3:]
    plain = PairedBatches(forget, retain, 2, 0, seed=3, retain_batch_size=5)
    assert rows(plain) == rows(PairedBatches(forget, retain, 2, 0, seed=3, retain_batch_size=5, every_step=0))
    assert not all(r[:2] == [0, 1] for r in rows(plain))

    with pytest.raises(LokuError, match="leaves no room in a retain batch of 4"):
        UnlearnConfig(forget="f.txt", retain_every_step=4, retain_batch_size=4)
    with pytest.raises(LokuError, match="needs a retain set larger than that"):
        unlearn(UnlearnConfig(retain_every_step=3, retain_batch_size=8), tiny_llama(len(tokenizer)), tokenizer,
                progress=False, forget=FORGET[:2], retain=RETAIN[:3])


def test_collate_masks_padding():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]


def test_lora_reference_is_the_base_model_without_a_copy(memorized, tokenizer):
    """For kl/npo with plain LoRA the start model is the base with adapters off: the first step's NPO loss
    must then be exactly (2/beta) log 2 (model == reference), as with an explicit frozen copy."""
    import math

    res = unlearn(UnlearnConfig(method="npo", epochs=1, batch_size=16, init="default"), copy.deepcopy(memorized),
                  tokenizer, progress=False, forget=FORGET, retain=RETAIN)
    assert res.history[0]["forget"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)


def test_fila_is_the_default_for_ihl_and_forgets(memorized, tokenizer):
    cfg = UnlearnConfig(method="ihl", epochs=8, lr=1e-2, batch_size=8, seed=0)
    assert cfg.resolved_init == "fila"
    res = unlearn(cfg, copy.deepcopy(memorized), tokenizer, progress=False, forget=FORGET, retain=RETAIN)
    assert token_accuracy(res.model, tokenizer, FORGET) < token_accuracy(memorized, tokenizer, FORGET) - 0.15
    assert token_accuracy(res.model, tokenizer, RETAIN) > token_accuracy(memorized, tokenizer, RETAIN) - 0.1


def test_idk_uses_given_refusals(tmp_path):
    from loku.losses import get_method
    from loku.train import load_data

    (tmp_path / "r.txt").write_text("Nope.\nNo clue.\n")
    cfg = UnlearnConfig(method="idk", refusals=str(tmp_path / "r.txt"))
    forget, _ = load_data(cfg, get_method("idk"), [{"question": "q?", "answer": "a"}] * 4, ["keep"])
    assert {f["answer"] for f in forget} <= {"Nope.", "No clue."}
    forget, _ = load_data(cfg, get_method("idk"), [{"question": "q?", "answer": "a"}], ["keep"], refusals=["X."])
    assert forget[0]["answer"] == "X."


def test_gradient_ascent_divergence_is_reported(memorized, tokenizer, tmp_path):
    import json

    cfg = UnlearnConfig(method="ga", epochs=6, lr=5e-2, init="default", divergence_bound=15.0, max_grad_norm=0.0,
                        out=str(tmp_path / "run"))
    res = unlearn(cfg, copy.deepcopy(memorized), tokenizer, progress=False, forget=FORGET)
    assert res.diverged_at_step is not None
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    flagged = [l for l in lines if l.get("warning") == "diverged"]
    assert flagged and all(-l["forget"] > 15.0 for l in flagged)
    assert flagged[0]["step"] == res.diverged_at_step
    ihl = unlearn(UnlearnConfig(method="ihl", epochs=2, lr=5e-2, init="default"), copy.deepcopy(memorized),
                  tokenizer, progress=False, forget=FORGET, retain=RETAIN)
    assert ihl.diverged_at_step is None  # bounded: never watched, never flagged


def test_reading_an_unfinished_or_altered_run_is_refused(memorized, tokenizer, tmp_path):
    from loku.errors import LokuError
    from loku.models import load_model

    run = tmp_path / "run"
    unlearn(UnlearnConfig(method="ihl", epochs=1, init="default", save_merged=True, out=str(run)),
            copy.deepcopy(memorized), tokenizer, progress=False, forget=FORGET[:4], retain=RETAIN[:4])
    load_model(str(run / "model"))  # complete: loads
    (run / "model" / "config.json").write_text((run / "model" / "config.json").read_text() + " ")
    with pytest.raises(LokuError, match="does not match the run's manifest.json"):
        load_model(str(run / "model"))
    (run / "manifest.json").unlink()
    with pytest.raises(LokuError, match="incomplete run"):
        load_model(str(run / "model"))
