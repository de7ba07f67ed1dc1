"""``JsonConfig``: the ``to_dict`` / ``from_dict`` pair every network config dataclass shares."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from difflab.errors import UserError

__all__ = ["JsonConfig"]

C = TypeVar("C", bound="JsonConfig")


class JsonConfig:
    """Mixin for a config dataclass: JSON-friendly ``to_dict`` (tuples become lists) and its inverse."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists); :meth:`from_dict` inverts it."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """Build from :meth:`to_dict` output (lists become tuples); an unknown key raises ``UserError``."""
        valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise UserError(f"unknown {cls.__name__} key {unknown[0]!r}; valid keys are: {', '.join(valid)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
