"""What every learned registration network method shares (``mi``, ``multiscale``, ...).

A :class:`NetworkRegistration` reads its trained model (card + weights, :mod:`mmreg.models`),
registers on a network grid over the fixed image (the network spacing, :meth:`NetworkRegistration.network_spacing`:
the ``network_spacing_mm`` option, else the card's ``inference_spacing_mm``, else the training
``spacing_mm``; sizes padded to the card's ``multiple``) with one forward pass, integrates the output by
scaling and squaring when the model predicts a stationary velocity (``diffeomorphic`` in its card),
and optionally refines the field with the engine's instance optimisation (``refinement_steps`` > 0).
With refinement the images are prepared on a grid :data:`REFINEMENT_GRID_FACTOR` times finer than
the training spacing: the network reads them average-pooled by the whole factor nearest to the
network spacing (:meth:`NetworkGrid.coarsen`), its field is upsampled, and the refinement compares
the images at the finer spacing while optimising a velocity at the training spacing.

Single-slice (2-D) pairs with a 3-D model run as a slab: the slice repeated ``multiple`` times
along a new first axis (an image constant across the slab), the network's field read at the middle
slice, its in-plane components kept (:func:`slab`, :func:`middle_of_slab`); 2-D models read them as
they are.

A subclass sets ``name``/``description``/``modalities``, :meth:`build_network` and
:meth:`training_spec`; it may override :meth:`run_network` to keep more than the field (e.g. the
attention weights of ``multiscale``, returned by :meth:`extra_outputs`).
"""
from __future__ import annotations

import abc
import json
import math

import torch

from ..errors import InputError
from ..grid import NetworkGrid, downsample_image, upsample_field
from ..models import CARD_FILE, ModelCard, list_models, load_model, resolve_model
from ..progress import Progress
from ..spatial import integrate_velocity
from .base import GridInputs, RegistrationMethod
from .optimize import SIMILARITIES, instance_optimise

#: With refinement, the registration grid is this many times finer than the network's spacing.
REFINEMENT_GRID_FACTOR = 2

#: How the refinement starts from the network: "velocity" optimises the whole field starting at the
#: network's velocity (a displacement model's displacement), regularising all of it; "composition"
#: optimises a residual composed with the network's field (its errors are not regularised). On the
#: IXI T1-T1 pairs "velocity" ended 0.02-0.03 mean Dice higher (docs/optimize.md).
REFINE_FROM = ("velocity", "composition")


def slab(image: torch.Tensor, depth: int) -> torch.Tensor:
    """A 2-D ``(B, C, H, W)`` tensor as a 3-D ``(B, C, depth, H, W)`` one, the slice repeated ``depth`` times."""
    return image.unsqueeze(2).expand(-1, -1, int(depth), *image.shape[2:]).contiguous()


def middle_of_slab(volume: torch.Tensor, field: bool = False) -> torch.Tensor:
    """The middle slice of a slab ``(B, C, depth, H, W)`` as ``(B, C, H, W)``; a ``field`` (C = 3) keeps its two
    in-plane components (channels 1, 2: along H and W), dropping the one across the slab."""
    mid = volume[:, :, volume.shape[2] // 2]
    return mid[:, 1:] if field else mid


class NetworkRegistration(RegistrationMethod):
    """A registration network with a trained model (shipped or from ``mmreg train``)."""

    requires_model = True
    #: Model used when none is chosen and several are installed (None: "default" or the only one).
    default_model: str | None = None

    @staticmethod
    @abc.abstractmethod
    def build_network(architecture: dict) -> torch.nn.Module:
        """The untrained network a model card's ``architecture`` describes (each subclass names its own)."""

    def default_options(self) -> dict:
        """``model``: a model name or folder (None: "default" or the only one); ``refinement_steps``:
        Adam steps of instance optimisation after the network (0 = network only): the similarity
        (``refine_similarity``: "mind", "mi", "lncc", ...) on a grid twice as fine as the network's, a stationary
        velocity at the network's spacing; ``refine_from`` (:data:`REFINE_FROM`): "velocity" starts that
        velocity at the network's and optimises all of it, "composition" optimises a residual composed
        with the network's field; ``diffeomorphic``: None = as the model was trained (a
        different value is an error: the model defines what its output is); ``max_voxels``: bound on
        the network grid, ``refinement_max_voxels`` on the finer grid of the refinement (larger fields
        of view get coarser grids; the refinement's bound is the ``optimize`` method's); ``symmetric``
        (velocity models only): run the network on both orders of the pair and use half the difference
        of the two velocities, ``(v(fixed, moving) - v(moving, fixed)) / 2``, since the inverse of
        ``exp(v)`` is ``exp(-v)``: the result is inverse-consistent (swapping the images negates it) and
        a deformation the network applies to every pair alike cancels; twice the network time;
        ``network_spacing_mm``: spacing (mm) of the grid the network reads (None: the model's default,
        :meth:`network_spacing`)."""
        return {"model": None, "refinement_steps": 0, "refine_similarity": "mind", "refine_from": "velocity",
                "diffeomorphic": None, "max_voxels": 4_000_000, "refinement_max_voxels": 2_000_000,
                "symmetric": False, "network_spacing_mm": None}

    def chosen_model(self, options: dict):
        """The model the options select: ``options["model"]``, else :attr:`default_model` when installed,
        else None ("default" or the only model; see :func:`mmreg.models.resolve_model`)."""
        if options.get("model") is not None:
            return options["model"]
        if self.default_model and any(m["name"] == self.default_model for m in self.models()):
            return self.default_model
        return None

    def models(self) -> list:
        """Shipped and user models of this method (see :func:`mmreg.models.list_models`)."""
        return list_models(self.name)

    def card(self, options: dict) -> ModelCard:
        """The model card of the chosen model (read from disk; no weights loaded)."""
        return self._card_in(resolve_model(self.name, self.chosen_model(options)))

    @staticmethod
    def _card_in(folder) -> ModelCard:
        return ModelCard.from_dict(json.loads((folder / CARD_FILE).read_text()), str(folder / CARD_FILE))

    def model_info(self, options: dict) -> dict:
        """Name, folder, weights sha256, network spacing (mm) and diffeomorphic of the chosen model."""
        folder = resolve_model(self.name, self.chosen_model(options))
        card = self._card_in(folder)
        return {"name": card.name, "path": str(folder), "sha256": card.sha256, "spacing_mm": card.spacing_mm,
                "network_spacing_mm": self.network_spacing(options, card), "diffeomorphic": card.diffeomorphic}

    def network_spacing(self, options: dict, card: ModelCard | None = None) -> float:
        """Isotropic spacing (mm) of the grid the network reads: ``options["network_spacing_mm"]`` when set;
        else, for the network alone, the card's ``inference_spacing_mm`` (a spacing a benchmark found
        better than the training one), and with refinement (or without that field) the training
        ``spacing_mm``: the refinement does the fine work, and ``mi_brain`` read at 2 mm gave it no
        better start than at 4 mm, only a slower one (docs/mi_training.md). The network is
        convolutional, so it runs at any spacing; its output stays in voxels of the grid it read."""
        card = card or self.card(options)
        chosen = options.get("network_spacing_mm")
        if chosen is None:
            refining = int(options.get("refinement_steps") or 0) > 0
            chosen = card.inference_spacing_mm if card.inference_spacing_mm and not refining else card.spacing_mm
        return float(chosen)

    def network_pooling(self, options: dict, card: ModelCard | None = None) -> int:
        """With refinement: the whole factor by which the network reads the refinement grid (spacing
        ``spacing_mm`` / :data:`REFINEMENT_GRID_FACTOR`), the nearest to the network spacing (at least 1);
        without refinement 1 (the grid is the network's)."""
        card = card or self.card(options)
        if not int(options.get("refinement_steps") or 0):
            return 1
        fine = float(card.spacing_mm) / REFINEMENT_GRID_FACTOR
        return max(1, int(round(self.network_spacing(options, card) / fine)))

    def grid_for(self, fixed, options: dict) -> NetworkGrid:
        """The network grid (:meth:`network_spacing`, the card's size multiple) over the fixed image's
        extent; with refinement, a grid :data:`REFINEMENT_GRID_FACTOR` times finer than the training
        spacing, sized so that pooling it by :meth:`network_pooling` and by the refinement factor both
        give whole grids."""
        card = self.card(options)
        if int(options.get("refinement_steps") or 0) > 0:
            factor = REFINEMENT_GRID_FACTOR
            multiple = int(card.multiple) * math.lcm(factor, self.network_pooling(options, card))
            return NetworkGrid.for_image(fixed, spacing=float(card.spacing_mm) / factor, multiple=multiple,
                                         max_voxels=options.get("refinement_max_voxels"))
        return NetworkGrid.for_image(fixed, spacing=self.network_spacing(options, card), multiple=int(card.multiple),
                                     max_voxels=options.get("max_voxels"))

    def run_network(self, network: torch.nn.Module, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The network's output field for ``fixed``/``moving`` ``(1, 1, *spatial)`` on its grid (voxel units;
        a velocity for diffeomorphic models). Subclasses may keep more in ``self`` for :meth:`extra_outputs`."""
        return network(torch.cat([fixed, moving], dim=1))

    def _network_field(self, network: torch.nn.Module, fixed: torch.Tensor, moving: torch.Tensor,
                       symmetric: bool) -> torch.Tensor:
        """:meth:`run_network`, or with ``symmetric`` half the difference of the velocities of both orders
        (the extra outputs stay those of ``fixed``/``moving``)."""
        field = self.run_network(network, fixed, moving)
        if not symmetric:
            return field
        extra = dict(getattr(self, "_extra", {}))
        backward = self.run_network(network, moving, fixed)
        self._extra = extra
        return 0.5 * (field - backward)

    def check_options(self, options: dict) -> None:
        """The chosen model exists and its card reads (:meth:`card`); ``symmetric`` a bool, true only for a
        model that predicts a velocity; ``refinement_steps`` an integer >= 0; with refinement, ``refine_from``
        one of :data:`REFINE_FROM` and ``refine_similarity`` one of the instance optimisation's similarities."""
        card = self.card(options)
        spacing = options.get("network_spacing_mm")
        if spacing is not None and (isinstance(spacing, bool) or not isinstance(spacing, (int, float))
                                    or not math.isfinite(spacing) or spacing <= 0):
            raise InputError(f"network_spacing_mm must be a spacing in mm > 0 (or unset for the model's default, "
                             f"{self.network_spacing({}, card):g} mm), got {spacing!r}.")
        symmetric = options.get("symmetric", False)
        if not isinstance(symmetric, bool):
            raise InputError(f"symmetric must be true or false, got {symmetric!r}.")
        if symmetric and not card.diffeomorphic:
            raise InputError(f"symmetric=true needs a model that predicts a velocity (diffeomorphic); model "
                             f"'{card.name}' predicts a displacement, whose inverse is not its negative. Leave "
                             "symmetric off for this model.")
        steps = options.get("refinement_steps") or 0
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or int(steps) != steps or steps < 0:
            raise InputError(f"refinement_steps must be an integer >= 0 (0 = the network alone), got {steps!r}.")
        if not steps:
            return
        mode = options.get("refine_from", "velocity")
        if mode not in REFINE_FROM:
            raise InputError(f"refine_from must be one of {', '.join(REFINE_FROM)}; got {mode!r}.")
        similarity = options.get("refine_similarity", "mind")
        if similarity not in SIMILARITIES:
            raise InputError(f"refine_similarity must be one of {', '.join(SIMILARITIES)}; got {similarity!r}.")

    def predict(self, inputs: GridInputs, options: dict, progress: Progress) -> torch.Tensor:
        """One forward pass, two with ``symmetric`` (then the optional refinement); voxel-unit displacement
        on ``inputs.grid``."""
        self.check_options(options)
        self._extra = {}
        network, card = load_model(self.name, self.chosen_model(options), self.build_network, inputs.device)
        model_dims, pair_dims = int(card.architecture.get("spatial_dims", 3)), inputs.fixed.dim() - 2
        as_slab = pair_dims == 2 and model_dims == 3  # a single-slice pair through a 3-D model
        if pair_dims != model_dims and not as_slab:
            raise InputError(f"Model '{card.name}' is a {card.architecture.get('spatial_dims')}-D network; this pair "
                             f"is {inputs.fixed.dim() - 2}-D on the network grid.")
        wanted = options.get("diffeomorphic")
        if wanted is not None and bool(wanted) != bool(card.diffeomorphic):
            raise InputError(f"Model '{card.name}' predicts a {'velocity (diffeomorphic)' if card.diffeomorphic else 'displacement'}"
                             f"; diffeomorphic={wanted} needs a model trained that way (leave the option unset).")
        steps = int(options.get("refinement_steps") or 0)
        factor = self.network_pooling(options, card)  # network grid = inputs.grid pooled by factor
        symmetric = bool(options.get("symmetric", False))
        progress(0.0, "network (both orders of the pair)" if symmetric else "network")
        with torch.inference_mode():
            fixed, moving = downsample_image(inputs.fixed, factor), downsample_image(inputs.moving, factor)
            if as_slab:
                depth = int(card.multiple)
                field = middle_of_slab(self._network_field(network, slab(fixed, depth), slab(moving, depth), symmetric),
                                       field=True)
                self._extra = {k: middle_of_slab(v) for k, v in getattr(self, "_extra", {}).items()}
            else:
                field = self._network_field(network, fixed, moving, symmetric)
            ddf = integrate_velocity(field, int(card.integration_steps)) if card.diffeomorphic else field
            ddf = upsample_field(ddf, factor)
            # the refinement's starting velocity: the network's own, or (displacement models) the
            # displacement as a first-order velocity, exp(u) ~ x + u for a smooth field
            start = upsample_field(field, factor) if card.diffeomorphic else ddf
            # scalar maps to the refinement's finer grid (upsample_field scales vectors by the factor: undo it)
            self._extra = {k: upsample_field(v, factor) / factor for k, v in self._extra.items()}
        ddf, start = ddf.clone(), start.clone()  # leave inference mode: the refinement differentiates through them
        progress(0.3 if steps else 1.0, "network done")
        if not steps:
            return ddf
        # the refined field is always a diffeomorphism (measured on IXI with a displacement model: a
        # displacement residual folded 0.9-2.1 % of voxels)
        mode = options.get("refine_from", "velocity")
        begin = {"init_velocity": start} if mode == "velocity" else {"init_ddf": ddf}
        return instance_optimise(inputs, **begin, similarity=options.get("refine_similarity", "mind"),
                                 levels=1, iterations=[steps], finest_factor=REFINEMENT_GRID_FACTOR,
                                 diffeomorphic=True, progress=progress.sub(0.3, 1.0))

    def extra_outputs(self) -> dict:
        """Scalar maps of the last :meth:`predict` on its grid, ``{name: (1, 1, *spatial) tensor}`` (see
        :meth:`RegistrationMethod.extra_outputs`)."""
        return dict(getattr(self, "_extra", {}))
