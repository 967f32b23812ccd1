"""Benchmark cases built from the shared data folder (see ``../shared/data/MANIFEST.md``).

A :class:`Case` is one directed registration problem: a fixed and a moving image, their label
maps, which label IDs to score, optionally a ground-truth displacement and a region in which to
score it. Builders:

* :func:`ixi_pairs` -- inter-subject IXI T1-T1 pairs (2 mm, native space) with DLMUSE labels.
* :func:`template_known_deformation` -- fixed = SPM avg152T1, moving = avg152T2 or PD warped by
  a known random smooth deformation; 4-class tissue labels (bg/GM/WM/CSF) from the OldSeg priors.
* :func:`ct_template_known_deformation` -- fixed = the scct_cormack CT template, moving =
  avg152T1 warped by a known deformation; same labels.
* :func:`ixi_vs_template` -- fixed = IXI012 T1 (+ DLMUSE), moving = avg152T2/PD with the
  Neuromorphometrics labels brought onto the template's 2 mm grid; scored on shared label IDs.
* :func:`spinal_cord_case` -- same-subject spinal-cord T2 (fixed) <- T1 (moving), 1 mm, manual cord
  segmentations (one label).
* :func:`abdomen_ct_mr_case` -- inter-subject abdominal MR (fixed) <- CT (moving), 3 mm,
  TotalSegmentator labels matched by structure name.
* :func:`build_cases` -- a list of cases from short specs (``"ixi:5"``, ``"template:T2:0"``, ...).

Direction of the known deformations (pinned by :func:`check_known_deformation`): a forward field
``d`` on the template grid defines T(y) = y + d(y) and the moving image is the template image
resampled through it, ``moving(y) = image(T(y))``. Registering fixed = ``image`` to this moving
image asks for u with ``fixed(x) = moving(x + u(x)) = image(T(x + u(x)))``, so
``x + u(x) = T^{-1}(x)``: the ground truth is the INVERSE of ``d`` (computed with
``sitk.InvertDisplacementField``), in the engine's convention (fixed grid, LPS mm, fixed point x
<-> moving point x + u(x)). Resampling the moving image through that inverse gives the template
image back up to interpolation; through ``d`` itself it does not.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..image import ImageLike, read_image, read_labels
from ..spatial import jacobian_determinant
from ..transforms import displacement_transform

#: Default folder of the shared data, relative to the repository root (``<repo>/../shared/data``).
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

IXI_DIR = "ixi10_T1_dlmuse"
SPM_DIR = "spm12_mni_T1T2PD_labels"
CT_DIR = "ichseg_CT_template_MNI"
SPINE_DIR = "sct_spinalcord_T1_T2_T2s_MT"
ABDOMEN_DIR = "totalseg_CT_MR_examples"

#: Tissue labels of the template cases.
TISSUE_LABELS = {1: "grey matter", 2: "white matter", 3: "CSF"}


class DataMissingError(InputError):
    """The shared data folder (or a file in it) is missing."""


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The shared data folder: ``path``, else ``$MMREG_DATA``, else ``<repo>/../shared/data``.

    Raises :class:`DataMissingError` (with what to do) when the folder does not exist.
    """
    chosen = Path(path) if path else Path(os.environ["MMREG_DATA"]) if os.environ.get("MMREG_DATA") else DEFAULT_DATA
    if not chosen.is_dir():
        raise DataMissingError(
            f"The benchmark data folder '{chosen}' does not exist. Point the environment variable MMREG_DATA "
            f"at the shared data folder (the one with MANIFEST.md, {IXI_DIR}/, {SPM_DIR}/, {CT_DIR}/), or pass "
            "--data DIR.")
    return chosen


def portable_path(path) -> str:
    """A path for reports that does not name this machine: ``$MMREG_DATA/...`` inside the data
    folder, ``~/...`` inside the home folder, else as given."""
    p = Path(path)
    try:
        return "$MMREG_DATA/" + p.resolve().relative_to(data_dir().resolve()).as_posix()
    except (ValueError, InputError):
        pass
    try:
        return "~/" + p.resolve().relative_to(Path.home().resolve()).as_posix()
    except ValueError:
        return str(p)


def _file(root: Path, *parts: str) -> Path:
    path = root.joinpath(*parts)
    if not path.exists():
        raise DataMissingError(f"Benchmark data file '{path}' is missing; check the data folder ({root}) against "
                               "its MANIFEST.md.")
    return path


# ----------------------------------------------------------------------------- the case type


@dataclass
class Case:
    """One directed registration problem of the benchmark.

    ``fixed`` / ``moving``: image paths or SimpleITK images. ``fixed_labels`` /
    ``moving_labels``: label maps on their image's grid (optional). ``mono_modal``: both images
    have the same contrast (chooses the peers' metric: CC for ANTs on mono-modal pairs, MI
    otherwise). ``label_names``: label ID -> structure name, where known. ``label_ids``: the labels to
    score; None means the IDs present in both label maps. ``true_displacement``: ground truth as a
    vector image on the fixed grid (LPS mm, resampling convention: fixed point x <-> moving point
    x + u(x)), or None. ``fixed_mask``: where the endpoint error is scored (default: fixed labels
    > 0). ``*_modality``: passed to :func:`mmreg.intensity.normalize_intensity`. ``info``:
    numbers recorded when the case was built (e.g. the deformation checks).
    """

    name: str
    group: str
    fixed: ImageLike
    moving: ImageLike
    fixed_labels: ImageLike | None = None
    moving_labels: ImageLike | None = None
    label_ids: list | None = None
    mono_modal: bool = False
    label_names: dict | None = None
    true_displacement: sitk.Image | None = None
    fixed_mask: ImageLike | None = None
    fixed_modality: str = "auto"
    moving_modality: str = "auto"
    notes: str = ""
    info: dict = field(default_factory=dict)

    # -- loading (SimpleITK images are returned validated, never modified)
    def fixed_image(self) -> sitk.Image:
        """The fixed image, read and validated."""
        return read_image(self.fixed, f"{self.name}: fixed image")

    def moving_image(self) -> sitk.Image:
        """The moving image."""
        return read_image(self.moving, f"{self.name}: moving image")

    def fixed_label_map(self) -> sitk.Image | None:
        """The fixed label map, or None."""
        return None if self.fixed_labels is None else read_labels(self.fixed_labels, f"{self.name}: fixed labels")

    def moving_label_map(self) -> sitk.Image | None:
        """The moving label map (on the moving image grid), or None."""
        return None if self.moving_labels is None else read_labels(self.moving_labels, f"{self.name}: moving labels")

    def scored_labels(self) -> list | None:
        """Label IDs to score: ``label_ids``, else the non-zero IDs present in both label maps."""
        if self.label_ids is not None:
            return [int(v) for v in self.label_ids]
        f, m = self.fixed_label_map(), self.moving_label_map()
        if f is None or m is None:
            return None
        return _shared_ids(f, m)

    def evaluation_mask(self) -> sitk.Image | None:
        """Region (fixed grid, nonzero = in) for the endpoint error: ``fixed_mask`` or fixed labels > 0."""
        if self.fixed_mask is not None:
            return read_labels(self.fixed_mask, f"{self.name}: fixed mask") > 0
        f = self.fixed_label_map()
        return None if f is None else f > 0

    def key(self) -> str:
        """A short content hash of the fixed and moving images (pixels and geometry), for caches."""
        h = hashlib.sha1()
        for img in (self.fixed_image(), self.moving_image()):
            h.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(img)).tobytes())
            h.update(repr((img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """JSON-friendly description (paths relative to the data folder, images as '<image>')."""
        def what(x):
            return None if x is None else ("<image>" if isinstance(x, sitk.Image) else portable_path(x))
        return {"name": self.name, "group": self.group, "fixed": what(self.fixed), "moving": what(self.moving),
                "fixed_labels": what(self.fixed_labels), "moving_labels": what(self.moving_labels),
                "label_ids": self.label_ids, "label_names": self.label_names, "mono_modal": self.mono_modal,
                "has_ground_truth": self.true_displacement is not None,
                "fixed_modality": self.fixed_modality, "moving_modality": self.moving_modality,
                "notes": self.notes, "info": self.info}


def _shared_ids(a: sitk.Image, b: sitk.Image) -> list:
    ua = set(np.unique(sitk.GetArrayViewFromImage(a)).tolist())
    ub = set(np.unique(sitk.GetArrayViewFromImage(b)).tolist())
    return sorted(int(v) for v in (ua & ub) if v != 0)


# ----------------------------------------------------------------------------- IXI pairs


def ixi_subjects(root: str | os.PathLike | None = None) -> list:
    """(subject id, T1 path, DLMUSE path) of the IXI subjects, sorted by id."""
    base = data_dir(root) / IXI_DIR
    images = sorted((base / "nifti").glob("IXI*-T1_ds.nii.gz"))
    if not images:
        raise DataMissingError(f"No IXI T1 images in '{base / 'nifti'}'; check the data folder.")
    out = []
    for img in images:
        lab = _file(base, "dlmuse", img.name.replace(".nii.gz", "_DLMUSE.nii.gz"))
        out.append((img.name.split("-")[0], img, lab))
    return out


def ixi_pair_order(n_subjects: int) -> list:
    """All directed pairs (fixed index, moving index) in benchmark order.

    First disjoint neighbours (0<-1, 2<-3, ...), then their reverses (1<-0, 3<-2, ...), then every
    other directed pair in lexicographic order: the first k pairs use as many distinct subjects as
    possible.
    """
    first = [(i, i + 1) for i in range(0, n_subjects - 1, 2)]
    second = [(j, i) for i, j in first]
    rest = [p for p in itertools.permutations(range(n_subjects), 2) if p not in first and p not in second]
    return first + second + rest


def ixi_pairs(n: int = 5, root: str | os.PathLike | None = None) -> list:
    """The first ``n`` directed inter-subject IXI T1-T1 pairs (012<-013, 014<-015, 033<-034, ...).

    Images are 2 mm native-space T1 (not aligned to each other); labels are the DLMUSE
    parcellations, scored on the IDs present in both subjects.
    """
    subjects = ixi_subjects(root)
    order = ixi_pair_order(len(subjects))
    if not 1 <= n <= len(order):
        raise InputError(f"ixi_pairs: n must be 1..{len(order)}, got {n}.")
    cases = []
    for fi, mi in order[:n]:
        (fid, fimg, flab), (mid, mimg, mlab) = subjects[fi], subjects[mi]
        cases.append(Case(name=f"{fid}<-{mid}", group="IXI T1-T1", fixed=fimg, moving=mimg, fixed_labels=flab,
                          moving_labels=mlab, fixed_modality="MR", moving_modality="MR", mono_modal=True,
                          notes="inter-subject, DLMUSE labels present in both"))
    return cases


# ----------------------------------------------------------------------------- template labels


def tissue_label_map(root: str | os.PathLike | None = None) -> sitk.Image:
    """4-class tissue map (0 bg, 1 GM, 2 WM, 3 CSF) on the avg152 grid from the SPM OldSeg priors.

    Argmax over (background = 1 - (grey + white + csf), grey, white, csf): a voxel is tissue where
    one tissue prior beats both the other tissues and the remaining (non-brain) probability.
    """
    base = data_dir(root) / SPM_DIR
    priors = [sitk.ReadImage(str(_file(base, f"toolbox_OldSeg_{n}.nii.gz")), sitk.sitkFloat32)
              for n in ("grey", "white", "csf")]
    arrs = np.stack([sitk.GetArrayFromImage(p) for p in priors])
    background = 1.0 - arrs.sum(0)
    labels = np.argmax(np.concatenate([background[None], arrs]), axis=0).astype(np.uint8)
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(priors[0])
    return out


def neuromorphometrics_on(reference: sitk.Image, root: str | os.PathLike | None = None) -> sitk.Image:
    """SPM's Neuromorphometrics labels (1.5 mm grid) resampled onto ``reference``'s grid.

    Nearest neighbour in physical space (both are in MNI world space, on different grids).
    Licence of the labels: CC BY-NC (see the data MANIFEST).
    """
    lab = sitk.ReadImage(str(_file(data_dir(root) / SPM_DIR, "tpm_labels_Neuromorphometrics.nii.gz")))
    ref = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    ref.CopyInformation(reference)
    return sitk.Resample(lab, ref, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor, 0,
                         lab.GetPixelID())


# ----------------------------------------------------------------------------- known deformations


@dataclass
class KnownDeformation:
    """A generated deformation on a reference grid.

    ``forward``: d, with T(y) = y + d(y); the moving image is ``image(T(y))``. ``inverse``: the
    ground truth u of a registration of ``image`` (fixed) to the moving image, x + u(x) = T^{-1}(x).
    Both float64 vector images, LPS mm. ``info``: generation parameters and checks.
    """

    forward: sitk.Image
    inverse: sitk.Image
    info: dict


def random_smooth_deformation(reference: sitk.Image, seed: int, max_displacement_mm: float = 8.0,
                              control_spacing_mm: float = 40.0, min_jacobian: float = 0.3,
                              mask: sitk.Image | None = None) -> KnownDeformation:
    """A random smooth deformation on ``reference``'s grid, reproducible from ``seed``.

    Standard-normal coefficients on a cubic B-spline control grid of about
    ``control_spacing_mm`` spacing over the reference's extent, scaled so that the largest
    displacement (inside ``mask`` if given) is ``max_displacement_mm``. If the Jacobian
    determinant of T(y) = y + d(y) drops below ``min_jacobian`` anywhere on the grid, the field is
    scaled down by 0.85 until it does not (recorded in ``info``). The inverse is computed with
    ``sitk.InvertDisplacementField`` and its residual ``|u(x) + d(x + u(x))|`` (inside ``mask``,
    else away from the border) is recorded.
    """
    rng = np.random.default_rng(seed)
    ref = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    ref.CopyInformation(reference)
    extent = np.array(reference.GetSize()) * np.array(reference.GetSpacing())
    mesh = [max(1, int(round(e / control_spacing_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(ref, mesh, 3)
    coeffs = rng.standard_normal(len(bspline.GetParameters()))
    bspline.SetParameters(coeffs.tolist())
    flt = sitk.TransformToDisplacementFieldFilter()
    flt.SetReferenceImage(ref)
    flt.SetOutputPixelType(sitk.sitkVectorFloat64)
    arr = sitk.GetArrayFromImage(flt.Execute(bspline))  # (z, y, x, 3)
    norm = np.linalg.norm(arr, axis=-1)
    region = sitk.GetArrayViewFromImage(mask) > 0 if mask is not None else np.ones(norm.shape, bool)
    arr *= max_displacement_mm / max(float(norm[region].max()), 1e-12)
    scale = 1.0
    for _ in range(30):
        forward = _vector_image(arr * scale, reference)
        jac = jacobian_determinant(forward)
        if jac.min() >= min_jacobian:
            break
        scale *= 0.85
    else:  # pragma: no cover - 30 reductions always suffice for smooth fields
        raise RuntimeError("Could not generate a deformation with a positive Jacobian.")
    inverse = sitk.InvertDisplacementField(sitk.Cast(forward, sitk.sitkVectorFloat64),
                                           maximumNumberOfIterations=100, maxErrorToleranceThreshold=0.01,
                                           meanErrorToleranceThreshold=0.0001, enforceBoundaryCondition=False)
    inverse = sitk.Cast(inverse, sitk.sitkVectorFloat64)
    # Residual of the inverse: u(x) + d(x + u(x)) should be 0.
    d_at = sitk.Resample(forward, ref, displacement_transform(inverse), sitk.sitkLinear, 0.0,
                         sitk.sitkVectorFloat64, True)
    resid = np.linalg.norm(sitk.GetArrayFromImage(inverse) + sitk.GetArrayFromImage(d_at), axis=-1)
    if mask is not None:
        inner = region
    else:  # away from the border, where x + u(x) may leave the grid
        inner = np.zeros(resid.shape, bool)
        inner[3:-3, 3:-3, 3:-3] = True
    fnorm = np.linalg.norm(arr * scale, axis=-1)
    info = {
        "seed": int(seed), "control_mesh": mesh, "control_spacing_mm": float(control_spacing_mm),
        "max_displacement_mm": float(fnorm[region].max()), "mean_displacement_mm_in_mask": float(fnorm[region].mean()),
        "scale_reductions": float(scale), "forward_jacobian_min": float(jac.min()),
        "forward_jacobian_max": float(jac.max()),
        "inverse_residual_mm_mean": float(resid[inner].mean()), "inverse_residual_mm_max": float(resid[inner].max()),
    }
    return KnownDeformation(forward, inverse, info)


def _vector_image(arr: np.ndarray, reference: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.float64), isVector=True)
    img.CopyInformation(reference)
    return img


def apply_known_deformation(image: sitk.Image, deformation: KnownDeformation, labels: bool = False) -> sitk.Image:
    """``image(T(y))`` on the image's own grid: linear for images, nearest for label maps."""
    tx = displacement_transform(deformation.forward)
    if labels:
        return sitk.Resample(image, image, tx, sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    return sitk.Resample(image, image, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def check_known_deformation(image: sitk.Image, moving: sitk.Image, deformation: KnownDeformation,
                            mask: sitk.Image | None = None) -> dict:
    """Pin the direction of a known deformation with images.

    Mean absolute intensity difference to ``image`` (inside ``mask``) of: the moving image itself,
    the moving image resampled through the ground truth (``inverse``; must be small, interpolation
    only) and through the wrong field (``forward``; must be worse). Also ``direction_ok``.
    """
    region = sitk.GetArrayViewFromImage(mask) > 0 if mask is not None else None
    ref = sitk.GetArrayFromImage(image)

    def mad(img):
        a = np.abs(sitk.GetArrayFromImage(img) - ref)
        return float(a[region].mean() if region is not None else a.mean())

    back = sitk.Resample(moving, image, displacement_transform(deformation.inverse), sitk.sitkLinear, 0.0,
                         sitk.sitkFloat32)
    wrong = sitk.Resample(moving, image, displacement_transform(deformation.forward), sitk.sitkLinear, 0.0,
                          sitk.sitkFloat32)
    # Interpolation floor: the image pushed through T and back along the true inverse (two linear resamplings).
    out = {"mad_moving": mad(moving), "mad_through_truth": mad(back), "mad_through_forward": mad(wrong)}
    out["direction_ok"] = bool(out["mad_through_truth"] < 0.5 * out["mad_moving"]
                               and out["mad_through_truth"] < 0.5 * out["mad_through_forward"])
    return out


def _known_case(name: str, group: str, fixed: sitk.Image, moving_source: sitk.Image, seed: int,
                root, fixed_modality: str, moving_modality: str, notes: str,
                max_displacement_mm: float, control_spacing_mm: float) -> Case:
    labels = tissue_label_map(root)
    brain = labels > 0
    deformation = random_smooth_deformation(fixed, seed, max_displacement_mm, control_spacing_mm, mask=brain)
    moving = apply_known_deformation(moving_source, deformation)
    moving_labels = apply_known_deformation(labels, deformation, labels=True)
    check = check_known_deformation(moving_source, moving, deformation, brain)
    if not check["direction_ok"]:  # pragma: no cover - a wrong sign would be a bug here
        raise RuntimeError(f"Known-deformation direction check failed for {name}: {check}")
    info = dict(deformation.info, direction_check=check)
    return Case(name=name, group=group, fixed=fixed, moving=moving, fixed_labels=labels,
                moving_labels=moving_labels, label_ids=sorted(TISSUE_LABELS), true_displacement=deformation.inverse,
                fixed_mask=brain, fixed_modality=fixed_modality, moving_modality=moving_modality, notes=notes,
                info=info)


def template_known_deformation(moving_modality: str = "T2", seed: int = 0, root: str | os.PathLike | None = None,
                               max_displacement_mm: float = 8.0, control_spacing_mm: float = 40.0) -> Case:
    """Fixed = avg152T1; moving = avg152T2 or PD warped by a known deformation (``seed``).

    Labels: :func:`tissue_label_map` (fixed) and the same map warped by the same deformation
    (nearest, moving). Ground truth: the inverse of the generating field (see module doc), scored
    inside the fixed tissue mask.
    """
    if moving_modality not in ("T2", "PD"):
        raise InputError(f"template_known_deformation: moving_modality must be 'T2' or 'PD', got '{moving_modality}'.")
    base = data_dir(root) / SPM_DIR
    fixed = sitk.ReadImage(str(_file(base, "canonical_avg152T1.nii.gz")), sitk.sitkFloat32)
    source = sitk.ReadImage(str(_file(base, f"canonical_avg152{moving_modality}.nii.gz")), sitk.sitkFloat32)
    return _known_case(f"avg152T1<-{moving_modality}~s{seed}", f"template T1<-{moving_modality} (known)", fixed,
                       source, seed, root, "MR", "MR",
                       f"avg152{moving_modality} warped by a random smooth deformation (seed {seed}, "
                       f"max {max_displacement_mm:g} mm), tissue labels", max_displacement_mm, control_spacing_mm)


def ct_template_known_deformation(seed: int = 0, root: str | os.PathLike | None = None,
                                  max_displacement_mm: float = 8.0, control_spacing_mm: float = 40.0) -> Case:
    """Fixed = scct_cormack CT template (avg152 grid); moving = avg152T1 warped by a known deformation."""
    fixed = sitk.ReadImage(str(_file(data_dir(root) / CT_DIR, "scct_cormack.nii.gz")), sitk.sitkFloat32)
    source = sitk.ReadImage(str(_file(data_dir(root) / SPM_DIR, "canonical_avg152T1.nii.gz")), sitk.sitkFloat32)
    # scct_cormack is not in HU (Cormack's compressed scale, 0..~3800): percentile normalisation.
    return _known_case(f"CT<-avg152T1~s{seed}", "template CT<-T1 (known)", fixed, source, seed, root, "MR", "MR",
                       f"CT template (Cormack units) fixed; avg152T1 warped by a random smooth deformation "
                       f"(seed {seed}, max {max_displacement_mm:g} mm), tissue labels", max_displacement_mm,
                       control_spacing_mm)


def ixi_vs_template(modality: str = "T2", subject: str = "IXI012", root: str | os.PathLike | None = None) -> Case:
    """Fixed = an IXI T1 (+ DLMUSE); moving = avg152T2/PD (+ Neuromorphometrics on its 2 mm grid), or
    avg152T1: the same inter-subject pair in one contrast (a mono-modal reference for the T2/PD cases).

    Scored on the label IDs present in both maps (the MUSE/Neuromorphometrics numbering is shared).
    """
    if modality not in ("T1", "T2", "PD"):
        raise InputError(f"ixi_vs_template: modality must be 'T1', 'T2' or 'PD', got '{modality}'.")
    subjects = {sid: (img, lab) for sid, img, lab in ixi_subjects(root)}
    if subject not in subjects:
        raise InputError(f"ixi_vs_template: unknown subject '{subject}'; known: {', '.join(subjects)}.")
    fimg, flab = subjects[subject]
    moving = sitk.ReadImage(str(_file(data_dir(root) / SPM_DIR, f"canonical_avg152{modality}.nii.gz")),
                            sitk.sitkFloat32)
    moving_labels = neuromorphometrics_on(moving, root)
    ids = _shared_ids(read_labels(flab), moving_labels)
    return Case(name=f"{subject}<-avg152{modality}", group=f"IXI T1<-template {modality}", fixed=fimg, moving=moving,
                fixed_labels=flab, moving_labels=moving_labels, label_ids=ids, fixed_modality="MR",
                moving_modality="MR", mono_modal=modality == "T1",
                notes=f"inter-subject {'mono' if modality == 'T1' else 'multi'}-modal; Neuromorphometrics labels (CC BY-NC) "
                      f"nearest-resampled onto the avg152 grid; {len(ids)} shared label IDs")


def spinal_cord_case(root: str | os.PathLike | None = None) -> Case:
    """Same-subject spinal cord: fixed = T2 (60x55x52, 1 mm), moving = T1 (42x76x77, 1 mm), both with the
    manual cord segmentation (label 1). Different fields of view and contrasts, same session: rigid
    drift plus small deformations. The cord is ~2 % of the voxels, so Dice moves in coarse steps.
    """
    base = data_dir(root) / SPINE_DIR
    return Case(name="spine T2<-T1", group="spinal cord T2<-T1", fixed=_file(base, "t2", "t2.nii.gz"),
                moving=_file(base, "t1", "t1w.nii.gz"), fixed_labels=_file(base, "t2", "t2_seg-manual.nii.gz"),
                moving_labels=_file(base, "t1", "t1w_seg-manual.nii.gz"), label_ids=[1], label_names={1: "spinal cord"},
                fixed_modality="MR", moving_modality="MR",
                notes="same subject and session (SCT errsm_30), manual cord segmentations")


def abdomen_ct_mr_case(root: str | os.PathLike | None = None, min_voxels: int = 50) -> Case:
    """Inter-subject abdomen: fixed = MR (117x91x20, 3 mm), moving = CT (122x101x30 crop, 3 mm).

    The MR covers 60 mm, so it is the fixed image (labels are scored on the fixed grid) and the
    CT crop on which its segmentation is defined is the moving image. The labels are
    TotalSegmentator predictions (tasks ``total`` for CT and ``total_mr`` for MR, different IDs):
    both maps are renumbered 1..K over the structure names present in both with at least
    ``min_voxels`` voxels on each side (the order of the CT class map), everything else becomes 0.
    The two scans are in unrelated scanner coordinates, so the affine start does the gross alignment.
    """
    import json  # noqa: PLC0415

    base = data_dir(root) / ABDOMEN_DIR
    class_map = json.loads(_file(base, "class_map_total_and_total_mr.json").read_text())
    ct_lab = read_labels(_file(base, "example_seg.nii.gz"))
    mr_lab = read_labels(_file(base, "example_seg_mr.nii.gz"))

    def counts(img, task):
        ids, n = np.unique(sitk.GetArrayViewFromImage(img), return_counts=True)
        return {class_map[task][str(int(i))]: (int(i), int(c)) for i, c in zip(ids, n)
                if i and str(int(i)) in class_map[task]}

    ct, mr = counts(ct_lab, "total"), counts(mr_lab, "total_mr")
    names = [n for n in ct if n in mr and ct[n][1] >= min_voxels and mr[n][1] >= min_voxels]

    def renumber(img, table):
        lut = np.zeros(int(sitk.GetArrayViewFromImage(img).max()) + 1, np.uint8)
        for new, name in enumerate(names, start=1):
            lut[table[name][0]] = new
        out = sitk.GetImageFromArray(lut[sitk.GetArrayViewFromImage(img)])
        out.CopyInformation(img)
        return out

    return Case(name="abdomen MR<-CT", group="abdomen MR<-CT", fixed=_file(base, "example_mr_sm.nii.gz"),
                moving=_file(base, "example_ct_sm.nii.gz"), fixed_labels=renumber(mr_lab, mr),
                moving_labels=renumber(ct_lab, ct), label_ids=list(range(1, len(names) + 1)),
                label_names=dict(enumerate(names, start=1)), fixed_modality="MR", moving_modality="CT",
                notes=f"inter-subject CT and MR (TotalSegmentator examples), {len(names)} structures matched by name "
                      "(model-predicted labels, not manual)")


# ----------------------------------------------------------------------------- specs

#: Named case sets for :func:`build_cases`.
CASE_SETS = {
    "quick": ["ixi:1", "template:T2:0", "spine"],
    "full": ["ixi:5", "template:T2:0", "template:PD:1", "ct:2", "ixi-template:T2", "ixi-template:PD", "spine",
             "abdomen"],
}

SPEC_HELP = ("case specs: ixi[:N] (first N IXI T1-T1 pairs, default 5), template:T2|PD[:SEED] (known deformation), "
             "ct[:SEED] (CT template <- warped avg152T1), ixi-template:T1|T2|PD[:SUBJECT] (IXI T1, default IXI012, <- avg152T1/T2/PD), spine (spinal cord "
             "T2 <- T1), abdomen (abdominal MR <- CT), swap:SPEC (the same pairs the other way round), or a set: "
             + ", ".join(f"{k} = {' '.join(v)}" for k, v in CASE_SETS.items()))


def swapped_case(case: Case) -> Case:
    """The same pair the other way round: the moving image (and labels) fixed, the fixed one moving.

    For the methods that register either direction (``disentangled``: T2 fixed, T1 moving). No ground-truth
    displacement (the original's lies on the other grid); scored by the labels only."""
    return Case(name=f"{case.name}~swapped", group=f"{case.group} (swapped)", fixed=case.moving, moving=case.fixed,
                fixed_labels=case.moving_labels, moving_labels=case.fixed_labels, label_ids=case.label_ids,
                mono_modal=case.mono_modal, label_names=case.label_names, true_displacement=None, fixed_mask=None,
                fixed_modality=case.moving_modality, moving_modality=case.fixed_modality,
                notes=f"swapped: {case.notes}", info=dict(case.info, swapped=True))


def build_cases(specs, root: str | os.PathLike | None = None) -> list:
    """Cases from specs (see :data:`SPEC_HELP`); a spec string may hold several, comma or space separated."""
    if isinstance(specs, str):
        specs = [specs]
    tokens = [t for s in specs for t in re.split(r"[,\s]+", s) if t]
    out = []
    for tok in tokens:
        if tok in CASE_SETS:
            out.extend(build_cases(CASE_SETS[tok], root))
            continue
        if tok.lower().startswith("swap:") and len(tok) > 5:
            out.extend(swapped_case(c) for c in build_cases(tok[5:], root))
            continue
        parts = tok.split(":")
        kind = parts[0].lower()
        try:
            if kind == "ixi" and len(parts) <= 2:
                out.extend(ixi_pairs(int(parts[1]) if len(parts) > 1 else 5, root))
            elif kind == "template" and 2 <= len(parts) <= 3:
                out.append(template_known_deformation(parts[1].upper(), int(parts[2]) if len(parts) > 2 else 0, root))
            elif kind == "ct" and len(parts) <= 2:
                out.append(ct_template_known_deformation(int(parts[1]) if len(parts) > 1 else 0, root))
            elif kind == "ixi-template" and 2 <= len(parts) <= 3:
                out.append(ixi_vs_template(parts[1].upper(), parts[2].upper() if len(parts) > 2 else "IXI012", root=root))
            elif kind == "spine" and len(parts) == 1:
                out.append(spinal_cord_case(root))
            elif kind == "abdomen" and len(parts) == 1:
                out.append(abdomen_ct_mr_case(root))
            else:
                raise ValueError
        except ValueError as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"Bad case spec '{tok}'. {SPEC_HELP}") from None
    names = [c.name for c in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise InputError(f"Case(s) listed twice: {', '.join(sorted(dupes))}.")
    return out
