"""Reading, writing and validating images and label maps.

The engine's image type is a SimpleITK image: physical LPS space (like ITK), with origin (mm),
spacing (mm) and a direction matrix. Intensity images are converted to 32-bit float; label maps
stay integer. A 2-D image (e.g. a PNG or a single slice) is accepted and turned into a
single-slice 3-D volume so that every method sees 3-D geometry.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError

ImageLike = Union[str, os.PathLike, sitk.Image]

_INTEGER_PIXEL_IDS = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
    sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
}


def _read(path: str | os.PathLike, what: str) -> sitk.Image:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file '{path}' does not exist; check the path.")
    if path.is_dir():
        # A DICOM series folder.
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(str(path))
        if not files:
            raise InputError(f"{what} '{path}' is a folder without a DICOM series; give an image file "
                             "(NIfTI .nii/.nii.gz, NRRD .nrrd, MetaImage .mha/.mhd) or a DICOM folder.")
        reader.SetFileNames(files)
        try:
            return reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"Could not read the DICOM series in '{path}': {_first_line(exc)}") from None
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"Could not read {what.lower()} '{path}': the file is unreadable or not an image "
                         f"format SimpleITK knows ({_first_line(exc)}). Use NIfTI, NRRD or MetaImage.") from None


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages put the useful description last.
    return lines[-1] if lines else type(exc).__name__


def _to_3d(image: sitk.Image, what: str) -> sitk.Image:
    dim = image.GetDimension()
    if dim == 3:
        return image
    if dim == 2:
        vol = sitk.JoinSeries(image)
        # JoinSeries gives z spacing 1 and origin 0: keep the 2-D geometry in x, y.
        direction2 = np.array(image.GetDirection()).reshape(2, 2)
        direction3 = np.eye(3)
        direction3[:2, :2] = direction2
        vol.SetDirection(direction3.ravel().tolist())
        vol.SetOrigin(tuple(image.GetOrigin()) + (0.0,))
        vol.SetSpacing(tuple(image.GetSpacing()) + (1.0,))
        return vol
    if dim == 4:
        raise InputError(f"{what} is 4-D (size {image.GetSize()}): a time series or multi-volume. "
                         "Extract one 3-D volume first (e.g. one time point) and register that.")
    raise InputError(f"{what} has {dim} dimensions; a 3-D volume (or a 2-D slice) is needed.")


def validate_image(image: sitk.Image, what: str = "Image") -> sitk.Image:
    """Check an intensity image and return it as a 3-D 32-bit float SimpleITK image.

    Accepts 3-D images and 2-D / single-slice images (returned as single-slice 3-D volumes).
    Raises :class:`InputError` for 4-D or vector (multi-component, e.g. RGB) images, NaN or Inf
    voxels, empty images and constant images. ``what`` names the image in messages
    (e.g. "Fixed image").
    """
    if not isinstance(image, sitk.Image):
        raise InputError(f"{what} must be a SimpleITK image or a file path, not {type(image).__name__}.")
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(
            f"{what} is a vector image with {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(e.g. RGB or a displacement field). Registration needs a scalar intensity image: convert it "
            "to grayscale or extract one component first.")
    image = _to_3d(image, what)
    if any(s == 0 for s in image.GetSize()):
        raise InputError(f"{what} is empty (size {image.GetSize()}); load a non-empty volume.")
    if any(sp <= 0 for sp in image.GetSpacing()):
        raise InputError(f"{what} has a non-positive spacing {image.GetSpacing()}; fix the image header.")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
        raise InputError(f"{what} has a degenerate direction matrix (det {np.linalg.det(direction):.3g}); "
                         "fix the image header.")
    image = sitk.Cast(image, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise InputError(f"{what} contains {bad} NaN or infinite voxels; replace them (e.g. with 0) "
                         "before registering.")
    if float(arr.max()) == float(arr.min()):
        raise InputError(f"{what} is constant (every voxel is {float(arr.min()):g}): there is nothing to "
                         "register. Check that the right volume was selected.")
    return image


def validate_labels(labels: sitk.Image, what: str = "Label map") -> sitk.Image:
    """Check a label map and return it as a 3-D integer SimpleITK image (pixel type kept if integer).

    Float images whose values are all whole numbers are accepted and cast to an integer type
    (many label files are stored as float). Raises :class:`InputError` for vector images,
    non-integer values, negative labels and 4-D images.
    """
    if not isinstance(labels, sitk.Image):
        raise InputError(f"{what} must be a SimpleITK image or a file path, not {type(labels).__name__}.")
    if labels.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(f"{what} is a vector image; a label map has one integer label per voxel.")
    labels = _to_3d(labels, what)
    if labels.GetPixelID() not in _INTEGER_PIXEL_IDS:
        arr = sitk.GetArrayViewFromImage(labels)
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError(f"{what} is not a label map: it has non-integer values (e.g. "
                             f"{float(arr[arr != np.round(arr)].ravel()[0]) if np.any(arr != np.round(arr)) else 'NaN'})."
                             " Give an integer label image (segmentation), not an intensity image.")
        labels = sitk.Cast(labels, sitk.sitkInt32)
    arr = sitk.GetArrayViewFromImage(labels)
    if arr.size and int(arr.min()) < 0:
        raise InputError(f"{what} has negative labels ({int(arr.min())}); labels must be 0 (background) or positive.")
    return labels


def read_image(path: ImageLike, what: str = "Image") -> sitk.Image:
    """Read and validate an intensity image (NIfTI, NRRD, MetaImage, DICOM folder, ...).

    Returns a 3-D float32 SimpleITK image in LPS physical space. A SimpleITK image passed in
    is validated and returned (converted), never modified in place.
    """
    image = path if isinstance(path, sitk.Image) else _read(path, what)
    return validate_image(image, what)


def read_labels(path: ImageLike, what: str = "Label map") -> sitk.Image:
    """Read and validate a label map (integer image); see :func:`validate_labels`."""
    labels = path if isinstance(path, sitk.Image) else _read(path, what)
    return validate_labels(labels, what)


@contextmanager
def atomic_output(path: str | os.PathLike, what: str = "file"):
    """Context manager giving a temporary path beside ``path`` (same extension) to write to.

    On success the temporary file replaces ``path`` in one step, so an interrupted or failed
    write never leaves a truncated output; on failure it is removed and the error becomes an
    :class:`InputError` naming the file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part{''.join(path.suffixes)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        raise InputError(f"Could not write the {what} '{path}': {_first_line(exc)}. Use a writable folder and a "
                         "known extension (.nii.gz, .nrrd, .mha for images; .h5, .tfm for transforms).") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def read_mask(path: ImageLike, what: str = "Mask") -> sitk.Image:
    """Read a mask (any scalar image; nonzero = inside) as a 3-D uint8 0/1 image on its own grid.

    Probability maps and masks with a negative background are fine: every nonzero voxel counts.
    Raises :class:`InputError` for vector or 4-D images, NaN/Inf and masks with no nonzero voxel.
    """
    mask = path if isinstance(path, sitk.Image) else _read(path, what)
    if mask.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(f"{what} is a vector image; a mask has one value per voxel (nonzero = inside).")
    mask = _to_3d(mask, what)
    arr = sitk.GetArrayViewFromImage(mask)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{what} contains NaN or infinite voxels; give a mask with finite values.")
    if not np.any(arr != 0):
        raise InputError(f"{what} is empty (no nonzero voxel); give a mask of the region to register, or none.")
    out = sitk.Cast(mask != 0, sitk.sitkUInt8)
    out.CopyInformation(mask)
    return out


def write_image(image: sitk.Image, path: str | os.PathLike) -> Path:
    """Write an image or label map; the format follows the extension (.nii.gz, .nrrd, .mha, ...).

    Creates the parent folder; the file appears only when completely written. Returns the path.
    """
    with atomic_output(path, "image") as tmp:
        sitk.WriteImage(image, str(tmp), True)
    return Path(path)


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when two images share size, spacing, origin and direction (within ``tol``)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS bounding box (mm) of the image's voxel centres: (min corner, max corner)."""
    size = np.array(image.GetSize())
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in size], indexing="ij")).reshape(3, -1).T
    pts = np.array([image.TransformContinuousIndexToPhysicalPoint(c.astype(float).tolist()) for c in corners])
    return pts.min(0), pts.max(0)


def describe_extents(fixed: sitk.Image, moving: sitk.Image) -> str:
    """'fixed spans A..B mm, moving spans C..D mm LPS' (bounding boxes), for overlap error messages."""
    (lo_f, hi_f), (lo_m, hi_m) = physical_bounds(fixed), physical_bounds(moving)
    return (f"fixed spans {np.round(lo_f, 1).tolist()}..{np.round(hi_f, 1).tolist()} mm, moving "
            f"{np.round(lo_m, 1).tolist()}..{np.round(hi_m, 1).tolist()} mm LPS")
