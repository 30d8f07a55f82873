"""Argument checks shared by every op and backend.

They read only metadata (shapes, dtypes, devices): no ``.item()``, no device
sync, so they cost nothing and torch.compile traces through them. Each message
names the function, the argument, the rule, the expected and the actual value.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from deformconv._utils import pair
from deformconv.ops._errors import ArgumentError, ArgumentTypeError

__all__ = [
    "ConvGeometry",
    "check_deform_conv2d",
    "check_floating",
    "check_like",
    "check_ndim",
    "check_tensor",
]


@dataclass(frozen=True)
class ConvGeometry:
    """Everything a kernel needs to know about a validated deform_conv2d call."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    offset_groups: int
    out_size: tuple[int, int]


def check_tensor(
    where: str, name: str, value: object, ndim: int, like: Tensor | None = None
) -> Tensor:
    """Check that ``value`` is a floating tensor of ``ndim`` dims, matching ``like``.

    Args:
        where: the public function, for messages.
        name: the argument's name, for messages.
        value: what the caller passed.
        ndim: the required number of dimensions.
        like: a tensor whose device and dtype ``value`` must share.

    Returns:
        ``value``, typed as a Tensor.

    Raises:
        TypeError: not a tensor.
        ArgumentTypeError: not floating point (a ``TypeError`` and a ``RuntimeError``).
        ArgumentError: wrong number of dimensions, device or dtype (a ``ValueError`` and
            a ``RuntimeError``).
    """
    t = check_floating(where, name, value)
    check_ndim(where, name, t, ndim)
    if like is not None:
        check_like(where, name, t, like)
    return t


def check_floating(where: str, name: str, value: object) -> Tensor:
    """Check that ``value`` is a floating-point tensor; see :func:`check_tensor`."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor; got {type(value).__name__}")
    if not value.is_floating_point():
        raise ArgumentTypeError(
            f"{where}: {name} must be a floating-point tensor "
            f"(float16, bfloat16, float32 or float64); got dtype={value.dtype}"
        )
    return value


def check_ndim(where: str, name: str, t: Tensor, ndim: int) -> None:
    """Check that ``t`` has ``ndim`` dimensions; see :func:`check_tensor`."""
    if t.dim() != ndim:
        raise ArgumentError(
            f"{where}: {name} must be {ndim}-D; got {t.dim()}-D with shape {tuple(t.shape)}"
        )


def check_like(where: str, name: str, t: Tensor, like: Tensor) -> None:
    """Check that ``t`` shares ``like``'s device and dtype; see :func:`check_tensor`."""
    if t.device != like.device:
        raise ArgumentError(
            f"{where}: {name} must be on the input's device {like.device}; got {t.device}"
        )
    if t.dtype != like.dtype:
        raise ArgumentError(
            f"{where}: {name} must have the input's dtype {like.dtype}; got {t.dtype}"
        )


def _positive(where: str, name: str, value: tuple[int, int], minimum: int) -> None:
    if min(value) < minimum:
        rule = "positive" if minimum == 1 else "non-negative"
        raise ArgumentError(f"{where}: {name} must be {rule}; got {value}")


def check_deform_conv2d(
    input: object,
    offset: object,
    weight: object,
    bias: object,
    stride: object,
    padding: object,
    dilation: object,
    mask: object,
    where: str = "deform_conv2d",
) -> ConvGeometry:
    """Validate a deform_conv2d call; see :func:`deformconv.deform_conv2d` for the rules.

    The checks run in torchvision's order where it matters: types, then numbers of
    dimensions, then sizes, and devices and dtypes last (a wrongly sized offset is
    reported as such even when its dtype is wrong too).

    Returns:
        The normalised geometry of the call.

    Raises:
        TypeError: an argument has the wrong type; ``ArgumentTypeError`` (also a
            ``RuntimeError``) for a non-floating dtype.
        ArgumentError: a shape, value, device or dtype breaks the op's rules (a
            ``ValueError`` and a ``RuntimeError``).
    """
    x = check_floating(where, "input", input)
    off = check_floating(where, "offset", offset)
    m = None if mask is None else check_floating(where, "mask", mask)
    w = check_floating(where, "weight", weight)
    b = None if bias is None else check_floating(where, "bias", bias)
    check_ndim(where, "input", x, 4)
    check_ndim(where, "offset", off, 4)
    if m is not None:
        check_ndim(where, "mask", m, 4)
    check_ndim(where, "weight", w, 4)
    if b is not None:
        check_ndim(where, "bias", b, 1)
    stride_, padding_, dilation_ = (
        pair(stride, "stride", where),
        pair(padding, "padding", where),
        pair(dilation, "dilation", where),
    )
    _positive(where, "stride", stride_, 1)
    _positive(where, "dilation", dilation_, 1)
    _positive(where, "padding", padding_, 0)

    n, c_in, h_in, w_in = x.shape
    c_out, c_per_group, k_h, k_w = w.shape
    if k_h < 1 or k_w < 1:
        raise ArgumentError(
            f"{where}: weight's kernel size (K_h, K_w) must be positive; got {(k_h, k_w)}"
        )
    if c_per_group < 1 or c_in % c_per_group != 0:
        raise ArgumentError(
            f"{where}: weight.shape[1] (C_in/groups) must divide C_in={c_in}; got {c_per_group}"
        )
    groups = c_in // c_per_group
    if c_out % groups != 0:
        raise ArgumentError(
            f"{where}: groups=C_in/weight.shape[1]={groups} must divide C_out=weight.shape[0]; "
            f"got C_out={c_out}"
        )

    k = k_h * k_w
    c_off = off.shape[1]
    n_off = c_off // (2 * k)
    if c_off % (2 * k) != 0 or n_off < 1 or c_in % n_off != 0:
        raise ArgumentError(
            f"{where}: the shape of the offset tensor at dimension 1 is not valid: offset must "
            f"have 2*G*K_h*K_w channels for some G dividing C_in={c_in} (K_h*K_w={k}); "
            f"got {c_off}"
        )
    if m is not None and m.shape[1] != n_off * k:
        raise ArgumentError(
            f"{where}: mask.shape[1] is not valid: mask must have G*K_h*K_w={n_off}*{k}="
            f"{n_off * k} channels (G={n_off} from offset); got {m.shape[1]}"
        )

    h_out = (h_in + 2 * padding_[0] - dilation_[0] * (k_h - 1) - 1) // stride_[0] + 1
    w_out = (w_in + 2 * padding_[1] - dilation_[1] * (k_w - 1) - 1) // stride_[1] + 1
    if h_out < 1 or w_out < 1:
        raise ArgumentError(
            f"{where}: the output would be empty: H_out, W_out = "
            "(H_in + 2*padding - dilation*(K-1) - 1) // stride + 1 = "
            f"{(h_out, w_out)} for input size {(h_in, w_in)}, kernel {(k_h, k_w)}, "
            f"stride {stride_}, padding {padding_}, dilation {dilation_}"
        )
    _check_map(where, "offset", off, (n, c_off, h_out, w_out))
    if m is not None:
        _check_map(where, "mask", m, (n, n_off * k, h_out, w_out))
    if b is not None and b.shape[0] != c_out:
        raise ArgumentError(
            f"{where}: bias must have shape (C_out,)=({c_out},); got {tuple(b.shape)}"
        )
    for name, t in (("offset", off), ("mask", m), ("weight", w), ("bias", b)):
        if t is not None:
            check_like(where, name, t, x)
    return ConvGeometry(stride_, padding_, dilation_, groups, n_off, (h_out, w_out))


def _check_map(where: str, name: str, t: Tensor, expected: tuple[int, int, int, int]) -> None:
    if t.shape[0] != expected[0]:
        raise ArgumentError(
            f"{where}: {name} must have the input's batch size N={expected[0]}; got {t.shape[0]}"
        )
    if tuple(t.shape[2:]) != expected[2:]:
        raise ArgumentError(
            f"{where}: {name} must have the output's spatial size (H_out, W_out)={expected[2:]}; "
            f"got {tuple(t.shape[2:])}"
        )
