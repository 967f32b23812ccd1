"""Spatial layer on network-grid tensors: warping, integration, composition, Jacobians.

Tensors follow :mod:`mmreg.grid`'s conventions: ``(B, C, *spatial)`` with 2 or 3 spatial dims in
numpy order, voxel-unit displacement fields ``(B, ndim, *spatial)`` whose channel k moves along
spatial dim k, resampling convention (output voxel x samples the input at x + u(x)).
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import SimpleITK as sitk
import torch
from monai.networks.blocks import DVF2DDF, Warp


@lru_cache(maxsize=None)
def _warp_layer(mode: str, padding_mode: str) -> Warp:
    with warnings.catch_warnings():
        # MONAI announces that it uses torch's grid_sample (its compiled extension is optional).
        warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample.*")
        return Warp(mode=mode, padding_mode=padding_mode)


def warp(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """Resample ``image`` at x + ddf(x) (voxel units) with MONAI's ``Warp``.

    ``mode``: "bilinear" (trilinear in 3-D) or "nearest"; ``padding_mode``: "border", "zeros" or
    "reflection" (what is read outside the image).
    """
    return _warp_layer(mode, padding_mode)(image, ddf)


def sample_at(image: torch.Tensor, points: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Trilinear (bilinear in 2-D) values of ``image`` ``(1, C, *spatial)`` at ``points`` ``(N, ndim)``.

    ``points`` are voxel coordinates in numpy axis order (voxel i's centre at i, as in :func:`warp`,
    so ``sample_at(image, x + u(x))`` equals ``warp(image, u)`` at voxel x); differentiable with
    respect to the points and the image. Returns ``(1, C, N)``. Used where only a random subset of
    voxels is compared (MI on sampled points), which spares resampling the whole image.
    """
    ndim = image.dim() - 2
    if points.dim() != 2 or points.shape[1] != ndim:
        raise ValueError(f"points must be (N, {ndim}) voxel coordinates, got {tuple(points.shape)}")
    sizes = torch.tensor([max(n - 1, 1) for n in image.shape[2:]], dtype=points.dtype, device=points.device)
    grid = (points * (2.0 / sizes) - 1.0).flip(-1)  # grid_sample wants (x, y, z) = reversed axes
    grid = grid.reshape((1, -1) + (1,) * (ndim - 1) + (ndim,))
    values = torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode,
                                             align_corners=True)
    return values.reshape(1, image.shape[1], -1)


@lru_cache(maxsize=None)
def _dvf2ddf(steps: int) -> DVF2DDF:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample.*")
        return DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="zeros")


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring (MONAI ``DVF2DDF``): stationary velocity field -> diffeomorphic displacement.

    Both in voxel units on the same grid; ``steps`` squarings (the field is divided by 2**steps).
    """
    return _dvf2ddf(steps)(velocity)


def compose_fields(inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """Displacement of the map x -> y = x + inner(x) -> y + outer(y) (voxel units, same grid)."""
    return inner + warp(outer, inner, padding_mode="border")


def identity_ddf(spatial_shape, device=None) -> torch.Tensor:
    """A zero displacement field ``(1, ndim, *spatial_shape)``."""
    return torch.zeros((1, len(spatial_shape)) + tuple(spatial_shape), device=device)


def jacobian_determinant(field: sitk.Image, slab: int = 16) -> np.ndarray:
    """Jacobian determinant of x -> x + u(x) for a displacement image (LPS mm), in physical space.

    Derivatives are central differences in index space converted with the grid's spacing and
    direction, so anisotropic and oblique grids are handled. Returns a float32 numpy array in
    (z, y, x) order. Single-voxel axes contribute no derivative (2-D inputs). Computed in slabs
    of ``slab`` slices so large (CT-sized) grids need little extra memory.
    """
    u_all = sitk.GetArrayViewFromImage(field)  # (z, y, x, 3)
    size = field.GetSize()
    m_inv = np.linalg.inv(np.array(field.GetDirection()).reshape(3, 3) @ np.diag(field.GetSpacing()))
    nz = u_all.shape[0]
    out = np.empty(u_all.shape[:3], dtype=np.float32)
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        lo, hi = max(0, z0 - 1), min(nz, z1 + 1)  # one slice of context for central differences
        u = np.asarray(u_all[lo:hi], dtype=np.float64)
        du_di = np.zeros(u.shape + (3,))  # [..., component, index axis]
        for a in range(3):
            if size[a] > 1 and u.shape[2 - a] > 1:
                du_di[..., a] = np.gradient(u, axis=2 - a)
        jac = du_di @ m_inv + np.eye(3)  # du/dx = du/di @ di/dx
        out[z0:z1] = np.linalg.det(jac)[z0 - lo:z0 - lo + (z1 - z0)]
    return out
