"""Reading a model's sizes off its weights' shapes (every params dataclass's `from_shapes`).

A size is read off every tensor that carries it and must agree: one corrupt tensor is then named
itself, not a later tensor that no longer fits the architecture it implied.
"""

from __future__ import annotations


def read_size(shapes: dict[str, tuple[int, ...]], what: str, readings: list[tuple]) -> int:
    """One size from several tensors. Each reading is `(key, axis)` or `(key, axis, offset[, divisor])`:
    the size is `(shape[axis] - offset) / divisor`. The first reading is required (a KeyError naming
    it when missing); the others count where present. The majority value wins; the first tensor that
    disagrees with it, or gives a size <= 0, is named in a ValueError."""
    values = []
    for i, (key, axis, *rest) in enumerate(readings):
        if i and key not in shapes:
            continue
        shape = tuple(shapes[key])
        if len(shape) <= axis:
            raise ValueError(f"'{key}' has shape {shape}: too few dimensions")
        offset = rest[0] if rest else 0
        divisor = rest[1] if len(rest) > 1 else 1
        values.append((key, (shape[axis] - offset) / divisor))
    counts = [v for _, v in values]
    value = max(counts, key=counts.count)
    for key, v in values:
        if v != value or v <= 0:
            others = [k for k, w in values if w == value and k != key]
            said = f", where {', '.join(repr(k) for k in others)} give {value:g}" if others else ""
            raise ValueError(f"'{key}' has shape {tuple(shapes[key])}: it gives {what} = {v:g}{said}")
    return int(value)
