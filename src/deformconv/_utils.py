"""Small helpers shared by every layer of the package."""

from __future__ import annotations

import numbers

__all__ = ["IntPair", "pair"]

IntPair = int | tuple[int, int]


def pair(value: object, name: str, where: str) -> tuple[int, int]:
    """Normalise an int or a pair of ints to a tuple of two ints.

    Args:
        value: an int, or a tuple/list of exactly two ints.
        name: the argument's name, for the error message.
        where: the public function or class, for the error message.

    Returns:
        ``(a, b)`` as Python ints.

    Raises:
        TypeError: ``value`` is not an int or a sequence of two ints (bools are rejected).

    Example:
        >>> pair(3, "stride", "deform_conv2d")
        (3, 3)
        >>> pair((2, 1), "stride", "deform_conv2d")
        (2, 1)
    """
    if type(value) is int:  # the common cases first, without the ABC checks below
        return value, value
    if isinstance(value, tuple | list) and len(value) == 2:
        a, b = value[0], value[1]
        if type(a) is int and type(b) is int:
            return a, b
    items = tuple(value) if isinstance(value, tuple | list) else (value, value)
    ok = len(items) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items
    )
    if not ok:
        raise TypeError(f"{where}: {name} must be an int or a tuple of two ints; got {value!r}")
    return int(items[0]), int(items[1])
