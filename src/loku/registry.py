"""Name -> object registries that answer an unknown name with "did you mean ..."."""

from __future__ import annotations

import difflib
from typing import Generic, TypeVar

from .errors import LokuError

T = TypeVar("T")


def unknown_choice(kind: str, name: str, choices, cutoff: float = 0.6) -> LokuError:
    """The error for a name that is not one of `choices`, with the closest one suggested."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=cutoff)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return LokuError(f"unknown {kind} {name!r}: {hint}choose one of {', '.join(choices)}")


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
            raise unknown_choice(self.kind, name, self._items, cutoff=0.5)
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return list(self._items)

    def items(self):
        return self._items.items()
