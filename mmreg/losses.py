"""Differentiable image similarity losses and displacement regularisers (torch).

Conventions shared by everything in this module:

* Images are torch tensors shaped ``(B, C, *spatial)`` with 2 or 3 spatial dimensions
  (a 2-D case is a single-slice volume with the slice axis squeezed away). Spatial axes are
  in numpy order (z, y, x) on the isotropic network grid; lengths are in network voxels.
* Displacement fields ("ddf") are ``(B, ndim, *spatial)`` in network voxels; channel ``i``
  is the displacement along spatial axis ``i`` (numpy order).
* Optional ``mask`` arguments are ``(B, 1, *spatial)`` float or bool tensors, non-zero where
  the voxel counts; they are broadcast over channels.
* Every loss returns a scalar tensor to MINIMISE (lower is better), differentiable with
  respect to the image inputs.
* Bad arguments raise :class:`mmreg.errors.InputError` with a message naming the problem and
  the fix.

MONAI provides the mutual information (Gaussian Parzen window), local NCC, SSIM, diffusion
and bending energy terms; MIND-SSC (Heinrich et al., MICCAI 2013) is implemented here.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError

__all__ = [
    "mind_ssc",
    "mind_ssc_channels",
    "mind_loss_from_features",
    "MINDSSCLoss",
    "MutualInformationLoss",
    "mi_loss",
    "lncc_loss",
    "mse_loss",
    "ssim_loss",
    "diffusion_regulariser",
    "bending_energy",
    "LNCCLoss",
    "MSELoss",
    "SSIMLoss",
    "SIMILARITY_LOSSES",
    "similarity_loss",
]


# ----------------------------------------------------------------------------- checks


def _check_image(x, name: str = "image") -> int:
    """Validate one (B, C, *spatial) tensor; return the number of spatial dims (2 or 3)."""
    if not isinstance(x, torch.Tensor):
        raise InputError(
            f"{name} must be a torch.Tensor shaped (B, C, *spatial), got {type(x).__name__}; "
            "convert it with torch.as_tensor(...) and add batch/channel axes."
        )
    if x.ndim not in (4, 5):
        raise InputError(
            f"{name} must have 2 or 3 spatial dimensions, i.e. shape (B, C, H, W) or (B, C, D, H, W); "
            f"got shape {tuple(x.shape)}. Add the batch and channel axes with x[None, None]."
        )
    if not torch.is_floating_point(x):
        raise InputError(f"{name} must be a floating-point tensor, got {x.dtype}; use x.float().")
    return x.ndim - 2


def _check_pair(a, b, names=("a", "b")) -> int:
    nd = _check_image(a, names[0])
    _check_image(b, names[1])
    if a.shape != b.shape:
        raise InputError(
            f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}; "
            "resample both onto the same network grid first."
        )
    return nd


def _check_mask(mask, ref: torch.Tensor) -> Optional[torch.Tensor]:
    """Return the mask as a float tensor broadcastable to ``ref`` (or None)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"mask must be a torch.Tensor shaped (B, 1, *spatial), got {type(mask).__name__}.")
    expected = (ref.shape[0], 1) + tuple(ref.shape[2:])
    if mask.ndim != ref.ndim or mask.shape[1] != 1 or tuple(mask.shape[2:]) != tuple(ref.shape[2:]) or mask.shape[0] not in (1, ref.shape[0]):
        raise InputError(
            f"mask must be shaped {expected} (one channel, same spatial size as the images), "
            f"got {tuple(mask.shape)}; resample the mask onto the network grid and add batch/channel axes."
        )
    m = mask.to(device=ref.device, dtype=ref.dtype)
    return m


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``values`` (B, C, *spatial); with a mask, weighted by it (broadcast over channels)."""
    if mask is None:
        return values.mean()
    m = mask.expand_as(values)
    total = m.sum()
    if float(total.detach()) <= 0:
        raise InputError("mask is empty (no voxel counts); pass mask=None or a mask with at least one non-zero voxel.")
    return (values * m).sum() / total


# ----------------------------------------------------------------------------- MIND-SSC


def _ssc_pairs(ndim: int):
    """Pairs of neighbourhood offsets (unit distance) whose mutual distance is sqrt(2).

    3-D: the six-neighbourhood gives 12 pairs; 2-D: the four-neighbourhood gives 4 pairs.
    """
    nbrs = []
    for axis in range(ndim):
        for sign in (-1, 1):
            o = [0] * ndim
            o[axis] = sign
            nbrs.append(tuple(o))
    pairs = []
    for i in range(len(nbrs)):
        for j in range(i + 1, len(nbrs)):
            d2 = sum((p - q) ** 2 for p, q in zip(nbrs[i], nbrs[j]))
            if d2 == 2:
                pairs.append((nbrs[i], nbrs[j]))
    return pairs


def mind_ssc_channels(ndim: int) -> int:
    """Channels :func:`mind_ssc` makes of each input channel: 12 in 3-D, 4 in 2-D."""
    return len(_ssc_pairs(int(ndim)))


_PAD_MODE = "replicate"


def box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean filter of size ``2*radius+1`` voxels along every spatial axis of ``(B, C, *spatial)``,
    borders replicated; separable, each axis a sum of shifted slices (on the CPU about 4 times faster,
    forward and backward, than one ``avg_pool`` with a cubic kernel, as fast as 1-D ``avg_pool`` passes).
    Differentiable."""
    if radius <= 0:
        return x
    k = 2 * radius + 1
    for axis in range(2, x.ndim):
        n = x.shape[axis]
        edge_lo = x.narrow(axis, 0, 1).expand(*x.shape[:axis], radius, *x.shape[axis + 1:])
        edge_hi = x.narrow(axis, n - 1, 1).expand(*x.shape[:axis], radius, *x.shape[axis + 1:])
        padded = torch.cat([edge_lo, x, edge_hi], dim=axis)
        total = padded.narrow(axis, 0, n)
        for shift in range(1, k):
            total = total + padded.narrow(axis, shift, n)
        x = total / k
    return x


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor (modality independent neighbourhood descriptor, self-similarity context).

    Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions using
    self-similarities", MICCAI 2013; implementation follows the authors' ConvexAdam/PDD code.

    For every pair (p, q) of neighbourhood offsets at distance ``dilation`` voxels from the centre
    whose mutual distance is sqrt(2)*``dilation``, the patch distance
    ``D_pq(x) = box_filter((I(x+p) - I(x+q))^2)`` is computed with a box filter of size
    ``2*radius+1`` (voxels). Then ``D -= min_c D`` (so the largest channel per voxel is exactly 1),
    the variance estimate ``V(x) = mean_c D(x)`` is clamped to ``[1e-3, 1e3] * mean_x V`` (mean over
    each batch item's voxels) and the descriptor is ``exp(-D / V)`` with values in (0, 1].

    Args:
        image: (B, C, *spatial) float tensor, 2 or 3 spatial dims. Intensity scale does not matter
            (the descriptor is invariant to affine intensity changes, including inversion).
        radius: box-filter radius in voxels (>= 0).
        dilation: neighbour distance in voxels (>= 1).

    Returns:
        (B, C*K, *spatial) tensor with K = 12 channels per input channel in 3-D (pairs of the
        six-neighbourhood) and K = 4 in 2-D (pairs of the four-neighbourhood). Borders use
        replicate padding, so the output has the input's spatial size. Differentiable.
    """
    nd = _check_image(image, "image")
    if int(radius) != radius or radius < 0:
        raise InputError(f"radius must be an integer >= 0 (voxels), got {radius!r}.")
    if int(dilation) != dilation or dilation < 1:
        raise InputError(f"dilation must be an integer >= 1 (voxels), got {dilation!r}.")
    radius, dilation = int(radius), int(dilation)
    B, C = image.shape[:2]
    spatial = tuple(image.shape[2:])
    x = image.reshape(B * C, 1, *spatial)
    d = dilation
    xp = F.pad(x, [d] * (2 * nd), mode=_PAD_MODE)

    def shifted(off):
        sl = [slice(None), slice(None)]
        for axis, o in enumerate(off):
            start = d + o * d
            sl.append(slice(start, start + spatial[axis]))
        return xp[tuple(sl)]

    pairs = _ssc_pairs(nd)
    diffs = torch.cat([(shifted(p) - shifted(q)) ** 2 for p, q in pairs], dim=1)  # (BC, K, *sp)
    ssd = box_filter(diffs, radius)
    mind = ssd - ssd.min(dim=1, keepdim=True).values
    var = mind.mean(dim=1, keepdim=True)
    red = tuple(range(1, var.ndim))
    var_mean = var.detach().mean(dim=red, keepdim=True)
    var = torch.maximum(torch.minimum(var, var_mean * 1000.0), var_mean * 0.001)
    # A perfectly constant image has var_mean == 0: keep the descriptor finite (all ones).
    var = torch.clamp(var, min=torch.finfo(var.dtype).tiny)
    mind = torch.exp(-mind / var)
    K = len(pairs)
    return mind.reshape(B, C * K, *spatial)


def mind_loss_from_features(
    feat_warped: torch.Tensor, feat_fixed: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean squared difference of two precomputed MIND-SSC feature tensors (B, K, *spatial).

    With ``mask`` (B, 1, *spatial) the mean is taken over the masked voxels (and all channels).
    Returns a scalar >= 0 (0 for identical descriptors); differentiable.
    """
    _check_pair(feat_warped, feat_fixed, ("feat_warped", "feat_fixed"))
    m = _check_mask(mask, feat_warped)
    return _masked_mean((feat_warped - feat_fixed) ** 2, m)


class MINDSSCLoss(nn.Module):
    """MIND-SSC loss: mean squared difference of the MIND-SSC descriptors of two images.

    ``forward(warped, fixed, mask=None)`` -> scalar >= 0 (see :func:`mind_ssc` for ``radius`` and
    ``dilation``, both in voxels). Suited to multi-modal pairs (T1/T2, CT/MR).
    """

    def __init__(self, radius: int = 1, dilation: int = 2):
        super().__init__()
        self.radius = radius
        self.dilation = dilation

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_pair(warped, fixed, ("warped", "fixed"))
        fw = mind_ssc(warped, self.radius, self.dilation)
        ff = mind_ssc(fixed, self.radius, self.dilation)
        return mind_loss_from_features(fw, ff, mask)


# ----------------------------------------------------------------------------- mutual information


class MutualInformationLoss(nn.Module):
    """Negative mutual information with a Gaussian Parzen window (MONAI GlobalMutualInformationLoss).

    ``forward(a, b, mask=None)`` returns ``-MI(a, b)`` in nats, averaged over the batch.
    Intensities are expected in [0, 1] (normalise e.g. with percentiles first); values outside
    are clamped, and clamped voxels carry no gradient. ``num_bins`` bin centres span [0, 1]; the
    Gaussian window's sigma is ``sigma_ratio`` times the bin spacing.

    Voxels are the samples (all channels pooled). With ``mask`` only voxels where it is non-zero
    count. When a batch item has more than ``max_voxels`` samples, a uniform random subset of
    ``max_voxels`` voxel indices (the same for both images) is used, bounding memory at about
    ``2 * max_voxels * num_bins`` floats; pass a ``generator`` for reproducible subsets.
    """

    def __init__(self, num_bins: int = 32, sigma_ratio: float = 0.5, max_voxels: Optional[int] = 200_000,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        from monai.losses import GlobalMutualInformationLoss

        if int(num_bins) != num_bins or num_bins < 2:
            raise InputError(f"num_bins must be an integer >= 2, got {num_bins!r}.")
        if not sigma_ratio > 0:
            raise InputError(f"sigma_ratio must be > 0 (Parzen sigma in bin widths), got {sigma_ratio!r}.")
        if max_voxels is not None and (int(max_voxels) != max_voxels or max_voxels < 100):
            raise InputError(f"max_voxels must be None or an integer >= 100, got {max_voxels!r}.")
        self.num_bins = int(num_bins)
        self.sigma_ratio = float(sigma_ratio)
        self.max_voxels = None if max_voxels is None else int(max_voxels)
        self.generator = generator
        self._mi = GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=self.num_bins,
                                               sigma_ratio=self.sigma_ratio, reduction="mean")

    def _subsample(self, n: int, device) -> Optional[torch.Tensor]:
        if self.max_voxels is None or n <= self.max_voxels:
            return None
        gen = self.generator
        if gen is not None and gen.device != torch.device(device):
            idx = torch.randperm(n, generator=gen)[: self.max_voxels]
            return idx.to(device)
        return torch.randperm(n, generator=gen, device=device)[: self.max_voxels]

    def forward(self, a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_pair(a, b, ("a", "b"))
        m = _check_mask(mask, a)
        a = a.clamp(0.0, 1.0)
        b = b.clamp(0.0, 1.0)
        losses = []
        for i in range(a.shape[0]):
            ai = a[i].reshape(-1)
            bi = b[i].reshape(-1)
            if m is not None:
                mi_ = m[i if m.shape[0] > 1 else 0].expand_as(a[i]).reshape(-1)
                sel = torch.nonzero(mi_ > 0, as_tuple=False).squeeze(1)
                if sel.numel() < 2:
                    raise InputError(
                        f"mask of batch item {i} selects {sel.numel()} voxel(s); MI needs many samples. "
                        "Pass a larger mask or mask=None."
                    )
                sub = self._subsample(sel.numel(), a.device)
                if sub is not None:
                    sel = sel[sub]
                ai, bi = ai[sel], bi[sel]
            else:
                sub = self._subsample(ai.numel(), a.device)
                if sub is not None:
                    ai, bi = ai[sub], bi[sub]
            losses.append(self._mi(ai[None, None], bi[None, None]))
        return torch.stack(losses).mean()


def mi_loss(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None, num_bins: int = 32,
            sigma_ratio: float = 0.5, max_voxels: Optional[int] = 200_000) -> torch.Tensor:
    """Functional form of :class:`MutualInformationLoss`: ``-MI(a, b)`` in nats, intensities in [0, 1]."""
    return MutualInformationLoss(num_bins, sigma_ratio, max_voxels).to(a.device)(a, b, mask)


# ----------------------------------------------------------------------------- simple MONAI wrappers


def lncc_loss(a: torch.Tensor, b: torch.Tensor, kernel_size: int = 9, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Negative local (squared) normalised cross-correlation (MONAI LocalNormalizedCrossCorrelationLoss).

    Square window of ``kernel_size`` voxels (odd). Returns ``-mean(LNCC^2)`` in [-1, 0]: -1 where
    both images have texture and are locally linearly related; flat windows contribute 0.
    With ``mask`` the mean is over masked voxels.
    """
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    nd = _check_pair(a, b)
    if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
        raise InputError(f"kernel_size must be an odd integer >= 1 (voxels), got {kernel_size!r}.")
    m = _check_mask(mask, a)
    fn = LocalNormalizedCrossCorrelationLoss(spatial_dims=nd, kernel_size=int(kernel_size),
                                             kernel_type="rectangular", reduction="none")
    return _masked_mean(fn(a, b), m)


def mse_loss(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared intensity difference (intensity units squared); masked mean with ``mask``."""
    _check_pair(a, b)
    m = _check_mask(mask, a)
    return _masked_mean((a - b) ** 2, m)


def ssim_loss(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None, data_range: float = 1.0,
              win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """``1 - SSIM(a, b)`` (MONAI SSIM, Gaussian window ``win_size`` voxels, ``sigma`` voxels).

    ``data_range`` is the intensity range (1 for images normalised to [0, 1]). 0 for identical
    images, up to 2 for anti-correlated ones. The SSIM map covers the voxels whose whole window
    lies inside the image (valid convolution, as in MONAI SSIMLoss); with ``mask`` the mean is over
    masked voxels of that region (mask voxels within ``win_size // 2`` of the border do not count). Every spatial size must be >= ``win_size``.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    nd = _check_pair(a, b)
    if int(win_size) != win_size or win_size < 1 or win_size % 2 == 0:
        raise InputError(f"win_size must be an odd integer >= 1 (voxels), got {win_size!r}.")
    if min(a.shape[2:]) < win_size:
        raise InputError(
            f"ssim_loss needs every spatial size >= win_size={win_size}, got {tuple(a.shape[2:])}; "
            "use a smaller win_size or a larger image."
        )
    if not data_range > 0:
        raise InputError(f"data_range must be > 0, got {data_range!r}.")
    m = _check_mask(mask, a)
    ssim_map, _ = compute_ssim_and_cs(a, b, spatial_dims=nd, kernel_size=[int(win_size)] * nd,
                                      kernel_sigma=[float(sigma)] * nd, data_range=float(data_range))
    ssim_map = ssim_map.to(a.dtype)
    if m is not None:
        h = win_size // 2
        m = m[(slice(None), slice(None)) + tuple(slice(h, s - h) for s in m.shape[2:])]
    return 1.0 - _masked_mean(ssim_map, m)


@contextlib.contextmanager
def _quiet_monai_indexing():
    """Silence torch's deprecation warning about MONAI's list-based slicing in its deform losses."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
        yield


def _check_ddf(ddf, name="ddf") -> int:
    nd = _check_image(ddf, name)
    if ddf.shape[1] != nd:
        raise InputError(
            f"{name} must be shaped (B, ndim, *spatial) with ndim={nd} displacement components, "
            f"got {tuple(ddf.shape)}; put the vector components on axis 1."
        )
    return nd


def diffusion_regulariser(ddf: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser (MONAI DiffusionLoss) of a displacement field (B, ndim, *spatial), voxel units.

    Central differences ``g_cd = (u_c[x+e_d] - u_c[x-e_d]) / 2`` on interior voxels; returns
    ``mean over batch, components c and voxels of sum_d g_cd^2`` (i.e. the squared Frobenius norm
    of the displacement Jacobian divided by ndim). A constant field gives 0; the ramp
    ``u_0 = a * x_0`` gives ``a^2 / ndim``. Every spatial size must be > 2.
    """
    from monai.losses import DiffusionLoss

    _check_ddf(ddf)
    if min(ddf.shape[2:]) <= 2:
        raise InputError(f"diffusion_regulariser needs every spatial size > 2, got {tuple(ddf.shape[2:])}.")
    with _quiet_monai_indexing():
        return DiffusionLoss(normalize=False, reduction="mean")(ddf)


def bending_energy(ddf: torch.Tensor) -> torch.Tensor:
    """Bending energy (MONAI BendingEnergyLoss) of a displacement field (B, ndim, *spatial), voxel units.

    Sum over all second derivatives ``d2u_c / dx_i dx_j`` squared (mixed terms counted twice),
    averaged over batch, components and interior voxels. 0 for any affine field. Every spatial
    size must be > 4.
    """
    from monai.losses import BendingEnergyLoss

    _check_ddf(ddf)
    if min(ddf.shape[2:]) <= 4:
        raise InputError(f"bending_energy needs every spatial size > 4, got {tuple(ddf.shape[2:])}.")
    with _quiet_monai_indexing():
        return BendingEnergyLoss(normalize=False, reduction="mean")(ddf)


# ----------------------------------------------------------------------------- uniform modules


class LNCCLoss(nn.Module):
    """Module form of :func:`lncc_loss`: ``forward(warped, fixed, mask=None)``."""

    def __init__(self, kernel_size: int = 9):
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, warped, fixed, mask=None):
        return lncc_loss(warped, fixed, self.kernel_size, mask=mask)


class MSELoss(nn.Module):
    """Module form of :func:`mse_loss`: ``forward(warped, fixed, mask=None)``."""

    def forward(self, warped, fixed, mask=None):
        return mse_loss(warped, fixed, mask)


class SSIMLoss(nn.Module):
    """Module form of :func:`ssim_loss`: ``forward(warped, fixed, mask=None)``, data range 1 by default."""

    def __init__(self, data_range: float = 1.0, win_size: int = 11):
        super().__init__()
        self.data_range = data_range
        self.win_size = win_size

    def forward(self, warped, fixed, mask=None):
        return ssim_loss(warped, fixed, mask=mask, data_range=self.data_range, win_size=self.win_size)


#: Name -> factory. ``SIMILARITY_LOSSES[name](**kwargs)`` returns an ``nn.Module`` whose
#: ``forward(warped, fixed, mask=None)`` is a scalar to minimise.
SIMILARITY_LOSSES: Dict[str, Callable[..., nn.Module]] = {
    "mind": MINDSSCLoss,
    "mi": MutualInformationLoss,
    "lncc": LNCCLoss,
    "mse": MSELoss,
    "ssim": SSIMLoss,
}


def similarity_loss(name: str, **kwargs) -> nn.Module:
    """Build a similarity loss by name (one of ``SIMILARITY_LOSSES``), passing ``kwargs`` to its factory."""
    key = str(name).lower()
    if key not in SIMILARITY_LOSSES:
        raise InputError(f"unknown similarity loss {name!r}; choose one of {sorted(SIMILARITY_LOSSES)}.")
    return SIMILARITY_LOSSES[key](**kwargs)
