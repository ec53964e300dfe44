"""`loku fisher` end to end in process: the file it writes is a cache hit for `loku unlearn --fisher-cache`
(same batches, same settings), the hit gives the run it replaces, and bad input writes nothing."""


import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_llama
from loku.data.records import make_records, record_text
from loku.fisher import FisherStats
from test_cli import run_cli
from conftest import write_csv

COMMON = ["--batch-size", "4", "--max-length", "64", "--seed", "3", "--lora-rank", "4"]



@pytest.fixture()
def data(tmp_path):
    texts = [record_text(r) for r in make_records(14, seed=5)]
    return write_csv(tmp_path / "forget.csv", texts[:6]), write_csv(tmp_path / "retain.csv", texts[6:])


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def no_recompute(monkeypatch):
    import loku.fisher as fisher

    def boom(*a, **k):
        raise AssertionError("the Fisher statistics were recomputed: the cache missed")
    monkeypatch.setattr(fisher, "_batch_losses", boom)


@pytest.mark.parametrize("kind", ["fila", "vila"])
def test_fisher_file_is_a_cache_hit_for_unlearn(kind, tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    forget, retain = data
    stats_file = tmp_path / "fisher.safetensors"
    if kind == "fila":   # flags
        args = ["--model", tiny_model_dir, "--forget", forget, "--retain", retain, *COMMON]
        code, out, err = run_cli(["fisher", *args, "--method", "fila", "--out", stats_file], capsys)
        run = ["unlearn", *args, "--method", "ihl", "--init", "fila", "--epochs", "1", "--lr", "1e-3"]
    else:                # the run's own YAML config: fisher_cache names the file, init names the method
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(dict(model=str(tiny_model_dir), forget=str(forget), retain=str(retain),
                                              batch_size=4, max_length=64, seed=3, lora_rank=4, lora_alpha=6.0,
                                              init="vila", fisher_cache=str(stats_file), epochs=1, lr=1e-3)))
        code, out, err = run_cli(["fisher", "--config", config], capsys)
        run = ["unlearn", "--config", config]
    assert code == 0, err
    assert "modules" in out and "top modules by mean relative importance" in out and str(stats_file) in out
    stats = FisherStats.load(stats_file)
    assert stats.kind == kind and len(stats.forget) == 14   # 2 layers x 7 linear layers
    mtime = stats_file.stat().st_mtime_ns

    with monkeypatch.context() as m:   # a hit must not take a single gradient
        no_recompute(m)
        cached_args = [] if kind == "vila" else ["--fisher-cache", stats_file]
        code, _, err = run_cli([*run, *cached_args, "--out", tmp_path / "cached"], capsys)
        assert code == 0, err
    assert stats_file.stat().st_mtime_ns == mtime

    if kind == "vila":   # the same run computing its own statistics: a config without fisher_cache
        plain = yaml.safe_load(config.read_text())
        del plain["fisher_cache"]
        config.write_text(yaml.safe_dump(plain))
    code, _, err = run_cli([*run, "--out", tmp_path / "fresh"], capsys)
    assert code == 0, err
    cached, fresh = adapter(tmp_path / "cached"), adapter(tmp_path / "fresh")
    assert sorted(cached) == sorted(fresh)
    for k in fresh:
        torch.testing.assert_close(cached[k], fresh[k], rtol=0, atol=0)

    if kind == "fila":   # other batches (another seed) miss: the file is recomputed, not reused
        args[args.index("--seed") + 1] = "4"
        code, _, err = run_cli(["unlearn", *args, "--init", "fila", "--epochs", "1", "--fisher-cache", stats_file,
                                "--out", tmp_path / "seed4"], capsys)
        assert code == 0, err
        assert stats_file.stat().st_mtime_ns != mtime


@pytest.fixture()
def other_model_dir(tmp_path, tokenizer):
    d = tmp_path / "other_model"
    tiny_llama(len(tokenizer), hidden=32).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture()
def quiet_loading():
    """transformers draws a weight-loading bar on stderr; errors raised after loading come below it."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.mark.parametrize("case", ["rank", "target", "exists", "method", "retain_is_forget", "vila_one_batch",
                                  "other_model"])
def test_bad_input_one_line_exit_2_nothing_written(case, tiny_model_dir, other_model_dir, data, tmp_path, capsys,
                                                   quiet_loading):
    forget, retain = data
    stats_file = tmp_path / "fisher.safetensors"
    args = ["fisher", "--model", tiny_model_dir, "--forget", forget, "--retain", retain, *COMMON]
    expect = {"rank": "rank 65 exceeds layer", "target": "'qproj' is not a linear layer",
              "exists": "already exists", "method": "unknown Fisher method",
              "retain_is_forget": "forget and retain share",
              "vila_one_batch": "variances over batches", "other_model": "are for another model"}[case]
    written = None
    if case == "rank":
        args += ["--lora-rank", "65"]
    elif case == "target":
        args += ["--lora-targets", "q_proj,qproj"]
    elif case == "method":
        args += ["--method", "lisa"]
    elif case == "retain_is_forget":
        args[6] = forget
    elif case == "vila_one_batch":   # 6 forget examples in one batch: a variance over one batch is 0
        args += ["--method", "vila", "--batch-size", "8"]
    elif case in ("exists", "other_model"):
        code, _, err = run_cli([*args, "--out", stats_file], capsys)
        assert code == 0, err
        written = stats_file.read_bytes()
        if case == "other_model":   # a statistics file of the 64-wide model given to a run on a 32-wide one
            args = ["unlearn", "--model", other_model_dir, "--forget", forget, "--retain", retain, *COMMON,
                    "--init", "fila", "--fisher-cache", stats_file, "--out", tmp_path / "run"]
    code, _, err = run_cli([*args, "--out", stats_file] if case != "other_model" else args, capsys)
    assert code == 2, (case, err)
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and expect in lines[0], (case, err)
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()
    if written is None:
        assert not stats_file.exists()
    else:
        assert stats_file.read_bytes() == written
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    if case == "exists":   # --overwrite replaces it
        code, _, err = run_cli([*args, "--out", stats_file, "--overwrite", "--method", "vila"], capsys)
        assert code == 0, err
        assert FisherStats.load(stats_file).kind == "vila"
