"""What `loku audit` measures and how: one config dataclass, its fields' help text in their metadata (the CLI
flags and YAML keys are generated from them, `loku.commands.options`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import Config, setting
from ..data.qa import DEFAULT_PROMPT_FORMAT, PROMPT_FORMAT_HELP, PROMPT_FORMATS
from ..errors import LokuError

ATTACK_NAMES = ("quantize", "relearn", "paraphrase")
EL_MODES = ("all", "before", "none")


def _f(default, help: str, group: str | None = None, **meta):
    """`setting` with list defaults copied per instance."""
    meta = meta | ({"group": group} if group else {})
    if isinstance(default, list):
        return setting(help=help, factory=lambda d=default: list(d), **meta)
    return setting(default, help, **meta)


@dataclass
class AuditConfig(Config):
    """One audit: an unlearned model, its forget set and never-seen text of the same kind, the attacks to run."""

    model: str = _f("", "The unlearned model: hub id, local folder, .gguf file or 'smollm2-135m' (with --adapter: "
                        "the base the adapter belongs to).", "Models")
    adapter: str | None = _f(None, "A PEFT adapter folder applied to --model (e.g. RUN/adapter of `loku unlearn`).",
                             "Models")
    original: str | None = _f(None, "The model before unlearning: recovery fractions (attacked - unlearned) / "
                                    "(original - unlearned) are reported when given.", "Models")
    reference: str | None = _f(None, "A model that never saw the forget set (e.g. the pretrained base before "
                                     "fine-tuning): enables the reference membership attack.", "Models")
    forget: str = _f("", "The data that was to be forgotten (.csv/.jsonl/.txt text, or QA .json/.jsonl).", "Data")
    unseen: str = _f("", "Text of the same kind the model never saw: the never-seen level the forget set is "
                         "compared with (TOFU: a holdout split).", "Data")
    retain: str | None = _f(None, "Data the model should keep: measured beside the forget set (no verdict).",
                            "Data")
    text_column: str = _f("text", "CSV/JSONL column holding the text.", "Data")
    prompt_format: str = _f(DEFAULT_PROMPT_FORMAT, PROMPT_FORMAT_HELP + " QA data only; use the one the model "
                                                                    "was trained with.", "Data",
                            choices=PROMPT_FORMATS, kind="prompt format")
    rows: int | None = _f(None, "Use the first N examples of each set.", "Data")
    max_tokens: int = _f(200, "Cut each text to this many tokens (TDEC: 200), QA prompt + answer likewise.",
                         "Data")
    n: int = _f(10, "n of extraction likelihood EL_n.", "Metrics")
    k: float = _f(0.4, "Share of lowest-probability tokens for Min-K% and Min-K%++.", "Metrics")
    el: str = _f("before", "Where EL_n is computed: all (also after every attack), before (the models before "
                           "attacks: unlearned, original), none. EL_n decodes every prefix's greedy continuation: "
                           "on text the model does not know, ~T^2/2 tokens a sequence, by far the slowest metric.",
                  "Metrics", choices=EL_MODES, kind="--el mode")
    attacks: list[str] = _f([], "Attacks to run, comma-separated: quantize, relearn, paraphrase.", "Attacks")
    quantizers: list[str] = _f(["int8", "int4", "int4-g128", "int4-g64", "nf4"],
                               "Quantizers: intB (per channel), intB-gG (groups of G), nf4 (bitsandbytes, block 64), "
                               "nf4-bB.", "Attacks")
    quantize_modes: list[str] | None = _f(None, "merged (adapter merged, then quantized) and/or base (adapter in "
                                                "full precision on a quantized base); default: both with --adapter, "
                                                "else merged.", "Attacks")
    quantize_head: bool = _f(False, "Also quantize the output head (and an input embedding tied to it).", "Attacks")
    quantize_embeddings: bool = _f(False, "Also quantize the input embeddings.", "Attacks")
    relearn_steps: list[int] = _f([0, 10, 25, 50], "Relearning budgets in optimizer steps; each is its own "
                                                   "fine-tune from the unlearned model.", "Attacks")
    relearn_lr: float = _f(1e-4, "Relearning learning rate (AdamW, linear decay over the steps).", "Attacks")
    relearn_batch_size: int = _f(4, "Relearning examples per step.", "Attacks")
    relearn_fraction: float = _f(0.5, "Share of the forget set the attacker relearns on; the rest is held out.",
                                 "Attacks")
    relearn_data: str | None = _f(None, "Related text (not the forget set) to relearn on as a second attack.",
                                  "Attacks")
    paraphrase_kinds: list[str] | None = _f(None, "Prefix perturbations for text: retokenize, case, whitespace, "
                                                  "punctuation (default all); QA data uses paraphrased_question.",
                                            "Attacks")
    prefix_fraction: float = _f(0.5, "Share of each text given as the probe's prefix (the rest is scored).",
                                "Attacks")
    perturb_rate: float = _f(0.15, "Probability that a perturbation touches each eligible character/word.",
                             "Attacks")
    bootstrap: int = _f(1000, "Bootstrap resamples for the 95% intervals.", "Verdict")
    confidence: float = _f(0.95, "Confidence level of the intervals.", "Verdict")
    tolerance: float = _f(0.0, "A metric is indistinguishable when its interval reaches within this distance of "
                               "the never-seen level (0: the interval must contain it).", "Verdict")
    seed: int = _f(0, "Seed of the bootstrap, the forget-set split, probe perturbations and relearning.", "Verdict")
    batch_size: int = _f(8, "Sequences per forward pass.", "Metrics")
    decode_batch_size: int = _f(64, "Greedy branches decoded together for EL_n.", "Metrics")
    out: str = _f("", "New directory for audit.json, audit.md and audit.png.", "Output")
    overwrite: bool = _f(False, "Replace a non-empty --out directory.", "Output")
    resume: bool = _f(False, "Reuse the finished parts of an interrupted audit in --out (same settings).", "Output")
    trust_remote_code: bool = _f(False, "Allow model code from the hub.", "Models")
    allow_pickle: bool = _f(False, "Allow pickle (.bin) weights.", "Models")

    def check(self):
        for name in ("model", "forget", "unseen"):
            if not getattr(self, name):
                raise LokuError(f"no --{name} given: pass --{name} "
                                + {"model": "MODEL (the unlearned model, or the base with --adapter)",
                                   "forget": "FILE (the data that was to be forgotten)",
                                   "unseen": "FILE (text of the same kind the model never saw)"}[name])
        for name in ("max_tokens", "n", "bootstrap", "batch_size", "decode_batch_size", "relearn_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LokuError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.rows is not None and (not isinstance(self.rows, int) or self.rows < 1):
            raise LokuError(f"rows must be a positive integer, got {self.rows!r}")
        if self.max_tokens < self.n + 1:
            raise LokuError(f"--max-tokens {self.max_tokens} is too short for EL_{self.n}: use at least {self.n + 1}")
        for name in ("k", "relearn_fraction", "prefix_fraction", "perturb_rate", "confidence"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise LokuError(f"{name.replace('_', '-')} must be between 0 and 1, got {value!r}")
        if not self.tolerance >= 0:
            raise LokuError(f"tolerance must be >= 0, got {self.tolerance!r}")
        self.attacks = _names(self.attacks)
        for a in self.attacks:
            if a not in ATTACK_NAMES:
                from ..registry import unknown_choice

                raise unknown_choice("attack", a, ATTACK_NAMES)
        from ..attacks.paraphrase import QA_KIND, TEXT_KINDS
        from ..attacks.quantize import MODES, parse_quantizer
        from ..attacks.relearn import RelearnSettings, check_steps

        self.quantizers = _names(self.quantizers)
        for q in self.quantizers:
            parse_quantizer(q)
        if "quantize" in self.attacks and not self.quantizers:
            raise LokuError("the quantize attack needs at least one quantizer: e.g. --quantizers int4,nf4")
        if self.quantize_modes is not None:
            self.quantize_modes = _names(self.quantize_modes)
            for m in self.quantize_modes:
                if m not in MODES:
                    from ..registry import unknown_choice

                    raise unknown_choice("quantization mode", m, MODES)
            if "base" in self.quantize_modes and not self.adapter:
                raise LokuError("quantize mode 'base' keeps an adapter in full precision on a quantized base: pass "
                                "--adapter, or use --quantize-modes merged")
        self.relearn_steps = list(check_steps(self.relearn_steps if not isinstance(self.relearn_steps, str)
                                              else _names(self.relearn_steps)))
        RelearnSettings(lr=self.relearn_lr, batch_size=self.relearn_batch_size)  # checks them
        if self.paraphrase_kinds is not None:
            self.paraphrase_kinds = _names(self.paraphrase_kinds)
            for kind in self.paraphrase_kinds:
                if kind not in TEXT_KINDS + (QA_KIND,):
                    from ..registry import unknown_choice

                    raise unknown_choice("paraphrase kind", kind, TEXT_KINDS + (QA_KIND,))
        if not self.out:
            raise LokuError("no output directory given: pass --out DIR (a new directory)")
        if self.resume and self.overwrite:
            raise LokuError("--resume continues the audit in --out and --overwrite replaces it: pass one of them")

    @property
    def modes(self) -> list[str]:
        return self.quantize_modes or (["merged", "base"] if self.adapter else ["merged"])

    def fingerprint(self) -> dict:
        """The settings the stored parts of an audit depend on (not where it is written or how it resumes)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("out", "overwrite", "resume")}


def _names(value) -> list[str]:
    """A comma-separated string or a list of names -> list of stripped names (empty strings dropped)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(x).strip() for x in items if str(x).strip()]
