"""The base of loku's config dataclasses: typed, validated on construction, saved as YAML.

A config is a dataclass whose fields carry their help text (and optionally a help group, a bound, a
list of choices) in `field(metadata=...)`; `setting(...)` writes that field in one line:

    lora_rank: int = setting(8, "LoRA rank.", group="LoRA", bound="positive")

The same fields give the YAML keys (`lora_rank`) and, through `loku.commands.options`, the command's flags
(`--lora-rank`), so an option is typed once. A field whose type is another config nests it (`TdecConfig.unlearn`
holds an `UnlearnConfig`): its fields are also reachable by their own names, flat, unless the outer config
has a field of the same name or lists them in `hide` (values the outer config sets itself).
Metadata keys: help, group, bound ("positive" | "non-negative"), choices (and kind: what an unknown
choice is called in the error), example (a valid value
for error messages), default_text (shown for a None
default), off_flag (a second "off" spelling of a boolean flag, e.g. --full for lora=False), aliases (extra
flag spellings), positional (a command argument rather than a --flag); for a nested config: hide (inner
fields the outer config sets itself) and rename (inner name -> flat name, where two nested configs share one).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import types
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import LokuError
from .registry import unknown_choice


def setting(default: Any = MISSING, help: str = "", *, factory=None, **meta) -> Any:
    """A dataclass field with its help text (and group, bound, choices...) in its metadata."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Config:
    """Mixin for config dataclasses: field checks on construction, then the class's own `check()`."""

    # Keys that existed once and now have another name or meaning: key -> what to write instead.
    RENAMED: ClassVar[dict[str, str]] = {}

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(type(self), f.name, getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Checks across fields; raise LokuError("what is wrong: how to fix it")."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config"):
        """Build from YAML-like data: own keys, nested mappings, and nested keys given flat."""
        data = nest(cls, data, source)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value, inner = data[f.name], nested_type(cls, f.name)
            if inner is not None and isinstance(value, dict):
                value = inner.from_dict({**default_of(f).to_dict(), **value}, source)
            kwargs[f.name] = value
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path):
        path = Path(path)
        data = read_yaml(path)
        check_types(cls, data, str(path))
        try:
            return cls.from_dict(data, source=str(path))
        except LokuError as e:
            if str(e).startswith(str(path)):
                raise
            raise LokuError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------- reading

def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from `path`, with one-line errors for every way the file can be wrong."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
        data = yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise LokuError(f"config file {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise LokuError(f"config {path} is a directory: pass a YAML file") from None
    except UnicodeDecodeError:
        raise LokuError(f"config file {path} is not UTF-8 text: save it as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise LokuError(f"{path}{where} is not valid YAML ({problem or ' '.join(str(e).split())}): "
                        "fix the file") from None
    if not isinstance(data, dict):
        raise LokuError(f"{path} must hold a mapping of option: value (one `key: value` a line), "
                        f"not a YAML {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------- structure

@functools.cache
def hints(cls) -> dict[str, Any]:
    """Field name -> resolved type (annotations are strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def meta(cls, name: str) -> dict:
    return dict(cls.__dataclass_fields__[name].metadata)


def base_type(tp) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed): `int | None` -> (int, True)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def nested_type(cls, name: str):
    tp, _ = base_type(hints(cls)[name])
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def flat_fields(cls) -> dict[str, tuple[str, ...]]:
    """Every name a flag or flat YAML key may use -> its path: ("lr",) or ("unlearn", "lr").
    An outer field shadows a nested one of the same name; `hide` keeps a nested field out, `rename` gives
    it another flat name (`muse unlearn`: scoring.batch_size is --eval-batch-size, train's is --batch-size)."""
    names = {f.name: (f.name,) for f in dataclasses.fields(cls) if nested_type(cls, f.name) is None}
    for f in dataclasses.fields(cls):
        inner = nested_type(cls, f.name)
        if inner is None:
            continue
        hidden = set(meta(cls, f.name).get("hide", ()))
        rename = meta(cls, f.name).get("rename", {})
        for sub, path in flat_fields(inner).items():
            flat = rename.get(sub, sub)
            if flat not in names and sub not in hidden and flat != f.name:
                names[flat] = (f.name, *path)
    return names


def nest(cls, data: dict, source: str) -> dict:
    """Own keys kept, nested mappings kept, flat keys of nested fields moved into their mapping (a flat
    key wins over the same key inside the mapping); an unknown key fails with "did you mean"."""
    flat = flat_fields(cls)
    out: dict = {}
    routed: dict[str, dict] = {}
    for key, value in data.items():
        if key in cls.__dataclass_fields__:
            if nested_type(cls, key) is not None and isinstance(value, dict):
                out[key] = {**out.get(key, {}), **value}
            else:
                out[key] = value
        elif key in flat:
            path = flat[key]
            node = routed.setdefault(path[0], {})
            for part in path[1:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        else:
            raise unknown_key(cls, key, source)
    for name, values in routed.items():
        base = out.get(name, {})
        if not isinstance(base, dict):   # a config object from the Python API: flat keys update it
            base = base.to_dict()
        out[name] = _deep_merge(base, values)
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    merged = dict(a)
    for k, v in b.items():
        merged[k] = _deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def renamed(cls) -> dict[str, str]:
    found = dict(getattr(cls, "RENAMED", {}))
    for f in dataclasses.fields(cls):
        inner = nested_type(cls, f.name)
        if inner is not None:
            found = {**renamed(inner), **found}
    return found


def unknown_key(cls, key: str, source: str) -> LokuError:
    old = renamed(cls)
    if key in old:
        return LokuError(f"{source}: key {key!r} is gone: {old[key]}")
    names = list(flat_fields(cls))
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return LokuError(f"{source}: unknown key {key!r}{hint}: valid keys are {', '.join(names)}")


# ------------------------------------------------------------------------------------------- values

PRECISIONS = ("auto", "no", "bf16", "fp16")   # every --mixed-precision's choices (resolved by distributed.py)
PRECISION_HELP = "auto, no, bf16 or fp16 (auto: bf16 where the hardware computes it natively, else no)."

_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
          list: "a list of strings", dict: "a mapping"}
_SAMPLES = {str: "file.csv", int: 1, float: 1.0, bool: True, list: ["q_proj", "v_proj"], dict: {"note": "..."}}


def check_types(cls, data: dict, source: str) -> None:
    """Type-check YAML data (own and nested keys) before it is merged with flags, naming the file."""
    flat = flat_fields(cls)
    for key, value in data.items():
        inner = nested_type(cls, key) if key in cls.__dataclass_fields__ else None
        if inner is not None and isinstance(value, dict):
            check_types(inner, value, source)
            continue
        path = flat.get(key)
        if path is None:
            continue   # unknown keys fail in nest() with "did you mean"
        owner = cls
        for part in path[:-1]:
            owner = nested_type(owner, part)
        try:
            check_type(owner, path[-1], value)
        except LokuError as e:
            raise LokuError(f"{source}: {e}") from None


def check_type(cls, name: str, value):
    """`value` as field `name` of `cls` takes it (numbers coerced to float, paths to str), or LokuError."""
    tp, optional = base_type(hints(cls)[name])
    if value is None and optional:
        return None
    origin = typing.get_origin(tp) or tp
    if isinstance(origin, type) and dataclasses.is_dataclass(origin):
        if isinstance(value, origin):
            return value
    elif origin is str and isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    elif origin is float:
        number = _as_float(value)
        if number is not None:
            return number
    elif origin is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif origin is bool and isinstance(value, bool):
        return value
    elif origin is list and isinstance(value, list) and typing.get_args(tp) == (int,) and \
            all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return value
    elif origin is list and isinstance(value, list) and typing.get_args(tp) != (int,) and \
            all(isinstance(x, str) for x in value):
        return value
    elif origin is dict and isinstance(value, dict):
        return value
    f = cls.__dataclass_fields__[name]
    default = default_of(f)
    sample = default if default is not None and not dataclasses.is_dataclass(default) else _SAMPLES.get(origin)
    example = f"{name}: {json.dumps(sample)}"   # JSON is YAML, and reads unambiguously
    raise LokuError(f"{name} must be {_KINDS.get(origin, getattr(origin, '__name__', str(origin)))}"
                    f"{' or null' if optional else ''}, got {value!r}: write e.g. `{example}`")


def check_value(cls, name: str, value):
    """Type, bound and choices of one field's value; returns the value as the field keeps it."""
    value = check_type(cls, name, value)
    m = meta(cls, name)
    if value is None:
        return value
    default = default_of(cls.__dataclass_fields__[name])
    if "choices" in m and value not in m["choices"]:
        raise unknown_choice(m.get("kind", name.replace("_", " ")), value, m["choices"])
    bound = m.get("bound")
    # A field whose default is None can also be left out: say so, with what it then means.
    unset = "" if default is not None else ", or leave it out" + (f" (default: {m['default_text']})"
                                                                   if "default_text" in m else "")
    example = m.get("example", default if default is not None else 1)
    if bound == "positive" and isinstance(value, int) and not isinstance(value, bool) and value <= 0:
        raise LokuError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}: pass "
                        f"{flag(name)} 1 or more" + (f" (default {default})" if default is not None else unset))
    if bound == "positive" and isinstance(value, float) and not value > 0:
        raise LokuError(f"{name.replace('_', '-')} must be positive, got {value!r}: pass e.g. {flag(name)} "
                        f"{example:g}{unset}")
    if bound == "non-negative" and not value >= 0:
        raise LokuError(f"{name.replace('_', '-')} must be 0 or more, got {value!r}: pass e.g. {flag(name)} "
                        f"{example:g}{unset}")
    return value


def _as_float(value) -> float | None:
    # YAML 1.1 reads `1e-4` (no dot) as a string, so float fields take numeric text.
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
