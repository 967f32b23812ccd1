"""Benchmark pieces: cases read from the shared data folder, classical peers, and a comparison runner.

* :mod:`mmreg.bench.cases`: :class:`~mmreg.bench.cases.Case` and builders for the IXI T1-T1
  pairs, the template cases with a known deformation (ground-truth displacement) and the
  IXI-vs-template multi-modal pairs. The data folder is ``$MMREG_DATA`` or
  ``<repo>/../shared/data``.
* :mod:`mmreg.bench.peers`: elastix B-spline (itk-elastix) and "affine only", both returning a
  displacement image in the engine's convention (fixed grid, LPS mm, fixed point x <-> moving
  point x + u(x)).
* :mod:`mmreg.bench.compare`: ``python -m mmreg.bench.compare``: the engine's instance
  optimisation against elastix from one cached affine start, scored by one piece of code, written
  as a markdown table and JSON.

Nothing here is imported by the engine itself; itk-elastix is only needed for the elastix peer.
"""
from .cases import Case, data_dir  # noqa: F401

__all__ = ["Case", "data_dir"]
