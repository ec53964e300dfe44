"""The config is the CLI: every field of every command's config (nested ones included) is reachable from its
flag `--field-name` and from the YAML key `field_name` of `--config`, and lands in the config with its type.

The commands are run through the real typer app; `build_config` is wrapped so that the config a command
would run with is captured and the command stops there (nothing is loaded or trained).
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
import typer
import yaml

import loku.commands.options as options
from loku.cli import app
from loku.config_base import base_type, flat_fields, hints, meta, nested_type
from conftest import run_cli

# command -> the options a config of it needs before its own checks pass (required inputs)
COMMANDS = {
    ("unlearn",): [],
    ("fisher",): [],
    ("tdec", "run"): ["--forget", "f.csv"],
    ("tdec", "thresholds"): ["--data", "h.txt"],
    ("tdec", "utility"): ["--out", "u"],
    ("tofu", "eval"): ["--model", "m", "--out", "o"],
    ("tofu", "aggregate"): ["ckpt.json", "retain.json"],
    ("tofu", "finetune"): [],
    ("tofu", "unlearn"): [],
    ("demo",): [],
    ("muse", "eval"): [],
    ("muse", "aggregate"): ["model.json", "retrain.json"],
    ("muse", "unlearn"): [],
    ("wmdp", "eval"): [],
    ("audit",): ["--model", "m", "--forget", "f.csv", "--unseen", "u.csv", "--out", "o"],
}
# Values a field's own checks accept (the generic choice below would not): field -> (flag text, value)
SPECIAL = {"method": ("npo", "npo"), "methods": ("ga,npo", ["ga", "npo"]), "init": ("vila", "vila"),
           "split": ("forget05", "forget05"), "qa_per_author": ("7", 7), "authors": ("20", 20),
           "corpus": ("books", "books"), "convention": ("open-unlearning", "open-unlearning"),
           "metrics": ("verbmem_f,privleak", ["verbmem_f", "privleak"]), "min_k": ("0.2", 0.2),
           "tasks": ("wmdp_bio,mmlu", ["wmdp_bio", "mmlu"]),
           "attacks": ("quantize,relearn", ["quantize", "relearn"]), "quantizers": ("int4,nf4", ["int4", "nf4"]),
           "quantize_modes": ("merged", ["merged"]), "relearn_steps": ("0,5", [0, 5]),
           "paraphrase_kinds": ("case", ["case"]), "k": ("0.2", 0.2), "relearn_fraction": ("0.3", 0.3),
           "prefix_fraction": ("0.3", 0.3), "perturb_rate": ("0.3", 0.3), "confidence": ("0.9", 0.9)}
# Settings another field needs to be valid alongside: field -> {YAML key: value} (given as flags too)
UNTIL = {"until": {"unseen": "u.csv"}, "unseen": {"until": "forgotten"},   # the stop rule's fields go together
         "until_auc_margin": {"until": "forgotten", "unseen": "u.csv"},
         "until_auc_attack": {"until": "forgotten", "unseen": "u.csv", "until_auc_margin": 0.1}}
COMPANIONS = {("tdec", "run"): {"grad_accum": {"full_batch": False}},
              ("wmdp", "eval"): {"num_fewshot": {"tasks": ["mmlu"]}},   # WMDP itself is zero-shot only
              **{cmd: UNTIL for cmd in (("unlearn",), ("tofu", "unlearn"), ("muse", "unlearn"))}}


def companion_flags(command, name) -> list[str]:
    flags = []
    for key, value in COMPANIONS.get(command, {}).get(name, {}).items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            flags += [f"--{'' if value else 'no-'}{flag}"]
        else:
            flags += [f"--{flag}", ",".join(value) if isinstance(value, list) else str(value)]
    return flags


class Captured(Exception):
    pass


@pytest.fixture()
def capture(monkeypatch):
    """Runs `loku ARGS` up to the config it builds; returns that config."""
    real = options.build_config

    def spy(*args, **kwargs):
        raise Captured(real(*args, **kwargs)[0])

    monkeypatch.setattr(options, "build_config", spy)

    def run(args):
        with pytest.raises(Captured) as got:
            app(args=[str(a) for a in args], standalone_mode=False, prog_name="loku")
        return got.value.args[0]
    return run


def command_class(path: tuple[str, ...]):
    group = app
    for name in path[:-1]:
        group = next(g.typer_instance for g in group.registered_groups if g.name == name)
    cmd = next(c for c in group.registered_commands
               if (c.name or c.callback.__name__.rstrip("_")) == path[-1])
    return cmd.callback.config_class


def value_for(cls, path: tuple[str, ...]):
    """(flag text, the value it must become) for a field: unlike its default, inside its bounds and choices."""
    owner = cls
    for part in path[:-1]:
        owner = nested_type(owner, part)
    name = path[-1]
    tp, _ = base_type(hints(owner)[name])
    origin = typing.get_origin(tp) or tp
    m = meta(owner, name)
    f = owner.__dataclass_fields__[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if "choices" in m:
        choice = next(c for c in m["choices"] if c != default)
        return choice, choice
    if name in SPECIAL and (origin is list) == isinstance(SPECIAL[name][1], list):
        return SPECIAL[name]
    if origin is bool:
        return None, not default
    if origin is int:
        return str((default or 0) + 3), (default or 0) + 3
    if origin is float:
        return str((default or 0.0) * 2 + 0.5), (default or 0.0) * 2 + 0.5
    if origin is list:
        return "q_proj,v_proj", ["q_proj", "v_proj"]
    if origin is dict:
        return "{note: first try}", {"note": "first try"}
    return f"x-{name}", f"x-{name}"


def get(cfg, path):
    for part in path:
        cfg = getattr(cfg, part)
    return cfg


def fields_of(path: tuple[str, ...]):
    cls = command_class(path)
    return cls, list(flat_fields(cls).items())


CASES = [(cmd, name) for cmd in COMMANDS for name in flat_fields(command_class(cmd))]


@pytest.mark.parametrize("command,name", CASES, ids=[f"{' '.join(c)}:{n}" for c, n in CASES])
def test_every_field_from_its_flag(command, name, capture):
    cls = command_class(command)
    path = flat_fields(cls)[name]
    text, expected = value_for(cls, path)
    owner_meta = meta(cls if len(path) == 1 else nested_type(cls, path[0]), path[-1])
    if owner_meta.get("positional"):
        first = list(flat_fields(cls))[0] == name   # the first positional argument
        args = [*command, *([text] + COMMANDS[command][1:] if first else [COMMANDS[command][0], text])]
    elif text is None:   # a boolean: --x or --no-x
        args = [*command, *COMMANDS[command], f"--{'' if expected else 'no-'}{name.replace('_', '-')}"]
    else:
        args = [*command, *COMMANDS[command], f"--{name.replace('_', '-')}", text]
    args += companion_flags(command, name)
    cfg = capture(args)
    value = get(cfg, path)
    assert value == expected and type(value) is type(expected), (name, value, expected)


@pytest.mark.parametrize("command,name", CASES, ids=[f"{' '.join(c)}:{n}" for c, n in CASES])
def test_every_field_from_its_yaml_key(command, name, capture, tmp_path):
    cls = command_class(command)
    path = flat_fields(cls)[name]
    if command == ("fisher",) and len(path) == 1:
        pytest.skip("loku fisher --config reads the unlearning run's YAML (the statistics must match that run); "
                    "--method/--out/--overwrite of the statistics themselves are flags")
    _, expected = value_for(cls, path)
    required = dict(zip(COMMANDS[command][::2], COMMANDS[command][1::2]))
    data = {k.lstrip("-").replace("-", "_"): v for k, v in required.items() if k.startswith("--")}
    positional = [f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")]
    data.update(zip(positional, COMMANDS[command]))
    data[name] = expected
    data.update(COMPANIONS.get(command, {}).get(name, {}))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = capture([*command, "--config", config])
    value = get(cfg, path)
    assert value == expected and type(value) is type(expected), (name, value, expected)


def test_flags_override_yaml_and_nested_mappings_are_read(capture, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"forget": "f.csv", "lr": 0.01, "unlearn": {"lora_rank": 4, "epochs": 3}}))
    cfg = capture(["tdec", "run", "--config", config, "--epochs", "7"])
    assert (cfg.unlearn.lr, cfg.unlearn.lora_rank, cfg.unlearn.epochs) == (0.01, 4, 7)
    assert cfg.unlearn.model == cfg.model   # tdec sets the run's model itself
    cfg = capture(["tdec", "run", "--forget", "f.csv"])   # tdec's own default for a nested field
    assert cfg.unlearn.epochs == 10 and cfg.full_batch is True
    config.write_text(yaml.safe_dump({"lora_rank": 4, "method": "ga", "out": "runs/x"}))
    cfg = capture(["fisher", "--config", config, "--lora-rank", "2", "--method", "vila", "--out", "f.safetensors"])
    assert (cfg.run.lora_rank, cfg.run.method, cfg.run.out) == (2, "ga", "runs/x")
    assert (cfg.method, cfg.out) == ("vila", "f.safetensors")


def test_nested_configs_expose_every_inner_field_but_those_the_outer_sets():
    from loku.config import UnlearnConfig
    from loku.tdec import TdecConfig
    from loku.tofu import TofuUnlearnConfig

    inner = {f.name for f in dataclasses.fields(UnlearnConfig)}
    for cls, name in ((TdecConfig, "unlearn"), (TofuUnlearnConfig, "train")):
        reachable = {n for n, p in flat_fields(cls).items() if p[0] == name}
        outer = {f.name for f in dataclasses.fields(cls)}
        hidden = set(meta(cls, name).get("hide", ()))
        assert reachable == inner - outer - hidden, cls
    assert {"grad_accum", "warmup_steps", "npo_beta", "simnpo_margin", "kl_reduction", "idk_pooling",
            "forget_weight", "fisher_on_cpu"} <= {n for n, p in flat_fields(TdecConfig).items() if p[0] == "unlearn"}


@pytest.mark.parametrize("args,path,expected", [
    (["unlearn", "--full"], ("lora",), False),
    (["fisher", "--full"], ("run", "lora"), False),
    (["tdec", "run", "--forget", "f.csv", "--full"], ("unlearn", "lora"), False),
    (["tdec", "run", "--forget", "f.csv", "--no-utility"], ("utility",), False),
    (["tdec", "run", "--forget", "f.csv", "--no-save"], ("save",), False),
    (["tdec", "run", "--forget", "f.csv", "--utility-before"], ("utility_before",), True),
    (["tofu", "unlearn", "--full"], ("train", "lora"), False),
    (["tofu", "unlearn", "--method", "npo"], ("methods",), ["npo"]),
    (["tofu", "unlearn", "--no-eval-target"], ("eval_target",), False),
    (["tofu", "unlearn", "--limit", "0"], ("limit",), None),
    (["tofu", "aggregate", "a", "b", "--json"], ("as_json",), True),
    (["demo", "--quick"], ("n_forget",), 4),
    (["demo", "--quick", "--n-forget", "5"], ("n_forget",), 5),   # 6 is the default now
])
def test_flags_users_have_today_still_work(args, path, expected, capture):
    assert get(capture(args), path) == expected


def test_yaml_key_that_changed_meaning_says_what_to_write(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("forget: f.csv\nmethod: simnpo\nsimnpo_gamma: 0.125\n")
    code, _, err = run_cli(["unlearn", "--config", config], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1
    assert "simnpo_gamma" in lines[0] and "simnpo_margin" in lines[0] and "forget_weight" in lines[0]


def test_help_groups_the_options(capsys):
    code, out, _ = run_cli(["unlearn", "--help"], capsys)
    assert code == 0
    panels = [line.strip("╭─ ").split(" ─")[0] for line in out.splitlines() if line.startswith("╭─")]
    assert panels[1:] == ["Data", "Model", "LoRA", "Training", "Method settings", "Output", "Stop rule"], panels
    code, out, _ = run_cli(["tdec", "run", "--help"], capsys)
    assert "--grad-accum" in out and "--full-batch" in out and "--simnpo-margin" in out


def test_a_new_command_is_a_config_and_a_thin_function():
    """What INTERFACES.md asks of a new command: a config dataclass with help in its fields, one decorator."""
    from loku.config_base import Config, setting
    from loku.commands.options import config_command

    @dataclasses.dataclass
    class AuditConfig(Config):
        run: str = setting("", "A finished loku run directory.", group="Data")
        relearn_steps: int = setting(20, "Steps of the relearning attack.", group="Training", bound="positive")

    sub = typer.Typer()
    seen = []

    @sub.command("audit")
    @config_command(AuditConfig)
    def audit(cfg: AuditConfig):
        seen.append(cfg)

    sub(args=["--run", "runs/x", "--relearn-steps", "5"], standalone_mode=False)
    assert seen == [AuditConfig(run="runs/x", relearn_steps=5)]
