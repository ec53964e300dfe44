"""`accelerate launch` on 2 CPU processes for the tests, each launch on its own free port.

Without --main_process_port every launch asks for accelerate's default rendezvous port, 29500: two launches
at once (two engineers on one machine, parallel CI jobs) met there; accelerate moves a launch elsewhere only
when it finds the port already listening, and two launchers checking at the same moment both go for it (one
then fails to listen). Here every launch gets a port the OS has just handed out (a socket bound to port 0),
and when another process takes it before the launcher listens on it (the launcher fails with EADDRINUSE), the
launch is repeated on a new one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
CONFIGS = Path(__file__).parents[1] / "configs" / "accelerate"
# Starts the CLI with accelerate switched to the launch file's FSDP / DeepSpeed (accelerate starts them on GPUs only).
ON_CPU = str(Path(__file__).parent / "fsdp_on_cpu.py")
TRIES = 3


def free_port() -> int:
    """A TCP port nobody listens on now, chosen by the OS among its ephemeral ports."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def launch_options(config: str | None = None, precision: str | None = "no") -> list[str]:
    """accelerate launch options for 2 CPU processes: plain data parallel over gloo (config None) or a shipped
    configs/accelerate/<config>.yaml; precision None keeps the launch file's mixed precision."""
    if config is None:
        options = ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    else:
        options = ["--config_file", str(CONFIGS / f"{config}.yaml")]
    return options + ["--num_processes", "2"] + (["--mixed_precision", precision] if precision else [])


def launch(target: list, config: str | None = None, precision: str | None = "no", env_extra: dict | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch OPTIONS --main_process_port PORT TARGET` (TARGET: a script and its arguments, or
    ["-m", "loku", ...]) with OMP_NUM_THREADS=1 and, for plain data parallel, ACCELERATE_USE_CPU; output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"ACCELERATE_USE_CPU": "true"} if config is None else {}),
           **(env_extra or {})}
    for _ in range(TRIES):
        cmd = [ACCELERATE, "launch", *launch_options(config, precision), "--main_process_port", str(free_port()),
               *map(str, target)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if not (r.returncode != 0 and "EADDRINUSE" in r.stderr):
            return r
    return r
