"""Experiments built on the public API: the scale-varied digits demo (and benchmarks).

Modules are imported on demand (``deformconv.experiments.digits`` and so on), so this
package has no import-time side effects and no optional dependency is needed to list it.
"""
