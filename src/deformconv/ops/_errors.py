"""The error deformconv raises for arguments that break an op's rules."""

from __future__ import annotations

__all__ = ["ArgumentError"]


class ArgumentError(ValueError, RuntimeError):
    """An argument whose shape, size, device or dtype breaks an op's rules.

    A ``ValueError`` (as documented for every op) and also a ``RuntimeError``, the type
    torchvision's ops raise for the same mistakes, so code written for either library
    catches it.

    Example:
        >>> issubclass(ArgumentError, ValueError) and issubclass(ArgumentError, RuntimeError)
        True
    """
