"""Direct Triton deformable convolution for narrow groups (grouped, depthwise): no GEMM.

The GPU counterpart of :mod:`deformconv.kernels._numba_direct`. A program owns a block of
``BLOCK_R`` output pixels and one weight group; for every kernel point and every input
channel of the group it gathers the bilinear sample of each pixel once and multiplies it
by the group's ``C_out/groups`` weights in registers: ``acc[r, j] += sample[r] · w[j]``.
No column buffer is written.

Backward, same grid: the program reloads its ``grad_output`` tile and, per kernel point
and channel, forms the sample's gradient ``gs[r] = Σ_j grad_out[r, j] · w[j]``; the four
corners of ``grad_input``, the offset and mask gradients and the group's weight gradient
are accumulated with atomic adds (several programs touch the same elements), so the last
bits may vary between runs (``DETERMINISTIC_BACKWARD = False``).

Boundary rule and memory safety as in :mod:`deformconv.kernels._triton`: a position is
tested with comparisons that are False for NaN and replaced by 0 before it is floored;
corner indices are clamped into the map and every load, store and atomic carries a mask;
flat indices are 64-bit. The kernels run on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["DETERMINISTIC_BACKWARD", "backward", "forward"]

DETERMINISTIC_BACKWARD = False  # gradients are accumulated with atomic adds


@triton.jit
def _sample(
    x_ptr,
    off_ptr,
    mask_ptr,
    n,
    ll,
    r_ok,
    c,
    kp,
    C_in,
    H,
    W,
    W_out,
    L,
    C_PER_OFF,
    N_OFF,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    K: tl.constexpr,
    K_W: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
):
    # Bilinear sample of channel c at kernel point kp for the pixels (n, ll): the corner
    # values (0 outside), the fractional parts, the mask and the addresses needed by the
    # backward.
    gk = (c // C_PER_OFF) * K + kp
    off_addr = (n * (2 * N_OFF * K) + 2 * gk) * L + ll
    dy = tl.load(off_ptr + off_addr, mask=r_ok, other=0.0).to(ACC)
    dx = tl.load(off_ptr + off_addr + L, mask=r_ok, other=0.0).to(ACC)
    ho = ll // W_out
    wo = ll % W_out
    y = (ho * SH - PH + (kp // K_W) * DH).to(ACC) + dy
    x = (wo * SW - PW + (kp % K_W) * DW).to(ACC) + dx
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
    plane = (n * C_in + c) * H * W
    a00 = plane + ry0 * W + rx0
    a01 = plane + ry0 * W + rx1
    a10 = plane + ry1 * W + rx0
    a11 = plane + ry1 * W + rx1
    ok00 = ok_y0 & ok_x0
    ok01 = ok_y0 & ok_x1
    ok10 = ok_y1 & ok_x0
    ok11 = ok_y1 & ok_x1
    v00 = tl.load(x_ptr + a00, mask=ok00, other=0.0).to(ACC)
    v01 = tl.load(x_ptr + a01, mask=ok01, other=0.0).to(ACC)
    v10 = tl.load(x_ptr + a10, mask=ok10, other=0.0).to(ACC)
    v11 = tl.load(x_ptr + a11, mask=ok11, other=0.0).to(ACC)
    if HAS_MASK:
        m = tl.load(mask_ptr + (n * (N_OFF * K) + gk) * L + ll, mask=r_ok, other=0.0).to(ACC)
    else:
        m = tl.full(ly.shape, 1.0, ACC)
    return (
        inside, off_addr, gk, ly, lx, m, v00, v01, v10, v11,
        a00, a01, a10, a11, ok00, ok01, ok10, ok11,
    )  # fmt: skip


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
    N_OFF,
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
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    # out[n, wg·COG + j, l] = b + Σ_{k, i} w[wg·COG + j, i, k] · m · bilinear(x[n, wg·C_PG + i])
    wg = tl.program_id(1)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    n = r // L
    ll = r % L
    j = tl.arange(0, BLOCK_J)
    j_ok = j < COG
    co = wg * COG + j
    acc = tl.zeros((BLOCK_R, BLOCK_J), dtype=ACC)
    for kp in range(K):
        for i in range(C_PG):
            c = wg * C_PG + i
            (_, _, _, ly, lx, m, v00, v01, v10, v11, _, _, _, _, _, _, _, _) = _sample(
                x_ptr, off_ptr, mask_ptr, n, ll, r_ok, c, kp, C_in, H, W, W_out, L,
                C_PER_OFF, N_OFF, SH, SW, PH, PW, DH, DW, K, K_W, HAS_MASK, ACC,
            )  # fmt: skip
            val = (
                (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)
            ) * m
            wv = tl.load(w_ptr + (co * C_PG + i) * K + kp, mask=j_ok, other=0.0).to(ACC)
            acc += val[:, None] * wv[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=j_ok, other=0.0).to(ACC)[None, :]
    c_out = (C_in // C_PG) * COG
    dst = (n[:, None] * c_out + co[None, :]) * L + ll[:, None]
    tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & j_ok[None, :])


@triton.jit
def _backward_kernel(
    x_ptr,
    off_ptr,
    mask_ptr,
    w_ptr,
    go_ptr,
    gx_ptr,
    goff_ptr,
    gmask_ptr,
    gw_ptr,
    rows,
    C_in,
    H,
    W,
    W_out,
    L,
    C_PG,
    COG,
    C_PER_OFF,
    N_OFF,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    K: tl.constexpr,
    K_W: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_OFF: tl.constexpr,
    NEED_W: tl.constexpr,
):
    # NEED_X / NEED_OFF / NEED_W: which gradients to accumulate (input; offset and mask;
    # weight); the others' atomic adds are compiled out.
    wg = tl.program_id(1)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    n = r // L
    ll = r % L
    j = tl.arange(0, BLOCK_J)
    j_ok = j < COG
    co = wg * COG + j
    c_out = (C_in // C_PG) * COG
    tile = r_ok[:, None] & j_ok[None, :]
    go = tl.load(
        go_ptr + (n[:, None] * c_out + co[None, :]) * L + ll[:, None], mask=tile, other=0.0
    )
    go = go.to(ACC)
    for kp in range(K):
        for i in range(C_PG):
            c = wg * C_PG + i
            (inside, off_addr, gk, ly, lx, m, v00, v01, v10, v11,
             a00, a01, a10, a11, ok00, ok01, ok10, ok11) = _sample(
                x_ptr, off_ptr, mask_ptr, n, ll, r_ok, c, kp, C_in, H, W, W_out, L,
                C_PER_OFF, N_OFF, SH, SW, PH, PW, DH, DW, K, K_W, HAS_MASK, ACC,
            )  # fmt: skip
            hy = 1.0 - ly
            hx = 1.0 - lx
            val = hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11)
            w_addr = (co * C_PG + i) * K + kp
            wv = tl.load(w_ptr + w_addr, mask=j_ok, other=0.0).to(ACC)
            gs = tl.sum(go * wv[None, :], axis=1)  # d loss / d (m · sample), per pixel
            if NEED_W:
                gw = tl.sum(go * (val * m)[:, None], axis=0)
                tl.atomic_add(gw_ptr + w_addr, gw, mask=j_ok)
            gsm = gs * m
            if NEED_X:
                tl.atomic_add(gx_ptr + a00, gsm * hy * hx, mask=ok00)
                tl.atomic_add(gx_ptr + a01, gsm * hy * lx, mask=ok01)
                tl.atomic_add(gx_ptr + a10, gsm * ly * hx, mask=ok10)
                tl.atomic_add(gx_ptr + a11, gsm * ly * lx, mask=ok11)
            if NEED_OFF:
                dvdy = (v10 - v00) * hx + (v11 - v01) * lx
                dvdx = (v01 - v00) * hy + (v11 - v10) * ly
                gy = tl.where(inside, gsm * dvdy, 0.0)
                tl.atomic_add(goff_ptr + off_addr, gy, mask=r_ok)
                tl.atomic_add(goff_ptr + off_addr + L, tl.where(inside, gsm * dvdx, 0.0), mask=r_ok)
                if HAS_MASK:
                    g_m = gs * val
                    tl.atomic_add(gmask_ptr + (n * (N_OFF * K) + gk) * L + ll, g_m, mask=r_ok)


def _launch_args(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, ...], dict[str, object]]:
    n, c_in, h, w = input.shape
    c_out, c_pg, k_h, k_w = weight.shape
    groups = c_in // c_pg
    k = k_h * k_w
    n_off = offset.shape[1] // (2 * k)
    w_out = offset.shape[3]
    length = offset.shape[2] * w_out
    rows = n * length
    block_r = 64
    grid = (triton.cdiv(rows, block_r), groups)
    args = (
        rows, c_in, h, w, w_out, length, c_pg, c_out // groups, c_in // n_off, n_off,
        *stride, *padding, *dilation,
    )  # fmt: skip
    meta: dict[str, object] = {
        "K": k,
        "K_W": k_w,
        "ACC": tl.float64 if input.dtype == torch.float64 else tl.float32,
        "BLOCK_R": block_r,
        "BLOCK_J": triton.next_power_of_2(c_out // groups),
    }
    return grid, args, meta


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
    """Deformable convolution forward by the direct kernel (arguments validated).

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
    out = input.new_empty(input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])
    if out.numel() == 0:
        return out
    grid, args, meta = _launch_args(input, offset, weight, stride, padding, dilation)
    _forward_kernel[grid](
        input,
        offset,
        offset if mask is None else mask,  # never read without HAS_MASK
        weight,
        weight if bias is None else bias.to(input.dtype).contiguous(),  # read with HAS_BIAS
        out,
        *args,
        HAS_MASK=mask is not None,
        HAS_BIAS=bias is not None,
        **meta,
    )
    return out


def backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    needs_grad: tuple[bool, bool, bool, bool, bool] = (True, True, True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`forward` for ``(input, offset, mask, weight, bias)``.

    Args: as :func:`forward`, plus ``grad_output`` (N, C_out, H_out, W_out) and
    ``needs_grad`` (which of ``(input, offset, mask, weight, bias)`` to compute; the
    offset and mask gradients come from the same sums, so either asks for both sums).

    Returns:
        Gradients shaped and typed like ``(input, offset, mask, weight, bias)``; None for
        an argument that is None or whose gradient is not needed. Summed with atomic adds:
        the last bits may vary between runs.
    """
    dtype = input.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    input = input.contiguous()
    offset_c = offset.to(dtype).contiguous()
    mask_c = None if mask is None else mask.to(dtype).contiguous()
    weight_c = weight.to(dtype).contiguous()
    need_x, need_off, need_mask, need_w, need_b = needs_grad
    need_mask = need_mask and mask is not None

    def buffer(shape: Sequence[int], needed: bool) -> Tensor:  # unneeded: never written
        return torch.zeros(shape if needed else (1,), dtype=acc, device=input.device)

    gx = buffer(input.shape, need_x)
    g_off = buffer(offset.shape, need_off or need_mask)
    g_mask = buffer(mask.shape if mask is not None else (1,), need_off or need_mask)
    g_w = buffer(weight.shape, need_w)
    if grad_output.numel() > 0 and (need_x or need_off or need_mask or need_w):
        grid, args, meta = _launch_args(input, offset_c, weight_c, stride, padding, dilation)
        _backward_kernel[grid](
            input,
            offset_c,
            offset_c if mask_c is None else mask_c,  # never read without HAS_MASK
            weight_c,
            grad_output.to(dtype).contiguous(),
            gx,
            g_off,
            g_mask,
            g_w,
            *args,
            HAS_MASK=mask is not None,
            NEED_X=need_x,
            NEED_OFF=need_off or need_mask,
            NEED_W=need_w,
            **meta,
        )
    grad_bias = None
    if bias is not None and need_b:
        grad_bias = grad_output.sum((0, 2, 3), dtype=acc).to(bias.dtype)
    return (
        gx.to(dtype) if need_x else None,
        g_off.to(offset.dtype) if need_off else None,
        g_mask.to(mask.dtype) if need_mask and mask is not None else None,
        g_w.to(weight.dtype) if need_w else None,
        grad_bias,
    )
