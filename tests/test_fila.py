"""FILA factors on bare tensors, in peft modules (Linear and GPT-2 Conv1D), and the export to a plain
rank-2r adapter for the ORIGINAL model."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import tiny_gpt2, tiny_llama
from loku.errors import LokuError
from loku.fila import apply_fila, export_original_adapter, fila_factors, fila_init, lora_layers, save_merged
from loku.fisher import weight_of
from loku.lora import add_lora
from loku.losses import cross_entropy
from test_fisher import make_pairs


def weighted_problem(out_f=48, in_f=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    I = torch.rand(out_f, in_f, generator=g).pow(4) * 10   # skewed importance, like a Fisher ratio
    return W, I


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_factors_rebuild_weight_and_reach_the_weighted_optimum():
    W, I = weighted_problem()
    s, r = 2.0, 5
    A, B, residual = fila_factors(W, I, r, s)
    assert A.shape == (r, 32) and B.shape == (48, r) and residual.dtype == W.dtype
    assert rel_err(residual + s * B @ A, W) < 1e-5
    w = I.sum(dim=1).sqrt()
    error = (w[:, None] * (W - s * B @ A)).pow(2).sum()
    tail = torch.linalg.svdvals(w[:, None] * W)[r:].pow(2).sum()   # Eckart-Young for diag(w) W
    assert error.item() == pytest.approx(tail.item(), rel=1e-4)
    # the weighting matters: an unweighted SVD leaves a larger weighted error
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    plain = (w[:, None] * (W - U[:, :r] @ torch.diag(S[:r]) @ Vh[:r])).pow(2).sum()
    assert error < plain


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
def test_exact_top_svd_equals_a_full_lapack_svd(shape):
    """The Gram-eigensolver path gives the same rank-r approximation as torch's full SVD, for tall, wide and
    square weights, and for one of rank below r (the fallback)."""
    from loku.fila import _top_svd

    g = torch.Generator().manual_seed(2)
    M = torch.randn(*shape, generator=g) * torch.linspace(3, 0.1, shape[1])
    low = torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)   # rank 3 < r = 6
    for X in (M, low):
        U, S, Vh = _top_svd(X, 6)
        assert U.shape == (shape[0], 6) and Vh.shape == (6, shape[1]) and U.dtype == torch.float64
        U0, S0, Vh0 = torch.linalg.svd(X.double(), full_matrices=False)
        assert torch.allclose(S, S0[:6], rtol=1e-9, atol=1e-9 * S0[0].item())
        approx, best = U @ torch.diag(S) @ Vh, U0[:, :6] @ torch.diag(S0[:6]) @ Vh0[:6]
        assert rel_err(approx, best) < 1e-9
        assert torch.allclose(U.T @ U, torch.eye(6, dtype=torch.float64), atol=1e-9) or X is low


def test_randomized_svd_matches_exact_on_a_decaying_spectrum():
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    W = U[:, :40] @ torch.diag(0.7 ** torch.arange(40.0)) @ V.T
    I = torch.rand(64, 40, generator=g) + 0.1
    w = I.sum(dim=1).sqrt()[:, None]
    errs = {}
    for svd in ("exact", "randomized"):
        A, B, residual = fila_factors(W, I, 6, 1.5, svd=svd)
        assert rel_err(residual + 1.5 * B @ A, W) < 1e-5
        errs[svd] = (w * (W - 1.5 * B @ A)).pow(2).sum().item()
    assert errs["randomized"] == pytest.approx(errs["exact"], rel=1e-3)


def test_zero_rows_and_bf16_stay_finite():
    W, I = weighted_problem()
    I[:10] = 0.0                                             # rows the forget set never touches
    A, B, residual = fila_factors(W, I, 4, 2.0)
    assert all(torch.isfinite(t).all() for t in (A, B, residual))
    assert rel_err(residual + 2.0 * B @ A, W) < 1e-5
    A, B, residual = fila_factors(W.bfloat16(), I, 4, 2.0)
    assert A.dtype == B.dtype == residual.dtype == torch.bfloat16
    assert rel_err((residual.float() + 2.0 * B.float() @ A.float()), W) < 1e-2


def random_importance(model):
    g = torch.Generator().manual_seed(0)
    return {n: torch.rand(tuple(weight_of(layer.get_base_layer()).shape), generator=g)
            for n, (_, layer) in lora_layers(model).items()}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_apply_fila_leaves_outputs_unchanged(tokenizer, build):
    model = build(len(tokenizer))
    x = make_pairs(tokenizer)[0][0]
    before = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    originals = {n: weight_of(m).detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    peft_model = add_lora(model, 4, 8, None)
    initial = apply_fila(peft_model, random_importance(peft_model))
    after = peft_model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert (after - before).abs().max() < 1e-5
    for name, (_, layer) in lora_layers(peft_model).items():
        A0, B0 = initial[name]
        assert torch.equal(A0, layer.lora_A["default"].weight) and torch.equal(B0, layer.lora_B["default"].weight)
        assert B0.abs().sum() > 0                               # not peft's zero init
        base = weight_of(layer.get_base_layer())
        s = layer.scaling["default"]
        assert rel_err(base + s * B0 @ A0, originals[name]) < 1e-5
        assert rel_err(base, originals[name]) > 1e-3            # the base weight really was rewritten


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_export_reproduces_the_trained_model_on_the_original(tokenizer, tmp_path, build):
    pairs = make_pairs(tokenizer)
    model = build(len(tokenizer))
    peft_model, initial = fila_init(model, pairs, rank=4, alpha=8, progress=False)
    x = pairs[0][0]
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for forget, _ in pairs * 2:                               # a few steps of gradient ascent
        loss = -cross_entropy(peft_model(input_ids=forget["input_ids"]).logits, forget["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    name = next(iter(initial))
    assert not torch.equal(lora_layers(peft_model)[name][1].lora_A["default"].weight, initial[name][0])

    export_original_adapter(peft_model, initial, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] / cfg["r"] == 8 / 4   # rank 2r, same scaling
    original = build(len(tokenizer))                            # a fresh copy of the ORIGINAL weights
    loaded = PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
    with torch.no_grad():
        again = loaded(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert (again - trained).abs().max() <= 1e-4

    save_merged(peft_model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        plain = merged(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert (plain - trained).abs().max() <= 1e-4
    assert lora_layers(peft_model)                              # save_merged left the adapter in place


def test_vila_init_is_finite_and_output_preserving(tokenizer):
    pairs = make_pairs(tokenizer)
    model = tiny_llama(len(tokenizer))
    x = pairs[0][0]
    before = model(input_ids=x["input_ids"]).logits
    peft_model, initial = fila_init(model, pairs, rank=4, alpha=8, method="vila",
                                    target_modules=["q_proj", "up_proj"], progress=False)
    assert sorted(initial) == sorted(lora_layers(peft_model)) and len(initial) == 4
    for A, B in initial.values():
        assert torch.isfinite(A).all() and torch.isfinite(B).all() and B.abs().sum() > 0
    assert (peft_model(input_ids=x["input_ids"]).logits - before).abs().max() < 1e-5


def test_fila_init_reuses_cached_statistics(tokenizer, tmp_path, monkeypatch):
    import loku.fisher as fisher

    pairs = make_pairs(tokenizer)
    fila_init(tiny_llama(len(tokenizer)), pairs, rank=2, alpha=4, target_modules=["v_proj"],
              cache=tmp_path / "f.safetensors", progress=False)
    monkeypatch.setattr(fisher, "_batch_losses", lambda *a, **k: (_ for _ in ()).throw(AssertionError("miss")))
    _, initial = fila_init(tiny_llama(len(tokenizer)), pairs, rank=2, alpha=4, target_modules=["v_proj"],
                           cache=tmp_path / "f.safetensors", progress=False)
    assert len(initial) == 2


def test_bad_input(tokenizer):
    W, I = weighted_problem(8, 16)
    with pytest.raises(LokuError, match=r"rank 9 does not fit module layers\.0\.q of shape \(8, 16\)"):
        fila_factors(W, I, 9, 1.0, name="layers.0.q")
    with pytest.raises(LokuError, match="importance of w is all zero"):
        fila_factors(W, torch.zeros_like(I), 2, 1.0, name="w")
    with pytest.raises(LokuError, match=r"shape \(16, 8\) but its weight is \(8, 16\): they are from another"):
        fila_factors(W, I.T, 2, 1.0)

    pairs = make_pairs(tokenizer)
    with pytest.raises(LokuError, match=r"rank 65 exceeds layer .* of shape \(64, 64\)"):
        fila_init(tiny_llama(len(tokenizer)), pairs, rank=65, alpha=8, progress=False)
    with pytest.raises(LokuError, match="'qproj' is not a linear layer.*choose from.*q_proj"):
        fila_init(tiny_llama(len(tokenizer)), pairs, rank=4, alpha=8, target_modules=["qproj"], progress=False)
    with pytest.raises(LokuError, match="unknown init method"):
        fila_init(tiny_llama(len(tokenizer)), pairs, rank=4, alpha=8, method="lora", progress=False)

    small = add_lora(tiny_llama(len(tokenizer), hidden=32), 4, 8, ["q_proj"])
    big = add_lora(tiny_llama(len(tokenizer)), 4, 8, ["q_proj"])
    with pytest.raises(LokuError, match="from another model"):    # statistics of the 64-wide model
        apply_fila(small, random_importance(big))
    with pytest.raises(LokuError, match="without a LoRA adapter .*those with one are"):
        apply_fila(small, {"model.layers.0.mlp.up_proj": torch.ones(64, 32)})
    with pytest.raises(LokuError, match="initial factors do not belong to this adapter"):
        export_original_adapter(small, {}, "unused")


def test_vila_refuses_a_single_batch(tokenizer):
    """Variance over one batch is zero: the factors would explode, so fila_init refuses it."""
    from conftest import tiny_llama
    from loku.data.batches import collate
    from loku.errors import LokuError
    from loku.fila import fila_init

    model = tiny_llama(len(tokenizer))
    b = collate([{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}], 0)
    with pytest.raises(LokuError, match="at least 2"):
        fila_init(model, [(b, b)], rank=2, alpha=4, method="vila", progress=False)
