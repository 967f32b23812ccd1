"""Pure-Python parts of the LearnedMetric module (no Qt, no Slicer): its method-specific options
(:mod:`LearnedMetricLib.options`: the metric selector, transformation model, control-point
spacing, levels and iterations, and how they become the engine's ``metric`` options)."""
