"""Run by test_distributed.py twice: alone, and under `accelerate launch` with 2 CPU processes. Computes
everything loku splits across processes (Fisher and VILA sums, FILA factors from them, MA/EL, TOFU
per-item scores, utility tasks) on a tiny model; the main process saves it all for the test to compare.

    python tests/distributed_worker.py MODEL_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_fisher import TEXTS, make_pairs  # noqa: E402
from test_tofu import ROWS  # noqa: E402
from test_utility import _write_eval_dir  # noqa: E402

from loku.distributed import exit_process  # noqa: E402
from loku.fila import fila_factors  # noqa: E402
from loku.fisher import fisher_statistics, relative_importance, vila_statistics  # noqa: E402
from loku.metrics.utility import evaluate_utility  # noqa: E402
from loku.tdec.data import tokenize_sequences  # noqa: E402
from loku.tdec.measure import measure_sequences  # noqa: E402
from loku.tofu.evaluate import evaluate_set  # noqa: E402


def main(model_dir: str, out: str) -> None:
    state = PartialState(cpu=True)   # joins the process group under accelerate launch
    torch.set_num_threads(1)
    out = Path(out)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    pairs = make_pairs(tok)
    fila = fisher_statistics(model, pairs, names, progress=False)
    vila = vila_statistics(model, pairs, names, rank=4, scaling=2.0, progress=False)
    tensors = {}
    for kind, stats in (("fila", fila), ("vila", vila)):
        imp = relative_importance(stats)
        for n in names:
            tensors[f"{kind}/forget/{n}"] = stats.forget[n].contiguous()
            tensors[f"{kind}/retain/{n}"] = stats.retain[n].contiguous()
            weight = dict(model.named_modules())[n].weight.detach()
            A, B, _ = fila_factors(weight, imp[n], 4, 2.0)
            tensors[f"{kind}/A/{n}"], tensors[f"{kind}/B/{n}"] = A.contiguous(), B.contiguous()
    # 5 sequences of two lengths: the processes get unequal shares and mixed lengths
    seqs = tokenize_sequences(TEXTS[:5], tok, max_tokens=14, n=3, min_tokens=4)
    extraction = measure_sequences(model, seqs, n=3, batch_size=2)
    tofu = evaluate_set(model, tok, ROWS + ROWS[:2], max_new_tokens=6, batch_size=2, normalized=True)
    data = _write_eval_dir(out / f"eval{state.process_index}")
    utility = evaluate_utility(model, tok, tasks="lambada,pubmedqa,wizard_of_wikipedia,pile", limit=3,
                               batch_size=2, data_dir=data)
    if state.is_main_process:
        save_file(tensors, str(out / "tensors.safetensors"))
        counts = {k: [s.forget_tokens, s.retain_tokens] for k, s in (("fila", fila), ("vila", vila))}
        extraction.pop("seconds")
        for r in utility["tasks"].values():
            r.pop("seconds")
        (out / "results.json").write_text(json.dumps({"counts": counts, "data": fila.meta["data_sha256"],
                                                      "extraction": extraction, "tofu": tofu,
                                                      "utility": utility["tasks"], "world": state.num_processes}))
    state.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    exit_process(0)   # as the CLI leaves: not through the interpreter's teardown (see its docstring)
