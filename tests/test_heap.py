"""loku.heap: large tensors come from (and go back to) the process's heap, not fresh mmaps, once the CLI starts."""

import ctypes
import subprocess
import sys

import pytest
import torch

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2")
                           or torch.accelerator.is_available(), reason="glibc >= 2.33 (mallinfo2), no GPU")

# Allocates and frees a 100 MB tensor; prints whether loku's setting was applied, the bytes glibc had mapped
# with mmap while the tensor lived, and the free bytes the heap held after it was freed.
SCRIPT = """
import ctypes, sys
import torch

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "keep":
    from loku.heap import keep_freed_memory
    applied = keep_freed_memory()
elif sys.argv[1] == "cli":   # the command line applies it before any command runs
    from loku import cli
    sys.argv = ["loku", "list", "methods"]
    applied = cli._run() == 0
else:
    applied = False
mapped_before = libc.mallinfo2().hblkhd
t = torch.ones(100 * 2**20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd - mapped_before
del t
print(applied, mapped, libc.mallinfo2().fordblks, file=sys.stderr)
"""
MB = 2**20


def allocation(mode: str) -> tuple[bool, int, int]:
    r = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    applied, mapped, free = r.stderr.strip().splitlines()[-1].split()
    return applied == "True", int(mapped), int(free)


@glibc
@pytest.mark.parametrize("mode", ["keep", "cli"])
def test_large_tensors_reuse_the_heap_instead_of_fresh_mmaps(mode):
    applied, mapped, free = allocation("plain")
    assert not applied and mapped >= 100 * MB and free < 100 * MB   # glibc's default: its own mmap, unmapped on free
    applied, mapped, free = allocation(mode)
    assert applied and mapped == 0 and free >= 100 * MB             # from the heap, and kept there once freed
