"""Run by test_distributed.py under `accelerate launch`: a collective, then loku's exit (the CLI's way out).

    python tests/exit_worker.py OUT_DIR EXIT_CODE

Each process records what its exit ran: exit handlers (an atexit function, a temporary directory's
finalizer) and, if the interpreter's teardown ran, a module-level object's __del__ (the teardown a gloo worker
thread can abort).
"""

import atexit
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist
from accelerate import PartialState

from loku.distributed import exit_process

out, code = Path(sys.argv[1]), int(sys.argv[2])
state = PartialState(cpu=True)   # joins the process group of the launch
rank = state.process_index
ranks = [None] * state.num_processes
dist.all_gather_object(ranks, rank)   # the last collective: its work is released by a gloo worker thread
atexit.register(lambda: (out / f"atexit{rank}").write_text("ran"))
scratch = tempfile.TemporaryDirectory()   # removed at exit by its finalizer
(out / f"scratch{rank}").write_text(scratch.name)


class Teardown:
    """Deleted only when the interpreter clears this module, in its teardown."""

    def __del__(self, path=out / f"teardown{rank}", write=Path.write_text):
        write(path, "ran")


teardown = Teardown()
print(f"rank {rank} saw ranks {ranks}", end="")   # no newline: still in the stdout buffer at exit
exit_process(code)
