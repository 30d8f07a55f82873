"""Pure-PyTorch deformable convolution: the reference and the fallback on every device.

Differentiable by autograd (so double backward works) and written with
``gather`` + ``matmul`` only, so it runs wherever torch runs and torch.compile
can trace it. It is not fast: the fast kernels exist for speed, this one for truth.

Bounded memory: the output pixels are processed in chunks whose temporary buffers
(the column buffer, the blend's temporaries, the corner indices and weights) stay
under :data:`WORKSPACE_BYTES`: whole images per chunk when one image fits, otherwise
a range of output pixels of one image. Under autograd, a call of more than one chunk
keeps only its inputs, and its backward runs chunk by chunk through explicit gradient
formulas built from differentiable torch ops, so training is bounded the same way and
gradients are still differentiable twice. :func:`deform_conv2d_backward` (the
backward of the custom op) works chunk by chunk too. Beyond the workspace, a call
allocates its output (or its gradients) and, for float16/bfloat16, float32 copies of
the arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from deformconv.kernels._chunks import Chunk, plan_chunks

__all__ = [
    "WORKSPACE_BYTES",
    "bilinear_corners",
    "deform_conv2d",
    "deform_conv2d_backward",
    "deform_conv2d_double_backward",
    "sampling_positions",
]

#: Cap, in bytes, on the temporary buffers of one chunk (see the module docstring).
WORKSPACE_BYTES = 64 * 2**20


def sampling_positions(
    offset: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Absolute input coordinates sampled by every kernel point of every output pixel.

    Args:
        offset: (N, 2·G·K_h·K_w, H_out, W_out) in the torchvision layout.
        kernel_size: (K_h, K_w).
        stride: (s_h, s_w).
        padding: (p_h, p_w).
        dilation: (d_h, d_w).

    Returns:
        ``(y, x)``, each (N, G, K_h·K_w, H_out, W_out):
        ``p0·stride - padding + p_n·dilation + Δp_n``.
    """
    n, _, h_out, w_out = offset.shape
    k_h, k_w = kernel_size
    k = k_h * k_w
    off = offset.reshape(n, offset.shape[1] // (2 * k), k, 2, h_out, w_out)
    dev, dt = offset.device, offset.dtype
    rows = torch.arange(k_h, device=dev, dtype=dt).repeat_interleave(k_w) * dilation[0]
    cols = torch.arange(k_w, device=dev, dtype=dt).repeat(k_h) * dilation[1]
    out_rows = torch.arange(h_out, device=dev, dtype=dt) * stride[0] - padding[0]
    out_cols = torch.arange(w_out, device=dev, dtype=dt) * stride[1] - padding[1]
    base_y = rows[:, None, None] + out_rows[None, :, None]  # (K, H_out, 1)
    base_x = cols[:, None, None] + out_cols[None, None, :]  # (K, 1, W_out)
    return base_y + off[:, :, :, 0], base_x + off[:, :, :, 1]


def bilinear_corners(y: Tensor, x: Tensor, height: int, width: int) -> list[tuple[Tensor, Tensor]]:
    """The four bilinear corners of each position under the DCNv2 boundary rule.

    A position with ``y <= -1``, ``y >= height``, ``x <= -1`` or ``x >= width``
    (or a NaN coordinate) reads 0; otherwise each corner outside the map reads 0.
    Positions exactly on -1 are kept: they read 0 anyway (the inner corner has
    weight 0), and keeping them gives the floor-based one-sided derivative used
    at every other integer position, as torchvision's backward does.
    Non-finite positions are replaced before any index is formed, so every index
    returned lies inside the map.

    Args:
        y: positions' rows, any shape.
        x: positions' columns, same shape as ``y``.
        height: H_in.
        width: W_in.

    Returns:
        Four ``(flat_index, weight)`` pairs, each shaped like ``y``; ``flat_index``
        is ``row·width + col`` (int64, in range) and ``weight`` is 0 for corners
        that read nothing.
    """
    inside = (y >= -1) & (y < height) & (x >= -1) & (x < width)  # False for NaN too
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0 = torch.floor(y)
    x0 = torch.floor(x)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    y0i, x0i = y0.long(), x0.long()
    corners = []
    for dy, dx, w in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        yi, xi = y0i + dy, x0i + dx
        ok = inside & (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
        index = yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)
        corners.append((index, w * ok.to(w.dtype)))
    return corners


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunks(n: int, c_in: int, k: int, n_off: int, length: int, element_size: int) -> list[Chunk]:
    """Chunks ``(b0, b1, l0, l1)`` whose workspace stays under :data:`WORKSPACE_BYTES`."""
    # Per output pixel: the columns and three blend temporaries (C_in·K values each), and
    # for each of the G·K samples: positions, four corners' int64 indices and weights.
    per_pixel = 4 * c_in * k * element_size + n_off * k * (4 * 8 + 12 * element_size)
    return plan_chunks(n, length, per_pixel, WORKSPACE_BYTES) or [(0, n, 0, length)]


def _positions(
    offset: Tensor,
    k_h: int,
    k_w: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    l0: int,
    l1: int,
    w_out: int,
) -> tuple[Tensor, Tensor]:
    """Sampled rows and columns of output pixels ``l0 .. l1``: each (N, G, K, l1 - l0)."""
    n, k = offset.shape[0], k_h * k_w
    n_off, length = offset.shape[1] // (2 * k), offset.shape[2] * offset.shape[3]
    dev, dt = offset.device, offset.dtype
    off = offset.reshape(n, n_off, k, 2, length)[..., l0:l1]
    pix = torch.arange(l0, l1, device=dev)
    out_y = (pix // w_out).to(dt) * stride[0] - padding[0]
    out_x = (pix % w_out).to(dt) * stride[1] - padding[1]
    ky = torch.arange(k_h, device=dev, dtype=dt).repeat_interleave(k_w) * dilation[0]
    kx = torch.arange(k_w, device=dev, dtype=dt).repeat(k_h) * dilation[1]
    y = (ky[:, None] + out_y[None, :]) + off[:, :, :, 0]
    x = (kx[:, None] + out_x[None, :]) + off[:, :, :, 1]
    return y, x


def _forward_rows(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    l0: int,
    l1: int,
    w_out: int,
) -> Tensor:
    """Output pixels ``l0 .. l1`` (flat, row-major) of every image: (N, C_out, l1 - l0).

    ``offset`` and ``mask`` hold the images' full maps; all tensors in the compute dtype.
    """
    n, c_in, height, width = input.shape
    c_out, c_per_group, k_h, k_w = weight.shape
    groups = c_in // c_per_group
    k = k_h * k_w
    n_off, length = offset.shape[1] // (2 * k), offset.shape[2] * offset.shape[3]
    rows = l1 - l0
    y, x = _positions(offset, k_h, k_w, stride, padding, dilation, l0, l1, w_out)
    c_per_off = c_in // n_off
    flat = input.reshape(n, n_off, c_per_off, height * width)
    columns = flat.new_zeros(n, n_off, c_per_off, k * rows)
    # An empty map (H_in or W_in = 0) has nothing to read: every sample is 0.
    for index, w in bilinear_corners(y, x, height, width) if height * width else []:
        index = index.reshape(n, n_off, 1, k * rows).expand(-1, -1, c_per_off, -1)
        columns = columns + torch.gather(flat, 3, index) * w.reshape(n, n_off, 1, k * rows)
    if mask is not None:
        m = mask.reshape(n, n_off, k, length)[..., l0:l1]
        columns = columns * m.reshape(n, n_off, 1, k * rows)
    # (N, C_in, K, rows) -> (N, groups, C_in/groups·K, rows): weight's (C_in/groups, K_h, K_w).
    columns = columns.reshape(n, groups, c_per_group * k, rows)
    out = torch.matmul(weight.reshape(1, groups, c_out // groups, c_per_group * k), columns)
    out = out.reshape(n, c_out, rows)
    if bias is not None:
        out = out + bias.reshape(1, c_out, 1)
    return out


def _backward_rows(
    grad_out: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    l0: int,
    l1: int,
    w_out: int,
    needs_grad: Sequence[bool],
) -> list[Tensor | None]:
    """Gradients of :func:`_forward_rows` given ``grad_out`` (N, C_out, l1 - l0).

    Explicit formulas in differentiable torch ops (no autograd needed to run them, and
    autograd can differentiate them: double backward). Returns gradients for (input,
    offset, mask, weight, bias), None where not needed; offset/mask gradients are zero
    outside pixels ``l0 .. l1``.
    """
    want_x, want_off, want_m, want_w, want_b = needs_grad
    n, c_in, height, width = input.shape
    if height * width == 0:  # an empty map reads nothing: only the bias has a gradient
        zeros = [
            torch.zeros_like(t) if t is not None and want else None
            for t, want in zip((input, offset, mask, weight), needs_grad[:4], strict=True)
        ]
        return [*zeros, grad_out.sum((0, 2)) if want_b else None]
    c_out, c_per_group, k_h, k_w = weight.shape
    groups = c_in // c_per_group
    k = k_h * k_w
    n_off, length = offset.shape[1] // (2 * k), offset.shape[2] * offset.shape[3]
    rows = l1 - l0
    c_per_off = c_in // n_off
    y, x = _positions(offset, k_h, k_w, stride, padding, dilation, l0, l1, w_out)
    inside = (y >= -1) & (y < height) & (x >= -1) & (x < width)  # False for NaN
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    y0i, x0i = y0.long(), x0.long()
    m = None
    if mask is not None:
        m = mask.reshape(n, n_off, k, length)[..., l0:l1]
    flat = input.reshape(n, n_off, c_per_off, height * width)
    out: list[Tensor | None] = [None] * 5
    w_g = weight.reshape(groups, c_out // groups, c_per_group * k)
    go = grad_out.reshape(n, groups, c_out // groups, rows)
    if want_b:
        out[4] = grad_out.sum((0, 2))
    # Corner q: (flat index, bilinear weight, d weight / dy, d weight / dx), each (N, G, K, R).
    corners = []
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        yi, xi = y0i + dy, x0i + dx
        ok = (inside & (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)).to(y.dtype)
        wy, wx = (ly if dy else hy), (lx if dx else hx)
        sy, sx = (1 if dy else -1), (1 if dx else -1)
        index = yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)
        corners.append(
            (index.reshape(n, n_off, 1, k * rows), wy * wx * ok, sy * wx * ok, wy * sx * ok)
        )
    need_cols_grad = want_x or want_off or want_m
    grad_cols = None
    if need_cols_grad:
        # (groups, C_pg·K, C_out/groups) @ (N, groups, C_out/groups, R) -> (N, G, C_per, K·R)
        grad_cols = torch.matmul(w_g.transpose(1, 2), go).reshape(n, n_off, c_per_off, k * rows)
    if want_w:
        columns = flat.new_zeros(n, n_off, c_per_off, k * rows)
        for index, w, _, _ in corners:
            gathered = torch.gather(flat, 3, index.expand(-1, -1, c_per_off, -1))
            columns = columns + gathered * w.reshape(n, n_off, 1, k * rows)
        if m is not None:
            columns = columns * m.reshape(n, n_off, 1, k * rows)
        columns = columns.reshape(n, groups, c_per_group * k, rows)
        out[3] = torch.einsum("ngor,ngcr->goc", go, columns).reshape(weight.shape)
    if grad_cols is None:
        return out
    mk = None if m is None else m.reshape(n, n_off, 1, k * rows)
    if want_x:
        g_in = grad_cols if mk is None else grad_cols * mk
        gx = torch.zeros_like(flat)
        for index, w, _, _ in corners:
            src = g_in * w.reshape(n, n_off, 1, k * rows)
            gx = gx.scatter_add(3, index.expand(-1, -1, c_per_off, -1), src)
        out[0] = gx.reshape(input.shape)
    if want_off or want_m:
        g_y = g_x = g_m = torch.zeros_like(y)
        for index, w, dwdy, dwdx in corners:
            gathered = torch.gather(flat, 3, index.expand(-1, -1, c_per_off, -1))
            dot = (grad_cols * gathered).sum(2).reshape(n, n_off, k, rows)
            g_y = g_y + dot * dwdy
            g_x = g_x + dot * dwdx
            g_m = g_m + dot * w
        if m is not None:
            g_y, g_x = g_y * m, g_x * m
        if want_off:
            grad_off = offset.new_zeros(n, n_off, k, 2, length)
            grad_off[..., 0, l0:l1] = g_y
            grad_off[..., 1, l0:l1] = g_x
            out[1] = grad_off.reshape(offset.shape)
        if want_m and mask is not None:
            grad_m = mask.new_zeros(n, n_off, k, length)
            grad_m[..., l0:l1] = g_m
            out[2] = grad_m.reshape(mask.shape)
    return out


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """Deformable convolution (DCNv1, or DCNv2 with ``mask``) in pure PyTorch.

    Arguments are already validated; see :func:`deformconv.deform_conv2d` for
    their shapes. float16/bfloat16 are computed in float32 and cast back. Temporary
    memory stays under about :data:`WORKSPACE_BYTES` (see the module docstring).

    Returns:
        (N, C_out, H_out, W_out) in ``input``'s dtype.
    """
    out_dtype = input.dtype
    dt = _compute_dtype(input.dtype)
    input, offset, weight = input.to(dt), offset.to(dt), weight.to(dt)
    mask = None if mask is None else mask.to(dt)
    bias = None if bias is None else bias.to(dt)
    n, c_in = input.shape[:2]
    c_out, k = weight.shape[0], weight.shape[2] * weight.shape[3]
    h_out, w_out = offset.shape[2], offset.shape[3]
    length = h_out * w_out
    chunks = _chunks(n, c_in, k, offset.shape[1] // (2 * k), length, input.element_size())
    if len(chunks) == 1:
        out = _forward_rows(
            input, offset, mask, weight, bias, stride, padding, dilation, 0, length, w_out
        )
        return out.reshape(n, c_out, h_out, w_out).to(out_dtype)
    tensors = (input, offset, mask, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        # Keep only the inputs; the backward runs chunk by chunk as well.
        out = _Chunked.apply(*tensors, (stride, padding, dilation))
    else:
        out = _forward_chunks(chunks, *tensors, stride, padding, dilation)
    return out.reshape(n, c_out, h_out, w_out).to(out_dtype)


def _forward_chunks(
    chunks: list[Chunk],
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """(N, C_out, H_out·W_out) computed chunk by chunk."""
    w_out, length = offset.shape[3], offset.shape[2] * offset.shape[3]
    images: list[Tensor] = []
    pieces: list[Tensor] = []
    for b0, b1, l0, l1 in chunks:
        m = None if mask is None else mask[b0:b1]
        piece = _forward_rows(
            input[b0:b1], offset[b0:b1], m, weight, bias, stride, padding, dilation, l0, l1, w_out
        )
        pieces.append(piece)
        if l1 == length:
            images.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
            pieces = []
    return torch.cat(images, dim=0) if len(images) > 1 else images[0]


class _Chunked(torch.autograd.Function):
    """A chunked call under autograd: saves the inputs only; backward by explicit formulas.

    The backward (:func:`deform_conv2d_backward`) is made of differentiable torch ops on
    the saved inputs, so autograd differentiates it again (double backward).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        offset: Tensor,
        mask: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        geometry: tuple[tuple[int, int], tuple[int, int], tuple[int, int]],
    ) -> Tensor:
        ctx.save_for_backward(input, offset, mask, weight, bias)
        ctx.geometry = geometry
        chunks = _chunks_of((input, offset, mask, weight, bias))
        return _forward_chunks(chunks, input, offset, mask, weight, bias, *geometry)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        input, offset, mask, weight, bias = ctx.saved_tensors
        go = grad_out.reshape(input.shape[0], weight.shape[0], *offset.shape[2:])
        stride, padding, dilation = ctx.geometry
        grads = deform_conv2d_backward(
            go, input, offset, mask, weight, bias, stride, padding, dilation,
            needs_grad=ctx.needs_input_grad[:5],
        )  # fmt: skip
        return (*grads, None)


def _chunks_of(tensors: Sequence[Tensor | None]) -> list[Chunk]:
    input, offset, weight = tensors[0], tensors[1], tensors[3]
    assert input is not None and offset is not None and weight is not None
    k = weight.shape[2] * weight.shape[3]
    length = offset.shape[2] * offset.shape[3]
    n_off = offset.shape[1] // (2 * k)
    return _chunks(input.shape[0], input.shape[1], k, n_off, length, input.element_size())


def _chunk_grads(
    chunk: Chunk,
    grad_out: Tensor,
    tensors: Sequence[Tensor | None],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    needs_grad: Sequence[bool],
) -> list[Tensor | None]:
    """First-order gradients of one chunk; ``grad_out`` is (N, C_out, L) for the batch."""
    b0, b1, l0, l1 = chunk
    x, off, m, w = (t if t is None or i == 3 else t[b0:b1] for i, t in enumerate(tensors[:4]))
    go = grad_out[b0:b1, :, l0:l1]
    assert x is not None and off is not None and w is not None
    return _backward_rows(
        go, x, off, m, w, stride, padding, dilation, l0, l1, off.shape[3], needs_grad
    )


def _accumulate(total: Tensor, part: Tensor, i: int, chunk: Chunk) -> None:
    if i < 3:  # per image: the chunk's images
        total[chunk[0] : chunk[1]] += part
    else:
        total += part


def deform_conv2d_backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    needs_grad: Sequence[bool] = (True, True, True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`deform_conv2d` for ``(input, offset, mask, weight, bias)``.

    Explicit formulas, chunk by chunk, so temporary memory stays under about
    :data:`WORKSPACE_BYTES`; needs no autograd (runs inside a custom op's kernel), and
    is built from differentiable torch ops (autograd differentiates it again).

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
        needs_grad: which of the five gradients to compute.

    Returns:
        The gradients, shaped and typed like their arguments; None where the argument is
        None or its gradient is not needed.
    """
    dt = _compute_dtype(input.dtype)
    originals = (input, offset, mask, weight, bias)
    tensors = [None if t is None else t.to(dt) for t in originals]
    wanted = [t is not None and bool(needs_grad[i]) for i, t in enumerate(tensors)]
    totals: list[Tensor | None] = [
        torch.zeros(t.shape, dtype=dt, device=t.device) if t is not None and w else None
        for t, w in zip(tensors, wanted, strict=True)
    ]
    go = grad_output.to(dt)
    go = go.flatten(2)  # (N, C_out, L); flatten, not reshape(-1): N may be 0
    if any(wanted) and input.shape[0] > 0:
        for chunk in _chunks_of(tensors):
            parts = _chunk_grads(chunk, go, tensors, stride, padding, dilation, wanted)
            for i, part in enumerate(parts):
                if part is not None and totals[i] is not None:
                    _accumulate(totals[i], part, i, chunk)  # type: ignore[arg-type]
    return tuple(  # type: ignore[return-value]
        None if g is None else g.to(t.dtype)  # type: ignore[union-attr]
        for g, t in zip(totals, originals, strict=True)
    )


def deform_conv2d_double_backward(
    grad_grads: Sequence[Tensor | None],
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    needs_grad: Sequence[bool] = (True,) * 6,
) -> tuple[Tensor | None, ...]:
    """Vector-Jacobian product of :func:`deform_conv2d_backward` (second derivatives).

    Autograd differentiates the explicit first-order formulas chunk by chunk. Call it
    where autograd runs (an autograd formula), not inside a kernel.

    Args:
        grad_grads: cotangents of the five gradients (None: zero).
        grad_output: (N, C_out, H_out, W_out).
        input: (N, C_in, H_in, W_in).
        offset: (N, 2·G·K_h·K_w, H_out, W_out).
        mask: (N, G·K_h·K_w, H_out, W_out) or None.
        weight: (C_out, C_in/groups, K_h, K_w).
        bias: (C_out,) or None.
        stride: (s_h, s_w).
        padding: (p_h, p_w).
        dilation: (d_h, d_w).
        needs_grad: which of ``(grad_output, input, offset, mask, weight, bias)`` need
            a gradient.

    Returns:
        Gradients for ``(grad_output, input, offset, mask, weight, bias)``; None where
        not needed.
    """
    dt = _compute_dtype(input.dtype)
    originals = (grad_output, input, offset, mask, weight, bias)
    detached = [None if t is None else t.detach().to(dt) for t in originals]
    cots = [
        None if g is None or t is None or g.numel() == 0 else g.detach().to(dt)
        for g, t in zip(grad_grads, originals[1:], strict=True)
    ]
    wanted = [bool(needs_grad[i]) and t is not None for i, t in enumerate(detached)]
    totals: list[Tensor | None] = [
        torch.zeros(t.shape, dtype=dt, device=t.device) if w and t is not None else None
        for t, w in zip(detached, wanted, strict=True)
    ]
    active = [c is not None for c in cots]
    if any(wanted) and any(active) and input.shape[0] > 0:
        n, c_out = grad_output.shape[:2]
        for chunk in _chunks_of(detached[1:]):
            b0, b1, l0, l1 = chunk
            # grad_output, input, offset and mask are per image: the chunk's images.
            leaves = [
                None if t is None else (t[b0:b1] if i <= 3 else t).detach().requires_grad_()
                for i, t in enumerate(detached)
            ]
            with torch.enable_grad():  # autograd formulas run without it
                go = leaves[0].reshape(b1 - b0, c_out, -1)[:, :, l0:l1]  # type: ignore[union-attr]
                x, off, m, w = leaves[1:5]
                parts = _backward_rows(
                    go, x, off, m, w, stride, padding, dilation, l0, l1,  # type: ignore[arg-type]
                    off.shape[3], active,  # type: ignore[union-attr]
                )  # fmt: skip
                outs, grads_in = [], []
                for i, part in enumerate(parts):
                    if part is not None and active[i]:
                        outs.append(part)
                        cot = cots[i]
                        grads_in.append(cot[b0:b1] if i < 3 else cot)  # type: ignore[index]
                sources = [(i, t) for i, t in enumerate(leaves) if t is not None and wanted[i]]
                res = torch.autograd.grad(
                    outs, [t for _, t in sources], grads_in, allow_unused=True
                )
            for (i, _), r in zip(sources, res, strict=True):
                if r is None:
                    continue
                if i <= 3:
                    totals[i][b0:b1] += r  # type: ignore[index]
                else:
                    totals[i] += r  # type: ignore[operator]
    return tuple(
        None if g is None else g.to(t.dtype)  # type: ignore[union-attr]
        for g, t in zip(totals, originals, strict=True)
    )
