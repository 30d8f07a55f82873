"""Modules: own parameters and call the ops; no math of their own."""

from deformconv.nn.dcnv import DCNv3, DCNv4
from deformconv.nn.deform_conv import DeformConv2d
from deformconv.nn.roi_pool import DeformRoIPool2d

__all__ = ["DCNv3", "DCNv4", "DeformConv2d", "DeformRoIPool2d"]
