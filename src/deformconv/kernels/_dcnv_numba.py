"""Fast CPU DCNv3/DCNv4 core: channels-last Numba kernels, forward and backward.

The core has no weights, so there is no GEMM: every output value is a gather-accumulate
``out[r, g·C_g + c] = Σ_p m_p · Σ_q w_q · x[corner_q, g·C_g + c]``. In channels-last
layout the C_g channels of a corner are contiguous, so the inner loop is a vectorised
axpy over them; the corners, their weights and the mask are found once per (pixel,
group, point) and shared by the group's channels.

Forward (parallel over output pixels): each pixel writes its own row of the output.

Backward (parallel over tasks (image, group, block of channels)): a task walks the
image's output pixels in order and

- adds ``m·w_q·grad_out`` to ``grad_input`` at the four corners, restricted to its own
  channels of its own image: no two tasks write the same element (no atomics);
- computes ``d_q = Σ_c grad_out[c] · x[corner_q, c]`` over its channels, from which
  the mask and offset gradients follow; when a group's channels are split into several
  blocks, each block writes its own partial and the partials are summed afterwards in
  a fixed order.

The split depends on shapes only (never on the thread count) and every sum runs in a
fixed order, so results are bitwise reproducible whatever the number of threads.

Safety: a position is tested with comparisons that are False for NaN (``y >= -1 and
y < H and ...``) before it is floored and converted to an integer, so NaN, infinite
and huge offsets never form an index: they read 0 and get zero gradients. Corner
indices are clamped into the map (a corner outside gets weight 0), so every read and
write is in bounds; indices are 64-bit.

float16/bfloat16 are computed in float32; float64 in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

from deformconv.kernels import _numba_threads
from deformconv.kernels.dcnv_reference import kernel_points

__all__ = ["backward", "forward"]

#: A group's channels are split into blocks (down to this many channels) until the
#: backward has at least :data:`_MIN_TASKS` tasks; shapes alone decide the split.
_MIN_BLOCK = 8
_MIN_TASKS = 16

_jit: Callable[[Any], Any] = numba.njit(
    parallel=True, cache=True, nogil=True, fastmath=False, error_model="numpy"
)


@numba.njit(inline="always")
def _corners(y, x, height, width, one):  # pragma: no cover
    """Corners of a position with -1 <= y < H and -1 <= x < W (checked by the caller).

    Returns the four flat pixel indices ``row·W + col`` (clamped into the map), the
    fractional parts ``ly, lx`` and the 0/1 validity of each corner.
    """
    y0 = np.floor(y)
    x0 = np.floor(x)
    ly = y - y0
    lx = x - x0
    iy0 = np.int64(y0)  # in [-1, H - 1]: y was range-checked, so the conversion is exact
    ix0 = np.int64(x0)
    zero = one - one
    vy0 = one if iy0 >= 0 else zero
    vy1 = one if iy0 + 1 < height else zero
    vx0 = one if ix0 >= 0 else zero
    vx1 = one if ix0 + 1 < width else zero
    ry0 = max(iy0, 0)
    ry1 = min(iy0 + 1, height - 1)
    rx0 = max(ix0, 0)
    rx1 = min(ix0 + 1, width - 1)
    return (
        ry0 * width + rx0, ry0 * width + rx1, ry1 * width + rx0, ry1 * width + rx1,
        ly, lx, vy0 * vx0, vy0 * vx1, vy1 * vx0, vy1 * vx1,
    )  # fmt: skip


@_jit
def _forward(
    x, off, mask, out, height, width, h_out, w_out, group, kx, ky, geo, scale
):  # pragma: no cover
    # x: (N·H·W, C) channels-last input; off: (N·L, G·P·2); mask: (N·L, G·P);
    # out: (N·L, C). kx, ky: (P,) kernel points relative to the centre.
    # geo: (s_h, s_w, base_h, base_w) with base = c - pad (the sampling grid's origin).
    n_p = kx.shape[0]
    c_g = x.shape[1] // group
    length = h_out * w_out
    one = x.dtype.type(1)
    zero = one - one
    s_h, s_w, b_h, b_w = geo[0], geo[1], geo[2], geo[3]
    for r in numba.prange(out.shape[0]):
        b = r // length
        l_ = r - b * length
        ho = l_ // w_out
        wo = l_ - ho * w_out
        by = x.dtype.type(ho * s_h + b_h)
        bx = x.dtype.type(wo * s_w + b_w)
        pix = b * height * width
        for c in range(x.shape[1]):
            out[r, c] = zero
        for g in range(group):
            cu = np.uint64(g * c_g)
            for p in range(n_p):
                j = g * n_p + p
                xx = bx + (kx[p] + off[r, 2 * j]) * scale
                yy = by + (ky[p] + off[r, 2 * j + 1]) * scale
                if not (yy >= -1 and yy < height and xx >= -1 and xx < width):  # NaN: False
                    continue
                m = mask[r, j]
                i00, i01, i10, i11, ly, lx, v00, v01, v10, v11 = _corners(
                    yy, xx, height, width, one
                )
                hy = one - ly
                hx = one - lx
                w00 = hy * hx * v00 * m
                w01 = hy * lx * v01 * m
                w10 = ly * hx * v10 * m
                w11 = ly * lx * v11 * m
                a00 = np.uint64(pix + i00)
                a01 = np.uint64(pix + i01)
                a10 = np.uint64(pix + i10)
                a11 = np.uint64(pix + i11)
                ru = np.uint64(r)
                for k in range(np.uint64(c_g)):
                    out[ru, cu + k] += (
                        w00 * x[a00, cu + k] + w01 * x[a01, cu + k]
                        + w10 * x[a10, cu + k] + w11 * x[a11, cu + k]
                    )  # fmt: skip


@numba.njit(inline="always")
def _dot4(a, ra, b, r0, r1, r2, r3, c0, cnt):  # pragma: no cover
    """Four dot products sum_k a[ra, c0 + k] · b[r_q, c0 + k] (k < cnt) in one pass.

    Four interleaved partial sums per product (so LLVM vectorises without fastmath),
    combined in a fixed tree: a fixed summation order, hence reproducible results.
    """
    zero = a.dtype.type(0)
    p0 = p1 = p2 = p3 = q0 = q1 = q2 = q3 = zero
    s0 = s1 = s2 = s3 = t0 = t1 = t2 = t3 = zero
    four = np.uint64(4)
    full = cnt // four * four
    o1 = np.uint64(1)
    o2 = np.uint64(2)
    o3 = np.uint64(3)
    for j in range(np.uint64(0), full, four):
        k = c0 + j
        g0 = a[ra, k]
        g1 = a[ra, k + o1]
        g2 = a[ra, k + o2]
        g3 = a[ra, k + o3]
        p0 += g0 * b[r0, k]
        p1 += g1 * b[r0, k + o1]
        p2 += g2 * b[r0, k + o2]
        p3 += g3 * b[r0, k + o3]
        q0 += g0 * b[r1, k]
        q1 += g1 * b[r1, k + o1]
        q2 += g2 * b[r1, k + o2]
        q3 += g3 * b[r1, k + o3]
        s0 += g0 * b[r2, k]
        s1 += g1 * b[r2, k + o1]
        s2 += g2 * b[r2, k + o2]
        s3 += g3 * b[r2, k + o3]
        t0 += g0 * b[r3, k]
        t1 += g1 * b[r3, k + o1]
        t2 += g2 * b[r3, k + o2]
        t3 += g3 * b[r3, k + o3]
    for j in range(full, cnt):
        k = c0 + j
        g0 = a[ra, k]
        p0 += g0 * b[r0, k]
        q0 += g0 * b[r1, k]
        s0 += g0 * b[r2, k]
        t0 += g0 * b[r3, k]
    return (
        (p0 + p2) + (p1 + p3),
        (q0 + q2) + (q1 + q3),
        (s0 + s2) + (s1 + s3),
        (t0 + t2) + (t1 + t3),
    )


@_jit
def _backward(
    x,
    off,
    mask,
    gout,
    gx,
    g_off,
    g_mask,
    height,
    width,
    h_out,
    w_out,
    group,
    kx,
    ky,
    geo,
    scale,
    block,
):  # pragma: no cover
    # gout: (N·L, C); gx: (N·H·W, C), zero on entry; g_off: (B, N·L, G·P·2) and
    # g_mask: (B, N·L, G·P) partials, one per channel block of ``block`` channels.
    # Task (image, group, block) owns gx[image's pixels, block's channels] and
    # g_off[block, image's rows, group's points].
    n_p = kx.shape[0]
    c_g = x.shape[1] // group
    length = h_out * w_out
    n_img = gout.shape[0] // length if length > 0 else 0
    n_blocks = g_off.shape[0]
    one = x.dtype.type(1)
    zero = one - one
    s_h, s_w, b_h, b_w = geo[0], geo[1], geo[2], geo[3]
    for t in numba.prange(n_img * group * n_blocks):
        b = t // (group * n_blocks)
        g = (t // n_blocks) % group
        blk = t % n_blocks
        c_lo = g * c_g + blk * block
        cnt = np.uint64(min(block, (g + 1) * c_g - c_lo))
        cu = np.uint64(c_lo)
        pix = b * height * width
        for l_ in range(length):
            r = b * length + l_
            ru = np.uint64(r)
            ho = l_ // w_out
            wo = l_ - ho * w_out
            by = x.dtype.type(ho * s_h + b_h)
            bx = x.dtype.type(wo * s_w + b_w)
            for p in range(n_p):
                j = g * n_p + p
                xx = bx + (kx[p] + off[r, 2 * j]) * scale
                yy = by + (ky[p] + off[r, 2 * j + 1]) * scale
                if not (yy >= -1 and yy < height and xx >= -1 and xx < width):  # NaN: False
                    g_off[blk, r, 2 * j] = zero
                    g_off[blk, r, 2 * j + 1] = zero
                    g_mask[blk, r, j] = zero
                    continue
                m = mask[r, j]
                i00, i01, i10, i11, ly, lx, v00, v01, v10, v11 = _corners(
                    yy, xx, height, width, one
                )
                hy = one - ly
                hx = one - lx
                w00 = hy * hx * v00 * m
                w01 = hy * lx * v01 * m
                w10 = ly * hx * v10 * m
                w11 = ly * lx * v11 * m
                a00 = np.uint64(pix + i00)
                a01 = np.uint64(pix + i01)
                a10 = np.uint64(pix + i10)
                a11 = np.uint64(pix + i11)
                d00, d01, d10, d11 = _dot4(gout, ru, x, a00, a01, a10, a11, cu, cnt)
                for k in range(cnt):  # vectorised: no reduction in this loop
                    go = gout[ru, cu + k]
                    gx[a00, cu + k] += w00 * go
                    gx[a01, cu + k] += w01 * go
                    gx[a10, cu + k] += w10 * go
                    gx[a11, cu + k] += w11 * go
                d00 *= v00
                d01 *= v01
                d10 *= v10
                d11 *= v11
                g_mask[blk, r, j] = hy * hx * d00 + hy * lx * d01 + ly * hx * d10 + ly * lx * d11
                ms = m * scale
                g_off[blk, r, 2 * j] = (hy * (d01 - d00) + ly * (d11 - d10)) * ms
                g_off[blk, r, 2 * j + 1] = (hx * (d10 - d00) + lx * (d11 - d01)) * ms


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Problem:
    """Arguments as flat, contiguous arrays in the compute dtype, plus the geometry."""

    def __init__(
        self,
        input: Tensor,
        offset: Tensor,
        mask: Tensor,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        group: int,
        offset_scale: float,
        remove_center: bool,
    ) -> None:
        self.dtype = dt = _compute_dtype(input.dtype)
        self.n, self.height, self.width, self.channels = input.shape
        _, self.h_out, self.w_out, _ = offset.shape
        self.group = group
        self.rows = self.n * self.h_out * self.w_out
        self.x = input.detach().to(dt).contiguous().reshape(-1, self.channels)
        self.off = offset.detach().to(dt).contiguous().reshape(self.rows, offset.shape[3])
        self.mask = mask.detach().to(dt).contiguous().reshape(self.rows, mask.shape[3])
        px, py = kernel_points(kernel_size, dilation, remove_center)
        np_dt = np.float64 if dt == torch.float64 else np.float32
        self.kx, self.ky = np.array(px, dtype=np_dt), np.array(py, dtype=np_dt)
        c_h = dilation[0] * (kernel_size[0] - 1) // 2
        c_w = dilation[1] * (kernel_size[1] - 1) // 2
        self.geo = np.array(
            [stride[0], stride[1], c_h - padding[0], c_w - padding[1]], dtype=np.int64
        )
        self.scale = np_dt(offset_scale)

    def common(self) -> tuple[object, ...]:
        return (self.x.numpy(), self.off.numpy(), self.mask.numpy())

    def geometry(self) -> tuple[object, ...]:
        return (
            self.height, self.width, self.h_out, self.w_out, self.group, self.kx, self.ky,
            self.geo, self.scale,
        )  # fmt: skip


def _channel_block(n: int, group: int, c_g: int) -> int:
    """Channels per backward task: all of a group's, split while there are few tasks."""
    block = c_g
    while n * group * -(-c_g // block) < _MIN_TASKS and block >= 2 * _MIN_BLOCK:
        block = -(-block // 2)
    return max(1, block)


@_numba_threads.scoped
def forward(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> Tensor:
    """DCNv3 core forward; see :func:`deformconv.kernels.dcnv_reference.forward`.

    Returns:
        (N, H_out, W_out, C), contiguous, in ``input``'s dtype.
    """
    p = _Problem(input, offset, mask, kernel_size, stride, padding, dilation, group,
                 offset_scale, remove_center)  # fmt: skip
    out = torch.empty(p.rows, p.channels, dtype=p.dtype)
    if p.rows > 0:
        _numba_threads.launch(_forward, *p.common(), out.numpy(), *p.geometry())
    return out.reshape(p.n, p.h_out, p.w_out, p.channels).to(input.dtype)


@_numba_threads.scoped
def backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for ``(input, offset, mask)``; see ``dcnv_reference.backward``.

    Returns:
        ``(grad_input, grad_offset, grad_mask)``, contiguous, shaped and typed like their
        arguments; bitwise reproducible whatever the thread count.
    """
    p = _Problem(input, offset, mask, kernel_size, stride, padding, dilation, group,
                 offset_scale, remove_center)  # fmt: skip
    c_g = p.channels // group
    block = _channel_block(p.n, group, c_g)
    n_blocks = -(-c_g // block)
    gout = grad_output.detach().to(p.dtype).contiguous().reshape(p.rows, p.channels)
    gx = torch.zeros_like(p.x)
    g_off = p.x.new_empty(n_blocks, *p.off.shape)
    g_mask = p.x.new_empty(n_blocks, *p.mask.shape)
    if p.rows > 0:
        _numba_threads.launch(
            _backward, *p.common(), gout.numpy(), gx.numpy(), g_off.numpy(), g_mask.numpy(),
            *p.geometry(), block,
        )  # fmt: skip
    grad_off, grad_m = g_off[0], g_mask[0]
    for i in range(1, n_blocks):  # a fixed order: reproducible
        grad_off = grad_off + g_off[i]
        grad_m = grad_m + g_mask[i]
    return (
        gx.reshape(input.shape).to(input.dtype),
        grad_off.reshape(offset.shape).to(offset.dtype),
        grad_m.reshape(mask.shape).to(mask.dtype),
    )
