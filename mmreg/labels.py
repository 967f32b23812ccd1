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

from .errors import InputError


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

    arr = sitk.GetArrayViewFromImage(labels)
    values = [int(v) for v in np.unique(arr) if v != 0]
    out_shape = tuple(reversed(reference.GetSize()))
    best = np.zeros(out_shape, dtype=np.float32)
    total = np.zeros(out_shape, dtype=np.float32)
    result = np.zeros(out_shape, dtype=arr.dtype)
    if not values:
        out = sitk.GetImageFromArray(result)
        out.CopyInformation(reference)
        return sitk.Cast(out, pixel_id)
    # Resample the moving-space sampling positions once (a displacement field of the whole
    # transform on the reference grid), then interpolate each mask through that field; this is
    # the same as resampling every mask through the transform, at a fraction of the cost.
    field_tx = _as_field_transform(transform, ref)
    for value in values:
        mask = sitk.Cast(labels == value, sitk.sitkFloat32)
        warped = sitk.GetArrayFromImage(
            sitk.Resample(mask, ref, field_tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        total += warped
        better = warped > best
        result[better] = value
        best[better] = warped[better]
    # The background's one-hot mask is 1 - sum of the label masks: it wins the argmax where it
    # is at least as large as the best label (and everywhere outside the moving image).
    result[(1.0 - total) >= best] = 0
    out = sitk.GetImageFromArray(result)
    out.CopyInformation(reference)
    return sitk.Cast(out, pixel_id)


def _as_field_transform(transform: sitk.Transform, ref: sitk.Image) -> sitk.Transform:
    if transform.GetName() in ("DisplacementFieldTransform", "AffineTransform", "TranslationTransform",
                               "Euler3DTransform", "IdentityTransform"):
        return transform
    flt = sitk.TransformToDisplacementFieldFilter()
    flt.SetReferenceImage(ref)
    flt.SetOutputPixelType(sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(flt.Execute(transform))
