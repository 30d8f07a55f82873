"""How every kernel splits a batch into chunks whose workspace stays under a bound."""

from __future__ import annotations

__all__ = ["Chunk", "plan_chunks"]

Chunk = tuple[int, int, int, int]  # images b0 .. b1, output pixels l0 .. l1 of each


def plan_chunks(n: int, length: int, bytes_per_pixel: int, cap: int) -> list[Chunk]:
    """Chunks ``(b0, b1, l0, l1)`` of ``n`` images of ``length`` output pixels each.

    A chunk's workspace, ``bytes_per_pixel`` per output pixel, stays under ``cap``: whole
    images when one image fits, otherwise ranges of one image's pixels (at least one
    pixel, so a single huge image still runs). As few chunks as that allows, of sizes as
    equal as they can be (8 images under a cap of 5 make two chunks of 4, not 5 and 3:
    no small last chunk whose products fall below a size threshold). Every pixel is in
    exactly one chunk, in order. Empty when ``n · length`` is 0.
    """
    if n * length == 0:
        return []
    pixels = max(1, cap // max(1, bytes_per_pixel))
    if pixels >= length:
        step = _balanced(n, pixels // length)
        return [(b0, min(n, b0 + step), 0, length) for b0 in range(0, n, step)]
    pixels = _balanced(length, pixels)
    return [
        (b, b + 1, l0, min(length, l0 + pixels))
        for b in range(n)
        for l0 in range(0, length, pixels)
    ]


def _balanced(total: int, most: int) -> int:
    """The smallest step that covers ``total`` in as few steps of at most ``most``."""
    count = -(-total // most)
    return -(-total // count)
