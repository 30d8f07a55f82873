"""Triton DCNv3/DCNv4 core for CUDA: channels-last gather-accumulate, forward and backward.

Forward: a program takes a block of output pixels and one group; for each kernel point
it reads the offsets and the mask once, finds the four bilinear corners and accumulates
the group's channels (contiguous in channels-last memory, loaded as
(pixels, channels) tiles) into registers, then stores its block of the output.

Backward: a program takes the same (pixels, group) block; per kernel point it adds
``m·w_q·grad_out`` to ``grad_input`` at the four corners (atomic adds: corners are
shared between programs, so ``grad_input``'s last bits may vary between runs and
``DETERMINISTIC_BACKWARD = False`` makes ``torch.use_deterministic_algorithms(True)``
raise torch's error through the custom op) and reduces ``Σ_c grad_out · x[corner]``
over all the group's channels in registers, from which it writes the offset and mask
gradients of its own samples (plain stores: deterministic).

Memory safety: a position is tested with comparisons that are False for NaN
(``y >= -1 and y < H and x >= -1 and x < W``) and replaced by 0 when it fails, before it
is floored and turned into an integer, so NaN, infinite and huge offsets never form an
index; corner indices are clamped into the map and every load, store and atomic carries
a ``mask=``. Flat indices are 64-bit.

The same kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before Triton is imported), which is how CI tests them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["DETERMINISTIC_BACKWARD", "NATIVE_DTYPES", "backward", "forward"]

NATIVE_DTYPES = (torch.float32, torch.float64)
DETERMINISTIC_BACKWARD = False  # grad_input is accumulated with atomic adds


@triton.jit
def _geometry(
    off_ptr,
    mask_ptr,
    r,
    r_ok,
    g,
    p,
    G,
    P,
    H,
    W,
    W_OUT,
    L,
    SH,
    SW,
    BH,
    BW,
    K_H,
    DH,
    DW,
    CH,
    CW,
    CENTRE,
    scale,
    ACC: tl.constexpr,
):
    # Corners of point p of group g for the output rows r (global index n·L + l).
    q = p + (p >= CENTRE).to(tl.int32)  # CENTRE = P when no point is removed
    kx = ((q // K_H) * DW - CW).to(ACC)
    ky = ((q % K_H) * DH - CH).to(ACC)
    j = (r * G + g) * P + p  # int64: (row, group, point)
    dx = tl.load(off_ptr + 2 * j, mask=r_ok, other=0.0).to(ACC)
    dy = tl.load(off_ptr + 2 * j + 1, mask=r_ok, other=0.0).to(ACC)
    m = tl.load(mask_ptr + j, mask=r_ok, other=0.0).to(ACC)
    n = r // L
    ll = r % L
    by = ((ll // W_OUT) * SH + BH).to(ACC)
    bx = ((ll % W_OUT) * SW + BW).to(ACC)
    x = bx + (kx + dx) * scale
    y = by + (ky + dy) * scale
    inside = r_ok & (y >= -1) & (y < H) & (x >= -1) & (x < W)  # False for NaN
    y = tl.where(inside, y, 0.0)
    x = tl.where(inside, x, 0.0)
    y0 = tl.floor(y)
    x0 = tl.floor(x)
    ly = y - y0
    lx = x - x0
    iy0 = y0.to(tl.int32)  # in [-1, H) here, so the conversion is exact
    ix0 = x0.to(tl.int32)
    ok_y0 = inside & (iy0 >= 0)
    ok_y1 = inside & (iy0 + 1 < H)
    ok_x0 = ix0 >= 0
    ok_x1 = ix0 + 1 < W
    ry0 = tl.maximum(iy0, 0)
    ry1 = tl.minimum(iy0 + 1, H - 1)
    rx0 = tl.maximum(ix0, 0)
    rx1 = tl.minimum(ix0 + 1, W - 1)
    pix = n * H * W
    i00 = pix + ry0 * W + rx0
    i01 = pix + ry0 * W + rx1
    i10 = pix + ry1 * W + rx0
    i11 = pix + ry1 * W + rx1
    ok00 = ok_y0 & ok_x0
    ok01 = ok_y0 & ok_x1
    ok10 = ok_y1 & ok_x0
    ok11 = ok_y1 & ok_x1
    return j, inside, m, ly, lx, i00, i01, i10, i11, ok00, ok01, ok10, ok11


@triton.jit
def _forward_kernel(
    x_ptr,
    off_ptr,
    mask_ptr,
    out_ptr,
    R,
    C,
    C_G,
    G,
    P,
    H,
    W,
    W_OUT,
    L,
    SH,
    SW,
    BH,
    BW,
    K_H,
    DH,
    DW,
    CH,
    CW,
    CENTRE,
    scale,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    g = tl.program_id(1)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    for c0 in range(0, C_G, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C_G
        col = (g * C_G + c).to(tl.int64)[None, :]
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
        for p in range(P):
            _, _, m, ly, lx, i00, i01, i10, i11, ok00, ok01, ok10, ok11 = _geometry(
                off_ptr, mask_ptr, r, r_ok, g, p, G, P, H, W, W_OUT, L, SH, SW, BH, BW,
                K_H, DH, DW, CH, CW, CENTRE, scale, ACC,
            )  # fmt: skip
            hy = 1.0 - ly
            hx = 1.0 - lx
            cm = c_ok[None, :]
            v00 = tl.load(x_ptr + i00[:, None] * C + col, mask=ok00[:, None] & cm, other=0.0)
            v01 = tl.load(x_ptr + i01[:, None] * C + col, mask=ok01[:, None] & cm, other=0.0)
            v10 = tl.load(x_ptr + i10[:, None] * C + col, mask=ok10[:, None] & cm, other=0.0)
            v11 = tl.load(x_ptr + i11[:, None] * C + col, mask=ok11[:, None] & cm, other=0.0)
            top = v00.to(ACC) * hx[:, None] + v01.to(ACC) * lx[:, None]
            bottom = v10.to(ACC) * hx[:, None] + v11.to(ACC) * lx[:, None]
            acc += (top * hy[:, None] + bottom * ly[:, None]) * m[:, None]
        dst = out_ptr + r[:, None] * C + col
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _backward_kernel(
    x_ptr,
    off_ptr,
    mask_ptr,
    gout_ptr,
    gx_ptr,
    goff_ptr,
    gmask_ptr,
    R,
    C,
    C_G,
    G,
    P,
    H,
    W,
    W_OUT,
    L,
    SH,
    SW,
    BH,
    BW,
    K_H,
    DH,
    DW,
    CH,
    CW,
    CENTRE,
    scale,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    g = tl.program_id(1)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    for p in range(P):
        j, inside, m, ly, lx, i00, i01, i10, i11, ok00, ok01, ok10, ok11 = _geometry(
            off_ptr, mask_ptr, r, r_ok, g, p, G, P, H, W, W_OUT, L, SH, SW, BH, BW,
            K_H, DH, DW, CH, CW, CENTRE, scale, ACC,
        )  # fmt: skip
        hy = 1.0 - ly
        hx = 1.0 - lx
        d00 = tl.zeros((BLOCK_R,), dtype=ACC)
        d01 = tl.zeros((BLOCK_R,), dtype=ACC)
        d10 = tl.zeros((BLOCK_R,), dtype=ACC)
        d11 = tl.zeros((BLOCK_R,), dtype=ACC)
        for c0 in range(0, C_G, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = (c < C_G)[None, :]
            col = (g * C_G + c).to(tl.int64)[None, :]
            go = tl.load(gout_ptr + r[:, None] * C + col, mask=r_ok[:, None] & cm, other=0.0)
            go = go.to(ACC)
            a00 = i00[:, None] * C + col
            a01 = i01[:, None] * C + col
            a10 = i10[:, None] * C + col
            a11 = i11[:, None] * C + col
            k00 = ok00[:, None] & cm
            k01 = ok01[:, None] & cm
            k10 = ok10[:, None] & cm
            k11 = ok11[:, None] & cm
            d00 += tl.sum(go * tl.load(x_ptr + a00, mask=k00, other=0.0).to(ACC), axis=1)
            d01 += tl.sum(go * tl.load(x_ptr + a01, mask=k01, other=0.0).to(ACC), axis=1)
            d10 += tl.sum(go * tl.load(x_ptr + a10, mask=k10, other=0.0).to(ACC), axis=1)
            d11 += tl.sum(go * tl.load(x_ptr + a11, mask=k11, other=0.0).to(ACC), axis=1)
            gm = go * m[:, None]
            tl.atomic_add(gx_ptr + a00, gm * (hy * hx)[:, None], mask=k00)
            tl.atomic_add(gx_ptr + a01, gm * (hy * lx)[:, None], mask=k01)
            tl.atomic_add(gx_ptr + a10, gm * (ly * hx)[:, None], mask=k10)
            tl.atomic_add(gx_ptr + a11, gm * (ly * lx)[:, None], mask=k11)
        grad_m = hy * hx * d00 + hy * lx * d01 + ly * hx * d10 + ly * lx * d11
        ms = m * scale
        grad_x = (hy * (d01 - d00) + ly * (d11 - d10)) * ms
        grad_y = (hx * (d10 - d00) + lx * (d11 - d01)) * ms
        tl.store(gmask_ptr + j, tl.where(inside, grad_m, 0.0), mask=r_ok)
        tl.store(goff_ptr + 2 * j, tl.where(inside, grad_x, 0.0), mask=r_ok)
        tl.store(goff_ptr + 2 * j + 1, tl.where(inside, grad_y, 0.0), mask=r_ok)


def _arguments(
    input: Tensor,
    offset: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> tuple[tuple[object, ...], dict[str, object], tuple[int, int]]:
    """Scalar kernel arguments, meta-parameters and the launch grid of one call."""
    n, h, w, c = input.shape
    _, h_out, w_out, _ = offset.shape
    (k_h, k_w), (d_h, d_w) = kernel_size, dilation
    c_h, c_w = d_h * (k_h - 1) // 2, d_w * (k_w - 1) // 2
    points = k_h * k_w - int(remove_center)
    centre = (k_w // 2) * k_h + k_h // 2 if remove_center else points
    rows = n * h_out * w_out
    c_g = c // group
    scalars = (
        rows, c, c_g, group, points, h, w, w_out, h_out * w_out, stride[0], stride[1],
        c_h - padding[0], c_w - padding[1], k_h, d_h, d_w, c_h, c_w, centre, offset_scale,
    )  # fmt: skip
    interpreted = input.device.type == "cpu"  # fewer, larger programs for the interpreter
    block_r = 64 if interpreted else 32
    meta = {
        "ACC": tl.float64 if input.dtype == torch.float64 else tl.float32,
        "BLOCK_R": block_r,
        "BLOCK_C": min(64, triton.next_power_of_2(c_g)),
    }
    return scalars, meta, (triton.cdiv(rows, block_r), group)


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
        (N, H_out, W_out, C), contiguous, in ``input``'s dtype (float32 or float64).
    """
    input, offset, mask = input.contiguous(), offset.contiguous(), mask.contiguous()
    out = input.new_empty(*offset.shape[:3], input.shape[3])
    scalars, meta, grid = _arguments(input, offset, kernel_size, stride, padding, dilation,
                                     group, offset_scale, remove_center)  # fmt: skip
    if out.numel() > 0:
        _forward_kernel[grid](input, offset, mask, out, *scalars, **meta)
    return out


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
        arguments; ``grad_input`` is summed with atomic adds.
    """
    grad_output = grad_output.contiguous()
    input, offset, mask = input.contiguous(), offset.contiguous(), mask.contiguous()
    grad_input = torch.zeros_like(input)
    grad_offset = torch.zeros_like(offset)
    grad_mask = torch.zeros_like(mask)
    scalars, meta, grid = _arguments(input, offset, kernel_size, stride, padding, dilation,
                                     group, offset_scale, remove_center)  # fmt: skip
    if grad_output.numel() > 0:
        _backward_kernel[grid](
            input, offset, mask, grad_output, grad_input, grad_offset, grad_mask, *scalars,
            **meta,
        )  # fmt: skip
    return grad_input, grad_offset, grad_mask
