"""Two CPU processes (gloo) through `accelerate launch` give the run of one process with a 2x batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from loku.data.records import make_records, record_text
from conftest import write_csv as _csv


def equal_length_texts(tokenizer, n, tokens=12):
    """Texts of exactly `tokens` tokens: the per-process token means then equal the global mean."""
    out = []
    for r in make_records(n, seed=11):
        ids = tokenizer(record_text(r))["input_ids"][:tokens]
        text = tokenizer.decode(ids)
        assert len(tokenizer(text)["input_ids"]) == tokens
        out.append(text)
    return out



def _run(args, processes):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "loku"]
    cmd = launcher if processes == 2 else [sys.executable, "-m", "loku"]
    r = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("init", ["default", "fila"])
def test_two_processes_equal_one_with_double_batch(tiny_model_dir, tokenizer, tmp_path, init):
    texts = equal_length_texts(tokenizer, 16)
    forget, retain = _csv(tmp_path / "f.csv", texts[:8]), _csv(tmp_path / "r.csv", texts[8:])
    common = ["unlearn", "--model", tiny_model_dir, "--forget", forget, "--retain", retain, "--method", "ihl",
              "--init", init, "--lora-rank", "4", "--epochs", "2", "--lr", "5e-3"]
    two = _run(common + ["--batch-size", "2", "--out", tmp_path / "two"], processes=2)
    assert two.stdout.count("done in") == 1  # only the main process reports and writes
    _run(common + ["--batch-size", "4", "--out", tmp_path / "one"], processes=1)
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    # Same examples per step; only the order of float sums differs (all-reduce vs one batch).
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
