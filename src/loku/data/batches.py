"""Padding and the seeded pairing of forget batches with retain batches."""

from __future__ import annotations

import functools
import math

import torch
from torch.nn.utils.rnn import pad_sequence


def pad_rows(rows: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows padded to the longest on `side`: (input_ids (B, T), attention_mask (B, T))."""
    ids = pad_sequence([torch.as_tensor(r, dtype=torch.long) for r in rows], batch_first=True,
                       padding_value=pad_id, padding_side=side)
    mask = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True, padding_side=side)
    return ids, mask


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss. Examples with an
    alternate answer (DPO) also give "alt_input_ids", "alt_attention_mask", "alt_labels", row for row."""
    ids, mask = pad_rows([f["input_ids"] for f in features], pad_id)
    out = {"input_ids": ids, "attention_mask": mask, "labels": pad_rows([f["labels"] for f in features], -100)[0]}
    if "alt_input_ids" in features[0]:
        alt_ids, alt_mask = pad_rows([f["alt_input_ids"] for f in features], pad_id)
        out.update(alt_input_ids=alt_ids, alt_attention_mask=alt_mask,
                   alt_labels=pad_rows([f["alt_labels"] for f in features], -100)[0])
    return out


class PairedBatches:
    """Every epoch visits each forget example once, in an order fixed by (seed, epoch); each forget
    batch comes with a retain batch drawn from a shuffled, cycling stream (`every_step`: the first that many
    retain examples are in every retain batch, the stream fills the rest from the others). Being a pure function
    of (seed, epoch, step), a resumed run sees exactly the batches it would have seen."""

    def __init__(self, forget: list[dict], retain: list[dict] | None, batch_size: int, pad_id: int,
                 seed: int = 0, retain_batch_size: int | None = None, every_step: int = 0):
        self.forget, self.retain = forget, retain or None
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.retain_batch_size, self.every_step = retain_batch_size or batch_size, every_step

    def __len__(self) -> int:
        return math.ceil(len(self.forget) / self.batch_size)

    @functools.lru_cache(maxsize=8)
    def _perm(self, n: int, salt: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + salt)
        return torch.randperm(n, generator=g).tolist()

    @property
    def constant_retain(self) -> bool:
        """Every retain batch is the whole retain set, in its own order (the same batch at every step)."""
        return self.retain is not None and self.retain_batch_size == len(self.retain)

    def _retain_indices(self, epoch: int, step: int) -> list[int]:
        n, k = len(self.retain), self.retain_batch_size
        if k == n:   # the whole set: in its own order, the same batch at every step
            return list(range(n))
        fixed = self.every_step
        n, k = n - fixed, k - fixed      # the stream: the examples after the fixed ones
        start = (epoch * len(self) + step) * k
        out = list(range(fixed))
        for pos in range(start, start + k):
            cycle, offset = divmod(pos, n)
            out.append(fixed + self._perm(n, 7919 + cycle)[offset])
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

    def steps_per_epoch(self, accumulation: int) -> int:
        return math.ceil(len(self) / accumulation)

    def steps(self, epoch: int, accumulation: int, start_step: int = 0):
        """The epoch's batches from `start_step` on, grouped into optimizer steps of `accumulation` micro-batches;
        the epoch's last batch ends a step (which may be shorter), as in Hugging Face Trainer."""
        group = []
        for pair in self.epoch(epoch, start_step):
            group.append(pair)
            if len(group) == accumulation:
                yield group
                group = []
        if group:
            yield group
