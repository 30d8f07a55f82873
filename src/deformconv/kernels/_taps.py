"""Bilinear taps of eight sampling points at once, in vectors, into a small table.

Shared by the column kernels (:mod:`deformconv.kernels._numba`) and the DCNv3/DCNv4
kernels (:mod:`deformconv.kernels._dcnv_numba`). :func:`vtaps` applies, lane-wise, the
same operations in the same order as the scalar corner code of those kernels, so a
point's table entries are bitwise what the scalar path computes.
"""

from __future__ import annotations

import numba
import numpy as np

from deformconv.kernels._simd import (
    vadd,
    vfloor,
    vge,
    vlt,
    vmax,
    vmin,
    vmul,
    vselect,
    vsplat,
    vstore,
    vsub,
)

__all__ = [
    "FIELDS", "LX", "LY", "M", "OK", "RX0", "RX1", "RY0", "RY1",
    "V00", "V01", "V10", "V11", "W00", "W01", "W10", "W11", "corner_rows", "vtaps",
]  # fmt: skip

# Fields (table rows) that :func:`vtaps` fills, eight points (columns) at a time.
RY0, RY1, RX0, RX1 = 0, 1, 2, 3  # the corners' rows and columns, clamped into the map
W00, W01, W10, W11 = 4, 5, 6, 7  # the corners' weights m·w_q (0 for a corner outside)
OK = 8  # 1 for a point inside (-1 <= y < H and -1 <= x < W), else 0
LY, LX = 9, 10  # fractional parts
V00, V01, V10, V11 = 11, 12, 13, 14  # corner validity (0/1)
M = 15  # the mask (0 for a point outside)
FIELDS = 16


@numba.njit(inline="always")
def vtaps(table, col, yy, xx, m, fh, fw, one):  # pragma: no cover
    """Fill ``table[:, col : col + 8]`` for eight points at rows ``yy``, columns ``xx``.

    ``m``: their mask (ones without one); ``fh``, ``fw``: the map's height and width in
    the table's dtype. Lanes outside the map (NaN included: the comparisons are False) are
    replaced by -1 before the floor, so no NaN, infinite or huge value reaches a corner;
    their mask is 0 and ``OK`` is 0: weights 0 at the clamped corner (0, 0).

    Returns:
        The clamped corner rows and columns ``(ry0, ry1, rx0, rx1)`` as vectors.
    """
    vone = vsplat(one)
    vzero = vsub(vone, vone)
    vneg = vsub(vzero, vone)
    vh = vsplat(fh)
    vw = vsplat(fw)
    ok = vmul(vmul(vge(yy, vneg), vlt(yy, vh)), vmul(vge(xx, vneg), vlt(xx, vw)))
    yy = vselect(ok, yy, vneg)
    xx = vselect(ok, xx, vneg)
    m = vselect(ok, m, vzero)
    y0 = vfloor(yy)  # exact integers in [-1, H - 1]
    x0 = vfloor(xx)
    ly = vsub(yy, y0)
    lx = vsub(xx, x0)
    hy = vsub(vone, ly)
    hx = vsub(vone, lx)
    # Row y0 exists iff y0 >= 0, row y0 + 1 iff y0 + 1 <= H - 1 (as 0/1 by a min).
    vy0 = vmin(vadd(y0, vone), vone)
    vy1 = vmin(vsub(vsub(vh, vone), y0), vone)
    vx0 = vmin(vadd(x0, vone), vone)
    vx1 = vmin(vsub(vsub(vw, vone), x0), vone)
    v00 = vmul(vy0, vx0)
    v01 = vmul(vy0, vx1)
    v10 = vmul(vy1, vx0)
    v11 = vmul(vy1, vx1)
    ry0 = vmax(y0, vzero)
    ry1 = vmin(vadd(y0, vone), vsub(vh, vone))
    rx0 = vmax(x0, vzero)
    rx1 = vmin(vadd(x0, vone), vsub(vw, vone))
    vstore(table, RY0, col, ry0)
    vstore(table, RY1, col, ry1)
    vstore(table, RX0, col, rx0)
    vstore(table, RX1, col, rx1)
    vstore(table, W00, col, vmul(vmul(vmul(hy, hx), v00), m))
    vstore(table, W01, col, vmul(vmul(vmul(hy, lx), v01), m))
    vstore(table, W10, col, vmul(vmul(vmul(ly, hx), v10), m))
    vstore(table, W11, col, vmul(vmul(vmul(ly, lx), v11), m))
    vstore(table, OK, col, ok)
    vstore(table, LY, col, ly)
    vstore(table, LX, col, lx)
    vstore(table, V00, col, v00)
    vstore(table, V01, col, v01)
    vstore(table, V10, col, v10)
    vstore(table, V11, col, v11)
    vstore(table, M, col, m)
    return ry0, ry1, rx0, rx1


@numba.njit(inline="always")
def corner_rows(table, j, pix, width):  # pragma: no cover
    """The flat input rows of point ``j``'s four corners (the table's values are exact)."""
    w = np.int64(width)
    y0 = np.int64(table[RY0, j]) * w + pix
    y1 = np.int64(table[RY1, j]) * w + pix
    x0 = np.int64(table[RX0, j])
    x1 = np.int64(table[RX1, j])
    return np.uint64(y0 + x0), np.uint64(y0 + x1), np.uint64(y1 + x0), np.uint64(y1 + x1)
