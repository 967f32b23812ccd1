"""Warping label maps through a transform onto a reference grid.

Default: per-label linear interpolation of the one-hot masks followed by argmax (a voxel takes
the label whose interpolated mask is largest, the background's mask being 1 minus the sum of
the others; background wins ties). Measured against nearest neighbour (Testing/engine/test_geometry.py):
smoother, more accurate boundaries of structures a few voxels thick (sphere Dice 0.944 vs 0.910;
thin slabs 0.83 vs 0.81 averaged over sub-voxel shifts), but a structure ONE voxel thick shifted
by exactly half a voxel can vanish (its mask interpolates to 0.5 everywhere), where nearest keeps
it. ``interpolation="nearest"`` gives the classic nearest-neighbour resampling.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .transforms import transform_to_field


def warp_labels(labels: sitk.Image, transform: sitk.Transform, reference: sitk.Image,
                interpolation: str = "linear") -> sitk.Image:
    """Resample an integer label map through ``transform`` onto ``reference``'s grid.

    ``transform`` maps reference (fixed) points to label-map (moving) points, LPS mm (the
    resampling direction, as every mmreg transform). Returns a label image of the label map's
    pixel type on the reference grid; labels outside the moving image become 0.
    """
    if interpolation not in ("linear", "nearest"):
        raise InputError(f"Label interpolation must be 'linear' or 'nearest', not '{interpolation}'.")
    pixel_id = labels.GetPixelID()
    ref = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    ref.CopyInformation(reference)
    if interpolation == "nearest":
        return sitk.Resample(labels, ref, transform, sitk.sitkNearestNeighbor, 0, pixel_id)

    arr = sitk.GetArrayFromImage(labels)
    out_shape = tuple(reversed(reference.GetSize()))
    best = np.zeros(out_shape, dtype=np.float32)
    total = np.zeros(out_shape, dtype=np.float32)
    result = np.zeros(out_shape, dtype=arr.dtype)
    boxes = ndimage.find_objects(np.where(arr > 0, arr, 0).astype(np.int64))
    if boxes:
        # Moving-space continuous index (numpy z, y, x order) of every reference voxel centre,
        # computed once; each label is then interpolated only where those points fall inside its
        # bounding box, which is what makes ~150 labels cheap.
        points = _moving_indices(transform, ref, labels).reshape(-1, 3)
        size = np.array(arr.shape)
        inside = np.all((points > -0.5) & (points < size - 0.5), axis=-1)
        # Points sorted by their moving z index: each label looks only at its slab of z.
        order = np.argsort(points[:, 0], kind="stable")
        z_sorted = points[order, 0]
        best_flat, total_flat, result_flat = best.ravel(), total.ravel(), result.ravel()
        for value, box in enumerate(boxes, start=1):
            if box is None:
                continue
            lo = np.array([max(0, b.start - 1) for b in box])
            hi = np.array([min(n, b.stop + 1) for b, n in zip(box, size)])
            cand = order[np.searchsorted(z_sorted, lo[0] - 1, "right"):np.searchsorted(z_sorted, hi[0], "left")]
            p = points[cand]
            keep = inside[cand] & np.all((p[:, 1:] > lo[1:] - 1) & (p[:, 1:] < hi[1:]), axis=-1)
            if not keep.any():
                continue
            idx, p = cand[keep], p[keep]
            crop = (arr[tuple(slice(a, b) for a, b in zip(lo, hi))] == value).astype(np.float32)
            # mode="nearest" matches ITK's clamping at the image border; elsewhere the crop's
            # one-voxel margin of zeros gives the exact linear interpolation.
            warped = ndimage.map_coordinates(crop, (p - lo).T, order=1, mode="nearest")
            total_flat[idx] += warped
            better = warped > best_flat[idx]
            result_flat[idx[better]] = value
            best_flat[idx[better]] = warped[better]
    # The background's one-hot mask is 1 - sum of the label masks: it wins the argmax where it
    # is at least as large as the best label (and everywhere outside the moving image).
    result[(1.0 - total) >= best] = 0
    out = sitk.GetImageFromArray(result)
    out.CopyInformation(reference)
    return sitk.Cast(out, pixel_id)


def _moving_indices(transform: sitk.Transform, ref: sitk.Image, moving: sitk.Image) -> np.ndarray:
    """Continuous moving-image indices (z, y, x) of the reference voxel centres mapped by ``transform``."""
    u = sitk.GetArrayFromImage(transform_to_field(transform, ref))  # (z, y, x, 3) LPS mm
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in u.shape[:3]], indexing="ij"), -1)
    m_ref = np.array(ref.GetDirection()).reshape(3, 3) @ np.diag(ref.GetSpacing())
    x = grid[..., ::-1] @ m_ref.T + np.array(ref.GetOrigin()) + u  # physical moving points
    m_mov = np.array(moving.GetDirection()).reshape(3, 3) @ np.diag(moving.GetSpacing())
    idx_xyz = (x - np.array(moving.GetOrigin())) @ np.linalg.inv(m_mov).T
    return idx_xyz[..., ::-1].astype(np.float32)
