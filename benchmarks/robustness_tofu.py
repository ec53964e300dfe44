"""The TOFU half of `robustness_smollm2.py` (`--setting tofu`): is a forgotten author still gone after 4-bit
quantization, a paraphrased question, or a few fine-tuning steps on half of their QA pairs? (issue 13)

The setting is `tofu_smollm2.py`'s 10-author TOFU (first 10 QA pairs per author, TOFU's phi prompt format):
its target model (SmolLM2-135M fine-tuned on all 100 QA pairs) is fine-tuned by `tofu_smollm2.finetune_phase`
into --tofu-out/models/target, or reused from there. Forget set: the forget10 author's 10 QA pairs (answer
tokens scored); non-member control: the first 10 QA pairs of TOFU's holdout10 author (never trained on), as
OpenUnlearning's MIA compares forget with holdout; retain set: the other 9 authors' 90 QA pairs. The stop rule
on QA data: the forget set's mean EM and ES below the target's on the holdout set. Extra attack
`paraphrase`: the forget questions replaced by TOFU's `paraphrased_question` (`loku.attacks.paraphrase`), the
holdout questions unchanged. Utility: the teacher-forced EM of the first 30 retain QA answers and WikiText-2
perplexity on --limit items.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/robustness_smollm2.py --setting tofu     # resumes per method
"""

from __future__ import annotations

import dataclasses
import shlex

from loku.attacks import split_forget
from loku.attacks.paraphrase import question_probes
from loku.audit.measure import Settings, measure_model, measure_set
from loku.audit.sets import EvalSet, build_set
from loku.data.tofu import load_split
from loku.io import write_json
from loku.metrics.forward import pad_id
from loku.metrics.membership import zlib_sizes
from loku.metrics.utility import evaluate_utility
from loku.models import load_model
from loku.tofu.finetune import per_author, retain_split
from robustness_smollm2 import Setting, point, say
from tofu_smollm2 import finetune_phase, parser

MAX_TOKENS = 500   # as tofu_smollm2.py trains
RETAIN_PROBES = 30


def qa(rows: list[dict]) -> list[dict]:
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


class TofuSetting(Setting):
    key = "em"
    shown = ("em", "es")
    utility_columns = (("retain-QA EM %", "retain_em"), ("WikiText ppl", "wikitext_ppl"))
    extra_attacks = ("paraphrase",)
    title = "SmolLM2-135M, 10-author TOFU: the forget author unlearned until forgotten, then attacked"
    original_label = "target model (original)"

    def __init__(self, args):
        self.args = args
        args.work.mkdir(parents=True, exist_ok=True)
        self.tofu = parser().parse_args(["--data-dir", str(args.data_dir), "--out", str(args.tofu_out),
                                         "--seed", str(args.seed)] + shlex.split(args.tofu_flags))
        t = self.tofu
        summary = finetune_phase(t, t.out, names=("target",))   # the retain model is not needed here
        self.mem = {"model_dir": str(t.out / "models" / "target"), "epochs": t.ft_epochs, "lr": t.ft_lr,
                    "seconds": summary["target"]["seconds"]}
        self.model, self.tokenizer = load_model(self.mem["model_dir"])
        tok, fmt = self.tokenizer, t.prompt_format

        def rows(split: str) -> list[dict]:
            return per_author(load_split(split, args.data_dir, authors=t.authors, forget=t.split), t.qa_per_author)

        forget, perturbed = rows(t.split), rows(f"{t.split}_perturbed")
        if [r["question"] for r in forget] != [r["question"] for r in perturbed]:
            raise SystemExit(f"{t.split} and {t.split}_perturbed list other questions: use an unmodified TOFU folder")
        holdout = rows(f"holdout{t.split[-2:]}")
        self.forget_qa, self.retain = qa(forget), qa(rows(retain_split(t.split)))
        self.refusals = load_split("idontknow", args.data_dir)
        paths = {name: args.work / f"{name}.json" for name in ("forget", "unseen")}
        for name, r in (("forget", forget), ("unseen", holdout)):
            write_json(paths[name], qa(r))
        self.sets = {name: build_set(name, str(paths[name]), qa(r), tok, max_tokens=MAX_TOKENS, n=10,
                                     prompt_format=fmt) for name, r in (("forget", forget), ("unseen", holdout))}
        self.retain_set = build_set("retain", "retain", self.retain[:RETAIN_PROBES], tok, max_tokens=MAX_TOKENS,
                                    n=10, prompt_format=fmt)
        probes = question_probes(tok, self.forget_qa, max_length=MAX_TOKENS, prompt_format=fmt,
                                 paraphrased=[r.get("paraphrased_question") for r in perturbed])
        f = self.sets["forget"]
        self.paraphrased = EvalSet("forget", f"{f.path} (paraphrased_question)", "qa", f.rows, probes,
                                   zlib_sizes(tok, probes), f.examples)
        self.st = Settings(n=10, batch_size=8, pad_id=pad_id(tok), bootstrap=args.bootstrap, seed=args.seed)
        self.idx_in, self.idx_out = split_forget(len(f), 0.5, args.seed)
        self.relearn_feats = [f.features[i] for i in self.idx_in]
        self.original = self.cached("original", lambda: self.measure_full(self.model))
        say(f"TOFU: {len(f)} forget QA, {len(holdout)} holdout QA, {len(self.retain)} retain QA; target "
            f"{self.mem['model_dir']}")

    def utility(self, model) -> dict:
        em = measure_set(model, self.retain_set, dataclasses.replace(self.st, attacks=()))["mean"]["em"]
        ppl = evaluate_utility(model, self.tokenizer, "wikitext", limit=self.args.limit,
                               data_dir=self.args.data_dir)["summary"]["wikitext_ppl"]
        return {"retain_em": em, "wikitext_ppl": ppl}

    def unlearn_inputs(self, method: str) -> dict:
        return {"config": dict(max_length=MAX_TOKENS, prompt_format=self.tofu.prompt_format),
                "kwargs": dict(forget=self.forget_qa, retain=self.retain if method != "ga" else None,
                               refusals=self.refusals)}

    def attack(self, name: str, model, st: Settings) -> dict:
        """`paraphrase`: the forget set asked with TOFU's paraphrased questions, against the holdout set."""
        m = measure_model(model, {"forget": self.paraphrased, "unseen": self.sets["unseen"]}, st)
        return point(m, self.idx_out, st)

    def describe(self) -> str:
        a, t = self.args, self.tofu
        return (f"SmolLM2-135M fine-tuned on a {t.authors}-author TOFU ({t.qa_per_author} QA each, "
                f"{t.prompt_format} format; {self.mem['model_dir']}); forget: the {t.split} author's "
                f"{len(self.sets['forget'])} QA (answer tokens); non-member control: {len(self.sets['unseen'])} QA "
                f"of TOFU's holdout author; retain: {len(self.retain)} QA; unlearning: lr {a.lr} (LoRA) / "
                f"{a.full_lr} (full), batch {a.batch_size}, LoRA r={a.rank}, until forgotten (EM and ES below the "
                f"target's on the holdout set) or {a.max_epochs} epochs; AUC: the membership attack farthest from "
                f"0.5 (LOSS, ZLib, Min-K% k=0.4, Min-K%++); quantization of the merged weights (INT4 per channel, "
                f"NF4 block 64); paraphrase: TOFU's paraphrased_question; relearning: AdamW lr {a.relearn_lr}, "
                f"batch {a.relearn_batch}, on {len(self.idx_in)} forget QA, EM/AUC of the other "
                f"{len(self.idx_out)}; utility: teacher-forced EM of the first {RETAIN_PROBES} retain answers, "
                f"WikiText-2 perplexity on {a.limit} items;")
