"""Modules: own parameters and call the ops; no math of their own."""

from deformconv.nn.deform_conv import DeformConv2d

__all__ = ["DeformConv2d"]
