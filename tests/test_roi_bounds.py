"""Deformable RoI pooling stays in bounded memory and time for any box.

The adaptive grid (``sampling_ratio <= 0``) is ``ceil(roi_size / out)`` samples per bin
and axis, as ``torchvision.ops.roi_align``, up to ``max(1, 512 // out)``; beyond that
cap it is the cap, i.e. the result is ``roi_align`` with ``sampling_ratio`` = the cap.
Both sides of the rule are checked against torchvision. Absurd boxes (1e4 … 1e30 pixels,
inf, NaN) run forward and backward in subprocesses under a 4 GiB address-space limit
and a time limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import deformconv
from deformconv import deform_ps_roi_pool, deform_roi_pool
from deformconv.kernels import roi_reference

F64 = torch.float64
CAP_7 = 512 // 7  # 73 samples per bin and axis with 7 bins


def test_cap_rule():
    assert roi_reference.MAX_ADAPTIVE_SAMPLES == 512
    assert [roi_reference.adaptive_grid_cap(n) for n in (1, 2, 7, 14, 600)] == [512, 256, 73, 36, 1]


def _square_rois(side: float, dtype=F64) -> torch.Tensor:
    # Boxes of the given side: inside the 16x16 map's corner, centred on it, far off it.
    return torch.tensor(
        [
            [0, 0.0, 0.0, side, side],
            [1, 8.0 - side / 2, 8.0 - side / 2, 8.0 + side / 2, 8.0 + side / 2],
            [0, -side + 3.0, 2.0, 3.0, 2.0 + side],
        ],
        dtype=dtype,
    )


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("side", [100.0, 7 * CAP_7 - 0.5])  # grids 15 and exactly the cap
def test_below_the_cap_equals_roi_align(backend, side, aligned):
    tv = pytest.importorskip("torchvision")
    x = torch.randn(2, 3, 16, 16, dtype=F64)
    rois = _square_rois(side)
    expected = tv.ops.roi_align(x, rois, 7, 1.0, 0, aligned)
    with deformconv.use_backend(backend):
        out = deform_roi_pool(x, rois, None, 7, 1.0, 0, aligned=aligned)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_below_the_cap_ps_equals_ps_roi_align(backend):
    tv = pytest.importorskip("torchvision")
    x = torch.randn(2, 2 * 9, 16, 16, dtype=F64)
    rois = _square_rois(3 * (512 // 3))  # grid = cap = 170
    expected = tv.ops.ps_roi_align(x, rois, 3, 1.0, 0)
    with deformconv.use_backend(backend):
        out = deform_ps_roi_pool(x, rois, None, 3, 1.0, 0)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("side", [7 * CAP_7 + 10.0, 1e4, 1e6, 1e9])
def test_beyond_the_cap_is_roi_align_with_the_cap_as_sampling_ratio(backend, side):
    tv = pytest.importorskip("torchvision")
    x = torch.randn(2, 3, 16, 16, dtype=F64)
    rois = _square_rois(side)
    offset = torch.zeros(3, 2, 7, 7, dtype=F64)
    with deformconv.use_backend(backend):
        out = deform_roi_pool(x, rois, offset, 7, 1.0, 0)
    expected = tv.ops.roi_align(x, rois, 7, 1.0, CAP_7, True)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    if side < 1e3:  # the divergence from roi_align's uncapped grid (86 instead of 73)
        assert not torch.allclose(out, tv.ops.roi_align(x, rois, 7, 1.0, 0, True))


def test_beyond_the_cap_ps_is_ps_roi_align_with_the_cap(backend):
    tv = pytest.importorskip("torchvision")
    x = torch.randn(2, 2 * 4, 16, 16, dtype=F64)
    rois = _square_rois(1e5)
    with deformconv.use_backend(backend):
        out = deform_ps_roi_pool(x, rois, None, 2, 1.0, 0)
    torch.testing.assert_close(
        out, tv.ops.ps_roi_align(x, rois, 2, 1.0, 256), atol=1e-12, rtol=1e-12
    )


def test_workspace_slices_give_the_same_result(monkeypatch):
    # A workspace of a few KiB forces slicing inside bins (rows) and inside the grid
    # groups: results and gradients must not change.
    x = torch.randn(2, 5, 12, 13, dtype=F64, requires_grad=True)
    rois = torch.cat([_square_rois(300.0), _square_rois(20.0)])
    offset = (0.3 * torch.randn(6, 2, 3, 3, dtype=F64)).requires_grad_()
    mask = torch.rand(6, 1, 3, 3, dtype=F64, requires_grad=True)
    results = {}
    for workspace in (64 << 20, 1 << 16):
        monkeypatch.setattr(roi_reference, "WORKSPACE_BYTES", workspace)
        monkeypatch.setattr("deformconv.kernels._roi_fast.WORKSPACE_BYTES", workspace)
        for name in ("reference", "numba"):
            with deformconv.use_backend(name):
                out = deform_roi_pool(x, rois, offset, 3, 1.0, mask=mask)
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
            grads = torch.autograd.grad(out, (x, offset, mask), weights)
            results[workspace, name] = (out, *grads)
    first = results[64 << 20, "reference"]
    for key, value in results.items():
        for a, b in zip(first, value, strict=True):
            torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10, msg=str(key))


# --- absurd boxes in a subprocess with an address-space limit -----------------------------

_CHILD = textwrap.dedent(
    """
    import json, math, re, resource, sys, time
    import torch
    import deformconv
    from deformconv import DeformRoIPool2d, deform_ps_roi_pool, deform_roi_pool

    def vm(field):
        status = open("/proc/self/status").read()
        return int(re.search(field + r":\\s+(\\d+) kB", status).group(1)) * 1024

    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    xs = torch.randn(1, 2 * 49, 16, 16, requires_grad=True)
    pool = DeformRoIPool2d(7, 1.0, in_channels=4, hidden_features=16, modulated=True)
    # Warm up every path on a small box before the limit (lazy imports, first calls).
    small = torch.tensor([[0.0, 1.0, 1.0, 9.0, 9.0]])
    for name in ("reference", "auto"):
        with deformconv.use_backend(name):
            pool(x, small).sum().backward()
    # 4 GiB of address space in all, or 1 GiB more than the imports took if that is more
    # (a CUDA build of torch maps over 3 GiB of libraries at import).
    base = vm("VmSize")
    limit = max(4 << 30, base + (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    coord = float(sys.argv[1])
    box = [0.0, 0.0, 0.0, coord, coord] if math.isfinite(coord) else [0.0, 1.0, coord, 9.0, 9.0]
    rois = torch.tensor([box, [0.0, -coord / 2, -coord / 2, coord / 2, coord / 2], small[0].tolist()])
    if not math.isfinite(coord):
        rois[1] = torch.tensor([0.0, coord, 2.0, 5.0, 7.0])
    offset = torch.randn(3, 2, 7, 7, requires_grad=True)
    mask = torch.rand(3, 1, 7, 7, requires_grad=True)
    report = {"limit": limit}
    start = time.perf_counter()
    for name in ("reference", "auto"):
        with deformconv.use_backend(name):
            outs = [
                deform_roi_pool(x, rois, offset, 7, 1.0, mask=mask),
                deform_ps_roi_pool(xs, rois, offset, 7, 1.0),
                pool(x, rois),
            ]
            grads = torch.autograd.grad(sum(o.sum() for o in outs), (x, xs, offset, mask, *pool.parameters()))
        report[name] = all(bool(torch.isfinite(t).all()) for t in (*outs, *grads))
    report["seconds"] = time.perf_counter() - start
    report["address_space_growth_mib"] = (vm("VmPeak") - base) / 2**20
    print(json.dumps(report))
    """
)


@pytest.mark.slow  # a few seconds each, most of it importing torch
@pytest.mark.parametrize("coord", ["1e4", "1e6", "1e9", "1e30", "inf", "nan"])
def test_absurd_boxes_run_in_bounded_memory_and_time(coord, tmp_path: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    src = str(Path(deformconv.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    done = subprocess.run(
        [sys.executable, str(script), coord], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["reference"] and report["auto"], report  # finite outputs and gradients
    assert report["seconds"] < 60, report
