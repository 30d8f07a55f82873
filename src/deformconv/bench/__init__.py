"""Benchmarks against ``F.conv2d`` and torchvision: the shape suite and the CPU harness.

Modules are imported on demand (``deformconv.bench.cpu``), so importing the package is free.
"""
