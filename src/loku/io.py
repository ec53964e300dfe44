"""Output directories that are never half-written or silently overwritten.

Every file goes to a temporary name and is renamed into place; a run directory's manifest
(files, sizes, sha256) is written last, so a directory without one is an unfinished run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import LokuError

MANIFEST = "manifest.json"


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside `path`; renamed to `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=float) + "\n")


@contextmanager
def atomic_dir(path: str | Path):
    """A directory written whole: built under a temporary name, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_out_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse a non-empty output directory unless asked to overwrite; nothing is created here."""
    path = Path(path)
    if not str(path):
        raise LokuError("no output directory given: pass --out DIR (a new directory)")
    if path.exists() and not path.is_dir():
        raise LokuError(f"output {path} is a file: pass a new directory to --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise LokuError(f"output directory {path} is not empty: choose a new --out, or pass --overwrite")
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise LokuError(f"cannot write under {parent}: choose a writable --out")
    return path


def start_out_dir(path: str | Path, overwrite: bool = False) -> Path:
    path = check_out_dir(path, overwrite)
    if path.is_dir() and overwrite:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(run_dir: str | Path) -> dict:
    """List every file of a finished run; written last, so its presence means the run is complete."""
    run_dir = Path(run_dir)
    files = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        if p.is_file() and str(rel) != MANIFEST and not rel.parts[0].startswith(".") and rel.parts[0] != "checkpoint":
            files[str(rel)] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    manifest = {"files": files}
    write_json(run_dir / MANIFEST, manifest)
    return manifest


def require_complete(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise LokuError(f"incomplete run {run_dir} (no {MANIFEST}): resume it or delete it")
    return run_dir
