"""Export a model with deformable layers to ONNX and check it in onnxruntime.

``torch.onnx.export(model, args, dynamo=True)`` alone already writes the standard
``DeformConv`` operator (see ``deformconv/ops/_onnx.py``); :func:`export_onnx` adds
the check that deployment needs: it runs the file in onnxruntime and compares
with eager PyTorch. Needs ``pip install deformconv[onnx]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import deformconv

__all__ = ["ExportReport", "demo_model", "export_onnx"]

MIN_OPSET = 19  # ONNX DeformConv's first opset


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and measured.

    Attributes:
        path: the ``.onnx`` file.
        opset: the model's default-domain opset.
        deform_conv_nodes: number of ``DeformConv`` nodes in the graph.
        max_abs_diff: max |onnxruntime - eager| over all outputs (None: not checked).
        max_rel_diff: ``max_abs_diff / max |eager|`` (None: not checked).
    """

    path: str
    opset: int
    deform_conv_nodes: int
    max_abs_diff: float | None
    max_rel_diff: float | None

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return asdict(self)


def export_onnx(
    model: nn.Module,
    args: tuple[Tensor, ...],
    path: str | Path,
    *,
    opset: int = 20,
    check: bool = True,
    dynamic_batch: bool = False,
) -> ExportReport:
    """Write ``model`` to ``path`` as ONNX (``DeformConv`` nodes) and check it in onnxruntime.

    Args:
        model: any module; its deformable layers become ONNX ``DeformConv`` nodes.
            Exported in its current mode (call ``model.eval()`` first for inference).
        args: the example inputs, e.g. ``(x,)`` with x of shape (N, C_in, H_in, W_in).
        path: the ``.onnx`` file to write (parent folders are created).
        opset: ONNX opset, >= 19 (``DeformConv`` appeared in opset 19).
        check: run the file in onnxruntime (CPU) on ``args`` and compare with eager.
        dynamic_batch: let dimension 0 of every input vary.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ValueError: ``opset`` < 19, or ``args`` is not a tuple of tensors.

    Example:
        >>> import tempfile, torch
        >>> from deformconv.onnx import demo_model, export_onnx
        >>> model = demo_model().eval()
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     report = export_onnx(model, (torch.randn(1, 3, 16, 16),), f"{tmp}/m.onnx")
        >>> report.deform_conv_nodes, report.max_rel_diff < 1e-5
        (2, True)
    """
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"export_onnx: opset must be an int >= {MIN_OPSET}; got {opset!r}")
    if not isinstance(args, tuple) or not all(isinstance(a, Tensor) for a in args):
        raise ValueError(f"export_onnx: args must be a tuple of tensors; got {type(args).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in args)
    program = torch.onnx.export(
        model, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
        verbose=False,
    )  # fmt: skip
    assert program is not None  # dynamo=True always returns the program
    program.save(str(path))
    proto = program.model_proto
    version = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    nodes = sum(node.op_type == "DeformConv" for node in proto.graph.node)
    abs_diff = rel_diff = None
    if check:
        abs_diff, rel_diff = _compare_with_onnxruntime(model, args, path)
    return ExportReport(str(path), int(version), nodes, abs_diff, rel_diff)


def _compare_with_onnxruntime(
    model: nn.Module, args: tuple[Tensor, ...], path: Path
) -> tuple[float, float]:
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args, strict=True)
    }
    got = session.run(None, feeds)
    with torch.no_grad():
        expected = model(*args)
    outputs = expected if isinstance(expected, tuple | list) else (expected,)
    abs_diff = scale = 0.0
    for g, e in zip(got, outputs, strict=True):
        ref = e.detach().cpu().double().numpy()
        abs_diff = max(abs_diff, float(np.abs(g.astype(np.float64) - ref).max(initial=0.0)))
        scale = max(scale, float(np.abs(ref).max(initial=0.0)))
    return abs_diff, abs_diff / scale if scale > 0 else abs_diff


def demo_model(seed: int = 0) -> nn.Module:
    """A small network with a DCNv1 and a modulated (DCNv2) layer, offsets of about 1 px.

    Weights as PyTorch initialises them; the offset predictors (zero in a fresh layer,
    which would make the layers plain convolutions) are drawn small and random.

    Shape:
        - Input: (N, 3, H, W)
        - Output: (N, 8, ceil(H/2), W)

    Example:
        >>> import torch
        >>> demo_model()(torch.randn(2, 3, 16, 12)).shape
        torch.Size([2, 8, 8, 12])
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _demo_layers()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "conv_offset" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def _demo_layers() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        deformconv.DeformConv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        deformconv.DeformConv2d(8, 8, 3, stride=(2, 1), padding=1, modulated=True, offset_groups=2),
    )
