"""Instance optimisation (method ``optimize``): a registration that needs no training.

A dense field on the network grid is optimised with Adam, coarse to fine (a pyramid of grids
related by :meth:`NetworkGrid.coarsen`), to minimise a similarity term plus a diffusion
regulariser:

* similarity ``"mind"`` (default; mean squared difference of MIND-SSC descriptors, mono- and
  multi-modal), ``"mi"`` (Parzen-window mutual information), ``"lncc"`` or ``"mse"``;
* parameter: a stationary velocity field integrated by scaling and squaring (diffeomorphic,
  default) or a plain displacement field, smoothed by two 3-voxel box filters each step;
* regulariser: :func:`mmreg.losses.diffusion_regulariser` (MONAI ``DiffusionLoss``), the mean
  squared spatial gradient of the displacement in voxel units, which at every pyramid level
  equals the physical gradient, so one weight serves all levels.

Every learned method reuses :func:`instance_optimise` as an optional refinement of its
prediction: starting the optimised field at the network's velocity (``init_velocity``, the default)
or composing a residual with its displacement (``init_ddf``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..grid import choose_levels, downsample_image, upsample_field
from ..losses import MutualInformationLoss, box_filter, diffusion_regulariser, lncc_loss, mind_loss_from_features, mind_ssc, mse_loss
from ..progress import Progress
from ..spatial import compose_fields, integrate_velocity, warp
from .base import GridInputs, RegistrationMethod

SIMILARITIES = ("mind", "mi", "lncc", "mse")

#: Diffusion weight per similarity, chosen on the shared data (IXI T1-T1, avg152 T1<-T2 and CT<-T1
#: with known deformations, spinal-cord T2<-T1; the sweep is in docs/optimize.md).
DEFAULT_SMOOTHNESS = {"mind": 0.15, "mi": 5.0, "lncc": 0.15, "mse": 0.15}


#: Adam step (voxels of the level) per similarity: MI's gradients come from a random voxel subsample
#: and are noisy, so it takes smaller steps.
DEFAULT_LEARNING_RATE = {"mind": 1.0, "mi": 0.2, "lncc": 1.0, "mse": 1.0}

#: Warm-up steps when a field is refined (``init_ddf`` or ``init_velocity``): see :func:`instance_optimise`.
DEFAULT_REFINEMENT_WARMUP = 5

#: The velocity is integrated on a grid this many times coarser than the level's (then the
#: displacement is upsampled); see :func:`instance_optimise`.
DEFAULT_INTEGRATION_FACTOR = 2


def _smooth(field: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """Box-filter a field (3 voxels, replicate borders) ``passes`` times."""
    for _ in range(passes):
        field = box_filter(field, 1)
    return field


class _Similarity:
    """Similarity at one pyramid level; features of the fixed image are computed once."""

    def __init__(self, name: str, fixed: torch.Tensor, moving: torch.Tensor, options: dict):
        self.name = name
        self.fixed, self.moving = fixed, moving
        if name == "mi":
            self.mi = MutualInformationLoss(num_bins=int(options.get("mi_bins", 32)),
                                            max_voxels=int(options.get("mi_max_voxels", 100_000)))

    def __call__(self, ddf: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        warped = warp(self.moving, ddf)
        if self.name == "mi":
            return self.mi(warped, self.fixed, mask=weight > 0.5)
        if self.name == "lncc":
            return lncc_loss(warped, self.fixed, mask=weight)
        if self.name == "mse":
            return mse_loss(warped, self.fixed, mask=weight)
        return mind_loss_from_features(warped, self.fixed, mask=weight)


def _integration_factor(shape, wanted: int) -> int:
    """``wanted`` when every axis of ``shape`` (voxels) divides by it and keeps >= 4 voxels, else 1."""
    return wanted if wanted > 1 and all(s % wanted == 0 and s // wanted >= 4 for s in shape) else 1


def _velocity_to_ddf(velocity: torch.Tensor, steps: int, factor: int) -> torch.Tensor:
    """Scaling and squaring of a voxel-unit velocity on a grid ``factor`` times coarser (average-pooled,
    vectors divided by ``factor``), the displacement upsampled back (voxel units of the input grid)."""
    if factor == 1:
        return integrate_velocity(velocity, steps)
    return upsample_field(integrate_velocity(downsample_image(velocity, factor) / factor, steps), factor)


def instance_optimise(inputs: GridInputs, *, init_ddf: torch.Tensor | None = None,
                      init_velocity: torch.Tensor | None = None, similarity: str = "mind",
                      levels: int = 3, iterations=(40, 40, 30), learning_rate: float | None = None,
                      smoothness: float | None = None, diffeomorphic: bool = True, finest_factor: int = 2,
                      schedule: str = "cosine", warmup_steps: int | None = None,
                      integration_factor: int = DEFAULT_INTEGRATION_FACTOR,
                      progress: Progress | None = None, **options) -> torch.Tensor:
    """Optimise a field on ``inputs.grid``; returns the voxel-unit displacement ``(1, ndim, *spatial)``.

    ``init_ddf`` (voxel units, same grid): a field to refine (e.g. a network's prediction); the
    optimiser then finds a residual r and returns the composition x -> x + r(x) -> y + init(y); the
    residual's regulariser does not see ``init_ddf``, so the optimiser cannot smooth away its errors.
    ``init_velocity`` (voxel units, same grid): the starting value of the optimised field itself (a
    stationary velocity; with ``diffeomorphic=False`` a displacement), e.g. a diffeomorphic network's
    velocity. The whole field is then optimised and regularised: refining a network's field this way
    ended at a higher Dice than composing a residual with it (docs/optimize.md). Not with ``init_ddf``.
    ``iterations``: Adam steps per level, coarse to fine (an int applies to all levels);
    ``learning_rate``: Adam step in voxels of the level (default by similarity,
    :data:`DEFAULT_LEARNING_RATE`); ``smoothness``: diffusion weight (default by
    similarity, :data:`DEFAULT_SMOOTHNESS`); ``finest_factor``: the finest level optimised (1: the
    grid itself, 2: half its resolution, the field then upsampled; much faster). Extra options:
    ``mind_radius``, ``mind_dilation``, ``mi_bins``, ``mi_max_voxels``, ``integration_steps``.
    ``schedule``: "cosine" (the step decays to 5 % within each level, so Adam settles instead of
    jittering by a whole step) or "constant". ``warmup_steps``: the first level's step grows linearly
    from ``1 / warmup_steps`` of the learning rate to all of it over that many steps (None: 5 when
    refining an ``init_ddf`` or ``init_velocity``, else 0). Adam's first steps move every voxel by about the full step
    whatever its gradient, which undoes an already-good field (a network's) when only a few steps follow.
    ``integration_factor``: the (smoothed) velocity is integrated on a grid this many times coarser
    than the level's and the displacement upsampled (1: on the level's grid). Scaling and squaring and
    its backward pass were two thirds of a step's time; the velocity is smooth at that scale anyway
    (docs/optimize.md has the measurements). Levels whose sizes do not divide use 1.
    """
    progress = progress or Progress()
    if schedule not in ("cosine", "constant"):
        raise InputError(f"Unknown schedule '{schedule}'; use 'cosine' or 'constant'.")
    if similarity not in SIMILARITIES:
        raise InputError(f"Unknown similarity '{similarity}' for instance optimisation; use one of "
                         f"{', '.join(SIMILARITIES)}.")
    lam = DEFAULT_SMOOTHNESS[similarity] if smoothness is None else float(smoothness)
    lr = DEFAULT_LEARNING_RATE[similarity] if learning_rate is None else float(learning_rate)
    factors = [f for f in (choose_levels(inputs.grid, int(levels) + int(np.log2(finest_factor))) or [1])
               if f >= finest_factor] or [1]
    iterations = [int(iterations)] * len(factors) if isinstance(iterations, (int, float)) else list(iterations)
    if not iterations or any(int(n) < 0 for n in iterations) or int(levels) < 1:
        raise InputError(f"iterations must be a non-negative number or list of them and levels >= 1; got "
                         f"iterations={iterations}, levels={levels}.")
    # Fewer levels than iteration counts (small images): drop the coarsest counts.
    iterations = ([iterations[0]] * (len(factors) - len(iterations)) + iterations)[-len(factors):]
    steps = int(options.get("integration_steps", 5))
    if init_ddf is not None and init_velocity is not None:
        raise InputError("Give init_ddf (a field to compose a residual with) or init_velocity (the starting "
                         "field), not both.")
    for name, start in (("init_ddf", init_ddf), ("init_velocity", init_velocity)):
        expected = (1, inputs.fixed.dim() - 2) + tuple(inputs.fixed.shape[2:])
        if start is not None and tuple(start.shape) != expected:
            raise InputError(f"{name} must have shape {expected} (a voxel-unit field on the registration grid); "
                             f"got {tuple(start.shape)}.")
    refining = init_ddf is not None or init_velocity is not None
    warmup = (DEFAULT_REFINEMENT_WARMUP if refining else 0) if warmup_steps is None else int(warmup_steps)
    if warmup < 0:
        raise InputError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    if int(integration_factor) != integration_factor or int(integration_factor) < 1:
        raise InputError(f"integration_factor must be an integer >= 1, got {integration_factor!r}.")

    moving, moving_mask = inputs.moving, inputs.moving_mask
    if init_ddf is not None:
        moving = warp(moving, init_ddf)
        moving_mask = warp(moving_mask, init_ddf, padding_mode="zeros")
    fixed = inputs.fixed
    if similarity == "mind":
        # MIND-SSC at full resolution, then average-pooled per level (keeps fine structure).
        r, d = int(options.get("mind_radius", 1)), int(options.get("mind_dilation", 2))
        fixed, moving = mind_ssc(fixed, radius=r, dilation=d), mind_ssc(moving, radius=r, dilation=d)

    total_iters = max(1, sum(iterations))
    done = 0
    param, prev_factor = None, None
    with torch.enable_grad():
        for factor, n_iter in zip(factors, iterations):
            fixed_l = downsample_image(fixed, factor)
            moving_l = downsample_image(moving, factor)
            weight = (downsample_image(inputs.fixed_mask, factor) *
                      downsample_image(moving_mask, factor)).detach()
            sim = _Similarity(similarity, fixed_l, moving_l, options)
            if param is None and init_velocity is not None:
                param = downsample_image(init_velocity.detach().to(fixed_l.device), factor) / factor
            elif param is None:
                param = torch.zeros((1, fixed_l.dim() - 2) + tuple(fixed_l.shape[2:]), device=fixed_l.device)
            else:
                param = upsample_field(param.detach(), prev_factor // factor)
            param = param.detach().requires_grad_(True)
            optimiser = torch.optim.Adam([param], lr=lr)
            decay = (torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, int(n_iter)), lr * 0.05)
                     if schedule == "cosine" else None)
            ramp = warmup if prev_factor is None else 0
            k_int = _integration_factor(param.shape[2:], int(integration_factor))
            for it in range(int(n_iter)):
                optimiser.zero_grad(set_to_none=True)
                field = _smooth(param)
                ddf = _velocity_to_ddf(field, steps, k_int) if diffeomorphic else field
                loss = sim(ddf, weight) + lam * diffusion_regulariser(ddf)
                loss.backward()
                if it < ramp:  # warm-up: this step at (it + 1) / ramp of the scheduled one
                    scheduled = [g["lr"] for g in optimiser.param_groups]
                    for g in optimiser.param_groups:
                        g["lr"] *= (it + 1) / ramp
                    optimiser.step()
                    for g, value in zip(optimiser.param_groups, scheduled):
                        g["lr"] = value
                else:
                    optimiser.step()
                if decay is not None:
                    decay.step()
                done += 1
                progress(done / total_iters, f"instance optimisation, level 1/{factor}: step {it + 1}/{n_iter}")
            prev_factor = factor
    with torch.no_grad():
        field = _smooth(param.detach())
        k_int = _integration_factor(field.shape[2:], int(integration_factor))
        ddf = _velocity_to_ddf(field, steps, k_int) if diffeomorphic else field
        ddf = upsample_field(ddf, factors[-1])
        if init_ddf is not None:
            ddf = compose_fields(ddf, init_ddf)
    return ddf.detach()


class InstanceOptimisation(RegistrationMethod):
    """Multi-level Adam optimisation of a (diffeomorphic) field with MIND-SSC or MI; no training needed."""

    name = "optimize"
    description = ("Instance optimisation: multi-level Adam on a diffeomorphic field with MIND-SSC "
                   "(or MI/LNCC/MSE) similarity; no training, mono- and multi-modal.")
    modalities = "mono+multi"

    def default_options(self) -> dict:
        """Options of :func:`instance_optimise` plus the grid: ``spacing`` (mm, or "auto": the fixed
        image's geometric-mean voxel size clamped to 1..4 mm), ``multiple`` and ``max_voxels``."""
        return {"spacing": "auto", "multiple": 16, "max_voxels": 2_000_000, "similarity": "mind", "levels": 3,
                "finest_factor": 2, "iterations": (40, 40, 30), "learning_rate": None, "smoothness": None,
                "diffeomorphic": True, "integration_steps": 5, "mind_radius": 1, "mind_dilation": 2,
                "mi_bins": 32, "mi_max_voxels": 100_000, "schedule": "cosine",
                "integration_factor": DEFAULT_INTEGRATION_FACTOR}

    def predict(self, inputs: GridInputs, options: dict, progress: Progress) -> torch.Tensor:
        """Run :func:`instance_optimise` with the options (grid options removed); voxel-unit ddf on the grid."""
        opts = {k: v for k, v in options.items() if k not in ("spacing", "multiple", "max_voxels")}
        return instance_optimise(inputs, progress=progress, **opts)
