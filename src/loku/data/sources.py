"""Where loku's public data comes from, decided in one place.

A public data set is named by its path in a *data folder*, laid out as the public data is:

    tdec/forget/lm_extraction_32_0.csv        TDEC forget sets (Jang et al. 2023)
    tdec/retain/wikitext2_test.raw            WikiText-2 raw test: the TDEC retain set
    eval/reasoning/, eval/dialogue/, eval/ppl/  the TDEC utility tasks
    tofu/full.json, tofu/forget10_perturbed.json, ...   TOFU (Maini et al. 2024)
    muse/news/, muse/books/                 MUSE (Shi et al. 2024): muse_bench's data/ folder
    wmdp/wmdp-bio/, wmdp/wmdp-cyber/, ...    WMDP (Li et al. 2024): the hub dataset cais/wmdp's files
    mmlu/<subject>/                         MMLU: the hub dataset cais/mmlu's files

Each data set is looked for, in this order:
  1. the data folder given (`--data-dir`, the config key `data_dir`, or a function's `data_dir`), else the
     folder named by the environment variable $LOKU_DATA;
  2. the files shipped inside loku (`loku/data/files/`: WikiText-2 raw test and TOFU's refusal answers;
     sources and licenses in its README.md);
  3. the data set's copy on the Hugging Face hub, where one exists (`datasets.load_dataset`).
When none of them has it, one LokuError line names the data set, every place tried and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LokuError

ENV_VAR = "LOKU_DATA"
SHIPPED = Path(__file__).resolve().parent / "files"
LAYOUT = "tdec/, eval/, tofu/, muse/, wmdp/, mmlu/ as described in loku's README (Data)"


@dataclass(frozen=True)
class HubCopy:
    """A data set's copy on the Hugging Face hub: `datasets.load_dataset(repo, config, split=split)`."""
    repo: str
    config: str | None
    split: str

    def __str__(self) -> str:
        return f"hub dataset {self.repo} ({', '.join(filter(None, (self.config, self.split)))})"


@dataclass(frozen=True)
class PublicData:
    """One public data set: its title (for messages), its path in a data folder, its hub copy (None when it
    has none) and where a local copy comes from (named in the fix when it is missing)."""
    title: str
    path: str
    hub: HubCopy | None = None
    origin: str = ""


@dataclass(frozen=True)
class Found:
    """Where a data set was found: a local file or folder (`path`), or the rows of its hub copy (`rows`)."""
    data: PublicData
    path: Path | None = None
    rows: object = None

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else str(self.data.hub)


WIKITEXT2_TEST = PublicData("WikiText-2 raw test (the TDEC retain set)", "tdec/retain/wikitext2_test.raw",
                            HubCopy("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
                            "WikiText-2 raw, wiki.test.raw (CC BY-SA 3.0)")
TOFU_HUB = "locuslab/TOFU"


def tdec_forget_set(name: str) -> PublicData:
    """A TDEC forget set by name (lm_extraction_32_0): Jang et al.'s file; it has no hub copy."""
    return PublicData(f"TDEC forget set {name}", f"tdec/forget/{name}.csv",
                      origin="github joeljang/knowledge-unlearning, data/main")


def tofu_split(name: str, filename: str) -> PublicData:
    """A TOFU split: `filename` in tofu/, or the hub config `name` (idontknow has no hub copy)."""
    hub = None if name == "idontknow" else HubCopy(TOFU_HUB, name, "train")
    return PublicData(f"TOFU split {name}", f"tofu/{filename}", hub,
                      "hub dataset locuslab/TOFU, or github locuslab/tofu")


def muse_corpus(corpus: str, title: str, part: str, split: str) -> PublicData:
    """A MUSE corpus (news, books): its folder in muse/ (muse_bench's data/<corpus>/), or the hub dataset
    muse-bench/MUSE-<Title>, probed with the `part` config's `split` (a file the caller reads first)."""
    return PublicData(f"MUSE {title}", f"muse/{corpus}", HubCopy(f"muse-bench/MUSE-{title}", part, split),
                      "muse_bench's data/, github swj0419/muse_bench load_data.py")


def wmdp_subset(subset: str) -> PublicData:
    """A WMDP subset (wmdp-bio, wmdp-cyber, wmdp-chem): a snapshot folder of its hub config."""
    return PublicData(f"WMDP {subset}", f"wmdp/{subset}", HubCopy("cais/wmdp", subset, "test"),
                      "huggingface-cli download cais/wmdp --repo-type dataset --local-dir DIR/wmdp")


MMLU = PublicData("MMLU", "mmlu", HubCopy("cais/mmlu", "abstract_algebra", "test"),   # its first subject
                  "huggingface-cli download cais/mmlu --repo-type dataset --local-dir DIR/mmlu")


def data_folders(data_dir: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """The local folders searched, in order, each with how it was named: the given data folder (else
    $LOKU_DATA), then loku's own files. A folder named but absent is an error, not silently skipped."""
    folders = []
    if data_dir not in (None, ""):
        folders.append(("--data-dir", Path(data_dir).expanduser()))
    elif os.environ.get(ENV_VAR):
        folders.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR]).expanduser()))
    for label, folder in folders:
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise LokuError(f"data folder {folder} ({label}) {what}: pass a folder laid out as {LAYOUT}")
    return folders + [("loku's own files", SHIPPED)]


def hub_rows(copy: HubCopy):
    """The hub copy's rows (a datasets.Dataset): the one place loku downloads public data."""
    from datasets import load_dataset  # imported here: `import datasets` adds ~0.7 s to every CLI start

    return load_dataset(copy.repo, copy.config, split=copy.split)


def _reason(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def find(data: PublicData, data_dir: str | os.PathLike | None = None, *, hub: bool = True) -> Found:
    """The first place that has `data` (see the module docstring). Raises one LokuError line naming the
    data set, the places tried and the fix when none has it."""
    tried = []
    folders = data_folders(data_dir)
    for label, folder in folders:
        path = folder / data.path
        if path.exists():
            return Found(data, path=path)
        tried.append(label if folder == SHIPPED else f"{path} ({label})")
    if len(folders) == 1:
        tried.insert(0, f"--data-dir and ${ENV_VAR} (neither given)")
    if data.hub is None:
        tried.append("the Hugging Face hub (no copy there)")
    elif not hub:
        tried.append(f"{data.hub} (not asked)")
    else:
        try:
            return Found(data, rows=hub_rows(data.hub))
        except Exception as e:  # noqa: BLE001 (network, missing repo, offline mode: all mean "not there")
            tried.append(f"{data.hub} ({_reason(e)})")
    name = Path(data.path)
    under = "DIR/" if name.parent == Path(".") else f"DIR/{name.parent}/"
    fix = (f"put {name.name} under {under}" + (f" (from {data.origin})" if data.origin else "")
           + f" and pass --data-dir DIR or set {ENV_VAR}=DIR")
    if data.hub is not None:
        fix += ", or connect to the Hugging Face hub"
    raise LokuError(f"{data.title} not found: tried {'; '.join(tried)}: {fix}")
