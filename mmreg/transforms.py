"""Writing and reading registration transforms as files that ITK, SimpleITK and Slicer read.

A result is a displacement image ``u`` on the fixed grid: LPS millimetres, resampling
convention (fixed point x corresponds to moving point x + u(x)); ITK calls this a
DisplacementFieldTransform and Slicer loads it as a grid transform "from parent", so a moving
volume placed under it overlays the fixed volume.

File kinds, chosen by extension:

* ``.h5`` / ``.hdf5`` / ``.tfm`` / ``.txt``: an ITK transform file (DisplacementFieldTransform,
  or the composite it was given).
* ``.nii`` / ``.nii.gz``: a NIfTI displacement image with intent code 1006 (NIFTI_INTENT_DISPVECT).
  By the NIfTI/ITK convention its vectors are stored in RAS; ITK converts them back to LPS when
  reading, so the file means the same thing in ITK, SimpleITK and Slicer.
* ``.nrrd`` / ``.nhdr`` / ``.mha`` / ``.mhd``: a vector image with LPS vectors.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .image import atomic_output

_TRANSFORM_EXTS = (".h5", ".hdf5", ".tfm", ".txt")
_IMAGE_EXTS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
NIFTI_INTENT_DISPVECT = 1006


def _ext(path: Path) -> str:
    name = path.name.lower()
    for ext in _TRANSFORM_EXTS + _IMAGE_EXTS:
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def displacement_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """A SimpleITK DisplacementFieldTransform from a displacement image (the image is copied)."""
    check_displacement(field)
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def check_displacement(field: sitk.Image) -> None:
    """Raise :class:`InputError` unless ``field`` is a 3-D image of 3-component vectors."""
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise InputError(f"A displacement field must be a 3-D image of 3-vectors (mm); got a "
                         f"{field.GetDimension()}-D image with {field.GetNumberOfComponentsPerPixel()} "
                         "component(s).")


def write_transform(transform_or_field, path: str | os.PathLike) -> Path:
    """Write a displacement image or a SimpleITK transform to ``path`` (kind from the extension).

    Image files need a displacement image (or a DisplacementFieldTransform); ITK transform files
    take any SimpleITK transform (a displacement image is wrapped). Returns the path written.
    """
    path = Path(path)
    ext = _ext(path)
    if ext in _TRANSFORM_EXTS:
        tx = (displacement_transform(transform_or_field) if isinstance(transform_or_field, sitk.Image)
              else transform_or_field)
        with atomic_output(path, "transform") as tmp:
            sitk.WriteTransform(tx, str(tmp))
        return path
    if ext not in _IMAGE_EXTS:
        raise InputError(f"Unknown transform file extension '{ext}' for '{path}'; use .h5, .tfm, "
                         ".nii.gz, .nrrd or .mha.")
    field = transform_or_field
    if isinstance(field, sitk.Transform):
        tx = sitk.DisplacementFieldTransform(field) if field.GetName() == "DisplacementFieldTransform" else None
        if tx is None:
            raise InputError(f"Only displacement fields can be written as images; write '{path.name}' as .h5.")
        field = tx.GetDisplacementField()
    check_displacement(field)
    with atomic_output(path, "displacement field") as tmp:
        if ext in (".nii", ".nii.gz"):
            _write_nifti_displacement(field, tmp)
        else:
            sitk.WriteImage(sitk.Cast(field, sitk.sitkVectorFloat32), str(tmp), True)
    return path


def _write_nifti_displacement(field: sitk.Image, path: Path) -> None:
    # NIfTI displacement fields store RAS vectors (ITK converts them to LPS when reading an
    # intent-1006 file). SimpleITK cannot write that intent itself, so write LPS->RAS flipped
    # vectors as a plain vector image and set the intent code in the header.
    arr = sitk.GetArrayFromImage(field).astype(np.float32)
    arr[..., 0] *= -1.0
    arr[..., 1] *= -1.0
    ras = sitk.GetImageFromArray(arr, isVector=True)
    ras.CopyInformation(field)
    tmp = path.with_name(path.name + ".tmp.nii")
    try:
        sitk.WriteImage(ras, str(tmp))
        data = bytearray(tmp.read_bytes())
    finally:
        if tmp.exists():
            tmp.unlink()
    data[68:70] = struct.pack("<h", NIFTI_INTENT_DISPVECT)  # intent_code of the NIfTI-1 header
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "wb", compresslevel=6) as fh:
            fh.write(bytes(data))
    else:
        path.write_bytes(bytes(data))


def read_displacement(path: str | os.PathLike) -> sitk.Image:
    """Read a displacement field (LPS mm vectors) from an image file or an ITK displacement transform file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Transform file '{path}' does not exist; check the path.")
    if _ext(path) in _TRANSFORM_EXTS:
        tx = read_transform(path)
        if isinstance(tx, sitk.CompositeTransform) and tx.GetNumberOfTransforms() == 1:
            tx = tx.GetNthTransform(0)
        if tx.GetName() != "DisplacementFieldTransform":
            raise InputError(f"'{path}' holds a {tx.GetName()}, not a displacement field.")
        return sitk.DisplacementFieldTransform(tx).GetDisplacementField()
    try:
        field = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"Could not read the displacement image '{path}': {str(exc).splitlines()[-1]}") from None
    check_displacement(field)
    return sitk.Cast(field, sitk.sitkVectorFloat64)


def read_transform(path: str | os.PathLike) -> sitk.Transform:
    """Read any transform file written by :func:`write_transform` (or by ITK/Slicer) as a SimpleITK transform.

    Displacement images become DisplacementFieldTransforms. The transform maps fixed-space
    points to moving-space points (LPS), the direction used for resampling.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"Transform file '{path}' does not exist; check the path.")
    if _ext(path) in _IMAGE_EXTS:
        return displacement_transform(read_displacement(path))
    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise InputError(f"Could not read the transform file '{path}' (corrupted or not an ITK transform): "
                         f"{str(exc).splitlines()[-1]}") from None
    return tx


def transform_to_field(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """The displacement image (LPS mm) of any transform sampled on ``reference``'s grid: u(x) = T(x) - x."""
    ref = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    ref.CopyInformation(reference)
    flt = sitk.TransformToDisplacementFieldFilter()
    flt.SetReferenceImage(ref)
    flt.SetOutputPixelType(sitk.sitkVectorFloat64)
    return flt.Execute(transform)


def fold_affine(deformable: sitk.Image, affine: sitk.Transform | None) -> sitk.Image:
    """Total displacement of "deform, then affine": x -> A(x + v(x)), as u(x) = A(x + v(x)) - x.

    ``deformable`` is the displacement image v (LPS mm, fixed grid); ``affine`` maps fixed-space
    points to moving-space points. Returns a new float64 displacement image on the same grid.
    """
    if affine is None:
        return sitk.Cast(deformable, sitk.sitkVectorFloat64)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)                              # applied second
    composite.AddTransform(displacement_transform(deformable))  # applied first
    return transform_to_field(composite, deformable)

