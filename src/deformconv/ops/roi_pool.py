"""Deformable RoI pooling (Dai et al. 2017, section 2.2): plain, modulated, position-sensitive.

Routing of a validated call:

=====================================  ==================================================
call                                   runs
=====================================  ==================================================
eager, ``use_backend("reference")``    ``kernels/roi_reference.py`` as an autograd
                                       Function (``index_select`` + ``bmm``)
eager (other backends), torch.compile  ``deformconv::deform_roi_pool`` (``ops/_roi_library.py``):
torch.export, TorchScript              the ``embedding_bag`` reductions on CPU and CUDA,
                                       the reference's elsewhere or under ``reference``

Both routes are twice differentiable.
=====================================  ==================================================

Under ``torch.autocast`` (CPU or CUDA) the float16/bfloat16/float32 tensors are cast to
float32 first (so bfloat16 features with float32 boxes are accepted, as by
``torchvision.ops.roi_align``), the op computes in float32, and the output is cast back
to ``input``'s dtype, as ``roi_align`` does. Nothing in the traced path reads a tensor's
values, so ``torch.compile(fullgraph=True)`` captures the call as one node.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deformconv._utils import IntPair
from deformconv.kernels import roi_reference
from deformconv.ops import _backend
from deformconv.ops._roi_library import deform_roi_pool_op
from deformconv.ops._roi_validation import check_batch_index, check_roi_pool

__all__ = ["deform_ps_roi_pool", "deform_roi_pool"]

_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _resolve(device_type: str, choice: str) -> str:
    # Raises for a backend that cannot run here (a constant under torch.compile).
    _backend.resolve_traced(device_type, choice)
    return "reference" if choice == "reference" else "embedding_bag"


def _autocast(
    input: Tensor, rois: Tensor, offset: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, torch.dtype | None]:
    """Under autocast on input's device: cast eligible tensors to float32; else no-op.

    Returns:
        The four tensors and the dtype to cast the output to (None: leave it).
    """
    if not isinstance(input, Tensor):
        return input, rois, offset, mask, None  # the validator says why
    device_type = input.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return input, rois, offset, mask, None

    def cast(t: Tensor | None) -> Tensor | None:
        eligible = isinstance(t, Tensor) and t.dtype in _AUTOCAST_ELIGIBLE
        return t.float() if eligible and t.device.type == device_type else t  # type: ignore[union-attr]

    out_dtype = input.dtype
    return cast(input), cast(rois), cast(offset), cast(mask), out_dtype  # type: ignore[return-value]


def _pool(
    where: str,
    position_sensitive: bool,
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    output_size: IntPair,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool,
    mask: Tensor | None,
) -> Tensor:
    input, rois, offset, mask, out_dtype = _autocast(input, rois, offset, mask)
    geo = check_roi_pool(
        where, input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma,
        aligned, position_sensitive,
    )  # fmt: skip
    backend = _resolve(input.device.type, _backend.get_backend())
    args = (geo.output_size, geo.spatial_scale, geo.sampling_ratio, geo.gamma, aligned)
    if backend == "reference" and not (
        torch.compiler.is_compiling() or torch.compiler.is_exporting()
    ):
        check_batch_index(where, rois, input.shape[0])
        dt = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        cast = [None if t is None else t.to(dt) for t in (input, rois, offset, mask)]
        out = roi_reference.DeformRoIPoolFunction.apply(*cast, *args, position_sensitive)
        out = out.to(input.dtype)
    else:
        out = deform_roi_pool_op(
            input, rois, offset, mask, list(geo.output_size), *args[1:], position_sensitive,
            backend,
        )  # fmt: skip
    return out if out_dtype is None else out.to(out_dtype)


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None = None,
    output_size: IntPair = (7, 7),
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    aligned: bool = True,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Deformable RoI pooling (DCNv1 section 2.2), modulated (DCNv2) when ``mask`` is given.

    RoIAlign whose bins are shifted by learned offsets normalised by the RoI's size:
    bin (i, j) of RoI k is shifted by ``Δ = gamma · offset[k, :, i, j] ∘ (roi_w, roi_h)``
    (the paper's ``Δp_ij = γ · Δp̂_ij ∘ (w, h)``) and

    ``y(k, c, i, j) = mask[k, 0, i, j] · (1 / (g_h·g_w)) · sum_{a, b} x(c, p_ij + Δ + s_ab)``

    where ``p_ij`` is the bin's top-left corner, ``s_ab`` runs over a regular
    ``g_h x g_w`` grid of sample points at the centres of the bin's sub-cells, and
    ``x(·)`` is bilinear interpolation exactly as ``torchvision.ops.roi_align``: a
    sample with ``y < -1``, ``y > H_in``, ``x < -1`` or ``x > W_in`` reads 0; otherwise
    coordinates are clamped into the map (edge replication). With ``offset=None``
    (or zero offsets) and no mask this *is* ``torchvision.ops.roi_align``.

    **Offset channels: 0 is x (horizontal, scaled by the RoI width), 1 is y (vertical,
    scaled by the RoI height)** — the order of mmcv's ``DeformRoIPool`` (and of the
    paper's ``(w, h)``), so offsets and predictor weights port from mmcv unchanged.
    Note this is the opposite of :func:`deformconv.deform_conv2d`'s (Δy, Δx) pairs.

    **Coordinates** (as ``torchvision.ops.roi_align``): a box corner ``(x1, y1)`` in
    image coordinates maps to ``x1 · spatial_scale`` on the feature map. With
    ``aligned=True`` (the default, as mmcv's) a further ``-0.5`` makes pixel centres
    sit on integer coordinates and boxes keep their exact size; with ``aligned=False``
    (the original RoIAlign) there is no shift and widths/heights below 1 are clamped
    to 1. The shift ``Δ`` uses that (clamped) RoI size.

    Worked example: ``rois = [0, 2, 3, 16, 10]``, ``spatial_scale=0.5``, 7x7 bins,
    one sample per bin. ``aligned=True``: the RoI spans x in [0.5, 7.5], y in
    [1.0, 4.5] (w = 7, h = 3.5), bins are 1 x 0.5 and bin (0, 0) samples
    (x, y) = (1.0, 1.25). ``offset[0, :, 0, 0] = (1, -2)`` with ``gamma=0.1`` moves it
    by (0.1·1·7, 0.1·(-2)·3.5) = (0.7, -0.7) to (1.7, 0.55). ``aligned=False``: the
    RoI spans [1, 8] x [1.5, 5]; bin (0, 0) samples (1.5, 1.75), shifted to (2.2, 1.05).

    **Bounds.** Memory: forward and backward work in slices of a fixed workspace
    (64 MiB), so beyond the output and a channels-last copy of the input a call needs
    a few values per RoI and bin, whatever the boxes. Time: the adaptive grid stops at
    512 samples per RoI side, ``max(1, 512 // out)`` per bin and axis (73 for 7 bins).
    Below that cap the result equals ``roi_align``; beyond it, it equals ``roi_align``
    with ``sampling_ratio`` = the cap, so an absurd box (1e9 pixels, say) costs at most
    about 512² samples.

    Under ``torch.autocast`` (CPU, CUDA) mixed dtypes are accepted (e.g. bfloat16
    features with float32 boxes): the op computes in float32 and returns ``input``'s
    dtype, as ``roi_align``. It runs as the custom op ``deformconv::deform_roi_pool``
    under torch.compile (no host synchronisation in the traced path), torch.export and
    TorchScript.

    Args:
        input: (N, C, H_in, W_in) feature map.
        rois: (K, 5) rows ``[batch_index, x1, y1, x2, y2]`` in image coordinates,
            ``input``'s dtype and device; batch indices must be integers in [0, N)
            (checked inside the op: free on CPU, one device sync elsewhere).
        offset: (K, 2, out_h, out_w) normalised offsets (channel 0: x, 1: y), or None.
        output_size: int or (out_h, out_w), positive.
        spatial_scale: image-to-feature-map scale (e.g. 1/16), positive.
        sampling_ratio: samples per bin along each axis (at most 512); ``<= 0``
            (default 0, like torchvision's -1) samples ``ceil(roi_h / out_h)`` along y,
            up to ``max(1, 512 // out_h)`` (likewise x): see *Bounds* above.
        gamma: offset scale γ (0.1 in the paper).
        aligned: the half-pixel convention above.
        mask: (K, 1, out_h, out_w) multiplier of each bin (raw: apply any activation
            yourself), or None.

    Returns:
        (K, C, out_h, out_w) in ``input``'s dtype (float16/bfloat16 are computed in
        float32). Differentiable with respect to ``input``, ``offset`` and ``mask``.
        Empty, zero-size and out-of-image RoIs read 0 where they see nothing; NaN or
        infinite offsets (and RoIs) read 0 and never index outside the input. The RoIs
        get no gradient (as with ``roi_align``).

    Raises:
        TypeError: a non-tensor, an integer tensor, or a malformed hyper-parameter.
        ArgumentError: (a ``ValueError`` and a ``RuntimeError``, what ``roi_align``
            raises) rois not (K, 5); a batch index outside [0, N); offset or mask of
            the wrong shape; a non-positive output size or scale; ``sampling_ratio``
            above 512; an empty map; a device or dtype that differs from ``input``'s.

    Example:
        >>> import torch
        >>> from deformconv import deform_roi_pool
        >>> ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(10.0), indexing="ij")
        >>> coords = torch.stack([xs, ys])[None]  # channel 0 holds x, channel 1 holds y
        >>> rois = torch.tensor([[0.0, 2.0, 3.0, 16.0, 10.0]])
        >>> offset = torch.zeros(1, 2, 7, 7)
        >>> offset[0, :, 0, 0] = torch.tensor([1.0, -2.0])
        >>> out = deform_roi_pool(coords, rois, offset, spatial_scale=0.5, sampling_ratio=1)
        >>> out[0, :, 0, 0]  # where bin (0, 0) sampled: (x, y)
        tensor([1.7000, 0.5500])
        >>> out[0, :, 0, 1]  # bin (0, 1) was not moved
        tensor([2.0000, 1.2500])
        >>> deform_roi_pool(coords, rois, offset, spatial_scale=0.5, sampling_ratio=1,
        ...                 aligned=False)[0, :, 0, 0]
        tensor([2.2000, 1.0500])
        >>> out.shape
        torch.Size([1, 2, 7, 7])
    """
    return _pool(
        "deform_roi_pool", False, input, rois, offset, output_size, spatial_scale,
        sampling_ratio, gamma, aligned, mask,
    )  # fmt: skip


def deform_ps_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None = None,
    output_size: IntPair = (7, 7),
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    aligned: bool = True,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Deformable position-sensitive RoI pooling (R-FCN; DCNv1 section 2.2).

    :func:`deform_roi_pool` where bin (i, j) of output channel c reads only input
    channel ``(c·out_h + i)·out_w + j`` — the channel layout of
    ``torchvision.ops.ps_roi_align``, which this equals (for ``aligned=True``, the
    only convention torchvision's has) with zero offsets and no mask. Offsets are
    class-agnostic, one (x, y) pair per bin as in the paper's released R-FCN
    (channel 0: x, 1: y; see :func:`deform_roi_pool` for the normalisation, the
    coordinate convention and the errors). Where ``ps_roi_align`` returns NaN for a
    RoI whose sampling grid is empty (0/0), this returns 0.

    Args:
        input: (N, C_out·out_h·out_w, H_in, W_in).
        rois: (K, 5) ``[batch_index, x1, y1, x2, y2]``.
        offset: (K, 2, out_h, out_w) or None.
        output_size: int or (out_h, out_w).
        spatial_scale: image-to-feature-map scale.
        sampling_ratio: samples per bin along each axis; ``<= 0`` adaptive.
        gamma: offset scale γ.
        aligned: the half-pixel convention of :func:`deform_roi_pool`.
        mask: (K, 1, out_h, out_w) or None.

    Returns:
        (K, C_out, out_h, out_w) with ``C_out = C / (out_h·out_w)``.

    Example:
        >>> import torch
        >>> from deformconv import deform_ps_roi_pool
        >>> x = torch.randn(2, 21 * 3 * 3, 16, 16)  # 21 classes, 3x3 position-sensitive bins
        >>> rois = torch.tensor([[0.0, 8.0, 8.0, 40.0, 56.0], [1.0, 0.0, 0.0, 63.0, 63.0]])
        >>> offset = 0.1 * torch.randn(2, 2, 3, 3)
        >>> deform_ps_roi_pool(x, rois, offset, output_size=3, spatial_scale=0.25).shape
        torch.Size([2, 21, 3, 3])
    """
    return _pool(
        "deform_ps_roi_pool", True, input, rois, offset, output_size, spatial_scale,
        sampling_ratio, gamma, aligned, mask,
    )  # fmt: skip
