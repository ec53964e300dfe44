"""Output directories that are never half-written or silently overwritten.

Every file goes to a temporary name and is renamed into place; a run directory's manifest
(files, sizes, sha256) is written last, so a directory without one is an unfinished run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import LokuError

MANIFEST = "manifest.json"


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_error(e: BaseException, path: Path) -> LokuError | None:
    """The LokuError for a write that failed because the disk is full or the place is not writable, else
    None (a bug, to be raised as it is). safetensors reports a full disk only in its message, torch.save
    only as a failed write, so those are recognised by text, or by the disk being (nearly) full."""
    code = getattr(e, "errno", None)
    text = str(e)
    full = code in DISK_FULL or "No space left on device" in text or "os error 28" in text \
        or "Disk quota exceeded" in text
    if not full and isinstance(e, RuntimeError) and ("write" in text or "unexpected pos" in text):
        try:
            full = shutil.disk_usage(_existing(path.parent)).free < (1 << 20)
        except OSError:
            pass
    if full:
        resume = (path.parent / "checkpoint" / "state.json").is_file()
        hint = f"; then `loku unlearn --resume {path.parent}` continues this run" if resume else ", then run again"
        return LokuError(f"no space left on device while writing {path} (nothing half-written was kept): "
                         f"free some space or choose another --out{hint}")
    if code in NOT_WRITABLE:
        return LokuError(f"cannot write {path} ({os.strerror(code)}): choose a writable --out")
    return None


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextmanager
def _translated_write_errors(path: Path):
    try:
        yield
    except Exception as e:   # OSError, safetensors' SafetensorError (an Exception), torch's RuntimeError
        err = write_error(e, path) if isinstance(e, (OSError, RuntimeError)) or \
            type(e).__name__ == "SafetensorError" else None
        if err is None:
            raise
        raise err from None


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside `path`; renamed to `path` only if the block finishes. A full disk
    or an unwritable place becomes a LokuError, and the temporary file is removed either way."""
    path = Path(path)
    tmp = None
    with _translated_write_errors(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            yield Path(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
            os.replace(tmp, path)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=float) + "\n")


@contextmanager
def atomic_dir(path: str | Path, prefix: str | None = None):
    """A directory written whole: built under a temporary name (`prefix`, default `.NAME.`), then renamed
    into place. A full disk or an unwritable place becomes a LokuError; the temporary folder is removed."""
    path = Path(path)
    tmp = None
    with _translated_write_errors(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=".tmp"))
            yield tmp
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def check_out_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse a non-empty output directory unless asked to overwrite, and a place that cannot be written;
    nothing is created here."""
    path = Path(path)
    if not str(path):
        raise LokuError("no output directory given: pass --out DIR (a new directory)")
    if path.exists() and not path.is_dir():
        raise LokuError(f"output {path} is a file: pass a new directory to --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise LokuError(f"output directory {path} is not empty: choose a new --out, or pass --overwrite")
    # Files go into `path` (when it exists) and `path` itself is made or replaced in its parent.
    places = [path] if path.is_dir() else []
    places.append(_existing(path.parent))
    for place in places:
        if not os.access(place, os.W_OK | os.X_OK):
            raise LokuError(f"cannot write under {place} (permission denied): choose a writable --out")
    return path


def start_out_dir(path: str | Path, overwrite: bool = False) -> Path:
    path = check_out_dir(path, overwrite)
    with _translated_write_errors(path):
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


def check_run_part(path: str | Path) -> Path:
    """A folder inside a loku run (its adapter/ or model/) is read only when the run finished: the
    run's manifest exists and the folder's files match it (size and sha256)."""
    path = Path(path)
    run = path.parent
    if not ((run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()):
        return path  # not part of a loku run: nothing to check
    require_complete(run)
    files = json.loads((run / MANIFEST).read_text())["files"]
    for rel, meta in files.items():
        if Path(rel).parts[0] == path.name:
            f = run / rel
            if not f.is_file() or f.stat().st_size != meta["bytes"] or sha256(f) != meta["sha256"]:
                raise LokuError(f"{f} does not match the run's {MANIFEST} (changed or damaged since the run "
                                "finished): restore it or run again")
    return path
