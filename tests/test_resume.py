"""A run killed with SIGKILL and resumed ends with exactly the adapter of an uninterrupted run."""

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from loku.data.records import make_records, record_text
from conftest import write_csv as _csv



def _loku(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "loku", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("kill_at", [3, 6])  # mid-epoch (after a --save-every checkpoint) and at an epoch end
def test_kill_and_resume_equals_uninterrupted(tiny_model_dir, tmp_path, kill_at):
    texts = [record_text(r) for r in make_records(16, seed=4)]
    forget, retain = _csv(tmp_path / "f.csv", texts[:8]), _csv(tmp_path / "r.csv", texts[8:])
    common = ["unlearn", "--model", tiny_model_dir, "--forget", forget, "--retain", retain, "--method", "npo",
              "--init", "default", "--lora-rank", "4", "--epochs", "3", "--batch-size", "3", "--lr", "5e-3",
              "--save-every", "2"]
    full = _loku(*common, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    killed = _loku(*common, "--out", tmp_path / "killed", env_extra={"LOKU_TEST_KILL_AT_STEP": str(kill_at)})
    assert killed.returncode == -9  # SIGKILL
    assert not (tmp_path / "killed" / "manifest.json").exists()
    # A killed run is refused by readers, then resumed.
    from loku.errors import LokuError
    from loku.io import require_complete

    with pytest.raises(LokuError, match="incomplete run"):
        require_complete(tmp_path / "killed")
    resumed = _loku("unlearn", "--resume", tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    def records(run):  # timings differ between runs; everything else must match line for line
        import json

        rows = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "seconds")} for r in rows]

    assert records("killed") == records("full")
    assert not (tmp_path / "killed" / "checkpoint").exists()


def test_resume_refuses_complete_or_uncheckpointed_runs(tmp_path, tiny_model_dir):
    r = _loku("unlearn", "--resume", tmp_path / "nothing")
    assert r.returncode == 2 and "no config.yaml" in r.stderr
