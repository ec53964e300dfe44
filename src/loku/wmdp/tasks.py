"""WMDP and MMLU as lm-evaluation-harness tasks, reading local copies of the hub datasets or the hub.

Where each task's data comes from is decided by loku.data.sources, per task: a data folder's snapshot of the
hub dataset (--data-dir / $LOKU_DATA), else the hub itself. From the hub the harness's own tasks run
unchanged (`wmdp_bio`, `wmdp_cyber`, `wmdp_chem`, `mmlu`; the look-up has already loaded the same hub
dataset the harness reads, so an unreachable hub stops before the model loads). For local data, each task is
a small YAML that `include`s the harness's own task file (so the prompt, the choices "A".."D", the
description and the metric are the harness's) and only points its dataset at local files. The snapshots,
e.g. from `huggingface-cli download cais/wmdp --repo-type dataset --local-dir DATA/wmdp`:

    DATA/wmdp/wmdp-bio/test-*.parquet        (cais/wmdp; also wmdp-cyber/, wmdp-chem/)
    DATA/mmlu/<subject>/test-*.parquet       (cais/mmlu, one folder per subject; dev-* for few-shot)

Files may also be .jsonl/.json with the same fields: question (str), choices (4 str), answer (0-3).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ..data.sources import MMLU, Found, find, wmdp_subset
from ..errors import LokuError

WMDP = {"wmdp_bio": "wmdp-bio", "wmdp_cyber": "wmdp-cyber", "wmdp_chem": "wmdp-chem"}
TASKS = (*WMDP, "mmlu")
PREFIX = "loku_"            # local tasks are named loku_<harness name>, so they never shadow the harness's
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
HINT = ("restore it from the hub datasets cais/wmdp and cais/mmlu (a data folder's wmdp/ and mmlu/; README "
        "'Data')")


def task_sources(tasks: list[str], data_dir: str | os.PathLike | None) -> dict[str, Found]:
    """Where each task's data is (loku.data.sources): a local snapshot folder, or the hub dataset's rows."""
    return {t: find(wmdp_subset(WMDP[t]) if t in WMDP else MMLU, data_dir) for t in tasks}


def harness_task_file(*parts: str) -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent.joinpath(*parts)


def split_files(folder: Path, split: str, required: bool = True) -> tuple[str, list[str]]:
    """(datasets builder, files) of one split in a hub snapshot folder: `<split>-*.parquet`, `<split>.jsonl`..."""
    if not folder.is_dir():
        raise LokuError(f"{folder} is missing: {HINT}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.split("-")[0].split(".")[0] == split
                   and p.suffix in FORMATS)
    if not files:
        if not required:
            return "", []
        raise LokuError(f"{folder} has no {split} file ({split}-*.parquet, {split}.jsonl or {split}.json): {HINT}")
    builders = {FORMATS[p.suffix] for p in files}
    if len(builders) > 1:
        raise LokuError(f"{folder} mixes parquet and JSON {split} files: keep one format")
    return builders.pop(), [str(p.resolve()) for p in files]


def _read_rows(builder: str, files: list[str]) -> list[dict]:
    if builder == "parquet":
        import pyarrow.parquet as pq

        return [r for f in files for r in pq.read_table(f).to_pylist()]
    rows = []
    for f in files:
        text = Path(f).read_text(encoding="utf-8")
        if f.endswith(".jsonl"):
            rows += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            rows += data if isinstance(data, list) else [data]
    return rows


def check_rows(builder: str, files: list[str], where: str) -> int:
    """Every row has question (str), choices (4 str) and answer (0-3); returns the row count."""
    try:
        rows = _read_rows(builder, files)
    except Exception as e:  # malformed parquet / JSON / UTF-8 surface as several exception types
        raise LokuError(f"cannot read {where} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                        "restore the files from the hub dataset") from None
    if not rows:
        raise LokuError(f"{where} holds no questions: restore it from the hub dataset")
    for i, r in enumerate(rows):
        missing = [k for k in ("question", "choices", "answer") if not isinstance(r, dict) or k not in r]
        if missing:
            raise LokuError(f"{where} row {i} has no field {missing[0]!r}: every row needs question, choices "
                            "(4 options) and answer (0-3)")
        ok = isinstance(r["question"], str) and isinstance(r["choices"], list) and len(r["choices"]) == 4 \
            and all(isinstance(c, str) for c in r["choices"]) and isinstance(r["answer"], int) \
            and not isinstance(r["answer"], bool) and 0 <= r["answer"] < 4
        if not ok:
            raise LokuError(f"{where} row {i} is malformed: question must be text, choices 4 texts and answer "
                            "0-3; fix or drop the row")
    return len(rows)


def _task_yaml(include: Path, name: str, builder: str, data_files: dict[str, list[str]], **extra) -> dict:
    return {"include": str(include), "task": name, "dataset_path": builder, "dataset_name": None,
            "dataset_kwargs": {"data_files": data_files}, **extra}


def local_tasks(sources: dict[str, Found], num_fewshot: int, folder: Path) -> dict[str, str]:
    """Write harness YAMLs for the tasks found locally into `folder` (the harness's include_path); returns
    {harness task name: the task or group name to run} (a hub task runs as the harness's own). Checks every
    local file first."""
    names, written = {}, []
    for task, found in sources.items():
        root = found.path
        if root is None:
            names[task] = task
            continue
        if task in WMDP:
            builder, files = split_files(root, "test")
            check_rows(builder, files, str(root))
            written.append(_task_yaml(harness_task_file("wmdp", f"{task}.yaml"), PREFIX + task, builder,
                                      {"test": files}))
            names[task] = PREFIX + task
            continue
        subjects = sorted(p.name for p in root.iterdir() if p.is_dir())
        subjects = [s for s in subjects if harness_task_file("mmlu", "default", f"mmlu_{s}.yaml").is_file()]
        if not subjects:
            raise LokuError(f"{root} holds no MMLU subject folder (abstract_algebra/, anatomy/, ...): {HINT}")
        children = []
        for s in subjects:
            builder, files = split_files(root / s, "test")
            check_rows(builder, files, str(root / s))
            data_files, extra = {"test": files}, {"tag": PREFIX + "mmlu_tasks"}
            dev_builder, dev = split_files(root / s, "dev", required=num_fewshot > 0)
            if dev:
                data_files["dev"] = dev
            else:
                extra["fewshot_split"] = None
            if dev and dev_builder != builder:
                raise LokuError(f"{root / s} mixes parquet and JSON files: keep one format")
            written.append(_task_yaml(harness_task_file("mmlu", "default", f"mmlu_{s}.yaml"), f"{PREFIX}mmlu_{s}",
                                      builder, data_files, **extra))
            children.append(f"{PREFIX}mmlu_{s}")
        written.append({"group": PREFIX + "mmlu", "task": children,
                        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
                        "metadata": {"version": 1}})
        names[task] = PREFIX + "mmlu"
    for cfg in written:
        name = cfg.get("task") if "group" not in cfg else cfg["group"]
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return names
