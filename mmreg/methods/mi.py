"""Method ``mi``: an unsupervised CNN trained with differentiable mutual information.

The paper's recipe: an encoder-decoder CNN (:func:`mmreg.networks.registration_unet`, VoxelMorph
layout: 3x3x3 convolutions, LeakyReLU, strided downsampling, skip connections) reads the
concatenated fixed and moving images and predicts a dense field; it is trained without ground
truth to minimise ``-MI(fixed, moving o phi) + lambda * |grad u|^2`` with a Parzen-window
(Gaussian kernel) estimate of mutual information (:class:`mmreg.losses.MutualInformationLoss`,
MONAI) and the diffusion regulariser. One network serves same-modality and cross-modality pairs
without being told which it gets (MI does not care).

Inference: the images on the model's network grid (its ``spacing_mm``, sizes padded to its
``multiple``) -> one forward pass -> the field (integrated by scaling and squaring when the
model predicts a stationary velocity: ``diffeomorphic`` in its card) -> optionally refined by the
engine's instance optimisation (``refinement_steps`` > 0, MIND-SSC by default) starting from it.
With refinement the images are prepared on a grid twice as fine (:data:`REFINEMENT_GRID_FACTOR`):
the network reads them average-pooled to its own spacing (:meth:`NetworkGrid.coarsen`), its field is
upsampled, and the refinement compares the images at the finer spacing while optimising a residual
velocity at the network's spacing (as the ``optimize`` method's finest level does).

Training (:func:`training_loss`) is shared with ``mmreg train``.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from ..grid import NetworkGrid, downsample_image, upsample_field
from ..losses import MutualInformationLoss, diffusion_regulariser
from ..models import CARD_FILE, ModelCard, list_models, load_model, resolve_model
from ..networks import registration_unet
from ..progress import Progress
from ..spatial import integrate_velocity, warp
from .base import GridInputs, RegistrationMethod, TrainingSpec
from .optimize import instance_optimise

#: Training defaults of the loss (the paper: MI + lambda * squared gradient of the field).
DEFAULT_LOSS = {"mi_bins": 32, "mi_max_voxels": 100_000, "smoothness": 1.0, "mi_blur_voxels": 0.0}


def training_loss(fixed: torch.Tensor, moving: torch.Tensor, field: torch.Tensor, *, diffeomorphic: bool = True,
                  integration_steps: int = 7, smoothness: float = DEFAULT_LOSS["smoothness"],
                  mi_bins: int = DEFAULT_LOSS["mi_bins"], mi_max_voxels: int = DEFAULT_LOSS["mi_max_voxels"],
                  mi_blur_voxels: float = DEFAULT_LOSS["mi_blur_voxels"], mask: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple:
    """The ``mi`` training objective for a batch: ``(loss, {"mi": ..., "smoothness": ...})``.

    ``fixed`` / ``moving``: ``(B, 1, *spatial)`` images in [0, 1]; ``field``: the network output
    ``(B, ndim, *spatial)`` in voxels (a velocity when ``diffeomorphic``). ``mask``: optional
    ``(B, 1, *spatial)`` weight of the similarity (e.g. the moving image's field of view).
    Returns minus MI (lower is better) plus ``smoothness`` x the diffusion regulariser of the
    displacement. ``mi_blur_voxels`` > 0: both images are Gaussian-smoothed (sigma in voxels, MONAI
    GaussianFilter) after warping and before MI, which lessens the weight of noise and of the
    smoothing that interpolation itself adds; measured to reduce the early Dice loss of CPU
    training (docs/mi_training.md). ``generator``: for MI's random voxel subset (reproducible
    per pair whatever the batch or the number of training processes).
    """
    ddf = integrate_velocity(field, integration_steps) if diffeomorphic else field
    warped = warp(moving, ddf)
    if mi_blur_voxels and mi_blur_voxels > 0:
        from monai.networks.layers import GaussianFilter  # noqa: PLC0415
        blur = GaussianFilter(spatial_dims=fixed.dim() - 2, sigma=float(mi_blur_voxels)).to(fixed.device)
        warped, fixed = blur(warped), blur(fixed)
    mi = MutualInformationLoss(num_bins=int(mi_bins), max_voxels=int(mi_max_voxels), generator=generator)
    sim = mi(warped, fixed, mask)
    reg = diffusion_regulariser(ddf)
    return sim + float(smoothness) * reg, {"mi": float(-sim.detach()), "smoothness": float(reg.detach())}


def _training_objective(fixed, moving, output, cfg, generator=None) -> tuple:
    """:func:`training_loss` with the loss settings of a :class:`mmreg.training.TrainConfig`."""
    return training_loss(fixed, moving, output, diffeomorphic=cfg.diffeomorphic,
                         integration_steps=cfg.integration_steps, smoothness=cfg.smoothness, mi_bins=cfg.mi_bins,
                         mi_max_voxels=cfg.mi_max_voxels, mi_blur_voxels=cfg.mi_blur_voxels, generator=generator)


def _training_displacement(output, cfg) -> torch.Tensor:
    """The voxel displacement of the network output: integrated when the run is diffeomorphic."""
    return integrate_velocity(output, cfg.integration_steps) if cfg.diffeomorphic else output


#: With refinement, the registration grid is this many times finer than the network's spacing.
REFINEMENT_GRID_FACTOR = 2


class MIRegistration(RegistrationMethod):
    """Mutual-information CNN (needs a trained model: shipped or from ``mmreg train``)."""

    name = "mi"
    description = ("Unsupervised CNN trained with Parzen-window mutual information and a smoothness penalty; one "
                   "network for mono- and multi-modal pairs; optional instance-optimisation refinement.")
    modalities = "mono+multi"
    requires_model = True

    def default_options(self) -> dict:
        """``model``: a model name or folder (None: "default" or the only one); ``refinement_steps``:
        Adam steps of instance optimisation after the network (0 = network only): the similarity
        (``refine_similarity``: "mind" or "mi") on a grid twice as fine as the network's, a residual
        velocity at the network's spacing; ``diffeomorphic``: None = as the model was trained (a
        different value is an error: the model defines what its output is); ``max_voxels``: bound on
        the network grid, ``refinement_max_voxels`` on the finer grid of the refinement (larger fields
        of view get coarser grids; the refinement's bound is the ``optimize`` method's)."""
        return {"model": None, "refinement_steps": 0, "refine_similarity": "mind", "diffeomorphic": None,
                "max_voxels": 4_000_000, "refinement_max_voxels": 2_000_000}

    def models(self) -> list:
        """Shipped and user models of ``mi`` (see :func:`mmreg.models.list_models`)."""
        return list_models(self.name)

    def training_spec(self) -> TrainingSpec:
        """Trained by ``mmreg train``: the VoxelMorph-layout U-Net, minus Parzen MI plus smoothness."""
        from ..networks import DEFAULT_ARCHITECTURE  # noqa: PLC0415
        return TrainingSpec(build_network=registration_unet, default_architecture=dict(DEFAULT_ARCHITECTURE),
                            loss=_training_objective, displacement=_training_displacement, similarity_key="mi",
                            loss_keys=("smoothness", "mi_bins", "mi_max_voxels", "mi_blur_voxels"))

    def card(self, options: dict) -> ModelCard:
        """The model card of the chosen model (read from disk; no weights loaded)."""
        return self._card_in(resolve_model(self.name, options.get("model")))

    @staticmethod
    def _card_in(folder) -> ModelCard:
        import json  # noqa: PLC0415
        return ModelCard.from_dict(json.loads((folder / CARD_FILE).read_text()), str(folder / CARD_FILE))

    def model_info(self, options: dict) -> dict:
        """Name, folder, weights sha256, network spacing (mm) and diffeomorphic of the chosen model."""
        folder = resolve_model(self.name, options.get("model"))
        card = self._card_in(folder)
        return {"name": card.name, "path": str(folder),
                "sha256": card.sha256, "spacing_mm": card.spacing_mm, "diffeomorphic": card.diffeomorphic}

    def grid_for(self, fixed, options: dict) -> NetworkGrid:
        """The model's grid (its spacing in mm and size multiple) over the fixed image's extent; with
        refinement, a grid :data:`REFINEMENT_GRID_FACTOR` times finer whose coarsening is a network grid."""
        card = self.card(options)
        if int(options.get("refinement_steps") or 0) > 0:
            factor = REFINEMENT_GRID_FACTOR
            return NetworkGrid.for_image(fixed, spacing=float(card.spacing_mm) / factor,
                                         multiple=int(card.multiple) * factor,
                                         max_voxels=options.get("refinement_max_voxels"))
        return NetworkGrid.for_image(fixed, spacing=float(card.spacing_mm), multiple=int(card.multiple),
                                     max_voxels=options.get("max_voxels"))

    def predict(self, inputs: GridInputs, options: dict, progress: Progress) -> torch.Tensor:
        """One forward pass (then the optional refinement); voxel-unit displacement on ``inputs.grid``."""
        network, card = load_model(self.name, options.get("model"), registration_unet, inputs.device)
        if inputs.fixed.dim() - 2 != int(card.architecture.get("spatial_dims", 3)):
            raise InputError(f"Model '{card.name}' is a {card.architecture.get('spatial_dims')}-D network; this pair "
                             f"is {inputs.fixed.dim() - 2}-D on the network grid.")
        wanted = options.get("diffeomorphic")
        if wanted is not None and bool(wanted) != bool(card.diffeomorphic):
            raise InputError(f"Model '{card.name}' predicts a {'velocity (diffeomorphic)' if card.diffeomorphic else 'displacement'}"
                             f"; diffeomorphic={wanted} needs a model trained that way (leave the option unset).")
        steps = int(options.get("refinement_steps") or 0)
        if steps < 0:
            raise InputError(f"refinement_steps must be >= 0, got {steps}.")
        factor = REFINEMENT_GRID_FACTOR if steps else 1
        progress(0.0, "network")
        with torch.inference_mode():
            fixed, moving = downsample_image(inputs.fixed, factor), downsample_image(inputs.moving, factor)
            field = network(torch.cat([fixed, moving], dim=1))
            ddf = integrate_velocity(field, int(card.integration_steps)) if card.diffeomorphic else field
            ddf = upsample_field(ddf, factor)
        ddf = ddf.clone()  # leave inference mode: the refinement differentiates through a warp of it
        progress(0.3 if steps else 1.0, "network done")
        if steps:
            ddf = instance_optimise(inputs, init_ddf=ddf, similarity=options.get("refine_similarity", "mind"),
                                    levels=1, iterations=[steps], finest_factor=factor,
                                    diffeomorphic=bool(card.diffeomorphic), progress=progress.sub(0.3, 1.0))
        return ddf
