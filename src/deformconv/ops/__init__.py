"""Functional ops: validate the arguments once, then dispatch to a kernel."""

from deformconv.ops import _fast_backends  # noqa: F401  (registers the fast backends)
from deformconv.ops._backend import available_backends, get_backend, use_backend
from deformconv.ops._errors import ArgumentError, ArgumentTypeError
from deformconv.ops._onnx import onnx_translation_table
from deformconv.ops.dcnv import dcnv3, dcnv4
from deformconv.ops.deform_conv import deform_conv2d
from deformconv.ops.precompile import precompile
from deformconv.ops.roi_pool import deform_ps_roi_pool, deform_roi_pool

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "available_backends",
    "dcnv3",
    "dcnv4",
    "deform_conv2d",
    "deform_ps_roi_pool",
    "deform_roi_pool",
    "get_backend",
    "onnx_translation_table",
    "precompile",
    "use_backend",
]
