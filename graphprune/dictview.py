"""Read-only dict access to typed report parts.

Report parts are dataclasses (a typo in a field is a type error); the JSON form each writes in
``to_dict()`` also serves ``part["key"]`` and ``part.get("key")``, the access the report gave
before its parts were typed, so user code written against the dicts keeps working.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


class DictView(Mapping[str, Any]):
    """Mapping over ``self.to_dict()`` (recomputed on each access: the parts are small)."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())
