"""Hostile-input fuzzing of the public ops; run by test_fuzz.py in a fresh process.

``python tests/_fuzz_worker.py OP BACKEND EXAMPLES`` draws EXAMPLES cases with
hypothesis (derandomised: the same cases every run) over shapes (including empty ones
and mismatched ones), hyper-parameters (including invalid ones), dtypes (including
integer ones), memory formats and hostile values (NaN, inf, huge offsets and boxes).
Each case must either compute a result of the right shape that is finite wherever the
inputs were, with finite gradients, or raise the documented ValueError/TypeError. Any
other exception fails; a crash (segfault, abort) ends the process with a signal, which the
parent test reports.
"""

from __future__ import annotations

import sys

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deformconv

torch.set_num_threads(1)
COUNTS = {"computed": 0, "rejected": 0}

DTYPES = [torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]
HOSTILE = [
    0.0,
    0.5,
    -1.0,
    1e3,
    -1e3,
    1e30,
    -1e30,
    2.0**31,
    float("nan"),
    float("inf"),
    -float("inf"),
]


def _tensor(draw, shape, dtype, hostile: bool, channels_last: bool = False) -> torch.Tensor:
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        return torch.randint(-3, 4, shape, generator=g)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if hostile and t.numel():
        values = torch.tensor(HOSTILE, dtype=torch.float64)
        pick = torch.randint(0, len(HOSTILE), shape, generator=g)
        where = torch.rand(shape, generator=g) < 0.3
        t = torch.where(where, values[pick], t)
    t = t.to(dtype)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    elif draw(st.booleans()) and t.dim() >= 2 and t.shape[-1] > 1:
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous strides
    return t


def _maybe(draw, good, bad):
    """Mostly a valid value; one case in five draws from the invalid ones."""
    return (
        draw(st.sampled_from(bad)) if draw(st.integers(0, 4)) == 0 else draw(st.sampled_from(good))
    )


@st.composite
def conv_case(draw):
    n = draw(st.integers(0, 3))
    og = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    c_in = og * groups * draw(st.integers(1, 2))
    c_in = _maybe(draw, [c_in], [1, 3, 5])
    c_out = groups * draw(st.integers(1, 3))
    c_out = _maybe(draw, [c_out], [c_out + 1])
    k_h, k_w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(0, 7)), draw(st.integers(1, 7))
    stride = _maybe(draw, [1, 2, (2, 1)], [0, -1, (1, 2, 3), 1.5])
    padding = _maybe(draw, [0, 1, (1, 0), (2, 2)], [-1, (1,)])
    dilation = _maybe(draw, [1, 2, (1, 2)], [0, "1"])
    dtype = _maybe(draw, DTYPES[:-1], [torch.int64])

    def pair(v):
        return (v, v) if isinstance(v, int) else v

    try:
        sh, sw = pair(stride)
        ph, pw = pair(padding)
        dh, dw = pair(dilation)
        h_out = (h + 2 * ph - dh * (k_h - 1) - 1) // sh + 1
        w_out = (w + 2 * pw - dw * (k_w - 1) - 1) // sw + 1
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        h_out, w_out = 2, 2
    h_out, w_out = max(h_out, 0), max(w_out, 0)
    off_ch = _maybe(draw, [2 * og * k_h * k_w], [2 * og * k_h * k_w + 1, og * k_h * k_w])
    cl = draw(st.booleans())
    x = _tensor(draw, (n, c_in, h, w), dtype, hostile=False, channels_last=cl)
    offset = _tensor(draw, (n, off_ch, h_out, w_out), dtype, hostile=True, channels_last=cl)
    weight = _tensor(draw, (c_out, max(c_in // groups, 1), k_h, k_w), dtype, hostile=False)
    bias = _tensor(draw, (c_out,), dtype, hostile=False) if draw(st.booleans()) else None
    mask = None
    if draw(st.booleans()):
        mask = _tensor(draw, (n, og * k_h * k_w, h_out, w_out), dtype, hostile=True)
    return x, offset, weight, bias, stride, padding, dilation, mask


@st.composite
def roi_case(draw, ps: bool):
    n = draw(st.integers(1, 2))
    out_h, out_w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    c = out_h * out_w * draw(st.integers(1, 2)) if ps else draw(st.integers(1, 3))
    if draw(st.integers(0, 9)) == 0:
        c += 1
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    k = draw(st.integers(0, 4))
    dtype = _maybe(draw, DTYPES[:-1], [torch.int64])
    x = _tensor(draw, (n, c, h, w), dtype, hostile=False, channels_last=draw(st.booleans()))
    boxes = _tensor(draw, (k, 4), torch.float64, hostile=True) * 8
    batch = torch.tensor(
        [_maybe(draw, [0, n - 1], [n, -1, 0.5]) for _ in range(k)], dtype=torch.float64
    )
    rois = torch.cat([batch[:, None], boxes], dim=1)
    if draw(st.integers(0, 19)) == 0:
        rois = rois[:, :4]
    rois = rois.to(x.dtype if x.is_floating_point() else torch.float32)
    offset = None
    if draw(st.booleans()):
        offset = _tensor(draw, (k, 2, out_h, out_w), dtype, hostile=True)
    mask = _tensor(draw, (k, 1, out_h, out_w), dtype, hostile=True) if draw(st.booleans()) else None
    output_size = _maybe(draw, [(out_h, out_w)], [0, (1, 2, 3)])
    scale = _maybe(draw, [1.0, 0.5, 0.25], [0.0, -1.0, float("nan")])
    sampling = draw(st.sampled_from([0, 1, 2, -1]))
    aligned = draw(st.booleans())
    return x, rois, offset, output_size, scale, sampling, aligned, mask


def _check_grads(out: torch.Tensor, leaves: list[torch.Tensor | None], finite: bool) -> None:
    """Gradients exist with the right shapes; finite when ``finite`` (inputs were)."""
    used = [t for t in leaves if t is not None and t.requires_grad]
    if not used or not out.requires_grad or out.numel() == 0:
        return
    grads = torch.autograd.grad(out.float().sum(), used, allow_unused=True)
    for t, g in zip(used, grads, strict=True):
        assert g is None or g.shape == t.shape
        if g is not None and finite:
            assert torch.isfinite(g).all(), "non-finite gradient from finite inputs"


def fuzz_conv(backend: str, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(conv_case())
    def run(case):
        x, offset, weight, bias, stride, padding, dilation, mask = case
        grad = x.is_floating_point() and x.dtype in (torch.float32, torch.float64)
        leaves = [
            None if t is None else t.detach().requires_grad_(grad)
            for t in (x, offset, weight, bias, mask)
        ]
        xi, oi, wi, bi, mi = leaves
        # Offsets may hold NaN, inf or huge values (they read 0); the other tensors are
        # finite unless the mask holds hostile values.
        finite = all(t is None or bool(torch.isfinite(t).all()) for t in (x, weight, bias, mask))
        try:
            with deformconv.use_backend(backend):
                out = deformconv.deform_conv2d(xi, oi, wi, bi, stride, padding, dilation, mask=mi)
                _check_grads(out, [xi, wi, bi], finite)
        except (ValueError, TypeError):
            COUNTS["rejected"] += 1
            return
        COUNTS["computed"] += 1
        assert out.shape[:2] == (x.shape[0], weight.shape[0])
        assert out.dtype == x.dtype
        if finite:
            assert torch.isfinite(out).all(), "non-finite output from finite inputs"

    run()


def fuzz_roi(ps: bool, examples: int) -> None:
    fn = deformconv.deform_ps_roi_pool if ps else deformconv.deform_roi_pool

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(roi_case(ps))
    def run(case):
        x, rois, offset, output_size, scale, sampling, aligned, mask = case
        grad = x.dtype in (torch.float32, torch.float64)
        xi = x.detach().requires_grad_(grad)
        finite = mask is None or bool(torch.isfinite(mask).all())
        try:
            out = fn(xi, rois, offset, output_size, scale, sampling, 0.1, aligned, mask)
            _check_grads(out, [xi], finite)
        except (ValueError, TypeError):
            COUNTS["rejected"] += 1
            return
        COUNTS["computed"] += 1
        assert out.shape[0] == rois.shape[0]
        if finite:
            assert torch.isfinite(out).all(), "non-finite output from finite inputs"

    run()


def main(op: str, backend: str, examples: int) -> None:
    if op == "deform_conv2d":
        fuzz_conv(backend, examples)
    else:
        fuzz_roi(op == "deform_ps_roi_pool", examples)
    print("OK", COUNTS["computed"], COUNTS["rejected"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
