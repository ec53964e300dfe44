"""The unlearning run's configuration: validated on construction; YAML is only its saved form.

Its fields are the flags of `loku unlearn` (`lora_rank` <-> `--lora-rank`) and the keys of its YAML; each
method's own settings are added from the method registry as `<method>_<setting>` (`npo_beta`,
`simnpo_margin`, ...; see `loku.methods`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config_base import PRECISION_HELP, PRECISIONS, Config, setting
from .data.qa import DEFAULT_PROMPT_FORMAT, PROMPT_FORMAT_HELP, PROMPT_FORMATS
from .errors import LokuError
from .inits import INITS
from .methods import METHODS, setting_fields

DATA, MODEL, LORA, TRAINING, METHOD, OUTPUT = "Data", "Model", "LoRA", "Training", "Method settings", "Output"
STOP = "Stop rule"
UNTIL_AUC_ATTACKS = ("best", "loss", "zlib", "min_k", "min_k_plus_plus")   # = loku.audit.stop's (tested)


def with_method_settings(cls):
    """Adds every registered method's settings to the class as `<method>_<setting>` fields (before
    @dataclass turns them into fields): one place declares a setting, the config and the CLI follow."""
    for key, tp, f in setting_fields():
        cls.__annotations__[key] = tp
        setattr(cls, key, f)
    return cls


@dataclass
@with_method_settings
class UnlearnConfig(Config):
    """Everything one unlearning run needs; `loku unlearn` flags and YAML keys share these names."""

    forget: str = setting("", "Data to forget: .csv, .jsonl, .json (QA) or .txt.", group=DATA)
    retain: str | None = setting(None, "Data to keep (used by every method but ga; when one needs it and none is "
                                 "given: loku's built-in general text, builtin:wikitext-2).", group=DATA)
    allow_overlap: bool = setting(False, "Train even when forget and retain share examples (refused by default: "
                                  "the model cannot both forget and keep them).", group=DATA)
    model: str = setting("smollm2-135m", "Hub id, local model directory, .gguf file, or 'smollm2-135m'.", group=MODEL)
    out: str = setting("", "New directory for the adapter, config and metrics.", group=OUTPUT)
    method: str = setting("ihl", "Unlearning method (see `loku list methods`).", group=METHOD)
    text_column: str = setting("text", "CSV/JSONL column holding the text.", group=DATA)
    prompt_format: str = setting(DEFAULT_PROMPT_FORMAT, PROMPT_FORMAT_HELP, group=DATA, choices=PROMPT_FORMATS,
                                 kind="prompt format")
    refusals: str | None = setting(None, "idk: file of refusal answers, one a line (default: built-in ones).",
                                   group=DATA)
    max_length: int = setting(256, "Tokens per example; longer ones are cut.", group=DATA, bound="positive")
    lora: bool = setting(True, "Train LoRA adapters (--full or --no-lora: full fine-tuning).", group=LORA,
                         off_flag="--full")
    lora_rank: int = setting(8, "LoRA rank.", group=LORA, bound="positive")
    lora_alpha: float | None = setting(None, "LoRA alpha (scaling alpha / rank).", group=LORA, bound="positive",
                                       default_text="2 x rank", example=16)
    lora_targets: list[str] | None = setting(None, "Modules that get adapters, comma-separated "
                                             "(e.g. q_proj,v_proj).", group=LORA,
                                             default_text="every linear layer but the output head")
    init: str = setting("auto", f"LoRA init: auto (the method's: fila for ihl), {', '.join(INITS.names())}.",
                        group=LORA)
    fisher_eps: float = setting(1e-5, "FILA: eps in F_forget / (eps + F_retain).", group=LORA, bound="positive")
    fila_svd: str = setting("exact", "FILA's SVD: exact, or randomized (much faster on large layers).", group=LORA,
                            choices=("exact", "randomized"))
    fisher_cache: str | None = setting(None, "Fisher statistics file (`loku fisher`): reused when it matches.",
                                       group=LORA)
    fisher_on_cpu: bool = setting(False, "FILA's two fp32 Fisher sums in CPU memory (large models on one GPU).",
                                  group=LORA)
    epochs: int = setting(5, "Passes over the forget set.", group=TRAINING, bound="positive")
    lr: float = setting(2e-4, "Peak learning rate (AdamW, linear decay).", group=TRAINING, bound="positive")
    batch_size: int = setting(8, "Forget examples per micro-batch (all processes together).", group=TRAINING,
                              bound="positive")
    retain_batch_size: int | None = setting(None, "Retain examples per micro-batch.", group=TRAINING,
                                            bound="positive", default_text="--batch-size")
    retain_every_step: int = setting(0, "The first N retain examples join every retain batch (the data the "
                                     "forget steps threaten most, e.g. records like the forgotten ones); the rest "
                                     "of each batch streams through the other retain examples.", group=TRAINING,
                                     bound="non-negative", default_text="0: every retain example streams")
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", group=TRAINING, bound="positive")
    warmup_steps: int = setting(0, "Linear warmup, in optimizer steps.", group=TRAINING, bound="non-negative")
    weight_decay: float = setting(0.0, "AdamW weight decay.", group=TRAINING, bound="non-negative")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0: no clipping).", group=TRAINING,
                                   bound="non-negative")
    divergence_bound: float = setting(20.0, "Ascent methods: forget cross-entropy (nats) past which a run is "
                                      "reported diverged.", group=TRAINING, bound="positive")
    seed: int = setting(0, "Seed of the batch order and initialisation.", group=TRAINING)
    mixed_precision: str | None = setting(None, PRECISION_HELP, group=TRAINING, choices=PRECISIONS,
                                          default_text="the launch configuration's, else no")
    forget_weight: float | None = setting(None, "Coefficient of the forget term.", group=METHOD, bound="non-negative",
                                          default_text="the method's: 0.125 for simnpo, 0.1 for satimp, else 1", example=1)
    retain_weight: float = setting(1.0, "Coefficient of the retain term.", group=METHOD, bound="non-negative")
    until: str | None = setting(None, "forgotten: stop after the first epoch at which the forget set is at the "
                                "never-seen level of --unseen (mean MA and EL10 below the model's on --unseen before "
                                "training, as TDEC; EM and ES for question/answer data); --epochs is the cap.",
                                group=STOP, choices=("forgotten",), default_text="train all --epochs")
    unseen: str | None = setting(None, "--until forgotten: data of the same kind as --forget that the model never "
                                 "saw (e.g. a held-out split).", group=STOP)
    until_auc_margin: float | None = setting(None, "--until forgotten also waits until the membership AUC "
                                             "(forget vs --unseen, measured each epoch) is within this margin of "
                                             "0.5, e.g. 0.1.", group=STOP, bound="positive", default_text="off",
                                             example=0.1)
    until_auc_attack: str = setting("best", "Membership attack of --until-auc-margin: best (each epoch the one "
                                    "farthest from 0.5, so all must pass), loss, zlib, min_k, min_k_plus_plus.",
                                    group=STOP, choices=UNTIL_AUC_ATTACKS, kind="membership attack")
    save_merged: bool = setting(False, "Also write the merged model (safetensors).", group=OUTPUT)
    overwrite: bool = setting(False, "Replace a non-empty --out directory.", group=OUTPUT)
    trust_remote_code: bool = setting(False, "Run the model repository's own code.", group=MODEL)
    allow_pickle: bool = setting(False, "Allow pickle (.bin) weights.", group=MODEL)
    save_every: int = setting(0, "Also checkpoint every N steps (0: each epoch only).", group=OUTPUT,
                              bound="non-negative")
    extra: dict = setting(help="Free-form notes carried into the saved config (a YAML mapping).", group=OUTPUT,
                          factory=dict)

    RENAMED = {"simnpo_gamma": "it was a margin inside the log-sigmoid; write simnpo_margin (the margin delta, "
                               "default 0) and forget_weight (SimNPO's gamma, default 0.125)"}

    def check(self):
        method = METHODS[self.method]  # raises with "did you mean"
        if method.check is not None:
            method.check(method.settings_of(self), self)
        if self.init != "auto":
            INITS[self.init]  # raises with "did you mean"
        if self.init not in ("auto", "default") and not self.lora:
            raise LokuError(f"--init {self.init} initialises LoRA adapters: drop --full or use --init default")
        self.check_until()
        retain_batch = self.retain_batch_size or self.batch_size
        if self.retain_every_step and self.retain_every_step >= retain_batch:
            raise LokuError(f"--retain-every-step {self.retain_every_step} leaves no room in a retain batch of "
                            f"{retain_batch} for the streamed examples: pass --retain-batch-size above "
                            f"{self.retain_every_step}, or a smaller --retain-every-step")
        if self.lora_targets is not None and not self.lora_targets:
            raise LokuError("lora_targets is empty: name at least one module (e.g. q_proj,v_proj), or leave it "
                            "out for every linear layer")

    def check_until(self):
        if self.until is None:
            given = [flag for flag, on in (("--unseen", self.unseen),
                                           ("--until-auc-margin", self.until_auc_margin is not None),
                                           ("--until-auc-attack", self.until_auc_attack != "best")) if on]
            if given:
                raise LokuError(f"{given[0]} belongs to the stop rule: add --until forgotten"
                                + ("" if self.unseen else " and --unseen FILE"))
            return
        if not self.unseen:
            raise LokuError("--until forgotten compares the forget set with data the model never saw: pass "
                            "--unseen FILE (of the same kind as --forget, e.g. a held-out split)")
        if self.until_auc_margin is not None and not self.until_auc_margin <= 0.5:
            raise LokuError(f"until-auc-margin is a distance from AUC 0.5, at most 0.5, got "
                            f"{self.until_auc_margin!r}: pass e.g. --until-auc-margin 0.1")
        if self.until_auc_attack != "best" and self.until_auc_margin is None:
            raise LokuError("--until-auc-attack chooses the attack of --until-auc-margin: add --until-auc-margin M "
                            "(e.g. 0.1)")

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def resolved_init(self) -> str:
        if not self.lora:
            return "none"
        if self.init == "auto":
            return METHODS[self.method].default_init if _fila_available() else "default"
        return self.init


def _fila_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("loku.fila") is not None

