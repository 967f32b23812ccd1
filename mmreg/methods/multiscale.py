"""Method ``multiscale``: FMIRNet, multiscale displacement fields fused with spatial attention (mono-modal).

The paper's network (:class:`mmreg.networks.FMIRNet`): a residual U-Net reads the concatenated
fixed and moving images and estimates displacement fields at three scales (full, 1/2, 1/4); the
coarse ones are upsampled (x2, x4, vectors scaled accordingly) and summed into a preliminary field,
and a spatial attention module (a convolution and a sigmoid) gives per-voxel weights that multiply
it into the final field. ``scales`` in the architecture selects FMIRNet-1 (full scale only), -2 or
-3 (the paper's ablation); every shipped variant is a model of this one method.

Training objective (:func:`training_loss`, used by ``mmreg train``): ``MSE + beta * (1 - SSIM)``
between the warped moving and the fixed image plus ``alpha`` times the diffusion regulariser of the
displacement (``ssim_weight`` = beta, ``smoothness`` = alpha in the config). Mono-modal: both
images must show the same contrast (T1-T1, CT-CT, US-US).

Inference, optional diffeomorphic integration (when the model was trained to predict a velocity)
and optional instance-optimisation refinement are :class:`NetworkRegistration`'s; the attention
weights of the last registration are an extra output map named ``"attention"`` (on the fixed grid in
``RegistrationResult.extra_images``), so users can see where the network trusted its fields.
"""
from __future__ import annotations

import torch

from ..losses import diffusion_regulariser, mse_loss, ssim_loss
from ..networks import ATTENTION_NORMALIZATIONS, DEFAULT_MULTISCALE_ARCHITECTURE, fmirnet, fmirnet_size_multiple
from ..spatial import integrate_velocity, warp
from .base import TrainingSpec
from .network_method import NetworkRegistration

#: Loss settings of the shipped recipes (chosen by measurement: docs/multiscale.md).
DEFAULT_LOSS = {"smoothness": 0.2, "ssim_weight": 0.5, "ssim_window": 7}


def training_loss(fixed: torch.Tensor, moving: torch.Tensor, field: torch.Tensor, *, diffeomorphic: bool = False,
                  integration_steps: int = 7, smoothness: float = DEFAULT_LOSS["smoothness"],
                  ssim_weight: float = DEFAULT_LOSS["ssim_weight"], ssim_window: int = DEFAULT_LOSS["ssim_window"],
                  mask: torch.Tensor | None = None) -> tuple:
    """The ``multiscale`` objective for a batch: ``(loss, {"mse", "ssim", "smoothness"})``.

    ``fixed`` / ``moving``: ``(B, 1, *spatial)`` images in [0, 1]; ``field``: the network output
    ``(B, ndim, *spatial)`` in voxels of the grid (a velocity when ``diffeomorphic``). Loss =
    ``MSE(warped, fixed) + ssim_weight * (1 - SSIM(warped, fixed)) + smoothness * diffusion(ddf)``;
    SSIM with a Gaussian window of ``ssim_window`` voxels (sigma 1.5 voxels). ``mask``: optional
    weight of the similarity. ``parts["ssim"]`` is the SSIM itself (higher is better).
    """
    ddf = integrate_velocity(field, integration_steps) if diffeomorphic else field
    warped = warp(moving, ddf)
    mse = mse_loss(warped, fixed, mask)
    dssim = ssim_loss(warped, fixed, mask, win_size=int(ssim_window))
    reg = diffusion_regulariser(ddf)
    loss = mse + float(ssim_weight) * dssim + float(smoothness) * reg
    return loss, {"mse": float(mse.detach()), "ssim": float(1.0 - dssim.detach()), "smoothness": float(reg.detach())}


def _training_objective(fixed, moving, output, cfg, generator=None) -> tuple:
    """:func:`training_loss` with the loss settings of a :class:`mmreg.training.TrainConfig`."""
    return training_loss(fixed, moving, output, diffeomorphic=cfg.diffeomorphic, integration_steps=cfg.integration_steps,
                         smoothness=cfg.smoothness, ssim_weight=cfg.ssim_weight, ssim_window=cfg.ssim_window)


def _training_displacement(output, cfg) -> torch.Tensor:
    """The voxel displacement of the network output: integrated when the run is diffeomorphic."""
    return integrate_velocity(output, cfg.integration_steps) if cfg.diffeomorphic else output


def check_architecture(architecture: dict) -> None:
    """:class:`InputError` naming the key when an FMIRNet architecture (training config) is unusable."""
    from ..errors import InputError  # noqa: PLC0415
    arch = dict(DEFAULT_MULTISCALE_ARCHITECTURE, **architecture)
    if int(arch.get("spatial_dims", 3)) != 3:
        raise InputError("Training config: architecture.spatial_dims must be 3 (the training grid is 3-D).")
    if arch.get("scales") not in (1, 2, 3):
        raise InputError(f"Training config: architecture.scales must be 1, 2 or 3, got {arch.get('scales')!r}.")
    enc, dec = arch.get("encoder_channels"), arch.get("decoder_channels")
    ok = (isinstance(enc, list) and isinstance(dec, list) and len(enc) >= 3 and len(dec) == len(enc) - 1
          and all(isinstance(c, int) and c > 0 for c in enc + dec))
    if not ok:
        raise InputError("Training config: architecture.encoder_channels must list >= 3 positive integers and "
                         f"decoder_channels one fewer; got {enc!r} and {dec!r}.")
    if not (isinstance(arch.get("subunits"), int) and arch["subunits"] >= 1):
        raise InputError(f"Training config: architecture.subunits must be an integer >= 1, got {arch.get('subunits')!r}.")
    if arch.get("attention_normalization") not in ATTENTION_NORMALIZATIONS:
        raise InputError("Training config: architecture.attention_normalization must be one of "
                         f"{', '.join(repr(a) for a in ATTENTION_NORMALIZATIONS)}, "
                         f"got {arch.get('attention_normalization')!r}.")


class MultiscaleRegistration(NetworkRegistration):
    """FMIRNet (needs a trained model: shipped ``multiscale_brain`` (3 scales, the default), the scale
    ablation ``multiscale_brain_1scale`` / ``_2scales`` / ``_3scales`` (one shared recipe), or one from
    ``mmreg train``)."""

    name = "multiscale"
    description = ("FMIRNet: residual U-Net predicting displacement fields at full, 1/2 and 1/4 resolution, fused "
                   "with spatial attention; MSE + SSIM training; mono-modal; optional instance-optimisation "
                   "refinement; the attention weights are an extra output.")
    modalities = "mono"
    default_model = "multiscale_brain"

    def default_options(self) -> dict:
        """As :meth:`NetworkRegistration.default_options`, refinement by LNCC (a mono-modal similarity)."""
        return dict(super().default_options(), refine_similarity="lncc")

    @staticmethod
    def build_network(architecture: dict) -> torch.nn.Module:
        """FMIRNet (:class:`mmreg.networks.FMIRNet`) with 1, 2 or 3 scales."""
        return fmirnet(architecture)

    def run_network(self, network, fixed, moving) -> torch.Tensor:
        """The fused field; keeps the attention weights for :meth:`extra_outputs`."""
        details = network.forward_details(torch.cat([fixed, moving], dim=1))
        self._extra = {"attention": details["attention"]}
        return details["field"]

    def training_spec(self) -> TrainingSpec:
        """Trained by ``mmreg train``: FMIRNet, MSE + beta (1 - SSIM) + alpha * diffusion."""
        return TrainingSpec(build_network=fmirnet, default_architecture=dict(DEFAULT_MULTISCALE_ARCHITECTURE),
                            loss=_training_objective, displacement=_training_displacement, similarity_key="ssim",
                            loss_keys=("smoothness", "ssim_weight", "ssim_window"),
                            size_multiple=fmirnet_size_multiple, check_architecture=check_architecture,
                            default_settings={"smoothness": DEFAULT_LOSS["smoothness"],
                                              "ssim_weight": DEFAULT_LOSS["ssim_weight"],
                                              "ssim_window": DEFAULT_LOSS["ssim_window"], "diffeomorphic": False,
                                              "learning_rate": 1e-4})
