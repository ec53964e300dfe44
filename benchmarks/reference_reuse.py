"""Seconds of the demo's unlearning epochs (IHL + FILA, `--ihl-retain-loss ce+kl`, the whole retain set in every
step) with the frozen reference run as before this change (on the forget and the retain batch at every step)
and as now (only on the batches the method reads, `Method.reference_on`; the retain batch's outputs once, since
it is the same at every step). Alternating runs in one process, on one leaked model saved by
`benchmarks/demo_tuning.py leak DIR`; the adapters of the two must be bit-identical (`demo_epochs.py`).

    python benchmarks/reference_reuse.py DIR [--seed 0 --epochs 2 --rounds 2]
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

from demo_epochs import arguments, compare
from loku.data.batches import PairedBatches
from loku.methods import METHODS

RESULTS = Path(__file__).parent / "results" / "reference_reuse.json"


@contextmanager
def reference_as_before():
    """The reference on every batch at every step, as before `Method.reference_on` and the constant retain batch."""
    ihl, constant = METHODS["ihl"], PairedBatches.constant_retain
    METHODS._items["ihl"] = dataclasses.replace(ihl, reference_on=("forget", "retain", "alt"))
    PairedBatches.constant_retain = property(lambda self: False)
    try:
        yield
    finally:
        METHODS._items["ihl"], PairedBatches.constant_retain = ihl, constant


if __name__ == "__main__":
    compare(arguments(__doc__), reference_as_before, "reference", ("before", "now"), RESULTS)
