"""Regenerate the shipped demo sample from the shared data (documented, reproducible).

    python Resources/Sample/make_sample.py [--data DIR]

Only images whose licences allow shipping are used (see LICENSE.md here and the data
MANIFEST): the MNI ICBM152 2009a symmetric T1 and GM/WM maps (from the nilearn wheel) and the
Colin27 single-subject T1 (ch2bet, from the Debian mricron-data package).

* fixed.nii.gz: MNI152 2009a T1 at 2 mm.
* fixed_labels.nii.gz: 1 = grey matter, 2 = white matter (argmax of the 2009a GM/WM
  probability maps at 2 mm; background where both are below 0.5 of the total).
* moving.nii.gz: Colin27 ch2bet T1 at 2 mm, whose header was rotated by 8 degrees and shifted by
  (6, -9, 5) mm (LPS) so that the demo's affine pre-alignment has real work to do.
* moving_labels.nii.gz: 1 = grey matter, 2 = white matter from a 3-class Otsu threshold of
  ch2bet inside the brain (darkest class, CSF, left out); an automatic, rough segmentation.
"""
import argparse
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent


def _data_dir(arg):
    if arg:
        return Path(arg)
    if os.environ.get("MMREG_DATA"):
        return Path(os.environ["MMREG_DATA"])
    return HERE.parents[1].parent / "shared" / "data"


def _to_2mm(image, interpolator=sitk.sitkLinear, smooth=True):
    spacing = (2.0, 2.0, 2.0)
    size = [int(round(sz * sp / 2.0)) for sz, sp in zip(image.GetSize(), image.GetSpacing())]
    src = sitk.Cast(image, sitk.sitkFloat32)
    if smooth:
        src = sitk.SmoothingRecursiveGaussian(src, 0.8)
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetDirection(image.GetDirection())
    # Keep the physical centre.
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()])
    d = np.array(image.GetDirection()).reshape(3, 3)
    ref.SetOrigin(tuple(np.array(centre) - d @ (np.array(spacing) * (np.array(size) - 1) / 2.0)))
    return sitk.Resample(src, ref, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)


def _rotation(angle_deg, axis):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="shared data folder (default: $MMREG_DATA or ../shared/data)")
    args = parser.parse_args()
    data = _data_dir(args.data)
    mni = data / "nilearn_MNI152_2009a_T1_GM_WM"
    colin = data / "debian_mricron-data_colin27_atlases"

    fixed = _to_2mm(sitk.ReadImage(str(mni / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")))
    gm = _to_2mm(sitk.ReadImage(str(mni / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")), smooth=False)
    wm = _to_2mm(sitk.ReadImage(str(mni / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")), smooth=False)
    g, w = sitk.GetArrayFromImage(gm) / 255.0, sitk.GetArrayFromImage(wm) / 255.0
    labels = np.where(g >= w, 1, 2).astype(np.uint8)
    labels[np.maximum(g, w) < 0.5] = 0
    fixed_labels = sitk.GetImageFromArray(labels)
    fixed_labels.CopyInformation(fixed)

    moving = _to_2mm(sitk.ReadImage(str(colin / "ch2bet.nii.gz")))
    arr = sitk.GetArrayFromImage(moving)
    brain = arr > 0.1 * arr.max()
    values = arr[brain]
    otsu = sitk.OtsuMultipleThresholdsImageFilter()
    otsu.SetNumberOfThresholds(2)
    brain_img = sitk.GetImageFromArray(values.reshape(-1, 1, 1).astype(np.float32))
    otsu.Execute(brain_img)
    t1, t2 = otsu.GetThresholds()
    mlab = np.zeros(arr.shape, np.uint8)
    mlab[brain & (arr > t1) & (arr <= t2)] = 1
    mlab[brain & (arr > t2)] = 2
    moving_labels = sitk.GetImageFromArray(mlab)
    moving_labels.CopyInformation(moving)

    # Move the moving image physically: new header = rotation R about the image centre + shift.
    r = _rotation(8.0, (1.0, 0.3, 0.2))
    shift = np.array([6.0, -9.0, 5.0])
    centre = np.array(moving.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in moving.GetSize()]))
    d = np.array(moving.GetDirection()).reshape(3, 3)
    new_dir = r @ d
    new_origin = r @ (np.array(moving.GetOrigin()) - centre) + centre + shift
    for img in (moving, moving_labels):
        img.SetDirection(new_dir.ravel().tolist())
        img.SetOrigin(new_origin.tolist())

    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(fixed, 0, 255), sitk.sitkUInt8), str(HERE / "fixed.nii.gz"), True)
    sitk.WriteImage(fixed_labels, str(HERE / "fixed_labels.nii.gz"), True)
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(moving, 0, 255), sitk.sitkUInt8), str(HERE / "moving.nii.gz"), True)
    sitk.WriteImage(moving_labels, str(HERE / "moving_labels.nii.gz"), True)
    for name in ("fixed", "fixed_labels", "moving", "moving_labels"):
        p = HERE / f"{name}.nii.gz"
        print(f"{p.name}: {p.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
