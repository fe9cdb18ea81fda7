"""Name -> builder registries, so YAML, sweep spaces and run names can say `spec_cnn` or `gblend`.

An entry may carry an options dataclass (`register("ogm", options=OGMOptions)`): the config schema is
assembled from these, so a strategy or a dataset brings its own keys with it.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._options: dict[str, type | None] = {}
        self._sections: dict[str, str | None] = {}

    def register(self, name: str, options: type | None = None, section: str | None = None) -> Callable[[T], T]:
        """Registers under `name`; `options` is its options dataclass, read from config section
        `section` (default: `name`; entries may share one, as ogm and ogm_ge do)."""
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            self._options[name] = options
            self._sections[name] = (section or name) if options is not None else None
            return obj
        return add

    def unregister(self, name: str) -> None:
        self.get(name)
        del self._items[name], self._options[name], self._sections[name]

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; expected one of {', '.join(self.names())}") from None

    def options(self, name: str) -> type | None:
        """The options dataclass of `name` (None: it takes none)."""
        self.get(name)
        return self._options[name]

    def section(self, name: str) -> str | None:
        """The config section holding `name`'s options (None: it takes none)."""
        self.get(name)
        return self._sections[name]

    def sections(self) -> dict[str, type]:
        """section -> options dataclass, for the config schema."""
        out: dict[str, type] = {}
        for name in self.names():
            section, options = self._sections[name], self._options[name]
            if section is None:
                continue
            if section in out and out[section] is not options:
                raise ValueError(f"{self.kind} section {section!r} has two different options classes")
            out[section] = options
        return out

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
