"""Name -> object registries that answer an unknown name with "did you mean ..."."""

from __future__ import annotations

import difflib
from typing import Generic, TypeVar

from .errors import LokuError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind, self._items = kind, {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise LokuError(f"unknown {self.kind} {name!r}: {hint}choose one of {', '.join(self._items)}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return list(self._items)

    def items(self):
        return self._items.items()
