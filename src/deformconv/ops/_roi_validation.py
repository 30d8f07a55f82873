"""Argument checks of the deformable RoI pooling ops.

:func:`check_roi_pool` reads metadata only (shapes, dtypes, devices, hyper-parameters),
so it runs before dispatch even under torch.compile. The one value check,
:func:`check_batch_index` (every RoI's batch index is an integer in ``[0, N)``), has to
read ``rois``: the kernels run it, just before they index anything (free on CPU, one
device sync on accelerators, where the pooling syncs once anyway to group the RoIs by
sampling-grid size).

Shape, size, value, device and dtype errors are :class:`ArgumentError` (a ``ValueError``
and a ``RuntimeError``, the type ``torchvision.ops.roi_align`` raises); wrong types are
``TypeError``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from deformconv._utils import pair
from deformconv.ops._errors import ArgumentError

__all__ = ["MAX_SAMPLING_RATIO", "RoIPoolGeometry", "check_batch_index", "check_roi_pool"]

#: The largest ``sampling_ratio`` accepted (samples per bin along each axis).
MAX_SAMPLING_RATIO = 512


@dataclass(frozen=True)
class RoIPoolGeometry:
    """The normalised hyper-parameters of a validated RoI pooling call."""

    output_size: tuple[int, int]
    spatial_scale: float
    sampling_ratio: int
    gamma: float
    out_channels: int


def _real(where: str, name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a real number; got {value!r}")
    if not math.isfinite(float(value)):
        raise ArgumentError(f"{where}: {name} must be finite; got {value!r}")
    return float(value)


def _tensor(where: str, name: str, value: object, ndim: int, like: Tensor | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor; got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{where}: {name} must be a floating-point tensor "
            f"(float16, bfloat16, float32 or float64); got dtype={value.dtype}"
        )
    if value.dim() != ndim:
        raise ArgumentError(
            f"{where}: {name} must be {ndim}-D; got {value.dim()}-D with shape {tuple(value.shape)}"
        )
    if like is not None:
        if value.device != like.device:
            raise ArgumentError(
                f"{where}: {name} must be on the input's device {like.device}; got {value.device}"
            )
        if value.dtype != like.dtype:
            raise ArgumentError(
                f"{where}: {name} must have the input's dtype {like.dtype}; got {value.dtype}"
            )
    return value


def check_roi_pool(
    where: str,
    input: object,
    rois: object,
    offset: object,
    mask: object,
    output_size: object,
    spatial_scale: object,
    sampling_ratio: object,
    gamma: object,
    aligned: object,
    position_sensitive: bool,
) -> RoIPoolGeometry:
    """Validate a (PS) deformable RoI pooling call; see :func:`deformconv.deform_roi_pool`.

    Reads metadata only; the batch indices are checked by :func:`check_batch_index`.

    Returns:
        The normalised hyper-parameters and the number of output channels.

    Raises:
        TypeError: a non-tensor, an integer tensor, or a malformed hyper-parameter.
        ArgumentError: a shape, size, value, device or dtype that breaks the rules.
    """
    x = _tensor(where, "input", input, 4)
    r = _tensor(where, "rois", rois, 2)
    out_size = pair(output_size, "output_size", where)
    if min(out_size) < 1:
        raise ArgumentError(f"{where}: output_size must be positive; got {out_size}")
    scale = _real(where, "spatial_scale", spatial_scale)
    if scale <= 0:
        raise ArgumentError(f"{where}: spatial_scale must be positive; got {spatial_scale!r}")
    if not isinstance(sampling_ratio, numbers.Integral) or isinstance(sampling_ratio, bool):
        raise TypeError(f"{where}: sampling_ratio must be an int; got {sampling_ratio!r}")
    if int(sampling_ratio) > MAX_SAMPLING_RATIO:
        raise ArgumentError(
            f"{where}: sampling_ratio must be at most {MAX_SAMPLING_RATIO} (samples per bin "
            f"and axis; <= 0 is adaptive); got {sampling_ratio}"
        )
    gamma_ = _real(where, "gamma", gamma)
    if not isinstance(aligned, bool):
        raise TypeError(f"{where}: aligned must be a bool; got {aligned!r}")

    n, c, height, width = x.shape
    if height < 1 or width < 1:
        raise ArgumentError(
            f"{where}: input must have a non-empty map (H_in, W_in >= 1); got {(height, width)}"
        )
    bins = out_size[0] * out_size[1]
    if position_sensitive and c % bins != 0:
        raise ArgumentError(
            f"{where}: input channels C must be a multiple of out_h*out_w={bins} "
            f"(C = C_out*out_h*out_w); got C={c}"
        )
    c_out = c // bins if position_sensitive else c
    if r.shape[1] != 5:
        raise ArgumentError(
            f"{where}: rois must have shape (K, 5) as [batch_index, x1, y1, x2, y2]; "
            f"got {tuple(r.shape)}"
        )
    k = r.shape[0]
    for name, value, channels in (("offset", offset, 2), ("mask", mask, 1)):
        if value is None:
            continue
        t = _tensor(where, name, value, 4)
        expected = (k, channels, *out_size)
        if tuple(t.shape) != expected:
            raise ArgumentError(
                f"{where}: {name} must have shape (K, {channels}, out_h, out_w)={expected}; "
                f"got {tuple(t.shape)}"
            )
    # Devices and dtypes last, after every shape (torchvision's order).
    for name, value in (("rois", r), ("offset", offset), ("mask", mask)):
        if isinstance(value, Tensor):
            _tensor(where, name, value, value.dim(), like=x)
    return RoIPoolGeometry(out_size, scale, max(0, int(sampling_ratio)), gamma_, c_out)


def check_batch_index(where: str, rois: Tensor, n: int) -> None:
    """Check that every ``rois[:, 0]`` is an integer in ``[0, N)`` (reads the values).

    Raises:
        ArgumentError: the first row whose batch index breaks the rule.
    """
    if rois.shape[0] == 0 or rois.device.type == "meta":
        return
    index = rois[:, 0]
    bad = ~((index >= 0) & (index < n) & (index == torch.floor(index)))  # NaN is bad too
    if bool(bad.any()):  # the one value check: a device sync off the CPU
        first = int(bad.nonzero()[0, 0])
        raise ArgumentError(
            f"{where}: rois[:, 0] (batch index) must be integers in [0, N) with N={n}; "
            f"got {float(index[first])} at row {first}"
        )
