"""The column kernels' GEMMs in oneDNN: matrix products, or 1x1 convolutions for groups.

The column + GEMM kernels multiply (pixels, groups·K·C_pg) column rows by the weight.
``torch.mm`` runs such products in MKL; oneDNN, the library behind PyTorch's own CPU
convolutions, runs them about twice as fast on a Zen 5 EPYC (AVX-512, 2 threads,
float32: MKL about 200 GFLOP/s, oneDNN 400-490).

One weight group: oneDNN's matrix product (``torch.ops.mkldnn._linear_pointwise``, the
op behind inductor's fused linear layers) computes ``a · bᵀ`` from plain row-major
operands, or transposed views of them, with no reorder of either operand; the bias is
fused. Measured against oneDNN's 1x1 convolution over the same rows (which reorders the
weight into its blocked layout on every call), on chunks of ResNet-50's res4 and res5 and
of a 64-channel detection layer: the forward product 0.65-1.0x the time (res5 at batch
1, 49 rows: 0.58 against 0.89 ms), the grad columns 0.85-0.97x, the weight gradient
0.3-1.0x (res5 at batch 8: 3.8 against 13.2 ms, which no longer needs slicing).

Several weight groups: one 1x1 convolution with ``groups`` over the rows viewed as a map.
An (R, C) row-major matrix is, viewed as (1, C, R, 1), an NCHW map in
``torch.channels_last`` order, oneDNN's preferred input; each group's columns are
contiguous in a row, as the weight groups' channels are in a map. What oneDNN returns is
channels-last again, so the results are (R, C) rows with no copy either.

Both return fresh memory. Used for float32 where PyTorch has oneDNN
(``torch.backends.mkldnn``), where each product pays for oneDNN's per-call costs (see the
``pays_for_*`` functions); float64, builds without oneDNN and small products keep
``torch.mm``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MAX_FRESH_BYTES", "MIN_MULTIPLY_ADDS", "MIN_ROWS", "MIN_ROWS_WIDE", "MIN_WEIGHT_ROWS",
    "WIDE_OUTPUTS", "backward_rows", "forward_rows", "matmul_works", "weight_rows_into",
    "pays_for_columns", "pays_for_output", "pays_for_weight",
]  # fmt: skip

#: One weight group's products run in oneDNN from this many multiply-adds (rows × width
#: × outputs). Measured against ``torch.mm`` / ``torch.addmm`` into kept memory (2
#: threads, Zen 5), oneDNN time over MKL time for the forward / grad-column / weight-
#: gradient products: (32 rows, 576 → 64) 1.31 / 1.13 / 1.26, (49, 576 → 64) 0.95 /
#: 0.96 / 1.06, (64, 576 → 64) 0.97 / 0.88 / 1.01, (16, 1152 → 128) 0.84 / 0.68 / 0.93;
#: from 98 rows of 64 channels or 8 rows of 256 channels, 0.23-0.86.
MIN_MULTIPLY_ADDS = 2**21

#: Several groups: oneDNN's convolution reorders the weight into its blocked layout on
#: every call; below this many rows that costs more than its faster product saves. With
#: at least :data:`WIDE_OUTPUTS` output channels per weight group the product grows
#: faster than the reorder, and oneDNN pays from :data:`MIN_ROWS_WIDE` rows.
MIN_ROWS = 128
MIN_ROWS_WIDE = 48
WIDE_OUTPUTS = 128

#: Several groups: the weight gradient comes back as fresh (C_out, W_g) memory, where
#: ``torch.mm`` writes into kept scratch; oneDNN's convolution pays from about this many
#: rows.
MIN_WEIGHT_ROWS = 600

#: The grad columns come back as fresh memory too. The C library's allocator serves
#: blocks up to 32 MiB from memory it keeps, and maps larger ones anew (a page fault per
#: 4 KiB page: 15 ms for 75 MB here, more than oneDNN saves on a 64-channel layer); larger
#: chunks keep ``torch.mm`` into the kept workspace.
MAX_FRESH_BYTES = 32 * 2**20


def _linear_op() -> Any:
    """The op of oneDNN's matrix product, or None where this PyTorch build has none."""
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


@functools.cache
def matmul_works() -> bool:
    """Whether oneDNN's matrix product runs here and computes ``a · bᵀ + bias``.

    It is a private op of PyTorch's: checked once per process on small exact products
    (row-major and transposed operands), so a build where it is missing, fails or takes
    other arguments keeps ``torch.mm``.
    """
    op = _linear_op()
    if op is None:
        return False
    a = torch.arange(20.0).view(4, 5)
    b = torch.arange(15.0).view(3, 5)
    c = torch.arange(12.0).view(4, 3)
    bias = torch.arange(3.0)
    try:
        plain = op(a, b, bias, "none", [], "")  # (4, 3)
        transposed = op(a.t(), c.t(), None, "none", [], "")  # (5, 3)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return torch.equal(plain, a @ b.t() + bias) and torch.equal(transposed, a.t() @ c)


def _usable(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.mkldnn.is_available()


def _pays(rows: int, width: int, outputs: int, groups: int) -> bool:
    """Whether a product of ``rows`` rows pays for oneDNN's per-call costs.

    ``width``: one weight group's columns; ``outputs``: its output channels.
    """
    if groups == 1:
        return rows * width * outputs >= MIN_MULTIPLY_ADDS and matmul_works()
    return rows >= (MIN_ROWS_WIDE if outputs >= WIDE_OUTPUTS else MIN_ROWS)


def pays_for_output(dtype: torch.dtype, rows: int, width: int, outputs: int, groups: int) -> bool:
    """Whether the forward product of ``rows`` column rows runs in oneDNN.

    ``width``: one weight group's columns; ``outputs``: its output channels.
    """
    return _usable(dtype) and _pays(rows, width, outputs, groups)


def pays_for_weight(dtype: torch.dtype, rows: int, c_out: int, width: int, groups: int) -> bool:
    """Whether the (c_out, width) weight gradient over ``rows`` column rows runs in oneDNN.

    ``width``: one weight group's columns.
    """
    if groups == 1:
        return _usable(dtype) and _pays(rows, width, c_out, 1)
    return _usable(dtype) and rows >= MIN_WEIGHT_ROWS


def pays_for_columns(dtype: torch.dtype, rows: int, width: int, outputs: int, groups: int) -> bool:
    """Whether the (rows, groups·width) grad columns run in oneDNN.

    ``width``: one weight group's columns; ``outputs``: its output channels.
    """
    fresh = rows * groups * width * torch.empty(0, dtype=dtype).element_size()
    return _usable(dtype) and _pays(rows, width, outputs, groups) and fresh <= MAX_FRESH_BYTES


def _matmul(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a · bᵀ (+ bias)`` in oneDNN: (M, K) and (N, K), row-major or transposed views."""
    return _linear_op()(a, b, bias, "none", [], "")


def _as_map(rows: Tensor) -> Tensor:
    """(R, C) contiguous rows as a (1, C, R, 1) channels-last map (a view)."""
    r, c = rows.shape
    return rows.view(1, r, 1, c).permute(0, 3, 1, 2)


def _as_rows(maps: Tensor) -> Tensor:
    """(1, C, R, 1) map as contiguous (R, C) rows (a view when it is channels-last)."""
    c, r = maps.shape[1], maps.shape[2]
    return maps.permute(0, 2, 3, 1).reshape(r, c).contiguous()


def forward_rows(columns: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """Output rows of a chunk: ``columns_g · weight_gᵀ + bias`` for every group g.

    Args:
        columns: (R, groups·W_g) contiguous rows, group g's columns at ``g·W_g``.
        weight: (C_out, W_g) contiguous, output channels group by group.
        bias: (C_out,) or None.
        groups: the weight groups.

    Returns:
        (R, C_out) fresh contiguous rows.
    """
    if groups == 1:
        return _matmul(columns, weight, bias)
    w = weight.view(weight.shape[0], weight.shape[1], 1, 1)
    return _as_rows(F.conv2d(_as_map(columns), w, bias, groups=groups))


def backward_rows(grad_rows: Tensor, columns: Tensor, weight: Tensor, groups: int) -> Tensor:
    """The gradient of :func:`forward_rows` with respect to the columns.

    Args:
        grad_rows: (R, C_out) contiguous rows of ``grad_output``.
        columns: (R, groups·W_g) contiguous rows; only their shape is read.
        weight: (C_out, W_g) contiguous.
        groups: the weight groups.

    Returns:
        ``grad_columns``, ``grad_columns_g = grad_rows_g · weight_g``: (R, groups·W_g) fresh
        contiguous rows.
    """
    if groups == 1:
        return _matmul(grad_rows, weight.t())
    w = weight.view(weight.shape[0], weight.shape[1], 1, 1)
    g_cols, _, _ = torch.ops.aten.convolution_backward(
        _as_map(grad_rows), _as_map(columns), w, None,
        [1, 1], [0, 0], [1, 1], False, [0, 0], groups, [True, False, False],
    )  # fmt: skip
    return _as_rows(g_cols)


def weight_rows_into(
    out: Tensor, grad_rows: Tensor, columns: Tensor, groups: int, accumulate: bool
) -> None:
    """``out = grad_rows_gᵀ · columns_g`` for every group g (``+=`` when ``accumulate``).

    Args:
        out: (C_out, W_g) contiguous, written in place.
        grad_rows: (R, C_out) contiguous rows of ``grad_output``.
        columns: (R, groups·W_g) contiguous rows, group g's columns at ``g·W_g``.
        groups: the weight groups.
        accumulate: add to ``out`` instead of overwriting it.
    """
    if groups == 1:
        g_w = _matmul(grad_rows.t(), columns.t())
    else:
        _, g_w, _ = torch.ops.aten.convolution_backward(
            _as_map(grad_rows), _as_map(columns), out.view(*out.shape, 1, 1), None,
            [1, 1], [0, 0], [1, 1], False, [0, 0], groups, [False, True, False],
        )  # fmt: skip
        g_w = g_w.view(out.shape)
    out.add_(g_w) if accumulate else out.copy_(g_w)
