r"""DCNv3 and DCNv4 (InternImage, FlashInternImage): validate, then dispatch to a kernel.

Both run the same core (``kernels/dcnv_reference.py`` states it): for each output pixel,
group g and kernel point p, the mask-weighted sum of bilinear samples of the group's
channels, on channels-last tensors, with no weights inside (the modules' linear
projections mix the channels). DCNv4 reads the offsets and the mask from one fused
tensor.

Routing, as for :func:`deformconv.deform_conv2d`: eager calls and ``torch.compile`` on
the reference backend run plain torch ops (differentiable twice); fast backends
(``numba`` on CPU, ``triton`` on CUDA) and ``torch.export`` go through the custom op
``deformconv::dcnv3`` (fake kernel, registered autograd formula through
``deformconv::dcnv3_backward``, autocast to float32). The backend is the one
:func:`deformconv.use_backend` chooses (``auto``: the fastest available for the device).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from deformconv._utils import IntPair, pair
from deformconv.kernels import dcnv_reference
from deformconv.ops import _backend
from deformconv.ops._errors import ArgumentError
from deformconv.ops._library import _alert_not_deterministic
from deformconv.ops._oplib import custom_op

__all__ = ["dcnv3", "dcnv3_backward_op", "dcnv3_op", "dcnv4"]

_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)
_HALF = (torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------------------
# Validation (metadata only: no .item(), no device sync)


def _tensor(where: str, name: str, value: object, like: Tensor | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor; got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{where}: {name} must be a floating-point tensor "
            f"(float16, bfloat16, float32 or float64); got dtype={value.dtype}"
        )
    if value.dim() != 4:
        raise ArgumentError(
            f"{where}: {name} must be 4-D (channels last); got {value.dim()}-D with shape "
            f"{tuple(value.shape)}"
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


class _Geometry:
    """A validated call's normalised arguments."""

    def __init__(
        self,
        where: str,
        input: Tensor,
        kernel_size: object,
        stride: object,
        padding: object,
        dilation: object,
        group: object,
        offset_scale: object,
        remove_center: object,
    ) -> None:
        self.kernel_size = pair(kernel_size, "kernel_size", where)
        self.stride = pair(stride, "stride", where)
        self.padding = pair(padding, "padding", where)
        self.dilation = pair(dilation, "dilation", where)
        for name, value, minimum in (
            ("kernel_size", self.kernel_size, 1),
            ("stride", self.stride, 1),
            ("dilation", self.dilation, 1),
            ("padding", self.padding, 0),
        ):
            if min(value) < minimum:
                rule = "positive" if minimum == 1 else "non-negative"
                raise ArgumentError(f"{where}: {name} must be {rule}; got {value}")
        if not isinstance(group, numbers.Integral) or isinstance(group, bool):
            raise TypeError(f"{where}: group must be an int; got {group!r}")
        self.group = int(group)
        if not isinstance(offset_scale, numbers.Real) or isinstance(offset_scale, bool):
            raise TypeError(f"{where}: offset_scale must be a float; got {offset_scale!r}")
        self.offset_scale = float(offset_scale)
        if not math.isfinite(self.offset_scale):
            raise ArgumentError(f"{where}: offset_scale must be finite; got {self.offset_scale}")
        if not isinstance(remove_center, bool | int) or remove_center not in (0, 1):
            raise TypeError(f"{where}: remove_center must be a bool; got {remove_center!r}")
        self.remove_center = bool(remove_center)
        k_h, k_w = self.kernel_size
        if self.remove_center and (k_h % 2 == 0 or k_w % 2 == 0):
            raise ArgumentError(
                f"{where}: remove_center needs an odd kernel_size (a centre point); "
                f"got {self.kernel_size}"
            )
        self.points = k_h * k_w - int(self.remove_center)

        n, h_in, w_in, channels = input.shape
        if self.group < 1 or channels < self.group or channels % self.group != 0:
            raise ArgumentError(
                f"{where}: input's channels C (last dim) must be a positive multiple of "
                f"group={self.group}; got C={channels}"
            )
        h_out = (h_in + 2 * self.padding[0] - self.dilation[0] * (k_h - 1) - 1) // self.stride[0]
        w_out = (w_in + 2 * self.padding[1] - self.dilation[1] * (k_w - 1) - 1) // self.stride[1]
        self.out_size = (h_out + 1, w_out + 1)
        if min(self.out_size) < 1:
            raise ArgumentError(
                f"{where}: the output would be empty: H_out, W_out = "
                "(H_in + 2*padding - dilation*(K-1) - 1) // stride + 1 = "
                f"{self.out_size} for input size {(h_in, w_in)}, kernel {self.kernel_size}, "
                f"stride {self.stride}, padding {self.padding}, dilation {self.dilation}"
            )
        self.batch = n

    def check_map(self, where: str, name: str, t: Tensor, channels: int, rule: str) -> None:
        """``t`` must be (N, H_out, W_out, channels); ``rule`` explains ``channels``."""
        if t.shape[0] != self.batch:
            raise ArgumentError(
                f"{where}: {name} must have the input's batch size N={self.batch}; got {t.shape[0]}"
            )
        if tuple(t.shape[1:3]) != self.out_size:
            raise ArgumentError(
                f"{where}: {name} must have the output's spatial size (H_out, W_out)="
                f"{self.out_size} in dims 1 and 2; got {tuple(t.shape[1:3])}"
            )
        if t.shape[3] != channels:
            raise ArgumentError(f"{where}: {name} must have {rule}={channels} channels; "
                                f"got {t.shape[3]}")  # fmt: skip

    def args(self) -> tuple[Any, ...]:
        """The kernels' trailing arguments."""
        return (
            self.kernel_size, self.stride, self.padding, self.dilation, self.group,
            self.offset_scale, self.remove_center,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Kernels and the custom ops


def _fast_kernels(name: str) -> ModuleType | None:
    if name == "numba":
        from deformconv.kernels import _dcnv_numba

        return _dcnv_numba
    if name == "triton":
        from deformconv.kernels import _dcnv_triton

        return _dcnv_triton
    return None


def _kernels(backend: str, device_type: str) -> Any:
    """The kernel module for ``backend``; falls back as the deform_conv2d op does."""
    if backend != "reference":
        available = _backend.available_backends(device_type)
        names = [backend] if backend in available else []
        for name in [*names, *available]:
            module = _fast_kernels(name)
            if module is not None:
                return module
    return dcnv_reference


def _compute_dtype(kernels: Any, dtype: torch.dtype) -> torch.dtype:
    native = getattr(kernels, "NATIVE_DTYPES", (torch.float32, torch.float64))
    return torch.float32 if dtype in _HALF and dtype not in native else dtype


def _t(v: Sequence[int]) -> tuple[int, int]:
    return int(v[0]), int(v[1])


@custom_op("deformconv::dcnv3")
def dcnv3_op(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    group: int,
    offset_scale: float,
    remove_center: bool,
    backend: str,
) -> Tensor:
    """Forward of a validated DCNv3 core call on ``backend``.

    Args:
        input: (N, H_in, W_in, C).
        offset: (N, H_out, W_out, G·P·2).
        mask: (N, H_out, W_out, G·P).
        kernel_size: (K_h, K_w).
        stride: (s_h, s_w).
        padding: (p_h, p_w).
        dilation: (d_h, d_w).
        group: G.
        offset_scale: see :func:`deformconv.dcnv3`.
        remove_center: see :func:`deformconv.dcnv3`.
        backend: a backend's name.

    Returns:
        (N, H_out, W_out, C), contiguous, in ``input``'s dtype.
    """
    kernels = _kernels(backend, input.device.type)
    dt = _compute_dtype(kernels, input.dtype)
    args = [t.to(dt).contiguous() for t in (input, offset, mask)]
    out = kernels.forward(
        *args, _t(kernel_size), _t(stride), _t(padding), _t(dilation), group, offset_scale,
        remove_center,
    )  # fmt: skip
    return out.to(input.dtype).contiguous()


@dcnv3_op.register_fake
def _(input, offset, mask, kernel_size, stride, padding, dilation, group, offset_scale,
      remove_center, backend):  # type: ignore[no-untyped-def]  # fmt: skip
    return input.new_empty(*offset.shape[:3], input.shape[3])


@custom_op("deformconv::dcnv3_backward")
def dcnv3_backward_op(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    group: int,
    offset_scale: float,
    remove_center: bool,
    backend: str,
) -> list[Tensor]:
    """Gradients for (input, offset, mask), each contiguous with its argument's shape and dtype."""
    device_type = input.device.type
    kernels = _kernels(backend, device_type)
    if not getattr(kernels, "DETERMINISTIC_BACKWARD", device_type == "cpu"):
        _alert_not_deterministic(f"deformconv::dcnv3_backward (backend {backend!r})")
    dt = _compute_dtype(kernels, input.dtype)
    args = [t.to(dt).contiguous() for t in (grad_output, input, offset, mask)]
    grads = kernels.backward(
        *args, _t(kernel_size), _t(stride), _t(padding), _t(dilation), group, offset_scale,
        remove_center,
    )  # fmt: skip
    return [g.to(t.dtype).contiguous() for g, t in zip(grads, (input, offset, mask), strict=True)]


@dcnv3_backward_op.register_fake
def _(grad_output, input, offset, mask, kernel_size, stride, padding, dilation, group,
      offset_scale, remove_center, backend):  # type: ignore[no-untyped-def]  # fmt: skip
    return [t.new_empty(t.shape) for t in (input, offset, mask)]


def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    ctx.save_for_backward(*inputs[:3])
    ctx.args = inputs[3:]


def _backward(ctx, grad_output):  # type: ignore[no-untyped-def]
    input, offset, mask = ctx.saved_tensors
    gi, go, gm = dcnv3_backward_op(grad_output, input, offset, mask, *ctx.args)
    return gi, go, gm, *([None] * len(ctx.args))


dcnv3_op.register_autograd(_backward, setup_context=_setup_context)
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("deformconv::dcnv3", _device_type, torch.float32)


# ---------------------------------------------------------------------------------------
# Public functions


def _autocast(tensors: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], torch.dtype | None]:
    """Under autocast on the input's device: float32 tensors and the output dtype."""
    input = tensors[0]
    if not isinstance(input, Tensor):
        return tensors, None  # the validator says why
    device_type = input.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors, None

    def cast(t: Tensor) -> Tensor:
        eligible = isinstance(t, Tensor) and t.dtype in _AUTOCAST_ELIGIBLE
        return t.float() if eligible and t.device.type == device_type else t

    out_dtype = torch.get_autocast_dtype(device_type) if input.dtype != torch.float64 else None
    return tuple(cast(t) for t in tensors), out_dtype


def _run(input: Tensor, offset: Tensor, mask: Tensor, geo: _Geometry) -> Tensor:
    backend = _backend.resolve_traced(input.device.type, _backend.get_backend())
    if backend == "reference" and not torch.compiler.is_exporting():
        # Autocast applies to the op as a whole (done by the caller), not to its parts.
        device_type = input.device.type
        with (
            torch.autocast(device_type, enabled=False)
            if device_type in ("cpu", "cuda")
            else (contextlib.nullcontext())
        ):
            return dcnv_reference.forward(input, offset, mask, *geo.args())
    return dcnv3_op(input, offset, mask, *geo.args(), backend)  # type: ignore[no-any-return]


def dcnv3(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: IntPair = 3,
    stride: IntPair = 1,
    padding: IntPair = 1,
    dilation: IntPair = 1,
    group: int = 1,
    offset_scale: float = 1.0,
    remove_center: bool = False,
) -> Tensor:
    r"""The DCNv3 core (InternImage's ``DCNv3Function`` / ``dcnv3_core_pytorch``).

    Channels-last, no weights: for output pixel (h, w), group g and kernel point p,

    ``out[n, h, w, g·C_g + c] = Σ_p mask[n, h, w, g·P + p] · x_{g·C_g + c}(loc_p)``

    ``loc_x = w·s_w - p_w + c_w + (i_x·d_w - c_w + Δx)·offset_scale`` with
    ``c_w = d_w·(K_w - 1) // 2`` (``loc_y`` alike): ``offset_scale`` scales the kernel's
    footprint and the offsets. ``x(·)`` is bilinear interpolation; each corner outside
    the map reads 0. NaN and infinite offsets read 0 and get zero gradients.

    Layout (unlike :func:`deformconv.deform_conv2d`): kernel points are x-major
    (``p = i_x·K_h + i_y``, the centre point left out when ``remove_center``), offsets
    are (Δx, Δy) pairs, tensors are channels-last.

    Args:
        input: (N, H_in, W_in, C), C = G·C_g.
        offset: (N, H_out, W_out, G·P·2), P = K_h·K_w (minus 1 with ``remove_center``);
            channel (g·P + p)·2 is Δx of point p of group g, the next one its Δy.
        mask: (N, H_out, W_out, G·P); channel g·P + p multiplies point p of group g
            (raw: InternImage's module applies a softmax over each group's P points).
        kernel_size: int or (K_h, K_w).
        stride: int or (s_h, s_w).
        padding: int or (p_h, p_w), zero padding.
        dilation: int or (d_h, d_w).
        group: G, dividing C.
        offset_scale: scale of the kernel's footprint and of the offsets.
        remove_center: leave out the centre point (odd kernel sizes).

    Returns:
        (N, H_out, W_out, C) with ``H_out = (H_in + 2·p_h - d_h·(K_h-1) - 1) // s_h + 1``
        (likewise W_out), in ``input``'s dtype.

    Raises:
        TypeError: a non-tensor, an integer tensor, or a malformed scalar argument.
        ValueError: shapes, devices or dtypes that break the rules above; an empty output.

    Example:
        >>> import torch, deformconv
        >>> x = torch.randn(2, 8, 8, 16)                  # (N, H, W, C)
        >>> offset = torch.randn(2, 8, 8, 4 * 9 * 2)      # group 4, 3x3 points
        >>> mask = torch.rand(2, 8, 8, 4 * 9)
        >>> deformconv.dcnv3(x, offset, mask, group=4).shape
        torch.Size([2, 8, 8, 16])
    """
    (input, offset, mask), out_dtype = _autocast((input, offset, mask))
    where = "dcnv3"
    x = _tensor(where, "input", input)
    geo = _Geometry(where, x, kernel_size, stride, padding, dilation, group, offset_scale,
                    remove_center)  # fmt: skip
    off = _tensor(where, "offset", offset, like=x)
    geo.check_map(where, "offset", off, geo.group * geo.points * 2, f"G*P*2={geo.group}*"
                  f"{geo.points}*2")  # fmt: skip
    m = _tensor(where, "mask", mask, like=x)
    geo.check_map(where, "mask", m, geo.group * geo.points, f"G*P={geo.group}*{geo.points}")
    out = _run(x, off, m, geo)
    return out if out_dtype is None else out.to(out_dtype)


def dcnv4(
    input: Tensor,
    offset_mask: Tensor,
    kernel_size: IntPair = 3,
    stride: IntPair = 1,
    padding: IntPair = 1,
    dilation: IntPair = 1,
    group: int = 1,
    offset_scale: float = 1.0,
    remove_center: bool = False,
) -> Tensor:
    r"""DCNv4 (OpenGVLab's ``DCNv4Function``): the DCNv3 core with a fused offset/mask tensor.

    Computes :func:`dcnv3` with the offsets and the mask read from ``offset_mask``: for
    each group g in turn, its 2·P offsets ((Δx, Δy) pairs, x-major points) then its P
    mask values (raw: DCNv4 applies no softmax). Channels after the G·3·P used ones
    (DCNv4 pads to a multiple of 8) are ignored and get a zero gradient.

    Args:
        input: (N, H_in, W_in, C), C = G·C_g.
        offset_mask: (N, H_out, W_out, D) with D >= G·3·P; channel g·3·P + 2·p is Δx of
            point p of group g, the next one Δy, and channel g·3·P + 2·P + p its mask.
        kernel_size: int or (K_h, K_w).
        stride: int or (s_h, s_w).
        padding: int or (p_h, p_w), zero padding.
        dilation: int or (d_h, d_w).
        group: G, dividing C.
        offset_scale: scale of the kernel's footprint and of the offsets.
        remove_center: leave out the centre point (odd kernel sizes).

    Returns:
        (N, H_out, W_out, C) in ``input``'s dtype; see :func:`dcnv3`.

    Raises:
        TypeError: a non-tensor, an integer tensor, or a malformed scalar argument.
        ValueError: shapes, devices or dtypes that break the rules above; an empty output.

    Example:
        >>> import torch, deformconv
        >>> x = torch.randn(2, 8, 8, 32)
        >>> offset_mask = torch.randn(2, 8, 8, 112)    # 2 groups · 27, padded to 8·14
        >>> deformconv.dcnv4(x, offset_mask, group=2).shape
        torch.Size([2, 8, 8, 32])
    """
    (input, offset_mask), out_dtype = _autocast((input, offset_mask))
    where = "dcnv4"
    x = _tensor(where, "input", input)
    geo = _Geometry(where, x, kernel_size, stride, padding, dilation, group, offset_scale,
                    remove_center)  # fmt: skip
    om = _tensor(where, "offset_mask", offset_mask, like=x)
    used = geo.group * 3 * geo.points
    if om.shape[3] < used:
        raise ArgumentError(
            f"{where}: offset_mask must have at least G*3*P={geo.group}*3*{geo.points}={used} "
            f"channels (the rest is padding); got {om.shape[3]}"
        )
    geo.check_map(where, "offset_mask", om, om.shape[3], "D")
    n, h_out, w_out, _ = om.shape
    per_group = om[..., :used].reshape(n, h_out, w_out, geo.group, 3 * geo.points)
    offset = per_group[..., : 2 * geo.points].reshape(n, h_out, w_out, -1)
    mask = per_group[..., 2 * geo.points :].reshape(n, h_out, w_out, -1)
    out = _run(x, offset, mask, geo)
    return out if out_dtype is None else out.to(out_dtype)
