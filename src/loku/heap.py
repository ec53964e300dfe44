"""Keep the memory a training step frees for the next step, instead of handing it back to the system.

glibc's malloc serves every allocation above 32 MB with a fresh mmap and unmaps it on free. A step's
vocabulary-wide tensors are that large (SmolLM2-135M, 20 rows of 85 tokens: 334 MB of logits, and their
softmax, gradient, ... each), so every step faulted in hundreds of MB of new pages: on the 2-core VMs
loku is measured on, a forward+backward of that batch took 13.8 s, 10.7 s with the memory kept
(`benchmarks/heap.py`), and `loku demo` (the same numbers to the last digit) 10:50 instead of ~12:35.
The process keeps its peak memory until it exits. Only without an accelerator: with one, those tensors live
on it (under its own caching allocator), and host memory kept after loading a model there would be wasted.
"""

from __future__ import annotations

import ctypes
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and never trim it (glibc's MALLOC_MMAP_MAX_=0 and
    MALLOC_TRIM_THRESHOLD_ set from inside the process). True if applied; False where a GPU (or another
    accelerator) is present, or the C library is not glibc (macOS, Windows, musl), whose allocators need
    nothing from here."""
    if not sys.platform.startswith("linux") or torch.accelerator.is_available():
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version   # glibc's own symbol: musl's mallopt is a stub
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # The threshold is a size_t that mallopt takes as int: -1 converts to its largest value, never trim.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
