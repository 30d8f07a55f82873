"""deformconv.dcnv3 / dcnv4 against independent oracles, on every CPU backend.

Oracles: the naive float64 loops of ``_dcnv_oracle.py`` (written from the equation),
InternImage's grid_sample construction, ``deformconv.deform_conv2d`` for the depthwise
special case, gradcheck. ``backend`` is parametrized by conftest.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import deformconv
from _dcnv_oracle import grid_sample_dcnv3, naive_dcnv3, naive_dcnv4
from deformconv.ops.dcnv import dcnv3_backward_op, dcnv3_op


@dataclass(frozen=True)
class Case:
    batch: int = 2
    size: tuple[int, int] = (6, 5)
    group: int = 2
    group_channels: int = 3
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    offset_scale: float = 1.0
    remove_center: bool = False

    @property
    def points(self) -> int:
        return self.kernel[0] * self.kernel[1] - int(self.remove_center)

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(
                self.size, self.padding, self.dilation, self.kernel, self.stride, strict=True
            )
        )

    def kwargs(self) -> dict:
        return {
            "kernel_size": self.kernel, "stride": self.stride, "padding": self.padding,
            "dilation": self.dilation, "group": self.group, "offset_scale": self.offset_scale,
            "remove_center": self.remove_center,
        }  # fmt: skip

    def tensors(self, dtype=torch.float64, spread: float = 2.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        c = self.group * self.group_channels
        h_out, w_out = self.out_size
        x = torch.randn(self.batch, *self.size, c, generator=g, dtype=torch.float64)
        gp = self.group * self.points
        offset = spread * torch.randn(self.batch, h_out, w_out, 2 * gp, generator=g,
                                      dtype=torch.float64)  # fmt: skip
        mask = torch.rand(self.batch, h_out, w_out, gp, generator=g, dtype=torch.float64)
        return x.to(dtype), offset.to(dtype), mask.to(dtype)


CASES = {
    "basic": Case(),
    "group_1": Case(group=1, group_channels=4),
    "stride_2_1": Case(stride=(2, 1), size=(7, 6)),
    "padding_0_2": Case(padding=(0, 2)),
    "dilation_2_1": Case(dilation=(2, 1), padding=(2, 1), size=(7, 6)),
    "kernel_5x3": Case(kernel=(5, 3), padding=(2, 1), group=3, group_channels=2),
    "kernel_2x4": Case(kernel=(2, 4), padding=(1, 1)),
    "offset_scale_0.5": Case(offset_scale=0.5),
    "offset_scale_2": Case(offset_scale=2.0, dilation=(2, 2), padding=(2, 2)),
    "remove_center": Case(remove_center=True),
    "remove_center_5x3": Case(remove_center=True, kernel=(5, 3), padding=(2, 1)),
    "odd_batch_1": Case(batch=1, size=(4, 9), group=4, group_channels=1),
    "many_channels": Case(batch=1, size=(4, 4), group=1, group_channels=40),
    # Blocks of 10 channels starting at 0, 10, 20, 30: vectors of 8 at unaligned
    # columns, then a remainder of 2.
    "group_channels_20": Case(group=2, group_channels=20),
}
# Tolerance per dtype: a few roundings of the compute dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _tiny(case: Case) -> Case:
    """The same geometry on one small image (gradcheck perturbs every input element)."""
    return dataclasses.replace(case, batch=1, size=(4, 3), group_channels=1)


def _call(backend, fn, *args, **kwargs):
    with deformconv.use_backend(backend):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("name", list(CASES))
def test_dcnv3_matches_naive_loops(backend, name):
    case = CASES[name]
    x, offset, mask = case.tensors()
    out = _call(backend, deformconv.dcnv3, x, offset, mask, **case.kwargs())
    expected = naive_dcnv3(x, offset, mask, **case.kwargs())
    torch.testing.assert_close(out, expected, rtol=TOL[torch.float64], atol=TOL[torch.float64])


@pytest.mark.parametrize("name", ["basic", "stride_2_1", "dilation_2_1", "offset_scale_2"])
def test_dcnv3_float32_matches_naive_loops(backend, name):
    case = CASES[name]
    x, offset, mask = case.tensors(torch.float32)
    out = _call(backend, deformconv.dcnv3, x, offset, mask, **case.kwargs())
    assert out.dtype == torch.float32
    expected = naive_dcnv3(x, offset, mask, **case.kwargs())
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["basic", "stride_2_1", "kernel_5x3", "offset_scale_0.5"])
def test_dcnv3_matches_internimage_grid_sample_construction(backend, name):
    case = CASES[name]
    x, offset, mask = case.tensors()
    out = _call(backend, deformconv.dcnv3, x, offset, mask, **case.kwargs())
    kwargs = case.kwargs()
    del kwargs["remove_center"]
    expected = grid_sample_dcnv3(x, offset, mask, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def _to_deform_conv2d(case: Case, offset: torch.Tensor, mask: torch.Tensor):
    """DCNv3's (x, y) x-major offsets as torchvision's (y, x) row-major ones, same positions."""
    k_h, k_w = case.kernel
    (d_h, d_w), s = case.dilation, case.offset_scale
    c_h, c_w = d_h * (k_h - 1) // 2, d_w * (k_w - 1) // 2
    n, h_out, w_out, _ = offset.shape
    off_tv = offset.new_zeros(n, case.group, k_h * k_w, 2, h_out, w_out)
    mask_tv = mask.new_zeros(n, case.group, k_h * k_w, h_out, w_out)
    p = 0
    for i_x in range(k_w):
        for i_y in range(k_h):
            if case.remove_center and i_x == k_w // 2 and i_y == k_h // 2:
                continue  # mask 0: the point contributes nothing
            k = i_y * k_w + i_x
            for g in range(case.group):
                j = g * case.points + p
                # DCNv3: w·s - pad + c + (i·d - c + Δ)·scale; torchvision: w·s - pad + i·d + Δ'.
                dx = (i_x * d_w - c_w) * (s - 1) + offset[..., 2 * j] * s
                dy = (i_y * d_h - c_h) * (s - 1) + offset[..., 2 * j + 1] * s
                off_tv[:, g, k, 0] = dy
                off_tv[:, g, k, 1] = dx
                mask_tv[:, g, k] = mask[..., j]
            p += 1
    return off_tv.reshape(n, -1, h_out, w_out), mask_tv.reshape(n, -1, h_out, w_out)


@pytest.mark.parametrize("name", ["basic", "stride_2_1", "kernel_5x3", "offset_scale_2",
                                  "remove_center", "dilation_2_1"])  # fmt: skip
def test_dcnv3_equals_depthwise_deform_conv2d_with_unit_weights(backend, name):
    case = CASES[name]
    x, offset, mask = case.tensors()
    out = _call(backend, deformconv.dcnv3, x, offset, mask, **case.kwargs())
    off_tv, mask_tv = _to_deform_conv2d(case, offset, mask)
    c = x.shape[-1]
    weight = torch.ones(c, 1, *case.kernel, dtype=x.dtype)  # depthwise, weights of ones
    with deformconv.use_backend("reference"):
        expected = deformconv.deform_conv2d(
            x.permute(0, 3, 1, 2), off_tv, weight, None, case.stride, case.padding,
            case.dilation, mask_tv,
        )  # fmt: skip
    torch.testing.assert_close(out, expected.permute(0, 2, 3, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["basic", "stride_2_1", "kernel_2x4", "remove_center",
                                  "offset_scale_2", "odd_batch_1"])  # fmt: skip
def test_dcnv3_gradcheck(backend, name):
    case = _tiny(CASES[name])
    tensors = [t.requires_grad_() for t in case.tensors(spread=1.5)]

    def fn(x, offset, mask):
        return _call(backend, deformconv.dcnv3, x, offset, mask, **case.kwargs())

    # fast_mode: checks random projections of the Jacobian (one backward per check).
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6, fast_mode=True)


def test_dcnv3_full_jacobian(backend):
    case = Case(batch=1, size=(3, 3), group=2, group_channels=1, remove_center=True)
    tensors = [t.requires_grad_() for t in case.tensors(spread=1.5)]

    def fn(x, offset, mask):
        return _call(backend, deformconv.dcnv3, x, offset, mask, **case.kwargs())

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6)


def test_dcnv3_gradgradcheck_reference():
    case = Case(batch=1, size=(3, 4), group=2, group_channels=1, kernel=(2, 2), stride=(1, 2))
    tensors = [t.requires_grad_() for t in case.tensors(spread=1.5)]

    def fn(x, offset, mask):
        return _call("reference", deformconv.dcnv3, x, offset, mask, **case.kwargs())

    assert torch.autograd.gradgradcheck(fn, tensors, eps=1e-6, atol=1e-6, fast_mode=True)


def _offset_mask(case: Case, offset, mask, pad: int, fill: float = 0.0):
    n, h_out, w_out, _ = offset.shape
    p = case.points
    om = torch.cat(
        [offset.reshape(n, h_out, w_out, case.group, 2 * p),
         mask.reshape(n, h_out, w_out, case.group, p)], dim=-1,
    ).reshape(n, h_out, w_out, -1)  # fmt: skip
    padding = torch.full((n, h_out, w_out, pad), fill, dtype=om.dtype)
    return torch.cat([om, padding], dim=-1)


@pytest.mark.parametrize("name", ["basic", "remove_center", "kernel_5x3", "stride_2_1"])
def test_dcnv4_equals_dcnv3_core_with_the_same_offsets_and_mask(backend, name):
    case = CASES[name]
    x, offset, mask = case.tensors()
    om = _offset_mask(case, offset, mask, pad=(-3 * case.group * case.points) % 8)
    out4 = _call(backend, deformconv.dcnv4, x, om, **case.kwargs())
    out3 = _call(backend, deformconv.dcnv3, x, offset, mask, **case.kwargs())
    torch.testing.assert_close(out4, out3, rtol=0, atol=0)
    torch.testing.assert_close(out4, naive_dcnv4(x, om, **case.kwargs()), rtol=1e-10, atol=1e-10)


def test_dcnv4_padding_channels_are_ignored(backend):
    case = CASES["basic"]
    x, offset, mask = case.tensors()
    outs, grads = [], []
    for fill in (0.0, float("nan"), 1e30):
        om = _offset_mask(case, offset, mask, pad=6, fill=fill).requires_grad_()
        out = _call(backend, deformconv.dcnv4, x, om, **case.kwargs())
        out.sum().backward()
        outs.append(out)
        grads.append(om.grad)
    used = 3 * case.group * case.points
    for out, grad in zip(outs, grads, strict=True):
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
        assert (grad[..., used:] == 0).all()
        torch.testing.assert_close(grad[..., :used], grads[0][..., :used], rtol=0, atol=0)


def test_dcnv4_gradcheck(backend):
    case = _tiny(CASES["remove_center"])
    x, offset, mask = case.tensors(spread=1.5)
    om = _offset_mask(case, offset, mask, pad=3)

    def fn(x, om):
        return _call(backend, deformconv.dcnv4, x, om, **case.kwargs())

    tensors = [x.requires_grad_(), om.requires_grad_()]
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("kind", ["nonfinite", "huge"])
def test_nonfinite_and_huge_offsets_read_zero_with_zero_gradient(backend, kind):
    case = CASES["basic"]
    x, offset, mask = case.tensors()
    bad = torch.rand(offset.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    values = [float("nan"), float("inf"), -float("inf")] if kind == "nonfinite" else [1e30, -1e9,
                                                                                     2.0**40]  # fmt: skip
    fill = torch.tensor(values, dtype=offset.dtype)[torch.arange(offset.numel()) % 3]
    offset = torch.where(bad, fill.reshape(offset.shape), offset)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    out = _call(backend, deformconv.dcnv3, *leaves, **case.kwargs())
    out.backward(torch.ones_like(out))
    expected = naive_dcnv3(x, offset, mask, **case.kwargs())
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    pair_bad = bad.reshape(*bad.shape[:3], -1, 2).any(-1)  # a bad Δx or Δy: off the map
    grad_offset = leaves[1].grad.reshape(*bad.shape[:3], -1, 2)
    assert (grad_offset[pair_bad] == 0).all() and (leaves[2].grad[pair_bad] == 0).all()
    assert (grad_offset[~pair_bad] != 0).any()


def test_positions_on_integers_and_borders(backend):
    """Offsets that land exactly on pixels, on -1 and on H: values and gradients."""
    case = Case(batch=1, size=(4, 5), group=1, group_channels=2)
    x, offset, mask = case.tensors()
    choices = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 3.5, 4.0, -1.5])
    offset = choices[torch.randint(0, 8, offset.shape, generator=torch.Generator().manual_seed(3))]
    offset = offset.double()
    out = _call(backend, deformconv.dcnv3, x, offset, mask, **case.kwargs())
    torch.testing.assert_close(out, naive_dcnv3(x, offset, mask, **case.kwargs()))
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    _call(backend, deformconv.dcnv3, *leaves, **case.kwargs()).sum().backward()
    ref = [t.clone().requires_grad_() for t in (x, offset, mask)]
    _call("reference", deformconv.dcnv3, *ref, **case.kwargs()).sum().backward()
    for got, want in zip(leaves, ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-10)


def test_empty_batch(backend):
    case = Case(batch=0)
    tensors = [t.requires_grad_() for t in case.tensors()]
    out = _call(backend, deformconv.dcnv3, *tensors, **case.kwargs())
    assert out.shape == (0, *case.out_size, 6)
    out.sum().backward()
    assert all(t.grad.shape == t.shape for t in tensors)


def test_empty_input_map(backend):
    """A 0×0 input whose padding alone gives the output: every sample reads 0.

    The samples lie in [-1, 0), so they pass the range check, yet have no pixel to read
    (their corner row and column are -1): the output and every gradient are zero. The
    input is an empty view into NaNs: a kernel that read before it would return NaN.
    """
    x = torch.full((1, 4, 4, 16), float("nan"))[:, 2:2, 2:2].requires_grad_()
    offset = torch.full((1, 2, 2, 2 * 9 * 2), -0.5, requires_grad=True)
    mask = torch.full((1, 2, 2, 2 * 9), 0.5, requires_grad=True)
    kwargs = {"kernel_size": 3, "stride": 1, "padding": 2, "dilation": 1, "group": 2,
              "offset_scale": 1.0}  # fmt: skip
    out = _call(backend, deformconv.dcnv3, x, offset, mask, **kwargs)
    assert torch.equal(out, torch.zeros(1, 2, 2, 16))
    out.backward(torch.randn(out.shape))
    assert x.grad.shape == x.shape
    assert torch.equal(offset.grad, torch.zeros_like(offset))
    assert torch.equal(mask.grad, torch.zeros_like(mask))


def test_non_contiguous_inputs(backend):
    case = CASES["basic"]
    x, offset, mask = case.tensors()
    # Channels-first storage viewed as channels-last, and strided offsets.
    x_nc = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    off_nc = torch.cat([offset, offset], dim=-1)[..., ::2]
    off_nc[...] = offset
    out = _call(backend, deformconv.dcnv3, x_nc, off_nc, mask, **case.kwargs())
    torch.testing.assert_close(out, naive_dcnv3(x, offset, mask, **case.kwargs()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(backend, dtype):
    case = CASES["basic"]
    x, offset, mask = case.tensors(dtype)
    tensors = [t.requires_grad_() for t in (x, offset, mask)]
    out = _call(backend, deformconv.dcnv3, *tensors, **case.kwargs())
    assert out.dtype == dtype
    exact = naive_dcnv3(*(t.double() for t in (x, offset, mask)), **case.kwargs())
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=ulp * exact.abs().max().item())
    out.float().sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in tensors)


def test_autocast_returns_autocast_dtype(backend):
    case = CASES["basic"]
    x, offset, mask = case.tensors(torch.float32)
    with deformconv.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        out = deformconv.dcnv3(x, offset.bfloat16(), mask, **case.kwargs())
    assert out.dtype == torch.bfloat16
    exact = naive_dcnv3(x, offset.bfloat16(), mask, **case.kwargs())
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2**-8 * exact.abs().max().item())


def test_backward_is_deterministic(backend):
    case = Case(batch=2, size=(8, 8), group=2, group_channels=8)
    x, offset, mask = case.tensors(torch.float32, spread=3.0)
    runs, saved = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
            out = _call(backend, deformconv.dcnv3, *leaves, **case.kwargs())
            out.backward(torch.ones_like(out))
            runs.append([out, *(t.grad for t in leaves)])
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# The custom op: opcheck, compile, export


def _op_args(backend: str, requires_grad: bool):
    case = CASES["remove_center"]
    x, offset, mask = (t.float().requires_grad_(requires_grad) for t in case.tensors(spread=1.0))
    k = case.kwargs()
    return (x, offset, mask, list(k["kernel_size"]), list(k["stride"]), list(k["padding"]),
            list(k["dilation"]), k["group"], k["offset_scale"], k["remove_center"], backend)  # fmt: skip


def test_opcheck(backend):
    torch.library.opcheck(dcnv3_op.default, _op_args(backend, True))
    args = _op_args(backend, False)
    grad_output = torch.randn(2, *CASES["remove_center"].out_size, 6)
    torch.library.opcheck(dcnv3_backward_op.default, (grad_output, *args))


def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    layer = deformconv.nn.DCNv3(channels=8, group=2)
    torch.nn.init.normal_(layer.offset.weight, std=0.5)
    x = torch.randn(2, 5, 6, 8)
    with deformconv.use_backend(backend):
        x_e = x.clone().requires_grad_()
        eager = layer(x_e)
        eager.square().sum().backward()
        grads_e = [x_e.grad, *(p.grad.clone() for p in layer.parameters())]
        layer.zero_grad()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        x_c = x.clone().requires_grad_()
        out = compiled(x_c)
        out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip([x_c.grad, *(p.grad for p in layer.parameters())], grads_e, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_export_holds_one_dcnv3_node(backend):
    layer = deformconv.nn.DCNv4(channels=16, group=2, dw_kernel_size=3)
    torch.nn.init.normal_(layer.offset_mask.weight, std=0.5)
    x = torch.randn(2, 5, 5, 16)
    with deformconv.use_backend(backend):
        exported = torch.export.export(layer, (x,))
        expected = layer(x)
    nodes = [n for n in exported.graph.nodes if n.target is torch.ops.deformconv.dcnv3.default]
    assert len(nodes) == 1
    torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Validation


def _valid():
    case = CASES["basic"]
    x, offset, mask = case.tensors(torch.float32)
    return x, offset, mask


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"input": [1.0]}, TypeError, "dcnv3: input must be a torch.Tensor; got list"),
        ({"input": torch.zeros(2, 6, 5, 6, dtype=torch.int64)}, TypeError, "floating-point"),
        ({"input": torch.zeros(6, 5, 6)}, ValueError, r"input must be 4-D .* got 3-D"),
        ({"group": 4}, ValueError, r"positive multiple of group=4; got C=6"),
        ({"group": 0}, ValueError, r"positive multiple of group=0"),
        ({"group": 2.0}, TypeError, "group must be an int"),
        ({"kernel_size": (3, 3, 3)}, TypeError, "kernel_size must be an int or a tuple"),
        ({"stride": 0}, ValueError, r"stride must be positive; got \(0, 0\)"),
        ({"padding": -1}, ValueError, "padding must be non-negative"),
        ({"offset_scale": float("nan")}, ValueError, "offset_scale must be finite"),
        ({"offset_scale": "1"}, TypeError, "offset_scale must be a float"),
        ({"remove_center": 2}, TypeError, "remove_center must be a bool"),
        ({"remove_center": True, "kernel_size": (3, 2)}, ValueError, "odd kernel_size"),
        (
            {"offset": torch.zeros(2, 6, 5, 35)},
            ValueError,
            r"offset must have G\*P\*2=2\*9\*2=36 channels; got 35",
        ),
        (
            {"offset": torch.zeros(2, 6, 4, 36)},
            ValueError,
            r"spatial size \(H_out, W_out\)=\(6, 5\)",
        ),
        ({"offset": torch.zeros(3, 6, 5, 36)}, ValueError, "batch size N=2; got 3"),
        (
            {"offset": torch.zeros(2, 6, 5, 36, dtype=torch.float64)},
            ValueError,
            "offset must have the input's dtype",
        ),
        (
            {"mask": torch.zeros(2, 6, 5, 19)},
            ValueError,
            r"mask must have G\*P=2\*9=18 channels; got 19",
        ),
        ({"padding": 0, "kernel_size": 7}, ValueError, "the output would be empty"),
    ],
)
def test_dcnv3_rejects_bad_arguments(change, error, match):
    x, offset, mask = _valid()
    args = {"input": x, "offset": offset, "mask": mask, **CASES["basic"].kwargs(), **change}
    with pytest.raises(error, match=match):
        deformconv.dcnv3(**args)


def test_bad_arguments_raise_argument_error_before_any_work():
    from deformconv.ops._errors import ArgumentError

    x, offset, mask = _valid()
    with pytest.raises(ArgumentError):
        deformconv.dcnv3(x, offset[..., :-1], mask, group=2)


@pytest.mark.parametrize(
    ("channels", "match"),
    [(53, r"offset_mask must have at least G\*3\*P=2\*3\*9=54 channels .* got 53"),
     (10, "at least")],
)  # fmt: skip
def test_dcnv4_rejects_short_offset_mask(channels, match):
    x, _, _ = _valid()
    with pytest.raises(ValueError, match=match):
        deformconv.dcnv4(x, torch.zeros(2, 6, 5, channels), group=2)
