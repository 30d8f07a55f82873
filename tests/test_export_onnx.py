"""torch.export captures deformconv::deform_conv2d; ONNX export gives DeformConv, checked in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deformconv
from _ecosystem import PATHS, TinyNet, deform_nodes, on_path

RTOL = 1e-5  # onnxruntime vs eager: max |diff| / max |eager|


def _model(modulated: bool) -> TinyNet:
    model = TinyNet(modulated).eval()
    for layer in (model.deform1, model.deform2):  # offsets of about 1 px
        torch.nn.init.normal_(layer.conv_offset.weight, std=0.1)
    return model


def _relative(got: np.ndarray, expected: torch.Tensor) -> float:
    ref = expected.detach().double().numpy()
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("path", PATHS)
def test_export_captures_custom_op(path):
    model = _model(True)
    x = torch.randn(2, 3, 9, 7)
    with on_path(path):
        program = torch.export.export(model, (x,))
        nodes = deform_nodes(program.graph)
        # One node per layer, whatever the backend; the reference runs behind the op here.
        assert len(nodes) == 2
        assert {n.args[-1] for n in nodes} == {path}
        expected = model(x)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("modulated", [False, True], ids=["v1", "modulated"])
def test_onnx_export_gives_deformconv(modulated):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _model(modulated)
    x = torch.randn(2, 3, 9, 7)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)  # no translation table
    proto = program.model_proto
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("DeformConv") == 2, ops
    assert max(o.version for o in proto.opset_import if o.domain == "") >= 19
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert _relative(got, expected) <= RTOL
    # Independent oracle: onnxruntime's DeformConv against our model in float64.
    with torch.no_grad():
        exact = model.double()(x.double())
    assert _relative(got, exact) <= RTOL


def test_onnx_export_of_exported_program_with_translation_table():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _model(True)
    x = torch.randn(1, 3, 8, 8)
    program = torch.export.export(model, (x,))
    onnx_program = torch.onnx.export(
        program, dynamo=True, custom_translation_table=deformconv.ops.onnx_translation_table()
    )
    proto = onnx_program.model_proto
    assert [n.op_type for n in proto.graph.node].count("DeformConv") == 2
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert _relative(got, model(x)) <= RTOL


def test_export_cli_writes_and_checks(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from deformconv.cli import main

    code = main(["export", "--out", str(tmp_path), "--input-shape", "2", "3", "12", "10",
                 "--dynamic-batch"])  # fmt: skip
    assert code == 0
    report = __import__("json").loads((tmp_path / "report.json").read_text())
    assert report["deform_conv_nodes"] == 2 and report["opset"] >= 19
    assert report["max_rel_diff"] <= RTOL
    assert (tmp_path / "model.onnx").stat().st_size > 0 and (tmp_path / "args.json").exists()


def test_export_onnx_rejects_old_opset(tmp_path):
    from deformconv.onnx import demo_model, export_onnx

    with pytest.raises(ValueError, match=r"export_onnx: opset must be an int >= 19; got 18"):
        export_onnx(demo_model(), (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", opset=18)
