"""Bounded temporary memory of the reference kernel, by peak RSS in a fresh process.

Each measurement runs in a subprocess (Linux: ``VmHWM`` from /proc/self/status, reset
through /proc/self/clear_refs): the inputs are built, a tiny call loads the code, then the
peak RSS rise of one call is reported in MiB. With the workspace capped at 4 MiB the rise
stays near the output and gradients' own size; with the cap lifted the same call needs
the full column buffers (about 4x 38 MiB), which shows the measurement can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc"
)

SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
import deformconv
from deformconv.kernels import reference

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

mode, cap = sys.argv[1], int(sys.argv[2])
reference.WORKSPACE_BYTES = cap
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
n, c, size = 2, 128, 64
x = torch.randn(n, c, size, size, generator=g)
w = torch.randn(c, c, 3, 3, generator=g)
off = torch.randn(n, 18, size, size, generator=g)
mask = torch.rand(n, 9, size, size, generator=g)
go = torch.randn(n, c, size, size, generator=g)
args = ((1, 1), (1, 1), (1, 1))
small = [t[:1, :4, :4, :4].contiguous() for t in (x, w)]
reference.deform_conv2d(small[0], off[:1, :, :4, :4].contiguous(), None, small[1][:, :4], None, *args)
if mode == "train":  # the op's dispatch and autograd path load code (and modules) on first use
    tiny = [t.clone().requires_grad_() for t in (small[0], off[:1, :, :4, :4], small[1][:, :4])]
    with deformconv.use_backend("reference"):
        deformconv.deform_conv2d(tiny[0], tiny[1], tiny[2], padding=1).sum().backward()
leaves = [t.clone().requires_grad_(mode == "train") for t in (x, off, mask, w)]
try:
    Path("/proc/self/clear_refs").write_text("5")
except OSError:
    pass
before = rss("VmRSS")
if mode == "forward":
    with torch.no_grad():
        out = reference.deform_conv2d(x, off, mask, w, None, *args)
elif mode == "train":
    xl, ol, ml, wl = leaves
    with deformconv.use_backend("reference"):
        out = deformconv.deform_conv2d(xl, ol, wl, padding=1, mask=ml)
    out.backward(go)
    del out
elif mode == "backward_op":
    grads = reference.deform_conv2d_backward(go, x, off, mask, w, None, *args)
print(json.dumps({"rise": rss("VmHWM") - before}))
"""

# Output or gradients of this problem: 8 MiB each for input/output, plus offset and mask.
OWN = {"forward": 8, "train": 8 + 8 + 1 + 1 + 1 + 8, "backward_op": 8 + 1 + 1 + 1}


def _rise(mode: str, cap: int) -> float:
    # A fixed mmap threshold: glibc otherwise raises it after large frees and serves later
    # buffers from a heap it keeps, which makes the peak depend on what ran before.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(cap)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["rise"]


@pytest.mark.parametrize("mode", ["forward", "train", "backward_op"])
def test_peak_memory_stays_under_the_workspace_bound(mode):
    cap = 4 * 2**20
    rise = _rise(mode, cap)
    # Own results, plus a few workspaces (the bound is approximate) and allocator slack.
    assert rise < OWN[mode] + 6 * cap / 2**20 + 16, rise


def test_without_the_bound_the_same_call_needs_much_more():
    # The column buffers (about 4x 38 MiB at their peak) and the 8 MiB output: far above
    # the bounded call's limit of 8 + 6·4 + 16 = 48 MiB.
    assert _rise("forward", 2**40) > 100
