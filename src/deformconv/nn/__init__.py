"""Modules: own parameters and call the ops; no math of their own."""

from typing import TYPE_CHECKING, Any

from deformconv.nn.dcnv import DCNv3, DCNv4
from deformconv.nn.deform_conv import DeformConv2d
from deformconv.nn.roi_pool import DeformRoIPool2d

if TYPE_CHECKING:
    from deformconv.nn.multiscale_roi import DeformMultiScaleRoIAlign

__all__ = ["DCNv3", "DCNv4", "DeformConv2d", "DeformMultiScaleRoIAlign", "DeformRoIPool2d"]


def __getattr__(name: str) -> Any:
    # DeformMultiScaleRoIAlign subclasses a torchvision class: import torchvision on first use.
    if name == "DeformMultiScaleRoIAlign":
        from deformconv.nn.multiscale_roi import DeformMultiScaleRoIAlign

        return DeformMultiScaleRoIAlign
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
