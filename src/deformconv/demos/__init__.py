"""Demos built on the public API, like a user's own project: digit data, models, training.

``classify`` (the scale-varied digits classifier) with its ``digits``, ``cnn``, ``train``
and ``figures`` modules. Modules are imported on demand (``deformconv.demos.digits`` and
so on), so this package has no import-time side effects and needs no optional dependency
to be listed.
"""
