"""Argument checks shared by every op and backend.

They read only metadata (shapes, dtypes, devices): no ``.item()``, no device
sync, so they cost nothing and torch.compile traces through them. Each message
names the function, the argument, the rule, the expected and the actual value.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from deformconv._utils import pair

__all__ = ["ConvGeometry", "check_deform_conv2d", "check_tensor"]


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
        TypeError: not a tensor, or not floating point.
        ValueError: wrong number of dimensions, device or dtype.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor; got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{where}: {name} must be a floating-point tensor "
            f"(float16, bfloat16, float32 or float64); got dtype={value.dtype}"
        )
    if value.dim() != ndim:
        raise ValueError(
            f"{where}: {name} must be {ndim}-D; got {value.dim()}-D with shape {tuple(value.shape)}"
        )
    if like is not None:
        if value.device != like.device:
            raise ValueError(
                f"{where}: {name} must be on the input's device {like.device}; got {value.device}"
            )
        if value.dtype != like.dtype:
            raise ValueError(
                f"{where}: {name} must have the input's dtype {like.dtype}; got {value.dtype}"
            )
    return value


def _positive(where: str, name: str, value: tuple[int, int], minimum: int) -> None:
    if min(value) < minimum:
        rule = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{where}: {name} must be {rule}; got {value}")


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

    Returns:
        The normalised geometry of the call.

    Raises:
        TypeError: an argument has the wrong type or a non-floating dtype.
        ValueError: a shape, value, device or dtype breaks the op's rules.
    """
    x = check_tensor(where, "input", input, 4)
    w = check_tensor(where, "weight", weight, 4, like=x)
    off = check_tensor(where, "offset", offset, 4, like=x)
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
        raise ValueError(
            f"{where}: weight's kernel size (K_h, K_w) must be positive; got {(k_h, k_w)}"
        )
    if c_per_group < 1 or c_in % c_per_group != 0:
        raise ValueError(
            f"{where}: weight.shape[1] (C_in/groups) must divide C_in={c_in}; got {c_per_group}"
        )
    groups = c_in // c_per_group
    if c_out % groups != 0:
        raise ValueError(
            f"{where}: groups=C_in/weight.shape[1]={groups} must divide C_out=weight.shape[0]; "
            f"got C_out={c_out}"
        )
    if bias is not None:
        b = check_tensor(where, "bias", bias, 1, like=x)
        if b.shape[0] != c_out:
            raise ValueError(
                f"{where}: bias must have shape (C_out,)=({c_out},); got {tuple(b.shape)}"
            )

    h_out = (h_in + 2 * padding_[0] - dilation_[0] * (k_h - 1) - 1) // stride_[0] + 1
    w_out = (w_in + 2 * padding_[1] - dilation_[1] * (k_w - 1) - 1) // stride_[1] + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"{where}: the output would be empty: H_out, W_out = "
            "(H_in + 2*padding - dilation*(K-1) - 1) // stride + 1 = "
            f"{(h_out, w_out)} for input size {(h_in, w_in)}, kernel {(k_h, k_w)}, "
            f"stride {stride_}, padding {padding_}, dilation {dilation_}"
        )

    k = k_h * k_w
    c_off = off.shape[1]
    n_off = c_off // (2 * k)
    if c_off % (2 * k) != 0 or n_off < 1 or c_in % n_off != 0:
        raise ValueError(
            f"{where}: offset must have 2*G*K_h*K_w channels for some G dividing C_in={c_in} "
            f"(K_h*K_w={k}); got {c_off}"
        )
    _check_map(where, "offset", off, (n, c_off, h_out, w_out))
    if mask is not None:
        m = check_tensor(where, "mask", mask, 4, like=x)
        if m.shape[1] != n_off * k:
            raise ValueError(
                f"{where}: mask must have G*K_h*K_w={n_off}*{k}={n_off * k} channels "
                f"(G={n_off} from offset); got {m.shape[1]}"
            )
        _check_map(where, "mask", m, (n, n_off * k, h_out, w_out))
    return ConvGeometry(stride_, padding_, dilation_, groups, n_off, (h_out, w_out))


def _check_map(where: str, name: str, t: Tensor, expected: tuple[int, int, int, int]) -> None:
    if t.shape[0] != expected[0]:
        raise ValueError(
            f"{where}: {name} must have the input's batch size N={expected[0]}; got {t.shape[0]}"
        )
    if tuple(t.shape[2:]) != expected[2:]:
        raise ValueError(
            f"{where}: {name} must have the output's spatial size (H_out, W_out)={expected[2:]}; "
            f"got {tuple(t.shape[2:])}"
        )
