"""One registry per kind of part (models, datasets, objectives, guides, estimators,
experiments): a part registers itself where it is defined, and everyone else lists and
builds parts through the registry, never through a list of names of their own (timm's
``register_model`` / ``create_model`` / ``list_models``).

    MODELS = Registry("model")

    @MODELS.register("vae", "one-stochastic-layer VAE")
    class VAE(GenerativeModel): ...

    MODELS.get("vae").factory      # the class (or function) registered
    MODELS.names()                 # the CLI's choices
    MODELS.describe()              # what ``dgm list`` prints

The registry lives in ``models`` (the bottom package) so that every package can use it
without importing upward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from models.base import DGMError


class UnknownPartError(DGMError, ValueError):
    """A name that no registry entry has."""


@dataclass(frozen=True)
class Entry:
    """One registered part: its ``name``, the ``factory`` that builds it, a one-line
    ``description`` and free-form ``meta`` (what the part declares about itself)."""

    name: str
    factory: Callable[..., Any]
    description: str
    meta: Dict[str, Any] = field(default_factory=dict)


class Registry:
    """Name -> :class:`Entry`, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Entry] = {}

    def register(self, name: str, description: Optional[str] = None, **meta) -> Callable:
        """Decorator: register the decorated class or function under ``name``. Without a
        ``description`` the first paragraph of its docstring is used."""

        def decorate(factory: Callable) -> Callable:
            self.add(name, factory, description, **meta)
            return factory

        return decorate

    def add(self, name: str, factory: Callable, description: Optional[str] = None, **meta) -> Entry:
        if name in self._entries and self._entries[name].factory is not factory:
            raise DGMError(f"two {self.kind}s are registered as {name!r}; rename one")
        entry = Entry(name, factory, description or first_paragraph(factory.__doc__), dict(meta))
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownPartError(
                f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())} (`dgm list` describes them)"
            ) from None

    def __getitem__(self, name: str) -> Callable[..., Any]:
        """The factory registered as ``name``."""
        return self.get(name).factory

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> List[str]:
        return list(self._entries)

    def items(self) -> List[Tuple[str, Callable[..., Any]]]:
        """``(name, factory)`` per entry, as a dict of factories would give them."""
        return [(e.name, e.factory) for e in self._entries.values()]

    def entries(self) -> List[Entry]:
        return list(self._entries.values())

    def describe(self) -> List[Tuple[str, str]]:
        """``(name, description)`` per entry, for ``dgm list``."""
        return [(e.name, e.description) for e in self._entries.values()]


MODELS = Registry("model")
"""Model name -> model class (a ``GenerativeModel``: ``cls(data_spec, config)``)."""


def register_model(cls):
    """Class decorator: register a model class under its ``name``; the description is the
    first paragraph of its docstring."""
    MODELS.add(cls.name, cls)
    return cls


def first_paragraph(doc: Optional[str]) -> str:
    """The first paragraph of a docstring on one line (``""`` without one)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())
