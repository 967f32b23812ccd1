"""The network grid: where networks and the instance optimiser see the images.

A :class:`NetworkGrid` is an oriented grid with the FIXED image's direction matrix, an isotropic
spacing (mm) on its in-plane/volume axes, centred on the fixed image and large enough to cover
it, with a size that is a multiple of the network's downsampling factor. Axes along which the
fixed image has a single voxel (2-D inputs) stay single-voxel and are dropped from tensors, so
2-D inputs run through 2-D tensor code.

Tensor conventions (the part that is easy to get wrong):

* A tensor on the grid is ``(B, C, *spatial)`` with spatial dims in numpy order, i.e. the
  REVERSE of the ITK index order (x, y, z): for a 3-D grid ``spatial = (n_z, n_y, n_x)``.
* A voxel-unit displacement tensor ``ddf`` has one channel per spatial dim, in the same order:
  ``ddf[:, k]`` is the displacement in voxels along tensor spatial dim ``k`` (so channel 0 is
  along ITK z in 3-D). This is what MONAI's ``Warp`` and ``DVF2DDF`` expect.
* Physical displacements are LPS millimetres, ``u = D @ diag(spacing) @ d_index`` with ``d_index``
  in ITK (x, y, z) order, resampling convention: fixed point x <-> moving point x + u(x).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import InputError


@dataclass(frozen=True)
class NetworkGrid:
    """An oriented, isotropic grid in LPS space (see module doc).

    ``size``/``spacing``/``origin`` are in ITK (x, y, z) order; ``direction`` is the row-major
    3x3 direction matrix (columns = axis directions in LPS), ``origin`` the LPS position (mm) of
    voxel (0, 0, 0)'s centre.
    """

    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple

    # ---------------------------------------------------------------- construction
    @classmethod
    def for_image(cls, fixed: sitk.Image, spacing: float = 2.0, multiple: int = 16,
                  max_voxels: int | None = None, margin_voxels: int = 1) -> "NetworkGrid":
        """Grid covering ``fixed`` at isotropic ``spacing`` mm, size a multiple of ``multiple``.

        The grid shares the fixed image's direction and centre. It covers the fixed image's
        extent (voxel edges) plus ``margin_voxels`` grid voxels on each side, so that every fixed
        voxel centre lies inside the grid. If ``max_voxels`` is given and exceeded, the spacing
        grows until the grid fits (the spacing actually used is ``grid.spacing``).
        """
        if spacing <= 0:
            raise InputError(f"Network spacing must be positive, got {spacing} mm.")
        size = np.array(fixed.GetSize())
        fixed_spacing = np.array(fixed.GetSpacing(), dtype=float)
        active = size > 1
        if not active.any():
            raise InputError("The fixed image has a single voxel; nothing to register.")
        while True:
            extent = size * fixed_spacing
            n = np.where(active, np.ceil(extent / spacing + 2 * margin_voxels), 1).astype(int)
            n = np.where(active, np.ceil(n / multiple) * multiple, 1).astype(int)
            if max_voxels is None or int(np.prod(n)) <= max_voxels:
                break
            spacing *= (np.prod(n) / max_voxels) ** (1.0 / active.sum()) * 1.01
        grid_spacing = np.where(active, spacing, fixed_spacing)
        direction = np.array(fixed.GetDirection()).reshape(3, 3)
        centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2.0).tolist()))
        origin = centre - direction @ (grid_spacing * (n - 1) / 2.0)
        return cls(tuple(int(v) for v in n), tuple(float(v) for v in grid_spacing),
                   tuple(float(v) for v in origin), tuple(float(v) for v in direction.ravel()))

    def coarsen(self, factor: int) -> "NetworkGrid":
        """The same region at ``factor`` times the spacing (size divided by ``factor``, same centre).

        Tensors move between the two with :func:`downsample_image` and :func:`upsample_field`.
        """
        size = np.array(self.size)
        active = size > 1
        if np.any(size[active] % factor):
            raise InputError(f"Grid size {self.size} is not divisible by {factor}; use a larger multiple.")
        n = np.where(active, size // factor, 1)
        spacing = np.where(active, np.array(self.spacing) * factor, self.spacing)
        centre = self.centre
        origin = centre - self.direction_matrix @ (spacing * (n - 1) / 2.0)
        return NetworkGrid(tuple(int(v) for v in n), tuple(float(v) for v in spacing),
                           tuple(float(v) for v in origin), self.direction)

    # ---------------------------------------------------------------- properties
    @property
    def direction_matrix(self) -> np.ndarray:
        """The 3x3 direction matrix (columns: the grid axes in LPS)."""
        return np.array(self.direction).reshape(3, 3)

    @property
    def centre(self) -> np.ndarray:
        """LPS position (mm) of the grid's centre."""
        return np.array(self.origin) + self.direction_matrix @ (
            np.array(self.spacing) * (np.array(self.size) - 1) / 2.0)

    @property
    def active_axes(self) -> tuple:
        """ITK axes (0=x, 1=y, 2=z) with more than one voxel, increasing."""
        return tuple(a for a in range(3) if self.size[a] > 1)

    @property
    def ndim(self) -> int:
        """Number of spatial dims of tensors on this grid (2 for single-slice inputs, else 3)."""
        return len(self.active_axes)

    @property
    def tensor_axes(self) -> tuple:
        """ITK axis of each tensor spatial dim (the reverse of :attr:`active_axes`)."""
        return tuple(reversed(self.active_axes))

    @property
    def spatial_shape(self) -> tuple:
        """Tensor spatial shape (numpy order)."""
        return tuple(self.size[a] for a in self.tensor_axes)

    @property
    def index_to_mm(self) -> np.ndarray:
        """3x3 matrix M = D @ diag(spacing): an index-space step (x, y, z) to an LPS vector in mm."""
        return self.direction_matrix @ np.diag(self.spacing)

    def reference_image(self, pixel_id: int = sitk.sitkFloat32) -> sitk.Image:
        """An empty SimpleITK image with this grid's geometry (a resampling reference)."""
        ref = sitk.Image([int(s) for s in self.size], pixel_id)
        ref.SetSpacing(self.spacing)
        ref.SetOrigin(self.origin)
        ref.SetDirection(self.direction)
        return ref

    # ---------------------------------------------------------------- images
    def resample(self, image: sitk.Image, transform: sitk.Transform | None = None,
                 interpolator: int = sitk.sitkLinear, default: float = 0.0) -> sitk.Image:
        """Resample ``image`` onto this grid through ``transform`` (grid point -> image point, LPS)."""
        tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
        return sitk.Resample(image, self.reference_image(image.GetPixelID()), tx, interpolator,
                             default, image.GetPixelID())

    def image_to_tensor(self, image: sitk.Image, device=None, dtype=torch.float32) -> torch.Tensor:
        """A scalar image ON THIS GRID to a ``(1, 1, *spatial)`` tensor."""
        if tuple(image.GetSize()) != tuple(self.size):
            raise InputError(f"Image size {image.GetSize()} is not the grid size {self.size}; resample first.")
        arr = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
        arr = arr.reshape(self.spatial_shape)  # drop singleton axes
        return torch.from_numpy(arr)[None, None].to(device=device, dtype=dtype)

    def tensor_to_image(self, tensor: torch.Tensor) -> sitk.Image:
        """A ``(1, 1, *spatial)`` tensor (or ``(1, *spatial)``) to a float32 SimpleITK image on this grid."""
        arr = tensor.detach().float().cpu().numpy().reshape(tuple(reversed(self.size)))
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(self.reference_image())
        return img

    # ---------------------------------------------------------------- fields
    def ddf_to_mm(self, ddf: torch.Tensor) -> np.ndarray:
        """Voxel-unit field ``(1, ndim, *spatial)`` to an LPS mm array ``(n_z, n_y, n_x, 3)``."""
        d = ddf.detach().double().cpu().numpy()[0]  # (ndim, *spatial)
        m = self.index_to_mm
        out = np.zeros(tuple(reversed(self.size)) + (3,), dtype=np.float64)
        spatial_full = tuple(reversed(self.size))
        for k, axis in enumerate(self.tensor_axes):
            comp = d[k].reshape(spatial_full)
            out += comp[..., None] * m[:, axis]
        return out

    def mm_to_ddf(self, field_mm: np.ndarray, device=None) -> torch.Tensor:
        """LPS mm array ``(n_z, n_y, n_x, 3)`` on this grid to a voxel-unit tensor ``(1, ndim, *spatial)``.

        Components along single-voxel axes are dropped (they must be ~0 for 2-D inputs).
        """
        inv = np.linalg.inv(self.index_to_mm)
        d_index = field_mm @ inv.T  # (..., 3) index displacement in (x, y, z)
        comps = [d_index[..., axis].reshape(self.spatial_shape) for axis in self.tensor_axes]
        return torch.from_numpy(np.stack(comps)[None].astype(np.float32)).to(device)

    def field_image(self, field_mm: np.ndarray) -> sitk.Image:
        """An LPS mm array ``(n_z, n_y, n_x, 3)`` as a SimpleITK float64 vector image on this grid."""
        img = sitk.GetImageFromArray(field_mm.astype(np.float64), isVector=True)
        img.CopyInformation(self.reference_image())
        return img

    def ddf_to_field_image(self, ddf: torch.Tensor) -> sitk.Image:
        """Voxel-unit ``ddf`` on this grid to a physical displacement image (LPS mm, on this grid)."""
        return self.field_image(self.ddf_to_mm(ddf))


def resample_field(field: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Resample a displacement image (LPS mm vectors) onto ``reference``'s grid, linearly.

    Vectors are physical, so they are interpolated unchanged; points outside the field's grid
    take the nearest border value (no sudden drop to zero displacement at the edge).
    """
    ref = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    ref.CopyInformation(reference)
    return sitk.Resample(sitk.Cast(field, sitk.sitkVectorFloat64), ref, sitk.Transform(3, sitk.sitkIdentity),
                         sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)


def downsample_image(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool a ``(B, C, *spatial)`` tensor by ``factor`` (matches :meth:`NetworkGrid.coarsen`)."""
    if factor == 1:
        return image
    pool = F.avg_pool3d if image.dim() == 5 else F.avg_pool2d
    return pool(image, factor)


def upsample_field(ddf: torch.Tensor, factor: int) -> torch.Tensor:
    """Voxel-unit field on a coarse grid to the grid ``factor`` times finer (vectors scaled by ``factor``).

    Uses voxel-centre alignment (``align_corners=False``), which is exact for grids related by
    :meth:`NetworkGrid.coarsen`.
    """
    if factor == 1:
        return ddf
    mode = "trilinear" if ddf.dim() == 5 else "bilinear"
    return F.interpolate(ddf * factor, scale_factor=factor, mode=mode, align_corners=False)


def choose_levels(grid: NetworkGrid, levels: int, min_size: int = 8) -> list:
    """Pyramid factors (coarse to fine, e.g. [4, 2, 1]) that divide the grid and keep >= ``min_size`` voxels."""
    factors = []
    for k in range(levels):
        f = 2 ** k
        sizes = [grid.size[a] for a in grid.active_axes]
        if all(s % f == 0 and s // f >= min_size for s in sizes):
            factors.append(f)
    return sorted(factors, reverse=True)

