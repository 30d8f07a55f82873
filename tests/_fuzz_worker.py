"""Hostile-input fuzzing of the public ops; run by test_fuzz.py in a fresh process.

``python tests/_fuzz_worker.py OP BACKEND EXAMPLES`` draws EXAMPLES cases with
hypothesis (derandomised: the same cases every run). Most cases are valid calls built
consistently (offset channels 2·G·K_h·K_w, the output size from the convolution formula,
RoI batch indices in [0, N)), with hostile values and layouts: NaN, infinite and huge
offsets, masks and boxes, empty batches, empty input maps, every floating dtype,
channels_last and non-contiguous tensors. The others are valid cases with exactly one
defect (a wrong shape, hyper-parameter, dtype or type).

A valid case must compute a result of the right shape that is finite wherever the inputs
were, with finite gradients; a case with a defect must raise the documented
ValueError/TypeError. Anything else fails; a crash (segfault, abort) ends the process with
a signal, which the parent test reports. The last line printed is a JSON summary
(valid/invalid counts, the defects and the features drawn) that the parent checks, so the
balance of the battery is tested rather than hoped for.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deformconv

COUNTS: Counter[str] = Counter()

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HOSTILE = [1e3, -1e3, 1e30, -1e30, 2.0**31, float("nan"), float("inf"), -float("inf")]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _tensor(
    seed: int, shape: tuple[int, ...], dtype: torch.dtype, hostile: float = 0.0, layout: str = ""
) -> torch.Tensor:
    """Random values, a fraction ``hostile`` of them from HOSTILE, in ``layout``."""
    g = torch.Generator().manual_seed(seed)
    if not dtype.is_floating_point:
        return torch.randint(-3, 4, shape, generator=g, dtype=dtype)
    t = 2 * torch.randn(shape, generator=g, dtype=torch.float64)
    if hostile and t.numel():
        values = torch.tensor(HOSTILE, dtype=torch.float64)
        pick = torch.randint(0, len(HOSTILE), shape, generator=g)
        t = torch.where(torch.rand(shape, generator=g) < hostile, values[pick], t)
    t = t.to(dtype)
    if layout == "channels_last" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "strided" and t.dim() >= 2:
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous strides
    return t


def _hostile_fraction(draw: Any) -> float:
    """The fraction of a tensor's values drawn from HOSTILE: some, none or all."""
    return draw(st.sampled_from([0.3, 0.0, 1.0]))


def _record(valid: bool, defect: str, features: dict[str, bool]) -> None:
    COUNTS["valid" if valid else "invalid"] += 1
    if defect:
        COUNTS[f"defect:{defect}"] += 1
    for name, present in features.items():
        COUNTS[f"feature:{name}"] += bool(present)


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


def _run(valid: bool, defect: str, call: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """The result of a valid call; None after a call with a defect raised as documented."""
    if valid:
        out = call()
        COUNTS["computed"] += 1
        return out
    try:
        call()
    except (ValueError, TypeError):
        COUNTS["rejected"] += 1
        return None
    raise AssertionError(f"a call with the defect {defect!r} was accepted")


def _battery(
    examples: int, defects: list[str], case: Callable[[str], Any], check: Callable[[Any], None]
) -> None:
    """Run ``check`` on ``examples`` cases: valid ones, then each defect in turn.

    About three cases in ten have a defect, split evenly between the defects: one run of
    hypothesis per defect rather than a drawn defect, because hypothesis repeats the values
    of small draws such as ``sampled_from`` and would leave most defects untried.
    """
    per_defect = max(1, 3 * examples // (10 * len(defects)))
    runs = [("", examples - per_defect * len(defects))] + [(d, per_defect) for d in defects]
    for defect, count in runs:

        @settings(
            max_examples=count,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case(defect))
        def run(c: Any) -> None:
            check(c)

        run()


# --- deform_conv2d -------------------------------------------------------------------

CONV_DEFECTS = [
    "stride",
    "padding",
    "dilation",
    "integer_dtype",
    "mixed_dtype",
    "offset_channels",
    "offset_groups",
    "mask_channels",
    "offset_size",
    "offset_batch",
    "weight_channels",
    "out_channels",
    "bias_shape",
    "empty_output",
    "input_ndim",
    "not_a_tensor",
]


@dataclass(frozen=True)
class ConvSpec:
    """A deform_conv2d call, valid by construction (before a defect is applied)."""

    n: int
    c_in: int
    c_out: int
    groups: int
    offset_groups: int
    kernel: tuple[int, int]
    size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    dtype: torch.dtype
    layout: str
    bias: bool
    mask: float | None  # hostile fraction of the mask, None for no mask
    offset_hostile: float
    seed: int

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(
                self.size, self.padding, self.dilation, self.kernel, self.stride, strict=True
            )
        )


@st.composite
def conv_spec(draw: Any) -> ConvSpec:
    seed = draw(st.integers(0, 2**16))
    groups = draw(st.sampled_from([1, 2]))
    offset_groups = draw(st.sampled_from([1, 2, 3]))  # 3 straddles two weight groups
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.sampled_from([(1, 1), (2, 2), (2, 1)]))
    padding = draw(st.sampled_from([(0, 0), (1, 1), (1, 0), (2, 2)]))
    dilation = draw(st.sampled_from([(1, 1), (2, 2), (1, 2)]))
    # The smallest map with an output (0 where the padding alone makes room), plus a few.
    size = tuple(
        max(0, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 4))
        for k, p, d in zip(kernel, padding, dilation, strict=True)
    )
    mask = draw(st.sampled_from([None, 0.0, 0.3]))
    return ConvSpec(
        n=draw(st.sampled_from([2, 1, 3, 2, 1, 3, 0])),  # sometimes an empty batch
        c_in=math.lcm(groups, offset_groups) * draw(st.integers(1, 2)),
        c_out=groups * draw(st.integers(1, 3)),
        groups=groups,
        offset_groups=offset_groups,
        kernel=kernel,
        size=size,  # type: ignore[arg-type]
        stride=stride,
        padding=padding,
        dilation=dilation,
        dtype=draw(st.sampled_from(FLOATS)),
        layout=LAYOUTS[seed % len(LAYOUTS)],  # evenly: hypothesis repeats small draws
        bias=draw(st.booleans()),
        mask=mask,
        offset_hostile=_hostile_fraction(draw),
        seed=seed,
    )


def conv_tensors(s: ConvSpec) -> dict[str, Any]:
    k = s.kernel[0] * s.kernel[1]
    h_out, w_out = (max(0, v) for v in s.out_size)  # an empty output only with a defect
    seed = s.seed
    return {
        "input": _tensor(seed, (s.n, s.c_in, *s.size), s.dtype, layout=s.layout),
        "offset": _tensor(
            seed + 1, (s.n, 2 * s.offset_groups * k, h_out, w_out), s.dtype, s.offset_hostile,
            s.layout,
        ),
        "weight": _tensor(seed + 2, (s.c_out, s.c_in // s.groups, *s.kernel), s.dtype),
        "bias": _tensor(seed + 3, (s.c_out,), s.dtype) if s.bias else None,
        "mask": None if s.mask is None else _tensor(
            seed + 4, (s.n, s.offset_groups * k, h_out, w_out), s.dtype, s.mask, s.layout
        ),
        "stride": s.stride,
        "padding": s.padding,
        "dilation": s.dilation,
    }  # fmt: skip


def conv_defect(draw: Any, defect: str, s: ConvSpec) -> dict[str, Any]:
    """The call of ``s`` with ``defect``, which the validation must reject."""
    if defect == "empty_output":  # a kernel wider than the padded map
        k_h = (s.size[0] + 2 * s.padding[0]) // s.dilation[0] + 2
        return conv_tensors(replace(s, kernel=(k_h, s.kernel[1])))
    if defect == "out_channels":
        s = replace(s, groups=2, c_in=2 * s.c_in, c_out=2 * s.c_out + 1)
        return conv_tensors(s)
    if defect == "integer_dtype":
        return conv_tensors(replace(s, dtype=torch.int64))
    call = conv_tensors(s)
    k = s.kernel[0] * s.kernel[1]
    h_out, w_out = s.out_size
    seed = s.seed + 5
    if defect in ("stride", "padding", "dilation"):
        bad = {"stride": [0, -1, (1, 2, 3), 1.5], "padding": [-1, (1,)], "dilation": [0, "1"]}
        call[defect] = draw(st.sampled_from(bad[defect]))
    elif defect == "mixed_dtype":
        other = torch.float64 if s.dtype != torch.float64 else torch.float32
        call["weight"] = call["weight"].to(other)
    elif defect == "offset_channels":  # not a multiple of 2·K_h·K_w, or no offset group
        channels = draw(st.sampled_from([2 * s.offset_groups * k + 1, 0]))
        call["offset"] = _tensor(seed, (s.n, channels, h_out, w_out), s.dtype)
    elif defect == "offset_groups":  # G = C_in + 1 does not divide C_in
        channels = 2 * (s.c_in + 1) * k
        call["offset"] = _tensor(seed, (s.n, channels, h_out, w_out), s.dtype)
    elif defect == "mask_channels":
        call["mask"] = _tensor(seed, (s.n, s.offset_groups * k + 1, h_out, w_out), s.dtype)
    elif defect == "offset_size":
        call["offset"] = _tensor(seed, (s.n, 2 * s.offset_groups * k, h_out + 1, w_out), s.dtype)
    elif defect == "offset_batch":
        call["offset"] = _tensor(seed, (s.n + 1, 2 * s.offset_groups * k, h_out, w_out), s.dtype)
    elif defect == "weight_channels":  # C_in/groups = C_in + 1 does not divide C_in
        call["weight"] = _tensor(seed, (s.c_out, s.c_in + 1, *s.kernel), s.dtype)
    elif defect == "bias_shape":
        call["bias"] = _tensor(seed, (s.c_out + 1,), s.dtype)
    elif defect == "input_ndim":
        call["input"] = call["input"].flatten(0, 1)
    elif defect == "not_a_tensor":
        call["bias"] = 0.5
    else:
        raise ValueError(defect)
    return call


@st.composite
def conv_case(draw: Any, defect: str) -> tuple[ConvSpec, str, dict[str, Any]]:
    spec = draw(conv_spec())
    call = conv_defect(draw, defect, spec) if defect else conv_tensors(spec)
    return spec, defect, call


def fuzz_conv(backend: str, examples: int) -> None:
    def check(case: tuple[ConvSpec, str, dict[str, Any]]) -> None:
        spec, defect, c = case
        valid = not defect
        offset = c["offset"]
        _record(valid, defect, {
            "empty_batch": spec.n == 0,
            "empty_map": 0 in spec.size,
            "nonfinite_offsets": not torch.isfinite(offset).all(),
            "hostile_mask": spec.mask is not None and spec.mask > 0,
            "half": spec.dtype in (torch.float16, torch.bfloat16),
            "channels_last": spec.layout == "channels_last",
            "strided": spec.layout == "strided",
            "straddling_groups": spec.offset_groups == 3 and spec.groups == 2,
        } if valid else {})  # fmt: skip
        grad = spec.dtype in (torch.float32, torch.float64) and valid
        leaves = {
            name: c[name].detach().requires_grad_(grad)
            if isinstance(c[name], torch.Tensor) and c[name].is_floating_point()
            else c[name]
            for name in ("input", "offset", "weight", "bias", "mask")
        }
        # Offsets may hold NaN, inf or huge values (they read 0); the other tensors are
        # finite unless the mask holds hostile values.
        finite = spec.mask in (None, 0.0)

        def call() -> torch.Tensor:
            with deformconv.use_backend(backend):
                out = deformconv.deform_conv2d(
                    leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"],
                    c["stride"], c["padding"], c["dilation"], mask=leaves["mask"],
                )  # fmt: skip
                _check_grads(out, list(leaves.values()), finite)
            return out

        out = _run(valid, defect, call)
        if out is None:
            return
        COUNTS["nonempty"] += out.numel() > 0
        assert out.shape == (spec.n, spec.c_out, *spec.out_size)
        assert out.dtype == spec.dtype
        if finite:
            assert torch.isfinite(out).all(), "non-finite output from finite inputs"

    _battery(examples, CONV_DEFECTS, conv_case, check)


# --- deform_roi_pool, deform_ps_roi_pool ---------------------------------------------

ROI_DEFECTS = [
    "batch_index",
    "rois_columns",
    "output_size",
    "spatial_scale",
    "sampling_ratio",
    "aligned",
    "integer_dtype",
    "rois_dtype",
    "offset_shape",
    "mask_shape",
    "empty_map",
    "not_a_tensor",
]


@dataclass(frozen=True)
class RoiSpec:
    n: int
    channels: int
    size: tuple[int, int]
    rois: int
    output_size: tuple[int, int]
    dtype: torch.dtype
    layout: str
    offset: float | None  # hostile fraction, None for no offset
    mask: float | None
    boxes_hostile: float
    spatial_scale: float
    sampling_ratio: int
    aligned: bool
    seed: int


@st.composite
def roi_spec(draw: Any, ps: bool) -> RoiSpec:
    seed = draw(st.integers(0, 2**16))
    output_size = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    per_bin = draw(st.integers(1, 2))
    return RoiSpec(
        n=draw(st.integers(1, 2)),
        channels=output_size[0] * output_size[1] * per_bin if ps else draw(st.integers(1, 3)),
        size=(draw(st.integers(1, 8)), draw(st.integers(1, 8))),
        rois=draw(st.sampled_from([2, 1, 4, 2, 1, 4, 0])),  # sometimes none
        output_size=output_size,
        dtype=draw(st.sampled_from(FLOATS)),
        layout=LAYOUTS[seed % len(LAYOUTS)],  # evenly: hypothesis repeats small draws
        offset=draw(st.sampled_from([0.3, None, 0.0])),
        mask=draw(st.sampled_from([None, 0.0, 0.3])),
        boxes_hostile=_hostile_fraction(draw),
        spatial_scale=draw(st.sampled_from([1.0, 0.5, 0.25])),
        sampling_ratio=draw(st.sampled_from([0, 1, 2, -1])),
        aligned=draw(st.booleans()),
        seed=seed,
    )


def roi_tensors(s: RoiSpec) -> dict[str, Any]:
    seed, k = s.seed, s.rois
    g = torch.Generator().manual_seed(seed)
    boxes = _tensor(seed + 1, (k, 4), torch.float64, s.boxes_hostile) * 4 + 4
    batch = torch.randint(0, s.n, (k, 1), generator=g).to(torch.float64)
    shape = (k, 1, *s.output_size)
    return {
        "input": _tensor(seed, (s.n, s.channels, *s.size), s.dtype, layout=s.layout),
        "rois": torch.cat([batch, boxes], dim=1).to(s.dtype),
        "offset": None if s.offset is None else _tensor(seed + 2, (k, 2, *s.output_size), s.dtype, s.offset),
        "mask": None if s.mask is None else _tensor(seed + 3, shape, s.dtype, s.mask),
        "output_size": s.output_size,
        "spatial_scale": s.spatial_scale,
        "sampling_ratio": s.sampling_ratio,
        "aligned": s.aligned,
    }  # fmt: skip


def roi_defect(draw: Any, defect: str, s: RoiSpec) -> dict[str, Any]:
    """The call of ``s`` with ``defect``, which the validation must reject."""
    if defect == "integer_dtype":
        return {**roi_tensors(replace(s, dtype=torch.int64)), "rois": roi_tensors(s)["rois"]}
    if defect == "empty_map":
        return roi_tensors(replace(s, size=(0, s.size[1])))
    if defect == "batch_index" and s.rois == 0:
        s = replace(s, rois=1)
    call = roi_tensors(s)
    seed, k = s.seed + 5, s.rois
    if defect == "batch_index":
        index = draw(st.sampled_from([float(s.n), -1.0, 0.5]))
        call["rois"] = call["rois"].clone()
        call["rois"][draw(st.integers(0, k - 1)), 0] = index
    elif defect == "rois_columns":
        call["rois"] = call["rois"][:, :4]
    elif defect == "output_size":
        call["output_size"] = draw(st.sampled_from([0, (1, 2, 3), (0, 1)]))
    elif defect == "spatial_scale":
        call["spatial_scale"] = draw(st.sampled_from([0.0, -1.0, float("nan"), "1"]))
    elif defect == "sampling_ratio":
        call["sampling_ratio"] = draw(st.sampled_from([513, 1.5, True]))
    elif defect == "aligned":
        call["aligned"] = 1
    elif defect == "rois_dtype":
        other = torch.float64 if s.dtype != torch.float64 else torch.float32
        call["rois"] = call["rois"].to(other)
    elif defect == "offset_shape":
        call["offset"] = _tensor(seed, (k, 2, s.output_size[0] + 1, s.output_size[1]), s.dtype)
    elif defect == "mask_shape":
        call["mask"] = _tensor(seed, (k + 1, 1, *s.output_size), s.dtype)
    elif defect == "not_a_tensor":
        call["rois"] = call["rois"].tolist()
    else:
        raise ValueError(defect)
    return call


def fuzz_roi(ps: bool, examples: int) -> None:
    fn = deformconv.deform_ps_roi_pool if ps else deformconv.deform_roi_pool

    @st.composite
    def roi_case(draw: Any, defect: str) -> tuple[RoiSpec, str, dict[str, Any]]:
        spec = draw(roi_spec(ps))
        if defect == "channels":  # C not a multiple of out_h·out_w
            call = roi_tensors(replace(spec, output_size=(2, 2), channels=4 * spec.channels + 1))
        else:
            call = roi_defect(draw, defect, spec) if defect else roi_tensors(spec)
        return spec, defect, call

    def check(case: tuple[RoiSpec, str, dict[str, Any]]) -> None:
        spec, defect, c = case
        valid = not defect
        _record(valid, defect, {
            "no_rois": spec.rois == 0,
            "nonfinite_boxes": not torch.isfinite(c["rois"]).all(),
            "hostile_offset": spec.offset is not None and spec.offset > 0,
            "hostile_mask": spec.mask is not None and spec.mask > 0,
            "half": spec.dtype in (torch.float16, torch.bfloat16),
            "channels_last": spec.layout == "channels_last",
            "strided": spec.layout == "strided",
        } if valid else {})  # fmt: skip
        grad = spec.dtype in (torch.float32, torch.float64) and valid
        xi = c["input"].detach().requires_grad_(grad) if grad else c["input"]
        finite = spec.mask in (None, 0.0)

        def call() -> torch.Tensor:
            out = fn(
                xi, c["rois"], c["offset"], c["output_size"], c["spatial_scale"],
                c["sampling_ratio"], 0.1, c["aligned"], c["mask"],
            )  # fmt: skip
            _check_grads(out, [xi], finite)
            return out

        out = _run(valid, defect, call)
        if out is None:
            return
        COUNTS["nonempty"] += out.numel() > 0
        channels = spec.channels // (spec.output_size[0] * spec.output_size[1] if ps else 1)
        assert out.shape == (spec.rois, channels, *spec.output_size)
        if finite:
            assert torch.isfinite(out).all(), "non-finite output from finite inputs"

    _battery(examples, roi_defects(ps), roi_case, check)


def roi_defects(ps: bool) -> list[str]:
    return ROI_DEFECTS + (["channels"] if ps else [])


def main(op: str, backend: str, examples: int) -> None:
    torch.set_num_threads(1)
    if op == "deform_conv2d":
        fuzz_conv(backend, examples)
    else:
        fuzz_roi(op == "deform_ps_roi_pool", examples)
    print(json.dumps(dict(sorted(COUNTS.items()))))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
