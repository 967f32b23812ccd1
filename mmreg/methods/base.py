"""The interface every registration method implements.

The pipeline (:func:`mmreg.register`) does everything that is common: validation, intensity
normalisation, affine pre-alignment, resampling onto the method's network grid, conversion of
the predicted voxel-unit field to a physical displacement on the fixed image's full grid,
warping, quality numbers. A method only chooses its grid and predicts a field on it.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import torch

from ..grid import NetworkGrid
from ..progress import Progress


def resolve_spacing(spacing, fixed) -> float:
    """Network spacing in mm: a number as given, or "auto" = the geometric mean of the fixed image's
    voxel size along its non-singleton axes, clamped to 1..4 mm (fine anatomy keeps its detail,
    large volumes are bounded further by ``max_voxels``)."""
    if spacing in (None, "auto"):
        sizes = [sp for sp, n in zip(fixed.GetSpacing(), fixed.GetSize()) if n > 1]
        return float(min(4.0, max(1.0, float(np.exp(np.mean(np.log(sizes)))))))
    return float(spacing)


@dataclass
class GridInputs:
    """What a method receives, all on ``grid`` as ``(1, 1, *spatial)`` tensors on ``device``.

    ``fixed`` / ``moving``: intensity-normalised images in [0, 1], the moving one already
    resampled through the affine pre-alignment. ``fixed_mask`` / ``moving_mask``: the user's mask
    when one was given, else the image's field of view (1 inside, 0 outside); the moving one
    resampled through the affine into fixed space. Methods use them to weight the similarity.
    """

    grid: NetworkGrid
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: torch.Tensor
    moving_mask: torch.Tensor
    device: torch.device


@dataclass
class TrainingSpec:
    """What ``mmreg train`` needs from a learned method (see :meth:`RegistrationMethod.training_spec`).

    ``build_network(architecture) -> nn.Module``: the untrained network a model card describes; it
    reads ``cat(fixed, moving)`` ``(B, 2, *spatial)`` and returns the field output.
    ``default_architecture``: the architecture dict of a fresh network.
    ``loss(fixed, moving, output, cfg, generator) -> (loss, parts)``: the training objective of a
    batch (lower is better; ``parts`` floats for the log, e.g. the similarity), ``cfg`` the
    :class:`mmreg.training.TrainConfig` (loss weights), ``generator`` a ``torch.Generator`` for any
    randomness of the loss (voxel subsampling), so a pair's loss does not depend on the batch it is in.
    ``displacement(output, cfg) -> ddf``: the voxel displacement ``(B, ndim, *spatial)`` the output
    stands for (resampling convention, e.g. an integrated velocity), for validation.
    ``similarity_key``: the entry of ``parts`` reported as the validation similarity (higher is better).
    ``loss_keys``: the config keys of the loss (weights and settings); fine-tuning without a config
    takes them from the base model's recipe.

    A method whose network is not a registration network (the learned metric) gives its own
    ``trainer(cfg, data, resume=..., progress=..., log=...) -> TrainResult`` (then ``loss`` and
    ``displacement`` may be None), ``check_architecture(architecture)`` (raises InputError) and
    ``size_multiple(architecture) -> int``. ``default_settings``: top-level config values of this
    method that differ from :class:`mmreg.training.TrainConfig`'s defaults (e.g. its optimiser's
    learning rate and batch size), used where a config does not set them. ``use_trainer(cfg) -> bool``:
    whether ``trainer`` trains this config (None: always), e.g. only the first of two stages.
    ``prepare_network(network, cfg, device, say)``: called after the network is built (and any base
    model loaded), e.g. to load and freeze the parts an earlier stage trained (frozen parameters are
    not optimised). ``loss_needs_network``: ``loss`` is also given ``network=`` (the unwrapped
    network), for objectives that read its frozen parts. ``check_config(cfg)``: raises InputError
    for settings this method cannot train with (called by :func:`mmreg.training.validate_config`).
    """

    build_network: object
    default_architecture: dict
    loss: object
    displacement: object
    similarity_key: str = "similarity"
    loss_keys: tuple = ()
    trainer: object = None
    check_architecture: object = None
    size_multiple: object = None
    default_settings: dict | None = None
    use_trainer: object = None
    prepare_network: object = None
    loss_needs_network: bool = False
    check_config: object = None


class RegistrationMethod(abc.ABC):
    """Base class: subclasses set ``name``/``description`` and implement :meth:`predict`."""

    name: str = ""
    description: str = ""
    #: "mono", "multi" or "mono+multi": which pairs the method is meant for.
    modalities: str = "mono+multi"
    #: True for learned methods: they cannot run without a trained model (see :meth:`models`).
    requires_model: bool = False

    def default_options(self) -> dict:
        """Options and their defaults (documented by the subclass)."""
        return {}

    def check_options(self, options: dict) -> None:
        """Refuse bad option values with an :class:`InputError` that names the option and the accepted
        values. :func:`mmreg.register` calls it before any work (normalisation, affine), so a typo fails
        at once; nothing to check by default."""

    def models(self) -> list:
        """Trained models available to this method (empty for methods that need none)."""
        return []

    def model_info(self, options: dict) -> dict | None:
        """What identifies the trained model these options select (name, folder, weights sha256,
        network spacing in mm, diffeomorphic), for reports; None for methods without models."""
        return None

    def method_report(self) -> dict | None:
        """Method-specific details of the last :meth:`predict` for the result report (``report["method_trace"]``),
        e.g. the metric value per iteration of an iterative method; None when there is nothing to add."""
        return None

    def method_warnings(self) -> list:
        """Warnings about the last :meth:`predict` for the user (``report["warnings"]``; the command line
        prints them and the Slicer modules show them with the results), e.g. a learned component that
        sees a pair unlike its training data; empty by default."""
        return []

    def extra_outputs(self) -> dict:
        """Scalar maps the last :meth:`predict` produced besides the field, ``{name: (1, 1, *spatial) tensor}``
        on its grid (e.g. ``"attention"``: the attention weights of ``multiscale``). The pipeline resamples
        them onto the fixed image's grid (``RegistrationResult.extra_images``); empty by default."""
        return {}

    def training_spec(self) -> TrainingSpec | None:
        """How ``mmreg train`` trains this method's network (None: not trainable, e.g. ``optimize``)."""
        return None

    def grid_for(self, fixed, options: dict) -> NetworkGrid:
        """The network grid for this fixed image (spacing and size multiple of the method/model)."""
        return NetworkGrid.for_image(fixed, spacing=resolve_spacing(options.get("spacing", "auto"), fixed),
                                     multiple=int(options.get("multiple", 16)),
                                     max_voxels=options.get("max_voxels"))

    @abc.abstractmethod
    def predict(self, inputs: GridInputs, options: dict, progress: Progress) -> torch.Tensor:
        """Voxel-unit displacement ``(1, ndim, *spatial)`` on ``inputs.grid`` (resampling convention)."""
