"""Padding and the seeded pairing of forget batches with retain batches."""

from __future__ import annotations

import functools
import math

import torch


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss. Examples with an
    alternate answer (DPO) also give "alt_input_ids", "alt_attention_mask", "alt_labels", row for row."""
    if "alt_input_ids" in features[0]:
        alt = collate([{"input_ids": f["alt_input_ids"], "labels": f["alt_labels"]} for f in features], pad_id)
        plain = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        return {**collate(plain, pad_id), **{f"alt_{k}": v for k, v in alt.items()}}
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)      # (B, T)
    labels = torch.full((len(features), width), -100, dtype=torch.long)     # (B, T)
    mask = torch.zeros((len(features), width), dtype=torch.long)            # (B, T)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PairedBatches:
    """Every epoch visits each forget example once, in an order fixed by (seed, epoch); each forget
    batch comes with a retain batch drawn from a shuffled, cycling stream. Being a pure function of
    (seed, epoch, step), a resumed run sees exactly the batches it would have seen."""

    def __init__(self, forget: list[dict], retain: list[dict] | None, batch_size: int, pad_id: int,
                 seed: int = 0, retain_batch_size: int | None = None):
        self.forget, self.retain = forget, retain or None
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.retain_batch_size = retain_batch_size or batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.forget) / self.batch_size)

    @functools.lru_cache(maxsize=8)
    def _perm(self, n: int, salt: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + salt)
        return torch.randperm(n, generator=g).tolist()

    def _retain_indices(self, epoch: int, step: int) -> list[int]:
        n, k = len(self.retain), self.retain_batch_size
        start = (epoch * len(self) + step) * k
        out = []
        for pos in range(start, start + k):
            cycle, offset = divmod(pos, n)
            out.append(self._perm(n, 7919 + cycle)[offset])
        return out

    def epoch(self, epoch: int, start_step: int = 0):
        """Yields (forget_batch, retain_batch or None) for one epoch, from `start_step` on."""
        order = self._perm(len(self.forget), epoch)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            forget = collate([self.forget[i] for i in idx], self.pad_id)
            retain = None
            if self.retain is not None:
                retain = collate([self.retain[i] for i in self._retain_indices(epoch, step)], self.pad_id)
            yield forget, retain
