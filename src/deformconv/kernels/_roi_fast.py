"""Fast reductions for deformable RoI pooling on CPU and CUDA: ``F.embedding_bag``.

The reference (``kernels/roi_reference.py``) reduces each bin's bilinear corners with
``index_select`` + ``bmm``, which materialises every gathered value. Here the same three
reductions run as weighted ``embedding_bag`` calls (a fused, multi-threaded gather and
sum with no intermediate buffer of gathered values):

- ``gather_sum``: one bag per bin (its ``R·Q`` corner entries);
- ``dot_partials``: one bag per (bin, row) — the offset and mask gradients cost two more
  forward-sized passes instead of gathering every (bin, sample, channel) value;
- ``scatter_add_`` (the gradient of the input): the transposed bags. The entries of a
  slice are sorted by table row (a stable sort, so the summation order is fixed); each
  distinct row becomes a bag of the gradient rows that read it, and the bag sums are
  added in with ``index_add_`` (distinct rows per slice: deterministic on every device).

Each reduction works in slices whose indices, weights and outputs fit in
``roi_reference.WORKSPACE_BYTES``, like the reference. They are not differentiated
again: double backward goes through the reference's backward. ``embedding_bag`` with
``per_sample_weights`` exists on CPU and CUDA only, so other devices use the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deformconv.kernels.roi_reference import WORKSPACE_BYTES

__all__ = ["DEVICE_TYPES", "EmbeddingBagGather"]

#: Devices with an ``embedding_bag`` kernel supporting ``per_sample_weights``.
DEVICE_TYPES = ("cpu", "cuda")


def _steps(m: int, r: int, per_row: int) -> tuple[int, int]:
    """Slice sizes over (bins, rows) so that a slice holds about the workspace."""
    budget = max(1, WORKSPACE_BYTES // 8)  # elements of 8 bytes
    r_step = max(1, min(r, budget // max(1, per_row)))
    m_step = max(1, budget // (r_step * max(1, per_row))) if r_step == r else 1
    return m_step, r_step


class EmbeddingBagGather:
    """``roi_reference.GatherOps`` with weighted ``embedding_bag`` (CPU and CUDA)."""

    @staticmethod
    def gather_sum(
        table: Tensor, rows: Tensor, cols: Tensor, w_row: Tensor, w_col: Tensor
    ) -> Tensor:
        """See ``roi_reference.ReferenceGather.gather_sum``."""
        m, r = rows.shape
        q, c = cols.shape[1], table.shape[1]
        m_step, r_step = _steps(m, r, 2 * q + -(-c // r))  # index, weight, output
        out = table.new_empty(m, c)
        for lo in range(0, m, m_step):
            hi = min(m, lo + m_step)
            acc: Tensor | None = None
            for r0 in range(0, r, r_step):
                r1 = min(r, r0 + r_step)
                index = (rows[lo:hi, r0:r1, None] + cols[lo:hi, None, :]).reshape(hi - lo, -1)
                weight = (w_row[lo:hi, r0:r1, None] * w_col[lo:hi, None, :]).reshape(hi - lo, -1)
                part = F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")
                acc = part if acc is None else acc + part
            assert acc is not None
            out[lo:hi] = acc
        return out

    @staticmethod
    def dot_partials(
        table: Tensor, grad: Tensor, outer: Tensor, inner: Tensor, w_inner: Tensor
    ) -> Tensor:
        """See ``roi_reference.ReferenceGather.dot_partials``."""
        m, a = outer.shape
        b, c = inner.shape[1], table.shape[1]
        m_step, a_step = _steps(m, a, 2 * b + c)
        out = grad.new_empty(m, a)
        for lo in range(0, m, m_step):
            hi = min(m, lo + m_step)
            for a0 in range(0, a, a_step):
                a1 = min(a, a0 + a_step)
                index = (outer[lo:hi, a0:a1, None] + inner[lo:hi, None, :]).reshape(-1, b)
                weight = w_inner[lo:hi, None, :].expand(hi - lo, a1 - a0, b).reshape(-1, b)
                part = F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")
                part = part.reshape(hi - lo, a1 - a0, c)
                out[lo:hi, a0:a1] = torch.bmm(part, grad[lo:hi, :, None])[..., 0]
        return out

    @staticmethod
    def scatter_add_(
        grad_table: Tensor,
        grad: Tensor,
        rows: Tensor,
        cols: Tensor,
        w_row: Tensor,
        w_col: Tensor,
    ) -> None:
        """See ``roi_reference.ReferenceGather.scatter_add_``."""
        m, r = rows.shape
        q, c = cols.shape[1], grad.shape[1]
        # Per (bin, row): q entries (index, weight, bag, order) and up to q summed rows.
        m_step, r_step = _steps(m, r, q * (4 + c))
        for lo in range(0, m, m_step):
            hi = min(m, lo + m_step)
            for r0 in range(0, r, r_step):
                r1 = min(r, r0 + r_step)
                index = (rows[lo:hi, r0:r1, None] + cols[lo:hi, None, :]).reshape(-1)
                weight = (w_row[lo:hi, r0:r1, None] * w_col[lo:hi, None, :]).reshape(-1)
                bag = torch.arange(lo, hi, device=grad.device).repeat_interleave((r1 - r0) * q)
                order = torch.sort(index, stable=True).indices
                hit, counts = torch.unique_consecutive(index[order], return_counts=True)
                offsets = torch.cumsum(counts, 0) - counts
                summed = F.embedding_bag(
                    bag[order], grad, offsets, mode="sum", per_sample_weights=weight[order]
                )
                grad_table.index_add_(0, hit, summed)
