"""`loku audit`: is the forget set really gone? Membership inference, extraction, and the same after
quantization, relearning and paraphrased probes, against text the model never saw.

Pieces for other callers (the `--until forgotten` stop rule, the robustness benchmark): `build_set` tokenizes a
set once; `measure_set` gives every per-example number of one model on one set; `compare` turns forget and
unseen measurements into margins, bootstrap intervals and verdicts; `forgotten` reads a comparison as a stop
rule would; `run_audit` is the whole command.

The names are loaded on first use (PEP 562): `loku audit --help` and every other command import
`loku.audit.config` at start, and the measuring modules pull in scikit-learn and scipy (seconds)."""

from importlib import import_module

_WHERE = {"AuditConfig": "config", "Settings": "measure", "compare": "measure", "forgotten": "measure",
          "measure_model": "measure", "measure_set": "measure", "recoveries": "run", "run_audit": "run",
          "summary": "run", "EvalSet": "sets", "build_set": "sets"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'loku.audit' has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
