"""A learned similarity metric for multi-modal patches (method ``metric``; Simonovsky et al., MICCAI 2016).

The network N (:class:`PatchMetricNet`) reads two same-size cubic patches of two modalities as ONE
2-channel 3-D input (not a siamese pair) and returns a dissimilarity score: low (about -1) when
the patches show the same anatomy, high (about +1) when they do not. Volumetric convolutions with
ReLU, strided convolutions instead of pooling, and a last convolution without non-linearity. The
paper's network has 5 layers and about 2M parameters at patch 17 and overall stride 4; ours keeps
the 5 layers, the patch of 17 voxels and the stride of 4 with narrower layers (16-32 channels,
about 70k parameters by default) so that the dense evaluation inside an optimisation loop runs on a
2-core CPU (a 2 mm brain in about 0.1 s forward); the widths are architecture settings of a model.

Convolutions are "valid" (no padding), so applied to whole images the network is evaluated fully
convolutionally on a dense grid of overlapping patches (:func:`dense_dissimilarity`): output
voxel ``i`` scores the patch whose first voxel is input voxel ``stride * i``.

Training (:func:`train_metric`, ``mmreg train --method metric``) needs only ALIGNED pairs of two
modalities. Samples are drawn online (:class:`AlignedPatchSampler`): a position inside the
foreground and a transformation (rotation, scale, mirroring) define the patch of modality A;
with equal probability the patch of modality B is taken with the SAME transformation (positive,
label -1) or with a different one (negative, label +1; a shifted position, an independent
rotation/scale/mirroring, or a random position). Loss: hinge ``max(0, 1 - y N(x))`` (the paper
found cross-entropy gives too flat gradients); SGD with momentum 0.9, learning rate 0.01, batch 128.

Tensor conventions: ``(B, C, *spatial)``, spatial axes in numpy order (z, y, x); positions and
offsets in voxels of the image the patches come from.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

#: Default architecture: 5 convolutions (kernels 5, 3, 3, 2, 1; strides 2, 1, 2, 1, 1): patch 17, stride 4.
DEFAULT_METRIC_ARCHITECTURE = {"kind": "patch_metric_cnn", "spatial_dims": 3, "channels": [16, 32, 32, 32],
                               "kernels": [5, 3, 3, 2], "strides": [2, 1, 2, 1]}


def receptive_field(architecture: dict) -> tuple:
    """``(patch, stride)``: the patch size (voxels) one output score sees, and the output spacing in voxels."""
    patch, jump = 1, 1
    for k, s in zip(architecture["kernels"], architecture["strides"]):
        patch += (int(k) - 1) * jump
        jump *= int(s)
    return patch, jump


def check_metric_architecture(architecture: dict) -> None:
    """:class:`InputError` naming the key when a metric architecture is malformed."""
    arch = architecture
    if arch.get("kind") != "patch_metric_cnn":
        raise InputError(f"architecture.kind must be \"patch_metric_cnn\" for the learned metric, got {arch.get('kind')!r}.")
    lists = [arch.get(k) for k in ("channels", "kernels", "strides")]
    if not all(isinstance(v, list) and v and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in v)
               for v in lists) or len({len(v) for v in lists}) != 1:
        raise InputError("architecture.channels, kernels and strides must be lists of positive integers of one length, "
                         f"got {lists}.")
    if int(arch.get("spatial_dims", 3)) not in (2, 3):
        raise InputError(f"architecture.spatial_dims must be 2 or 3, got {arch.get('spatial_dims')}.")


class PatchMetricNet(nn.Module):
    """The 2-channel patch CNN: ``forward(x)`` with ``x = cat(a, b)`` ``(B, 2, *spatial)`` gives the
    dissimilarity score map ``(B, 1, *out)`` (one score per ``patch``-voxel patch, every ``stride`` voxels).
    On a ``(B, 2, patch, patch, patch)`` input the output is ``(B, 1, 1, 1, 1)``."""

    def __init__(self, architecture: dict | None = None):
        super().__init__()
        arch = dict(DEFAULT_METRIC_ARCHITECTURE, **(architecture or {}))
        check_metric_architecture(arch)
        self.architecture = arch
        conv = nn.Conv3d if int(arch["spatial_dims"]) == 3 else nn.Conv2d
        layers, c_in = [], 2
        for c, k, s in zip(arch["channels"], arch["kernels"], arch["strides"]):
            layers += [conv(c_in, int(c), int(k), stride=int(s)), nn.ReLU(inplace=True)]
            c_in = int(c)
        layers.append(conv(c_in, 1, 1))  # the score: no non-linearity
        self.layers = nn.Sequential(*layers)
        self.patch, self.stride = receptive_field(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see the class doc
        return self.layers(x)


def patch_metric_network(architecture: dict | None = None) -> PatchMetricNet:
    """Build the metric network an architecture dict (a model card's) describes."""
    return PatchMetricNet(architecture)


def patch_weights(mask: torch.Tensor, architecture: dict) -> torch.Tensor:
    """Per-score weights from a ``(B, 1, *spatial)`` mask on the network's output grid: the mask
    average-pooled through the layers' kernels and strides (same output shape as the network; about
    the fraction of each patch inside the mask)."""
    pool = F.avg_pool3d if mask.dim() == 5 else F.avg_pool2d
    w = mask.float()
    for k, s in zip(architecture["kernels"], architecture["strides"]):
        w = pool(w, int(k), stride=int(s))
    return w


def dense_dissimilarity(network: PatchMetricNet, fixed: torch.Tensor, moving: torch.Tensor,
                        mask: torch.Tensor | None = None, min_inside: float = 0.5) -> torch.Tensor:
    """The learned metric over whole images: the mean of N over the dense grid of overlapping patches
    (lower = more similar; differentiable with respect to both images).

    ``fixed`` / ``moving``: ``(B, 1, *spatial)`` on one grid, intensities in [0, 1], each side at
    least one patch; ``mask`` (optional, same shape): only patches with at least ``min_inside`` of
    their voxels in the mask count. Channel order is (fixed, moving); shipped metrics are trained
    with both orders, so either image may be either modality.
    """
    if fixed.shape != moving.shape:
        raise InputError(f"fixed and moving must have one shape, got {tuple(fixed.shape)} and {tuple(moving.shape)}.")
    if min(fixed.shape[2:]) < network.patch:
        raise InputError(f"The images ({tuple(fixed.shape[2:])} voxels) are smaller than one metric patch "
                         f"({network.patch} voxels); use a finer network grid or a larger field of view.")
    scores = network(torch.cat([fixed, moving], dim=1))
    if mask is None:
        return scores.mean()
    w = (patch_weights(mask, network.architecture) >= min_inside).float()
    total = w.sum()
    if float(total) < 1:
        return scores.mean()
    return (scores * w).sum() / total


def hinge_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``mean(max(0, 1 - y * N(x)))`` with ``y`` = -1 for aligned (positive) and +1 for misaligned samples."""
    return F.relu(1.0 - labels * scores.reshape(-1)).mean()


def ranking_loss(aligned: torch.Tensor, shifted: torch.Tensor, shift_voxels: torch.Tensor,
                 margin_per_voxel: float) -> torch.Tensor:
    """``mean(max(0, m * s - (N(shifted) - N(aligned))))``: the score of a patch pair must rise by at
    least ``margin_per_voxel`` (m) per voxel of shift ``s`` of the modality-B patch. Not in the paper:
    the hinge loss alone leaves every pair closer than its smallest shifted negative at the
    "aligned" margin, a flat bottom several mm wide that gives the optimiser no direction near
    alignment; this term asks for a V-shaped score around it."""
    rise = shifted.reshape(-1) - aligned.reshape(-1)
    return F.relu(float(margin_per_voxel) * shift_voxels.reshape(-1) - rise).mean()


# ----------------------------------------------------------------------------- online patch sampling


def random_rotation(rng: np.random.Generator, max_deg: float, ndim: int = 3) -> np.ndarray:
    """A rotation matrix: a uniformly random axis (3-D) and an angle uniform in [-max_deg, max_deg]."""
    angle = math.radians(rng.uniform(-max_deg, max_deg))
    if ndim == 2:
        c, s = math.cos(angle), math.sin(angle)
        return np.array([[c, -s], [s, c]])
    axis = rng.normal(size=3)
    axis /= max(np.linalg.norm(axis), 1e-9)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


class AlignedPatchSampler:
    """Online positive/negative patch pairs from aligned image pairs (see the module doc).

    ``pairs``: list of ``(name, a, b)`` with ``a``/``b`` numpy arrays (z, y, x) on one grid, intensities in
    [0, 1], the same anatomy in both. ``patch``: patch size (voxels). ``settings``: a
    :class:`mmreg.training.MetricTrainConfig` (rotation, scale, mirroring, coarse level, negatives,
    intensity augmentation, channel swap). ``device``: where patches are made.
    """

    def __init__(self, pairs: list, patch: int, settings, device="cpu"):
        if not pairs:
            raise InputError("The learned metric needs at least one aligned pair to sample patches from.")
        self.patch, self.settings, self.device = int(patch), settings, torch.device(device)
        self.names = [p[0] for p in pairs]
        self.levels = []  # per pair: [(a, b, foreground positions)] for level 0 (as given) and 1 (half resolution)
        for name, a, b in pairs:
            if a.shape != b.shape:
                raise InputError(f"Aligned pair {name}: the two images have different shapes {a.shape} and {b.shape}.")
            ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(self.device)
            tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))[None, None].to(self.device)
            per_level = []
            for level in (0, 1):
                la, lb = (ta, tb) if level == 0 else (F.avg_pool3d(ta, 2), F.avg_pool3d(tb, 2))
                fg = torch.nonzero((torch.maximum(la, lb)[0, 0] > float(settings.foreground_threshold))).cpu().numpy()
                if len(fg) == 0:
                    raise InputError(f"Aligned pair {name}: no foreground (every voxel below "
                                     f"{settings.foreground_threshold} after normalisation).")
                per_level.append((la, lb, fg.astype(np.float64)))
            self.levels.append(per_level)
        self.adversarial = {}  # pair -> {level: (displacement (1, 3, *spatial) in level voxels, candidate centres)}
        r = (self.patch - 1) / 2.0
        axis = np.linspace(-r, r, self.patch)
        self.offsets = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)  # (P^3, 3) z, y, x

    def _transform(self, rng: np.random.Generator) -> np.ndarray:
        s = self.settings
        scale = math.exp(rng.uniform(-math.log(s.scale_range), math.log(s.scale_range))) if s.scale_range > 1 else 1.0
        mat = random_rotation(rng, s.rotation_deg) * scale
        if s.mirror:
            mat = mat @ np.diag(rng.choice([-1.0, 1.0], size=3))
        return mat

    def _points(self, centre: np.ndarray, mat: np.ndarray) -> np.ndarray:
        return centre + self.offsets @ mat.T  # (P^3, 3) voxel positions (z, y, x)

    @staticmethod
    def _normalise(points: np.ndarray, shape) -> np.ndarray:
        size = np.array(shape[-3:], dtype=np.float64)
        norm = 2.0 * points / np.maximum(size - 1, 1) - 1.0  # align_corners=True
        return norm[:, ::-1]  # grid_sample wants (x, y, z)

    def batch(self, rng: np.random.Generator, n: int, pair_indices=None) -> tuple:
        """``(x, y, kinds)``: ``x`` ``(n, 2, P, P, P)`` patch pairs, ``y`` ``(n,)`` labels (-1 aligned, +1 not),
        ``kinds``: "positive" or the kind of negative, per sample. Half of the samples are positives.
        ``pair_indices``: the pair of each sample (default: uniformly random)."""
        s = self.settings
        # "adversarial" negatives exist only once a deformation was mined (set_adversarial); until then,
        # and in samplers without any (validation), the other kinds share its weight
        mix = {k: v for k, v in s.negatives.items() if k != "adversarial" or self.adversarial}
        if sum(mix.values()) <= 0:
            mix = {"shift": 1.0}
        kinds_all, probs = list(mix), np.array(list(mix.values()), dtype=np.float64)
        probs = probs / probs.sum()
        grids = {}  # (pair, level) -> ([grid_a], [grid_b], [sample index])
        labels = np.empty(n, dtype=np.float32)
        kinds = []
        for i in range(n):
            pair, level, centre, mat = self._draw_place(rng, i, pair_indices)
            fg = self.levels[pair][level][2]
            pa = self._points(centre, mat)
            if rng.uniform() < 0.5:
                pb, labels[i], kind = pa, -1.0, "positive"
            else:
                labels[i] = 1.0
                kind = kinds_all[int(rng.choice(len(kinds_all), p=probs))]
                if kind == "shift":
                    d = rng.normal(size=3)
                    d *= rng.uniform(*s.negative_shift_voxels) / max(np.linalg.norm(d), 1e-9)
                    pb = self._points(centre + d, mat)
                elif kind == "transform":
                    pb = self._points(centre, self._transform(rng))
                elif kind == "adversarial":  # B through a deformation the metric wrongly prefers (set_adversarial)
                    pair, level, centre = self._adversarial_place(rng, level)
                    pa = self._points(centre, mat)
                    pb = pa + self._displacement_at(pair, level, pa)
                else:  # "random": anywhere in the foreground
                    pb = self._points(fg[int(rng.integers(len(fg)))] + rng.uniform(-0.5, 0.5, 3), self._transform(rng))
            kinds.append(kind)
            self._add(grids, pair, level, i, pa, pb)
        x = self._augment_intensity(self._sample(grids, n), rng)
        return x, torch.from_numpy(labels).to(self.device), kinds

    def shifted_batch(self, rng: np.random.Generator, n: int, pair_indices=None, adversarial: bool = False) -> tuple:
        """``(x_aligned, x_shifted, shift)`` for the ranking term (not in the paper; see
        :func:`ranking_loss`): ``n`` aligned patch pairs drawn like the positives of :meth:`batch`, the
        same pairs with the modality-B patch moved by ``shift`` voxels (``(n,)``, uniform in
        ``settings.ranking_shift_voxels``, random direction, in voxels of the sample's level), and one
        intensity augmentation shared by both members of a sample. ``adversarial``: instead, the
        modality-B patch is taken through a mined deformation (:meth:`set_adversarial`; patch centres
        and pairs as for "adversarial" negatives) and ``shift`` is its length at the patch centre."""
        lo, hi = self.settings.ranking_shift_voxels
        if adversarial and not self.adversarial:
            raise InputError("No adversarial deformation has been mined yet (set_adversarial).")
        aligned, shifted, shifts = {}, {}, np.empty(n, dtype=np.float32)
        for i in range(n):
            pair, level, centre, mat = self._draw_place(rng, i, pair_indices)
            if adversarial:
                pair, level, centre = self._adversarial_place(rng, level)
                pa = self._points(centre, mat)
                u = self._displacement_at(pair, level, np.vstack([pa, centre[None]]))
                pb, shifts[i] = pa + u[:-1], np.linalg.norm(u[-1])
            else:
                d = rng.normal(size=3)
                shifts[i] = rng.uniform(lo, hi)
                d *= shifts[i] / max(np.linalg.norm(d), 1e-9)
                pa = self._points(centre, mat)
                pb = self._points(centre + d, mat)
            self._add(aligned, pair, level, i, pa, pa)
            self._add(shifted, pair, level, i, pa, pb)
        twin = copy.deepcopy(rng)  # the same gamma, noise and channel order for both members
        x0 = self._augment_intensity(self._sample(aligned, n), rng)
        x1 = self._augment_intensity(self._sample(shifted, n), twin)
        return x0, x1, torch.from_numpy(shifts).to(self.device)

    def set_adversarial(self, pair: int, displacement: torch.Tensor, min_voxels: float) -> dict:
        """Use ``displacement`` (``(1, 3, *spatial)``, voxels of pair ``pair``'s grid, (z, y, x) channels,
        resampling convention: point x of image a pairs with x + u(x) of image b) for "adversarial"
        negatives of that pair: patches of b taken through it, centred on foreground voxels it moves by
        at least ``min_voxels`` voxels (replaces the pair's earlier deformation). Returns
        ``{"candidates": centres at full resolution, "median_voxels", "p90_voxels"}`` (over the foreground)."""
        u0 = displacement.detach().to(self.device, torch.float32)
        expected = tuple(self.levels[pair][0][0].shape[2:])
        if u0.dim() != 5 or u0.shape[:2] != (1, 3) or tuple(u0.shape[2:]) != expected:
            raise InputError(f"Adversarial displacement of pair {self.names[pair]}: expected shape (1, 3, "
                             f"{', '.join(map(str, expected))}), got {tuple(u0.shape)}.")
        entry, stats = {}, {}
        for level in (0, 1):
            u = u0 if level == 0 else F.avg_pool3d(u0, 2) / 2.0
            fg = self.levels[pair][level][2]
            idx = fg.astype(np.int64)
            mag = torch.linalg.vector_norm(u[0], dim=0).cpu().numpy()[idx[:, 0], idx[:, 1], idx[:, 2]] * 2 ** level
            keep = fg[mag >= float(min_voxels)]
            if level == 0:
                stats = {"candidates": int(len(keep)), "median_voxels": float(np.median(mag)),
                         "p90_voxels": float(np.percentile(mag, 90))}
            if len(keep):
                entry[level] = (u, keep)
        if entry:
            self.adversarial[pair] = entry
        else:
            self.adversarial.pop(pair, None)
        return stats

    def _adversarial_place(self, rng: np.random.Generator, level: int) -> tuple:
        """A mined pair (uniformly), the level (``level`` when that pair has candidates there) and a centre."""
        pairs = sorted(self.adversarial)
        pair = pairs[int(rng.integers(len(pairs)))]
        entry = self.adversarial[pair]
        level = level if level in entry else next(iter(entry))
        keep = entry[level][1]
        return pair, level, keep[int(rng.integers(len(keep)))] + rng.uniform(-0.5, 0.5, 3)

    def _displacement_at(self, pair: int, level: int, points: np.ndarray) -> np.ndarray:
        """The mined displacement of ``pair`` (voxels of ``level``, (z, y, x)) at ``points`` ``(N, 3)`` (trilinear)."""
        u = self.adversarial[pair][level][0]
        grid = torch.from_numpy(self._normalise(points, u.shape).astype(np.float32)).to(self.device)
        vals = F.grid_sample(u, grid.reshape(1, -1, 1, 1, 3), mode="bilinear", padding_mode="border", align_corners=True)
        return vals.reshape(3, -1).T.cpu().numpy().astype(np.float64)

    def _draw_place(self, rng: np.random.Generator, i: int, pair_indices) -> tuple:
        """Pair, pyramid level, patch centre (voxels, inside the foreground) and transformation of sample ``i``."""
        pair = int(pair_indices[i]) if pair_indices is not None else int(rng.integers(len(self.levels)))
        level = 1 if rng.uniform() < self.settings.coarse_fraction else 0
        fg = self.levels[pair][level][2]
        centre = fg[int(rng.integers(len(fg)))] + rng.uniform(-0.5, 0.5, 3)
        return pair, level, centre, self._transform(rng)

    def _add(self, grids: dict, pair: int, level: int, i: int, pa: np.ndarray, pb: np.ndarray) -> None:
        shape = self.levels[pair][level][0].shape
        entry = grids.setdefault((pair, level), ([], [], []))
        entry[0].append(self._normalise(pa, shape))
        entry[1].append(self._normalise(pb, shape))
        entry[2].append(i)

    def _sample(self, grids: dict, n: int) -> torch.Tensor:
        """The ``(n, 2, P, P, P)`` patches at the sample points collected by :meth:`_add` (trilinear, zeros outside)."""
        P = self.patch
        x = torch.empty((n, 2, P, P, P), device=self.device)
        for (pair, level), (ga, gb, idx) in grids.items():
            la, lb, _ = self.levels[pair][level]
            for ch, (img, g) in enumerate(((la, ga), (lb, gb))):
                grid = torch.from_numpy(np.stack(g).astype(np.float32)).to(self.device).reshape(1, len(idx) * P, P, P, 3)
                vals = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
                x[idx, ch] = vals.reshape(len(idx), P, P, P)
        return x

    def _augment_intensity(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        s = self.settings
        n = x.shape[0]
        if s.gamma > 0:
            g = torch.from_numpy(np.exp(rng.uniform(-s.gamma, s.gamma, (n, 2))).astype(np.float32)).to(x.device)
            x = x.clamp_min(0.0) ** g[:, :, None, None, None]
        if s.noise_std > 0:
            sd = torch.from_numpy(rng.uniform(0.0, s.noise_std, (n, 2)).astype(np.float32)).to(x.device)
            gen = torch.Generator(device=x.device).manual_seed(int(rng.integers(2**31)))
            x = x + sd[:, :, None, None, None] * torch.randn(x.shape, generator=gen, device=x.device)
        if s.swap_channels:
            swap = torch.from_numpy(rng.uniform(size=n) < 0.5).to(x.device)
            x = torch.where(swap[:, None, None, None, None], x.flip(1), x)
        return x


def adversarial_displacement(network: PatchMetricNet, a: np.ndarray, b: np.ndarray, spacing_mm: float, *,
                             iterations: int = 60, control_spacing_mm: float = 16.0, levels: int = 2,
                             device="cpu", progress=None) -> tuple:
    """What the registration pipeline does to an ALIGNED pair with ``network`` as its similarity:
    ``(displacement, info)``. Not in the paper (hard-negative mining for adversarial negatives,
    :class:`mmreg.training.MetricTrainConfig`).

    ``a`` (fixed) / ``b`` (moving): numpy arrays (z, y, x) on one grid of ``spacing_mm`` mm voxels,
    intensities in [0, 1], already aligned. Runs the method's B-spline stage
    (:func:`mmreg.methods.metric.metric_registration`, no similarity stage) from the identity with
    ``iterations`` steps per level, ``levels`` resolutions and ``control_spacing_mm`` (on the pair
    cropped by up to ``2**(levels-1) - 1`` voxels per axis so that the pyramid fits, as the pipeline's
    padded grids do; the displacement is extended over the cropped voxels). The true
    alignment is the identity, so every displacement found is one the metric scores better than the
    truth. ``displacement``: ``(1, 3, *spatial)`` in voxels of the grid, (z, y, x) channels,
    resampling convention (point x of a pairs with x + u(x) of b). ``info``: the metric's mean patch
    score over the whole grid before and after (``"score_before"``, ``"score_after"``). The network's
    weights are not changed (their gradients are switched off while it runs) and its train/eval mode
    is restored.
    """
    from .grid import NetworkGrid  # noqa: PLC0415
    from .methods.base import GridInputs  # noqa: PLC0415
    from .methods.metric import metric_registration  # noqa: PLC0415
    from .spatial import warp  # noqa: PLC0415

    if a.shape != b.shape or a.ndim != 3:
        raise InputError(f"adversarial_displacement needs two 3-D arrays of one shape, got {a.shape} and {b.shape}.")
    dev = torch.device(device)
    # The pipeline's pyramid needs sizes divisible by 2 per coarser level (its grids are padded so): crop
    # the last voxels of the pair here, and extend the displacement over them at the end.
    m = 2 ** (max(int(levels), 1) - 1)
    crop = tuple(n - n % m if n - n % m >= 8 * m else n for n in a.shape)
    ta = torch.from_numpy(np.ascontiguousarray(a[:crop[0], :crop[1], :crop[2]], dtype=np.float32))[None, None].to(dev)
    tb = torch.from_numpy(np.ascontiguousarray(b[:crop[0], :crop[1], :crop[2]], dtype=np.float32))[None, None].to(dev)
    grid = NetworkGrid(tuple(int(n) for n in crop[::-1]), (float(spacing_mm),) * 3, (0.0, 0.0, 0.0),
                       tuple(float(v) for v in np.eye(3).ravel()))
    ones = torch.ones_like(ta)
    inputs = GridInputs(grid=grid, fixed=ta, moving=tb, fixed_mask=ones, moving_mask=ones, device=dev)
    was_training = network.training
    wanted = [p.requires_grad for p in network.parameters()]
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            before = float(dense_dissimilarity(network, ta, tb))
        ddf = metric_registration(inputs, similarity="learned", network=network, transform="bspline",
                                  control_spacing_mm=control_spacing_mm, levels=levels, iterations_similarity=0,
                                  iterations_bspline=int(iterations), progress=progress)
        with torch.no_grad():
            after = float(dense_dissimilarity(network, ta, warp(tb, ddf)))
    finally:
        for p, w in zip(network.parameters(), wanted):
            p.requires_grad_(w)
        network.train(was_training)
    pad = [0, a.shape[2] - crop[2], 0, a.shape[1] - crop[1], 0, a.shape[0] - crop[0]]
    if any(pad):
        ddf = F.pad(ddf, pad, mode="replicate")
    return ddf, {"score_before": before, "score_after": after}


# ----------------------------------------------------------------------------- training data

#: Image kinds of the shared data the metric can be trained on (``[metric] pairs = ["A-B", ...]``).
SHARED_IMAGES = {"T1": ("spm", "canonical_avg152T1.nii.gz", "MR"), "T2": ("spm", "canonical_avg152T2.nii.gz", "MR"),
                 "PD": ("spm", "canonical_avg152PD.nii.gz", "MR"), "CT": ("ct", "scct_cormack.nii.gz", "MR"),
                 "CTHU": ("ct", "scct_stripped_hu.nii.gz", "CT")}
#: Aligned pairs of the shared data, by name.
SHARED_PAIRS = ("T1-T2", "T1-PD", "T2-PD", "CT-T1", "CT-T2", "CT-PD", "CTHU-T1", "CTHU-T2", "CTHU-PD", "IXI-synth")
#: Synthesised contrasts per IXI subject for the "IXI-synth" pairs.
SYNTH_PER_SUBJECT = 3


def _shared_pair_arrays(names: list, cfg, subjects: list, seed: int, prog) -> list:
    """``[(kind, name, a, b)]`` for the shared-data pair names (see :data:`SHARED_PAIRS`) on the avg152 grid."""
    import SimpleITK as sitk  # noqa: PLC0415

    from .bench.cases import CT_DIR, SPM_DIR, data_dir  # noqa: PLC0415
    from .intensity import normalize_intensity  # noqa: PLC0415
    from .training import prepare_ixi, remap_intensities, template_grid  # noqa: PLC0415

    root = data_dir(cfg.data.root)
    out, images, grid = [], {}, None
    for name in names:
        if name == "IXI-synth":
            data = prepare_ixi(cfg, None)
            chosen = data.training if subjects == "training" else data.validation
            for subject in chosen:
                for k in range(SYNTH_PER_SUBJECT):
                    rng = np.random.default_rng([seed, k, int(subject.id[3:]) if subject.id[3:].isdigit() else 0])
                    t1 = torch.from_numpy(subject.image.astype(np.float32))
                    out.append(("IXI-synth", f"{subject.id}~synth{k}", subject.image.astype(np.float32),
                                remap_intensities(t1, rng).numpy()))
            continue
        for kind in name.split("-"):
            if kind not in images:
                folder, file, modality = SHARED_IMAGES[kind]
                path = root / (SPM_DIR if folder == "spm" else CT_DIR) / file
                if not path.is_file():
                    raise InputError(f"The shared image '{path}' for the metric pair {name} is missing; check the data folder.")
                img = sitk.ReadImage(str(path), sitk.sitkFloat32)
                if grid is None:
                    grid = template_grid(img, cfg.spacing_mm, 1, cfg.grid_size)
                norm, _ = normalize_intensity(img, modality)
                images[kind] = sitk.GetArrayFromImage(grid.resample(norm)).reshape(grid.spatial_shape).astype(np.float32)
        a, b = name.split("-")
        out.append((name, name, images[a], images[b]))
    return out


def prepare_metric_pairs(cfg, progress=None, log=None) -> tuple:
    """``(train, validation, info)``: the aligned pairs of a metric training run.

    ``train`` / ``validation``: lists of ``(kind, name, a, b)`` (arrays z, y, x in [0, 1], one grid
    per pair). From ``cfg.data.manifest`` (each row an ALIGNED pair: fixed = modality A, moving =
    modality B, resampled onto the fixed image's grid at ``cfg.spacing_mm`` without any
    pre-alignment; its validation split as for other methods) or, without a manifest, from the
    shared data per ``cfg.metric.pairs`` / ``validation_pairs``. Without validation pairs the
    validation patches come from the training pairs with another seed (held-out samples, not
    held-out images; the log says so).
    """
    import dataclasses  # noqa: PLC0415

    from .progress import Progress  # noqa: PLC0415
    from .training import prepare_manifest  # noqa: PLC0415

    prog = Progress(progress)
    say = log or (lambda line: None)
    if cfg.data.manifest:
        aligned = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prealign="none"))
        data = prepare_manifest(aligned, prog, say)
        train = [("pairs", p.name, p.fixed, p.moving) for p in data.train_pairs]
        val = [("pairs", p.name, p.fixed, p.moving) for p in data.val_pairs]
        info = dict(data.info, prealign="none (aligned pairs)")
    else:
        train = _shared_pair_arrays(cfg.metric.pairs, cfg, "training", cfg.seed, prog)
        val = _shared_pair_arrays(cfg.metric.validation_pairs, cfg, "validation", cfg.seed + 1, prog)
        info = {"source": "shared data", "pairs": list(cfg.metric.pairs), "validation_pairs": list(cfg.metric.validation_pairs),
                "training_images": sorted({n for _, n, _, _ in train}), "validation_images": sorted({n for _, n, _, _ in val}),
                "grid": {"spacing_mm": [float(cfg.spacing_mm)] * 3}}
    if not val:
        say("no validation pairs: validation patches are drawn from the training pairs with another seed "
            "(held-out samples, not held-out images)")
        info["validation"] = "held-out samples of the training pairs"
    return train, val, info


def _pair_weights(pairs: list) -> np.ndarray:
    """Sampling probability per pair: every kind of pair equally often, pairs of a kind uniformly."""
    kinds = [p[0] for p in pairs]
    counts = {k: kinds.count(k) for k in set(kinds)}
    w = np.array([1.0 / (len(counts) * counts[k]) for k in kinds])
    return w / w.sum()


# ----------------------------------------------------------------------------- training loop


def _validation_set(sampler: AlignedPatchSampler, n: int, seed: int) -> tuple:
    rng = np.random.default_rng([seed, 999_983])
    xs, ys, kinds = [], [], []
    for start in range(0, n, 256):
        x, y, k = sampler.batch(rng, min(256, n - start))
        xs.append(x), ys.append(y), kinds.extend(k)
    return torch.cat(xs), torch.cat(ys), kinds


def _ranking_validation_set(sampler: AlignedPatchSampler, n: int, seed: int) -> tuple:
    rng = np.random.default_rng([seed, 424_243])
    parts = [sampler.shifted_batch(rng, min(256, n - start)) for start in range(0, n, 256)]
    return tuple(torch.cat([p[j] for p in parts]) for j in range(3))


def _scores(network: PatchMetricNet, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([network(x[i:i + 256]).reshape(-1) for i in range(0, len(x), 256)])


def evaluate_metric(network: PatchMetricNet, x: torch.Tensor, y: torch.Tensor, kinds: list,
                    ranking: tuple | None = None, settings=None) -> dict:
    """Hinge loss, accuracy (sign of the score matches the label) and accuracy per kind of sample;
    with ``ranking`` = ``(x_aligned, x_shifted, shift_voxels)`` (from
    :meth:`AlignedPatchSampler.shifted_batch`) and ``settings`` (a ``MetricTrainConfig``) also
    ``ranking_loss`` (:func:`ranking_loss`), ``rise_per_voxel`` (median over the pairs of the score's
    rise divided by the shift) and ``objective`` = hinge + ``ranking_weight`` x ranking loss, the
    number the best weights are chosen by (the hinge loss alone without ``ranking``). ``score_std``: the
    spread of the scores (0: a collapsed network that scores every pair alike)."""
    network.eval()
    with torch.inference_mode():
        scores = _scores(network, x)
        shifted = None if ranking is None else (_scores(network, ranking[0]), _scores(network, ranking[1]))
    network.train()
    correct = (torch.sign(scores) == y).float()
    by_kind = {k: float(correct[[i for i, kk in enumerate(kinds) if kk == k]].mean()) for k in sorted(set(kinds))}
    out = {"loss": float(hinge_loss(scores, y)), "accuracy": float(correct.mean()), "accuracy_by_kind": by_kind,
           "score_std": float(scores.std())}
    out["objective"] = out["loss"]
    if shifted is not None:
        rank = float(ranking_loss(shifted[0], shifted[1], ranking[2], settings.ranking_margin_per_voxel))
        out["ranking_loss"] = rank
        out["rise_per_voxel"] = float(torch.median((shifted[1] - shifted[0]) / ranking[2]))
        out["objective"] = out["loss"] + float(settings.ranking_weight) * rank
    return out


def train_metric(cfg, data=None, *, resume: bool = False, progress=None, log=None):
    """Train a learned metric per ``cfg`` (``mmreg train --method metric``); returns a
    :class:`mmreg.training.TrainResult`.

    ``data``: ``(train, validation, info)`` as from :func:`prepare_metric_pairs` (None: prepared from
    ``cfg``). Same run files, checkpoints, resume, stop request and model card as every training
    run (:func:`mmreg.training.train`): ``<output>/training/{log.txt, progress.jsonl, last.pt,
    best.pt}``; step events carry the hinge loss; validation events ``mean_dice`` None,
    ``mean_loss`` (hinge loss of the fixed validation sample) and ``accuracy``. The best weights by
    validation loss are kept (``final_model`` "best"). One process (no distributed training).
    """
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415
    import time  # noqa: PLC0415

    from .errors import CancelledError  # noqa: PLC0415
    from .models import ModelCard, save_model  # noqa: PLC0415
    from .networks import parameter_count  # noqa: PLC0415
    from .training import (after_own_step, finish_own_run, open_own_run, pair_rng,  # noqa: PLC0415
                           resume_checkpoint, save_checkpoint, start_from_base_model, stop_own_run, stopped_error)

    t_start = time.perf_counter()
    device, threads, prog, (out_dir, ck_dir, last_path, best_path), files, say = open_own_run(
        cfg, resume, progress, log, "The learned metric (its steps take well under a second)")
    try:
        if data is None:
            data = prepare_metric_pairs(cfg, prog.sub(0.0, 0.05), say)
        train_pairs, val_pairs, info = data
        arch = cfg.full_architecture()
        torch.manual_seed(cfg.seed)
        network = patch_metric_network(arch).to(device)
        sampler = AlignedPatchSampler([(n, a, b) for _, n, a, b in train_pairs], network.patch, cfg.metric, device)
        sampler_weights = _pair_weights(train_pairs)
        if val_pairs:
            val_sampler = AlignedPatchSampler([(n, a, b) for _, n, a, b in val_pairs], network.patch, cfg.metric, device)
            val_x, val_y, val_kinds = _validation_set(val_sampler, cfg.metric.validation_patches, cfg.seed)
        else:  # held-out samples of the training pairs (another seed)
            val_x, val_y, val_kinds = _validation_set(sampler, cfg.metric.validation_patches, cfg.seed + 7)
        val_rank = _ranking_validation_set(val_sampler if val_pairs else sampler,
                                           max(16, cfg.metric.validation_patches // 4), cfg.seed)
        ranked = cfg.metric.ranking_weight > 0

        def validate() -> dict:
            return evaluate_metric(network, val_x, val_y, val_kinds, val_rank, cfg.metric)
        base_description = start_from_base_model(network, cfg, device, say) if not resume else None
        if cfg.metric.optimizer == "sgd":
            optimizer = torch.optim.SGD(network.parameters(), lr=cfg.learning_rate, momentum=cfg.metric.momentum)
        else:
            optimizer = torch.optim.Adam(network.parameters(), lr=cfg.learning_rate)
        history = {"loss": [], "seconds_per_step": [], "validation": [], "best": None, "wall_seconds": 0.0,
                   "base_model": base_description}
        step = 0
        if resume:
            history, step = resume_checkpoint(cfg, last_path, network, optimizer, device, say)
        wall_before = float(history.get("wall_seconds", 0.0))
        files.event("start", method=cfg.method, name=cfg.name, steps=cfg.steps, start_step=step, output=str(out_dir),
                    processes=1, pairs={"training": len(train_pairs), "validation": len(val_pairs)},
                    skipped=info.get("skipped", []))
        for entry in info.get("skipped", []):
            say(f"skipped manifest {entry['entry']}: {entry['reason']}")
        say(f"learned metric: {len(train_pairs)} training pairs ({', '.join(sorted({p[0] for p in train_pairs}))}), "
            f"{len(val_pairs)} validation pairs, patch {network.patch}, stride {network.stride}, "
            f"{parameter_count(network)} parameters, batch {cfg.batch_size}, {cfg.metric.optimizer} lr {cfg.learning_rate}")

        def record(v: dict) -> None:
            history["validation"].append({"step": step, "mean_dice": None, "mean_loss": v["objective"],
                                          "hinge_loss": v["loss"], "ranking_loss": v["ranking_loss"],
                                          "rise_per_voxel": v["rise_per_voxel"],
                                          "accuracy": v["accuracy"], "accuracy_by_kind": v["accuracy_by_kind"],
                                          "folding_percent": None})
            best = history.get("best")
            if best is None or v["objective"] < best["mean_loss"]:
                history["best"] = {"step": step, "mean_dice": None, "mean_loss": v["objective"], "accuracy": v["accuracy"],
                                   "criterion": "hinge + ranking loss" if ranked else "loss"}
                ck_dir.mkdir(parents=True, exist_ok=True)
                torch.save({k: t.detach().cpu() for k, t in network.state_dict().items()}, best_path.with_suffix(".tmp"))
                os.replace(best_path.with_suffix(".tmp"), best_path)
            files.event("validation", step=step, mean_dice=None, mean_loss=v["objective"], hinge_loss=v["loss"],
                        ranking_loss=v["ranking_loss"], rise_per_voxel=v["rise_per_voxel"], accuracy=v["accuracy"],
                        accuracy_by_kind=v["accuracy_by_kind"], folding_percent=None,
                        best_step=history["best"]["step"])
            kinds = ", ".join(f"{k} {a:.3f}" for k, a in v["accuracy_by_kind"].items())
            if v["score_std"] < 1e-6:
                say(f"warning: at step {step} the network gives every validation pair the same score: it has "
                    "collapsed (every unit of a layer inactive) and learns nothing more; stop and restart with a "
                    "lower learning_rate (measured: SGD 0.01 with metric.ranking_weight 3 collapses, 0.001 does not)")
            say(f"validation at step {step}: hinge loss {v['loss']:.4f}, accuracy {v['accuracy']:.3f} ({kinds}); "
                f"score rise {v['rise_per_voxel']:.3f} per voxel of shift (ranking loss {v['ranking_loss']:.4f}); "
                f"best {'hinge + ranking' if ranked else 'hinge'} loss {history['best']['mean_loss']:.4f} at step "
                f"{history['best']['step']}")

        if not history["validation"]:
            v0 = validate()
            history["initial_validation"] = v0
            say(f"validation at step 0 ({'base model' if base_description else 'untrained'}): hinge loss "
                f"{v0['loss']:.4f}, accuracy {v0['accuracy']:.3f}, score rise {v0['rise_per_voxel']:.3f} per voxel "
                f"of shift")

        def checkpoint():
            history["wall_seconds"] = wall_before + time.perf_counter() - t_start
            save_checkpoint(last_path, network, optimizer, step, cfg, history, device)

        def write_model(stopped: bool):
            final_state, chosen = network.state_dict(), "last"
            if cfg.final_model == "best" and history.get("best") and best_path.is_file():
                final_state = torch.load(best_path, map_location="cpu", weights_only=True)
                chosen = f"best (step {history['best']['step']})"
            final_net = patch_metric_network(arch)
            final_net.load_state_dict({k: t.cpu() for k, t in final_state.items()})
            wall = wall_before + time.perf_counter() - t_start
            history["wall_seconds"] = wall
            sps = history["seconds_per_step"]
            kinds = sorted({p[0] for p in train_pairs})
            description = cfg.description or (
                f"Learned patch metric trained with `mmreg train` ({step} steps, {cfg.spacing_mm:g} mm; "
                f"{len(train_pairs)} aligned pairs: {', '.join(kinds)}).")
            training = {
                "command": "mmreg train", "config": cfg.to_dict(), "data": info, "modalities": kinds,
                "steps": step, "weights": chosen, "base_model": history.get("base_model"),
                "parameters": parameter_count(final_net), "patch_voxels": final_net.patch,
                "stride_voxels": final_net.stride, "device": str(device), "threads": threads, "processes": 1,
                "wall_time_s": round(wall, 1), "seconds_per_step_median": float(np.median(sps)) if sps else None,
                "final_loss_mean_last_50": float(np.mean(history["loss"][-50:])) if history["loss"] else None,
                "adversarial_mining": history.get("adversarial", []),
                "validation": {"initial": history.get("initial_validation"), "history": history["validation"],
                               "best": history.get("best"), "pairs": [p[1] for p in val_pairs]},
            }
            if stopped:
                training["stopped_at_step"], training["steps_planned"] = step, cfg.steps
            card = ModelCard(name=cfg.name, method=cfg.method, architecture=arch, spacing_mm=float(cfg.spacing_mm),
                             multiple=1, diffeomorphic=False, integration_steps=0, description=description,
                             training=training)
            folder = save_model(out_dir, final_net, card)
            (ck_dir / "history.json").write_text(json.dumps(history))
            return folder, chosen

        def stop_run(how: str):
            stop_own_run(how, step, checkpoint, write_model, files, say, last_path)

        train_prog = prog.sub(0.05, 0.98)
        start_step = step
        adversarial_ranked = cfg.metric.adversarial_ranking_weight > 0
        adversarial = float(cfg.metric.negatives.get("adversarial", 0.0)) > 0 or adversarial_ranked

        def mine() -> None:
            """Adversarial negatives: the deformations the pipeline finds on aligned training pairs now."""
            m = cfg.metric
            rng_m = pair_rng(cfg.seed, step, 1)
            chosen = rng_m.choice(len(train_pairs), size=min(int(m.adversarial_pairs), len(train_pairs)), replace=False,
                                  p=sampler_weights)
            here = (step - start_step) / max(cfg.steps - start_step, 1)
            for i in (int(c) for c in chosen):
                t_mine = time.perf_counter()
                _, name, a, b = train_pairs[i]
                ddf, scores = adversarial_displacement(network, a, b, cfg.spacing_mm, iterations=m.adversarial_iterations,
                                                       device=device, progress=train_prog.sub(here, here))
                stats = sampler.set_adversarial(i, ddf, m.adversarial_min_voxels)
                entry = {"step": step, "pair": name, **stats, **scores, "seconds": round(time.perf_counter() - t_mine, 1)}
                history.setdefault("adversarial", []).append(entry)
                files.event("adversarial", **entry)
                say(f"adversarial negatives at step {step}: {name}: the metric moves the aligned pair by "
                    f"{stats['median_voxels']:.2f} voxels (median; 90th percentile {stats['p90_voxels']:.2f}), "
                    f"score {scores['score_before']:+.3f} -> {scores['score_after']:+.3f}; "
                    f"{stats['candidates']} patch centres; {entry['seconds']:.0f} s")

        def ranking_term(pairs: tuple) -> torch.Tensor:
            """:func:`ranking_loss` of ``(x_aligned, x_moved, shift)`` from :meth:`AlignedPatchSampler.shifted_batch`."""
            x0, x1, shift = pairs
            scores = network(torch.cat([x0, x1]))
            return ranking_loss(scores[:len(x0)], scores[len(x0):], shift, cfg.metric.ranking_margin_per_voxel)

        network.train()
        try:
            while step < cfg.steps:
                if adversarial and (step == start_step or step % int(cfg.metric.adversarial_every) == 0):
                    try:
                        mine()
                    except CancelledError:
                        stop_run("stopped")
                        raise stopped_error(step, cfg.steps, out_dir) from None
                t0 = time.perf_counter()
                rng = pair_rng(cfg.seed, step, 0)
                pair_choice = rng.choice(len(train_pairs), size=cfg.batch_size, p=sampler_weights)
                x, y, _ = sampler.batch(rng, cfg.batch_size, pair_choice)
                loss = hinge_loss(network(x), y)
                n_rank = int(cfg.metric.ranking_pairs)
                if ranked:
                    rank_choice = rng.choice(len(train_pairs), size=n_rank, p=sampler_weights)
                    loss = loss + cfg.metric.ranking_weight * ranking_term(
                        sampler.shifted_batch(rng, n_rank, rank_choice))
                if adversarial_ranked and sampler.adversarial:
                    loss = loss + cfg.metric.adversarial_ranking_weight * ranking_term(
                        sampler.shifted_batch(rng, n_rank, adversarial=True))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                history["loss"].append(float(loss.detach()))
                after_own_step(cfg, step, start_step, time.perf_counter() - t0, history, files, train_prog, out_dir,
                               validate=lambda: record(validate()), checkpoint=checkpoint, stop_run=stop_run,
                               loss_name="hinge + ranking loss" if ranked or adversarial_ranked else "hinge loss")
        except KeyboardInterrupt:
            stop_run("interrupted")
            raise
        if not history["validation"] or history["validation"][-1]["step"] != step:
            record(validate())
        return finish_own_run(step, history, checkpoint, write_model, files, say, prog, t_start)
    except (CancelledError, KeyboardInterrupt):
        raise
    except BaseException as exc:
        files.event("error", message=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise
