"""Fake quantizers: the grid, the error bound, NF4's code book, the untouched input, and bit-equality with
bitsandbytes' own quantize/dequantize (its CPU backend; bitsandbytes is in the test extras)."""

import copy

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from loku.attacks.quantize import (NF4_CODE, fake_int, fake_nf4, parse_quantizer, quantize_model,
                                   quantized_weights)
from loku.errors import LokuError


def _weight(out=96, inp=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[3, 17] = 0.11  # an outlier, as real weights have
    return w


@pytest.mark.parametrize("name", ["int8", "int4", "int4-g128", "int4-g64", "int8-g64", "int3-g32"])
def test_int_error_is_at_most_half_a_step(name):
    q = parse_quantizer(name)
    w = _weight(inp=200)  # 200 = 128 + 72: a shorter last group
    deq = q(w)
    step = q.step(w)
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-6) + 1e-12).all()
    levels = torch.round(deq / step)
    assert torch.allclose(deq, levels * step, rtol=1e-6, atol=1e-9)   # on the grid
    assert levels.abs().max() <= 2 ** (q.bits - 1) - 1
    if q.group is not None:   # each group's absmax is its own: a coarser grouping rounds more
        coarser = parse_quantizer(f"int{q.bits}")(w)
        assert (coarser - w).abs().mean() > (deq - w).abs().mean()


@pytest.mark.parametrize("name", ["int8", "int4", "int4-g64"])
def test_weight_on_the_grid_is_unchanged(name):
    q = parse_quantizer(name)
    qmax = 2 ** (q.bits - 1) - 1
    g = torch.Generator().manual_seed(1)
    levels = torch.randint(-qmax, qmax + 1, (32, 128), generator=g).float()
    levels[:, ::64] = qmax   # every row and group reaches the top level, so its absmax is qmax x step
    w = levels * 2.0 ** -9   # a power-of-two step: the grid is exact in float32
    assert torch.equal(q(w), w)


def test_nf4_values_are_the_code_book_times_absmax():
    w = _weight()
    deq = fake_nf4(w, 64)
    code = torch.tensor(NF4_CODE)
    blocks, dblocks = w.reshape(-1, 64), deq.reshape(-1, 64)
    absmax = blocks.abs().amax(-1, keepdim=True)
    ratio = dblocks / absmax
    nearest = (ratio[..., None] - code).abs().min(-1).values
    assert nearest.max() < 1e-6                                   # every value is a code value x its block's absmax
    best = (blocks[..., None] / absmax[..., None] - code).abs().min(-1).values
    assert ((blocks / absmax - ratio).abs() <= best + 1e-6).all()   # ... and the nearest one
    assert torch.equal(fake_nf4(deq, 64), deq)                  # already on the grid: unchanged


def test_quantize_model_leaves_the_input_untouched_and_skips_head_and_embeddings(tokenizer):
    model = tiny_llama(len(tokenizer))
    before = copy.deepcopy(model.state_dict())
    q = quantize_model(model, "int4")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    qs = q.state_dict()
    changed = {n for n in qs if not torch.equal(qs[n], before[n])}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert changed == linear
    with_head = quantize_model(model, "int4", head=True, embeddings=True).state_dict()
    assert not torch.equal(with_head["lm_head.weight"], before["lm_head.weight"])
    assert not torch.equal(with_head["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_conv1d_channels_are_its_columns(tokenizer):
    """GPT-2 stores Conv1D weights as (in, out): per-channel scales must follow the output columns."""
    model = tiny_gpt2(len(tokenizer))
    q = quantize_model(model, "int8")
    name = "transformer.h.0.mlp.c_fc.weight"
    w = model.state_dict()[name]
    assert torch.equal(q.state_dict()[name], fake_int(w.t(), 8).t())
    assert "transformer.h.0.attn.c_attn" in quantized_weights(model)


def test_adapter_on_a_quantized_base(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(len(tokenizer))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    before = copy.deepcopy(model.state_dict())
    on_base = quantize_model(model, "nf4", mode="base")
    merged = quantize_model(model, "nf4", mode="merged")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    sd = on_base.state_dict()
    lora = [k for k in sd if "lora_" in k]
    assert lora and all(torch.equal(sd[k], before[k]) for k in lora)   # adapter kept in full precision
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.equal(sd[key], fake_nf4(before[key], 64))
    assert "lora_A" not in str(list(merged.state_dict()))              # merged: a plain model
    x = torch.randint(0, len(tokenizer), (1, 12))
    assert not torch.allclose(on_base(x).logits, merged(x).logits)
    with pytest.raises(LokuError, match="no adapter"):
        quantize_model(base, "nf4", mode="base")


def test_bad_quantizer_names():
    with pytest.raises(LokuError, match="did you mean 'int4'"):
        parse_quantizer("int44")
    with pytest.raises(LokuError, match="quantization mode"):
        quantize_model(torch.nn.Linear(2, 2), "int8", mode="merge")


# ---- bitsandbytes itself ----------------------------------------------------------------------------------

def _bnb():
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed (pip install "
                                                                "bitsandbytes; it is in loku's test extras)")
    return bnb


# (576, 1536): SmolLM2's MLP. Blocks of 128 over rows of 192 or 576 values are left out: there bitsandbytes'
# CPU dequantize kernel (0.50.2) disagrees with its own pure-torch and CUDA kernels, which loku matches.
@pytest.mark.parametrize("shape,blocksize", [((96, 192), 64), ((50, 70), 64), ((576, 1536), 64),
                                             ((576, 1536), 128), ((96, 256), 128)])
def test_nf4_equals_bitsandbytes(shape, blocksize):
    F = _bnb()
    w = _weight(*shape, seed=sum(shape))
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(fake_nf4(w, blocksize), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_equals_bitsandbytes_llm_int8(dtype):
    F = _bnb()
    w = _weight(128, 320).to(dtype)
    cb, stats, _ = F.int8_vectorwise_quant(w)
    want = F.int8_vectorwise_dequant(cb, stats)   # float32 (bitsandbytes computes in float32 for fp16 too)
    assert torch.equal(fake_int(w.float(), 8), want)


def test_nf4_model_equals_bitsandbytes_per_layer(tokenizer):
    F = _bnb()
    model = tiny_llama(len(tokenizer))
    q = quantize_model(model, "nf4")
    for name, (module, _) in quantized_weights(model).items():
        packed, state = F.quantize_4bit(module.weight.data, blocksize=64, quant_type="nf4")
        assert torch.equal(q.get_submodule(name).weight, F.dequantize_4bit(packed, state)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes' CUDA kernels); "
                                                          "benchmarks/bnb_gpu_check.py is the same check as a script")
@pytest.mark.parametrize("shape,blocksize", [((96, 192), 64), ((576, 1536), 64), ((576, 1536), 128)])
def test_nf4_and_int8_equal_bitsandbytes_cuda(shape, blocksize):
    F = _bnb()
    w = _weight(*shape, seed=sum(shape)).cuda()
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(fake_nf4(w.cpu(), blocksize), F.dequantize_4bit(packed, state).cpu())
    cb, stats, _ = F.int8_vectorwise_quant(w.half())
    assert torch.equal(fake_int(w.half().float().cpu(), 8), F.int8_vectorwise_dequant(cb, stats).cpu())
