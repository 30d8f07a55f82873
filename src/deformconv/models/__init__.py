"""Model surgery and training helpers for networks with deformable layers."""

from deformconv.models._deformify import deformify, spatial_convs
from deformconv.models._training import param_groups, recording

__all__ = ["deformify", "param_groups", "recording", "spatial_convs"]
