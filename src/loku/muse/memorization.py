"""VerbMem and KnowMem: greedy continuations scored by ROUGE-L against the truth, as MUSE defines them.

VerbMem (muse_bench `metrics/verbmem.py`): the model continues each `prompt` by 128 greedy tokens; the
score is the ROUGE-L F1 of that continuation against the true continuation `gt`.
KnowMem (`metrics/knowmem.py`): a few-shot prompt, "Question: {q}\\nAnswer: {a}\\n\\n" for every example
of the `*_qa_icl` file and then "Question: {q}\\nAnswer: ", 32 greedy tokens, cut before the first
"\\n\\n", "\\nQuestion" or "Question:", ROUGE-L F1 against the answer. Both report the mean F1 x 100
(`eval.py`: agg['mean_rougeL'] * 100); the per-item recall is kept beside it.
"""

from __future__ import annotations

from typing import Callable

from ..metrics.generate import greedy_answers
from .conventions import Convention

STOPWORDS = ("\n\n", "\nQuestion", "Question:")
Progress = Callable[[int], None]   # called with the number of items just finished


def knowmem_prompt(icl: list[dict], question: str) -> str:
    shots = "".join(f"Question: {ex['question']}\nAnswer: {ex['answer']}\n\n" for ex in icl)
    return shots + f"Question: {question}\nAnswer: "


def cut_at_stopwords(text: str) -> str:
    """muse_bench's get_prefix_before_words_occur: split at each stop word in turn, keep the head."""
    for word in STOPWORDS:
        text = text.split(word)[0]
    return text


def rouge_l(truths: list[str], outputs: list[str], use_stemmer: bool) -> list[dict[str, float]]:
    """ROUGE-L F1 and recall of each output against its truth: `scorer.score(target=truth, prediction=output)`."""
    # rouge_score pulls in nltk (2.4 s of CPU, as much as torch): imported here, not at every `loku` start
    # (the CLI imports the MUSE config classes to build its flags).
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    scores = [scorer.score(t, o)["rougeL"] for t, o in zip(truths, outputs)]
    return [{"rougeL": s.fmeasure, "rougeL_recall": s.recall} for s in scores]


def _decode(tokenizer, ids: list[int]) -> str:
    # muse_bench also passes clean_up_tokenization_spaces=True; transformers 5 ignores it (with a warning) for
    # BPE tokenizers, Llama-2's included, and ROUGE's own tokenizer drops the punctuation it would move.
    return tokenizer.decode(ids, skip_special_tokens=True)


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             progress: Progress | None = None) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped), `batch_size` prompts of similar length at a
    time; each stops at the model's EOS like muse_bench's one-prompt `model.generate`."""
    return [_decode(tokenizer, g) for g in greedy_answers(model, tokenizer, prompts, [max_new_tokens] * len(prompts),
                                                          batch_size, progress=progress)]


def _report(items: list[dict]) -> dict:
    n = len(items)
    agg = {f"mean_{k}": sum(it[k] for it in items) / n for k in ("rougeL", "rougeL_recall")}
    return {"value": 100 * agg["mean_rougeL"], **agg, "items": items}


def verbmem_truth(tokenizer, prompt: str, gt: str, convention: Convention, max_new_tokens: int) -> str:
    if convention.truth_first_tokens:   # muse_bench: tokenizer(gt, add_special_tokens=True)[:max_new_tokens]
        return _decode(tokenizer, tokenizer(gt).input_ids[:max_new_tokens])
    n_prompt = len(tokenizer(prompt).input_ids)     # OU: CompletionDataset(insert_space=True), the labels
    ids = tokenizer(prompt + " " + gt).input_ids[n_prompt:n_prompt + convention.truth_max_tokens]
    return _decode(tokenizer, ids).strip()


def verbmem(model, tokenizer, rows: list[dict], convention: Convention, max_new_tokens: int = 128,
            batch_size: int = 8, progress: Progress | None = None) -> dict:
    """VerbMem on the verbmem/forget rows ({"prompt", "gt"}): value = mean ROUGE-L F1 x 100, and per item."""
    prompts = [tokenizer(r["prompt"]).input_ids for r in rows]
    truths = [verbmem_truth(tokenizer, r["prompt"], r["gt"], convention, max_new_tokens) for r in rows]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    scores = rouge_l(truths, outputs, convention.use_stemmer)
    return _report([{"prompt": r["prompt"], "gt": t, "response": o, **s}
                    for r, t, o, s in zip(rows, truths, outputs, scores)])


def knowmem(model, tokenizer, qa: list[dict], icl: list[dict], convention: Convention, max_new_tokens: int = 32,
            batch_size: int = 8, progress: Progress | None = None) -> dict:
    """KnowMem on QA rows with the few-shot examples `icl`: value = mean ROUGE-L F1 x 100, and per item."""
    texts = [knowmem_prompt(icl, r["question"]) for r in qa]
    cut = convention.knowmem_prompt_tokens
    prompts = [tokenizer(t, truncation=cut is not None, max_length=cut).input_ids for t in texts]
    outputs = [cut_at_stopwords(o) for o in generate(model, tokenizer, prompts, max_new_tokens, batch_size,
                                                     progress)]
    truths = [r["answer"] for r in qa]
    scores = rouge_l(truths, outputs, convention.use_stemmer)
    return _report([{"question": r["question"], "gt": r["answer"], "response": o, **s}
                    for r, o, s in zip(qa, outputs, scores)])
