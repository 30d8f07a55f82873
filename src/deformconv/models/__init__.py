"""Model surgery: turn the convolutions of an existing network into deformable ones."""

from deformconv.models._deformify import deformify, spatial_convs

__all__ = ["deformify", "spatial_convs"]
