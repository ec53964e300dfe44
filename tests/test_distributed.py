"""Two CPU processes (gloo) through `accelerate launch` give the run of one process with a 2x batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loku.data.records import make_records, record_text
from conftest import write_csv as _csv
from test_tofu_runs import tofu_dir  # noqa: F401 (a fixture)


def unequal_texts(tokenizer, n):
    """Records of different token lengths: per-process token means then differ from the global mean, which
    the loop's global-mean scaling must correct."""
    texts = [record_text(r) for r in make_records(n, seed=11)]
    texts = [t + " More text follows here." * (i % 3) for i, t in enumerate(texts)]
    assert len({len(tokenizer(t)["input_ids"]) for t in texts}) > 3
    return texts


def _run(args, processes):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "loku"]
    cmd = launcher if processes == 2 else [sys.executable, "-m", "loku"]
    r = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("method,init", [("ihl", "default"), ("ihl", "fila"), ("npo", "default")])
def test_two_processes_equal_one_with_double_batch(tiny_model_dir, tokenizer, tmp_path, method, init):
    """Examples of unequal length: token (IHL, CE) and sequence (NPO) means over the global batch."""
    texts = unequal_texts(tokenizer, 16)
    forget, retain = _csv(tmp_path / "f.csv", texts[:8]), _csv(tmp_path / "r.csv", texts[8:])
    common = ["unlearn", "--model", tiny_model_dir, "--forget", forget, "--retain", retain, "--method", method,
              "--init", init, "--lora-rank", "4", "--epochs", "2", "--lr", "5e-3"]
    two = _run(common + ["--batch-size", "2", "--out", tmp_path / "two"], processes=2)
    assert two.stdout.count("done in") == 1  # only the main process reports and writes
    _run(common + ["--batch-size", "4", "--out", tmp_path / "one"], processes=1)
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    # Same examples per step; only the order of float sums differs (all-reduce vs one batch).
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_split_statistics_and_evaluation_equal_one_process(tiny_model_dir, tmp_path):
    """Fisher/VILA sums all-reduced over 2 processes, the FILA factors from them, and MA/EL, TOFU and utility
    scores split across the processes and gathered: all equal the one-process values."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    worker = str(Path(__file__).parent / "distributed_worker.py")
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    runs = {}
    for world, cmd in ((1, [sys.executable]), (2, launcher)):
        out = tmp_path / f"world{world}"
        out.mkdir()
        r = subprocess.run(cmd + [worker, str(tiny_model_dir), str(out)], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[world] = (json.loads((out / "results.json").read_text()), load_file(out / "tensors.safetensors"))
    (one, t1), (two, t2) = runs[1], runs[2]
    assert one["world"] == 1 and two["world"] == 2
    assert one["counts"] == two["counts"] and one["data"] == two["data"]
    assert t1.keys() == t2.keys()
    for k in t1:   # only the order of the float sums differs
        assert torch.allclose(t1[k], t2[k], rtol=1e-5, atol=1e-7 * float(t1[k].abs().max())), k
    assert one["extraction"]["ma"] == two["extraction"]["ma"]
    assert one["extraction"]["el"] == pytest.approx(two["extraction"]["el"], abs=1e-9)
    assert one["tofu"].keys() == two["tofu"].keys()
    for metric in one["tofu"]:
        assert list(one["tofu"][metric]) == list(two["tofu"][metric]) == [str(i) for i in range(5)]
        if metric == "generated_text":
            assert one["tofu"][metric] == two["tofu"][metric]
        else:
            assert json.dumps(one["tofu"][metric]) and _close(one["tofu"][metric], two["tofu"][metric]), metric
    for task, r in one["utility"].items():
        assert r["n"] == two["utility"][task]["n"] == len(r["items"])
        assert _close(r["items"], two["utility"][task]["items"]), task
        assert r["value"] == pytest.approx(two["utility"][task]["value"], rel=1e-5)


def _close(a, b, rel=1e-5) -> bool:
    """Equal structures, floats within `rel` (batches are formed differently per process)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float):
        return b == pytest.approx(a, rel=rel, abs=1e-6)
    return a == b


def test_tdec_run_under_two_processes_equals_one(tiny_model_dir, tmp_path):
    """`loku tdec run` unchanged under accelerate launch: one process reports and writes; initial and per-epoch
    MA/EL (split across the processes) equal the one-process run with the same global batch."""
    from test_tdec import FORGET, RECORDS

    forget = _csv(tmp_path / "forget.csv", FORGET[:4])
    retain = tmp_path / "retain.txt"
    retain.write_text("\n".join(RECORDS[12:]) + "\n")
    common = ["tdec", "run", "--model", tiny_model_dir, "--forget", forget, "--retain", retain, "--method", "ihl",
              "--init", "fila", "--lora-rank", "4", "--epochs", "2", "--lr", "1e-3", "--max-tokens", "40",
              "--el-threshold", "0", "--ma-threshold", "0", "--no-utility"]
    two = _run(common + ["--batch-size", "2", "--out", tmp_path / "two"], processes=2)
    assert two.stdout.count("wrote ") == 1
    _run(common + ["--batch-size", "4", "--out", tmp_path / "one"], processes=1)
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert a["initial"]["ma"] == b["initial"]["ma"] and a["initial"]["el"] == b["initial"]["el"]
    assert a["epochs_run"] == b["epochs_run"] == 2
    for x, y in zip(a["epochs"], b["epochs"]):
        assert x["ma"] == pytest.approx(y["ma"], abs=1e-6) and x["el"] == pytest.approx(y["el"], abs=1e-6)


def test_tofu_unlearn_under_two_processes_equals_one(tiny_model_dir, tofu_dir, tmp_path):
    """`loku tofu unlearn` under accelerate launch equals one process with the same global batch: the TOFU
    scores split across the processes (target and retain logs within 1e-5) and, after training on QA pairs of
    unequal lengths, every method's per-epoch scores (within 1e-4: float summation order); one process writes."""
    common = ["tofu", "unlearn", "--target", tiny_model_dir, "--retain-model", tiny_model_dir, "--data", tofu_dir,
              "--methods", "ga,ihl+fila", "--epochs", "2", "--lr", "1e-3", "--grad-accum", "1", "--lora-rank", "2",
              "--max-length", "64", "--limit", "3", "--max-new-tokens", "3"]
    two = _run(common + ["--batch-size", "1", "--out", tmp_path / "two"], processes=2)
    assert two.stdout.count("wrote ") == 1
    _run(common + ["--batch-size", "2", "--out", tmp_path / "one"], processes=1)
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert _close(a["retain"], b["retain"]) and _close(a["target"], b["target"])
    for log in ("eval_log_forget.json", "eval_log.json", "eval_real_author_wo_options.json"):
        one_log, two_log = (json.loads((tmp_path / d / "target_eval" / log).read_text()) for d in ("one", "two"))
        assert _close(one_log, two_log), log
    for label in ("ga", "ihl+fila"):
        assert [e["epoch"] for e in b["methods"][label]["epochs"]] == [1, 2]
        for x, y in zip(a["methods"][label]["epochs"], b["methods"][label]["epochs"]):
            assert _close(x["summary"], y["summary"], rel=1e-4), (label, x["epoch"])
        assert (tmp_path / "two" / "runs" / label / "tofu" / "epoch-2" / "eval_log_aggregated.json").is_file()


def test_fisher_command_under_two_processes_equals_one(tiny_model_dir, tokenizer, tmp_path):
    """`loku fisher` under accelerate launch: the processes split the batches, all-reduce, one writes; the file
    equals a one-process run with the same global batch, so either serves as the other's --fisher-cache."""
    texts = unequal_texts(tokenizer, 16)
    forget, retain = _csv(tmp_path / "f.csv", texts[:8]), _csv(tmp_path / "r.csv", texts[8:])
    common = ["fisher", "--model", tiny_model_dir, "--forget", forget, "--retain", retain, "--method", "fila"]
    two = _run(common + ["--batch-size", "2", "--out", tmp_path / "two.safetensors"], processes=2)
    assert two.stdout.count("wrote ") == 1
    _run(common + ["--batch-size", "4", "--out", tmp_path / "one.safetensors"], processes=1)
    from loku.fisher import FisherStats

    a, b = (FisherStats.load(tmp_path / f"{d}.safetensors") for d in ("one", "two"))
    assert a.meta["data_sha256"] == b.meta["data_sha256"] and a.forget_tokens == b.forget_tokens
    for n in a.forget:
        assert torch.allclose(a.forget[n], b.forget[n], rtol=1e-5, atol=1e-12)
        assert torch.allclose(a.retain[n], b.retain[n], rtol=1e-5, atol=1e-12)
