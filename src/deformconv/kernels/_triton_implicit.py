"""Implicit-GEMM Triton forward: bilinear samples gathered into ``tl.dot`` tiles, no columns.

The column forward of :mod:`deformconv.kernels._triton` writes every modulated sample to
a column buffer, ``(C_in·K_h·K_w, R)`` values, and reads it back in a cuBLAS GEMM. Here a
program owns a tile of ``BLOCK_N`` output channels (of one weight group) by ``BLOCK_M``
output pixels and walks the reduction dimension, kernel point by kernel point and
``BLOCK_C`` input channels at a time:

1. the sampling geometry of its pixels at the kernel point (offsets, the four corners,
   their bilinear weights, the mask), found once per kernel point when every channel of
   the group shares one offset group (``offset_groups = 1``, the usual case), else once
   per channel block and lane;
2. the ``(BLOCK_C, BLOCK_M)`` tile of modulated samples, gathered from the four corners
   and blended in float32 (float64 for float64 tensors), then cast to the dot's operand
   dtype;
3. ``acc += W_tile @ samples``: a ``(BLOCK_N, BLOCK_C)`` tile of the weight at that kernel
   point times the samples, on the tensor cores (float16/bfloat16, and float32 as TF32
   when ``torch.backends.cuda.matmul.allow_tf32`` allows it, else full float32).

The output tile is written once, contiguous along the pixels. No workspace, no chunking,
and one launch per call; the backward stays the column kernels' (its GEMMs need the
columns anyway).

Boundary rule and memory safety as in :mod:`deformconv.kernels._triton` (the geometry is
that module's ``_sample_geometry``): positions failing comparisons that are False for
NaN read 0, corner indices are clamped into the map, every load and store is masked and
flat indices are 64-bit. The kernel runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from deformconv.kernels._triton import _sample_geometry

__all__ = ["forward", "launch_config"]

#: Tile sizes: output pixels, output channels and input channels per reduction step
#: (``tl.dot`` needs every dimension to be at least 16).
BLOCK_M = 64
MAX_BLOCK_N = 64
MAX_BLOCK_C = 32
_MIN_DOT = 16


@triton.jit
def _forward_kernel(
    x_ptr,
    off_ptr,
    mask_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    rows,
    C_in,
    H,
    W,
    W_out,
    L,
    C_PG,
    COG,
    C_PER_OFF,
    GK2,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    K: tl.constexpr,
    K_W: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SHARED_GEOMETRY: tl.constexpr,
    ACC: tl.constexpr,
    ROUND: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # out[n, wg·COG + j, l] = b + Σ_{k, i} w[wg·COG + j, i, k] · m · bilinear(x[n, wg·C_PG + i])
    wg = tl.program_id(2)
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < rows
    n = (r // L)[None, :]
    ll = (r % L)[None, :]
    pix_ok = r_ok[None, :]
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < COG
    co = (wg * COG + j).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
    for kp in range(K):
        if SHARED_GEOMETRY:  # the group's channels all read offset group wg·C_PG // C_PER_OFF
            gk = tl.zeros((1, 1), tl.int64) + ((wg * C_PG) // C_PER_OFF * K + kp)
            geo = _sample_geometry(
                off_ptr, mask_ptr, n, ll, pix_ok, gk, kp, H, W, W_out, L, GK2,
                SH, SW, PH, PW, DH, DW, K_W, HAS_MASK, ACC,
            )  # fmt: skip
        for c0 in range(0, C_PG, BLOCK_C):
            i = c0 + tl.arange(0, BLOCK_C)
            i_ok = i < C_PG
            c = (wg * C_PG + tl.minimum(i, C_PG - 1))[:, None].to(tl.int64)
            if not SHARED_GEOMETRY:  # per channel lane: its own offset group
                geo = _sample_geometry(
                    off_ptr, mask_ptr, n, ll, pix_ok, (c // C_PER_OFF) * K + kp, kp,
                    H, W, W_out, L, GK2, SH, SW, PH, PW, DH, DW, K_W, HAS_MASK, ACC,
                )  # fmt: skip
            _, _, ly, lx, ok_y0, ok_y1, ok_x0, ok_x1, ry0, ry1, rx0, rx1, m = geo
            plane = (n * C_in + c) * H * W
            ok = i_ok[:, None] & pix_ok
            v00 = tl.load(x_ptr + plane + ry0 * W + rx0, mask=ok & ok_y0 & ok_x0, other=0.0)
            v01 = tl.load(x_ptr + plane + ry0 * W + rx1, mask=ok & ok_y0 & ok_x1, other=0.0)
            v10 = tl.load(x_ptr + plane + ry1 * W + rx0, mask=ok & ok_y1 & ok_x0, other=0.0)
            v11 = tl.load(x_ptr + plane + ry1 * W + rx1, mask=ok & ok_y1 & ok_x1, other=0.0)
            top = (1.0 - lx) * v00.to(ACC) + lx * v01.to(ACC)
            bottom = (1.0 - lx) * v10.to(ACC) + lx * v11.to(ACC)
            samples = ((1.0 - ly) * top + ly * bottom) * m
            w_addr = (co[:, None] * C_PG + i[None, :]) * K + kp
            w_tile = tl.load(w_ptr + w_addr, mask=j_ok[:, None] & i_ok[None, :], other=0.0)
            a = w_tile.to(ROUND).to(DOT)
            b = samples.to(ROUND).to(DOT)
            acc += tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=j_ok, other=0.0).to(ACC)[:, None]
    c_out = (C_in // C_PG) * COG
    dst = (n * c_out + co[:, None]) * L + ll
    tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=j_ok[:, None] & pix_ok)


def _dot_setup(dtype: torch.dtype, interpreted: bool) -> dict[str, object]:
    """Accumulator, operand rounding, operand dtype and input precision of the dot.

    Operands are rounded to ``ROUND`` (the input dtype, as the column path's buffer
    stores them) and multiplied as ``DOT``. Triton's interpreter multiplies the raw bit
    patterns of bfloat16 operands, so there bfloat16-rounded values are multiplied as
    float32: the same products, exactly, accumulated in float32 as on the tensor cores.
    """
    if dtype == torch.float64:
        return {"ACC": tl.float64, "ROUND": tl.float64, "DOT": tl.float64, "PRECISION": "ieee"}
    if dtype in (torch.float16, torch.bfloat16):
        half = tl.float16 if dtype == torch.float16 else tl.bfloat16
        dot = tl.float32 if interpreted and dtype == torch.bfloat16 else half
        return {"ACC": tl.float32, "ROUND": half, "DOT": dot, "PRECISION": "ieee"}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if tf32 else "ieee"
    return {"ACC": tl.float32, "ROUND": tl.float32, "DOT": tl.float32, "PRECISION": precision}


def launch_config(
    input: Tensor, offset: Tensor, weight: Tensor
) -> tuple[tuple[int, int, int], dict[str, object]]:
    """Grid and compile-time constants of :func:`forward`'s kernel for these shapes."""
    n, c_in = input.shape[:2]
    c_out, c_pg, k_h, k_w = weight.shape
    groups = c_in // c_pg
    n_off = offset.shape[1] // (2 * k_h * k_w)
    rows = n * offset.shape[2] * offset.shape[3]
    block_n = min(MAX_BLOCK_N, max(_MIN_DOT, triton.next_power_of_2(c_out // groups)))
    block_c = min(MAX_BLOCK_C, max(_MIN_DOT, triton.next_power_of_2(c_pg)))
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(c_out // groups, block_n), groups)
    meta: dict[str, object] = {
        "K": k_h * k_w,
        "K_W": k_w,
        "SHARED_GEOMETRY": (c_in // n_off) % c_pg == 0,
        **_dot_setup(input.dtype, interpreted=input.device.type == "cpu"),
        "BLOCK_M": BLOCK_M,
        "BLOCK_N": block_n,
        "BLOCK_C": block_c,
    }
    return grid, meta


def forward(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """Deformable convolution forward as one implicit GEMM (arguments validated).

    Args:
        input: (N, C_in, H_in, W_in), CUDA (or CPU under the Triton interpreter).
        offset: (N, 2·G·K_h·K_w, H_out, W_out).
        mask: (N, G·K_h·K_w, H_out, W_out) or None.
        weight: (C_out, C_in/groups, K_h, K_w).
        bias: (C_out,) or None.
        stride: (s_h, s_w).
        padding: (p_h, p_w).
        dilation: (d_h, d_w).

    Returns:
        (N, C_out, H_out, W_out) in ``input``'s dtype.
    """
    input = input.contiguous()
    offset = offset.to(input.dtype).contiguous()
    mask = None if mask is None else mask.to(input.dtype).contiguous()
    weight = weight.to(input.dtype).contiguous()
    n, c_in, h, w = input.shape
    c_out, c_pg, k_h, k_w = weight.shape
    out = input.new_empty(n, c_out, offset.shape[2], offset.shape[3])
    if out.numel() == 0:
        return out
    grid, meta = launch_config(input, offset, weight)
    length = offset.shape[2] * offset.shape[3]
    _forward_kernel[grid](
        input,
        offset,
        offset if mask is None else mask,  # never read without HAS_MASK
        weight,
        weight if bias is None else bias.to(input.dtype).contiguous(),  # read with HAS_BIAS
        out,
        n * length,
        c_in,
        h,
        w,
        offset.shape[3],
        length,
        c_pg,
        c_out // (c_in // c_pg),
        c_in // (offset.shape[1] // (2 * k_h * k_w)),
        offset.shape[1],
        *stride,
        *padding,
        *dilation,
        HAS_MASK=mask is not None,
        HAS_BIAS=bias is not None,
        **meta,
    )
    return out
