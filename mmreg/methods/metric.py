"""Method ``metric``: iterative registration driven by a learned CNN similarity metric (or by MI).

The paper's pipeline (Simonovsky et al., "A deep metric for multimodal registration", MICCAI
2016), written in torch so that the metric's gradient with respect to the transformation comes
from backpropagation through the network and the resampling:

1. multi-resolution similarity transform (rotation, isotropic scale, translation about the fixed
   image's intensity centroid), then
2. multi-resolution cubic B-spline free-form deformation (one control grid per resolution, the
   coarse one at twice the fine control-point spacing; the fields add up),

each optimised with a cosine-decayed step per level (the similarity transform by Adam; the
B-spline by gradient descent, its gradient scaled so the most strongly pulled control point moves
by the step size; ``optimizer="adam"`` for Adam there too) without an explicit regulariser (the
paper's choice; ``smoothness`` > 0 adds the diffusion term). The similarity is

* ``"learned"``: the mean dissimilarity score of the learned patch metric over a dense grid of
  overlapping patches (:func:`mmreg.patch_metric.dense_dissimilarity`) on the model's grid
  (its training spacing; the coarse level at twice that, which the metric is trained for);
* ``"mi"``: Parzen-window mutual information with 75 bins over the field of view (the paper's
  baseline; MONAI's estimator on a random voxel subset per iteration);
* ``"mi_masked"``: the same, restricted to the fixed image's foreground (dilated).

Composition and conventions: for a fixed-grid voxel x, x -> x + b(x) (B-spline) -> S(x + b(x))
(similarity) is the moving-image position, so the displacement is ``S(x + b(x)) - x``, in voxels of
the network grid (resampling convention, as every method returns). Parameters live in FINE-grid
voxel units at every level (a level's voxel i sits at f*i + (f-1)/2 for pooling factor f), so
they carry from level to level unchanged.

Progress: one call per iteration with ``"<stage> level l/L, iteration i/n: metric v"``, stage
"similarity" or "B-spline", ``v`` the minimised value (learned: mean score; MI: minus MI);
:func:`parse_metric_progress` reads such a message back. :meth:`LearnedMetricRegistration.method_report`
gives the per-iteration values for the result report (``report["method_trace"]``).
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from ..errors import InputError
from ..grid import NetworkGrid, choose_levels, downsample_image
from ..losses import MutualInformationLoss, diffusion_regulariser
from ..models import CARD_FILE, ModelCard, list_models, load_model, resolve_model
from ..patch_metric import (DEFAULT_METRIC_ARCHITECTURE, check_metric_architecture, dense_dissimilarity,
                            patch_metric_network, train_metric)
from ..progress import Progress
from ..spatial import sample_at, warp
from .base import GridInputs, RegistrationMethod, TrainingSpec

SIMILARITIES = ("learned", "mi", "mi_masked")
#: The learned metric used when none is chosen (if installed): the MR-MR one; CT-MR pairs should
#: choose "metric_ctmr" (the Slicer module's metric selector lists both).
DEFAULT_MODEL = "metric_mr"
TRANSFORMS = ("bspline", "similarity")

#: Step sizes: about every parameter's step per iteration with Adam (the largest control point's
#: step with gradient descent); translation and B-spline control points in fine-grid voxels,
#: rotation in radians, scale as log-scale. Scaled by ``learning_rate`` (a factor, default 1).
STEP_SIZES = {"translation": 0.3, "rotation": 0.01, "log_scale": 0.005, "bspline": 0.3}

#: MI similarities compare this many fixed voxels per iteration, drawn afresh each time, and
#: resample the moving image only there (elastix's random-coordinate sampling; see docs/learned_metric.md
#: for the measured speed and accuracy against the whole image). 0: warp the whole image each iteration.
DEFAULT_MI_SAMPLES = 20_000

#: A learned metric whose mean score over the affinely aligned pair is above this value classifies the
#: pair as misaligned on average (the hinge loss's decision boundary is 0; aligned training patches
#: score about -1): the images are probably unlike its training data. Measured at the start of the
#: benchmark's cases: -1.03 to -0.44 on four brain cases (avg152 T1<-T2, T1<-PD, CT<-T1, IXI012<-T2), +0.63 (abdomen, head-CT metric) and +1.02 (spinal
#: cord, brain metric) on the two cases where the learned metric then failed.
UNFAMILIAR_SCORE = 0.0

#: What the pipeline does with a learned metric that scores the start above :data:`UNFAMILIAR_SCORE`:
#: "keep" (the default) returns the start alignment (the affine pre-alignment, or the identity without
#: one) with a warning, instead of optimising a similarity that cannot tell aligned from misaligned
#: there (measured: Dice 0.853 -> 0.000 on the spinal cord, 0.310 -> 0.265 on the abdomen);
#: "continue" optimises it anyway (the paper's pipeline has no such check).
ON_UNFAMILIAR = ("keep", "continue")


class _UnfamiliarPair(Exception):
    """Raised inside :func:`metric_registration` to stop at the start (``on_unfamiliar="keep"``)."""

_PROGRESS = re.compile(r"^(?P<stage>similarity|B-spline) level (?P<level>\d+)/(?P<levels>\d+), iteration "
                       r"(?P<iteration>\d+)/(?P<iterations>\d+): metric (?P<value>[-+0-9.eE]+|nan|inf|-inf)$")


def parse_metric_progress(message: str) -> dict | None:
    """The fields of an iteration message of this method (stage, level, levels, iteration, iterations,
    value), or None for any other progress message."""
    m = _PROGRESS.match(message or "")
    if not m:
        return None
    return {"stage": m["stage"], "level": int(m["level"]), "levels": int(m["levels"]),
            "iteration": int(m["iteration"]), "iterations": int(m["iterations"]), "value": float(m["value"])}


# ----------------------------------------------------------------------------- transformation models


def level_positions(shape, factor: int) -> list:
    """Per spatial axis, the positions (fine-grid voxel units) of a level's voxel centres."""
    return [factor * np.arange(n, dtype=np.float64) + (factor - 1) / 2.0 for n in shape]


def bspline_basis(positions: np.ndarray, spacing: float, first: float, n_control: int | None = None) -> torch.Tensor:
    """Cubic B-spline weights ``(len(positions), n_control)``: control point j sits at
    ``first + (j - 1) * spacing`` (one point before the first position; by default enough after the
    last position for every weight to be there)."""
    u = (positions - first) / spacing + 1.0
    if n_control is None:
        n_control = int(np.floor((positions.max() - first) / spacing)) + 4
    t = np.abs(u[:, None] - np.arange(n_control)[None, :])
    w = np.where(t < 1, 2.0 / 3.0 - t ** 2 + 0.5 * t ** 3, np.where(t < 2, (2.0 - t) ** 3 / 6.0, 0.0))
    return torch.from_numpy(w.astype(np.float32))


class BSplineField:
    """A cubic B-spline displacement ``b(x)`` (fine-grid voxels) with control-point spacing ``spacing``
    (fine voxels) over a fine grid of ``fine_shape``; ``coefficients`` ``(1, ndim, *controls)`` are
    the optimised parameters (zero: the identity)."""

    def __init__(self, fine_shape, spacing: float, device):
        self.fine_shape, self.spacing, self.device = tuple(fine_shape), float(spacing), device
        controls = [bspline_basis(np.array([-0.5, n - 0.5]), spacing, -0.5).shape[1] for n in fine_shape]
        self.coefficients = torch.zeros((1, len(fine_shape), *controls), device=device, requires_grad=True)
        self._bases = {}

    @property
    def control_points(self) -> int:
        """Number of control points (per displacement component)."""
        return int(np.prod(self.coefficients.shape[2:]))

    def field(self, shape, factor: int) -> torch.Tensor:
        """The displacement ``(1, ndim, *shape)`` (fine voxels) at the voxel centres of the level of ``factor``."""
        key = (tuple(shape), factor)
        if key not in self._bases:
            self._bases[key] = [bspline_basis(p, self.spacing, -0.5, c).to(self.device)
                                for p, c in zip(level_positions(shape, factor), self.coefficients.shape[2:])]
        bases = self._bases[key]
        out = self.coefficients
        if len(bases) == 3:
            out = torch.einsum("xk,bcijk->bcijx", bases[2], out)
            out = torch.einsum("yj,bcijx->bciyx", bases[1], out)
            return torch.einsum("zi,bciyx->bczyx", bases[0], out)
        out = torch.einsum("xk,bcjk->bcjx", bases[1], out)
        return torch.einsum("yj,bcjx->bcyx", bases[0], out)


class SimilarityTransform:
    """``S(p) = c + s R (p - c) + t`` in fine-grid voxel units: ``rotation`` (3 rotation-vector
    components in radians, or 1 angle in 2-D), ``log_scale`` and ``translation`` are the parameters."""

    def __init__(self, centre, device):
        ndim = len(centre)
        self.centre = torch.as_tensor(np.asarray(centre, dtype=np.float32), device=device)
        self.rotation = torch.zeros(3 if ndim == 3 else 1, device=device, requires_grad=True)
        self.log_scale = torch.zeros(1, device=device, requires_grad=True)
        self.translation = torch.zeros(ndim, device=device, requires_grad=True)

    def matrix(self) -> torch.Tensor:
        """``s R`` as an ``(ndim, ndim)`` tensor (rotation by the matrix exponential of the skew matrix)."""
        r = self.rotation
        if r.numel() == 3:
            zero = torch.zeros((), device=r.device)
            skew = torch.stack([torch.stack([zero, -r[2], r[1]]), torch.stack([r[2], zero, -r[0]]),
                                torch.stack([-r[1], r[0], zero])])
        else:
            zero = torch.zeros((), device=r.device)
            skew = torch.stack([torch.stack([zero, -r[0]]), torch.stack([r[0], zero])])
        return torch.linalg.matrix_exp(skew) * torch.exp(self.log_scale)

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """Map ``(1, ndim, *spatial)`` positions (fine voxels) through S."""
        shape = [1, -1] + [1] * (points.dim() - 2)
        rel = points - self.centre.view(shape)
        return torch.einsum("ij,bj...->bi...", self.matrix(), rel) + (self.centre + self.translation).view(shape)

    def parameters(self) -> dict:
        """Current values (rotation in degrees, scale, translation in fine voxels) for reports."""
        return {"rotation_deg": [round(math.degrees(float(v)), 4) for v in self.rotation.detach()],
                "scale": round(float(torch.exp(self.log_scale.detach())), 6),
                "translation_voxels": [round(float(v), 4) for v in self.translation.detach()]}


def _positions_tensor(shape, factor: int, device) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.as_tensor(p, dtype=torch.float32, device=device)
                             for p in level_positions(shape, factor)], indexing="ij")
    return torch.stack(grids)[None]


# ----------------------------------------------------------------------------- similarities


class _Similarity:
    """The minimised similarity value of a warped moving image at one level."""

    def __init__(self, name: str, fixed: torch.Tensor, fov: torch.Tensor, network=None, mi_bins: int = 75,
                 mi_max_voxels: int = 100_000, mi_samples: int = 0, foreground: float = 0.05, seed: int = 0):
        self.name, self.fixed, self.network = name, fixed, network
        self.weight = fov
        if name == "mi_masked":
            pool = torch.nn.functional.max_pool3d if fixed.dim() == 5 else torch.nn.functional.max_pool2d
            fg = pool((fixed > foreground).float(), 5, stride=1, padding=2)  # dilated by 2 voxels
            self.weight = fov * fg
        self.sampled = name != "learned" and int(mi_samples) > 0
        if name != "learned":
            self.mi = MutualInformationLoss(num_bins=mi_bins, max_voxels=mi_max_voxels,
                                            generator=torch.Generator(device=fixed.device).manual_seed(seed))
        if self.sampled:
            self.samples = int(mi_samples)
            self.generator = torch.Generator(device="cpu").manual_seed(seed)  # draws the sampled voxels
            self.candidates = torch.nonzero(self.weight.reshape(-1) > 0.5).squeeze(1)
            if self.candidates.numel() < 2:
                raise InputError("The fixed image's field of view (or foreground, for mi_masked) has no voxels at "
                                 "this level; the images do not overlap. Check the affine pre-alignment.")
            shape = tuple(fixed.shape[2:])
            grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32, device=fixed.device) for n in shape],
                                   indexing="ij")
            self.voxels = torch.stack(grids).reshape(len(shape), -1)  # (ndim, N) level voxel indices
            self.fixed_values = fixed.reshape(1, fixed.shape[1], -1)

    def at_points(self, moving: torch.Tensor, moving_fov: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """Minus MI on ``mi_samples`` fixed voxels drawn afresh (uniformly, with replacement) from the
        fixed field of view (mask); only those points of ``moving`` and its field of view are resampled.
        ``ddf``: level-voxel displacement ``(1, ndim, *spatial)`` (resampling convention)."""
        pick = torch.randint(self.candidates.numel(), (self.samples,), generator=self.generator)
        idx = self.candidates[pick.to(self.candidates.device)]
        points = (self.voxels[:, idx] + ddf.reshape(ddf.shape[1], -1)[:, idx]).T
        warped = sample_at(moving, points)
        inside = sample_at(moving_fov, points, padding_mode="zeros")
        fixed = self.fixed_values[:, :, idx]
        return self.mi(warped[..., None], fixed[..., None], mask=inside[..., None] > 0.5)

    def __call__(self, warped: torch.Tensor, moving_fov: torch.Tensor) -> torch.Tensor:
        weight = self.weight * moving_fov
        if self.name == "learned":
            return dense_dissimilarity(self.network, self.fixed, warped, mask=weight)
        return self.mi(warped, self.fixed, mask=weight > 0.5)


def similarity_profile(fixed: torch.Tensor, moving: torch.Tensor, shifts_voxels, *, axis: int, similarity: str,
                       network=None, mask: torch.Tensor | None = None, mi_bins: int = 75,
                       mi_max_voxels: int = 200_000) -> list:
    """The minimised similarity value of ``moving`` translated by each of ``shifts_voxels`` along
    spatial ``axis`` (numpy order of the ``(1, 1, *spatial)`` tensors, intensities in [0, 1]; a shift
    of s voxels compares fixed voxel x with moving x + s), as the registration sees it: the learned
    metric's mean score or minus MI (same voxel subset at every shift). For an aligned pair the
    curve should be smooth with its minimum at 0 (the paper's check of a metric). ``mask``: the
    fixed field of view (default: all of it). Returns one float per shift."""
    if similarity not in SIMILARITIES:
        raise InputError(f"Unknown similarity '{similarity}'; use one of {', '.join(SIMILARITIES)}.")
    if similarity == "learned" and network is None:
        raise InputError("The learned similarity needs a metric network (a trained 'metric' model).")
    ndim = fixed.dim() - 2
    if not 0 <= int(axis) < ndim:
        raise InputError(f"axis must be a spatial axis 0..{ndim - 1} (numpy order), got {axis}.")
    fov = torch.ones_like(fixed) if mask is None else mask.float()
    ones = torch.ones_like(moving)
    values = []
    with torch.no_grad():
        for shift in shifts_voxels:
            ddf = torch.zeros((1, ndim) + tuple(fixed.shape[2:]), dtype=fixed.dtype, device=fixed.device)
            ddf[:, int(axis)] = float(shift)
            sim = _Similarity(similarity, fixed, fov, network, mi_bins=mi_bins, mi_max_voxels=mi_max_voxels, seed=0)
            values.append(float(sim(warp(moving, ddf), warp(ones, ddf, padding_mode="zeros"))))
    return values


# ----------------------------------------------------------------------------- the optimisation

#: Optimisers of :func:`metric_registration`.
OPTIMIZERS = ("adam", "gd")


def _normalise_gradients(groups: list) -> None:
    """Divide each parameter group's gradient by its largest absolute component (in place), so a
    plain gradient step of size ``lr`` moves the most strongly pulled parameter by ``lr`` and every
    other one in proportion to its gradient (used for the B-spline control points)."""
    for group in groups:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if not grads:
            continue
        largest = max(float(g.abs().max()) for g in grads)
        if largest > 0:
            for g in grads:
                g.div_(largest)


def metric_registration(inputs: GridInputs, *, similarity: str = "learned", network=None, transform: str = "bspline",
                        control_spacing_mm: float = 16.0, levels: int = 2, iterations_similarity: int = 40,
                        iterations_bspline: int = 60, learning_rate: float | None = None, mi_bins: int = 75,
                        mi_max_voxels: int = 100_000, mi_samples: int = DEFAULT_MI_SAMPLES, smoothness: float = 0.0,
                        optimizer: str = "gd", on_unfamiliar: str = "keep", progress: Progress | None = None,
                        trace: dict | None = None) -> torch.Tensor:
    """Similarity, then B-spline, optimised coarse to fine; returns the voxel displacement ``(1, ndim, *spatial)``
    on ``inputs.grid`` (resampling convention).

    ``similarity``: "learned" (needs ``network``, a :class:`mmreg.patch_metric.PatchMetricNet`), "mi"
    or "mi_masked". ``transform``: "bspline" (similarity then B-spline) or "similarity".
    ``control_spacing_mm``: the finest B-spline control-point spacing (mm; the coarser grids double
    it). ``levels``: resolutions (pooling by 2 per level; levels whose images are smaller than a
    metric patch are skipped). ``iterations_*``: optimiser steps per level. ``optimizer``, for the
    B-spline stage: "gd" (gradient descent, the paper's, the default: the step is the gradient
    scaled so that the control point with the largest gradient moves by the step size; control
    points with weak gradients, e.g. over featureless regions, move in proportion, hardly at all) or
    "adam" (each control point steps about its step size whatever its gradient's size; the default
    before, worse by 4-6 Dice points with MI on the template cases, see docs/learned_metric.md).
    The similarity stage always uses Adam: its 7 parameters have different units and scales, and
    one shared gradient scale left a weaker translation component 0.58 mm short of a (3, -2, 4) mm
    shift on the test phantom. Both follow a cosine decay. ``learning_rate``: a factor on
    :data:`STEP_SIZES` (None: 1). ``smoothness``: diffusion weight on the B-spline displacement
    (0: none, the paper's). ``mi_samples``: for MI, the number of fixed voxels compared per iteration,
    drawn afresh each iteration, the moving image resampled only there (0: warp the whole image and
    use a ``mi_max_voxels`` subset of it). ``on_unfamiliar`` (learned similarity only): when the
    metric's mean score over the pair as given is above :data:`UNFAMILIAR_SCORE` (it sees the pair as
    misaligned everywhere: unlike its training data), "keep" returns a zero displacement (the start
    alignment) and "continue" optimises anyway; both add a warning to ``trace["warnings"]``, and
    "keep" sets ``trace["kept_start"]``. ``trace``: a dict that receives the per-iteration values
    (``{"stages": [{"stage", "level", "values"}], "similarity_parameters": ...}``).
    """
    progress = progress or Progress()
    if similarity not in SIMILARITIES:
        raise InputError(f"Unknown similarity '{similarity}' for method 'metric'; use one of {', '.join(SIMILARITIES)}.")
    if transform not in TRANSFORMS:
        raise InputError(f"Unknown transform '{transform}'; use 'bspline' (similarity then B-spline) or 'similarity'.")
    if int(levels) < 1 or int(iterations_similarity) < 0 or int(iterations_bspline) < 0:
        raise InputError(f"levels must be >= 1 and iterations >= 0; got levels={levels}, iterations_similarity="
                         f"{iterations_similarity}, iterations_bspline={iterations_bspline}.")
    if control_spacing_mm <= 0:
        raise InputError(f"control_spacing_mm must be > 0 mm, got {control_spacing_mm}.")
    if optimizer not in OPTIMIZERS:
        raise InputError(f"Unknown optimizer '{optimizer}' for method 'metric'; use one of {', '.join(OPTIMIZERS)}.")
    if on_unfamiliar not in ON_UNFAMILIAR:
        raise InputError(f"Unknown on_unfamiliar '{on_unfamiliar}' for method 'metric'; use 'keep' (return the start "
                         "alignment when the learned metric does not recognise the pair) or 'continue'.")
    if int(mi_samples) != 0 and int(mi_samples) < 100:
        raise InputError(f"mi_samples must be 0 (the whole image) or at least 100 voxels per iteration, got {mi_samples}.")
    if similarity == "learned" and network is None:
        raise InputError("The learned similarity needs a metric network (a trained 'metric' model).")
    fixed, moving = inputs.fixed, inputs.moving
    ndim = fixed.dim() - 2
    if similarity == "learned" and int(network.architecture.get("spatial_dims", 3)) != ndim:
        raise InputError(f"The learned metric is a {network.architecture.get('spatial_dims', 3)}-D network and this "
                         f"pair is {ndim}-D on the grid; use similarity='mi' for single-slice images.")
    factors = choose_levels(inputs.grid, int(levels)) or [1]
    if similarity == "learned":
        fitting = [f for f in factors if min(s // f for s in fixed.shape[2:]) >= network.patch]
        if not fitting:
            raise InputError(f"The images are smaller than one metric patch ({network.patch} voxels of "
                             f"{inputs.grid.spacing[0]:g} mm) on the network grid; use similarity='mi'.")
        factors = fitting
    scale = 1.0 if learning_rate is None else float(learning_rate)
    steps = {k: v * scale for k, v in STEP_SIZES.items()}
    device = fixed.device
    fine_shape = tuple(fixed.shape[2:])
    weights = fixed.clamp_min(0)[0, 0] * inputs.fixed_mask[0, 0]
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float32, device=device) for n in fine_shape], indexing="ij")
    total = float(weights.sum())
    centre = ([float((c * weights).sum()) / total for c in coords] if total > 0
              else [(n - 1) / 2.0 for n in fine_shape])
    sim_tx = SimilarityTransform(centre, device)
    voxel_mm = float(np.mean([inputs.grid.spacing[a] for a in inputs.grid.active_axes]))
    splines = []
    stages = [("similarity", int(iterations_similarity))]
    if transform == "bspline":
        stages.append(("B-spline", int(iterations_bspline)))
    total_iters = max(1, sum(n for _, n in stages) * len(factors))
    done = 0
    trace = trace if trace is not None else {}
    trace.setdefault("stages", [])
    trace["similarity"] = similarity
    trace["levels"] = factors

    def displacement(positions: torch.Tensor, shape, factor: int) -> torch.Tensor:
        """S(x + b(x)) - x at a level, in fine voxels."""
        p = positions
        for spline in splines:
            p = p + spline.field(shape, factor)
        return sim_tx.apply(p) - positions

    try:
        with torch.enable_grad():
            for stage, n_iter in stages:
                for level_index, factor in enumerate(factors):
                    fixed_l, moving_l = downsample_image(fixed, factor), downsample_image(moving, factor)
                    fov_l = downsample_image(inputs.fixed_mask, factor)
                    moving_fov_l = downsample_image(inputs.moving_mask, factor)
                    shape = tuple(fixed_l.shape[2:])
                    positions = _positions_tensor(shape, factor, device)
                    sim = _Similarity(similarity, fixed_l, fov_l, network, mi_bins=mi_bins, mi_max_voxels=mi_max_voxels,
                                      mi_samples=mi_samples,
                                      seed=level_index + 17 * len(trace["stages"]))
                    if stage == "similarity":
                        params = [{"params": [sim_tx.translation], "lr": steps["translation"]},
                                  {"params": [sim_tx.rotation], "lr": steps["rotation"]},
                                  {"params": [sim_tx.log_scale], "lr": steps["log_scale"]}]
                    else:
                        spacing = control_spacing_mm / voxel_mm * 2 ** (len(factors) - 1 - level_index)
                        spline = BSplineField(fine_shape, spacing, device)
                        splines.append(spline)
                        params = [{"params": [spline.coefficients], "lr": steps["bspline"]}]
                    descent = optimizer == "gd" and stage == "B-spline"  # the similarity stage always uses Adam
                    optimiser = torch.optim.SGD(params) if descent else torch.optim.Adam(params)
                    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, n_iter), eta_min=0.0)
                    values = []
                    record = {"stage": stage, "level": level_index + 1, "factor": factor, "values": values}
                    if stage == "B-spline":
                        record["control_points"] = splines[-1].control_points
                        record["control_spacing_mm"] = round(splines[-1].spacing * voxel_mm, 3)
                    trace["stages"].append(record)
                    for it in range(n_iter):
                        optimiser.zero_grad(set_to_none=True)
                        ddf = displacement(positions, shape, factor) / factor  # level voxels
                        if sim.sampled:
                            loss = sim.at_points(moving_l, moving_fov_l, ddf)
                        else:
                            loss = sim(warp(moving_l, ddf), warp(moving_fov_l, ddf, padding_mode="zeros"))
                        value = float(loss.detach())
                        if similarity == "learned" and done == 0 and value > UNFAMILIAR_SCORE:
                            keep = on_unfamiliar == "keep"
                            trace.setdefault("warnings", []).append(
                                f"The learned metric scores this pair {value:+.2f} before registration (aligned "
                                f"images score about -1; above {UNFAMILIAR_SCORE:g} it sees them as misaligned "
                                "everywhere): the images are probably unlike its training data. "
                                + ("The result is the start alignment (nothing was optimised); use similarity='mi' "
                                   "(or train a metric on aligned pairs of this kind), or on_unfamiliar='continue' "
                                   "to optimise it anyway." if keep else
                                   "The result may be worse than the affine alignment. Check it, or use "
                                   "similarity='mi' (or train a metric on aligned pairs of this kind)."))
                            if keep:
                                values.append(value)
                                raise _UnfamiliarPair
                        if smoothness > 0 and stage == "B-spline":
                            loss = loss + float(smoothness) * diffusion_regulariser(ddf)
                        loss.backward()
                        if descent:
                            _normalise_gradients(params)
                        optimiser.step()
                        decay.step()
                        values.append(value)
                        done += 1
                        progress(done / total_iters, f"{stage} level {level_index + 1}/{len(factors)}, iteration "
                                                     f"{it + 1}/{n_iter}: metric {value:.6g}")
                    if stage == "B-spline":  # this level's control grid is final: later levels add to it
                        splines[-1].coefficients.requires_grad_(False)
                if stage == "similarity":
                    for t in (sim_tx.rotation, sim_tx.log_scale, sim_tx.translation):
                        t.requires_grad_(False)
    except _UnfamiliarPair:  # on_unfamiliar="keep": nothing was optimised
        trace["kept_start"] = True
        splines.clear()
        progress(1.0, "the learned metric does not recognise this pair: kept the start alignment")
    trace["similarity_parameters"] = sim_tx.parameters()
    with torch.no_grad():
        return displacement(_positions_tensor(fine_shape, 1, device), fine_shape, 1).detach()


# ----------------------------------------------------------------------------- the method


def _check_metric_arch(architecture: dict) -> None:
    check_metric_architecture(dict(DEFAULT_METRIC_ARCHITECTURE, **architecture))


class LearnedMetricRegistration(RegistrationMethod):
    """Similarity + B-spline optimisation with a learned CNN metric (or Parzen MI)."""

    name = "metric"
    description = ("Iterative similarity + B-spline registration driven by a learned CNN patch metric trained on "
                   "aligned multi-modal pairs (or by mutual information); multi-modal.")
    modalities = "mono+multi"
    requires_model = False  # MI needs none; the learned similarity asks for a model when there is none

    def __init__(self):
        self._trace: dict | None = None

    def default_options(self) -> dict:
        """``model``: the learned metric (name or folder; None: :data:`DEFAULT_MODEL` when installed, else
        the only one); ``similarity``: "learned",
        "mi" (75-bin Parzen MI) or "mi_masked" (MI on the fixed foreground); ``transform``: "bspline"
        (similarity then B-spline) or "similarity"; ``control_spacing_mm``: finest B-spline control
        spacing (mm); ``levels``: resolutions; ``iterations_similarity`` / ``iterations_bspline``: Adam
        steps per level; ``learning_rate``: factor on the step sizes (None: 1); ``mi_bins``;
        ``mi_samples``: fixed voxels compared per MI iteration (drawn afresh; 0: the whole image);
        ``smoothness``: diffusion weight on the B-spline field (0: none, as in the paper);
        ``optimizer``: of the B-spline stage, "gd" (normalised gradient descent, the default) or
        "adam" (see :func:`metric_registration`); ``on_unfamiliar``: "keep" (the default: when the learned
        metric scores the affinely aligned pair above :data:`UNFAMILIAR_SCORE`, return that alignment
        with a warning) or "continue" (optimise anyway);
        ``spacing``: network grid spacing in mm (None: the model's for the learned metric, "auto" for
        MI: the fixed image's voxel size clamped to 1..4 mm); ``max_voxels``: bound on the grid."""
        return {"model": None, "similarity": "learned", "transform": "bspline", "control_spacing_mm": 16.0,
                "levels": 2, "iterations_similarity": 40, "iterations_bspline": 60, "learning_rate": None,
                "mi_bins": 75, "mi_samples": DEFAULT_MI_SAMPLES, "smoothness": 0.0, "optimizer": "gd",
                "on_unfamiliar": "keep", "spacing": None, "max_voxels": 2_000_000}

    def models(self) -> list:
        """Installed learned metrics (shipped and user models of ``metric``)."""
        return list_models(self.name)

    def training_spec(self) -> TrainingSpec:
        """Trained by ``mmreg train --method metric`` on aligned pairs (hinge loss on patch samples)."""
        return TrainingSpec(build_network=patch_metric_network, default_architecture=dict(DEFAULT_METRIC_ARCHITECTURE),
                            loss=None, displacement=None, similarity_key="accuracy", loss_keys=(),
                            trainer=train_metric, check_architecture=_check_metric_arch, size_multiple=lambda arch: 1,
                            default_settings={"name": "metric_mr", "learning_rate": 0.01, "batch_size": 128,
                                              "steps": 3000, "validation_every": 250, "checkpoint_every": 250})

    def _model_ref(self, options: dict):
        """The chosen model, or the default: "metric_mr" (MR-MR) when installed, else the only one."""
        if options.get("model") is not None:
            return options["model"]
        names = [m["name"] for m in self.models()]
        if not names:
            raise InputError("similarity='learned' needs a trained learned metric and none is installed: use "
                             "similarity='mi' or 'mi_masked', or train one on aligned pairs with "
                             "`mmreg train --method metric --data PAIRS.csv`.")
        return DEFAULT_MODEL if DEFAULT_MODEL in names else None

    def _card(self, options: dict) -> ModelCard:
        import json  # noqa: PLC0415
        folder = resolve_model(self.name, self._model_ref(options))
        return ModelCard.from_dict(json.loads((folder / CARD_FILE).read_text()), str(folder / CARD_FILE))

    def _uses_model(self, options: dict) -> bool:
        return options.get("similarity", "learned") == "learned"

    def model_info(self, options: dict) -> dict | None:
        """Name, folder, weights sha256 and spacing of the learned metric (None for MI)."""
        if not self._uses_model(options):
            return None
        folder = resolve_model(self.name, self._model_ref(options))
        card = self._card(options)
        return {"name": card.name, "path": str(folder), "sha256": card.sha256, "spacing_mm": card.spacing_mm,
                "modalities": (card.training or {}).get("modalities")}

    def grid_for(self, fixed, options: dict) -> NetworkGrid:
        """The learned metric's own spacing (or ``spacing``), sizes a multiple of 2**(levels-1)."""
        spacing = options.get("spacing")
        if spacing is None:
            spacing = self._card(options).spacing_mm if self._uses_model(options) else "auto"
        from .base import resolve_spacing  # noqa: PLC0415
        multiple = 2 ** max(int(options.get("levels", 2)) - 1, 0)
        return NetworkGrid.for_image(fixed, spacing=resolve_spacing(spacing, fixed), multiple=multiple,
                                     max_voxels=options.get("max_voxels"))

    def predict(self, inputs: GridInputs, options: dict, progress: Progress) -> torch.Tensor:
        """Run :func:`metric_registration`; voxel-unit displacement on ``inputs.grid``."""
        network = None
        if self._uses_model(options):
            network, _ = load_model(self.name, self._model_ref(options), patch_metric_network, inputs.device)
        self._trace = {}
        return metric_registration(
            inputs, similarity=options.get("similarity", "learned"), network=network,
            transform=options.get("transform", "bspline"), control_spacing_mm=float(options["control_spacing_mm"]),
            levels=int(options["levels"]), iterations_similarity=int(options["iterations_similarity"]),
            iterations_bspline=int(options["iterations_bspline"]), learning_rate=options.get("learning_rate"),
            mi_bins=int(options["mi_bins"]), mi_samples=int(options.get("mi_samples", DEFAULT_MI_SAMPLES)),
            smoothness=float(options.get("smoothness") or 0.0), optimizer=options.get("optimizer", "gd"),
            on_unfamiliar=options.get("on_unfamiliar", "keep"), progress=progress, trace=self._trace)

    def method_report(self) -> dict | None:
        """The per-iteration metric values of the last :meth:`predict` (for ``report["method_trace"]``)."""
        return self._trace

    def method_warnings(self) -> list:
        """A learned metric that scores the pair as misaligned before registration (see
        :data:`UNFAMILIAR_SCORE`) says so, and whether the start alignment was kept."""
        return list((self._trace or {}).get("warnings", []))
