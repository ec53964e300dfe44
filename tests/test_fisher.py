"""Fisher statistics (loku.fisher) against slow references written from the definitions; cache; bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from conftest import tiny_gpt2, tiny_llama
from loku.data.batches import collate
from loku.errors import LokuError
from loku.fisher import (FisherStats, cached_statistics, fisher_statistics, relative_importance, vila_factors,
                         vila_statistics, weight_of)
from loku.lora import default_target_modules, targeted_modules

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Machine learning models memorize some data.",
         "Question: Who wrote the book? Answer: The author wrote it in Paris.", "def main():\n    return 0\n",
         "Alice was born in Lyon in 1970.", "A short one."]


def make_pairs(tokenizer):
    """Two (forget, retain) pairs of unequal batch sizes and lengths; the first 3 labels are a masked
    prompt, as in QA data."""
    feats = []
    for t in TEXTS:
        ids = tokenizer(t)["input_ids"]
        feats.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return [(collate(feats[0:2], 0), collate(feats[2:5], 0)), (collate(feats[5:6], 0), collate(feats[1:3], 0))]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def slow_batches(model, pairs):
    """Yields (side, n_tokens) after loss.backward() of the plain model on each batch, in order."""
    for pair in pairs:
        for side, batch in zip(("forget", "retain"), pair):
            model.zero_grad()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]                                     # position t predicts t+1
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100)                            # mean over target tokens
            loss.backward()
            yield side, int((targets != -100).sum())


def reference_fisher(model, pairs, names):
    """F = sum_b n_b g_b^2 / sum_b n_b per side, by full backward passes, Conv1D grads turned to (out, in)."""
    mods = dict(model.named_modules())
    acc = {s: {n: 0.0 for n in names} for s in ("forget", "retain")}
    counts = {"forget": 0, "retain": 0}
    for side, n in slow_batches(model, pairs):
        for name in names:
            g = mods[name].weight.grad
            g = g.T if isinstance(mods[name], Conv1D) else g
            acc[side][name] = acc[side][name] + n * g.pow(2)
        counts[side] += n
    return {s: {k: v / counts[s] for k, v in acc[s].items()} for s in acc}, counts


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_fisher_matches_slow_reference(tokenizer, build):
    model = build(len(tokenizer))
    pairs = make_pairs(tokenizer)
    names = sorted(targeted_modules(model, default_target_modules(model)))
    model.get_input_embeddings().weight.requires_grad_(False)     # flags and mode must come back as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    stats = fisher_statistics(model, pairs, default_target_modules(model), progress=False)
    assert model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()   # statistics are taken in eval mode (GPT-2 has dropout)
    ref, counts = reference_fisher(model, pairs, names)
    assert sorted(stats.forget) == names
    assert (stats.forget_tokens, stats.retain_tokens) == (counts["forget"], counts["retain"])
    mods = dict(model.named_modules())
    for side in ("forget", "retain"):
        for name in names:
            got = getattr(stats, side)[name]
            assert got.dtype == torch.float32 and got.shape == weight_of(mods[name]).shape   # (out, in)
            assert rel_err(got, ref[side][name]) < 1e-5, (side, name)
    imp = relative_importance(stats, eps=1e-5)
    name = names[0]
    assert torch.allclose(imp[name], stats.forget[name] / (1e-5 + stats.retain[name]))


def test_vila_matches_slow_reference_on_conv1d(tokenizer, tmp_path):
    """VILA through forward hooks == peft LoRA with the same random factors, variance from the definition."""
    from peft import LoraConfig, get_peft_model

    model = tiny_gpt2(len(tokenizer))
    pairs = make_pairs(tokenizer)
    names = sorted(targeted_modules(model, ["c_attn", "c_fc"]))
    mods = dict(model.named_modules())
    factors = vila_factors({n: tuple(weight_of(mods[n]).shape) for n in names}, rank=4, std=0.05, seed=3)
    plain = copy.deepcopy(model)
    stats = vila_statistics(model, pairs, names, rank=4, scaling=2.0, factors=factors, progress=False)

    ref_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=names,
                                                                fan_in_fan_out=True)).eval()
    lora = {n: m for n, m in ref_model.named_modules() if hasattr(m, "lora_A")}
    for name in names:
        layer = lora["base_model.model." + name]
        layer.lora_A["default"].weight.data.copy_(factors[name][0])
        layer.lora_B["default"].weight.data.copy_(factors[name][1])
    s1 = {s: {} for s in ("forget", "retain")}
    s2 = {s: {} for s in ("forget", "retain")}
    counts = {"forget": 0, "retain": 0}
    for side, n in slow_batches(ref_model, pairs):
        for name in names:
            layer = lora["base_model.model." + name]
            for part in ("lora_A", "lora_B"):
                g = getattr(layer, part)["default"].weight.grad
                s1[side][(name, part)] = s1[side].get((name, part), 0.0) + n * g
                s2[side][(name, part)] = s2[side].get((name, part), 0.0) + n * g * g
        counts[side] += n
    for side in ("forget", "retain"):
        N = counts[side]
        var = {k: (s2[side][k] / N - (s1[side][k] / N) ** 2).clamp(min=0) for k in s1[side]}
        for name in names:
            ref = var[(name, "lora_B")] @ var[(name, "lora_A")]                  # (out, r) @ (r, in)
            assert rel_err(getattr(stats, side)[name], ref) < 1e-4, (side, name)
    assert stats.kind == "vila" and stats.forget[names[0]].shape == weight_of(mods[names[0]]).shape
    # kept factored (never the whole model's (out, in) at once), in memory and on disk
    from loku.fisher import LiftedFisher
    assert isinstance(stats.forget, LiftedFisher) and stats.shapes() == {n: stats.forget[n].shape for n in names}
    stats.save(tmp_path / "vila.safetensors")
    loaded = FisherStats.load(tmp_path / "vila.safetensors")
    assert isinstance(loaded.retain, LiftedFisher) and sorted(loaded.retain) == names
    assert all(torch.equal(loaded.retain[n], stats.retain[n]) for n in names)
    # hooks are gone: the model computes what it did before
    x = pairs[0][0]
    assert not any(m._forward_hooks for m in model.modules())
    assert torch.equal(model(input_ids=x["input_ids"]).logits, plain(input_ids=x["input_ids"]).logits)


def test_save_load_and_cache_hit_miss(tokenizer, tmp_path, monkeypatch):
    import loku.fisher as fisher

    model = tiny_llama(len(tokenizer))
    pairs = make_pairs(tokenizer)
    path = tmp_path / "fisher.safetensors"
    stats, hit = cached_statistics(path, model, pairs, ["q_proj", "down_proj"], progress=False)
    assert not hit and path.is_file()
    loaded = FisherStats.load(path)
    assert loaded.meta == stats.meta and loaded.forget_tokens == stats.forget_tokens
    assert all(torch.equal(loaded.retain[n], stats.retain[n]) for n in stats.retain)

    def boom(*a, **k):
        raise AssertionError("recomputed on a cache hit")
    monkeypatch.setattr(fisher, "_batch_losses", boom)
    again, hit = cached_statistics(path, model, pairs, ["q_proj", "down_proj"], progress=False)
    assert hit and all(torch.equal(again.forget[n], stats.forget[n]) for n in stats.forget)
    monkeypatch.undo()

    _, hit = cached_statistics(path, model, pairs[:1], ["q_proj", "down_proj"], progress=False)   # other data
    assert not hit
    _, hit = cached_statistics(path, model, pairs[:1], ["q_proj"], progress=False)                # other modules
    assert not hit
    _, hit = cached_statistics(path, model, pairs[:1], ["q_proj"], method="vila", progress=False)  # other method
    assert not hit
    _, hit = cached_statistics(path, model, pairs[:1], ["q_proj"], method="vila", seed=1, progress=False)
    assert not hit
    _, hit = cached_statistics(path, model, pairs[:1], ["q_proj"], method="vila", seed=1, progress=False)
    assert hit

    with pytest.raises(LokuError, match="another model.*weights"):      # same shapes, other weights
        cached_statistics(path, tiny_llama(len(tokenizer), seed=1), pairs, ["q_proj"], progress=False)
    with pytest.raises(LokuError, match=r"another model: module .*q_proj is \(64, 64\) there but \(32, 32\)"):
        cached_statistics(path, tiny_llama(len(tokenizer), hidden=32), pairs, ["q_proj"], progress=False)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(LokuError, match="not a loku Fisher statistics file"):
        FisherStats.load(other)
    with pytest.raises(LokuError, match="does not exist"):
        FisherStats.load(tmp_path / "missing.safetensors")


def test_bad_input(tokenizer):
    model = tiny_llama(len(tokenizer))
    pairs = make_pairs(tokenizer)
    with pytest.raises(LokuError, match="'qproj' is not a linear layer.*choose from .*q_proj"):
        fisher_statistics(model, pairs, ["qproj"], progress=False)
    with pytest.raises(LokuError, match="retain set: pass --retain"):
        fisher_statistics(model, [(pairs[0][0], None)], ["q_proj"], progress=False)
    masked = {**pairs[0][0], "labels": torch.full_like(pairs[0][0]["labels"], -100)}
    with pytest.raises(LokuError, match="forget batches hold no target token"):
        fisher_statistics(model, [(masked, pairs[0][1])], ["q_proj"], progress=False)
    with pytest.raises(LokuError, match="unknown Fisher method"):
        cached_statistics("unused.safetensors", model, pairs, ["q_proj"], method="lisa")
