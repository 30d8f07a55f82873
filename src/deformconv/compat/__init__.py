"""Drop-in modules and checkpoint conversion for code and weights from other libraries.

- :mod:`deformconv.compat.torchvision`: ``DeformConv2d`` (torchvision.ops).
- :mod:`deformconv.compat.mmcv`: ``DeformConv2d``, ``DeformConv2dPack``,
  ``ModulatedDeformConv2d``, ``ModulatedDeformConv2dPack``, ``DeformRoIPool``,
  ``DeformRoIPoolPack``, ``ModulatedDeformRoIPoolPack`` (mmcv.ops).
- :mod:`deformconv.compat.detectron2`: ``DeformConv``, ``ModulatedDeformConv``
  (detectron2.layers).
- :func:`load_dcn_resnet` / :func:`convert_resnet_state_dict`: mmdetection and
  detectron2 DCN ResNet checkpoints into a deformified torchvision ResNet.

Each module keeps its library's class name, constructor arguments, forward signature,
parameter names and mask activation, so checkpoints load with ``strict=True`` and
compute what they computed there.

Example:
    >>> import torch
    >>> from deformconv.compat import mmcv
    >>> layer = mmcv.ModulatedDeformConv2dPack(8, 8, 3, padding=1, bias=False)
    >>> layer(torch.randn(1, 8, 12, 12)).shape
    torch.Size([1, 8, 12, 12])
"""

from deformconv.compat import detectron2, mmcv, torchvision
from deformconv.compat._checkpoint import convert_resnet_state_dict, load_dcn_resnet

__all__ = ["convert_resnet_state_dict", "detectron2", "load_dcn_resnet", "mmcv", "torchvision"]
