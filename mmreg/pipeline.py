"""One call from two images to a registration result: :func:`register`.

Steps: validate inputs -> normalise intensities -> affine pre-alignment (optional) -> resample
onto the method's network grid -> the method predicts a voxel-unit field -> physical
displacement (LPS mm) on the fixed image's full grid, affine folded in -> warped image and
labels -> quality numbers (Jacobian, Dice/HD95 when both label maps are given, image
similarity). Inputs are never modified.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import SimpleITK as sitk

from . import __version__
from .affine import AffineResult, affine_prealign
from .device import choose_device, set_threads
from .errors import InputError
from .grid import resample_field
from .image import (ImageLike, atomic_output, describe_extents, physical_bounds, read_image, read_labels, read_mask, same_grid,
                    write_image)
from .intensity import normalize_intensity
from .labels import warp_labels
from .methods import GridInputs, get_method
from .progress import Progress, ProgressCallback
from .spatial import jacobian_determinant
from .transforms import transform_to_field, displacement_transform, fold_affine, write_transform


@dataclass
class RegistrationResult:
    """What :func:`register` returns.

    ``displacement``: float64 vector image on the FIXED grid, LPS mm, resampling convention
    (fixed point x <-> moving point x + u(x)), the affine pre-alignment folded in.
    ``affine``: the pre-alignment (fixed point -> moving point) or None.
    ``warped``: the moving image resampled onto the fixed grid (original intensities, linear).
    ``warped_labels``: the moving label map on the fixed grid, if one was given.
    ``extra_images``: ``{name: image}`` on the fixed grid, maps the method made besides the field
    (e.g. ``"attention"`` of ``multiscale``; see :meth:`RegistrationMethod.extra_outputs`).
    ``report``: JSON-friendly dict: inputs, method, options, timings (s) per step, affine
    metric before/after, Jacobian statistics, Dice/HD95 (after affine and after the method)
    when both label maps are given, image similarity.
    """

    fixed: sitk.Image
    moving: sitk.Image
    displacement: sitk.Image
    affine: sitk.Transform | None
    warped: sitk.Image
    warped_labels: sitk.Image | None = None
    report: dict = field(default_factory=dict)
    extra_images: dict = field(default_factory=dict)

    @cached_property
    def transform(self) -> sitk.DisplacementFieldTransform:
        """The whole registration as a SimpleITK transform (fixed point -> moving point); built once."""
        return displacement_transform(self.displacement)

    def warp(self, image: ImageLike, labels: bool = False, interpolation: str = "linear") -> sitk.Image:
        """Resample another image (or label map, ``labels=True``) of the moving space onto the fixed grid."""
        if labels:
            return warp_labels(read_labels(image, "Label map"), self.transform, self.fixed, interpolation)
        img = read_image(image, "Image")
        return sitk.Resample(img, self.fixed, self.transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)

    def save(self, transform_path: str | os.PathLike | None = None, warped_path=None, warped_labels_path=None,
             report_path=None, extra_paths: dict | None = None) -> dict:
        """Write whichever outputs are given a path; returns {kind: path}. See :mod:`mmreg.transforms`.
        ``extra_paths``: ``{name: path}`` for maps of :attr:`extra_images` (kind ``"extra:<name>"``)."""
        written = {}
        for name, path in (extra_paths or {}).items():
            if name not in self.extra_images:
                have = ", ".join(sorted(self.extra_images)) or "none"
                raise InputError(f"No '{name}' map to write: this method made {have}.")
            written[f"extra:{name}"] = str(write_image(self.extra_images[name], path))
        if transform_path:
            written["transform"] = str(write_transform(self.displacement, transform_path))
        if warped_path:
            written["warped"] = str(write_image(self.warped, warped_path))
        if warped_labels_path:
            if self.warped_labels is None:
                raise InputError("No warped label map to write: give the moving label map (--moving-labels).")
            written["warped_labels"] = str(write_image(self.warped_labels, warped_labels_path))
        if report_path:
            report = dict(self.report, outputs=dict(self.report.get("outputs", {}), **written))
            with atomic_output(report_path, "report") as tmp:
                tmp.write_text(json.dumps(report, indent=2, default=_json_default))
            written["report"] = str(report_path)
        self.report.setdefault("outputs", {}).update(written)
        return written


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    return str(obj)


def _ones_like(image: sitk.Image) -> sitk.Image:
    ones = sitk.Image(image.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(image)
    return ones


def _grid_mismatch(what: str, a: sitk.Image, other: str, b: sitk.Image) -> str:
    return (f"The {what} is not on the {other}'s grid (size {a.GetSize()} vs {b.GetSize()}, origin "
            f"{np.round(a.GetOrigin(), 3).tolist()} vs {np.round(b.GetOrigin(), 3).tolist()} mm, spacing "
            f"{np.round(a.GetSpacing(), 4).tolist()} vs {np.round(b.GetSpacing(), 4).tolist()} mm). Give the one "
            f"that belongs to the {other}, or resample it onto that image first.")


def _mask_image(image: sitk.Image, mask: sitk.Image | None) -> sitk.Image:
    """Float mask on the image's grid: the given mask, or ones (the whole field of view)."""
    return _ones_like(image) if mask is None else sitk.Cast(mask, sitk.sitkFloat32)


def _check_overlap(fixed: sitk.Image, moving: sitk.Image) -> None:
    lo_f, hi_f = physical_bounds(fixed)
    lo_m, hi_m = physical_bounds(moving)
    tol = np.maximum(np.array(fixed.GetSpacing()).max(), np.array(moving.GetSpacing()).max())
    if np.any(np.minimum(hi_f, hi_m) + tol < np.maximum(lo_f, lo_m)):
        raise InputError(
            f"The fixed and moving images do not overlap in physical space ({describe_extents(fixed, moving)}) "
            "and affine pre-alignment is off. Turn affine pre-alignment on, or fix the images' origins.")


def jacobian_report(displacement: sitk.Image, mask: sitk.Image | None = None) -> dict:
    """Jacobian determinant statistics of a displacement image (physical space), optionally in a mask."""
    det = jacobian_determinant(displacement)
    if mask is not None:
        det = det[sitk.GetArrayViewFromImage(mask) > 0]
    det = det.ravel()
    return {
        "folding_percent": float(100.0 * np.count_nonzero(det <= 0) / max(det.size, 1)),
        "jacobian_min": float(det.min()), "jacobian_max": float(det.max()),
        "jacobian_mean": float(det.mean()), "jacobian_std": float(det.std()),
    }


def _label_numbers(fixed_labels: sitk.Image, warped: sitk.Image) -> dict:
    from .metrics import label_overlap_report
    return label_overlap_report(fixed_labels, warped)


def register(fixed: ImageLike, moving: ImageLike, method: str = "optimize", *, model: str | None = None,
             affine: bool = True, fixed_labels: ImageLike | None = None, moving_labels: ImageLike | None = None,
             fixed_mask: ImageLike | None = None, moving_mask: ImageLike | None = None,
             fixed_modality: str = "auto", moving_modality: str = "auto", device: str | None = "auto",
             threads: int | None = None, label_interpolation: str = "linear",
             progress: ProgressCallback | None = None, **options) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; returns a :class:`RegistrationResult`.

    ``fixed``/``moving``: file paths or SimpleITK images (any size, spacing, direction; 2-D
    slices accepted). ``method``: a name from :func:`mmreg.methods.method_names`; ``model``: the
    trained model to use (learned methods). ``affine``: run the affine pre-alignment first
    (default on). ``fixed_labels``/``moving_labels``: optional label maps; the moving one is
    warped, and with both the report has Dice and HD95. ``fixed_mask``/``moving_mask``: optional
    masks (nonzero = use; e.g. brain masks) restricting the affine metric, the intensity
    percentiles and the similarity of the method. ``*_modality``: "auto", "MR" or "CT"
    (intensity normalisation). ``device``: "auto", "cpu", "cuda", "mps". ``progress``: a
    callback ``(fraction, message)`` that may raise :class:`~mmreg.errors.CancelledError` or
    return False to cancel. Other keyword ``options`` go to the method (see ``mmreg methods``).
    """
    t_start = time.perf_counter()
    prog = Progress(progress)
    timings = prog.timings
    with prog.step("read_and_validate"):
        fixed_img = read_image(fixed, "Fixed image")
        moving_img = read_image(moving, "Moving image")
        fixed_lab = read_labels(fixed_labels, "Fixed label map") if fixed_labels is not None else None
        moving_lab = read_labels(moving_labels, "Moving label map") if moving_labels is not None else None
        for lab, img, what in ((fixed_lab, fixed_img, "fixed"), (moving_lab, moving_img, "moving")):
            if lab is not None and not same_grid(lab, img, tol=1e-3):
                # Labels on another grid are fine physically, but almost always a mix-up.
                raise InputError(_grid_mismatch(f"{what} label map", lab, f"{what} image", img))
        masks = {}
        for key, mask, img in (("fixed", fixed_mask, fixed_img), ("moving", moving_mask, moving_img)):
            if mask is not None:
                m = read_mask(mask, f"{key.capitalize()} mask")
                if not same_grid(m, img, tol=1e-3):
                    raise InputError(_grid_mismatch(f"{key} mask", m, f"{key} image", img))
                masks[key] = m
        if not affine:
            _check_overlap(fixed_img, moving_img)
        reg_method = get_method(method)
        opts = dict(reg_method.default_options())
        unknown = set(options) - set(opts)
        if unknown:
            raise InputError(f"Unknown option(s) for method '{method}': {', '.join(sorted(unknown))}. "
                             f"Known: {', '.join(sorted(opts))}.")
        opts.update(options)
        if model is not None:
            opts["model"] = model
        reg_method.check_options(opts)
        torch_device = choose_device(device)
        n_threads = set_threads(threads)
    prog(0.02, "inputs checked")

    with prog.step("normalise"):
        fixed_n, fixed_norm = normalize_intensity(fixed_img, fixed_modality, mask=masks.get("fixed"))
        moving_n, moving_norm = normalize_intensity(moving_img, moving_modality, mask=masks.get("moving"))

    aff: AffineResult | None = None
    if affine:
        with prog.step("affine"):
            aff = affine_prealign(fixed_n, moving_n, fixed_mask=masks.get("fixed"), moving_mask=masks.get("moving"),
                                  progress=prog.sub(0.03, 0.25))
        affine_tx = aff.transform
    else:
        affine_tx = None

    with prog.step("resample_to_network_grid"):
        grid = reg_method.grid_for(fixed_img, opts)
        tx = affine_tx if affine_tx is not None else sitk.Transform(3, sitk.sitkIdentity)
        inputs = GridInputs(
            grid=grid,
            fixed=grid.image_to_tensor(grid.resample(fixed_n), torch_device),
            moving=grid.image_to_tensor(grid.resample(moving_n, tx), torch_device),
            fixed_mask=grid.image_to_tensor(grid.resample(_mask_image(fixed_img, masks.get("fixed"))), torch_device),
            moving_mask=grid.image_to_tensor(grid.resample(_mask_image(moving_img, masks.get("moving")), tx),
                                             torch_device),
            device=torch_device,
        )
        if float(inputs.moving_mask.mean()) < 0.01:
            raise InputError("After pre-alignment the moving image covers less than 1 % of the fixed image: "
                             "they do not overlap. Check that both images show the same region.")
    prog(0.27, f"registering with '{method}'")

    with prog.step("method"):
        ddf = reg_method.predict(inputs, opts, prog.sub(0.27, 0.85))

    with prog.step("field_to_fixed_grid"):
        deformable = resample_field(grid.ddf_to_field_image(ddf), fixed_img)
        displacement = fold_affine(deformable, affine_tx)
        extra_images = {name: sitk.Resample(grid.tensor_to_image(t.float()), fixed_img, sitk.Transform(),
                                            sitk.sitkLinear, 0.0, sitk.sitkFloat32)
                        for name, t in reg_method.extra_outputs().items()}
    prog(0.88, "warping")

    with prog.step("warp"):
        transform = displacement_transform(displacement)
        background = float(np.percentile(sitk.GetArrayViewFromImage(moving_img), 0.5))
        warped = sitk.Resample(moving_img, fixed_img, transform, sitk.sitkLinear, background, sitk.sitkFloat32)
        warped_lab = (warp_labels(moving_lab, transform, fixed_img, label_interpolation)
                      if moving_lab is not None else None)
    prog(0.93, "quality numbers")

    with prog.step("quality"):
        qa = {"deformable": jacobian_report(deformable)}
        if fixed_lab is not None and warped_lab is not None:
            qa["labels"] = _label_numbers(fixed_lab, warped_lab)
            base_tx = affine_tx if affine_tx is not None else sitk.Transform(3, sitk.sitkIdentity)
            affine_lab = warp_labels(moving_lab, base_tx, fixed_img, label_interpolation)
            qa["labels_after_affine"] = _label_numbers(fixed_lab, affine_lab)
        from .metrics import image_similarity
        fixed_mask = sitk.GetArrayFromImage(sitk.Resample(_ones_like(moving_img), fixed_img, transform,
                                                          sitk.sitkNearestNeighbor, 0.0)) > 0
        warped_n = sitk.Resample(moving_n, fixed_img, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        qa["similarity_after"] = image_similarity(sitk.GetArrayViewFromImage(fixed_n),
                                                  sitk.GetArrayViewFromImage(warped_n), fixed_mask)
    timings["total"] = time.perf_counter() - t_start
    prog(1.0, "done")

    report = {
        "mmreg_version": __version__,
        "method": method,
        "model": model,
        "model_card": reg_method.model_info(opts),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()},
        "device": str(torch_device),
        "threads": n_threads,
        "inputs": {
            "fixed": str(fixed) if not isinstance(fixed, sitk.Image) else "<image>",
            "moving": str(moving) if not isinstance(moving, sitk.Image) else "<image>",
            "fixed_size": list(fixed_img.GetSize()), "fixed_spacing_mm": list(fixed_img.GetSpacing()),
            "moving_size": list(moving_img.GetSize()), "moving_spacing_mm": list(moving_img.GetSpacing()),
            "fixed_normalisation": fixed_norm, "moving_normalisation": moving_norm,
        },
        "network_grid": {"size": list(grid.size), "spacing_mm": list(grid.spacing)},
        "affine": aff.as_dict() if aff is not None else None,
        "method_trace": reg_method.method_report(),
        "warnings": list(reg_method.method_warnings()),
        "quality": qa,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "conventions": "displacement on the fixed grid, LPS mm; fixed point x maps to moving point x + u(x)",
    }
    report["extra_images"] = sorted(extra_images)
    result = RegistrationResult(fixed_img, moving_img, displacement, affine_tx, warped, warped_lab, report,
                                extra_images)
    result.__dict__["transform"] = transform  # the one built above (cached_property's slot)
    return result


def evaluate(transform_path: str | os.PathLike, fixed_labels: ImageLike, moving_labels: ImageLike,
             label_interpolation: str = "linear") -> dict:
    """Score an existing transform file: warp ``moving_labels`` onto ``fixed_labels``' grid and compare.

    Returns Dice per label and mean, HD95 (mm) and, for displacement fields, Jacobian statistics.
    """
    from .transforms import read_transform
    fixed_lab = read_labels(fixed_labels, "Fixed label map")
    moving_lab = read_labels(moving_labels, "Moving label map")
    tx = read_transform(transform_path)
    warped = warp_labels(moving_lab, tx, fixed_lab, label_interpolation)
    out = {"transform": str(transform_path), "labels": _label_numbers(fixed_lab, warped)}
    field_img = transform_to_field(tx, fixed_lab)
    out["jacobian"] = jacobian_report(field_img)
    return out
