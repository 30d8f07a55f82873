"""Argument checks of the deformable RoI pooling ops.

Shapes, dtypes, devices and hyper-parameters are read from metadata only. The one
value check, that every RoI's batch index is an integer in ``[0, N)``, has to read
``rois``: free on CPU, one device sync on accelerators (where the pooling itself
syncs once anyway to group the RoIs by sampling-grid size).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from deformconv._utils import pair
from deformconv.ops._validation import check_tensor

__all__ = ["RoIPoolGeometry", "check_roi_pool"]


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
        raise ValueError(f"{where}: {name} must be finite; got {value!r}")
    return float(value)


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

    Returns:
        The normalised hyper-parameters and the number of output channels.

    Raises:
        TypeError: a non-tensor, an integer tensor, or a malformed hyper-parameter.
        ValueError: a shape, device, dtype or value (batch index) that breaks the rules.
    """
    x = check_tensor(where, "input", input, 4)
    r = check_tensor(where, "rois", rois, 2, like=x)
    out_size = pair(output_size, "output_size", where)
    if min(out_size) < 1:
        raise ValueError(f"{where}: output_size must be positive; got {out_size}")
    scale = _real(where, "spatial_scale", spatial_scale)
    if scale <= 0:
        raise ValueError(f"{where}: spatial_scale must be positive; got {spatial_scale!r}")
    if not isinstance(sampling_ratio, numbers.Integral) or isinstance(sampling_ratio, bool):
        raise TypeError(f"{where}: sampling_ratio must be an int; got {sampling_ratio!r}")
    gamma_ = _real(where, "gamma", gamma)
    if not isinstance(aligned, bool):
        raise TypeError(f"{where}: aligned must be a bool; got {aligned!r}")

    n, c, height, width = x.shape
    if height < 1 or width < 1:
        raise ValueError(
            f"{where}: input must have a non-empty map (H_in, W_in >= 1); got {(height, width)}"
        )
    bins = out_size[0] * out_size[1]
    if position_sensitive and c % bins != 0:
        raise ValueError(
            f"{where}: input channels C must be a multiple of out_h*out_w={bins} "
            f"(C = C_out*out_h*out_w); got C={c}"
        )
    c_out = c // bins if position_sensitive else c
    if r.shape[1] != 5:
        raise ValueError(
            f"{where}: rois must have shape (K, 5) as [batch_index, x1, y1, x2, y2]; "
            f"got {tuple(r.shape)}"
        )
    k = r.shape[0]
    for name, value, channels in (("offset", offset, 2), ("mask", mask, 1)):
        if value is None:
            continue
        t = check_tensor(where, name, value, 4, like=x)
        expected = (k, channels, *out_size)
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{where}: {name} must have shape (K, {channels}, out_h, out_w)={expected}; "
                f"got {tuple(t.shape)}"
            )
    _check_batch_index(where, r, n)
    return RoIPoolGeometry(out_size, scale, max(0, int(sampling_ratio)), gamma_, c_out)


def _check_batch_index(where: str, rois: Tensor, n: int) -> None:
    if rois.shape[0] == 0 or rois.device.type == "meta" or torch.compiler.is_compiling():
        return
    index = rois[:, 0]
    bad = ~((index >= 0) & (index < n) & (index == torch.floor(index)))  # NaN is bad too
    if bool(bad.any()):  # the one value check: a device sync off the CPU
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{where}: rois[:, 0] (batch index) must be integers in [0, N) with N={n}; "
            f"got {float(index[first])} at row {first}"
        )
