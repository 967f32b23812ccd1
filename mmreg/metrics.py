"""Registration quality metrics (numpy / SimpleITK, physical units).

Inputs are numpy arrays or SimpleITK images. Two images compared with each other must share one
grid (same size, and for SimpleITK images the same origin, spacing and direction): resample the
warped image onto the fixed image's grid first. Numpy arrays are in numpy axis order (z, y, x for
3-D); a ``spacing`` given for numpy arrays is in the same axis order, in millimetres. For
SimpleITK images the spacing is read from the image (SimpleITK's (x, y, z) order is reversed
internally to match the array).

Label maps are integer arrays (float arrays holding whole numbers are accepted); 0 is background.
Bad arguments raise :class:`mmreg.errors.InputError` naming the problem and the fix.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError

__all__ = [
    "dice_per_label",
    "mean_dice",
    "surface_distances",
    "hd95_per_label",
    "label_overlap_report",
    "folding_percent",
    "image_similarity",
]

ArrayOrImage = Union[np.ndarray, sitk.Image]


# ----------------------------------------------------------------------------- helpers


def _grid_of(img: sitk.Image):
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _same_grid(x: sitk.Image, y: sitk.Image, names) -> None:
    sx, spx, ox, dx = _grid_of(x)
    sy, spy, oy, dy = _grid_of(y)
    ok = (
        sx == sy
        and np.allclose(spx, spy, rtol=1e-4, atol=1e-5)
        and np.allclose(ox, oy, rtol=0, atol=1e-3 * max(1.0, min(spx)))
        and np.allclose(dx, dy, atol=1e-4)
    )
    if not ok:
        raise InputError(
            f"{names[0]} and {names[1]} are not on the same grid (size {sx} vs {sy}, spacing {spx} vs {spy}, "
            f"origin {ox} vs {oy}); resample {names[1]} onto {names[0]}'s grid first "
            "(e.g. sitk.Resample(moving, fixed, transform, sitk.sitkNearestNeighbor) for labels)."
        )


def _to_array(x, name: str) -> Tuple[np.ndarray, Optional[Tuple[float, ...]]]:
    """Return (array in numpy order, spacing in numpy order or None)."""
    if isinstance(x, sitk.Image):
        if x.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{name} must be a scalar image, got {x.GetNumberOfComponentsPerPixel()} components per pixel.")
        return sitk.GetArrayViewFromImage(x), tuple(float(s) for s in reversed(x.GetSpacing()))
    if isinstance(x, np.ndarray):
        return x, None
    try:  # torch tensors and array-likes
        arr = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    except Exception:  # pragma: no cover - defensive
        arr = None
    if arr is None or arr.dtype == object:
        raise InputError(f"{name} must be a numpy array or a SimpleITK image, got {type(x).__name__}.")
    return arr, None


def _pair_arrays(a, b, names=("a", "b")):
    if isinstance(a, sitk.Image) and isinstance(b, sitk.Image):
        _same_grid(a, b, names)
    aa, spa = _to_array(a, names[0])
    bb, spb = _to_array(b, names[1])
    if aa.shape != bb.shape:
        raise InputError(
            f"{names[0]} and {names[1]} must have the same shape, got {aa.shape} and {bb.shape}; "
            f"resample {names[1]} onto {names[0]}'s grid first."
        )
    if aa.ndim not in (2, 3):
        raise InputError(f"{names[0]} must be 2-D or 3-D, got {aa.ndim} dimensions (shape {aa.shape}).")
    return aa, bb, (spa if spa is not None else spb)


def _as_labels(arr: np.ndarray, name: str) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        return np.asarray(arr, dtype=np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError(
                f"{name} is not a label map (it holds non-integer values); pass an integer label map, "
                "resampled with nearest-neighbour or per-label interpolation."
            )
        return np.asarray(arr, dtype=np.int64)
    raise InputError(f"{name} must hold integer labels, got dtype {arr.dtype}.")


def _mask_array(mask, shape, name="mask") -> Optional[np.ndarray]:
    if mask is None:
        return None
    m, _ = _to_array(mask, name)
    if m.shape != tuple(shape):
        raise InputError(f"{name} must have the image's shape {tuple(shape)}, got {m.shape}; resample it onto the image grid.")
    m = np.asarray(m) != 0
    if not m.any():
        raise InputError(f"{name} is empty (no non-zero voxel); pass mask=None or a mask that covers the region to score.")
    return m


def _spacing_for(spacing, from_image, ndim: int) -> np.ndarray:
    if spacing is None:
        spacing = from_image if from_image is not None else (1.0,) * ndim
    sp = np.asarray(spacing, dtype=float).reshape(-1)
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.size != ndim or not np.all(sp > 0):
        raise InputError(
            f"spacing must be {ndim} positive values in mm in numpy axis order (z, y, x), got {spacing!r}."
        )
    return sp


def _default_labels(a: np.ndarray, b: np.ndarray) -> list:
    return sorted(int(v) for v in np.union1d(np.unique(a), np.unique(b)) if v != 0)


def _check_labels(labels) -> list:
    try:
        out = [int(l) for l in labels]
    except Exception:
        raise InputError(f"labels must be an iterable of integers, got {labels!r}.") from None
    return out


# ----------------------------------------------------------------------------- Dice


def dice_per_label(a: ArrayOrImage, b: ArrayOrImage, labels: Optional[Iterable[int]] = None) -> Dict[int, float]:
    """Dice overlap 2|A∩B| / (|A|+|B|) per label of two label maps on the same grid.

    ``labels`` defaults to every non-zero label that occurs in ``a`` or ``b`` (the union); a label
    present in only one map scores 0.0. A label absent from both maps is not scored (left out of
    the result), also when it is listed explicitly. Returns ``{label: dice}`` in label order.
    """
    aa, bb, _ = _pair_arrays(a, b)
    aa = _as_labels(aa, "a").ravel()
    bb = _as_labels(bb, "b").ravel()
    labels = _default_labels(aa, bb) if labels is None else _check_labels(labels)
    if not labels:
        return {}
    uniq, inv = np.unique(np.concatenate([aa, bb]), return_inverse=True)
    inv = inv.ravel()
    n = aa.size
    ia, ib = inv[:n], inv[n:]
    k = uniq.size
    cnt_a = np.bincount(ia, minlength=k)
    cnt_b = np.bincount(ib, minlength=k)
    inter = np.bincount(ia[ia == ib], minlength=k)
    pos = {int(v): i for i, v in enumerate(uniq)}
    out: Dict[int, float] = {}
    for lab in labels:
        i = pos.get(lab)
        if i is None:
            continue
        denom = cnt_a[i] + cnt_b[i]
        if denom == 0:
            continue
        out[lab] = float(2.0 * inter[i] / denom)
    return out


def mean_dice(a: ArrayOrImage, b: ArrayOrImage, labels: Optional[Iterable[int]] = None) -> float:
    """Unweighted mean of :func:`dice_per_label` over the scored labels (NaN when none is scored)."""
    d = dice_per_label(a, b, labels)
    return float(np.mean(list(d.values()))) if d else float("nan")


# ----------------------------------------------------------------------------- surface distances

_BBOX_MAX_LABEL = 1_000_000


def _surface_distances_masks(ma: np.ndarray, mb: np.ndarray, sp: np.ndarray) -> Tuple[float, float]:
    """(hd95, asd) in mm between two non-empty boolean masks (already cropped)."""
    struct = ndimage.generate_binary_structure(ma.ndim, 1)
    sa = ma & ~ndimage.binary_erosion(ma, structure=struct, border_value=0)
    sb = mb & ~ndimage.binary_erosion(mb, structure=struct, border_value=0)
    dt_b = ndimage.distance_transform_edt(~sb, sampling=sp)
    dt_a = ndimage.distance_transform_edt(~sa, sampling=sp)
    d_ab = dt_b[sa]
    d_ba = dt_a[sb]
    hd95 = max(float(np.percentile(d_ab, 95)), float(np.percentile(d_ba, 95)))
    asd = float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size))
    return hd95, asd


def _crop(shape, slices_list):
    """Union of bounding boxes (list of slice tuples / None) grown by one voxel, clipped to shape."""
    boxes = [s for s in slices_list if s is not None]
    lo = [min(s[d].start for s in boxes) for d in range(len(shape))]
    hi = [max(s[d].stop for s in boxes) for d in range(len(shape))]
    return tuple(slice(max(l - 1, 0), min(h + 1, n)) for l, h, n in zip(lo, hi, shape))


def _bbox_tables(aa: np.ndarray, bb: np.ndarray):
    """Per-label bounding boxes from scipy find_objects, or None when labels are unsuitable."""
    lo = min(int(aa.min()), int(bb.min()))
    hi = max(int(aa.max()), int(bb.max()))
    if lo < 0 or hi > _BBOX_MAX_LABEL:
        return None
    return ndimage.find_objects(aa), ndimage.find_objects(bb)


def _label_box(tables, label, aa, bb):
    if tables is not None:
        fa, fb = tables
        sa = fa[label - 1] if 0 < label <= len(fa) else None
        sb = fb[label - 1] if 0 < label <= len(fb) else None
        return sa, sb
    res = []
    for arr in (aa, bb):
        idx = np.nonzero(arr == label)
        res.append(None if idx[0].size == 0 else tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx))
    return res[0], res[1]


def _surface_distances_label(aa, bb, label, sp, tables) -> Tuple[float, float]:
    box_a, box_b = _label_box(tables, label, aa, bb)
    if box_a is None or box_b is None:
        return float("nan"), float("nan")
    crop = _crop(aa.shape, [box_a, box_b])
    return _surface_distances_masks(aa[crop] == label, bb[crop] == label, sp)


def surface_distances(a: ArrayOrImage, b: ArrayOrImage, label: int, spacing: Optional[Sequence[float]] = None) -> Tuple[float, float]:
    """95th-percentile Hausdorff distance and average symmetric surface distance of one label, in mm.

    Surfaces are the label's voxels that touch the outside through a face (mask minus its
    6-/4-connected erosion; the image border counts as outside). Distances are Euclidean distance
    maps in mm (scipy ``distance_transform_edt`` with ``sampling=spacing``) to the other map's
    surface voxels. ``hd95 = max(p95(d(A->B)), p95(d(B->A)))`` (the MONAI convention) and
    ``asd`` is the mean over all surface voxels of both directions.

    ``spacing`` is in mm in numpy axis order (z, y, x); for SimpleITK images it is read from the
    image when omitted; for numpy arrays it defaults to 1 mm. Returns ``(nan, nan)`` when the label
    is missing from either map. Only the label's bounding box (plus one voxel) is processed.
    """
    aa, bb, sp_img = _pair_arrays(a, b)
    aa = _as_labels(aa, "a")
    bb = _as_labels(bb, "b")
    sp = _spacing_for(spacing, sp_img, aa.ndim)
    label = _check_labels([label])[0]
    return _surface_distances_label(aa, bb, label, sp, _bbox_tables(aa, bb))


def _surface_table(aa, bb, labels, sp) -> Dict[int, Tuple[float, float]]:
    tables = _bbox_tables(aa, bb)
    return {lab: _surface_distances_label(aa, bb, lab, sp, tables) for lab in labels}


def hd95_per_label(a: ArrayOrImage, b: ArrayOrImage, labels: Optional[Iterable[int]] = None,
                   spacing: Optional[Sequence[float]] = None) -> Dict[int, float]:
    """HD95 in mm per label (see :func:`surface_distances`); labels default as in :func:`dice_per_label`.

    A label present in only one map gets NaN; a label absent from both is left out.
    """
    aa, bb, sp_img = _pair_arrays(a, b)
    aa = _as_labels(aa, "a")
    bb = _as_labels(bb, "b")
    sp = _spacing_for(spacing, sp_img, aa.ndim)
    present = set(_default_labels(aa, bb))
    labels = sorted(present) if labels is None else [l for l in _check_labels(labels) if l in present]
    return {lab: v[0] for lab, v in _surface_table(aa, bb, labels, sp).items()}


def label_overlap_report(fixed_labels: ArrayOrImage, warped_labels: ArrayOrImage, labels: Optional[Iterable[int]] = None,
                         spacing: Optional[Sequence[float]] = None) -> dict:
    """Dice, HD95 and ASD per label and their means, for a fixed and a warped label map on one grid.

    Returns a JSON-friendly dict::

        {"labels": [int, ...],                  # scored labels
         "dice": {"<label>": float, ...},       # 0..1
         "mean_dice": float,
         "hd95_mm": {"<label>": float | None},  # None when the label is missing from one map
         "asd_mm": {"<label>": float | None},
         "mean_hd95_mm": float | None,          # means over labels where defined
         "mean_asd_mm": float | None}

    Labels default to all non-zero labels of either map (see :func:`dice_per_label`). Distances use
    the fixed image's spacing (SimpleITK images) or ``spacing`` (numpy order z, y, x, mm).
    """
    dice = dice_per_label(fixed_labels, warped_labels, labels)
    aa, bb, sp_img = _pair_arrays(fixed_labels, warped_labels, ("fixed_labels", "warped_labels"))
    aa = _as_labels(aa, "fixed_labels")
    bb = _as_labels(bb, "warped_labels")
    sp = _spacing_for(spacing, sp_img, aa.ndim)
    scored = list(dice.keys())
    table = _surface_table(aa, bb, scored, sp)

    def clean(v):
        return None if not np.isfinite(v) else float(v)

    hd = {str(l): clean(table[l][0]) for l in scored}
    asd = {str(l): clean(table[l][1]) for l in scored}
    hd_vals = [v for v in hd.values() if v is not None]
    asd_vals = [v for v in asd.values() if v is not None]
    return {
        "labels": scored,
        "dice": {str(l): float(v) for l, v in dice.items()},
        "mean_dice": float(np.mean(list(dice.values()))) if dice else None,
        "hd95_mm": hd,
        "asd_mm": asd,
        "mean_hd95_mm": float(np.mean(hd_vals)) if hd_vals else None,
        "mean_asd_mm": float(np.mean(asd_vals)) if asd_vals else None,
    }


# ----------------------------------------------------------------------------- Jacobian


def folding_percent(jacobian_det: ArrayOrImage, mask: Optional[ArrayOrImage] = None) -> float:
    """Percentage (0..100) of voxels whose Jacobian determinant is <= 0 (folded), within ``mask``.

    Non-finite determinants count as folded. ``mask`` (same shape, non-zero where a voxel counts)
    restricts the voxels counted in both numerator and denominator.
    """
    det, _ = _to_array(jacobian_det, "jacobian_det")
    det = np.asarray(det, dtype=float)
    if det.size == 0:
        raise InputError("jacobian_det is empty; pass the determinant map of the displacement field.")
    m = _mask_array(mask, det.shape)
    folded = ~(det > 0)
    if m is not None:
        return float(100.0 * np.count_nonzero(folded & m) / np.count_nonzero(m))
    return float(100.0 * np.count_nonzero(folded) / det.size)


# ----------------------------------------------------------------------------- intensity similarity


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _ssim_map(x: np.ndarray, y: np.ndarray, data_range: float, sigma: float = 1.5) -> np.ndarray:
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2

    def g(v):
        return ndimage.gaussian_filter(v, sigma=sigma, truncate=3.5, mode="reflect")

    mx, my = g(x), g(y)
    sxx = g(x * x) - mx * mx
    syy = g(y * y) - my * my
    sxy = g(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def image_similarity(a: ArrayOrImage, b: ArrayOrImage, mask: Optional[ArrayOrImage] = None, bins: int = 64) -> dict:
    """Intensity similarity of two images on one grid: ``{"mi", "nmi", "ncc", "ssim"}`` (floats).

    * ``mi``: mutual information in nats from a joint histogram with ``bins`` x ``bins`` equal-width
      bins spanning each image's own [min, max] over the counted voxels.
    * ``nmi``: Studholme's normalised MI ``(H(a) + H(b)) / H(a, b)`` from the same histogram, in
      [1, 2] (2 for identical images, about 1 for independent ones).
    * ``ncc``: Pearson correlation of the counted voxels, in [-1, 1].
    * ``ssim``: mean SSIM (Gaussian window sigma 1.5 voxels, K1=0.01, K2=0.03) with the data range
      ``max(a, b) - min(a, b)`` over both images; the map is averaged over the counted voxels.

    ``mask`` (same shape, non-zero where a voxel counts) restricts all four. A constant image gives
    NaN for ``nmi`` and ``ncc`` (undefined).
    """
    aa, bb, _ = _pair_arrays(a, b)
    if int(bins) != bins or bins < 2:
        raise InputError(f"bins must be an integer >= 2, got {bins!r}.")
    aa = np.asarray(aa, dtype=np.float64)
    bb = np.asarray(bb, dtype=np.float64)
    if not (np.all(np.isfinite(aa)) and np.all(np.isfinite(bb))):
        raise InputError("images contain NaN or infinite values; replace them (e.g. np.nan_to_num) before scoring.")
    m = _mask_array(mask, aa.shape)
    va = aa[m] if m is not None else aa.ravel()
    vb = bb[m] if m is not None else bb.ravel()

    def rng(v):
        lo, hi = float(v.min()), float(v.max())
        return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)

    hist, _, _ = np.histogram2d(va, vb, bins=int(bins), range=[rng(va), rng(vb)])
    pab = hist / hist.sum()
    ha = _entropy(pab.sum(axis=1))
    hb = _entropy(pab.sum(axis=0))
    hab = _entropy(pab)
    mi = ha + hb - hab
    nmi = (ha + hb) / hab if hab > 0 else float("nan")

    sa, sb = va.std(), vb.std()
    ncc = float(((va - va.mean()) * (vb - vb.mean())).mean() / (sa * sb)) if sa > 0 and sb > 0 else float("nan")

    lo = min(aa.min(), bb.min())
    hi = max(aa.max(), bb.max())
    data_range = float(hi - lo) if hi > lo else 1.0
    smap = _ssim_map(aa, bb, data_range)
    ssim = float(smap[m].mean() if m is not None else smap.mean())
    return {"mi": float(max(mi, 0.0)), "nmi": float(nmi), "ncc": ncc, "ssim": ssim}
