"""Classical peers for the benchmark, returning displacements in the engine's convention.

Every peer returns a :class:`PeerResult` whose ``displacement`` is a float64 vector image on the
FIXED grid, LPS mm, resampling convention (fixed point x <-> moving point x + u(x)), exactly like
:attr:`mmreg.RegistrationResult.displacement`, so one piece of code scores all methods.

* :func:`identity_after_affine` -- the zero field (the "affine only" row: the affine is folded in
  by the caller).
* :func:`run_elastix_bspline` -- elastix (itk-elastix) with its default "bspline" parameter map:
  multi-resolution B-spline transform, Advanced Mattes mutual information plus a bending-energy
  penalty, adaptive stochastic gradient descent on random samples. The dense field comes from
  ``itk.transformix_deformation_field``; elastix transforms map fixed points to moving points, so
  that field already is ``u`` above (checked by :func:`check_peer_convention`: resampling the
  moving image through it with SimpleITK reproduces elastix's own result image).
* :func:`run_ants_syn` -- ANTs SyN (antspyx ``ants.registration(type_of_transform="SyNOnly")``, no
  affine stage: the caller pre-aligns) with Mattes MI (multi-modal) or neighbourhood cross-correlation
  (mono-modal). ANTs's forward transforms also map fixed points to moving points; the warp file is read
  with SimpleITK (LPS vectors) and checked the same way against ANTs's own warped image.

Inputs are SimpleITK images; they are handed to ITK through numpy with their origin, spacing and
direction (no files).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..transforms import displacement_transform, transform_to_field

#: Settings of the elastix peer that differ from / pin elastix's default "bspline" map.
ELASTIX_DEFAULTS = {"final_grid_spacing_mm": 10.0, "resolutions": 4, "iterations": 256, "spatial_samples": 2048,
                    "histogram_bins": 32, "bending_weight": 1.0, "random_seed": 121212}


@dataclass
class PeerResult:
    """A peer's answer: ``displacement`` (fixed grid, LPS mm, resampling convention), wall ``seconds`` of
    the registration call itself, ``settings`` (JSON-friendly), ``timings`` per step, and the peer's own
    warped moving image where it gives one (``result_image``)."""

    displacement: sitk.Image
    seconds: float
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    result_image: sitk.Image | None = None


def zero_field(reference: sitk.Image) -> sitk.Image:
    """A zero displacement image (float64 3-vectors) on ``reference``'s grid."""
    img = sitk.Image(reference.GetSize(), sitk.sitkVectorFloat64, 3)
    img.CopyInformation(reference)
    return img


def identity_after_affine(fixed: sitk.Image, moving: sitk.Image | None = None, **_) -> PeerResult:
    """The "affine only" method: no deformable step, a zero field on the fixed grid."""
    return PeerResult(zero_field(fixed), 0.0, {"method": "identity after the affine pre-alignment"})


# ----------------------------------------------------------------------------- SimpleITK <-> ITK


def _itk():
    try:
        import itk  # noqa: PLC0415 - optional dependency
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError("The elastix peer needs itk-elastix: pip install itk-elastix "
                         "(or pip install mmreg[peers]).") from None
    if not hasattr(itk, "elastix_registration_method"):  # pragma: no cover
        raise InputError("The installed 'itk' has no elastix: pip install itk-elastix.")
    return itk


def sitk_to_itk(image: sitk.Image):
    """A scalar SimpleITK image as an ITK float image with the same geometry (copies the pixels)."""
    itk = _itk()
    arr = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    out = itk.GetImageFromArray(np.ascontiguousarray(arr))
    out.SetOrigin([float(v) for v in image.GetOrigin()])
    out.SetSpacing([float(v) for v in image.GetSpacing()])
    out.SetDirection(itk.GetMatrixFromArray(np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)))
    return out


def itk_to_sitk(image, is_vector: bool = False, pixel_id=None) -> sitk.Image:
    """An ITK image (scalar or vector) as a SimpleITK image with the same geometry."""
    itk = _itk()
    arr = itk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=is_vector)
    out.SetOrigin(tuple(float(v) for v in image.GetOrigin()))
    out.SetSpacing(tuple(float(v) for v in image.GetSpacing()))
    out.SetDirection(tuple(float(v) for v in np.asarray(itk.GetArrayFromMatrix(image.GetDirection())).ravel()))
    return sitk.Cast(out, pixel_id) if pixel_id is not None else out


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6))


# ----------------------------------------------------------------------------- elastix


def set_itk_threads(threads: int) -> None:
    """Limit ITK's (hence elastix's and transformix's) thread pool to ``threads``."""
    itk = _itk()
    n = max(1, int(threads))
    itk.MultiThreaderBase.SetGlobalMaximumNumberOfThreads(n)
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(n)


def elastix_bspline_parameter_map(final_grid_spacing_mm: float = ELASTIX_DEFAULTS["final_grid_spacing_mm"],
                                  resolutions: int = ELASTIX_DEFAULTS["resolutions"],
                                  iterations: int = ELASTIX_DEFAULTS["iterations"],
                                  spatial_samples: int = ELASTIX_DEFAULTS["spatial_samples"],
                                  histogram_bins: int = ELASTIX_DEFAULTS["histogram_bins"],
                                  bending_weight: float = ELASTIX_DEFAULTS["bending_weight"],
                                  random_seed: int = ELASTIX_DEFAULTS["random_seed"], **overrides) -> dict:
    """elastix's default "bspline" parameter map with the given settings, as a plain dict of string tuples.

    Defaults are elastix's own (``GetDefaultParameterMap("bspline")``: 4 resolutions, final grid
    10 mm with grid schedule 2.83/2/1.41/1, 256 iterations per resolution, 2048 random samples,
    AdvancedMattesMutualInformation (32 bins) + TransformBendingEnergyPenalty with weights 1:1,
    AdaptiveStochasticGradientDescent with automatic parameter estimation). ``overrides``: any
    other elastix parameter (a value or a list of values).
    """
    itk = _itk()
    po = itk.ParameterObject.New()
    pm = dict(po.GetDefaultParameterMap("bspline", int(resolutions), float(final_grid_spacing_mm)))
    pm["MaximumNumberOfIterations"] = (str(int(iterations)),)
    pm["NumberOfSpatialSamples"] = (str(int(spatial_samples)),)
    pm["NumberOfHistogramBins"] = (str(int(histogram_bins)),)
    pm["Metric1Weight"] = (repr(float(bending_weight)),)
    pm["RandomSeed"] = (str(int(random_seed)),)
    pm["WriteResultImage"] = ("true",)
    for key, value in overrides.items():
        pm[key] = tuple(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return {k: tuple(v) for k, v in pm.items()}


def run_elastix_bspline(fixed: sitk.Image, moving: sitk.Image, *, threads: int = 2,
                        fixed_mask: sitk.Image | None = None, log_to_console: bool = False,
                        parameter_map: dict | None = None, **settings) -> PeerResult:
    """elastix B-spline registration of ``moving`` to ``fixed``; ``displacement`` on the fixed grid.

    Give the moving image already resampled through the affine pre-alignment (onto any grid; the
    benchmark uses the fixed grid), so elastix starts from that affine; fold the affine in afterwards
    (:func:`mmreg.transforms.fold_affine`). ``threads``: elastix's and ITK's thread count.
    ``settings``: see :func:`elastix_bspline_parameter_map`; ``parameter_map`` replaces the map
    entirely. ``fixed_mask`` (nonzero = in, fixed grid) restricts the metric. ``seconds`` is the wall
    time of the elastix call; the conversion to a dense field is timed separately in ``timings``.
    """
    itk = _itk()
    pm = dict(parameter_map) if parameter_map is not None else elastix_bspline_parameter_map(**settings)
    po = itk.ParameterObject.New()
    po.AddParameterMap(pm)
    set_itk_threads(threads)
    f_itk, m_itk = sitk_to_itk(fixed), sitk_to_itk(moving)
    # Not number_of_threads=...: ElastixRegistrationMethod.SetNumberOfThreads crashes (segfault) with
    # the multi-metric bspline map in itk-elastix 0.25.4 (ITKElastix issues #160, #295); the global
    # ITK thread pool size is what limits elastix's threads.
    kwargs = {"parameter_object": po, "log_to_console": bool(log_to_console)}
    if fixed_mask is not None:
        mask = itk.GetImageFromArray(np.ascontiguousarray((sitk.GetArrayFromImage(fixed_mask) > 0).astype(np.uint8)))
        mask.CopyInformation(f_itk)
        kwargs["fixed_mask"] = mask
    t0 = time.perf_counter()
    result_image, result_params = itk.elastix_registration_method(f_itk, m_itk, **kwargs)
    t_reg = time.perf_counter() - t0
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmreg-transformix-") as tmp:
        # transformix also writes deformationField.nii into its output folder (default: the working directory)
        field_itk = itk.transformix_deformation_field(m_itk, result_params, output_directory=tmp)
    t_field = time.perf_counter() - t1
    disp = itk_to_sitk(field_itk, is_vector=True, pixel_id=sitk.sitkVectorFloat64)
    if not _same_geometry(disp, fixed):  # transformix samples on the fixed grid of the result parameters
        raise RuntimeError("elastix's deformation field is not on the fixed grid; check the conversion.")
    disp.CopyInformation(fixed)
    out_settings = {"method": "elastix B-spline (itk-elastix default 'bspline' map)", "threads": int(threads),
                    "parameter_map": {k: list(v) for k, v in pm.items()}}
    try:
        from importlib.metadata import version  # noqa: PLC0415
        out_settings["itk_elastix_version"] = version("itk-elastix")
        out_settings["itk_version"] = itk.Version.GetITKVersion()
    except Exception:  # pragma: no cover - informational only
        pass
    return PeerResult(disp, t_reg, out_settings, {"elastix_s": round(t_reg, 3), "deformation_field_s": round(t_field, 3)},
                      itk_to_sitk(result_image, pixel_id=sitk.sitkFloat32))


def check_peer_convention(moving: sitk.Image, result: PeerResult, mask: sitk.Image | None = None,
                          interpolator: int = sitk.sitkBSpline) -> dict:
    """Check that a peer's ``result.displacement`` means fixed point x -> moving point x + u(x).

    Resamples ``moving`` through the field with SimpleITK (``interpolator``: cubic B-spline like
    elastix's final resampler, linear like ANTs's) and through the negated field, and compares both
    with the peer's own result image:
    mean absolute difference relative to the moving image's intensity range (inside ``mask`` if
    given). ``convention_ok``: the field as given reproduces elastix's image (< 1 % of the range)
    and the negated one does not (at least 5 times worse).
    """
    if result.result_image is None:
        raise InputError("This peer result carries no result image to check against.")
    ref = result.result_image
    arr_ref = sitk.GetArrayFromImage(ref)
    rng = float(np.ptp(sitk.GetArrayViewFromImage(moving))) or 1.0
    region = sitk.GetArrayViewFromImage(mask) > 0 if mask is not None else np.ones(arr_ref.shape, bool)

    def mad(disp):
        img = sitk.Resample(moving, ref, displacement_transform(disp), interpolator, 0.0, sitk.sitkFloat32)
        return float(np.abs(sitk.GetArrayFromImage(img) - arr_ref)[region].mean() / rng)

    neg = sitk.GetImageFromArray(-sitk.GetArrayFromImage(result.displacement), isVector=True)
    neg.CopyInformation(result.displacement)
    out = {"relative_mad_field": mad(result.displacement), "relative_mad_negated_field": mad(neg),
           "max_displacement_mm": float(np.linalg.norm(sitk.GetArrayViewFromImage(result.displacement), axis=-1).max())}
    out["convention_ok"] = bool(out["relative_mad_field"] < 0.01
                                and out["relative_mad_negated_field"] > 5 * out["relative_mad_field"])
    return out


# ----------------------------------------------------------------------------- ANTs

#: Settings of the ANTs SyN peer: antspyx's defaults for ``ants.registration`` (gradient step 0.2, update-field
#: smoothing 3 voxels, no total-field smoothing, 40/20/0 iterations at shrink factors 4/2/1 -- the full-resolution
#: level is skipped), the metric chosen per case: Mattes MI with 32 bins for multi-modal pairs, CC with radius 4
#: (the antsRegistrationSyN.sh radius) for mono-modal pairs.
ANTS_DEFAULTS = {"grad_step": 0.2, "flow_sigma": 3.0, "total_sigma": 0.0, "reg_iterations": (40, 20, 0),
                 "mi_bins": 32, "cc_radius": 4}


def _ants():
    try:
        import ants  # noqa: PLC0415 - optional dependency
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError("The ANTs peer needs antspyx: pip install antspyx (or pip install mmreg[peers]).") from None
    return ants


def set_ants_threads(threads: int) -> None:
    """Limit ANTs's threads: ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` (ANTs's own ITK reads it per call)."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(threads)))


def sitk_to_ants(image: sitk.Image):
    """A scalar SimpleITK image as an ANTsImage (float32) with the same geometry (ANTs arrays are x, y, z)."""
    ants = _ants()
    arr = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)).transpose(2, 1, 0)
    return ants.from_numpy(np.ascontiguousarray(arr), origin=[float(v) for v in image.GetOrigin()],
                           spacing=[float(v) for v in image.GetSpacing()],
                           direction=np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3))


def ants_to_sitk(image, reference: sitk.Image) -> sitk.Image:
    """A scalar ANTsImage on ``reference``'s grid as a SimpleITK float image."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(image.numpy().transpose(2, 1, 0).astype(np.float32)))
    out.CopyInformation(reference)
    return out


def run_ants_syn(fixed: sitk.Image, moving: sitk.Image, *, metric: str = "mattes", threads: int = 2,
                 fixed_mask: sitk.Image | None = None, grad_step: float = ANTS_DEFAULTS["grad_step"],
                 flow_sigma: float = ANTS_DEFAULTS["flow_sigma"], total_sigma: float = ANTS_DEFAULTS["total_sigma"],
                 reg_iterations=ANTS_DEFAULTS["reg_iterations"], mi_bins: int = ANTS_DEFAULTS["mi_bins"],
                 cc_radius: int = ANTS_DEFAULTS["cc_radius"]) -> PeerResult:
    """ANTs SyN registration of ``moving`` to ``fixed``; ``displacement`` on the fixed grid.

    ``metric``: "mattes" (Mattes MI, ``mi_bins`` bins; multi-modal) or "CC" (local cross-correlation,
    radius ``cc_radius`` voxels; mono-modal). As for elastix, give the moving image already resampled
    through the affine pre-alignment and fold the affine in afterwards: SyN runs without its own
    affine stage ("SyNOnly", identity initial transform). ``seconds``: wall time of the ANTs call;
    turning its transforms into one dense field on the fixed grid is timed separately.
    """
    ants = _ants()
    metric = {"mi": "mattes", "mattes": "mattes", "cc": "CC"}.get(str(metric).lower())
    if metric is None:
        raise InputError("run_ants_syn: metric must be 'mattes' (MI) or 'CC'.")
    set_ants_threads(threads)
    f_ants, m_ants = sitk_to_ants(fixed), sitk_to_ants(moving)
    kwargs = {}
    if fixed_mask is not None:
        kwargs["mask"] = sitk_to_ants(sitk.Cast(fixed_mask > 0, sitk.sitkFloat32))
    with tempfile.TemporaryDirectory(prefix="mmreg-ants-") as tmp:
        t0 = time.perf_counter()
        out = ants.registration(f_ants, m_ants, type_of_transform="SyNOnly", initial_transform="Identity",
                                syn_metric=metric, syn_sampling=int(mi_bins if metric == "mattes" else cc_radius),
                                grad_step=float(grad_step), flow_sigma=float(flow_sigma),
                                total_sigma=float(total_sigma), reg_iterations=tuple(int(i) for i in reg_iterations),
                                outprefix=str(Path(tmp) / "syn_"), **kwargs)
        t_reg = time.perf_counter() - t0
        t1 = time.perf_counter()
        # ANTs lists transforms last-applied-first, like SimpleITK's CompositeTransform: [warp, affine]
        # maps a fixed point x to warp(affine(x)). The warp file holds ITK (LPS) displacement vectors.
        parts = []
        for name in out["fwdtransforms"]:
            if str(name).endswith((".nii.gz", ".nii")):
                parts.append(sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(name)),
                                                                        sitk.sitkVectorFloat64)))
            else:
                parts.append(sitk.ReadTransform(str(name)))
        disp = transform_to_field(sitk.CompositeTransform(parts), fixed)
        result_image = ants_to_sitk(out["warpedmovout"], fixed)
    t_field = time.perf_counter() - t1
    settings = {"method": "ANTs SyN (antspyx ants.registration, type_of_transform='SyNOnly', identity start)",
                "threads": int(threads), "metric": metric,
                "metric_parameter": f"{mi_bins} bins" if metric == "mattes" else f"radius {cc_radius}",
                "grad_step": float(grad_step), "flow_sigma": float(flow_sigma), "total_sigma": float(total_sigma),
                "reg_iterations": [int(i) for i in reg_iterations]}
    try:
        from importlib.metadata import version  # noqa: PLC0415
        settings["antspyx_version"] = version("antspyx")
    except Exception:  # pragma: no cover - informational only
        pass
    return PeerResult(disp, t_reg, settings, {"ants_s": round(t_reg, 3), "deformation_field_s": round(t_field, 3)},
                      result_image)
