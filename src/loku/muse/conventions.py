"""The two ways MUSE is scored: muse_bench's own code and OpenUnlearning's port of it.

They agree on the prompts, the greedy decoding, ROUGE-L F1, Min-40% and the PrivLeak formula, and differ in
details that move the numbers a little:

| | muse_bench (swj0419/muse_bench) | open-unlearning (locuslab/open-unlearning) |
|---|---|---|
| ROUGE stemmer | none (`metrics/logger.py`: use_stemmer=False) | Porter (`evals/metrics/utils.py`: use_stemmer=True) |
| VerbMem truth | first 128 tokens of `gt` (BOS counted, `metrics/verbmem.py`) | all of `gt` after `prompt + " "`, <= 2048 tokens (`data/utils.py`) |
| KnowMem prompt | whole few-shot prompt | cut to 512 tokens (`MUSE_*_knowmem.yaml` max_length) |
| Min-K% tokens | every token after the first, whole text (`metrics/privleak.py`) | after the BOS, <= 2048, last token dropped (`tokenwise_logprobs`) |
| Min-K% count | int(k x n) (0 gives NaN) | max(1, int(k x n)) (`mia/min_k.py`) |
| AUC_retrain default | `constants.py` AUC_RETRAIN[corpus]["forget_holdout_Min-40%"]: News 0.4772, Books 0.5393 | 0.5 (`muse_metrics/privleak.yaml` ref_value) |
| PrivLeak denominator | AUC_retrain | AUC_retrain + 1e-10 (`metrics/privacy.py`) |

Both take AUC_retrain from a retrained model's own evaluation when given one (`loku muse aggregate`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import unknown_choice

# muse_bench constants.py, AUC_RETRAIN[corpus][f"forget_holdout_Min-{k}%"]
MUSE_BENCH_AUC_RETRAIN = {
    "news": {0.05: 0.5116, 0.1: 0.5021, 0.2: 0.49310000000000004, 0.3: 0.48399999999999993,
             0.4: 0.47719999999999996, 0.5: 0.4711, 0.6: 0.4671},
    "books": {0.05: 0.5325000000000001, 0.1: 0.5424000000000001, 0.2: 0.5582, 0.3: 0.557,
              0.4: 0.5392999999999999, 0.5: 0.5167, 0.6: 0.48410000000000003},
}


@dataclass(frozen=True)
class Convention:
    name: str
    use_stemmer: bool
    truth_first_tokens: bool           # muse_bench: VerbMem's truth is the gt's first max_new_tokens tokens
    truth_max_tokens: int              # else (OU): the gt tokenized after `prompt + " "`, at most this many
    knowmem_prompt_tokens: int | None  # OU cuts the few-shot prompt (right side) to this many tokens
    min_k_at_least_one: bool
    score_last_token: bool
    mia_max_tokens: int | None         # OU: at most this many scored-text tokens after the BOS
    eps: float                         # added to AUC_retrain in PrivLeak's denominator
    default_auc_retrain: float | None  # None: muse_bench's per-corpus constants

    def auc_retrain(self, corpus: str, k: float) -> tuple[float | None, str]:
        """The AUC_retrain used without a retrained model's evaluation, and where it comes from."""
        if self.default_auc_retrain is not None:
            return self.default_auc_retrain, "OpenUnlearning's default ref_value 0.5"
        value = MUSE_BENCH_AUC_RETRAIN[corpus].get(round(k, 4))
        where = f"muse_bench constants.py AUC_RETRAIN[{corpus!r}]['forget_holdout_Min-{round(k * 100):g}%']"
        return value, where


CONVENTIONS = {
    "muse_bench": Convention("muse_bench", use_stemmer=False, truth_first_tokens=True, truth_max_tokens=2048,
                             knowmem_prompt_tokens=None, min_k_at_least_one=False, score_last_token=True,
                             mia_max_tokens=None, eps=0.0, default_auc_retrain=None),
    "open-unlearning": Convention("open-unlearning", use_stemmer=True, truth_first_tokens=False,
                                  truth_max_tokens=2048, knowmem_prompt_tokens=512, min_k_at_least_one=True,
                                  score_last_token=False, mia_max_tokens=2048, eps=1e-10, default_auc_retrain=0.5),
}


def get_convention(name: str) -> Convention:
    if name not in CONVENTIONS:
        raise unknown_choice("MUSE convention", name, CONVENTIONS)
    return CONVENTIONS[name]
