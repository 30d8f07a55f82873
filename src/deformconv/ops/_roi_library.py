"""Deformable RoI pooling as ``torch.library`` custom ops.

``deformconv::deform_roi_pool`` (forward) and ``deformconv::deform_roi_pool_backward``
(gradients of input, offset and mask): torch.compile, torch.export, TorchScript and
``torch.library.opcheck`` see one node with a fake (shape-only) kernel and a registered
autograd formula. Inside, the kernel validates the call (metadata and the batch-index
values, so a direct ``torch.ops.deformconv.deform_roi_pool`` call is as safe as the
public function), then runs ``kernels/roi_reference.py`` with the reductions of the
chosen backend.

``backend`` names the reductions: ``"reference"`` (``index_select`` + ``bmm``, any
device), ``"embedding_bag"`` (``kernels/_roi_fast.py``, CPU and CUDA; elsewhere the
reference), or ``"auto"``, decided when the kernel runs from
:func:`deformconv.use_backend` (what TorchScript passes). The op computes float16 and
bfloat16 in float32 and returns the input's dtype; under autocast (CPU, CUDA) its
floating arguments are cast to float32 first. The backward op is differentiable again
(double backward on every backend): its autograd formula differentiates the reference's
backward, which is written in differentiable torch ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deformconv.kernels import roi_reference
from deformconv.ops import _backend
from deformconv.ops._oplib import custom_op
from deformconv.ops._roi_validation import check_batch_index, check_roi_pool

__all__ = ["deform_roi_pool_backward_op", "deform_roi_pool_op", "gather_ops"]

_HALF = (torch.float16, torch.bfloat16)


def gather_ops(backend: str, device_type: str) -> roi_reference.GatherOps:
    """The reductions that run ``backend`` (see the module docstring) on ``device_type``.

    Example:
        >>> type(gather_ops("reference", "cpu")).__name__
        'ReferenceGather'
    """
    from deformconv.kernels import _roi_fast

    if backend == "auto":
        backend = "reference" if _backend.get_backend() == "reference" else "embedding_bag"
    if backend == "reference" or device_type not in _roi_fast.DEVICE_TYPES:
        return roi_reference.ReferenceGather()
    return _roi_fast.EmbeddingBagGather()


def _name(position_sensitive: bool) -> str:
    return "deform_ps_roi_pool" if position_sensitive else "deform_roi_pool"


def _compute(t: Tensor | None) -> Tensor | None:
    if t is None:
        return None
    return t.float() if t.dtype in _HALF else t


@custom_op("deformconv::deform_roi_pool")
def deform_roi_pool_op(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    mask: Tensor | None,
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool,
    position_sensitive: bool,
    backend: str,
) -> Tensor:
    """Deformable (PS) RoI pooling; see :func:`deformconv.deform_roi_pool`.

    Args:
        input: (N, C, H_in, W_in).
        rois: (K, 5).
        offset: (K, 2, out_h, out_w) or None.
        mask: (K, 1, out_h, out_w) or None.
        output_size: (out_h, out_w).
        spatial_scale: image-to-map scale.
        sampling_ratio: samples per bin and axis; <= 0 adaptive.
        gamma: offset scale.
        aligned: pixel-centre convention.
        position_sensitive: the PS variant.
        backend: ``"reference"``, ``"embedding_bag"`` or ``"auto"``.

    Returns:
        (K, C_out, out_h, out_w), contiguous, in ``input``'s dtype.
    """
    where = _name(position_sensitive)
    geo = check_roi_pool(
        where, input, rois, offset, mask, tuple(output_size), spatial_scale, sampling_ratio,
        gamma, aligned, position_sensitive,
    )  # fmt: skip
    check_batch_index(where, rois, input.shape[0])
    x, r, o, m = (_compute(t) for t in (input, rois, offset, mask))
    out = roi_reference.pool_forward(
        x, r, o, m, geo.output_size, geo.spatial_scale, geo.sampling_ratio, geo.gamma,  # type: ignore[arg-type]
        aligned, position_sensitive, gather_ops(backend, input.device.type),
    )  # fmt: skip
    return out.to(input.dtype)


@deform_roi_pool_op.register_fake
def _(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    mask: Tensor | None,
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool,
    position_sensitive: bool,
    backend: str,
) -> Tensor:
    out_h, out_w = output_size
    c = input.shape[1] // (out_h * out_w) if position_sensitive else input.shape[1]
    return input.new_empty(rois.shape[0], c, out_h, out_w)


@custom_op("deformconv::deform_roi_pool_backward")
def deform_roi_pool_backward_op(
    grad_output: Tensor,
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    mask: Tensor | None,
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool,
    position_sensitive: bool,
    backend: str,
    output_mask: Sequence[bool],
) -> list[Tensor]:
    """Gradients for (input, offset, mask); an empty tensor where not asked or None.

    ``output_mask`` says which of the three are wanted. Each gradient is contiguous,
    with its argument's shape and dtype.
    """
    geo = check_roi_pool(
        _name(position_sensitive), input, rois, offset, mask, tuple(output_size),
        spatial_scale, sampling_ratio, gamma, aligned, position_sensitive,
    )  # fmt: skip
    originals = (input, offset, mask)
    g, x, r, o, m = (_compute(t) for t in (grad_output, input, rois, offset, mask))
    grads = roi_reference.pool_backward(
        g.contiguous(), x, r, o, m, geo.output_size, geo.spatial_scale,  # type: ignore[arg-type,union-attr]
        geo.sampling_ratio, geo.gamma, aligned, position_sensitive,
        gather_ops(backend, input.device.type),
        (bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2])),
    )  # fmt: skip
    return [
        input.new_empty(0) if grad is None or t is None else grad.to(t.dtype).contiguous()
        for grad, t in zip(grads, originals, strict=True)
    ]


@deform_roi_pool_backward_op.register_fake
def _(
    grad_output: Tensor,
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    mask: Tensor | None,
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool,
    position_sensitive: bool,
    backend: str,
    output_mask: Sequence[bool],
) -> list[Tensor]:
    return [
        input.new_empty(0) if t is None or not wanted else t.new_empty(t.shape)
        for t, wanted in zip((input, offset, mask), output_mask, strict=True)
    ]


def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    input, rois, offset, mask, *args = inputs
    ctx.save_for_backward(input, rois, offset, mask)
    ctx.args = args


def _backward(ctx, grad):  # type: ignore[no-untyped-def]
    input, rois, offset, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    wanted = [needs[0], offset is not None and needs[2], mask is not None and needs[3]]
    gi, go, gm = deform_roi_pool_backward_op(grad, input, rois, offset, mask, *ctx.args, wanted)
    return (
        gi if wanted[0] else None, None, go if wanted[1] else None, gm if wanted[2] else None,
        None, None, None, None, None, None, None,
    )  # fmt: skip


def _setup_backward_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    grad_output, input, rois, offset, mask, *args = inputs
    ctx.save_for_backward(grad_output, input, rois, offset, mask)
    ctx.args = args


def _double_backward(ctx, grads):  # type: ignore[no-untyped-def]
    # Differentiate the reference's backward (plain, differentiable torch ops) with autograd.
    grad_output, input, rois, offset, mask = ctx.saved_tensors
    size, scale, ratio, gamma, aligned, ps, _, wanted = ctx.args
    leaves = [None if t is None else t.detach().requires_grad_() for t in (grad_output, input)]
    leaves += [None if t is None else t.detach().requires_grad_() for t in (offset, mask)]
    g, x, o, m = (_compute(t) for t in leaves)
    with torch.enable_grad():
        outs = roi_reference.pool_backward(
            g, x, _compute(rois), o, m, (int(size[0]), int(size[1])), scale, max(0, ratio),  # type: ignore[arg-type]
            gamma, aligned, ps, roi_reference.ReferenceGather(),
            (bool(wanted[0]), bool(wanted[1]), bool(wanted[2])),
        )  # fmt: skip
        pairs = [
            (out, grad)
            for out, grad in zip(outs, grads, strict=True)
            if out is not None and grad is not None and grad.numel() > 0
        ]
        used = [t for t in leaves if t is not None]
        found = torch.autograd.grad(
            [p[0] for p in pairs], used, [p[1] for p in pairs], allow_unused=True
        ) if pairs else [None] * len(used)  # fmt: skip
    it = iter(found)
    gg, gx, go, gm = (None if t is None else next(it) for t in leaves)
    return (gg, gx, None, go, gm, None, None, None, None, None, None, None, None)


deform_roi_pool_op.register_autograd(_backward, setup_context=_setup_context)
deform_roi_pool_backward_op.register_autograd(
    _double_backward, setup_context=_setup_backward_context
)
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("deformconv::deform_roi_pool", _device_type, torch.float32)
