"""Loading the embedded default model (a real GGUF shipped on PyPI) and its safetensors cache."""

import time

import pytest
import torch

from loku.errors import LokuError
from loku.models import embedded_gguf, load_model, resolve_model_path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    import os

    d = tmp_path_factory.mktemp("loku_cache")
    old = os.environ.get("LOKU_CACHE")
    os.environ["LOKU_CACHE"] = str(d)
    yield d
    if old is None:
        del os.environ["LOKU_CACHE"]
    else:
        os.environ["LOKU_CACHE"] = old


def test_embedded_model_dequantized_once_then_cached(cache, capfd):
    gguf = embedded_gguf("smollm2-135m")
    size_before = gguf.stat().st_size
    model, tok = load_model("smollm2-135m")
    out, err = capfd.readouterr()   # one line of loku's, no library progress bars
    assert out.count("dequantizing SmolLM2") == 1 and "Converting" not in out + err and "Loading weights" not in err
    cached = list(cache.glob("*/model.safetensors"))
    assert len(cached) == 1 and not list(cache.glob(".tmp-*"))
    assert model.config.model_type == "llama" and model.num_parameters() > 100e6
    t = time.time()
    again, _ = load_model("smollm2-135m")
    assert time.time() - t < 10  # from safetensors, no dequantization
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    assert gguf.stat().st_size == size_before  # the input is never modified
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax()
    assert "Paris" in tok.decode(nxt)  # a real pretrained model, not random weights


def test_missing_model_paths_are_clear(tmp_path):
    with pytest.raises(LokuError, match="does not exist"):
        resolve_model_path(str(tmp_path / "absent.gguf"))
    with pytest.raises(LokuError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    assert resolve_model_path("EleutherAI/gpt-neo-125m") == "EleutherAI/gpt-neo-125m"  # hub ids pass through


def test_pickle_only_model_refused(tmp_path, tiny_model_dir):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(LokuError, match="--allow-pickle"):
        load_model(str(d))
