"""Registration-driven label propagation: one annotated image's labels onto several new images.

A clinician with one annotated scan (the *atlas*: an image and its label map) and several new scans
of the same kind registers the atlas to each new scan (each new scan is the FIXED image, the atlas
the MOVING one) and warps the atlas labels through the result: a label map on each new scan's grid.
These propagated labels are also the extra training labels of the joint registration-segmentation
workflow (:mod:`mmreg.segmentation`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from .errors import InputError
from .image import ImageLike, read_image, read_labels, write_image
from .progress import Progress, ProgressCallback


@dataclass
class PropagatedLabels:
    """One target of :func:`propagate_labels`: ``target`` (what was given: a path or "<image>"),
    ``labels`` (the atlas labels on the target's grid), ``result`` (the
    :class:`~mmreg.pipeline.RegistrationResult` target <- atlas), ``seconds`` (wall time)."""

    target: str
    labels: sitk.Image
    result: object
    seconds: float
    report: dict = field(default_factory=dict)


def propagate_labels(atlas_image: ImageLike, atlas_labels: ImageLike, targets, method: str = "multiscale", *,
                     model: str | None = None, progress: ProgressCallback | None = None,
                     label_interpolation: str = "linear", **register_options) -> list:
    """Register the atlas to every target and warp its labels; returns one :class:`PropagatedLabels` per target.

    ``atlas_image`` / ``atlas_labels``: the annotated image and its label map (same grid).
    ``targets``: images (paths or SimpleITK images) that receive the labels; each is the fixed image
    of its registration, so its labels lie on its own grid (LPS physical space, as read).
    ``method`` / ``model`` / ``register_options``: as :func:`mmreg.register` (e.g. ``refinement_steps``,
    ``device``, ``threads``, ``affine``). ``progress``: ``(fraction, message)`` over all targets;
    raising :class:`~mmreg.errors.CancelledError` (or returning False) stops between or inside
    registrations; nothing given is modified.
    """
    import time  # noqa: PLC0415

    from .pipeline import register  # noqa: PLC0415
    targets = list(targets)
    if not targets:
        raise InputError("propagate_labels: no target images given; pass one or more images to receive the labels.")
    atlas = read_image(atlas_image, "Atlas image")
    labels = read_labels(atlas_labels, "Atlas label map")
    prog = Progress(progress)
    out = []
    for k, target in enumerate(targets):
        name = str(target) if not isinstance(target, sitk.Image) else f"<image {k + 1}>"
        sub = prog.sub(k / len(targets), (k + 1) / len(targets))
        sub(0.0, f"target {k + 1}/{len(targets)}: registering")
        t0 = time.perf_counter()
        result = register(target, atlas, method=method, model=model, moving_labels=labels,
                          label_interpolation=label_interpolation, progress=sub, **register_options)
        out.append(PropagatedLabels(name, result.warped_labels, result, time.perf_counter() - t0,
                                    {"method": method, "timings_s": result.report["timings_s"],
                                     "folding_percent": result.report["quality"]["deformable"]["folding_percent"]}))
    prog(1.0, f"propagated to {len(targets)} image(s)")
    return out


def propagated_label_paths(targets, output_dir: str | os.PathLike, suffix: str = "_labels.nii.gz") -> list:
    """Output paths ``<output_dir>/<target file stem><suffix>`` for target files (``target_k`` for images)."""
    out_dir = Path(output_dir)
    paths = []
    for k, target in enumerate(targets):
        if isinstance(target, sitk.Image):
            stem = f"target_{k + 1}"
        else:
            stem = Path(target).name
            for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"):
                if stem.endswith(ext):
                    stem = stem[: -len(ext)]
                    break
        paths.append(out_dir / f"{stem}{suffix}")
    if len({str(p) for p in paths}) != len(paths):
        raise InputError("Two targets have the same file name; their propagated labels would overwrite each other. "
                         "Rename one of them or propagate them separately.")
    return paths


def write_propagated(results: list, paths: list) -> list:
    """Write each result's labels to its path (from :func:`propagated_label_paths`); returns the paths."""
    return [write_image(r.labels, p) for r, p in zip(results, paths)]
