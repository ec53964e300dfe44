"""`loku unlearn --until forgotten --unseen U`: stop after the first epoch at which the forget set is at the
never-seen level of U.

The rule is TDEC's (Jang et al. 2023; `loku.tdec.stop`, `loku.tdec.thresholds`): the never-seen level is the
mean MA and EL10 that the model reaches, BEFORE any training, on text it never saw (U); the forget set counts
as forgotten once its mean MA and its mean EL10 are both below that level (`thresholds.below`: strictly, or
both 0). On question/answer data, where MA and EL_n are not defined, EM and ES take their places (the answer's
teacher-forced hit rate and extraction strength, `loku.metrics.extraction`).

With `auc_margin` the forget set must also pass membership inference: AUC(forget vs U) within `auc_margin` of
0.5 for the chosen attack, by default "best" = the attack whose AUC is farthest from 0.5 that epoch (so every
attack is within the margin). Unlike the MA/EL level, the AUC compares the two sets under the CURRENT model:
U's membership scores are measured again each epoch (one teacher-forced pass, no decoding). An AUC far BELOW
0.5 fails too: a forget set that looks less familiar than never-seen text gives itself away
(`loku.audit.verdict`).

Every measurement is `loku.audit.measure.measure_set` (DDP-aware: every process gets every value).
`UntilForgotten.read` checks the files before a model loads; `.start` measures the model before training and
returns the per-epoch rule (`StopAtNeverSeen`, a plain `(epoch, model) -> dict` callable).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LokuError
from ..metrics.forward import pad_id
from ..metrics.membership import ATTACKS, auc
from ..tdec.thresholds import below
from .measure import Settings, measure_set
from .sets import EvalSet, build_set, kind_of, read_examples

# What the rule compares with the never-seen level, per kind of data (`EvalSet.kind`).
METRICS = {"text": ("ma", "el"), "qa": ("em", "es")}
AUC_ATTACKS = tuple(a for a in ATTACKS if a != "reference")   # the reference attack needs a second model
BEST = "best"
FILE = "until_forgotten.json"   # the run's summary of the rule, beside metrics.jsonl


def _key(metric: str, n: int) -> str:
    return f"el{n}" if metric == "el" else metric


def settings_for(st: Settings, auc_margin: float | None) -> Settings:
    """The membership attacks are scored only when the rule asks for an AUC (the same teacher-forced pass)."""
    return dataclasses.replace(st, attacks=AUC_ATTACKS if auc_margin is not None else ())


def strongest(aucs: dict[str, float]) -> str:
    """The attack whose AUC is farthest from 0.5 (either side); ties go to the first listed."""
    return max(aucs, key=lambda a: abs(aucs[a] - 0.5))


class StopAtNeverSeen:
    """After every epoch, measure the forget set (and, with `auc_margin`, the unseen set) and stop after the
    first epoch where the forget set is at the never-seen `level` ({metric: mean on U before training}).

    Each call returns the epoch's values for metrics.jsonl: the forget set's means (`ma`, `el10`, `es`, `em`),
    the level (`ma_unseen`, `el10_unseen`; `em_unseen`, `es_unseen` on QA data), with `auc_margin` every
    attack's AUC (`auc_<attack>`), the rule's (`auc`, `auc_attack`), and the verdict `forgotten` (= `stop`).
    `records` keeps the per-example values too; `epochs_to_forget` is the first forgotten epoch."""

    def __init__(self, forget: EvalSet, unseen: EvalSet, level: dict[str, float], st: Settings, *,
                 auc_margin: float | None = None, auc_attack: str = BEST, log: Callable[[str], None] | None = None):
        if forget.kind != unseen.kind:
            raise LokuError(f"the forget set holds {forget.kind} but the unseen set {unseen.path} holds "
                            f"{unseen.kind}: the never-seen set must be of the same kind")
        if auc_attack != BEST and auc_attack not in AUC_ATTACKS:
            from ..registry import unknown_choice

            raise unknown_choice("membership attack", auc_attack, (BEST, *AUC_ATTACKS))
        self.forget, self.unseen, self.level, self.log = forget, unseen, dict(level), log
        self.metrics = METRICS[forget.kind]
        self.auc_margin, self.auc_attack = auc_margin, auc_attack
        self.st = settings_for(st, auc_margin)
        self.records: list[dict] = []
        self.epochs_to_forget: int | None = None
        self.before: dict | None = None   # the forget set's values before training (`UntilForgotten.start`)

    def values(self, forget: dict, unseen: dict | None) -> dict:
        """The epoch line from the forget (and unseen) measurements of one model."""
        n = self.st.n
        out = {_key(m, n): forget["mean"][m] for m in ("ma", "el", "es", "em") if m in forget["mean"]}
        out.update({f"{_key(m, n)}_unseen": self.level[m] for m in self.metrics})
        ok = all(below(forget["mean"][m], self.level[m]) for m in self.metrics)
        if unseen is not None:
            f, u = forget["per_example"], unseen["per_example"]
            aucs = {a: auc(f[a], u[a]) for a in AUC_ATTACKS}
            chosen = strongest(aucs) if self.auc_attack == BEST else self.auc_attack
            out.update({f"auc_{a}": v for a, v in aucs.items()})
            out.update(auc=aucs[chosen], auc_attack=chosen)
            ok = ok and abs(aucs[chosen] - 0.5) <= self.auc_margin
        out["forgotten"] = ok
        return out

    def measure(self, model) -> tuple[dict, dict | None]:
        forget = measure_set(model, self.forget, self.st)
        unseen = measure_set(model, self.unseen, dataclasses.replace(self.st, el=False)) \
            if self.auc_margin is not None else None
        return forget, unseen

    def __call__(self, epoch: int, model) -> dict:
        forget, unseen = self.measure(model)
        values = self.values(forget, unseen)
        if values["forgotten"] and self.epochs_to_forget is None:
            self.epochs_to_forget = epoch
        self.records.append({"epoch": epoch, **values, "seconds": forget["seconds"] + (unseen or {}).get("seconds", 0),
                             "per_example": forget["per_example"]})
        if self.log:
            self.log(f"epoch {epoch}: {describe(values, self.st.n)}")
        return {**values, "stop": values["forgotten"]}

    def keys(self) -> list[str]:
        """The names `__call__` adds to an epoch line (besides "stop")."""
        n, measured = self.st.n, ("es", "em") + (("ma", "el") if self.forget.kind == "text" else ())
        keys = [_key(m, n) for m in measured] + [f"{_key(m, n)}_unseen" for m in self.metrics]
        if self.auc_margin is not None:
            keys += [f"auc_{a}" for a in AUC_ATTACKS] + ["auc", "auc_attack"]
        return keys + ["forgotten"]

    def summary(self, history: list[dict]) -> dict:
        """The run's account of the rule from its epoch lines (`history`, also after a resume): the level, the
        first forgotten epoch (None: not within the run's epochs), and the last epoch's values."""
        keys = self.keys()
        lines = [{"epoch": h["epoch"], **{k: h[k] for k in keys if k in h}} for h in history if "forgotten" in h]
        first = next((ln["epoch"] for ln in lines if ln["forgotten"]), None)
        return {"rule": self.rule(), "level": {_key(m, self.st.n): v for m, v in self.level.items()},
                "unseen": self.unseen.describe(), "forget": self.forget.describe(), "before": self.before,
                "epochs_to_forget": first, "forgotten": first is not None, "epochs_run": len(history),
                "final": lines[-1] if lines else None, "epochs": lines}

    def save(self, out, history: list[dict]) -> None:
        """The summary as `out`/until_forgotten.json."""
        from ..io import write_json

        write_json(Path(out) / FILE, self.summary(history))

    def rule(self) -> str:
        names = " and ".join(_key(m, self.st.n).upper() for m in self.metrics)
        text = f"mean {names} of the forget set below their means on the unseen set before training (TDEC)"
        if self.auc_margin is not None:
            which = "every membership attack's AUC" if self.auc_attack == BEST else f"the {self.auc_attack} AUC"
            text += f"; {which} (forget vs unseen, this epoch's model) within {self.auc_margin:g} of 0.5"
        return text


def describe(values: dict, n: int = 10) -> str:
    """One line: each measure against its level, the AUC against its margin, the verdict."""
    parts = []
    for key in ("ma", f"el{n}", "em", "es"):
        if f"{key}_unseen" in values:
            parts.append(f"{key.upper()} {100 * values[key]:.2f} % (never-seen {100 * values[key + '_unseen']:.2f} %)")
    if "auc" in values:
        parts.append(f"AUC {values['auc']:.3f} ({values['auc_attack']})")
    return ", ".join(parts) + ("  -> forgotten" if values["forgotten"] else "")


@dataclass
class UntilForgotten:
    """The inputs of `--until forgotten`, read (and checked) before any model loads."""

    forget: list[dict]
    unseen: list[dict]
    forget_path: str
    unseen_path: str

    @classmethod
    def read(cls, cfg, forget: list | None = None) -> "UntilForgotten":
        """From an UnlearnConfig (`until`, `unseen`, `forget`, `text_column`); `forget` (strings or QA dicts)
        replaces cfg.forget as in `loku.train.unlearn`. The forget examples are the originals (IdK's refusals
        replace the answers only for training)."""
        if not cfg.unseen:
            raise LokuError("--until forgotten compares the forget set with text the model never saw: pass "
                            "--unseen FILE (text of the same kind, e.g. a held-out split)")
        if forget is not None:
            examples = [{"text": x} if isinstance(x, str) else dict(x) for x in forget]
            path = "forget (in memory)"
        else:
            examples, path = read_examples(cfg.forget, cfg.text_column, "forget"), cfg.forget
        unseen = read_examples(cfg.unseen, cfg.text_column, "unseen")
        if examples and kind_of(examples) != kind_of(unseen):
            words = {"text": "plain text", "qa": "question/answer pairs"}
            raise LokuError(f"--unseen {cfg.unseen} holds {words[kind_of(unseen)]} but the forget set holds "
                            f"{words[kind_of(examples)]}: the never-seen set must be of the same kind")
        return cls(examples, unseen, str(path), str(cfg.unseen))

    def start(self, cfg, model, tokenizer, log: Callable[[str], None] | None = print,
              n: int = 10) -> StopAtNeverSeen:
        """Tokenize both sets (as `loku audit` does, cut to cfg.max_length) and measure `model` BEFORE training:
        the never-seen level on the unseen set, and the forget set's starting values (`rule.before`)."""
        sets = {name: build_set(name, path, ex, tokenizer, max_tokens=cfg.max_length, n=n,
                                prompt_format=cfg.prompt_format)
                for name, path, ex in (("forget", self.forget_path, self.forget),
                                       ("unseen", self.unseen_path, self.unseen))}
        st = settings_for(Settings(n=n, pad_id=pad_id(tokenizer)), cfg.until_auc_margin)
        unseen = measure_set(model, sets["unseen"], st)   # EL_n of the unseen set: only here, once
        level = {m: unseen["mean"][m] for m in METRICS[sets["unseen"].kind]}
        rule = StopAtNeverSeen(sets["forget"], sets["unseen"], level, st, auc_margin=cfg.until_auc_margin,
                               auc_attack=cfg.until_auc_attack, log=log)
        forget = measure_set(model, sets["forget"], st)
        rule.before = rule.values(forget, unseen if cfg.until_auc_margin is not None else None)
        if log:
            log(f"--until forgotten: {len(sets['forget'])} forget vs {len(sets['unseen'])} unseen examples; "
                f"before training: {describe(rule.before, n)}")
        return rule


def verdict_line(history: list[dict], cap: int, n: int = 10) -> str:
    """What `loku unlearn --until forgotten` prints at the end, from the run's epoch lines."""
    lines = [h for h in history if "forgotten" in h]
    if not lines:
        return "--until forgotten: no epoch was measured"
    first = next((h for h in lines if h["forgotten"]), None)
    if first is not None:
        return f"forgotten at epoch {first['epoch']}: {describe(first, n).removesuffix('  -> forgotten')}"
    return (f"not forgotten within {cap} epochs (the cap): {describe(lines[-1], n)}; raise --epochs or --lr")
