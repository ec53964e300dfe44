"""--mixed-precision auto: bf16 only where the hardware computes it natively; bf16 asked on a CPU that emulates it
trains as asked, with one warning line."""

import pytest
import torch

import loku.distributed as distributed
from conftest import tiny_llama
from loku.config import UnlearnConfig
from loku.distributed import launch_precision, native_bf16
from loku.train import unlearn


@pytest.fixture()
def fresh_warning(monkeypatch):
    distributed._warn_emulated_bf16.cache_clear()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    yield
    distributed._warn_emulated_bf16.cache_clear()


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_where_native(monkeypatch, fresh_warning, capsys, native):
    monkeypatch.setattr(distributed, "native_bf16", lambda: native)
    assert launch_precision("auto") == ("bf16" if native else "no")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "auto")   # a launch configuration may say auto too
    assert launch_precision(None) == ("bf16" if native else "no")
    assert capsys.readouterr().err == ""


def test_emulated_bf16_warns_once_and_keeps_what_was_asked(monkeypatch, fresh_warning, capsys):
    monkeypatch.setattr(distributed, "native_bf16", lambda: False)
    assert launch_precision("bf16") == "bf16"
    assert launch_precision("bf16") == "bf16"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no native bf16" in err[0] and "--mixed-precision auto or no" in err[0]
    monkeypatch.setattr(distributed, "native_bf16", lambda: True)
    distributed._warn_emulated_bf16.cache_clear()
    assert launch_precision("bf16") == "bf16" and capsys.readouterr().err == ""


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    """On a CPU the answer is torch's own AVX512-BF16 / AMX detection (no CUDA here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for avx, amx in [(False, False), (True, False), (False, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert native_bf16() == (avx or amx)


@pytest.mark.parametrize("native", [True, False])
def test_unlearn_records_the_resolved_precision(tokenizer, monkeypatch, fresh_warning, tmp_path, native):
    """`--mixed-precision auto` trains under the autocast it resolves to, and the run's config.yaml says which."""
    monkeypatch.setattr(distributed, "native_bf16", lambda: native)
    dtypes = []
    model = tiny_llama(len(tokenizer))
    model.lm_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    cfg = UnlearnConfig(method="ga", epochs=1, batch_size=2, mixed_precision="auto", out=str(tmp_path / "run"))
    unlearn(cfg, model, tokenizer, progress=False, forget=["one two three four five", "six seven eight nine ten"])
    assert UnlearnConfig.from_yaml(tmp_path / "run" / "config.yaml").mixed_precision == ("bf16" if native else "no")
    assert dtypes and set(dtypes) == {torch.bfloat16 if native else torch.float32}
