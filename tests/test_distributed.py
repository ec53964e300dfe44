"""Two CPU processes (gloo) through `accelerate launch` give the run of one process with a 2x batch."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loku.data.records import make_records, record_text
from conftest import write_csv as _csv
from launch import ON_CPU, launch
from test_tofu_runs import tofu_data  # noqa: F401 (a fixture)

pytestmark = pytest.mark.distributed   # `make test-distributed`; minutes in all, so not in the fast suite


def unequal_texts(tokenizer, n):
    """Records of different token lengths: per-process token means then differ from the global mean, which
    the loop's global-mean scaling must correct."""
    texts = [record_text(r) for r in make_records(n, seed=11)]
    texts = [t + " More text follows here." * (i % 3) for i, t in enumerate(texts)]
    assert len({len(tokenizer(t)["input_ids"]) for t in texts}) > 3
    return texts


has_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                   reason="deepspeed is not installed (pip install -e '.[test]' brings it)")
ZERO2, ZERO3 = (pytest.param(f"deepspeed_zero{k}", marks=has_deepspeed) for k in (2, 3))


def _run(args, processes, env_extra=None, check=True):
    """`loku ARGS` in 1 process, on 2 (DDP over gloo), or on 2 under a config in configs/accelerate
    (tests/fsdp_on_cpu.py starts the CLI with accelerate in its FSDP / DeepSpeed mode)."""
    if processes == 1:
        r = subprocess.run([sys.executable, "-m", "loku", *map(str, args)], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}, timeout=300)
    elif processes == 2:
        r = launch(["-m", "loku", *args], env_extra=env_extra)
    else:
        r = launch([ON_CPU, *args], config=processes, env_extra=env_extra)
    if check:
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
    worker = str(Path(__file__).parent / "distributed_worker.py")
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        out.mkdir()
        if world == 1:
            r = subprocess.run([sys.executable, worker, str(tiny_model_dir), str(out)], capture_output=True,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        else:
            r = launch([worker, tiny_model_dir, out])
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


@pytest.mark.parametrize("code", [0, 3])
def test_launched_process_exits_without_the_interpreter_teardown(tmp_path, code):
    """After the last collective a gloo worker thread still releases that collective's tensors, which needs the
    GIL; if the interpreter is being torn down by then, Python ends the thread inside a C++ destructor and the
    process aborts ("terminate called without an active exception", SIGABRT: finished ZeRO-3 runs exited 1 on
    loaded machines). loku's exit from a launched process (the CLI's, exit_process) skips that teardown and
    keeps everything else of a normal exit: the exit code, exit handlers, finalizers, buffered output."""
    r = launch([Path(__file__).parent / "exit_worker.py", tmp_path, code])
    assert (r.returncode == 0) == (code == 0), r.stderr[-3000:]
    assert "terminate called" not in r.stderr
    if code:
        assert f"exitcode  : {code}" in r.stderr   # torch's launcher reports each process's own code
    assert "rank 0 saw ranks [0, 1]" in r.stdout and "rank 1 saw ranks [0, 1]" in r.stdout
    for rank in (0, 1):
        assert (tmp_path / f"atexit{rank}").read_text() == "ran"
        assert not Path((tmp_path / f"scratch{rank}").read_text()).exists()   # TemporaryDirectory's finalizer
        assert not (tmp_path / f"teardown{rank}").exists()   # module objects never torn down


@pytest.mark.parametrize("processes", [2, "fsdp", ZERO3])
def test_tdec_run_under_two_processes_equals_one(tiny_model_dir, tmp_path, processes):
    """`loku tdec run` unchanged under accelerate launch (DDP, FSDP2): one process reports and writes; initial and
    per-epoch MA/EL (split across the processes under DDP; under FSDP every forward is collective and nothing is
    split) equal the one-process run with the same global batch."""
    from test_tdec import FORGET, RECORDS

    forget = _csv(tmp_path / "forget.csv", FORGET[:4])
    retain = tmp_path / "retain.txt"
    retain.write_text("\n".join(RECORDS[12:]) + "\n")
    common = ["tdec", "run", "--model", tiny_model_dir, "--forget", forget, "--retain", retain, "--method", "ihl",
              "--init", "fila", "--lora-rank", "4", "--epochs", "2", "--lr", "1e-3", "--max-tokens", "40",
              "--el-threshold", "0", "--ma-threshold", "0", "--no-utility"]
    two = _run(common + ["--batch-size", "2", "--out", tmp_path / "two"], processes=processes)
    assert two.stdout.count("wrote ") == 1
    _run(common + ["--batch-size", "4", "--out", tmp_path / "one"], processes=1)
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert a["initial"]["ma"] == b["initial"]["ma"] and a["initial"]["el"] == b["initial"]["el"]
    assert a["epochs_run"] == b["epochs_run"] == 2
    for x, y in zip(a["epochs"], b["epochs"]):
        assert x["ma"] == pytest.approx(y["ma"], abs=1e-6) and x["el"] == pytest.approx(y["el"], abs=1e-6)


@pytest.mark.parametrize("processes", [2, "fsdp", ZERO3])
def test_tofu_unlearn_under_two_processes_equals_one(tiny_model_dir, tofu_data, tmp_path, processes):
    """`loku tofu unlearn` under accelerate launch equals one process with the same global batch: the TOFU
    scores split across the processes (target and retain logs within 1e-5) and, after training on QA pairs of
    unequal lengths, every method's per-epoch scores (within 1e-4: float summation order); one process writes."""
    common = ["tofu", "unlearn", "--target", tiny_model_dir, "--retain-model", tiny_model_dir, "--data-dir", tofu_data,
              "--methods", "ga,ihl+fila", "--epochs", "2", "--lr", "1e-3", "--grad-accum", "1", "--lora-rank", "2",
              "--max-length", "64", "--limit", "3", "--max-new-tokens", "3"]
    two = _run(common + ["--batch-size", "1", "--out", tmp_path / "two"], processes=processes)
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


def test_muse_eval_under_two_processes_equals_one(tiny_model_dir, tokenizer, tmp_path):
    """`loku muse eval` under accelerate launch (DDP): every process scores everything, only the main one creates
    --out and writes, so the launch exits 0 with the files and numbers of one process (before, every process
    created --out and the later one found it not empty: exit 2, the launch 1)."""
    from test_muse import write_muse
    from conftest import tiny_llama

    data = write_muse(tmp_path / "data", tiny_llama(len(tokenizer)), tokenizer)   # tiny_model_dir's weights
    common = ["muse", "eval", "--model", tiny_model_dir, "--data-dir", data, "--limit", "3", "--batch-size", "2"]
    two = _run(common + ["--out", tmp_path / "two"], processes=2)
    assert two.stdout.count("VerbMem forget: ") == 1 and two.stdout.count("wrote ") == 1   # the main one reports
    _run(common + ["--out", tmp_path / "one"], processes=1)
    names = {d: sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("one", "two")}
    assert names["one"] == names["two"] and "muse.json" in names["two"]
    for name in names["one"]:
        a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("one", "two"))
        a.pop("seconds", None), b.pop("seconds", None)
        assert a == b, name


def test_wmdp_eval_under_two_processes_equals_one(tiny_model_dir, tmp_path):
    """`loku wmdp eval` under accelerate launch (DDP): lm-evaluation-harness takes a model in memory as one
    process, so every process runs it whole and the harness returns its results on the main one only; that one
    writes wmdp.json, equal to one process's (before, the other process summarized the harness's None: the
    launch exited 1)."""
    from test_wmdp import questions, write

    data = tmp_path / "data"
    write(data / "wmdp" / "wmdp-bio", questions(6, 0))
    write(data / "mmlu" / "anatomy", questions(3, 2))
    common = ["wmdp", "eval", "--model", tiny_model_dir, "--data-dir", data, "--tasks", "wmdp_bio,mmlu", "--limit", "2"]
    two = _run(common + ["--out", tmp_path / "two"], processes=2)
    assert two.stdout.count("wmdp_bio: acc") == 1   # only the main process reports
    _run(common + ["--out", tmp_path / "one"], processes=1)
    a, b = (json.loads((tmp_path / d / "wmdp.json").read_text()) for d in ("one", "two"))
    assert a == b and a["tasks"]["mmlu"]["n"] == 2


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.mark.parametrize("engine,method,extra", [("fsdp", "ihl", ["--init", "fila", "--save-merged"]),
                                                 ("fsdp", "npo", ["--init", "fila"]),
                                                 ("fsdp", "ga", ["--full"]),
                                                 pytest.param("deepspeed_zero2", "ihl", ["--init", "fila"],
                                                              marks=has_deepspeed),
                                                 pytest.param("deepspeed_zero3", "npo",
                                                              ["--init", "fila", "--save-merged"], marks=has_deepspeed),
                                                 pytest.param("deepspeed_zero3", "ga", ["--full"], marks=has_deepspeed)])
def test_sharded_engines_equal_one_process_with_double_batch(tiny_model_dir, tokenizer, tmp_path, engine, method,
                                                             extra):
    """The shipped FSDP2 and DeepSpeed ZeRO-2/3 configs (weights split over 2 processes) give the one-process run
    with a 2x batch: LoRA+FILA adapter (exported for the original model) and merged model gathered from the
    shards; NPO with FILA, whose frozen reference is sharded too; full fine-tuning. Before the fixes, clipping
    was skipped under FSDP (stale parameter list: runs differed by 2e-3) and under DeepSpeed the reference was
    None (DeepSpeedEngine.eval() returns None), so NPO compared against the FILA residual model."""
    texts = unequal_texts(tokenizer, 16)
    forget, retain = _csv(tmp_path / "f.csv", texts[:8]), _csv(tmp_path / "r.csv", texts[8:])
    common = ["unlearn", "--model", tiny_model_dir, "--forget", forget, "--retain", retain, "--method", method,
              "--lora-rank", "4", "--epochs", "2", "--lr", "5e-3" if method != "ga" else "1e-4", *extra]
    sharded = _run(common + ["--batch-size", "2", "--out", tmp_path / "fsdp"], processes=engine)
    assert sharded.stdout.count("done in") == 1
    _run(common + ["--batch-size", "4", "--out", tmp_path / "one"], processes=1)
    files = [] if "--full" in extra else ["adapter/adapter_model.safetensors"]
    files += ["model/model.safetensors"] if {"--full", "--save-merged"} & set(extra) else []
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    for f in files:
        # Sums in another order only (reduce-scatter vs one batch), amplified by Adam over 4 steps.
        assert _max_diff(tmp_path / "one" / f, tmp_path / "fsdp" / f) <= 1e-5, f   # the DDP test's bound
    if "--full" in extra:
        moved = load_file(tmp_path / "one" / "model" / "model.safetensors")
        assert max(float((moved[k] - start[k]).abs().max()) for k in start) > 1e-4   # 10x the bound


@pytest.mark.parametrize("engine", ["fsdp", ZERO3])
def test_reference_model_is_sharded(tiny_model_dir, engine):
    """The frozen reference (kl/npo/simnpo with FILA or full fine-tuning) is split like the trained model: under
    FSDP every weight a DTensor holding 1/2 of the rows on each process, under ZeRO-3 a 1/2 slice of each
    flattened weight and nothing whole between forwards; logits equal to the whole model's."""
    worker = str(Path(__file__).parent / "fsdp_reference_worker.py")
    r = launch([worker, tiny_model_dir], config=engine)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("reference sharded over 2 processes; logits equal") == 2


def test_fsdp_killed_run_resumes_exactly(tiny_model_dir, tokenizer, tmp_path):
    """Under FSDP the checkpoint gathers weights and optimizer state from the shards; killed mid-epoch and
    resumed (shards restored from it), the run ends with the uninterrupted run's adapter."""
    texts = unequal_texts(tokenizer, 16)
    forget, retain = _csv(tmp_path / "f.csv", texts[:8]), _csv(tmp_path / "r.csv", texts[8:])
    common = ["unlearn", "--model", tiny_model_dir, "--forget", forget, "--retain", retain, "--method", "npo",
              "--init", "fila", "--lora-rank", "4", "--epochs", "3", "--lr", "5e-3", "--batch-size", "2",
              "--save-every", "1"]
    killed = _run(common + ["--out", tmp_path / "killed"], processes="fsdp",
                  env_extra={"LOKU_TEST_KILL_AT_STEP": "3"}, check=False)
    assert killed.returncode != 0 and (tmp_path / "killed" / "checkpoint" / "state.json").is_file()
    assert not (tmp_path / "killed" / "adapter").exists()
    _run(["unlearn", "--resume", tmp_path / "killed"], processes="fsdp")
    _run(common + ["--out", tmp_path / "whole"], processes="fsdp")
    f = "adapter/adapter_model.safetensors"
    assert _max_diff(tmp_path / "whole" / f, tmp_path / "killed" / f) <= 1e-7


@pytest.mark.parametrize("engine", ["fsdp", ZERO3])
def test_sharded_config_on_cpus_is_a_clear_error(tiny_model_dir, tmp_path, engine):
    """Without GPUs accelerate quietly runs an FSDP or DeepSpeed config as plain data parallel (a whole model per
    process where the user planned for shards): loku stops with one line naming the fix, and writes nothing."""
    forget = _csv(tmp_path / "f.csv", ["Some text to forget here.", "And a second line of it."])
    # without tests/fsdp_on_cpu.py: what a user would run
    r = launch(["-m", "loku", "unlearn", "--model", tiny_model_dir, "--forget", forget, "--method", "ga",
                "--out", tmp_path / "o"], config=engine)
    assert r.returncode != 0
    asked = "FSDP" if engine == "fsdp" else "DeepSpeed"
    assert f"error: the launch configuration asks for {asked}, but accelerate started MULTI_CPU" in r.stderr
    assert "configs/accelerate/ddp.yaml" in r.stderr
    assert not re.search(r'File ".*/loku/', r.stderr)   # only the launcher's report of the exit code follows
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("processes", [2, "fsdp", ZERO3])
def test_tofu_finetune_under_two_processes_equals_one(tiny_model_dir, tofu_data, tmp_path, processes):
    """`loku tofu finetune` (full fine-tuning of the target and retain models) under DDP and FSDP2: each process
    trains on its share of the global batch (9 and 6 QA pairs: the last batch is uneven) and the main process
    writes the models, gathered from the shards under FSDP; equal to one process with a 2x batch."""
    common = ["tofu", "finetune", "--model", tiny_model_dir, "--data-dir", tofu_data, "--epochs", "2", "--lr", "3e-3",
              "--grad-accum", "1", "--max-length", "64"]
    two = _run(common + ["--batch-size", "2", "--out", tmp_path / "two"], processes=processes)
    assert two.stdout.count("done in") == 1
    _run(common + ["--batch-size", "4", "--out", tmp_path / "one"], processes=1)
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    for name in ("target", "retain"):
        f = f"{name}/model.safetensors"
        assert _max_diff(tmp_path / "one" / f, tmp_path / "two" / f) <= 1e-5, name
        moved = load_file(tmp_path / "one" / f)
        assert max(float((moved[k] - start[k]).abs().max()) for k in start) > 1e-3
    a, b = (json.loads((tmp_path / d / "tofu_finetune.json").read_text()) for d in ("one", "two"))
    for name in ("target", "retain"):
        assert [e["loss"] for e in a[name]["history"]] == pytest.approx([e["loss"] for e in b[name]["history"]],
                                                                         rel=1e-5)


@has_deepspeed
def test_resume_under_deepspeed_is_a_clear_error(tiny_model_dir, tmp_path):
    """DeepSpeed keeps its optimizer state in its own format and loku writes no checkpoints there: a killed run
    cannot resume, and --resume says so (naming FSDP, which can) instead of failing somewhere inside."""
    forget = _csv(tmp_path / "f.csv", ["Some text to forget here.", "And a second line of it.", "A third one."])
    common = ["unlearn", "--model", tiny_model_dir, "--forget", forget, "--method", "ga", "--epochs", "2",
              "--batch-size", "1", "--save-every", "1"]
    killed = _run(common + ["--out", tmp_path / "o"], processes="deepspeed_zero2",
                  env_extra={"LOKU_TEST_KILL_AT_STEP": "2"}, check=False)
    assert killed.returncode != 0 and not (tmp_path / "o" / "checkpoint").exists()
    r = _run(["unlearn", "--resume", tmp_path / "o"], processes="deepspeed_zero2", check=False)
    assert r.returncode != 0
    assert "error: resuming is not available under DeepSpeed" in r.stderr and "fsdp.yaml" in r.stderr


def test_fila_under_fsdp_from_statistics_taken_under_ddp(tiny_model_dir, tokenizer, tmp_path):
    """The README's FILA path for sharded engines: `loku fisher` under DDP writes the statistics, `loku unlearn
    --fisher-cache` under FSDP reuses them (the file is left as it was) and trains the adapter that the
    in-run Fisher pass gives."""
    texts = unequal_texts(tokenizer, 16)
    forget, retain = _csv(tmp_path / "f.csv", texts[:8]), _csv(tmp_path / "r.csv", texts[8:])
    data = ["--model", tiny_model_dir, "--forget", forget, "--retain", retain, "--batch-size", "2"]
    stats = tmp_path / "fisher.safetensors"
    _run(["fisher", *data, "--method", "fila", "--out", stats], processes=2)
    before = (stats.read_bytes(), stats.stat().st_mtime_ns, stats.stat().st_ino)
    common = ["unlearn", *data, "--method", "ihl", "--init", "fila", "--lora-rank", "4", "--epochs", "1"]
    _run(common + ["--fisher-cache", stats, "--out", tmp_path / "cached"], processes="fsdp")
    assert (stats.read_bytes(), stats.stat().st_mtime_ns, stats.stat().st_ino) == before   # reused, not rewritten
    _run(common + ["--out", tmp_path / "in_run"], processes="fsdp")
    f = "adapter/adapter_model.safetensors"
    assert _max_diff(tmp_path / "in_run" / f, tmp_path / "cached" / f) <= 1e-6


@pytest.mark.parametrize("engine", ["fsdp", ZERO3])
def test_mixed_precision_comes_from_the_launch_config(tiny_model_dir, tokenizer, tmp_path, engine):
    """The shipped files say `mixed_precision: bf16`; without --mixed-precision loku trains in it (recorded in
    config.yaml; FSDP's bf16 policy / DeepSpeed's bf16 engine move the adapter away from the float32 run by
    more than float32 noise, but not far), and --mixed-precision no still overrides it."""
    texts = unequal_texts(tokenizer, 16)
    forget, retain = _csv(tmp_path / "f.csv", texts[:8]), _csv(tmp_path / "r.csv", texts[8:])
    common = ["unlearn", "--model", tiny_model_dir, "--forget", forget, "--retain", retain, "--method", "ihl",
              "--init", "fila", "--lora-rank", "4", "--epochs", "2", "--lr", "5e-3", "--batch-size", "2"]
    for name, extra in (("file", []), ("fp32", ["--mixed-precision", "no"])):
        r = launch([ON_CPU, *common, *extra, "--out", tmp_path / name], config=engine, precision=None)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "mixed_precision: bf16" in (tmp_path / "file" / "config.yaml").read_text()
    assert "mixed_precision: 'no'" in (tmp_path / "fp32" / "config.yaml").read_text()
    f = "adapter/adapter_model.safetensors"
    assert 1e-4 < _max_diff(tmp_path / "fp32" / f, tmp_path / "file" / f) < 0.1
    # Saved from the float32 masters (DeepSpeed's module holds bf16 copies; B A - B0 A0 would drown in their rounding).
    assert {v.dtype for v in load_file(tmp_path / "file" / f).values()} == {torch.float32}
