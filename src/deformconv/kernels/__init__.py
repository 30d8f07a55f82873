"""Kernels: plain functions over tensors, no validation (the ``ops`` layer validates).

Every kernel takes normalised arguments in this order:
``(input, offset, mask | None, weight, bias | None, stride, padding, dilation)``
with ``stride``, ``padding`` and ``dilation`` as ``(h, w)`` int tuples.
"""
