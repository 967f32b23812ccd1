"""Method ``grad``: dual-branch image and gradient-map registration with gated fusion (multi-modal).

The paper's network (:class:`mmreg.networks.GradNet`): gradient-magnitude maps of both images (a
fixed finite-difference convolution, :func:`mmreg.networks.gradient_magnitude`) act as another
modality that outlines organ boundaries. An image branch (VoxelMorph U-Net on fixed + moving) predicts
``phi_i``, a gradient branch (the same on the two gradient maps) predicts ``phi_g``, and a fusion gives
``phi_ig``, the field that warps the moving image: "gated" (a convolution and a sigmoid give gate maps
that weigh each field, a 1x1x1 convolution mixes the products) or "average". The paper's baselines are
models of this method too: "vm" (the image branch alone) and "vm_concat" (one branch reading the images
and their gradient maps).

Training objective (:func:`training_loss`, used by ``mmreg train``): MIND-SSC difference between the
warped moving and the fixed image + ``alpha`` (``gradient_weight``) x MIND-SSC difference between the
moving gradient map warped by ``phi_g`` and the fixed gradient map + ``beta`` (``smoothness``) x the
squared-gradient (diffusion) regulariser of ``phi_ig`` + ``gamma`` (``gradient_smoothness``) x that of
``phi_g``. The single-branch variants have the first and third terms only.

Inference, optional diffeomorphic integration and optional refinement (instance optimisation with
MIND-SSC by default) are :class:`NetworkRegistration`'s. The gate maps of the last registration (mean
over the vector components; "gated" models only) are extra output maps ``"image_gate"`` and
``"gradient_gate"`` (in (0, 1), on the fixed grid in ``RegistrationResult.extra_images``): where the
gradient gate is high, the network trusted the edges.
"""
from __future__ import annotations

import torch

from ..losses import MINDSSCLoss, diffusion_regulariser
from ..networks import DEFAULT_GRAD_ARCHITECTURE, GRAD_VARIANTS, gradient_magnitude, gradnet, gradnet_size_multiple
from ..spatial import integrate_velocity, warp
from .base import TrainingSpec
from .network_method import NetworkRegistration

#: Loss weights of the shipped recipes: the paper's abdominal setting (alpha, beta, gamma) = (0.5, 1, 0.5).
DEFAULT_LOSS = {"gradient_weight": 0.5, "smoothness": 1.0, "gradient_smoothness": 0.5}


def split_output(output: torch.Tensor, ndim: int) -> tuple:
    """``(phi_ig, phi_g)`` of a :class:`GradNet` output (``phi_g`` None for the single-branch variants)."""
    if output.shape[1] == 2 * ndim:
        return output[:, :ndim], output[:, ndim:]
    return output, None


def training_loss(fixed: torch.Tensor, moving: torch.Tensor, output: torch.Tensor, *, diffeomorphic: bool = False,
                  integration_steps: int = 7, smoothness: float = DEFAULT_LOSS["smoothness"],
                  gradient_weight: float = DEFAULT_LOSS["gradient_weight"],
                  gradient_smoothness: float = DEFAULT_LOSS["gradient_smoothness"],
                  mask: torch.Tensor | None = None) -> tuple:
    """The ``grad`` objective for a batch: ``(loss, parts)``.

    ``fixed`` / ``moving``: ``(B, 1, *spatial)`` images in [0, 1]; ``output``: the :class:`GradNet`
    output in voxels of the grid (``phi_ig``, or ``cat(phi_ig, phi_g)`` for the two-branch variants;
    velocities when ``diffeomorphic``). Loss = ``MIND(warped moving, fixed) + smoothness * diffusion(phi_ig)``
    and, with ``phi_g``, ``+ gradient_weight * MIND(moving gradient map o phi_g, fixed gradient map) +
    gradient_smoothness * diffusion(phi_g)``. MIND-SSC with radius 1 and dilation 2 voxels. ``mask``:
    optional weight of the similarities. ``parts``: "mind" (the image term, lower is better),
    "mind_similarity" (1 - mind, higher is better), "smoothness", and with two branches "gradient_mind",
    "gradient_smoothness".
    """
    nd = fixed.dim() - 2
    phi, phi_g = split_output(output, nd)

    def displacement(f):
        return integrate_velocity(f, integration_steps) if diffeomorphic else f

    mind = MINDSSCLoss()
    ddf = displacement(phi)
    sim = mind(warp(moving, ddf), fixed, mask)
    reg = diffusion_regulariser(ddf)
    loss = sim + float(smoothness) * reg
    parts = {"mind": float(sim.detach()), "mind_similarity": float(1.0 - sim.detach()), "smoothness": float(reg.detach())}
    if phi_g is not None:
        ddf_g = displacement(phi_g)
        sim_g = mind(warp(gradient_magnitude(moving), ddf_g), gradient_magnitude(fixed), mask)
        reg_g = diffusion_regulariser(ddf_g)
        loss = loss + float(gradient_weight) * sim_g + float(gradient_smoothness) * reg_g
        parts.update(gradient_mind=float(sim_g.detach()), gradient_smoothness=float(reg_g.detach()))
    return loss, parts


def _training_objective(fixed, moving, output, cfg, generator=None) -> tuple:
    """:func:`training_loss` with the loss settings of a :class:`mmreg.training.TrainConfig`."""
    return training_loss(fixed, moving, output, diffeomorphic=cfg.diffeomorphic, integration_steps=cfg.integration_steps,
                         smoothness=cfg.smoothness, gradient_weight=cfg.gradient_weight,
                         gradient_smoothness=cfg.gradient_smoothness)


def _training_displacement(output, cfg) -> torch.Tensor:
    """The voxel displacement ``phi_ig`` stands for (integrated when the run is diffeomorphic)."""
    phi, _ = split_output(output, output.dim() - 2)
    return integrate_velocity(phi, cfg.integration_steps) if cfg.diffeomorphic else phi


def check_architecture(architecture: dict) -> None:
    """:class:`InputError` naming the key when a GradNet architecture (training config) is unusable."""
    from ..errors import InputError  # noqa: PLC0415
    arch = dict(DEFAULT_GRAD_ARCHITECTURE, **architecture)
    if int(arch.get("spatial_dims", 3)) != 3:
        raise InputError("Training config: architecture.spatial_dims must be 3 (the training grid is 3-D).")
    if arch.get("variant") not in GRAD_VARIANTS:
        raise InputError(f"Training config: architecture.variant must be one of {', '.join(GRAD_VARIANTS)}, "
                         f"got {arch.get('variant')!r}.")
    ch, fc = arch.get("channels"), arch.get("final_conv_channels")
    if not (isinstance(ch, list) and len(ch) >= 2 and len(ch) % 2 == 0 and all(isinstance(c, int) and c > 0 for c in ch)):
        raise InputError(f"Training config: architecture.channels must be an even-length list of positive integers, got {ch!r}.")
    if not (isinstance(fc, list) and len(fc) >= 1 and all(isinstance(c, int) and c > 0 for c in fc)):
        raise InputError("Training config: architecture.final_conv_channels must be a non-empty list of positive "
                         f"integers, got {fc!r}.")


class GradRegistration(NetworkRegistration):
    """Dual-branch image + gradient-map network (needs a trained model: shipped ``grad_mr_gated`` and the
    other variants, ``grad_ctmr_gated``, or one from ``mmreg train``)."""

    name = "grad"
    description = ("Dual-branch network: an image branch and a gradient-magnitude branch predict fields fused by "
                   "learned gates (or averaged); VoxelMorph and VoxelMorph(concat) baselines as models; MIND "
                   "training; multi-modal; optional MIND refinement; the gate maps are extra outputs.")
    modalities = "mono+multi"
    default_model = "grad_mr_gated"

    @staticmethod
    def build_network(architecture: dict) -> torch.nn.Module:
        """GradNet (:class:`mmreg.networks.GradNet`), any of its variants."""
        return gradnet(architecture)

    def run_network(self, network, fixed, moving) -> torch.Tensor:
        """The fused field ``phi_ig``; keeps the gate maps (channel means) for :meth:`extra_outputs`."""
        details = network.forward_details(torch.cat([fixed, moving], dim=1))
        self._extra = {}
        if details["image_gate"] is not None:
            self._extra = {"image_gate": details["image_gate"].mean(dim=1, keepdim=True),
                           "gradient_gate": details["gradient_gate"].mean(dim=1, keepdim=True)}
        return details["field"]

    def training_spec(self) -> TrainingSpec:
        """Trained by ``mmreg train``: GradNet, MIND + alpha MIND(gradient maps) + beta/gamma smoothness."""
        return TrainingSpec(build_network=gradnet, default_architecture=dict(DEFAULT_GRAD_ARCHITECTURE),
                            loss=_training_objective, displacement=_training_displacement,
                            similarity_key="mind_similarity",
                            loss_keys=("smoothness", "gradient_weight", "gradient_smoothness"),
                            size_multiple=gradnet_size_multiple, check_architecture=check_architecture,
                            default_settings={"smoothness": DEFAULT_LOSS["smoothness"],
                                              "gradient_weight": DEFAULT_LOSS["gradient_weight"],
                                              "gradient_smoothness": DEFAULT_LOSS["gradient_smoothness"],
                                              "learning_rate": 1e-4})
