"""Typed config sections: build a frozen dataclass from a ConfigDict / mapping, refusing unknown keys.

Every config dataclass of the library (model, mesh, data, train, optimizer, checkpoint) is built through
`from_mapping`, so a misspelt key anywhere fails the same way: with the nearest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any


def from_mapping(cls, d: Mapping[str, Any], *, error=ValueError):
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise error(f"unknown {cls.__name__} key(s): {', '.join(hints)}.")
    return cls(**d)
