"""Keep other libraries' start-up notices out of loku's output, one named message at a time.

Each entry is a logger and the start of one message it emits on every plain CPU run although nothing
is wrong. A filter on the logger drops exactly those records; everything else the logger says (real
warnings, errors) still comes through. Filters set here survive the library's own logger set-up,
which resets level and handlers but not filters, so the order of imports does not matter.
"""

from __future__ import annotations

import logging

NOTICES = {
    # accelerate's unwrap_model imports deepspeed whenever it is installed (it is, for the ZeRO tests),
    # and deepspeed's accelerator probe logs this to stdout on any machine without a GPU.
    "DeepSpeed": ("Setting accelerator to CPU",),
    # peft imports bitsandbytes when installed; on AVX512-BF16 CPUs it looks for an optional 4-bit
    # kernel package that loku never uses (it loads no 4-bit models).
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}


class DropNotices(logging.Filter):
    """Drop the records whose message starts with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_libraries() -> None:
    """Install the filters (idempotent)."""
    for name, starts in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNotices) for f in logger.filters):
            logger.addFilter(DropNotices(starts))
