"""How much loku's two deliberate differences from OpenUnlearning's MIA / ES code move the numbers.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/membership_conventions.py

1. OpenUnlearning's token-wise attacks (Min-K%, Min-K%++) drop each example's last scored token (meant as the
   EOS of its chat format); loku scores every scored token. Measured: both scorings of the same texts.
2. OpenUnlearning's ES loop ends at k = L - 1 when no suffix is reproduced (ES = 1/L); loku's definition ends
   at the empty suffix (ES = 0). Measured: the mean ES both ways.
A tiny Llama (tests/conftest.py) trained on 16 fictitious records for 0, 40 and 120 full-batch steps, scored on
those 16 (members) and 16 others. Writes benchmarks/results/membership_conventions.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))   # the tiny models and tokenizer of the test suite

from conftest import build_tokenizer, memorize, record_texts, tiny_llama  # noqa: E402

from loku.metrics.extraction import extraction_strength_from_logits  # noqa: E402
from loku.metrics.forward import teacher_forced, text_features  # noqa: E402
from loku.metrics.membership import auc, membership_scores  # noqa: E402
from loku.models import ensure_pad_token  # noqa: E402


def scores(model, feats, pad, drop_last: bool) -> dict[str, list[float]]:
    """Min-K / Min-K++ (k = 0.4) and ES per feature; `drop_last` unscores each row's last scored token."""
    if drop_last:
        feats = [{**f, "labels": f["labels"][:-1] + [-100]} for f in feats]
    out = {"min_k": [0.0] * len(feats), "min_k_plus_plus": [0.0] * len(feats)}
    for idx, logits, labels in teacher_forced(model, feats, pad, 8):
        s = membership_scores(logits, labels, attacks=("min_k", "min_k_plus_plus"))
        for name, v in s.items():
            for i, x in zip(idx, v.tolist()):
                out[name][i] = x
    return out


def es_both_ways(model, feats, pad) -> tuple[float, float, float]:
    """(mean ES loku, mean ES with OpenUnlearning's fallback, share of rows that differ)."""
    loku, ou, differ = [], [], 0
    for _, logits, labels in teacher_forced(model, feats, pad, 8):
        es = extraction_strength_from_logits(logits, labels)
        hit_last = []
        for b in range(labels.shape[0]):
            last = int((labels[b] != -100).nonzero()[-1])
            hit_last.append(int(logits[b, last - 1].argmax()) == int(labels[b, last]))
        n = (labels[:, 1:] != -100).sum(-1)
        for e, h, L in zip(es.tolist(), hit_last, n.tolist()):
            loku.append(e)
            ou.append(e if h else 1 / L)
            differ += not h
    return sum(loku) / len(loku), sum(ou) / len(ou), differ / len(loku)


def main() -> int:
    torch.set_num_threads(1)
    tok = ensure_pad_token(build_tokenizer())
    texts = record_texts(32)
    a, b = texts[:16], texts[16:]
    fa, fb = text_features(tok, a), text_features(tok, b)
    rows = []
    for steps in (0, 40, 120):
        model = memorize(tiny_llama(len(tok), seed=3), tok, a, steps=steps) if steps else tiny_llama(len(tok), seed=3)
        row = {"train_steps": steps}
        la, lb = scores(model, fa, tok.pad_token_id, False), scores(model, fb, tok.pad_token_id, False)
        oa, ob = scores(model, fa, tok.pad_token_id, True), scores(model, fb, tok.pad_token_id, True)
        for name in ("min_k", "min_k_plus_plus"):
            diffs = [abs(x - y) for x, y in zip(la[name] + lb[name], oa[name] + ob[name])]
            row[name] = {"auc_loku": auc(la[name], lb[name]), "auc_drop_last": auc(oa[name], ob[name]),
                         "mean_abs_score_diff": sum(diffs) / len(diffs),
                         "mean_abs_score": sum(abs(x) for x in la[name] + lb[name]) / (len(a) + len(b))}
        es_l, es_o, share = es_both_ways(model, fa + fb, tok.pad_token_id)
        row["es"] = {"mean_loku": es_l, "mean_openunlearning_fallback": es_o, "rows_that_differ": share}
        rows.append(row)
    print("| train steps | Min-K% AUC loku / last dropped | mean abs score change | Min-K%++ AUC loku / last dropped "
          "| mean abs score change | ES mean loku / OU fallback | rows that differ |")
    print("|---:|---|---:|---|---:|---|---:|")
    for r in rows:
        mk, mp, es = r["min_k"], r["min_k_plus_plus"], r["es"]
        print(f"| {r['train_steps']} | {mk['auc_loku']:.3f} / {mk['auc_drop_last']:.3f} | {mk['mean_abs_score_diff']:.4f} "
              f"(of {mk['mean_abs_score']:.2f}) | {mp['auc_loku']:.3f} / {mp['auc_drop_last']:.3f} | "
              f"{mp['mean_abs_score_diff']:.4f} (of {mp['mean_abs_score']:.2f}) | {es['mean_loku']:.4f} / "
              f"{es['mean_openunlearning_fallback']:.4f} | {es['rows_that_differ']:.2f} |")
    path = HERE / "results" / "membership_conventions.json"
    path.write_text(json.dumps({"rows": rows, "texts": "16 members (trained on) + 16 non-members, ~88 tokens each"},
                               indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
