"""deformconv: deformable convolution for PyTorch, pip-installable, fast on CPU.

Example:
    >>> import torch, deformconv
    >>> layer = deformconv.DeformConv2d(3, 8, kernel_size=3, padding=1)
    >>> layer(torch.randn(1, 3, 16, 16)).shape
    torch.Size([1, 8, 16, 16])
"""

from deformconv.models import deformify, param_groups, recording
from deformconv.nn import DCNv3, DCNv4, DeformConv2d, DeformRoIPool2d
from deformconv.ops import (
    available_backends,
    dcnv3,
    dcnv4,
    deform_conv2d,
    deform_ps_roi_pool,
    deform_roi_pool,
    get_backend,
    precompile,
    use_backend,
)

__version__ = "0.1.0"

__all__ = [
    "DCNv3",
    "DCNv4",
    "DeformConv2d",
    "DeformRoIPool2d",
    "__version__",
    "available_backends",
    "dcnv3",
    "dcnv4",
    "deform_conv2d",
    "deform_ps_roi_pool",
    "deform_roi_pool",
    "deformify",
    "get_backend",
    "param_groups",
    "precompile",
    "recording",
    "use_backend",
]
