"""MUSE (Shi et al. 2024, github swj0419/muse_bench) as muse_bench and OpenUnlearning score it: VerbMem,
KnowMem on forget and retain QA, and PrivLeak, on data in MUSE's own layout (local folder or the hub).

    scoring = MuseScoring(corpus="news", data_dir="DATA")    # DATA/muse/news/; convention="open-unlearning"
    model, tokenizer = load_model("muse-bench/MUSE-News_target")
    summary = evaluate_muse(model, tokenizer, load_data(scoring), scoring, out="runs/target-eval")
    aggregate(summary, read_summary("runs/retrain-eval"))                 # PrivLeak against the retrained model
"""

from .conventions import CONVENTIONS, Convention, get_convention
from .data import CORPORA, METRICS, MuseData, load_muse
from .evaluate import MuseEvalConfig, MuseScoring, eval_model, evaluate_muse, load_data, read_summary
from .run import MuseUnlearnConfig, run_muse
from .summary import against_retrain, aggregate, markdown_table

__all__ = ["CONVENTIONS", "Convention", "get_convention", "CORPORA", "METRICS", "MuseData", "load_muse",
           "MuseEvalConfig", "eval_model", "MuseScoring", "evaluate_muse", "load_data", "read_summary", "MuseUnlearnConfig",
           "run_muse", "against_retrain", "aggregate", "markdown_table"]
