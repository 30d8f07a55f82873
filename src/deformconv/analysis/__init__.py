"""What the offsets learned: sampling-location tracing, effective dilation, plots.

Works on any model built with :class:`~deformconv.DeformConv2d` (it reads each layer's
``last_offset``/``last_mask`` after a forward pass); plain ``nn.Conv2d`` layers count as
deformable layers with zero offsets, so the same calls describe a plain network.
Plotting helpers need matplotlib (``pip install deformconv[viz]``), imported lazily.
"""

from deformconv.analysis._dilation import effective_dilation, layer_effective_dilation
from deformconv.analysis._plot import plot_offset_field, plot_sampling_locations
from deformconv.analysis._tracing import sampling_field, trace_sampling_locations

__all__ = [
    "effective_dilation",
    "layer_effective_dilation",
    "plot_offset_field",
    "plot_sampling_locations",
    "sampling_field",
    "trace_sampling_locations",
]
