"""Per-modality intensity normalisation to [0, 1] before registration.

* CT (Hounsfield units): clip to a window (default -1000..1000 HU) and scale to [0, 1].
* MR and anything else: robust percentiles (default 1st..99th of the image) to [0, 1], clipped.

``modality="auto"`` calls an image CT when its minimum is at or below -500 and its
range exceeds 1000 (air at about -1000 HU); otherwise MR.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .errors import InputError

MODALITIES = ("auto", "MR", "CT")


def detect_modality(image: sitk.Image) -> str:
    """'CT' for images that look like Hounsfield units (min <= -500, range > 1000), else 'MR'."""
    arr = sitk.GetArrayViewFromImage(image)
    lo, hi = float(arr.min()), float(arr.max())
    return "CT" if lo <= -500 and hi - lo > 1000 else "MR"


def normalize_intensity(image: sitk.Image, modality: str = "auto", ct_window=(-1000.0, 1000.0),
                        percentiles=(1.0, 99.0), mask: sitk.Image | None = None) -> tuple[sitk.Image, dict]:
    """Scale ``image`` to [0, 1] float32 by modality; returns (image, description of what was done).

    ``mask`` (same grid, nonzero = inside) restricts the voxels used for the percentiles.
    The description (modality, low and high values mapped to 0 and 1) goes into reports so the
    same normalisation can be reproduced.
    """
    if modality not in MODALITIES:
        raise InputError(f"Unknown modality '{modality}'; use one of {', '.join(MODALITIES)}.")
    if modality == "auto":
        modality = detect_modality(image)
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    if modality == "CT":
        lo, hi = float(ct_window[0]), float(ct_window[1])
    else:
        values = arr
        if mask is not None:
            m = sitk.GetArrayViewFromImage(mask) > 0
            if m.any():
                values = arr[m]
        lo, hi = (float(v) for v in np.percentile(values, percentiles))
        if hi <= lo:  # e.g. mostly-zero images: fall back to the full range
            lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise InputError("The image has no intensity contrast to normalise; check the input volume.")
    out = np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result, {"modality": modality, "low": lo, "high": hi}
