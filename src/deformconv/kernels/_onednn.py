"""The column kernels' GEMMs as oneDNN 1x1 convolutions over a map of pixel rows.

The column + GEMM kernels multiply (pixels, groups·K·C_pg) column rows by the weight.
``torch.mm`` runs such products in MKL; oneDNN, the library behind PyTorch's own CPU
convolutions, runs the same product as a 1x1 convolution. Measured on 2 threads of a
Zen 5 EPYC (AVX-512), float32: MKL about 200 GFLOP/s, oneDNN about 420; the forward,
input-gradient and weight-gradient products of ResNet-50's res3-res5 layers and of a
64-channel detection layer took 1.3-2.5x less time in oneDNN.

The rows need no copy: an (R, C) row-major matrix is, viewed as (1, C, R, 1), an NCHW map
in ``torch.channels_last`` order, oneDNN's preferred input; weight groups become the
convolution's ``groups`` (each group's columns are contiguous in a row, as the weight
groups' channels are in a map), and the bias is fused. What oneDNN returns is fresh
memory, channels-last again, so the results are (R, C) rows with no copy either.

Used for float32 where PyTorch has oneDNN (``torch.backends.mkldnn``), where each product
pays for oneDNN's per-call costs (see the ``pays_for_*`` functions); float64, builds
without oneDNN and small products keep ``torch.mm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MAX_FRESH_BYTES", "MAX_WEIGHT_GRAD_ELEMENTS", "MIN_ROWS", "MIN_ROWS_WIDE",
    "MIN_WEIGHT_ROWS", "MIN_WEIGHT_ROWS_SLICED", "WIDE_OUTPUTS",
    "backward_rows", "forward_rows", "weight_rows_into",
    "pays_for_columns", "pays_for_output", "pays_for_weight",
]  # fmt: skip

#: oneDNN reorders the weight into its blocked layout on every call; below this many rows
#: that costs more than its faster product saves. With at least :data:`WIDE_OUTPUTS`
#: output channels per weight group the product grows faster than the reorder, and
#: oneDNN pays from :data:`MIN_ROWS_WIDE` rows. Measured against ``torch.addmm`` /
#: ``torch.mm`` (2 threads, Zen 5), oneDNN time over MKL time at 32 / 49 / 128 rows: the
#: forward of a (4608 → 512) product 1.48 / 0.67 / 0.65, of (1152 → 128) 1.20 / 0.87 /
#: 0.70, of (576 → 64) 1.05 / 1.52 / 1.03; the grad columns of (512 → 4608) 0.52 / 0.51 /
#: 0.54, of (128 → 1152) 1.17 / 0.85 / 0.68, of (64 → 576) 1.88 / 1.88 / 1.16.
MIN_ROWS = 128
MIN_ROWS_WIDE = 48
WIDE_OUTPUTS = 128

#: The weight gradient comes back as fresh (C_out, W_g) memory, where ``torch.mm`` writes
#: into kept scratch: oneDNN pays from about this many rows (measured on ResNet-50's res4
#: layer at batch 1, 196 rows: forward + backward 3.9-5.4 ms with ``torch.mm``, 5.2-7.5
#: with oneDNN)...
MIN_WEIGHT_ROWS = 600

#: ... or from this many where the gradient is computed in slices (see
#: :data:`MAX_WEIGHT_GRAD_ELEMENTS`): ResNet-50's res5 layer (512 x 4608) forward +
#: backward at batch 2 / 4 / 8 (98 / 196 / 392 rows) 11.9-12.8 / 17.6-18.5 / 26.6-26.9 ms
#: with ``torch.mm``, 11.2-12.5 / 15.3-16.3 / 22.9-23.4 with oneDNN in four slices.
MIN_WEIGHT_ROWS_SLICED = 96

#: oneDNN's weight gradient slows down when the gradient it accumulates is large; larger
#: gradients are computed in slices of output channels of at most this many elements.
#: Measured at 392 rows (2 threads, Zen 5): a (512 x 4608) gradient at 110 GFLOP/s in one
#: product, (128 x 4608) at 362, (512 x 1152) at 384, (256 x 2304) at 368-392, (256 x 4608)
#: at 255; ``torch.mm`` runs them all at 190-210.
MAX_WEIGHT_GRAD_ELEMENTS = 512 * 1152

#: The grad columns come back as fresh memory too. The C library's allocator serves
#: blocks up to 32 MiB from memory it keeps, and maps larger ones anew (a page fault per
#: 4 KiB page: 15 ms for 75 MB here, more than oneDNN saves on a 64-channel layer); larger
#: chunks keep ``torch.mm`` into the kept workspace.
MAX_FRESH_BYTES = 32 * 2**20


def _usable(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.mkldnn.is_available()


def _enough_rows(rows: int, outputs: int) -> bool:
    """Whether ``rows`` rows pay for the weight's reorder, ``outputs`` channels per group."""
    return rows >= (MIN_ROWS_WIDE if outputs >= WIDE_OUTPUTS else MIN_ROWS)


def pays_for_output(dtype: torch.dtype, rows: int, outputs: int) -> bool:
    """Whether the forward product of ``rows`` column rows runs in oneDNN.

    ``outputs``: the output channels per weight group.
    """
    return _usable(dtype) and _enough_rows(rows, outputs)


def _weight_slices(c_out: int, width: int, groups: int) -> int:
    """Slices of a (c_out, width) weight gradient (see :data:`MAX_WEIGHT_GRAD_ELEMENTS`)."""
    return 1 if groups > 1 else -(-c_out * width // MAX_WEIGHT_GRAD_ELEMENTS)


def pays_for_weight(dtype: torch.dtype, rows: int, c_out: int, width: int, groups: int) -> bool:
    """Whether the (c_out, width) weight gradient over ``rows`` column rows runs in oneDNN.

    ``width``: one weight group's columns.
    """
    sliced = _weight_slices(c_out, width, groups) > 1
    return _usable(dtype) and rows >= (MIN_WEIGHT_ROWS_SLICED if sliced else MIN_WEIGHT_ROWS)


def pays_for_columns(dtype: torch.dtype, rows: int, width: int, outputs: int) -> bool:
    """Whether the (rows, width) grad columns run in oneDNN.

    ``outputs``: the output channels per weight group.
    """
    fresh = rows * width * torch.empty(0, dtype=dtype).element_size()
    return _usable(dtype) and _enough_rows(rows, outputs) and fresh <= MAX_FRESH_BYTES


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

    A single group's gradient larger than :data:`MAX_WEIGHT_GRAD_ELEMENTS` is computed in
    slices of output channels (rows of ``out``; a copy of those columns of ``grad_rows``).
    """
    c_out, width = out.shape
    step = -(-c_out // _weight_slices(c_out, width, groups))
    for o0 in range(0, c_out, step):
        g_part = grad_rows if step == c_out else grad_rows[:, o0 : o0 + step].contiguous()
        dst = out[o0 : o0 + step]
        _, g_w, _ = torch.ops.aten.convolution_backward(
            _as_map(g_part), _as_map(columns), dst.view(*dst.shape, 1, 1), None,
            [1, 1], [0, 0], [1, 1], False, [0, 0], groups, [False, True, False],
        )  # fmt: skip
        g_w = g_w.view(dst.shape)
        dst.add_(g_w) if accumulate else dst.copy_(g_w)
