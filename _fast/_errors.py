"""Argument checks and error messages shared by the compiled kernels and their twins.

Why one module: the two implementations must fail the same way (same exception type,
same text) on the same bad input, so the compiled code only does the cheap checks
inline and, when one fails, calls these helpers to raise.
"""

from __future__ import annotations

from typing import Any

ID_LEN = 20


def _tname(obj: Any) -> str:
    return type(obj).__name__


def check_target(target: Any, what: str = "target") -> None:
    """Raise unless ``target`` is ``bytes`` of length 20."""
    if not isinstance(target, bytes):
        raise TypeError(f"{what} must be bytes of length {ID_LEN}, not {_tname(target)}")
    if len(target) != ID_LEN:
        raise ValueError(f"{what} must be {ID_LEN} bytes long, got {len(target)}")


def check_k(k: Any, what: str = "k") -> int:
    """Return ``k`` if it is a non-negative int, else raise."""
    if not isinstance(k, int):
        raise TypeError(f"{what} must be an int, not {_tname(k)}")
    if k < 0:
        raise ValueError(f"{what} must be >= 0, got {k}")
    return k


def ids_not_buffer(ids: Any) -> str:
    return f"ids must be a bytes-like object (bytes, bytearray, memoryview), not {_tname(ids)}"


def ids_not_contiguous() -> str:
    return "ids must be a C-contiguous buffer"


def ids_wrong_length(nbytes: int) -> str:
    return f"ids buffer size must be a multiple of {ID_LEN} bytes, got {nbytes}"


def items_not_list(items: Any) -> str:
    return f"items must be a list (one entry per id), not {_tname(items)}"


def items_wrong_length(got: int, n: int) -> str:
    return f"items has {got} entries but ids holds {n} ids"


# --- scoring -------------------------------------------------------------------------

FLOAT_FORMATS = frozenset({"d", "@d", "=d", "<d"})
BYTE_FORMATS = frozenset({"B", "b", "?", "c", "@B", "=B", "@b", "=b"})


def not_buffer(name: str, obj: Any) -> str:
    return f"{name} must be a contiguous buffer (e.g. array('d') / bytes), not {_tname(obj)}"


def bad_float_format(name: str, fmt: str | None, itemsize: int) -> str:
    return f"{name} must hold float64 items (format 'd'), got format {fmt!r} itemsize {itemsize}"


def bad_byte_format(name: str, fmt: str | None, itemsize: int) -> str:
    return f"{name} must hold uint8 items (format 'B'), got format {fmt!r} itemsize {itemsize}"


def length_mismatch(name: str, got: int, n: int) -> str:
    return f"{name} has {got} items, expected {n} (same length as load)"


def check_weights(weights: Any) -> tuple[float, float, float, float, float]:
    """Return ``weights`` as a 5-tuple of floats, else raise TypeError/ValueError."""
    try:
        items = tuple(weights)
    except TypeError:
        raise TypeError(f"weights must be a sequence of 5 floats, not {_tname(weights)}") from None
    if len(items) != 5:
        raise ValueError(f"weights must have 5 items (free, gpu, region, latency, age), got {len(items)}")
    out = []
    for w in items:
        if not isinstance(w, int | float):
            raise TypeError(f"weights must be floats, got {_tname(w)}")
        out.append(float(w))
    return (out[0], out[1], out[2], out[3], out[4])


def check_max_age(max_age_s: Any) -> float:
    if not isinstance(max_age_s, int | float):
        raise TypeError(f"max_age_s must be a float, not {_tname(max_age_s)}")
    return float(max_age_s)


def check_limit(limit: Any) -> int:
    return check_k(limit, "limit")
