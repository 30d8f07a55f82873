"""Runs the DCNv3 Triton kernels on CPU tensors under Triton's interpreter; saves results.

``python tests/_dcnv_triton_interpret.py OUT.pt`` (spawned by ``test_dcnv_triton.py`` in a
fresh process: ``TRITON_INTERPRET=1`` must be set before Triton is first imported) runs
every case of ``CASES`` through ``deformconv.kernels._dcnv_triton.forward`` and
``backward`` and saves the inputs, the output and the gradients. The parent test judges
them.
"""

from __future__ import annotations

import os
import sys

import torch

# (batch, (H, W), group, group_channels, kernel, stride, padding, dilation, scale, remove_center)
CASES = {
    "basic": (2, (5, 4), 2, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False),
    "strided_dilated": (1, (6, 5), 1, 4, (3, 3), (2, 1), (2, 1), (2, 1), 0.5, False),
    "kernel_5x3_remove_center": (1, (5, 5), 3, 2, (5, 3), (1, 1), (2, 1), (1, 1), 2.0, True),
    "many_channels": (1, (3, 4), 1, 70, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False),
    "nonfinite_offsets": (1, (4, 4), 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False),
    "batch_0": (0, (4, 4), 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False),
}

FLOAT32_CASES = {"basic": (torch.float32,), "nonfinite_offsets": (torch.float32,)}


def make_case(name: str, dtype: torch.dtype = torch.float64) -> dict[str, object]:
    batch, size, group, c_g, kernel, stride, padding, dilation, scale, rc = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    h_out, w_out = (
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, p, d, k, st in zip(size, padding, dilation, kernel, stride, strict=True)
    )
    points = kernel[0] * kernel[1] - int(rc)
    x = torch.randn(batch, *size, group * c_g, generator=gen, dtype=torch.float64)
    offset = 2 * torch.randn(batch, h_out, w_out, group * points * 2, generator=gen,
                             dtype=torch.float64)  # fmt: skip
    if name == "nonfinite_offsets":
        bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
        pick = torch.randint(0, 8, offset.shape, generator=gen)
        offset = torch.where(pick < 4, bad[pick.clamp(max=3)].double(), offset)
    mask = torch.rand(batch, h_out, w_out, group * points, generator=gen, dtype=torch.float64)
    grad_output = torch.randn(batch, h_out, w_out, group * c_g, generator=gen,
                              dtype=torch.float64)  # fmt: skip
    args = {"kernel_size": kernel, "stride": stride, "padding": padding, "dilation": dilation,
            "group": group, "offset_scale": scale, "remove_center": rc}  # fmt: skip
    tensors = {"input": x, "offset": offset, "mask": mask, "grad_output": grad_output}
    return {**{k: v.to(dtype) for k, v in tensors.items()}, **args}


def main(out_path: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 in a fresh process")
    from deformconv.kernels import _dcnv_triton

    results = {}
    for name in CASES:
        for dtype in (torch.float64, *FLOAT32_CASES.get(name, ())):
            c = make_case(name, dtype)
            args = [c[k] for k in ("kernel_size", "stride", "padding", "dilation", "group",
                                   "offset_scale", "remove_center")]  # fmt: skip
            tensors = [c[k] for k in ("input", "offset", "mask")]
            out = _dcnv_triton.forward(*tensors, *args)
            grads = _dcnv_triton.backward(c["grad_output"], *tensors, *args)
            results[f"{name}-{str(dtype)[6:]}"] = {**c, "out": out, "grads": list(grads)}
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
