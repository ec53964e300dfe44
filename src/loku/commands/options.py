"""A command's flags generated from its config dataclass: the config is the CLI.

TRL's `TrlParser((ScriptArguments, DPOConfig))` turns dataclass fields into argparse flags and reads a YAML
file as their defaults; this does the same on typer. Each field of the config (and of a config nested in it)
becomes one option: `lora_rank: int = setting(8, "LoRA rank.", group="LoRA")` gives `--lora-rank INTEGER`
with that help, shown under the "LoRA" panel of `--help`, default 8. Booleans get `--x/--no-x`. Every
command also takes `--config FILE.yaml` whose keys are the same names; flags given override it.

A command is then a thin function of its config:

    @app.command("audit")
    @config_command(AuditConfig)
    def audit(cfg: AuditConfig):
        \"\"\"One line for --help.\"\"\"
        run_audit(cfg)

Options the function declares itself (typer.Option parameters, e.g. `resume`) are kept beside the generated
ones; a parameter named `given` receives the values set by YAML or flags (nested as the config nests them).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer
import yaml

from ..config_base import (_deep_merge, base_type, check_types, default_of, flag, flat_fields, hints, meta, nest,
                           nested_type, read_yaml)
from ..errors import LokuError


@dataclasses.dataclass
class Opt:
    """One generated option: the flat name (also the Python parameter), the field path and the parameter."""

    name: str
    path: tuple[str, ...]
    kind: Any            # the field's type without None: int, str, list, dict, ...
    parameter: inspect.Parameter

    def convert(self, value):
        """Flag text to the field's value where typer passes text (lists and mappings)."""
        origin = typing.get_origin(self.kind) or self.kind
        if origin is list:
            items = [t.strip() for t in value.split(",") if t.strip()]
            if not items:
                raise LokuError(f"{flag(self.name)} {value!r} names nothing: give a comma list such as q_proj,v_proj")
            if typing.get_args(self.kind) == (int,):
                try:
                    return [int(t) for t in items]
                except ValueError:
                    raise LokuError(f"{flag(self.name)} {value!r} is not a comma list of integers: write e.g. "
                                    f"{flag(self.name)} 0,10,25") from None
            return items
        if origin is dict:
            try:
                data = yaml.safe_load(value)
            except yaml.YAMLError:
                data = None
            if not isinstance(data, dict):
                raise LokuError(f"{flag(self.name)} {value!r} is not a YAML mapping: write e.g. "
                                f"{flag(self.name)} '{{note: first try}}'")
            return data
        return value


def field_default(cls, path: tuple[str, ...]):
    """The default a field has inside `cls` (a nested config's default comes from the outer default factory:
    `tdec run` trains 10 epochs where `unlearn` trains 5)."""
    value = default_of(cls.__dataclass_fields__[path[0]])
    for part in path[1:]:
        value = getattr(value, part)
    return value


def _owner(cls, path: tuple[str, ...]):
    for part in path[:-1]:
        cls = nested_type(cls, part)
    return cls


def _shown(default, m: dict):
    if default is None or default == "" or default == {} or default == []:
        return m.get("default_text", False)
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float):
        return f"{default:g}"
    return m.get("default_text", str(default))


# The order of --help's panels; a group not named here follows them.
GROUPS = ("Data", "Model", "LoRA", "Training", "Method settings", "Evaluation", "Output")


def options_for(cls) -> list[Opt]:
    """Every option of a config class, in field order (outer fields, then those of nested configs), grouped
    by help panel in the order of GROUPS."""
    opts = []
    for name, path in flat_fields(cls).items():
        owner = _owner(cls, path)
        kind, _ = base_type(hints(owner)[path[-1]])
        m = meta(owner, path[-1])
        default = field_default(cls, path)
        helptext = m.get("help", "")
        if "choices" in m and not all(str(c) in helptext for c in m["choices"]):
            helptext += f" One of: {', '.join(map(str, m['choices']))}."
        common = dict(help=helptext, rich_help_panel=m.get("group"), show_default=_shown(default, m))
        origin = typing.get_origin(kind) or kind
        if m.get("positional"):
            info, annotation = typer.Argument(None, metavar=name.upper(), **common), Optional[str]
        elif origin is bool:
            decls = [f"{flag(name)}/--no-{flag(name)[2:]}"] + ([f" /{m['off_flag']}"] if "off_flag" in m else [])
            info, annotation = typer.Option(None, *decls, *m.get("aliases", ()), **common), Optional[bool]
        elif origin in (list, dict):
            metavar = "A,B,..." if origin is list else "YAML"
            info = typer.Option(None, flag(name), *m.get("aliases", ()), metavar=metavar, **common)
            annotation = Optional[str]
        else:
            info = typer.Option(None, flag(name), *m.get("aliases", ()), **common)
            annotation = Optional[origin]
        opts.append(Opt(name, path, kind, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                                            annotation=annotation)))
    seen = list(dict.fromkeys(o.parameter.default.rich_help_panel for o in opts))
    rank = {g: (GROUPS.index(g) if g in GROUPS else len(GROUPS) + seen.index(g)) for g in seen}
    return sorted(opts, key=lambda o: rank[o.parameter.default.rich_help_panel])


def build_config(cls, config_path: str | Path | None, flags: dict, config_file: str | None = None):
    """`cls` from its defaults, then the YAML file, then the flags: (config, the values given)."""
    data: dict = {}
    source = "flags"
    if config_path is not None:
        source = str(config_path)
        raw = read_yaml(config_path)
        if config_file is not None:   # the file holds one nested config (loku fisher reads the run's YAML)
            check_types(nested_type(cls, config_file), raw, source)
            raw = {config_file: raw}
        else:
            check_types(cls, raw, source)
        data = nest(cls, raw, source)
    given = _deep_merge(data, nest(cls, flags, "flags"))
    return cls.from_dict(given, source=source), given


def config_command(cls, *, config_file: str | None = None,
                   config_help: str = "YAML file of these options (keys: the flag names with _ for -); "
                                      "flags given here override it.") -> Callable:
    """Decorator: the typer command's options are generated from `cls` (see the module docstring).
    `config_file`: the name of a nested config that --config fills (default: the whole config)."""
    def wrap(fn):
        sig = inspect.signature(fn)
        # The annotations of the function's own options, resolved in its module (not `cfg`'s: a config class
        # defined inside a function, as in a test, is not visible there).
        own_annotations = {n: a for n, a in fn.__annotations__.items() if n not in ("cfg", "given", "return")}
        fn_hints = typing.get_type_hints(types.SimpleNamespace(__annotations__=own_annotations),
                                         globalns=fn.__globals__)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=fn_hints.get(n, p.annotation))
               for n, p in sig.parameters.items() if n not in ("cfg", "given")]
        taken = {p.name for p in own} | {"config"}
        opts = [o for o in options_for(cls) if o.name not in taken]
        config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                   default=typer.Option(None, "--config", help=config_help))
        positional = [o.parameter for o in opts if isinstance(o.parameter.default, typer.models.ArgumentInfo)]
        options = [o.parameter for o in opts if o.parameter not in positional]

        def command(**kwargs):
            path = kwargs.pop("config", None)
            flags = {o.name: o.convert(kwargs.pop(o.name)) for o in opts if kwargs.get(o.name) is not None}
            for o in opts:
                kwargs.pop(o.name, None)
            cfg, given = build_config(cls, path, flags, config_file)
            if "given" in sig.parameters:
                kwargs["given"] = given
            return fn(cfg, **kwargs)

        params = positional + own + [config] + options
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__, command.__doc__, command.__module__ = fn.__name__, fn.__doc__, fn.__module__
        command.config_class = cls
        return command
    return wrap
