"""The errors deformconv raises for arguments that break an op's rules."""

from __future__ import annotations

__all__ = ["ArgumentError", "ArgumentTypeError"]


class ArgumentError(ValueError, RuntimeError):
    """An argument whose shape, size, value, device or dtype breaks an op's rules.

    A ``ValueError`` (as documented for every op) and also a ``RuntimeError``, the type
    torchvision's ops raise for the same mistakes, so code written for either library
    catches it.

    Example:
        >>> issubclass(ArgumentError, ValueError) and issubclass(ArgumentError, RuntimeError)
        True
    """


class ArgumentTypeError(TypeError, RuntimeError):
    """A tensor argument of the wrong kind of dtype (e.g. an integer tensor).

    A ``TypeError`` (as documented) and also a ``RuntimeError``, the type torchvision's
    kernels raise for a dtype they do not implement.

    Example:
        >>> issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, RuntimeError)
        True
    """
