"""What the offsets learned: sampling-location tracing, effective dilation, plots.

Works on any model built with :class:`~deformconv.DeformConv2d` (it reads each layer's
``last_offset``/``last_mask`` after a forward pass); plain ``nn.Conv2d`` layers count as
deformable layers with zero offsets, so the same calls describe a plain network.
:func:`area_terciles`, :func:`size_buckets`, :func:`assign_units` and
:func:`region_statistics` implement the paper's protocol for effective dilation by
object size (its Table 2). Plotting helpers need matplotlib
(``pip install deformconv[viz]``), imported lazily.
"""

from deformconv.analysis._dilation import effective_dilation, layer_effective_dilation
from deformconv.analysis._plot import plot_offset_field, plot_sampling_locations
from deformconv.analysis._regions import (
    REGIONS,
    area_terciles,
    assign_units,
    region_statistics,
    size_buckets,
)
from deformconv.analysis._tracing import sampling_field, trace_sampling_locations

__all__ = [
    "REGIONS",
    "area_terciles",
    "assign_units",
    "effective_dilation",
    "layer_effective_dilation",
    "plot_offset_field",
    "plot_sampling_locations",
    "region_statistics",
    "sampling_field",
    "size_buckets",
    "trace_sampling_locations",
]
