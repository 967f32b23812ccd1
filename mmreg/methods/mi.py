"""Method ``mi``: an unsupervised CNN trained with differentiable mutual information.

The paper's recipe: an encoder-decoder CNN (:func:`mmreg.networks.registration_unet`, VoxelMorph
layout: 3x3x3 convolutions, LeakyReLU, strided downsampling, skip connections) reads the
concatenated fixed and moving images and predicts a dense field; it is trained without ground
truth to minimise ``-MI(fixed, moving o phi) + lambda * |grad u|^2`` with a Parzen-window
(Gaussian kernel) estimate of mutual information (:class:`mmreg.losses.MutualInformationLoss`,
MONAI) and the diffusion regulariser. One network serves same-modality and cross-modality pairs
without being told which it gets (MI does not care).

Inference: the images on the network grid (the model's training ``spacing_mm``, or the
``inference_spacing_mm`` of its card, or the ``network_spacing_mm`` option; sizes padded to its
``multiple``) -> one forward pass -> the field (integrated by scaling and squaring when the
model predicts a stationary velocity: ``diffeomorphic`` in its card) -> optionally refined by the
engine's instance optimisation (``refinement_steps`` > 0, MIND-SSC by default) starting from it.
With refinement the images are prepared on a grid twice as fine as the training spacing
(:data:`REFINEMENT_GRID_FACTOR`): the network reads them average-pooled to (about) its network
spacing (:meth:`NetworkGrid.coarsen`), its field is upsampled, and the refinement compares the
images at the finer spacing while optimising a velocity at the training spacing (as the
``optimize`` method's finest level does). The shipped ``mi_brain`` (4 mm) and ``mi_brain_3mm`` (3 mm)
were trained on coarser grids than the 2 mm one they run on alone: they gain more Dice there
(docs/mi_training.md, "Network spacing at inference").

Input features: the paper's network reads the two images; a model whose architecture has
``input_features = "mind"`` reads their MIND-SSC descriptors instead (12 channels per image,
:class:`mmreg.networks.FeatureInputNetwork`), the same loss and training otherwise. Trained on T1-T1
pairs only, such a network reads a T1-T2 or T1-PD pair much as a T1-T1 one, where the intensity
network misreads the unseen contrast (docs/mi_training.md, "A contrast-insensitive input").
``mi_brain_mind_distilled`` is such a network also taught to reproduce ``mi_brain_3mm``'s velocity on T1
pairs whose moving image went through a random intensity curve (``teacher_model`` in the training config):
alone at 2 mm it ends above the affine on every multi-modal brain case measured (docs/mi_training.md,
"Distillation"). ``input_features = "intensity_and_mind"`` reads both, the images and then their
descriptors; a ``"mind"`` or ``"intensity"`` model given as ``base_model`` to such a config starts with the
new inputs at zero weight, i.e. as the base model (docs/mi_training.md, "Intensity and MIND-SSC together").

Training (:func:`training_loss`) is shared with ``mmreg train``.
"""
from __future__ import annotations

import torch

from ..losses import MutualInformationLoss, diffusion_regulariser
from ..networks import registration_unet
from ..spatial import integrate_velocity, warp
from .base import TrainingSpec
from .network_method import REFINEMENT_GRID_FACTOR, NetworkRegistration  # noqa: F401 - re-exported

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


class MIRegistration(NetworkRegistration):
    """Mutual-information CNN (needs a trained model: shipped or from ``mmreg train``); model handling,
    inference and refinement are :class:`~mmreg.methods.network_method.NetworkRegistration`'s."""

    name = "mi"
    #: With no model chosen: the intensity network of the paper, ``mi_brain`` trained on at 3 mm (more Dice on
    #: T1-T1 pairs, alone and refined; ``mi_brain`` stays shipped). For pairs in another contrast (T1 vs T2/PD/CT):
    #: ``mi_brain_mind_distilled``, which reads MIND-SSC descriptors and was taught by ``mi_brain_3mm``
    #: (:func:`mmreg.training.teacher_loss`), or its base ``mi_brain_mind``; docs/mi_training.md.
    default_model = "mi_brain_3mm"
    description = ("Unsupervised CNN trained with Parzen-window mutual information and a smoothness penalty; one "
                   "network for mono- and multi-modal pairs; optional instance-optimisation refinement.")
    modalities = "mono+multi"

    @staticmethod
    def build_network(architecture: dict) -> torch.nn.Module:
        """The VoxelMorph-layout U-Net (:func:`mmreg.networks.registration_unet`)."""
        return registration_unet(architecture)

    def training_spec(self) -> TrainingSpec:
        """Trained by ``mmreg train``: the VoxelMorph-layout U-Net, minus Parzen MI plus smoothness."""
        from ..networks import DEFAULT_ARCHITECTURE  # noqa: PLC0415
        return TrainingSpec(build_network=registration_unet, default_architecture=dict(DEFAULT_ARCHITECTURE),
                            loss=_training_objective, displacement=_training_displacement, similarity_key="mi",
                            loss_keys=("smoothness", "mi_bins", "mi_max_voxels", "mi_blur_voxels"))
