"""Fast gather-sum for deformable RoI pooling on CPU and CUDA: ``F.embedding_bag``.

The reference (``kernels/roi_reference.py``) reduces each bin's bilinear corners with
``index_select`` + ``bmm``, which materialises every gathered row. Here the same
separable gather-sum ``out[m] = sum_{r,q} w_row[m,r]·w_col[m,q]·table[rows[m,r] + cols[m,q]]``
runs as one weighted ``embedding_bag`` (a fused, multi-threaded gather-and-sum with no
intermediate buffer), with a hand-written backward made of ``embedding_bag`` calls too:

- ``grad_table``: the transposed bags. The (m, r, q) entries are sorted by table row
  (a stable sort, so the summation order is fixed); each distinct row becomes a bag of
  the ``grad_out`` rows that read it, weighted by their weights.
- ``grad_w_row[m, r] = <grad_out[m], sum_q w_col[m,q]·table[rows[m,r] + cols[m,q]]>``:
  one bag per (m, r), then a batched dot product; ``grad_w_col`` likewise. This is
  where the factorisation pays: the offset and mask gradients cost two more
  forward-sized passes instead of gathering every (m, r, q, channel) value.

Everything upstream of the weights (sample positions, offsets, mask) stays in plain
autograd, shared with the reference. The backward is once differentiable; double
backward needs the reference backend. ``embedding_bag`` exists on CPU and CUDA only,
so other devices use the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["DEVICE_TYPES", "reduce_groups"]

#: Devices with an ``embedding_bag`` kernel supporting ``per_sample_weights``.
DEVICE_TYPES = ("cpu", "cuda")

# Elements of the (bags, C) buffer per chunk in the backward's weight gradients.
_CHUNK_ELEMENTS = 1 << 23


def _flat(rows: Tensor, cols: Tensor, w_row: Tensor, w_col: Tensor) -> tuple[Tensor, Tensor]:
    m = rows.shape[0]
    index = (rows[:, :, None] + cols[:, None, :]).reshape(m, -1)
    weight = (w_row[:, :, None] * w_col[:, None, :]).reshape(m, -1)
    return index, weight


def _weight_grad(
    table: Tensor, grad: Tensor, outer: Tensor, inner: Tensor, w_inner: Tensor
) -> Tensor:
    """``out[m, a] = <grad[m], sum_b w_inner[m, b] · table[outer[m, a] + inner[m, b]]>``."""
    m, a = outer.shape
    b = inner.shape[1]
    c = table.shape[1]
    out = grad.new_empty(m, a)
    step = max(1, _CHUNK_ELEMENTS // max(1, a * c))
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        index = (outer[lo:hi, :, None] + inner[lo:hi, None, :]).reshape((hi - lo) * a, b)
        weight = w_inner[lo:hi, None, :].expand(hi - lo, a, b).reshape((hi - lo) * a, b)
        part = F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")
        out[lo:hi] = torch.bmm(part.reshape(hi - lo, a, c), grad[lo:hi, :, None])[..., 0]
    return out


class _GroupedGatherSum(torch.autograd.Function):
    """All groups in one autograd node, so ``grad_table`` is one sort and one bag pass."""

    @staticmethod
    def forward(ctx: FunctionCtx, table: Tensor, *flat: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(table, *flat)
        outs = [_bag(table, *flat[i : i + 4]) for i in range(0, len(flat), 4)]
        return torch.cat(outs) if outs else table.new_zeros(0, table.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        table, *flat = ctx.saved_tensors  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad = grad.contiguous()
        groups = [flat[i : i + 4] for i in range(0, len(flat), 4)]
        sizes = [g[0].shape[0] for g in groups]
        grads = grad.split(sizes)
        out: list[Tensor | None] = [None] * (1 + len(flat))
        if needs[0]:
            entries, weights, bags = [], [], []
            first = 0
            for rows, cols, w_row, w_col in groups:
                index, weight = _flat(rows, cols, w_row, w_col)
                entries.append(index.reshape(-1))
                weights.append(weight.reshape(-1))
                m = torch.arange(first, first + rows.shape[0], device=rows.device)
                bags.append(m.repeat_interleave(index.shape[1]))
                first += rows.shape[0]
            index, weight, bag = torch.cat(entries), torch.cat(weights), torch.cat(bags)
            order = torch.sort(index, stable=True).indices
            rows_hit, counts = torch.unique_consecutive(index[order], return_counts=True)
            offsets = torch.cumsum(counts, 0) - counts
            summed = F.embedding_bag(
                bag[order], grad, offsets, mode="sum", per_sample_weights=weight[order]
            )
            out[0] = torch.zeros_like(table).index_copy_(0, rows_hit, summed)
        for i, ((rows, cols, w_row, w_col), g) in enumerate(zip(groups, grads, strict=True)):
            if needs[1 + 4 * i + 2]:
                out[1 + 4 * i + 2] = _weight_grad(table, g, rows, cols, w_col)
            if needs[1 + 4 * i + 3]:
                out[1 + 4 * i + 3] = _weight_grad(table, g, cols, rows, w_row)
        return tuple(out)


def _bag(table: Tensor, rows: Tensor, cols: Tensor, w_row: Tensor, w_col: Tensor) -> Tensor:
    index, weight = _flat(rows, cols, w_row, w_col)
    return F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")


def reduce_groups(
    table: Tensor, groups: list[tuple[Tensor, Tensor, Tensor, Tensor]]
) -> list[Tensor]:
    """Same contract as :func:`deformconv.kernels.roi_reference.reduce_groups`.

    Args:
        table: (T, C).
        groups: per group ``(rows (M, R), cols (M, Q), w_row (M, R), w_col (M, Q))``.

    Returns:
        One (M, C) tensor per group.
    """
    flat = [t for corners in groups for t in corners]
    out: Tensor = _GroupedGatherSum.apply(table.contiguous(), *flat)
    return list(out.split([g[0].shape[0] for g in groups]))
