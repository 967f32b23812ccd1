"""Affine pre-alignment with SimpleITK: multi-resolution, Mattes mutual information.

Works across modalities and fields of view: the rigid start is chosen among centrings on the
image geometry and on the intensity centres of mass (the better Mattes MI after a short coarse
rigid run wins), then a rigid and an affine stage run on a 3-level pyramid. Single-slice
(2-D) pairs are registered in 2-D and the result lifted to 3-D.

The transform maps FIXED points to MOVING points (LPS mm), the direction used for resampling,
like every mmreg transform.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .errors import CancelledError, InputError
from .image import describe_extents
from .progress import Progress

MAX_SAMPLES = 20_000


@dataclass
class AffineResult:
    """Outcome of :func:`affine_prealign`.

    ``transform``: AffineTransform, fixed point -> moving point (LPS mm). ``metric_before`` /
    ``metric_after``: Mattes MI cost (negative MI, lower is better) at the identity and at the
    result, on the full-resolution images; ``None`` where the images do not overlap.
    """

    transform: sitk.AffineTransform
    metric_before: float | None
    metric_after: float | None
    seconds: float
    initialisation: str
    stages: list = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-friendly summary (matrix row-major, translation in mm)."""
        return {
            "matrix": list(self.transform.GetMatrix()),
            "translation_mm": list(self.transform.GetTranslation()),
            "center_mm": list(self.transform.GetCenter()),
            "mattes_mi_before": self.metric_before,
            "mattes_mi_after": self.metric_after,
            "initialisation": self.initialisation,
            "stages": self.stages,
            "seconds": round(self.seconds, 3),
        }


def _is_single_slice(image: sitk.Image) -> bool:
    return image.GetSize()[2] == 1


def _axial(image: sitk.Image) -> bool:
    """True when the third axis of the image is +-z in LPS (the 2-D path is exact then)."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    return bool(np.allclose(np.abs(d[:, 2]), [0.0, 0.0, 1.0], atol=1e-6))


def _to_2d(image: sitk.Image) -> sitk.Image:
    return image[:, :, 0]


def _registration() -> sitk.ImageRegistrationMethod:
    # One thread: multi-threaded Mattes MI sums in a varying order, and the optimiser amplifies
    # those rounding differences (up to 2.4 mm between identical runs on small images).
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(1)
    return reg


def _method(fixed: sitk.Image, levels: int, seed: int, fixed_mask=None, moving_mask=None):
    reg = _registration()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    n = float(np.prod(fixed.GetSize()))
    shrink = [2 ** k for k in reversed(range(levels))]
    # Keep the number of samples per level bounded (speed) but never fewer than ~5 %.
    reg.SetMetricSamplingPercentagePerLevel(
        [min(1.0, max(0.05, MAX_SAMPLES / max(n / s ** fixed.GetDimension(), 1.0))) for s in shrink], seed)
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel([float(s) / 2.0 if s > 1 else 0.0 for s in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInterpolator(sitk.sitkLinear)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    return reg


def _levels_for(image: sitk.Image) -> int:
    smallest = min(s for s in image.GetSize() if s > 1)
    return int(max(1, min(3, np.floor(np.log2(max(smallest, 1) / 8.0)) + 1)))


def _evaluate(fixed, moving, transform, seed) -> float | None:
    reg = _registration()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    n = float(np.prod(fixed.GetSize()))
    reg.SetMetricSamplingPercentage(min(1.0, max(0.05, 4 * MAX_SAMPLES / n)), seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(transform)
    try:
        return float(reg.MetricEvaluate(fixed, moving))
    except RuntimeError:
        return None  # no overlap


def _run_stage(fixed, moving, transform, levels, iterations, seed, progress, masks):
    reg = _method(fixed, levels, seed, *masks)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                 numberOfIterations=iterations,
                                                 gradientMagnitudeTolerance=1e-6,
                                                 relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(transform, inPlace=True)
    counter = {"level": 0, "it": 0, "cancelled": None}

    def on_iteration():
        # SimpleITK turns exceptions raised in callbacks into RuntimeErrors: stop the optimiser
        # and re-raise the cancellation after Execute returns.
        counter["it"] += 1
        if counter["cancelled"] is not None:
            return
        try:
            progress(min(1.0, (counter["level"] + min(counter["it"] / iterations, 1.0)) / levels),
                     "affine pre-alignment")
        except CancelledError as exc:
            counter["cancelled"] = exc
            reg.Abort()

    def on_level():
        counter["level"] = reg.GetCurrentLevel()
        counter["it"] = 0

    reg.AddCommand(sitk.sitkIterationEvent, on_iteration)
    reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, on_level)
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        if counter["cancelled"] is not None:
            raise counter["cancelled"] from None
        if "outside" in str(exc).lower() or "samples" in str(exc).lower():
            raise InputError(
                "Affine pre-alignment failed: the fixed and moving images do not overlap enough "
                "(too many samples map outside the moving image). Check that both images show the "
                "same anatomy, or align them roughly first (e.g. fix the origin in the header).") from None
        raise
    if counter["cancelled"] is not None:
        raise counter["cancelled"]
    return transform, reg.GetMetricValue()


def affine_prealign(fixed: sitk.Image, moving: sitk.Image, *, stages=("rigid", "affine"),
                    iterations: int = 50, fixed_mask: sitk.Image | None = None,
                    moving_mask: sitk.Image | None = None, seed: int = 1,
                    progress: Progress | None = None) -> AffineResult:
    """Affine transform aligning ``moving`` to ``fixed`` (fixed point -> moving point, LPS mm).

    Inputs should be intensity-normalised float images (see :mod:`mmreg.intensity`); any size,
    spacing, direction and field of view. ``stages`` is a subset of ("rigid", "affine") run in
    that order; ``iterations`` per pyramid level. Masks (nonzero = use) restrict the metric.
    Random sampling uses ``seed``, so runs are repeatable.
    """
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # repeatable results (see _registration)
    try:
        return _affine_prealign(fixed, moving, stages, iterations, fixed_mask, moving_mask, seed,
                                progress or Progress())
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _affine_prealign(fixed, moving, stages, iterations, fixed_mask, moving_mask, seed, progress) -> AffineResult:
    t0 = time.perf_counter()
    if not set(stages) <= {"rigid", "affine"} or not stages:
        raise InputError(f"Affine stages must be a non-empty subset of ('rigid', 'affine'), got {stages}.")
    if _is_single_slice(fixed) != _is_single_slice(moving):
        raise InputError("Affine pre-alignment of a single slice with a volume is not supported: give two "
                         "volumes or two slices, or turn the affine pre-alignment off (--no-affine) when the "
                         "slice already lies in the volume's space.")
    two_d = _is_single_slice(fixed) and _is_single_slice(moving)
    if two_d and not (_axial(fixed) and _axial(moving)):
        raise InputError("Affine pre-alignment of single slices needs slices whose normal is the image z axis "
                         "(direction matrix with third column (0, 0, +-1)); turn it off (--no-affine) for "
                         "oblique or reformatted slices.")
    f, m = (_to_2d(fixed), _to_2d(moving)) if two_d else (fixed, moving)
    masks = ((_to_2d(fixed_mask) if two_d else fixed_mask) if fixed_mask is not None else None,
             (_to_2d(moving_mask) if two_d else moving_mask) if moving_mask is not None else None)
    dim = 2 if two_d else 3
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    metric_before = _evaluate(f, m, identity, seed)

    # 1. Choose the start: geometric centre vs centre of mass, by MI after a short coarse rigid run.
    rigid_type = sitk.Euler2DTransform if two_d else sitk.Euler3DTransform
    candidates = []
    for name, mode in (("geometry", sitk.CenteredTransformInitializerFilter.GEOMETRY),
                       ("moments", sitk.CenteredTransformInitializerFilter.MOMENTS)):
        try:
            init = sitk.CenteredTransformInitializer(f, m, rigid_type(), mode)
        except RuntimeError:
            continue
        coarse = _method(f, 1, seed, *masks)
        coarse.SetShrinkFactorsPerLevel([2 ** (_levels_for(f) - 1)])
        coarse.SetSmoothingSigmasPerLevel([1.0])
        coarse.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 30)
        coarse.SetOptimizerScalesFromPhysicalShift()
        tx = rigid_type(init)
        coarse.SetInitialTransform(tx, inPlace=True)
        try:
            coarse.Execute(f, m)
            value = _evaluate(f, m, tx, seed)
        except RuntimeError:
            value = None
        if value is not None:
            candidates.append((value, name, tx))
    if not candidates:
        raise InputError(f"The fixed and moving images could not be brought to overlap "
                         f"({describe_extents(fixed, moving)}). Check the inputs.")
    candidates.sort(key=lambda c: c[0])
    _, init_name, rigid = candidates[0]
    progress(0.1, "affine pre-alignment")

    # 2. Rigid, then affine, multi-resolution.
    levels = _levels_for(f)
    stage_log = []
    n_stages = len(stages)
    current: sitk.Transform = rigid
    for k, stage in enumerate(stages):
        sub = progress.sub(0.1 + 0.9 * k / n_stages, 0.1 + 0.9 * (k + 1) / n_stages)
        if stage == "affine":
            aff = sitk.AffineTransform(dim)
            aff.SetMatrix(current.GetMatrix())
            aff.SetTranslation(current.GetTranslation())
            aff.SetCenter(current.GetCenter())
            current = aff
        current, value = _run_stage(f, m, current, levels, iterations, seed + k, sub, masks)
        stage_log.append({"stage": stage, "mattes_mi": float(value)})

    affine = sitk.AffineTransform(dim)
    affine.SetMatrix(current.GetMatrix())
    affine.SetTranslation(current.GetTranslation())
    affine.SetCenter(current.GetCenter())
    metric_after = _evaluate(f, m, affine, seed)
    if metric_before is not None and metric_after is not None and metric_after > metric_before:
        # Never return something worse than the header alignment we were given.
        affine = sitk.AffineTransform(dim)
        metric_after = metric_before
        init_name += " (kept identity: optimisation did not improve MI)"
    if two_d:
        affine = _lift_2d(affine, moving.GetOrigin()[2] - fixed.GetOrigin()[2])
    progress(1.0, "affine pre-alignment")
    return AffineResult(affine, metric_before, metric_after, time.perf_counter() - t0, init_name, stage_log)


def _lift_2d(affine2d: sitk.AffineTransform, z_shift: float) -> sitk.AffineTransform:
    """A 2-D affine (x, y) as a 3-D affine that moves z by ``z_shift`` mm (slice to slice)."""
    mat = np.eye(3)
    mat[:2, :2] = np.array(affine2d.GetMatrix()).reshape(2, 2)
    out = sitk.AffineTransform(3)
    out.SetMatrix(mat.ravel().tolist())
    out.SetTranslation(tuple(affine2d.GetTranslation()) + (float(z_shift),))
    out.SetCenter(tuple(affine2d.GetCenter()) + (0.0,))
    return out
