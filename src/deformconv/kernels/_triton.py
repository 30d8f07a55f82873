"""Triton deformable convolution for CUDA: a fused bilinear gather around cuBLAS GEMMs.

Forward, per chunk of output pixels (``B`` whole images, or a range of the pixels of one
image when an image does not fit the workspace; ``R`` pixels in all):

1. ``im2col`` (Triton): each program takes a block of output pixels, one kernel point of
   one offset group and a block of the group's input channels; it reads the offsets (and
   mask) once, finds the four bilinear corners, blends them in float32 (float64 for
   float64 tensors) and writes the modulated samples to a column buffer
   ``(C_in·K_h·K_w, R)`` whose row ``c·K_h·K_w + k`` is what weight column
   ``(c mod C_in/groups, k)`` multiplies. Writes are contiguous along the pixels.
2. one batched GEMM per chunk, ``(groups, C_out/groups, C_in/groups·K) @ (groups, ·, R)``.

Backward, per chunk: ``grad_W += grad_out · colsᵀ`` and ``grad_cols = Wᵀ · grad_out``
are GEMMs; ``col2im`` (Triton) adds the chunk's share to ``grad_input`` (atomic adds into a
float32/float64 buffer, hence not bitwise reproducible: ``DETERMINISTIC_BACKWARD = False`` makes
``torch.use_deterministic_algorithms(True)`` raise torch's error through the custom op)
and the offset and mask gradients, which are reductions over the channels of a sample:
a program owns a sample (block of pixels × kernel point × offset group) and a slice of
the group's channels, writes its partial sums to its own slot, and the slots are summed
in a fixed order afterwards, so those need no atomics and are deterministic. (Slicing
the channels keeps the GPU busy when there are few samples, e.g. 7x7 maps.) Only the
gradients asked for (``needs_grad``) are computed: no column recomputation and weight
GEMM for a frozen weight, no ``col2im`` when neither the input nor the offsets and mask
need a gradient, and inside ``col2im`` no atomics without an input gradient and no
reductions without offset or mask gradients.

Boundary rule and memory safety: a position is tested with comparisons that are False
for NaN (``y >= -1 and y < H and x >= -1 and x < W``) and replaced by 0 when it fails,
before it is floored and turned into an integer, so NaN, infinite and huge offsets never
form an index; corner indices are clamped into the map and every load, store and atomic
carries a ``mask=``. Flat indices are 64-bit.

float16/bfloat16 tensors are served natively: samples are blended in float32 and stored
in the input dtype for the tensor-core GEMM (which accumulates in float32); gradients
of input, weight and bias accumulate in float32 buffers and are cast back once.

The same kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before Triton is imported), which is how CI tests them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from deformconv.kernels._chunks import Chunk, plan_chunks

__all__ = [
    "DETERMINISTIC_BACKWARD",
    "NATIVE_DTYPES",
    "WORKSPACE_BYTES",
    "backward",
    "forward",
]

NATIVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DETERMINISTIC_BACKWARD = False  # grad_input is accumulated with atomic adds

# Cap on the column workspace (columns, plus grad columns in backward): output pixels are
# processed in chunks whose buffers fit in this many bytes: whole images when one fits,
# otherwise ranges of the pixels of one image (always at least one pixel per chunk).
WORKSPACE_BYTES = 256 * 2**20
# col2im splits a sample's channels over programs until about this many run at once.
_COL2IM_PROGRAMS = 4096


@triton.jit
def _sample_geometry(
    off_ptr,
    mask_ptr,
    n,
    ll,
    r_ok,
    gk,
    kp,
    H,
    W,
    W_out,
    L,
    GK2,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    K_W: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
):
    # Everything a block of samples (pixels ``ll`` of images ``n``, kernel point ``kp`` of
    # offset-group-and-point ``gk``) needs: the offset address, the clamped corner rows and
    # columns, the corner validity flags, the fractional parts and the mask value.
    off_addr = (n * GK2 + 2 * gk) * L + ll  # int64: channel 2·gk is Δy, 2·gk + 1 is Δx
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
    if HAS_MASK:
        m = tl.load(mask_ptr + (n * (GK2 // 2) + gk) * L + ll, mask=r_ok, other=0.0).to(ACC)
    else:
        m = tl.full(ly.shape, 1.0, ACC)
    return off_addr, inside, ly, lx, ok_y0, ok_y1, ok_x0, ok_x1, ry0, ry1, rx0, rx1, m


@triton.jit
def _im2col_kernel(
    x_ptr,
    off_ptr,
    mask_ptr,
    cols_ptr,
    n0,
    l0,
    span,
    rows,
    C_in,
    C_per_off,
    H,
    W,
    W_out,
    L,
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
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # cols[c·K + kp, r] = m · bilinear(x[n, c], position) for the chunk's pixel r: image
    # n = n0 + r // span, pixel l = l0 + r % span of the image.
    gk = tl.program_id(1)
    g = gk // K
    kp = gk % K
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    n = n0 + r // span
    ll = l0 + r % span
    _, _, ly, lx, ok_y0, ok_y1, ok_x0, ok_x1, ry0, ry1, rx0, rx1, m = _sample_geometry(
        off_ptr, mask_ptr, n, ll, r_ok, gk, kp, H, W, W_out, L, GK2,
        SH, SW, PH, PW, DH, DW, K_W, HAS_MASK, ACC,
    )  # fmt: skip
    hy = 1.0 - ly
    hx = 1.0 - lx
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C_per_off
    cg = (g * C_per_off + c).to(tl.int64)
    plane = ((n[None, :] * C_in + cg[:, None]) * H) * W  # (BLOCK_C, BLOCK_R)
    cm = c_ok[:, None]
    ok00 = cm & (ok_y0 & ok_x0)[None, :]
    ok01 = cm & (ok_y0 & ok_x1)[None, :]
    ok10 = cm & (ok_y1 & ok_x0)[None, :]
    ok11 = cm & (ok_y1 & ok_x1)[None, :]
    v00 = tl.load(x_ptr + plane + (ry0 * W + rx0)[None, :], mask=ok00, other=0.0).to(ACC)
    v01 = tl.load(x_ptr + plane + (ry0 * W + rx1)[None, :], mask=ok01, other=0.0).to(ACC)
    v10 = tl.load(x_ptr + plane + (ry1 * W + rx0)[None, :], mask=ok10, other=0.0).to(ACC)
    v11 = tl.load(x_ptr + plane + (ry1 * W + rx1)[None, :], mask=ok11, other=0.0).to(ACC)
    val = (v00 * hx[None, :] + v01 * lx[None, :]) * (hy * m)[None, :] + (
        v10 * hx[None, :] + v11 * lx[None, :]
    ) * (ly * m)[None, :]
    dst = (cg[:, None] * K + kp) * rows + r[None, :]
    tl.store(cols_ptr + dst, val.to(cols_ptr.dtype.element_ty), mask=cm & r_ok[None, :])


@triton.jit
def _col2im_kernel(
    x_ptr,
    off_ptr,
    mask_ptr,
    gcols_ptr,
    gx_ptr,
    part_ptr,
    n0,
    l0,
    span,
    rows,
    C_in,
    C_per_off,
    H,
    W,
    W_out,
    L,
    GK2,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    C_SPLIT,
    K: tl.constexpr,
    K_W: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_OFF: tl.constexpr,
    NEED_MASK: tl.constexpr,
    READ_X: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # For the samples of this program (pixels r, point kp of group g) and the channels
    # c of the group in [split·C_SPLIT, (split + 1)·C_SPLIT), with gc = grad_cols[c·K + kp, r]:
    #   grad_x[corner] += gc · m · corner weight          (atomic: corners are shared)
    #   part[split, 2] = sum_c gc · bilinear(x[c])        (owned: plain store; grad_m)
    #   part[split, :2] = sum_c gc · m · ∂bilinear/∂y, ∂x (owned: plain store; grad_Δy, Δx)
    # The host sums ``part`` over the splits in a fixed order. NEED_X, NEED_OFF and
    # NEED_MASK say which of the three are wanted; READ_X (NEED_OFF or NEED_MASK) whether
    # the input's corners are read at all.
    gk = tl.program_id(1)
    g = gk // K
    kp = gk % K
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    n = n0 + r // span
    ll = l0 + r % span
    _, inside, ly, lx, ok_y0, ok_y1, ok_x0, ok_x1, ry0, ry1, rx0, rx1, m = (
        _sample_geometry(
            off_ptr, mask_ptr, n, ll, r_ok, gk, kp, H, W, W_out, L, GK2,
            SH, SW, PH, PW, DH, DW, K_W, HAS_MASK, ACC,
        )
    )  # fmt: skip
    hy = 1.0 - ly
    hx = 1.0 - lx
    ok00 = (ok_y0 & ok_x0)[None, :]
    ok01 = (ok_y0 & ok_x1)[None, :]
    ok10 = (ok_y1 & ok_x0)[None, :]
    ok11 = (ok_y1 & ok_x1)[None, :]
    i00 = (ry0 * W + rx0)[None, :]
    i01 = (ry0 * W + rx1)[None, :]
    i10 = (ry1 * W + rx0)[None, :]
    i11 = (ry1 * W + rx1)[None, :]
    acc_y = tl.zeros((BLOCK_R,), dtype=ACC)
    acc_x = tl.zeros((BLOCK_R,), dtype=ACC)
    acc_m = tl.zeros((BLOCK_R,), dtype=ACC)
    c_lo = tl.program_id(2) * C_SPLIT
    for c_start in range(c_lo, c_lo + C_SPLIT, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        c_ok = c < C_per_off
        cg = (g * C_per_off + c).to(tl.int64)
        cm = c_ok[:, None]
        gc = tl.load(
            gcols_ptr + (cg[:, None] * K + kp) * rows + r[None, :],
            mask=cm & r_ok[None, :],
            other=0.0,
        ).to(ACC)
        plane = ((n[None, :] * C_in + cg[:, None]) * H) * W
        gcm = gc * m[None, :]
        if READ_X:
            v00 = tl.load(x_ptr + plane + i00, mask=cm & ok00, other=0.0).to(ACC)
            v01 = tl.load(x_ptr + plane + i01, mask=cm & ok01, other=0.0).to(ACC)
            v10 = tl.load(x_ptr + plane + i10, mask=cm & ok10, other=0.0).to(ACC)
            v11 = tl.load(x_ptr + plane + i11, mask=cm & ok11, other=0.0).to(ACC)
            if NEED_MASK:
                val = (v00 * hx[None, :] + v01 * lx[None, :]) * hy[None, :] + (
                    v10 * hx[None, :] + v11 * lx[None, :]
                ) * ly[None, :]
                acc_m += tl.sum(gc * val, axis=0)
            if NEED_OFF:
                dvdy = (v10 - v00) * hx[None, :] + (v11 - v01) * lx[None, :]
                dvdx = (v01 - v00) * hy[None, :] + (v11 - v10) * ly[None, :]
                acc_y += tl.sum(gcm * dvdy, axis=0)
                acc_x += tl.sum(gcm * dvdx, axis=0)
        if NEED_X:
            tl.atomic_add(gx_ptr + plane + i00, gcm * (hy * hx)[None, :], mask=cm & ok00)
            tl.atomic_add(gx_ptr + plane + i01, gcm * (hy * lx)[None, :], mask=cm & ok01)
            tl.atomic_add(gx_ptr + plane + i10, gcm * (ly * hx)[None, :], mask=cm & ok10)
            tl.atomic_add(gx_ptr + plane + i11, gcm * (ly * lx)[None, :], mask=cm & ok11)
    gk_total = GK2 // 2
    part = part_ptr + (tl.program_id(2).to(tl.int64) * 3 * gk_total + gk) * rows + r
    if NEED_OFF:
        tl.store(part, tl.where(inside, acc_y, 0.0), mask=r_ok)
        tl.store(part + gk_total * rows, tl.where(inside, acc_x, 0.0), mask=r_ok)
    if NEED_MASK:
        tl.store(part + 2 * gk_total * rows, acc_m, mask=r_ok)


class _Geometry:
    """Sizes of one call, derived once from the tensors' shapes."""

    def __init__(
        self,
        input: Tensor,
        offset: Tensor,
        weight: Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> None:
        self.n, self.c_in, self.h, self.w = input.shape
        self.c_out, self.c_per_group, self.k_h, self.k_w = weight.shape
        self.groups = self.c_in // self.c_per_group
        self.k = self.k_h * self.k_w
        self.n_off = offset.shape[1] // (2 * self.k)
        self.c_per_off = self.c_in // self.n_off
        self.h_out, self.w_out = offset.shape[2], offset.shape[3]
        self.length = self.h_out * self.w_out
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.acc = tl.float64 if input.dtype == torch.float64 else tl.float32
        self.acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        # The interpreter runs programs one by one: fewer, larger ones are faster there.
        self.interpreted = input.device.type == "cpu"
        self.block_r = 256 if self.interpreted else 128
        cap = 64 if self.interpreted else 16
        self.block_c = min(cap, triton.next_power_of_2(self.c_per_off))

    def chunks(self, element_size: int, buffers: int) -> list[Chunk]:
        """Chunks ``(b0, b1, l0, l1)``: images ``b0 .. b1``, pixels ``l0 .. l1`` of each.

        ``buffers`` column buffers of a chunk fit in WORKSPACE_BYTES: whole images when
        one image fits, otherwise ranges of the pixels of one image (at least one pixel).
        """
        per_pixel = buffers * self.c_in * self.k * element_size
        return plan_chunks(self.n, self.length, per_pixel, WORKSPACE_BYTES)

    def kernel_args(self, chunk: Chunk) -> tuple[int, ...]:
        b0, b1, l0, l1 = chunk
        return (
            b0, l0, l1 - l0, (b1 - b0) * (l1 - l0), self.c_in, self.c_per_off, self.h, self.w,
            self.w_out, self.length, 2 * self.n_off * self.k, *self.stride, *self.padding,
            *self.dilation,
        )  # fmt: skip

    def meta(self, has_mask: bool, block_c: int) -> dict[str, object]:
        return {
            "K": self.k,
            "K_W": self.k_w,
            "HAS_MASK": has_mask,
            "ACC": self.acc,
            "BLOCK_R": self.block_r,
            "BLOCK_C": block_c,
        }

    def col2im_split(self, rows: int) -> tuple[int, int, int]:
        """``(block_c, channels per program, programs per sample)`` for ``col2im``.

        A sample's channels are split over several programs when there are too few
        samples to fill the GPU (small maps); the interpreter splits in two, so that the
        tests run the split path.
        """
        if self.interpreted:
            block_c = max(1, triton.next_power_of_2(self.c_per_off) // 2)
            return block_c, block_c, triton.cdiv(self.c_per_off, block_c)
        block_c = self.block_c
        blocks = triton.cdiv(self.c_per_off, block_c)
        programs = triton.cdiv(rows, self.block_r) * self.n_off * self.k
        split = max(1, min(blocks, triton.cdiv(_COL2IM_PROGRAMS, programs)))
        per_program = triton.cdiv(blocks, split) * block_c
        return block_c, per_program, triton.cdiv(self.c_per_off, per_program)


def _rows(chunk: Chunk) -> int:
    b0, b1, l0, l1 = chunk
    return (b1 - b0) * (l1 - l0)


def _im2col(
    geo: _Geometry, input: Tensor, offset: Tensor, mask: Tensor | None, chunk: Chunk
) -> Tensor:
    """Modulated samples of the chunk's pixels: (groups, C_in/groups·K, B·(l1 - l0))."""
    rows = _rows(chunk)
    cols = input.new_empty(geo.c_in * geo.k, rows)
    grid = (
        triton.cdiv(rows, geo.block_r),
        geo.n_off * geo.k,
        triton.cdiv(geo.c_per_off, geo.block_c),
    )
    _im2col_kernel[grid](
        input,
        offset,
        offset if mask is None else mask,  # never read without HAS_MASK
        cols,
        *geo.kernel_args(chunk),
        **geo.meta(mask is not None, geo.block_c),
    )
    return cols.view(geo.groups, geo.c_per_group * geo.k, rows)


def _col2im(
    geo: _Geometry,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    grad_cols: Tensor,
    chunk: Chunk,
    grad_input: Tensor | None,
    grad_offset: Tensor | None,
    grad_mask: Tensor | None,
) -> None:
    """Add the chunk's share to ``grad_input``; fill its pixels' offset and mask gradients.

    A gradient given as None is not computed.
    """
    b0, b1, l0, l1 = chunk
    images, span, rows = b1 - b0, l1 - l0, _rows(chunk)
    gk_total = geo.n_off * geo.k
    block_c, per_program, split = geo.col2im_split(rows)
    need_off, need_mask = grad_offset is not None, grad_mask is not None
    part = None
    if need_off or need_mask:
        part = torch.empty(split, 3, gk_total, rows, dtype=geo.acc_dtype, device=input.device)
    grid = (triton.cdiv(rows, geo.block_r), gk_total, split)
    _col2im_kernel[grid](
        input,
        offset,
        offset if mask is None else mask,  # never read without HAS_MASK
        grad_cols,
        grad_cols if grad_input is None else grad_input,  # never written without NEED_X
        grad_cols if part is None else part,  # never written without NEED_OFF/NEED_MASK
        *geo.kernel_args(chunk),
        per_program,
        NEED_X=grad_input is not None,
        NEED_OFF=need_off,
        NEED_MASK=need_mask,
        READ_X=need_off or need_mask,
        **geo.meta(mask is not None, block_c),
    )
    if part is None:
        return
    # Summed over the splits in a fixed order: deterministic.
    if grad_offset is not None:
        sums = part[:, :2].sum(0).view(2, gk_total, images, span)
        # Offset channel 2·gk is Δy, 2·gk + 1 is Δx: (N, G·K, 2, L).
        view = grad_offset.view(geo.n, gk_total, 2, geo.length)
        view[b0:b1, :, :, l0:l1].copy_(sums.permute(2, 1, 0, 3))
    if grad_mask is not None:
        sums_m = part[:, 2].sum(0).view(gk_total, images, span)
        view_m = grad_mask.view(geo.n, gk_total, geo.length)
        view_m[b0:b1, :, l0:l1].copy_(sums_m.transpose(0, 1))


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
    """Deformable convolution forward (arguments validated; see :func:`deformconv.deform_conv2d`).

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
    input, offset, weight = input.contiguous(), offset.to(input.dtype).contiguous(), weight
    mask = None if mask is None else mask.to(input.dtype).contiguous()
    geo = _Geometry(input, offset, weight, stride, padding, dilation)
    out = input.new_empty(geo.n, geo.c_out, geo.h_out, geo.w_out)
    w_g = weight.to(input.dtype).reshape(geo.groups, geo.c_out // geo.groups, -1)
    out_rows = out.view(geo.n, geo.c_out, geo.length)
    for chunk in geo.chunks(input.element_size(), buffers=1):
        b0, b1, l0, l1 = chunk
        cols = _im2col(geo, input, offset, mask, chunk)
        res = torch.matmul(w_g, cols).view(geo.c_out, b1 - b0, l1 - l0).transpose(0, 1)
        if bias is not None:
            res = res.to(geo.acc_dtype) + bias.to(geo.acc_dtype).view(1, -1, 1)
        out_rows[b0:b1, :, l0:l1].copy_(res)
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

    Args:
        grad_output: (N, C_out, H_out, W_out).
        input: (N, C_in, H_in, W_in).
        offset: (N, 2·G·K_h·K_w, H_out, W_out).
        mask: (N, G·K_h·K_w, H_out, W_out) or None.
        weight: (C_out, C_in/groups, K_h, K_w).
        bias: (C_out,) or None.
        stride: (s_h, s_w).
        padding: (p_h, p_w).
        dilation: (d_h, d_w).
        needs_grad: which of ``(input, offset, mask, weight, bias)`` need a gradient;
            only those are computed (the column recomputation and weight GEMM are skipped
            for a frozen weight, ``col2im`` when neither the input nor the offsets and
            mask need one, and inside it the atomics or the offset and mask reductions).

    Returns:
        Gradients shaped and typed like ``(input, offset, mask, weight, bias)``; None where
        the argument is None or its gradient is not needed. ``grad_input`` is summed with
        atomic adds, so its last bits may vary between runs.
    """
    want_x, want_off, want_m, want_w, want_b = needs_grad
    dtype = input.dtype
    input, offset = input.contiguous(), offset.to(dtype).contiguous()
    mask = None if mask is None else mask.to(dtype).contiguous()
    geo = _Geometry(input, offset, weight, stride, padding, dilation)
    acc_dtype = geo.acc_dtype
    grad_input = torch.zeros(input.shape, dtype=acc_dtype, device=input.device) if want_x else None
    grad_offset = torch.zeros_like(offset) if want_off else None
    grad_mask = torch.zeros_like(mask) if want_m and mask is not None else None
    grad_weight = None
    if want_w:
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
    grad_bias = None
    if bias is not None and want_b:
        grad_bias = grad_output.sum((0, 2, 3), dtype=acc_dtype).to(bias.dtype)
    scatter = grad_input is not None or grad_offset is not None or grad_mask is not None
    if scatter or grad_weight is not None:
        cog = geo.c_out // geo.groups
        w_g = weight.to(dtype).reshape(geo.groups, cog, -1)
        w_t = w_g.transpose(1, 2)
        go_rows = grad_output.to(dtype).reshape(geo.n, geo.c_out, geo.length)
        # Chunks do not depend on ``needs_grad``: a gradient is the same whatever else is asked.
        for chunk in geo.chunks(input.element_size(), buffers=2):
            b0, b1, l0, l1 = chunk
            # (B, C_out, l1 - l0) -> (groups, C_out/groups, B·(l1 - l0)), the GEMMs' layout.
            go = go_rows[b0:b1, :, l0:l1].transpose(0, 1).reshape(geo.groups, cog, _rows(chunk))
            if grad_weight is not None:
                cols = _im2col(geo, input, offset, mask, chunk)
                grad_weight += torch.matmul(go, cols.transpose(1, 2)).view(weight.shape)
                del cols
            if scatter:
                grad_cols = torch.matmul(w_t, go)  # (groups, C_in/groups·K, B·(l1 - l0))
                _col2im(geo, input, offset, mask, grad_cols, chunk, grad_input, grad_offset,
                        grad_mask)  # fmt: skip
    return (
        None if grad_input is None else grad_input.to(dtype),
        grad_offset,
        grad_mask,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        grad_bias,
    )
