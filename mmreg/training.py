"""Training of the learned methods: ``mmreg train CONFIG.toml`` (engine side, no Slicer imports).

The recipe (method ``mi``): every volume is brought once onto ONE common training grid (the
avg152T1 template's extent at ``spacing_mm``, sizes padded to the network's size multiple),
intensities in [0, 1]; IXI T1 images (and their DLMUSE label maps) are affinely aligned to the
template first (:func:`mmreg.affine.affine_prealign`), the avg152 T2/PD templates already lie on
the template grid. Each step samples a pair per the data weights

* ``t1_t1``: IXI T1 (fixed) vs another training subject's T1 (moving), mono-modal;
* ``t1_template``: IXI T1 (fixed) vs avg152 T2 or PD (moving), real multi-modal (or the CT template,
  ``data.template_modalities``); ``template_t1``: the same with the template fixed and the T1 moving;
* ``t1_synth``: IXI T1 (fixed) vs a contrast synthesised from a subject's DLMUSE labels
  (random intensity per label, blur; SynthMorph-like),
* ``t1_t1_remap``: as ``t1_t1`` with the moving T1 through a random intensity curve
  (:func:`remap_intensities`): inter-subject pairs in a synthesised contrast (multi-modal),
* ``t1_self``: IXI T1 (fixed) vs the same T1 (moving), half of the time through a random smooth
  intensity curve (:func:`remap_intensities`: a synthesised contrast that keeps the anatomy), so
  the only misalignment is the augmentation's: a per-pair signal that 8 subjects cannot give,

augments it (moving side: a random smooth diffeomorphic deformation plus a small affine jitter;
both sides: a smooth multiplicative bias field and Gaussian noise), runs the network on
``cat(fixed, moving)`` and takes an Adam step on :func:`mmreg.methods.mi.training_loss`.
Validation on held-out subjects (fixed pairs, deterministic) scores the mean Dice of the DLMUSE
labels before (identity) and after the network and the folding percentage; the best weights by
validation Dice are kept. Checkpoints (network, optimiser, step, RNG states, config) make
``--resume`` continue exactly where the run stopped. At the end the model is written with
:func:`mmreg.models.save_model` and a full :class:`mmreg.models.ModelCard`, so
``mmreg register ... --method mi --model <name or folder>`` uses it at once.

Conventions: tensors ``(B, C, *spatial)`` with spatial dims in numpy order (z, y, x) of the
training grid; fields in VOXELS of the training grid, channel k along spatial dim k; resampling
convention: fixed voxel x <-> moving voxel x + u(x) (``warp(moving, u)`` looks like ``fixed``).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import CancelledError, InputError, WeightsError
from .grid import NetworkGrid
from .progress import Progress, ProgressCallback

#: Data sources a pair can be drawn from (see the module doc).
SOURCES = ("t1_t1", "t1_t1_remap", "t1_template", "template_t1", "t1_synth", "t1_self")
#: Templates the ``t1_template`` / ``template_t1`` sources can use (avg152 T1/T2/PD; "CT": the scct_cormack head CT).
TEMPLATE_MODALITIES = ("T1", "T2", "PD", "CT")
#: Options of :func:`mmreg.methods.optimize.instance_optimise` a ``teacher_optimisation`` table may set.
TEACHER_OPTIMISATION_KEYS = ("similarity", "levels", "iterations", "learning_rate", "smoothness", "finest_factor",
                             "schedule", "integration_factor", "integration_steps", "mind_radius", "mind_dilation",
                             "mi_bins", "mi_max_voxels")
#: Bump when the prepared-data layout or recipe changes (invalidates the cache).
PREP_VERSION = 1
CHECKPOINT_DIR = "training"

# ----------------------------------------------------------------------------- configuration


@dataclass
class DataConfig:
    """``[data]`` of the config: where the images come from and how pairs are drawn.

    ``root``: the shared data folder (None: ``$MMREG_DATA`` or ``<repo>/../shared/data``).
    ``sources``: relative weights of the pair kinds (:data:`SOURCES`): "t1_t1" (an IXI T1 fixed, another
    subject's T1 moving), "t1_t1_remap" (the moving T1 through a random intensity curve), "t1_template"
    (IXI T1 fixed, a template moving), "template_t1" (a template fixed, an IXI T1 moving), "t1_synth" (a
    contrast synthesised from labels moving), "t1_self" (a subject against itself). ``template_modalities``:
    which templates the template sources use (:data:`TEMPLATE_MODALITIES`: avg152 "T1", "T2", "PD", and
    "CT", the scct_cormack head CT template on the same grid, percentile-normalised). ``validation_subjects``: held-out
    IXI ids (never trained on). ``training_subjects``: ids to train on (empty: every other one).
    ``cache_dir``: where prepared volumes are cached (None: ``$MMREG_CACHE/train`` or
    ``~/.cache/mmreg/train``).

    ``manifest``: a CSV/JSON manifest of the user's own pairs (:mod:`mmreg.manifest`); when set,
    the pairs come from it alone (``sources``, the subjects and the templates are not used) and
    each pair lies on its fixed image's grid at ``spacing_mm``, all of one size (the largest, or
    ``grid_size``). ``validation_fraction``: share of the manifest's pairs without a ``split``
    held out for validation when none is marked "validation" (at least one when there are two
    pairs or more; 0: no validation). ``prealign``: "affine" (the moving image affinely aligned to
    the fixed one first, as ``mmreg register`` does) or "none" (pairs already roughly aligned).
    ``validate_templates``: also validate on each held-out subject's T1 <- each MR template of
    ``template_modalities``, scored with the templates' Neuromorphometrics labels (kind "template"; the
    best checkpoint then counts them too). Shared data only (not with a manifest).
    """

    root: str | None = None
    sources: dict = field(default_factory=lambda: {"t1_t1": 0.4, "t1_template": 0.3, "t1_synth": 0.3})
    template_modalities: list = field(default_factory=lambda: ["T2", "PD"])
    validation_subjects: list = field(default_factory=lambda: ["IXI049", "IXI051"])
    training_subjects: list = field(default_factory=list)
    cache_dir: str | None = None
    manifest: str | None = None
    validation_fraction: float = 0.2
    prealign: str = "affine"
    validate_templates: bool = False


@dataclass
class AugmentConfig:
    """``[augment]`` of the config (0 switches an augmentation off).

    ``deformation_max_mm``: largest displacement (mm, about) of the random smooth deformation of
    the moving image (a stationary velocity on a control grid of ``deformation_control_mm``
    spacing, integrated: diffeomorphic); its size is drawn uniformly in [0.25, 1] x max.
    ``rotation_deg`` / ``scale`` / ``translation_mm``: uniform affine jitter of the moving image
    (per axis, +-). ``bias_strength``: a smooth multiplicative field ``exp(s * g)`` with g in
    [-1, 1]; ``noise_std``: Gaussian noise (intensities in [0, 1]); ``synth_blur_voxels``: largest
    Gaussian sigma of the synthesised contrasts; ``moving_blur_voxels``: largest Gaussian sigma
    (voxels of the training grid, drawn uniformly in [0, max] per pair) of a blur of the moving T1 of
    ``t1_t1`` / ``t1_t1_remap`` pairs, before the intensity curve (template-like images: the avg152
    templates are averages of many brains); a teacher reads the sharp image; ``augment_fixed``: bias
    and noise on the fixed image too.

    Defaults: bias and noise only. The spatial augmentations are off because on our data they cost
    the ``mi`` network validation Dice at CPU budgets (docs/mi_training.md: 0.438 after 900 steps
    with them, 0.533 after 300 without); switch them on for a few pairs and long runs.
    :meth:`off` gives a config without any augmentation.
    """

    deformation_max_mm: float = 0.0
    deformation_control_mm: float = 40.0
    rotation_deg: float = 0.0
    scale: float = 0.0
    translation_mm: float = 0.0
    bias_strength: float = 0.3
    noise_std: float = 0.02
    synth_blur_voxels: float = 1.0
    moving_blur_voxels: float = 0.0
    augment_fixed: bool = True

    @classmethod
    def off(cls) -> "AugmentConfig":
        """No augmentation at all (no deformation, jitter, bias or noise)."""
        return cls(deformation_max_mm=0.0, rotation_deg=0.0, scale=0.0, translation_mm=0.0, bias_strength=0.0,
                   noise_std=0.0, augment_fixed=False)


@dataclass
class MetricTrainConfig:
    """``[metric]`` of the config: how the learned metric (method ``metric``) draws its patch samples.

    ``pairs``: aligned pairs of the shared data to train on when there is no manifest, each
    "A-B" from "T1", "T2", "PD" (the avg152 templates), "CT" (the scct_cormack CT template,
    percentile-normalised), "CTHU" (the skull-stripped HU CT template, CT window) and "IXI-synth"
    (IXI T1 training subjects against a random intensity remapping of themselves: sharp real anatomy
    in synthesised contrasts). ``validation_pairs``: the same kinds held out for validation (patches
    drawn with another seed; "IXI-synth" here uses ``data.validation_subjects``).
    ``optimizer``: "sgd" (the paper: with ``momentum``) or "adam". ``rotation_deg``: largest
    rotation of a patch (random axis); ``scale_range``: scales drawn log-uniformly in [1/r, r];
    ``mirror``: random reflections; ``coarse_fraction``: share of samples taken at half resolution
    (the coarse level of the registration pyramid); ``negatives``: relative frequencies of the kinds
    of negative ("shift": the same transformation at a position ``negative_shift_voxels`` [min, max]
    away; "transform": same position, independent rotation/scale/mirroring; "random": another
    foreground position); ``gamma``: per-patch, per-channel random gamma exp(U(-g, g));
    ``noise_std``: largest Gaussian noise; ``swap_channels``: random channel order (the metric then
    does not care which image is fixed); ``foreground_threshold``: patch centres lie where either
    image exceeds it; ``validation_patches``: size of the fixed validation sample.
    ``ranking_weight`` (not in the paper; 0 = the paper's hinge loss alone): weight of
    :func:`mmreg.patch_metric.ranking_loss` over ``ranking_pairs`` aligned patch pairs per step, each
    also taken with the modality-B patch shifted by ``ranking_shift_voxels`` [min, max] voxels; its
    score must exceed the aligned one by ``ranking_margin_per_voxel`` per voxel of shift (a V-shaped
    score near alignment instead of the hinge loss's flat bottom).
    Adversarial negatives (not in the paper; ``negatives`` weight "adversarial", 0 = off): every
    ``adversarial_every`` steps the run registers ``adversarial_pairs`` of its ALIGNED training pairs
    with the current network as the similarity (the method's B-spline stage from the identity,
    ``adversarial_iterations`` steps per level, :func:`mmreg.patch_metric.adversarial_displacement`):
    every displacement found is one the metric prefers to the true alignment. Patches of modality B
    taken through that deformation, centred where it moves at least ``adversarial_min_voxels``
    voxels, are then negatives of kind "adversarial" (hard-negative mining against the optimiser).
    Mining also runs when a run starts or resumes (the deformations are not kept in checkpoints).
    ``adversarial_ranking_weight`` > 0 also mines, and adds that weight x :func:`mmreg.patch_metric.ranking_loss`
    over ``ranking_pairs`` aligned patch pairs taken a second time through the mined deformation: their
    score must exceed the aligned one by ``ranking_margin_per_voxel`` per voxel the deformation moves
    the patch centre (the order the optimiser got wrong, without calling a small misalignment
    "misaligned").
    """

    pairs: list = field(default_factory=lambda: ["T1-T2", "T1-PD", "T2-PD", "IXI-synth"])
    validation_pairs: list = field(default_factory=lambda: ["IXI-synth"])
    optimizer: str = "sgd"
    momentum: float = 0.9
    rotation_deg: float = 180.0
    scale_range: float = 1.25
    mirror: bool = True
    coarse_fraction: float = 0.35
    negatives: dict = field(default_factory=lambda: {"shift": 0.5, "transform": 0.25, "random": 0.25})
    negative_shift_voxels: list = field(default_factory=lambda: [1.5, 8.0])
    gamma: float = 0.3
    noise_std: float = 0.03
    swap_channels: bool = True
    foreground_threshold: float = 0.05
    validation_patches: int = 2048
    ranking_weight: float = 0.0
    ranking_pairs: int = 64
    ranking_shift_voxels: list = field(default_factory=lambda: [0.25, 2.0])
    ranking_margin_per_voxel: float = 1.0
    adversarial_every: int = 500
    adversarial_pairs: int = 3
    adversarial_iterations: int = 60
    adversarial_min_voxels: float = 1.0
    adversarial_ranking_weight: float = 0.0


@dataclass
class DisentangledTrainConfig:
    """``[disentangled]`` of the config: the two training stages of method ``disentangled``.

    ``stage``: "rdm" (the representation disentangling model: unpaired images of the two domains,
    :func:`mmreg.rdm.rdm_losses`) or "registration" (the registration network with the RDM of
    ``rdm_model`` frozen, :func:`mmreg.methods.disentangled.training_loss`). Domain a is the fixed
    image of every training pair (an IXI T1), domain b the moving one (the template of
    ``data.template_modalities``); ``architecture.domains`` names them. ``rdm_model``: a
    ``disentangled`` model name or folder (its RDM is used), or a ``.pt`` file of its weights.
    ``reconstruction_weight``, ``latent_weight``, ``cycle_weight``, ``adversarial_weight``: the RDM
    losses (the paper: 10, 1, 10, 1); ``crop_voxels``: the RDM trains on random cubes of this size
    (voxels of the training grid; 0: whole volumes). ``content_weight``, ``msd_weight``: the
    registration stage (the paper: 1, 5; ``smoothness`` weighs each field's regulariser).
    ``paired_weight`` and ``paired_fraction``: not in the paper (its RDM is unpaired): that share of
    the RDM's steps draws an ALIGNED pair instead (the avg152 T1 template and the domain-b template,
    the same augmentation and crop for both) and adds ``paired_weight`` x the L1 difference between
    each translation and the real image of the other modality (0: unpaired only, as the paper).
    """

    stage: str = "registration"
    rdm_model: str | None = None
    reconstruction_weight: float = 10.0
    latent_weight: float = 1.0
    cycle_weight: float = 10.0
    adversarial_weight: float = 1.0
    crop_voxels: int = 32
    paired_weight: float = 0.0
    paired_fraction: float = 0.5
    content_weight: float = 1.0
    msd_weight: float = 5.0


@dataclass
class TrainConfig:
    """A training run (read from TOML with :func:`load_config`; every field has a default).

    ``method``: a trainable method (:func:`mmreg.methods.trainable_methods`; so far "mi").
    ``name``: the model name (folder name
    under the user model folder). ``output``: the model folder (None:
    ``user_model_root()/<method>/<name>``); checkpoints go to ``<output>/training/``.
    ``spacing_mm``: isotropic spacing of the training grid (= the model's network spacing).
    ``grid_size``: ITK (x, y, z) size of the training grid centred on the template, each a
    multiple of the network multiple (empty: the template's extent, padded). ``steps``: total
    optimiser steps; ``batch_size``: pairs per step; ``learning_rate``: Adam. ``warmup_steps``: the
    learning rate grows linearly from ``learning_rate / warmup_steps`` to ``learning_rate`` over the
    first ``warmup_steps`` steps (0: none). ``gradient_clip``: the gradients' global L2 norm is clipped
    to this before each step (0: no clipping); both apply to the registration networks' training, not to
    the metric's or the disentangled RDM's own trainers. ``smoothness``,
    ``diffeomorphic``, ``integration_steps``, ``mi_bins``, ``mi_max_voxels``, ``mi_blur_voxels``: the loss and the
    field (see :func:`mmreg.methods.mi.training_loss`); ``ssim_weight`` (beta) and ``ssim_window`` (voxels):
    the SSIM term of ``multiscale`` (:func:`mmreg.methods.multiscale.training_loss`, where ``smoothness`` is alpha);
    ``gradient_weight`` (alpha) and ``gradient_smoothness`` (gamma): the gradient-branch terms of ``grad``
    (:func:`mmreg.methods.grad.training_loss`, where ``smoothness`` is beta). ``validation_every`` /
    ``checkpoint_every``: in steps (0: only at the end). ``final_model``: "best" (by validation
    Dice; by validation loss when the validation pairs have no labels) or "last". ``threads``: CPU threads (None: all cores); ``device``: auto/cpu/cuda/mps.
    ``architecture``: overrides of :data:`mmreg.networks.DEFAULT_ARCHITECTURE`. ``base_model``:
    start from trained weights instead of a fresh network (fine-tuning): a model name or folder of
    this method (see :func:`mmreg.models.resolve_model`), or a ``.pt`` file (a model's weights, a
    run's ``best.pt`` or a checkpoint); the architecture must match. Relative paths are taken from
    the config file's folder. ``teacher_model``: a trained model of this method (name or folder; a
    registration network of another method as ``"METHOD:NAME"``, :func:`teacher_reference`) whose
    output on each training pair the network is also taught to reproduce (distillation), with weight
    ``teacher_weight`` on the mean squared difference of the two outputs (voxels of the training grid,
    velocity or displacement as the models predict); the teacher reads the pair before any
    ``t1_t1_remap`` / ``t1_self`` intensity curve, so a student learns to give the teacher's T1-T1
    field for a pair in another contrast (:func:`teacher_loss`). Registration networks only; None: no
    teacher. ``teacher_models``: per-source teachers, ``{source: model}`` (e.g. ``{t1_template =
    "mi_brain_mind_distilled"}``): a pair of that source is taught by that model instead of
    ``teacher_model`` (sources in neither are not taught); the same rules as ``teacher_model``.
    ``teacher_optimisation``: options of :func:`mmreg.methods.optimize.instance_optimise`
    (e.g. ``{similarity = "mind", finest_factor = 1}``); when given, the teacher is the engine's instance
    optimisation run on each training pair as a teacher reads it (before augmentation, the sharp T1 /
    T1 template view, see :meth:`PairSampler.raw_pair`), and the network's displacement is pulled to its
    displacement with ``teacher_weight`` inside the fixed image's foreground (:class:`OptimisationTeacher`;
    fields cached per pair).
    Not with ``teacher_model`` / ``teacher_models``; needs no geometric augmentation and no ``t1_synth`` pairs. Empty: none.
    """

    method: str = "mi"
    name: str = "mi_brain"
    description: str = ""
    output: str | None = None
    spacing_mm: float = 2.0
    grid_size: list = field(default_factory=list)
    steps: int = 1000
    batch_size: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    gradient_clip: float = 0.0
    smoothness: float = 1.0
    diffeomorphic: bool = True
    integration_steps: int = 7
    mi_bins: int = 32
    mi_max_voxels: int = 100_000
    mi_blur_voxels: float = 0.0
    ssim_weight: float = 0.5
    ssim_window: int = 7
    gradient_weight: float = 0.5
    gradient_smoothness: float = 0.5
    validation_every: int = 100
    checkpoint_every: int = 100
    final_model: str = "best"
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    architecture: dict = field(default_factory=dict)
    base_model: str | None = None
    teacher_model: str | None = None
    teacher_weight: float = 1.0
    teacher_models: dict = field(default_factory=dict)
    teacher_optimisation: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    metric: MetricTrainConfig = field(default_factory=MetricTrainConfig)
    disentangled: DisentangledTrainConfig = field(default_factory=DisentangledTrainConfig)

    def to_dict(self) -> dict:
        """JSON/TOML-friendly dict (nested sections as dicts)."""
        return dataclasses.asdict(self)

    def output_dir(self) -> Path:
        """The model folder: ``output`` or :func:`default_output`."""
        return Path(self.output).expanduser() if self.output else default_output(self.method, self.name)

    def full_architecture(self) -> dict:
        """The network description: the method's default architecture with this config's overrides."""
        return dict(training_spec(self.method).default_architecture, **self.architecture)


def learning_rate_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based): ``cfg.learning_rate``, ramped linearly
    from ``learning_rate / warmup_steps`` over the first ``cfg.warmup_steps`` steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    return cfg.learning_rate


def training_spec(method: str):
    """The :class:`mmreg.methods.TrainingSpec` of ``method``; :class:`InputError` when it cannot be trained."""
    from .methods import get_method, trainable_methods  # noqa: PLC0415
    spec = get_method(method).training_spec()
    if spec is None:
        raise InputError(f"Method '{method}' has no network to train; trainable methods: "
                         f"{', '.join(trainable_methods())}.")
    return spec


def trainable_methods() -> list:
    """Names of the methods ``mmreg train`` can train (see :func:`mmreg.methods.trainable_methods`)."""
    from .methods import trainable_methods as names  # noqa: PLC0415
    return names()


def network_multiple(method: str, architecture: dict) -> int:
    """Sizes of the training grid must be multiples of this for ``method``'s network."""
    spec = training_spec(method)
    if spec.size_multiple is not None:
        return int(spec.size_multiple(architecture))
    from .networks import size_multiple  # noqa: PLC0415
    return size_multiple(architecture)


def config_of_run(output: str | os.PathLike, **overrides) -> TrainConfig:
    """The config of the run in ``output`` (from its ``training/last.pt``), to resume it without the
    config file or the manifest again; keyword ``overrides`` (not None) among the settings that
    may change on resume (steps, threads, device, validation_every, checkpoint_every) replace
    its values. :class:`InputError` when ``output`` holds no run."""
    path = Path(output).expanduser() / CHECKPOINT_DIR / "last.pt"
    if not path.is_file():
        raise InputError(f"'{Path(output).expanduser()}' holds no training run to resume (no {CHECKPOINT_DIR}/last.pt); "
                         "start one with --data MANIFEST or a config.")
    saved = load_checkpoint(path)["config"]
    table = {k: v for k, v in saved.items() if v is not None and not isinstance(v, dict)}  # None = the default
    for section in ("data", "augment", "architecture", "metric", "disentangled"):
        table[section] = {k: v for k, v in (saved.get(section) or {}).items() if v is not None}
    bad = sorted(k for k, v in overrides.items() if v is not None and k not in _RESUMABLE)
    if bad:
        raise InputError(f"{', '.join(bad)} cannot change when resuming; start a new run in another folder instead.")
    table.update({k: v for k, v in overrides.items() if v is not None})
    table["output"] = str(Path(output).expanduser().resolve())
    return config_from_dict(table)


def default_output(method: str, name: str) -> Path:
    """Where a run's model goes unless told otherwise: ``<user models>/<method>/<name>``
    (user models = ``$MMREG_MODELS`` or ``~/.mmreg/models``); the method modules list it at once."""
    from .models import user_model_root  # noqa: PLC0415
    return user_model_root() / method / name


_TYPES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}


def _check_type(where: str, key: str, value, default):
    """Coerce ``value`` to the type of ``default`` or raise InputError naming the key."""
    kind = type(default)
    if default is None:  # optional fields: str | None or int | None
        kind = int if key == "threads" else str
    if kind is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}{key} must be true or false, got {value!r}.")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}{key} must be an integer, got {value!r}.")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}{key} must be a number, got {value!r}.")
        return float(value)
    if not isinstance(value, kind):
        raise InputError(f"{where}{key} must be {_TYPES.get(kind, kind.__name__)}, got {value!r}.")
    return value


def _fill(cls, table: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise InputError(f"Unknown key(s) {', '.join(where + u for u in unknown)} in the training config; known: "
                         f"{', '.join(sorted(names))}.")
    defaults = cls()
    values = {}
    for key, value in table.items():
        if key in ("data", "augment", "metric", "disentangled") and cls is TrainConfig:
            continue
        values[key] = _check_type(where, key, value, getattr(defaults, key))
    return values


def config_from_dict(table: dict) -> TrainConfig:
    """A validated :class:`TrainConfig` from a dict (the parsed TOML); :class:`InputError` on any problem."""
    if not isinstance(table, dict):
        raise InputError("The training config must be a TOML table.")
    top = _fill(TrainConfig, table, "")
    for section in ("data", "augment", "metric", "disentangled"):
        if section in table and not isinstance(table[section], dict):
            raise InputError(f"[{section}] must be a table in the training config.")
    data = DataConfig(**_fill(DataConfig, table.get("data", {}), "data."))
    augment = AugmentConfig(**_fill(AugmentConfig, table.get("augment", {}), "augment."))
    metric = MetricTrainConfig(**_fill(MetricTrainConfig, table.get("metric", {}), "metric."))
    disentangled = DisentangledTrainConfig(**_fill(DisentangledTrainConfig, table.get("disentangled", {}),
                                                   "disentangled."))
    method = top.get("method", TrainConfig.method)
    try:
        defaults = training_spec(method).default_settings or {}
    except InputError:
        defaults = {}  # an unknown method: validate_config names it
    for key, value in defaults.items():  # the method's own defaults where the config is silent
        top.setdefault(key, value)
    cfg = TrainConfig(**top, data=data, augment=augment, metric=metric, disentangled=disentangled)
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """Check value ranges and combinations of a config; :class:`InputError` naming the key and the fix."""
    def need(ok, message):
        if not ok:
            raise InputError(f"Training config: {message}")

    from .methods import method_names, trainable_methods  # noqa: PLC0415
    trainable = trainable_methods()
    need(cfg.method in trainable, f"method '{cfg.method}' cannot be trained"
         f"{'' if cfg.method in method_names() else ' (unknown method)'}; trainable: {', '.join(trainable)}.")
    need(bool(cfg.name) and "/" not in cfg.name and "\\" not in cfg.name and cfg.name not in (".", ".."),
         f"name must be a plain folder name, got {cfg.name!r}.")
    need(cfg.spacing_mm > 0, f"spacing_mm must be > 0 mm, got {cfg.spacing_mm}.")
    need(cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}.")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}.")
    need(cfg.learning_rate > 0, f"learning_rate must be > 0, got {cfg.learning_rate}.")
    need(isinstance(cfg.warmup_steps, int) and cfg.warmup_steps >= 0,
         f"warmup_steps must be an integer >= 0 (0: no warm-up), got {cfg.warmup_steps!r}.")
    need(cfg.gradient_clip >= 0, f"gradient_clip must be >= 0 (0: no clipping), got {cfg.gradient_clip}.")
    own_trainer = cfg.method == "metric" or (cfg.method == "disentangled" and cfg.disentangled.stage == "rdm")
    need(not own_trainer or (cfg.warmup_steps == 0 and cfg.gradient_clip == 0),
         "warmup_steps and gradient_clip apply to registration networks; the metric and the disentangled RDM stage "
         "have their own trainers: leave them at 0.")
    need(cfg.smoothness >= 0, f"smoothness must be >= 0, got {cfg.smoothness}.")
    need(not (own_trainer and cfg.teacher_model), "teacher_model applies to registration networks; the metric and the "
         "disentangled RDM stage have their own trainers: leave it unset.")
    need(cfg.teacher_weight > 0, f"teacher_weight must be > 0 (leave teacher_model unset for no teacher), got "
         f"{cfg.teacher_weight}.")
    if cfg.teacher_models:
        need(not own_trainer, "teacher_models applies to registration networks; the metric and the disentangled "
             "RDM stage have their own trainers: leave it empty.")
        bad = sorted(set(cfg.teacher_models) - set(SOURCES))
        need(not bad, f"teacher_models has unknown source(s) {', '.join(bad)}; known: {', '.join(SOURCES)}.")
        bad = sorted(k for k, v in cfg.teacher_models.items() if not isinstance(v, str) or not v)
        need(not bad, f"teacher_models.{bad[0] if bad else ''} must be a model name or folder (a string).")
        unused = sorted(k for k in cfg.teacher_models if not cfg.data.sources.get(k))
        need(not unused, f"teacher_models names source(s) {', '.join(unused)} that this run does not draw "
             "(data.sources weight 0); drop them or give them a weight.")
    if cfg.teacher_optimisation:
        need(not cfg.teacher_model and not cfg.teacher_models,
             "teacher_model / teacher_models and teacher_optimisation are two teachers; give one of them.")
        need(not own_trainer, "teacher_optimisation applies to registration networks; the metric and the "
             "disentangled RDM stage have their own trainers: leave it empty.")
        bad = sorted(set(cfg.teacher_optimisation) - set(TEACHER_OPTIMISATION_KEYS))
        need(not bad, f"teacher_optimisation has unknown key(s) {', '.join(bad)}; known: "
             f"{', '.join(TEACHER_OPTIMISATION_KEYS)} (options of mmreg.methods.optimize.instance_optimise).")
        from .methods.optimize import SIMILARITIES  # noqa: PLC0415
        similarity = cfg.teacher_optimisation.get("similarity", "mind")
        need(similarity in SIMILARITIES, f"teacher_optimisation.similarity must be one of {', '.join(SIMILARITIES)}, "
             f"got {similarity!r}.")
        geometric = [k for k in ("deformation_max_mm", "rotation_deg", "scale", "translation_mm")
                     if getattr(cfg.augment, k) > 0]
        need(not geometric, f"teacher_optimisation caches the optimiser's field of each training pair, which a random "
             f"deformation would change: set augment.{', augment.'.join(geometric)} to 0.")
        need(not cfg.data.sources.get("t1_synth"), "teacher_optimisation caches the optimiser's field of each training "
             "pair; t1_synth draws a new image every step: set data.sources.t1_synth to 0.")
    need(cfg.integration_steps >= 1, f"integration_steps must be >= 1, got {cfg.integration_steps}.")
    need(cfg.mi_bins >= 2, f"mi_bins must be >= 2, got {cfg.mi_bins}.")
    need(cfg.mi_max_voxels >= 100, f"mi_max_voxels must be >= 100, got {cfg.mi_max_voxels}.")
    need(cfg.mi_blur_voxels >= 0, f"mi_blur_voxels must be >= 0 (0: no smoothing), got {cfg.mi_blur_voxels}.")
    need(cfg.gradient_weight >= 0 and cfg.gradient_smoothness >= 0, "gradient_weight and gradient_smoothness must be "
         f">= 0, got {cfg.gradient_weight} and {cfg.gradient_smoothness}.")
    need(cfg.ssim_weight >= 0, f"ssim_weight must be >= 0, got {cfg.ssim_weight}.")
    need(cfg.ssim_window >= 1 and cfg.ssim_window % 2 == 1, f"ssim_window must be an odd number of voxels >= 1, "
         f"got {cfg.ssim_window}.")
    need(cfg.validation_every >= 0, f"validation_every must be >= 0 (0: only at the end), got {cfg.validation_every}.")
    need(cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0: only at the end), got {cfg.checkpoint_every}.")
    need(cfg.final_model in ("best", "last"), f"final_model must be \"best\" or \"last\", got {cfg.final_model!r}.")
    need(cfg.threads is None or cfg.threads >= 1, f"threads must be >= 1, got {cfg.threads}.")
    need(cfg.device.split(":")[0] in ("auto", "cpu", "cuda", "mps"),
         f"device must be auto, cpu, cuda or mps, got {cfg.device!r}.")
    spec = training_spec(cfg.method)
    arch = cfg.full_architecture()
    kind = spec.default_architecture.get("kind")
    need(arch.get("kind") == kind, f"architecture.kind must be \"{kind}\" for method {cfg.method}, got {arch.get('kind')!r}.")
    if spec.check_architecture is not None:
        spec.check_architecture(arch)
    else:
        need(int(arch.get("spatial_dims", 3)) == 3, "architecture.spatial_dims must be 3 (the training grid is 3-D).")
        ch = arch.get("channels")
        need(isinstance(ch, list) and len(ch) >= 2 and len(ch) % 2 == 0 and all(isinstance(c, int) and c > 0 for c in ch),
             f"architecture.channels must be an even-length list of positive integers, got {ch!r}.")
        fc = arch.get("final_conv_channels")
        need(isinstance(fc, list) and len(fc) >= 1 and all(isinstance(c, int) and c > 0 for c in fc),
             f"architecture.final_conv_channels must be a non-empty list of positive integers, got {fc!r}.")
        from .networks import check_input_features  # noqa: PLC0415
        try:
            check_input_features(arch)
        except ValueError as exc:
            need(False, str(exc))
    if spec.check_config is not None:
        spec.check_config(cfg)
    multiple = network_multiple(cfg.method, arch)
    if cfg.grid_size:
        need(len(cfg.grid_size) == 3 and all(isinstance(s, int) and s > 0 and s % multiple == 0 for s in cfg.grid_size),
             f"grid_size must be 3 positive multiples of {multiple} (ITK x, y, z order) or empty, got {cfg.grid_size}.")
    src = cfg.data.sources
    unknown = sorted(set(src) - set(SOURCES))
    need(not unknown, f"data.sources has unknown source(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}.")
    need(all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in src.values())
         and sum(src.values()) > 0, f"data.sources weights must be numbers >= 0 with a positive sum, got {src}.")
    bad = [m for m in cfg.data.template_modalities if m not in TEMPLATE_MODALITIES]
    need(not bad, f"data.template_modalities may hold {', '.join(TEMPLATE_MODALITIES)}, got {cfg.data.template_modalities}.")
    overlap = set(cfg.data.validation_subjects) & set(cfg.data.training_subjects)
    need(not overlap, f"subject(s) {', '.join(sorted(overlap))} are in both data.training_subjects and "
                      "data.validation_subjects; validation must use held-out subjects.")
    need(0.0 <= cfg.data.validation_fraction <= 0.9,
         f"data.validation_fraction must be in [0, 0.9], got {cfg.data.validation_fraction}.")
    need(cfg.data.prealign in ("affine", "none"), f"data.prealign must be \"affine\" or \"none\", got {cfg.data.prealign!r}.")
    need(not (cfg.data.validate_templates and cfg.data.manifest),
         "data.validate_templates scores the shared data's held-out subjects against the avg152 templates; "
         "a manifest run validates on its own pairs: remove validate_templates.")
    a = cfg.augment
    for key in ("deformation_max_mm", "rotation_deg", "scale", "translation_mm", "bias_strength", "noise_std",
                "synth_blur_voxels", "moving_blur_voxels"):
        need(getattr(a, key) >= 0, f"augment.{key} must be >= 0, got {getattr(a, key)}.")
    need(a.deformation_control_mm > 0, f"augment.deformation_control_mm must be > 0, got {a.deformation_control_mm}.")
    need(a.scale < 0.5, f"augment.scale is a relative jitter (e.g. 0.05), got {a.scale}.")
    m = cfg.metric
    need(m.optimizer in ("sgd", "adam"), f"metric.optimizer must be \"sgd\" or \"adam\", got {m.optimizer!r}.")
    need(0 <= m.momentum < 1, f"metric.momentum must be in [0, 1), got {m.momentum}.")
    need(m.rotation_deg >= 0 and m.scale_range >= 1, f"metric.rotation_deg must be >= 0 and metric.scale_range >= 1, "
         f"got {m.rotation_deg} and {m.scale_range}.")
    need(0 <= m.coarse_fraction <= 1, f"metric.coarse_fraction must be in [0, 1], got {m.coarse_fraction}.")
    bad = sorted(set(m.negatives) - {"shift", "transform", "random", "adversarial"})
    need(not bad and m.negatives and all(isinstance(v, (int, float)) and v >= 0 for v in m.negatives.values())
         and sum(m.negatives.values()) > 0, f"metric.negatives must weigh \"shift\", \"transform\", \"random\" and "
         f"(optionally) \"adversarial\" with numbers >= 0 (positive sum), got {m.negatives}.")
    need(int(m.adversarial_every) >= 1 and int(m.adversarial_pairs) >= 1 and int(m.adversarial_iterations) >= 1
         and m.adversarial_min_voxels >= 0 and m.adversarial_ranking_weight >= 0,
         f"metric.adversarial_every, adversarial_pairs and adversarial_iterations must be >= 1 and "
         f"metric.adversarial_min_voxels and adversarial_ranking_weight >= 0, got {m.adversarial_every}, "
         f"{m.adversarial_pairs}, {m.adversarial_iterations}, {m.adversarial_min_voxels}, {m.adversarial_ranking_weight}.")
    lo_hi = m.negative_shift_voxels
    need(isinstance(lo_hi, list) and len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1],
         f"metric.negative_shift_voxels must be [min, max] voxels with 0 < min <= max, got {lo_hi}.")
    need(m.gamma >= 0 and m.noise_std >= 0, f"metric.gamma and metric.noise_std must be >= 0, got {m.gamma}, {m.noise_std}.")
    need(m.validation_patches >= 16, f"metric.validation_patches must be >= 16, got {m.validation_patches}.")
    need(m.ranking_weight >= 0 and m.ranking_margin_per_voxel >= 0 and int(m.ranking_pairs) >= 1,
         f"metric.ranking_weight and metric.ranking_margin_per_voxel must be >= 0 and metric.ranking_pairs >= 1, got "
         f"{m.ranking_weight}, {m.ranking_margin_per_voxel}, {m.ranking_pairs}.")
    r = m.ranking_shift_voxels
    need(isinstance(r, (list, tuple)) and len(r) == 2 and 0 < float(r[0]) <= float(r[1]),
         f"metric.ranking_shift_voxels must be [min, max] voxels with 0 < min <= max, got {r}.")
    from .patch_metric import SHARED_PAIRS  # noqa: PLC0415
    bad = sorted(set(m.pairs + m.validation_pairs) - set(SHARED_PAIRS))
    need(not bad, f"metric.pairs / metric.validation_pairs: unknown pair(s) {', '.join(bad)}; known: "
         f"{', '.join(SHARED_PAIRS)}.")


def load_config(path: str | os.PathLike, **overrides) -> TrainConfig:
    """Read and validate a TOML training config; keyword ``overrides`` (not None) replace top-level keys.

    Relative paths in ``output``, ``data.root``, ``data.cache_dir`` and ``data.manifest`` are
    taken relative to the config file's folder (``manifest=``, ``data_root=`` and
    ``validation_fraction=`` override those keys of ``[data]``).
    """
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"Training config '{path}' does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"Training config '{path}' is not valid TOML: {exc}.") from None
    for key, value in overrides.items():
        if value is not None:
            if key in ("data_root", "manifest", "validation_fraction"):  # keys of [data]
                table.setdefault("data", {})[{"data_root": "root"}.get(key, key)] = (
                    float(value) if key == "validation_fraction" else str(value))
            else:
                table[key] = value
    cfg = config_from_dict(table)
    base = path.resolve().parent
    if cfg.output and not Path(cfg.output).expanduser().is_absolute():
        cfg.output = str(base / cfg.output)
    if cfg.base_model and cfg.base_model.endswith(".pt") and not Path(cfg.base_model).expanduser().is_absolute():
        cfg.base_model = str(base / cfg.base_model)
    def model_ref(ref):  # a relative folder (it has a path separator) from the config's folder; a name as it is
        if isinstance(ref, str) and ("/" in ref or "\\" in ref) and not Path(ref).expanduser().is_absolute():
            return str(base / ref)
        return ref
    cfg.teacher_model = model_ref(cfg.teacher_model)
    cfg.teacher_models = {source: model_ref(ref) for source, ref in cfg.teacher_models.items()}
    for key in ("root", "cache_dir", "manifest"):
        value = getattr(cfg.data, key)
        if value and not Path(value).expanduser().is_absolute():
            setattr(cfg.data, key, str(base / value))
    return cfg


def config_for_manifest(method: str, manifest: str | os.PathLike, *, name: str | None = None, output=None,
                        base_model: str | None = None, steps: int | None = None, learning_rate: float | None = None,
                        batch_size: int | None = None, spacing_mm: float | None = None, augment: bool = True,
                        smoothness: float | None = None, validation_fraction: float | None = None,
                        device: str | None = None, threads: int | None = None, warmup_steps: int | None = None,
                        gradient_clip: float | None = None, seed: int | None = None,
                        teacher_model: str | None = None, teacher_weight: float | None = None) -> TrainConfig:
    """A training config for a user's own pairs without a config file (``mmreg train --method NAME
    --data MANIFEST``, the Slicer training module); None keeps the default of each setting.

    ``name``: the model name (default: the ``output`` folder's name, else ``<method>_<manifest
    stem>``). ``base_model``: a model name or folder of ``method`` (fine-tuning: its architecture,
    network spacing, field type and loss settings are taken from its card, so the weights fit and
    the objective is the one it was trained with; ``spacing_mm`` / ``smoothness`` may still override)
    or a ``.pt`` file (the default architecture).
    ``augment`` False switches every augmentation off (:meth:`AugmentConfig.off`), else the
    defaults of :class:`AugmentConfig`. ``warmup_steps`` / ``gradient_clip`` / ``seed`` / ``teacher_model`` /
    ``teacher_weight``: see :class:`TrainConfig`.
    :class:`InputError` on a bad value or an unknown model.
    """
    from .models import resolve_model  # noqa: PLC0415
    from .methods import trainable_methods  # noqa: PLC0415
    if method not in trainable_methods():
        raise InputError(f"Method '{method}' cannot be trained; trainable: {', '.join(trainable_methods())}.")
    manifest = Path(manifest).expanduser().resolve()
    table: dict = {"method": method, "data": {"manifest": str(manifest)}}
    if output:
        table["output"] = str(Path(output).expanduser().resolve())
    table["name"] = name or (Path(output).name if output else f"{method}_{manifest.stem}")
    if base_model:
        ref = str(base_model)
        if ref.endswith(".pt"):
            table["base_model"] = str(Path(ref).expanduser().resolve())
        else:
            folder = resolve_model(method, ref)
            card = json.loads((folder / "model.json").read_text())
            table["base_model"] = str(folder.resolve()) if Path(ref).expanduser().is_dir() else ref
            table["architecture"] = dict(card["architecture"])
            table["spacing_mm"] = float(card["spacing_mm"])
            table["diffeomorphic"] = bool(card.get("diffeomorphic", True))
            table["integration_steps"] = int(card.get("integration_steps", 7))
            recipe = (card.get("training") or {}).get("config") or {}
            for key in training_spec(method).loss_keys:  # the base model's loss settings, unless overridden below
                if key in recipe:
                    table[key] = recipe[key]
    for key, value in (("steps", steps), ("learning_rate", learning_rate), ("batch_size", batch_size),
                       ("spacing_mm", spacing_mm), ("smoothness", smoothness), ("device", device),
                       ("threads", threads), ("warmup_steps", warmup_steps), ("gradient_clip", gradient_clip),
                       ("seed", seed), ("teacher_weight", teacher_weight)):
        if value is not None:
            table[key] = float(value) if key in ("learning_rate", "spacing_mm", "smoothness", "gradient_clip",
                                                 "teacher_weight") else value
    if teacher_model:
        ref = str(teacher_model)
        table["teacher_model"] = str(Path(ref).expanduser().resolve()) if Path(ref).expanduser().is_dir() else ref
    if validation_fraction is not None:
        table["data"]["validation_fraction"] = float(validation_fraction)
    if not augment:
        table["augment"] = {k: v for k, v in dataclasses.asdict(AugmentConfig.off()).items()}
    return config_from_dict(table)


# ----------------------------------------------------------------------------- data on the training grid


@dataclass
class Subject:
    """One training/validation subject on the training grid: ``image`` float32 (z, y, x) in [0, 1]
    (a T1), ``labels`` integer (z, y, x) label map (0 = background) or None."""

    id: str
    image: np.ndarray
    labels: np.ndarray | None = None


@dataclass
class Pair:
    """One registration pair of a manifest on its training grid: ``fixed`` / ``moving`` float32
    (z, y, x) in [0, 1] (the moving one affinely pre-aligned), label maps (int) or None, and
    ``name`` (for logs and validation reports)."""

    name: str
    fixed: np.ndarray
    moving: np.ndarray
    fixed_labels: np.ndarray | None = None
    moving_labels: np.ndarray | None = None


@dataclass
class TrainingData:
    """Every volume of a training run, as numpy arrays in (z, y, x) order of one grid shape.

    ``grid``: the training grid (its spacing is the model's network spacing). ``training`` /
    ``validation``: subjects (T1 + labels), all on ``grid``. ``templates``: modality name -> image
    already aligned with the grid (e.g. avg152 "T2", "PD") for the ``t1_template`` source.
    ``template_t1``: the T1 image aligned with those templates (avg152T1) on ``grid``, or None: what a
    teacher network reads in place of the template of a ``t1_template`` pair. ``template_labels``: a
    label map of the templates on ``grid`` (Neuromorphometrics, numbered as the subjects' DLMUSE
    labels), or None: scores the held-out subjects against the templates in validation.
    ``train_pairs`` / ``val_pairs``: :class:`Pair` objects of a manifest (each on its own fixed
    image's grid of ``grid``'s size and spacing); when there are pairs, training draws from them
    only. ``info``: where the data came from (goes into the model card). Build from the shared data
    with :func:`prepare_ixi`, from a manifest with :func:`prepare_manifest`, or directly from
    in-memory arrays (tests, other anatomies).
    """

    grid: NetworkGrid
    training: list = field(default_factory=list)
    validation: list = field(default_factory=list)
    templates: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    train_pairs: list = field(default_factory=list)
    val_pairs: list = field(default_factory=list)
    template_t1: np.ndarray | None = None
    template_labels: np.ndarray | None = None

    def check(self, cfg: TrainConfig) -> dict:
        """Validate against ``cfg`` and return the normalised source weights (only sources with data)."""
        shape = self.grid.spatial_shape
        for p in self.train_pairs + self.val_pairs:
            arrays = [p.fixed, p.moving] + [a for a in (p.fixed_labels, p.moving_labels) if a is not None]
            if any(a.shape != shape for a in arrays):
                raise InputError(f"Pair {p.name} is not on a training grid of shape {shape} (got {p.fixed.shape}).")
        if self.train_pairs:
            return {"pairs": 1.0}  # a manifest's pairs are the only source
        for s in self.training + self.validation:
            if s.image.shape != shape or (s.labels is not None and s.labels.shape != shape):
                raise InputError(f"Subject {s.id} is not on the training grid {shape} (got {s.image.shape}).")
        for name, img in self.templates.items():
            if img.shape != shape:
                raise InputError(f"Template {name} is not on the training grid {shape} (got {img.shape}).")
        weights = {k: float(v) for k, v in cfg.data.sources.items() if v > 0}
        if not self.training:
            raise InputError("No training subjects or pairs: check data.training_subjects / data.validation_subjects, "
                             "or give a manifest (data.manifest / --data MANIFEST).")
        for key in ("t1_t1", "t1_t1_remap"):
            if key in weights and len(self.training) < 2:
                raise InputError(f"data.sources.{key} needs at least 2 training subjects.")
        for key in ("t1_template", "template_t1"):
            if key in weights and not self.templates:
                raise InputError(f"data.sources.{key} needs templates (data.template_modalities is empty).")
        if "t1_synth" in weights and not any(s.labels is not None for s in self.training):
            raise InputError("data.sources.t1_synth needs label maps of the training subjects.")
        total = sum(weights.values())
        return {k: v / total for k, v in weights.items()}


def _cache_root(cfg: TrainConfig) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    env = os.environ.get("MMREG_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "mmreg") / "train"


def _cached(cache: Path, name: str, key, files, make) -> dict:
    """The arrays ``make()`` returns, stored once in ``cache/<name>_<hash>.npz``; the hash covers
    ``key`` (a hashlib object: recipe version and grid) and the size and date of ``files``."""
    h = key.copy()
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).name}:{st.st_size}:{int(st.st_mtime)}".encode())
    path = cache / f"{name}_{h.hexdigest()[:12]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    arrays = make()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # per process: two runs may fill the cache at once
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def template_grid(template: sitk.Image, spacing_mm: float, multiple: int, grid_size=None) -> NetworkGrid:
    """The training grid: the template's extent at ``spacing_mm`` (sizes padded to ``multiple``),
    or a grid of ``grid_size`` (ITK x, y, z) voxels centred on the template."""
    return resized_grid(NetworkGrid.for_image(template, spacing=float(spacing_mm), multiple=int(multiple)), grid_size)


def resized_grid(grid: NetworkGrid, grid_size=None) -> NetworkGrid:
    """``grid`` with ``grid_size`` (ITK x, y, z) voxels about the same centre, spacing and
    direction (``grid`` itself when ``grid_size`` is empty)."""
    if not grid_size:
        return grid
    n = np.array(grid_size, dtype=float)
    spacing = np.array(grid.spacing)
    origin = grid.centre - grid.direction_matrix @ (spacing * (n - 1) / 2.0)
    return NetworkGrid(tuple(int(v) for v in n), grid.spacing, tuple(float(v) for v in origin), grid.direction)


def prepare_ixi(cfg: TrainConfig, progress: ProgressCallback | None = None) -> TrainingData:
    """The shared data on the training grid (computed once, then read from the cache).

    Grid: avg152T1's extent at ``cfg.spacing_mm`` (or ``cfg.grid_size``), multiple of the
    network. Each IXI T1 is normalised (:func:`mmreg.intensity.normalize_intensity`, MR),
    affinely aligned to the normalised template (fixed) with :func:`mmreg.affine.affine_prealign`
    and resampled onto the grid (linear; its DLMUSE labels nearest neighbour). avg152 T2/PD are
    normalised and resampled onto the grid (same world space), and so are avg152T1 itself
    (``template_t1``) and, with ``data.validate_templates``, the Neuromorphometrics labels of the
    templates (``template_labels``, nearest neighbour; else None). Subjects are split per ``cfg.data``; the affine of each
    subject is recorded in ``info``.
    """
    from .affine import affine_prealign  # noqa: PLC0415
    from .bench.cases import CT_DIR, SPM_DIR, data_dir, ixi_subjects  # noqa: PLC0415
    from .intensity import normalize_intensity  # noqa: PLC0415

    prog = Progress(progress)
    root = data_dir(cfg.data.root)
    subjects = ixi_subjects(root)
    ids = [s[0] for s in subjects]
    for sid in cfg.data.validation_subjects + cfg.data.training_subjects:
        if sid not in ids:
            raise InputError(f"Subject '{sid}' of the training config is not among the IXI subjects ({', '.join(ids)}).")
    wanted_train = cfg.data.training_subjects or [i for i in ids if i not in cfg.data.validation_subjects]
    wanted = [s for s in subjects if s[0] in wanted_train or s[0] in cfg.data.validation_subjects]
    template_path = root / SPM_DIR / "canonical_avg152T1.nii.gz"
    if not template_path.is_file():
        raise InputError(f"The avg152T1 template '{template_path}' is missing; check the data folder.")
    template = sitk.ReadImage(str(template_path), sitk.sitkFloat32)
    multiple = network_multiple(cfg.method, cfg.full_architecture())
    grid = template_grid(template, cfg.spacing_mm, multiple, cfg.grid_size)

    key = hashlib.sha1(json.dumps([PREP_VERSION, grid.size, grid.spacing, grid.origin, grid.direction]).encode())
    cache = _cache_root(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    template_norm, _ = normalize_intensity(template, "MR")

    def cached(name: str, files, make):
        return _cached(cache, name, key, files, make)

    def to_grid(img, tx=None, interp=sitk.sitkLinear):
        return sitk.GetArrayFromImage(grid.resample(img, tx, interp)).reshape(grid.spatial_shape)

    info = {"source": "shared data (ixi10_T1_dlmuse, spm12_mni_T1T2PD_labels)", "template": "avg152T1",
            "grid": {"size": list(grid.size), "spacing_mm": list(grid.spacing)}, "affine_mattes_mi": {}}
    templates = {}
    for mod in cfg.data.template_modalities:
        p = root / CT_DIR / "scct_cormack.nii.gz" if mod == "CT" else root / SPM_DIR / f"canonical_avg152{mod}.nii.gz"
        if not p.is_file():
            raise InputError(f"Template '{p}' is missing; drop {mod} from data.template_modalities or fix the data folder.")

        def make_template(p=p):  # the CT template is in Cormack units, not HU: percentile-normalised as MR
            img, _ = normalize_intensity(sitk.ReadImage(str(p), sitk.sitkFloat32), "MR")
            return {"image": to_grid(img).astype(np.float32)}
        templates[mod] = cached("scct_cormack" if mod == "CT" else f"avg152{mod}", [p], make_template)["image"]
    template_t1 = cached("avg152T1", [template_path],
                         lambda: {"image": to_grid(template_norm).astype(np.float32)})["image"]
    template_labels = None
    if cfg.data.validate_templates:  # the labels are read only for the validation that uses them
        labels_path = root / SPM_DIR / "tpm_labels_Neuromorphometrics.nii.gz"
        if not labels_path.is_file():
            raise InputError(f"data.validate_templates needs the templates' labels '{labels_path}', which are missing; "
                             "fix the data folder or remove validate_templates.")
        template_labels = cached("neuromorphometrics", [labels_path], lambda: {"labels": to_grid(
            sitk.ReadImage(str(labels_path)), None, sitk.sitkNearestNeighbor).astype(np.int16)})["labels"]

    train, val = [], []
    for k, (sid, t1_path, lab_path) in enumerate(wanted):
        prog(k / max(len(wanted), 1), f"preparing {sid} (affine to the template)")

        def make_subject(t1_path=t1_path, lab_path=lab_path, sid=sid):
            t1 = sitk.ReadImage(str(t1_path), sitk.sitkFloat32)
            t1n, _ = normalize_intensity(t1, "MR")
            res = affine_prealign(template_norm, t1n, seed=1)
            labels = sitk.ReadImage(str(lab_path))
            return {"image": to_grid(t1n, res.transform).astype(np.float32),
                    "labels": to_grid(labels, res.transform, sitk.sitkNearestNeighbor).astype(np.int16),
                    "mattes_mi": np.array([res.metric_before if res.metric_before is not None else np.nan,
                                           res.metric_after if res.metric_after is not None else np.nan])}
        arr = cached(sid, [t1_path, lab_path], make_subject)
        info["affine_mattes_mi"][sid] = [float(v) for v in arr["mattes_mi"]]
        subject = Subject(sid, arr["image"], arr["labels"])
        (val if sid in cfg.data.validation_subjects else train).append(subject)
    prog(1.0, "data prepared")
    info["training_subjects"] = [s.id for s in train]
    info["validation_subjects"] = [s.id for s in val]
    info["templates"] = sorted(templates)
    return TrainingData(grid, train, val, templates, info, template_t1=template_t1, template_labels=template_labels)


def prepare_manifest(cfg: TrainConfig, progress: ProgressCallback | None = None, log=None) -> TrainingData:
    """The pairs of ``cfg.data.manifest`` on their training grids (prepared once, then cached).

    Each entry is checked first (:func:`mmreg.manifest.check_entry`: readable, 3-D scalar, finite,
    not constant, labels on their image's grid); a bad entry is reported through ``log`` and in
    ``info["skipped"]`` and left out, so a run never stops on it halfway. For each good pair, as
    ``mmreg register`` does: both images normalised per their modality, the moving one affinely
    aligned to the fixed one (``data.prealign``), then resampled onto the fixed image's grid at
    ``cfg.spacing_mm`` (labels nearest neighbour). All grids get one size (the largest, padded to
    the network multiple, or ``cfg.grid_size``) so pairs can be batched; pairs whose moving image
    covers under 1 % of that grid after alignment are skipped. Validation split: the entries marked
    "validation", else ``data.validation_fraction`` of the unmarked ones (seeded by ``cfg.seed``).
    :class:`InputError` when no usable training pair is left.
    """
    from .affine import affine_prealign  # noqa: PLC0415
    from .errors import MMRegError  # noqa: PLC0415
    from .intensity import normalize_intensity  # noqa: PLC0415
    from .manifest import check_entry, describe_problem, manifest_digest, read_manifest  # noqa: PLC0415

    prog = Progress(progress)
    say = log or (lambda line: None)
    path = Path(cfg.data.manifest).expanduser()
    entries, problems = read_manifest(path)
    skipped = [{"entry": p.split(":", 1)[0], "reason": p.split(":", 1)[-1].strip()} for p in problems]
    multiple = network_multiple(cfg.method, cfg.full_architecture())

    def skip(entry_name: str, reason: str):
        skipped.append({"entry": entry_name, "reason": reason})
        say(f"manifest {entry_name}: skipped: {reason}")

    for p in problems:
        say(f"manifest {p.split(':', 1)[0]}: skipped: {p.split(':', 1)[-1].strip()}")
    checked = []
    for k, entry in enumerate(entries):
        prog(0.2 * k / max(len(entries), 1), f"checking {entry.name}")
        try:
            images = check_entry(entry)
        except MMRegError as exc:
            skip(entry.name, describe_problem(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - an unreadable file of any kind: report, skip, go on
            skip(entry.name, describe_problem(exc))
            continue
        if min(images[0].GetSize()) == 1 or min(images[1].GetSize()) == 1:
            skip(entry.name, "a single-slice (2-D) image; training runs on 3-D volumes")
            continue
        # Only the grid is kept: the images are read again when a pair is prepared (not when cached),
        # so a large cohort is never all in memory at once.
        checked.append((entry, NetworkGrid.for_image(images[0], spacing=cfg.spacing_mm, multiple=multiple)))
        del images
    if not checked:
        reasons = "; ".join(f"{s['entry']}: {s['reason']}" for s in skipped[:3])
        raise InputError(f"No usable pair in the manifest '{path}' ({len(skipped)} skipped{': ' + reasons if reasons else ''}).")
    size = list(cfg.grid_size) or [max(g.size[i] for _, g in checked) for i in range(3)]
    key = hashlib.sha1(json.dumps([PREP_VERSION, "manifest", size, cfg.spacing_mm, cfg.data.prealign]).encode())
    cache = _cache_root(cfg)
    pairs = []
    for k, (entry, grid) in enumerate(checked):
        prog(0.2 + 0.8 * k / len(checked), f"preparing {entry.name}")
        grid = resized_grid(grid, size)

        def make(entry=entry, grid=grid):
            fixed, moving, fixed_labels, moving_labels = check_entry(entry)
            fn, _ = normalize_intensity(fixed, entry.fixed_modality)
            mn, _ = normalize_intensity(moving, entry.moving_modality)
            tx = affine_prealign(fn, mn, seed=1).transform if cfg.data.prealign == "affine" else None

            def to_grid(img, t=None, interp=sitk.sitkLinear):
                return sitk.GetArrayFromImage(grid.resample(img, t, interp)).reshape(grid.spatial_shape)
            ones = sitk.Cast(mn * 0 + 1, sitk.sitkFloat32)
            ones.CopyInformation(mn)
            out = {"fixed": to_grid(fn).astype(np.float32), "moving": to_grid(mn, tx).astype(np.float32),
                   "coverage": np.array(float(to_grid(ones, tx, sitk.sitkNearestNeighbor).mean()))}
            if fixed_labels is not None:
                out["fixed_labels"] = to_grid(fixed_labels, None, sitk.sitkNearestNeighbor).astype(np.int32)
            if moving_labels is not None:
                out["moving_labels"] = to_grid(moving_labels, tx, sitk.sitkNearestNeighbor).astype(np.int32)
            return out
        try:
            arr = _cached(cache, f"pair_{hashlib.sha1(entry.name.encode()).hexdigest()[:8]}",
                          key.copy(), entry.files(), make)
        except MMRegError as exc:
            skip(entry.name, describe_problem(exc))
            continue
        if float(arr["coverage"]) < 0.01:
            skip(entry.name, "after pre-alignment the moving image covers under 1 % of the fixed image's grid (no overlap)")
            continue
        pairs.append((entry, Pair(entry.name, arr["fixed"], arr["moving"], arr.get("fixed_labels"),
                                  arr.get("moving_labels"))))
    if not pairs:
        raise InputError(f"No usable pair in the manifest '{path}' ({len(skipped)} skipped).")
    marked = [i for i, (e, _) in enumerate(pairs) if e.split == "validation"]
    if marked:
        val_idx = set(marked)
    else:
        free = [i for i, (e, _) in enumerate(pairs) if e.split == ""]
        n_val = 0
        if cfg.data.validation_fraction > 0 and len(pairs) >= 2 and free:
            n_val = min(len(free), len(pairs) - 1, max(1, int(round(cfg.data.validation_fraction * len(pairs)))))
        order = np.random.default_rng(cfg.seed).permutation(len(free))
        val_idx = {free[i] for i in order[:n_val]}
    train = [p for i, (_, p) in enumerate(pairs) if i not in val_idx]
    val = [p for i, (_, p) in enumerate(pairs) if i in val_idx]
    if not train:
        raise InputError(f"Every usable pair of the manifest '{path}' is marked validation; mark some as train.")
    if not val:
        say("no validation pairs (one usable pair, or validation_fraction 0): the last weights are kept")
    prog(1.0, "data prepared")
    grid = resized_grid(checked[0][1], size)
    info = {"source": "manifest", "manifest": str(path), "manifest_sha256": manifest_digest(entries),
            "prealign": cfg.data.prealign, "grid": {"size": size, "spacing_mm": [float(cfg.spacing_mm)] * 3},
            "training_pairs": [p.name for p in train], "validation_pairs": [p.name for p in val],
            "labelled_validation_pairs": sum(p.fixed_labels is not None and p.moving_labels is not None for p in val),
            "skipped": skipped}
    return TrainingData(grid, info=info, train_pairs=train, val_pairs=val)



# ----------------------------------------------------------------------------- augmentation (torch, on the grid)


def _smooth_noise(shape, control: float, rng: np.random.Generator, channels: int, device) -> torch.Tensor:
    """Standard-normal values on a control grid of ``control`` voxels spacing, trilinearly upsampled
    to ``shape``: ``(1, channels, *shape)``."""
    coarse = [max(2, int(round(s / max(control, 1.0))) + 1) for s in shape]
    c = torch.from_numpy(rng.standard_normal((1, channels, *coarse)).astype(np.float32)).to(device)
    return F.interpolate(c, size=tuple(shape), mode="trilinear", align_corners=True)


def random_smooth_field(shape, max_voxels: float, control_voxels: float, rng: np.random.Generator,
                        device="cpu") -> torch.Tensor:
    """A random smooth diffeomorphic displacement ``(1, 3, *shape)`` in voxels (numpy order).

    A stationary velocity (normal coefficients on a control grid of ``control_voxels`` spacing,
    upsampled) scaled to a largest magnitude of ``max_voxels`` x U(0.25, 1), integrated by scaling
    and squaring. Reproducible from ``rng``.
    """
    from .spatial import integrate_velocity  # noqa: PLC0415
    v = _smooth_noise(shape, control_voxels, rng, len(shape), device)
    peak = float(v.norm(dim=1).max())
    v = v * (float(max_voxels) * rng.uniform(0.25, 1.0) / max(peak, 1e-6))
    return integrate_velocity(v, 7)


def random_affine_field(shape, rotation_deg: float, scale: float, translation_voxels: float,
                        rng: np.random.Generator, device="cpu") -> torch.Tensor:
    """Displacement ``(1, 3, *shape)`` (voxels) of a random affine about the grid centre:
    rotations U(+-rotation_deg) about each axis, scales 1 + U(+-scale), shifts U(+-translation)."""
    a = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))
    s = 1.0 + rng.uniform(-scale, scale, 3)
    t = rng.uniform(-translation_voxels, translation_voxels, 3)
    c, n = np.cos(a), np.sin(a)
    rx = np.array([[1, 0, 0], [0, c[0], -n[0]], [0, n[0], c[0]]])
    ry = np.array([[c[1], 0, n[1]], [0, 1, 0], [-n[1], 0, c[1]]])
    rz = np.array([[c[2], -n[2], 0], [n[2], c[2], 0], [0, 0, 1]])
    m = rx @ ry @ rz @ np.diag(s) - np.eye(3)
    coords = torch.meshgrid(*[torch.arange(k, dtype=torch.float32, device=device) - (k - 1) / 2.0 for k in shape],
                            indexing="ij")
    x = torch.stack(coords)  # (3, *shape)
    mt = torch.from_numpy(m.astype(np.float32)).to(device)
    u = torch.einsum("ij,j...->i...", mt, x) + torch.from_numpy(t.astype(np.float32)).to(device).view(3, 1, 1, 1)
    return u[None]


def random_bias_and_noise(image: torch.Tensor, strength: float, noise_std: float, rng: np.random.Generator,
                          control_voxels: float = 16.0) -> torch.Tensor:
    """``image`` (1, 1, *spatial) in [0, 1] times a smooth field ``exp(strength * g)`` (g in [-1, 1]),
    rescaled to a maximum of 1, plus N(0, noise_std) noise, clipped to [0, 1]."""
    out = image
    if strength > 0:
        g = _smooth_noise(image.shape[2:], control_voxels, rng, 1, image.device)
        g = g / max(float(g.abs().max()), 1e-6)
        out = out * torch.exp(float(strength) * rng.uniform(0.0, 1.0) * g)
        out = out / max(float(out.max()), 1e-6)
    if noise_std > 0:
        noise = rng.standard_normal(image.shape).astype(np.float32) * float(noise_std)
        out = out + torch.from_numpy(noise).to(image.device)
    return out.clamp(0.0, 1.0)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0.05:
        return image
    r = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=image.dtype, device=image.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    out = image
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.view(shape))
    return out


def brain_mask(labels: np.ndarray, dilation_voxels: int = 1) -> np.ndarray:
    """float32 mask (1 inside) of the labelled region of ``labels`` (z, y, x), dilated by
    ``dilation_voxels``: the field of view of a contrast synthesised from the same labels."""
    from scipy import ndimage  # noqa: PLC0415
    mask = labels > 0
    if dilation_voxels > 0:
        mask = ndimage.binary_dilation(mask, iterations=int(dilation_voxels))
    return mask.astype(np.float32)


def synthesise_contrast(labels: np.ndarray, rng: np.random.Generator, blur_voxels: float = 1.0,
                        device="cpu") -> torch.Tensor:
    """A random contrast from a label map (SynthMorph-like): each label ID gets an intensity
    U(0, 1) (background U(0, 0.2)), then a Gaussian blur of sigma U(0, ``blur_voxels``) voxels,
    rescaled to [0, 1]. Returns ``(1, 1, *labels.shape)``."""
    lab = labels.astype(np.int64)
    table = rng.uniform(0.0, 1.0, int(lab.max()) + 1).astype(np.float32)
    table[0] = rng.uniform(0.0, 0.2)
    img = torch.from_numpy(table[lab])[None, None].to(device)
    img = _gaussian_blur(img, float(rng.uniform(0.0, blur_voxels)) if blur_voxels > 0 else 0.0)
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / max(hi - lo, 1e-6)


def remap_intensities(image: torch.Tensor, rng: np.random.Generator, control_points: int = 6) -> torch.Tensor:
    """A random contrast of ``image`` (intensities in [0, 1]): a piecewise-linear curve through
    ``control_points`` evenly spaced intensities with values U(0, 1), except 0 -> 0 (background
    stays dark, as in every MR contrast). Curves may be non-monotone (e.g. T1 -> T2-like, CSF
    bright, white matter dark). The result is rescaled to [0, 1]; same shape as ``image``."""
    values = rng.uniform(0.0, 1.0, control_points).astype(np.float32)
    values[0] = 0.0
    knots = torch.linspace(0.0, 1.0, control_points, dtype=image.dtype, device=image.device)
    x = image.clamp(0.0, 1.0)
    idx = torch.clamp((x * (control_points - 1)).floor().long(), max=control_points - 2)
    w = (x - knots[idx]) * (control_points - 1)
    table = torch.from_numpy(values).to(image.device, image.dtype)
    out = table[idx] * (1 - w) + table[idx + 1] * w
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def pair_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The random generator of pair ``index`` (0-based, of the global batch) at ``step``: every
    pair is drawn and augmented from its own seed, so a run is reproducible, resumes exactly, and
    gives the same pairs whatever the number of training processes."""
    return np.random.default_rng([int(seed), int(step), int(index)])


def loss_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for the loss's randomness of pair ``index`` at ``step`` (see :func:`pair_rng`)."""
    return torch.Generator().manual_seed(int(np.random.default_rng([int(seed), int(step), int(index), 1]).integers(2**62)))


class PairSampler:
    """Draws augmented training pairs from :class:`TrainingData` per the config (each pair from its
    own generator, :func:`pair_rng`)."""

    def __init__(self, data: TrainingData, cfg: TrainConfig, weights: dict, device):
        self.data, self.cfg, self.device = data, cfg, device
        self.names = sorted(weights)
        self.p = np.array([weights[n] for n in self.names])
        self.spacing = float(np.mean(data.grid.spacing))
        self.labelled = [s for s in data.training if s.labels is not None]

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None].to(self.device)

    def raw_pair(self, rng: np.random.Generator, original: bool = False) -> tuple:
        """(fixed, moving, source name) before augmentation, each ``(1, 1, *spatial)``; with
        ``original`` a fourth item, what a teacher network reads as the moving image: the moving image
        before a ``t1_t1_remap`` / ``t1_self`` intensity curve and the ``moving_blur_voxels`` blur, the
        T1 template (``data.template_t1``) in place of the template of a ``t1_template`` pair, else the
        moving image itself."""
        fixed, moving, source, before = self._raw_pair(rng)
        return (fixed, moving, source, before) if original else (fixed, moving, source)

    def _raw_pair(self, rng: np.random.Generator) -> tuple:
        source = self.names[int(rng.choice(len(self.names), p=self.p))]
        if source == "pairs":  # a manifest's pair, as it is (already pre-aligned)
            pair = self.data.train_pairs[int(rng.integers(len(self.data.train_pairs)))]
            moving = self._tensor(pair.moving)
            return self._tensor(pair.fixed), moving, "pairs", moving
        subjects = self.data.training
        i = int(rng.integers(len(subjects)))
        fixed = self._tensor(subjects[i].image)
        if source in ("t1_t1", "t1_t1_remap"):
            j = int(rng.integers(len(subjects) - 1))
            j = j + 1 if j >= i else j
            moving = before = self._tensor(subjects[j].image)
            if self.cfg.augment.moving_blur_voxels > 0:
                moving = _gaussian_blur(moving, float(rng.uniform(0.0, self.cfg.augment.moving_blur_voxels)))
            if source == "t1_t1_remap":
                moving = remap_intensities(moving, rng)
        elif source in ("t1_template", "template_t1"):
            names = sorted(self.data.templates)
            template = self._tensor(self.data.templates[names[int(rng.integers(len(names)))]])
            fixed, moving = (fixed, template) if source == "t1_template" else (template, fixed)
            before = moving
            if source == "t1_template" and self.data.template_t1 is not None:
                before = self._tensor(self.data.template_t1)  # the same anatomy in T1: the teacher's view
        elif source == "t1_self":
            moving = before = fixed
            if rng.uniform() < 0.5:
                moving = remap_intensities(fixed, rng)
        else:
            s = self.labelled[int(rng.integers(len(self.labelled)))]
            moving = before = synthesise_contrast(s.labels, rng, self.cfg.augment.synth_blur_voxels, self.device)
            if subjects[i].labels is not None:  # label maps cover the brain only: compare brain with brain
                fixed = fixed * self._tensor(brain_mask(subjects[i].labels))
        return fixed, moving, source, before

    def augment(self, fixed: torch.Tensor, moving: torch.Tensor, rng: np.random.Generator) -> tuple:
        """Moving: smooth deformation + affine jitter (composed), then bias/noise; fixed: bias/noise."""
        from .spatial import compose_fields, warp  # noqa: PLC0415
        a = self.cfg.augment
        shape = fixed.shape[2:]
        ddf = None
        if a.rotation_deg > 0 or a.scale > 0 or a.translation_mm > 0:
            ddf = random_affine_field(shape, a.rotation_deg, a.scale, a.translation_mm / self.spacing, rng, self.device)
        if a.deformation_max_mm > 0:
            smooth = random_smooth_field(shape, a.deformation_max_mm / self.spacing,
                                         a.deformation_control_mm / self.spacing, rng, self.device)
            ddf = smooth if ddf is None else compose_fields(ddf, smooth)
        if ddf is not None:
            moving = warp(moving, ddf, padding_mode="zeros")
        moving = random_bias_and_noise(moving, a.bias_strength, a.noise_std, rng)
        if a.augment_fixed:
            fixed = random_bias_and_noise(fixed, a.bias_strength, a.noise_std, rng)
        return fixed, moving

    def batch(self, step: int, indices, teacher: bool = False, raw: bool = False) -> tuple:
        """``(fixed, moving, sources)``: ``(B, 1, *spatial)`` tensors of the augmented pairs with the
        global batch ``indices`` at ``step`` (all of ``range(batch_size)`` in a single process). With
        ``teacher`` a fourth item: the teacher's moving images (:meth:`raw_pair`: before any intensity
        curve or blur, the T1 template for a ``t1_template`` pair), through the same augmentation
        (deformation, bias field, noise), for a teacher network (:func:`teacher_loss`). With ``raw``
        (not with ``teacher``) a fourth item: the list of the teacher's ``(fixed, moving)`` pairs before
        any augmentation, for :class:`OptimisationTeacher`."""
        if teacher and raw:
            raise ValueError("batch(): teacher and raw are two kinds of teacher input; ask for one.")
        fs, ms, srcs, ts = [], [], [], []
        for index in indices:
            rng = pair_rng(self.cfg.seed, step, index)
            f, m, s, before = self.raw_pair(rng, original=True)
            if raw:
                ts.append((f, before))
            # the teacher's copy of a remapped / blurred / template pair: the same augmentation draws again (a copy
            # of the generator)
            again = copy.deepcopy(rng) if teacher and before is not m else None
            f_aug, m_aug = self.augment(f, m, rng)
            if teacher:
                ts.append(m_aug if again is None else self.augment(f, before, again)[1])
            fs.append(f_aug)
            ms.append(m_aug)
            srcs.append(s)
        if teacher:
            return torch.cat(fs), torch.cat(ms), srcs, torch.cat(ts)
        if raw:
            return torch.cat(fs), torch.cat(ms), srcs, ts
        return torch.cat(fs), torch.cat(ms), srcs


# ----------------------------------------------------------------------------- validation


def validation_pairs(data: TrainingData, seed: int = 12345, max_subject_pairs: int = 4, synth: bool = True,
                     remap: bool = False, templates: bool = False) -> list:
    """Fixed validation pairs among the held-out subjects with labels: for the first
    ``max_subject_pairs`` ordered pairs (a <- b), a mono pair (T1_a, T1_b) and a multi-modal pair
    (T1_a inside its labelled brain, a contrast synthesised from b's labels with a fixed seed). With a single held-out
    subject, b runs over the training subjects instead (the fixed image stays unseen). ``synth``
    False: the mono pairs only. ``remap``: also (T1_a, T1_b through a random intensity curve with a
    fixed seed, :func:`remap_intensities`). ``templates`` (with ``data.template_labels``): also each
    held-out subject's T1 <- each MR template of ``data.templates`` (not "CT": the labels are of the MR
    templates; kind "template"). Dicts with name, fixed,
    moving (``(1, 1, *spatial)`` CPU tensors), fixed_labels, moving_labels (numpy).

    With a manifest (``data.val_pairs``), its validation pairs as they are (labels may be None)."""
    if data.val_pairs:
        return [{"name": p.name, "fixed": torch.from_numpy(p.fixed)[None, None].float(),
                 "moving": torch.from_numpy(p.moving)[None, None].float(), "fixed_labels": p.fixed_labels,
                 "moving_labels": p.moving_labels} for p in data.val_pairs]
    subs = [s for s in data.validation if s.labels is not None]
    pairs = [(a, b) for a in subs for b in subs if a is not b][:max_subject_pairs]
    if len(subs) == 1:  # one held-out subject: it is the fixed image, training subjects move
        pairs = [(subs[0], b) for b in data.training if b.labels is not None][:max_subject_pairs]
    out = []
    rng = np.random.default_rng(seed)
    for a, b in pairs:
        fixed = torch.from_numpy(a.image)[None, None].float()
        out.append({"name": f"{a.id}<-{b.id} T1", "fixed": fixed, "moving": torch.from_numpy(b.image)[None, None].float(),
                    "fixed_labels": a.labels, "moving_labels": b.labels})
        if remap:
            out.append({"name": f"{a.id}<-{b.id} remapped", "fixed": fixed,
                        "moving": remap_intensities(torch.from_numpy(b.image)[None, None].float(), rng),
                        "fixed_labels": a.labels, "moving_labels": b.labels})
        if not synth:
            continue
        out.append({"name": f"{a.id}<-{b.id} synth", "fixed": fixed * torch.from_numpy(brain_mask(a.labels))[None, None],
                    "moving": synthesise_contrast(b.labels, rng, 1.0), "fixed_labels": a.labels,
                    "moving_labels": b.labels})
    if templates and data.template_labels is not None:
        for a in subs:
            for mod in sorted(m for m in data.templates if m != "CT"):
                out.append({"name": f"{a.id}<-avg152{mod} template", "fixed": torch.from_numpy(a.image)[None, None].float(),
                            "moving": torch.from_numpy(data.templates[mod])[None, None].float(),
                            "fixed_labels": a.labels, "moving_labels": data.template_labels})
    return out


def _folding_percent(ddf: torch.Tensor) -> float:
    """% of voxels where det(I + grad u) <= 0, u ``(1, ndim, *spatial)`` in voxels (channel c along
    tensor axis c), by the engine's :func:`mmreg.spatial.jacobian_determinant` on a unit grid."""
    import SimpleITK as sitk  # noqa: PLC0415

    from .metrics import folding_percent  # noqa: PLC0415 - the engine's one definition of folding
    from .spatial import jacobian_determinant  # noqa: PLC0415
    u = ddf[0].detach().double().cpu().numpy()
    if u.shape[0] == 2:  # 2-D: a single-slice 3-D field without through-plane motion
        u = np.concatenate([np.zeros_like(u[:1]), u])[:, None]
    # sitk vectors are (x, y, z) = the tensor channels reversed; arrays are (z, y, x) = tensor axes
    field = sitk.GetImageFromArray(np.moveaxis(u[::-1], 0, -1), isVector=True)
    return folding_percent(jacobian_determinant(field))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    from .metrics import mean_dice  # noqa: PLC0415
    ids = sorted((set(np.unique(a).tolist()) & set(np.unique(b).tolist())) - {0})
    return mean_dice(a, b, ids) if ids else float("nan")


#: The kinds of the built-in validation pairs (the last word of their names).
_KINDS = ("T1", "synth", "remapped", "template")


def _dice_by_kind(result: dict) -> dict:
    """Mean Dice per kind of validation pair (the word after the pair's ids: "T1", "synth",
    "remapped", "template"; a manifest's pairs are "pairs"), over the pairs with labels."""
    groups: dict = {}
    for name, entry in result.get("pairs", {}).items():
        if entry.get("dice") is None:
            continue
        kind = name.rsplit(" ", 1)[-1]
        groups.setdefault(kind if kind in _KINDS else "pairs", []).append(entry["dice"])
    return {k: float(np.nanmean(v)) for k, v in groups.items()}


def validation_score(v: dict) -> float:
    """What "best" means for a validation result: its mean Dice when the pairs have labels, else
    minus its mean loss (higher is better either way)."""
    return v["mean_dice"] if v.get("mean_dice") is not None else -v["mean_loss"]


def _network_argument(spec, network) -> dict:
    """``{"network": network}`` for a loss that reads parts of the network (``spec.loss_needs_network``), else {}."""
    return {"network": network} if spec.loss_needs_network else {}


def validate(network, pairs: list, cfg: TrainConfig, device, with_identity: bool = False) -> dict:
    """Validation numbers of ``network`` over ``pairs`` (from :func:`validation_pairs`).

    Per pair: the method's training loss (fixed seed) and the folding % of the displacement; with
    both label maps, the mean Dice of the warped moving labels (nearest neighbour) vs the fixed
    labels. Returns ``mean_dice`` (None when no pair has labels), ``mean_loss``,
    ``folding_percent`` and ``pairs`` (per-pair entries); ``with_identity`` adds
    ``mean_dice_identity`` and ``mean_loss_identity`` (the numbers before registration). The
    global torch random state is left as it was (validation does not change a run's course).
    """
    from .spatial import warp  # noqa: PLC0415
    if not pairs:
        return {}
    spec = training_spec(cfg.method)
    was_training = network.training
    network.eval()
    per, after, before, losses, losses_before, folds = {}, [], [], [], [], []
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        for p in pairs:
            fixed, moving = p["fixed"].to(device), p["moving"].to(device)
            output = network(torch.cat([fixed, moving], dim=1))
            ddf = spec.displacement(output, cfg)
            loss, _ = spec.loss(fixed, moving, output, cfg, torch.Generator().manual_seed(0),
                                **_network_argument(spec, network))
            losses.append(float(loss))
            folds.append(_folding_percent(ddf))
            entry = {"dice": None, "loss": losses[-1], "folding_percent": folds[-1]}
            if with_identity:
                loss0, _ = spec.loss(fixed, moving, torch.zeros_like(output), cfg, torch.Generator().manual_seed(0),
                                     **_network_argument(spec, network))
                entry["loss_identity"] = float(loss0)
                losses_before.append(float(loss0))
            if p.get("fixed_labels") is not None and p.get("moving_labels") is not None:
                lab = torch.from_numpy(p["moving_labels"].astype(np.float32))[None, None].to(device)
                warped = warp(lab, ddf, mode="nearest", padding_mode="zeros")[0, 0].round().cpu().numpy().astype(np.int64)
                entry["dice"] = _dice(p["fixed_labels"], warped)
                after.append(entry["dice"])
                if with_identity:
                    entry["dice_identity"] = _dice(p["fixed_labels"], p["moving_labels"])
                    before.append(entry["dice_identity"])
            per[p["name"]] = entry
    network.train(was_training)
    out = {"mean_dice": float(np.nanmean(after)) if after else None, "mean_loss": float(np.mean(losses)),
           "folding_percent": float(np.mean(folds)), "pairs": per}
    if with_identity:
        out["mean_dice_identity"] = float(np.nanmean(before)) if before else None
        out["mean_loss_identity"] = float(np.mean(losses_before))
    return out


# ----------------------------------------------------------------------------- checkpoints


def _rng_state(device) -> dict:
    """The global torch random states (pairs and losses draw from per-pair seeds, :func:`pair_rng`)."""
    state = {"torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def read_weights_file(path, what: str) -> dict:
    """The state dict in a ``.pt`` file: plain weights, or a checkpoint's ``network``. ``what`` names the config key in
    the :class:`InputError` for a missing or unreadable file."""
    path = Path(str(path)).expanduser()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{what} '{path}' does not exist; give a model name, a model folder or a .pt file.") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken file
        raise InputError(f"{what} '{path}' cannot be read ({type(exc).__name__}: {exc}).") from None
    return state.get("network", state) if isinstance(state, dict) else state


def load_base_weights(cfg: TrainConfig) -> tuple:
    """``(state_dict, description, architecture)`` of ``cfg.base_model``: a ``.pt`` file (plain weights, or a
    checkpoint's ``network``; architecture None: taken to be the config's) or a model of ``cfg.method``
    (name or folder; checksum verified by :func:`mmreg.models.load_model`; its card's architecture).
    :class:`InputError` when it is missing or unreadable."""
    from .models import load_model  # noqa: PLC0415
    ref = str(cfg.base_model)
    if ref.endswith(".pt"):
        return read_weights_file(ref, "base_model"), str(Path(ref).expanduser()), None
    network, card = load_model(cfg.method, ref, training_spec(cfg.method).build_network, "cpu")
    return network.state_dict(), f"{card.name} (sha256 {card.sha256})", dict(card.architecture)


def start_from_base_model(network, cfg: TrainConfig, device, say) -> str | None:
    """Load ``cfg.base_model``'s weights into ``network`` (fine-tuning); returns its description, or None
    without a base model. A base model that read fewer input features than this config's architecture
    (``architecture.input_features``, e.g. ``"mind"`` continued as ``"intensity_and_mind"``) is widened by
    :func:`mmreg.networks.widen_input_weights`: the new inputs start at zero weight, so training starts from
    the base model's fields. :class:`InputError` when the weights do not fit the architecture."""
    if not cfg.base_model:
        return None
    state, description, base_architecture = load_base_weights(cfg)
    arch = cfg.full_architecture()
    reads, base_reads = arch.get("input_features", "intensity"), (base_architecture or arch).get("input_features", "intensity")
    widened = base_reads != reads and arch.get("kind") == "voxelmorph_unet"
    try:
        if widened:
            from .networks import widen_input_weights  # noqa: PLC0415
            state = widen_input_weights(state, network, base_architecture, arch)
        network.load_state_dict({k: v.to(device) for k, v in state.items()})
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"base_model {description} does not fit this config's architecture ({exc}); use the "
                         "architecture it was trained with.") from None
    say(f"starting from base model {description}" + (
        f" (input widened from {base_reads} to {reads}; the new inputs start at zero weight)" if widened else ""))
    return description


def teacher_reference(cfg: TrainConfig, ref: str) -> tuple:
    """``(method, model)`` of a teacher reference: ``"METHOD:NAME"`` names a model of another registration
    method (e.g. ``"mi:mi_brain_mind_distilled"`` teaching a ``grad`` network); a model folder is of the method
    its card names; a plain name is a model of ``cfg.method``."""
    from .methods import method_names  # noqa: PLC0415
    from .models import CARD_FILE  # noqa: PLC0415
    text = str(ref)
    folder = Path(text).expanduser()
    if folder.is_dir() and (folder / CARD_FILE).is_file():
        try:
            method = json.loads((folder / CARD_FILE).read_text()).get("method")
        except json.JSONDecodeError:
            method = None  # load_model names the broken card
        return (str(method) if method else cfg.method), text
    method, sep, name = text.partition(":")
    if sep and method in method_names():
        return method, name
    return cfg.method, text


def load_teacher(cfg: TrainConfig, device, say=None, ref: str | None = None, key: str = "teacher_model",
                 taught: str = ""):
    """The frozen teacher network ``ref`` (default ``cfg.teacher_model``: a model of ``cfg.method``, name or
    folder, or of another registration method, ``"METHOD:NAME"`` or a folder of it, see
    :func:`teacher_reference`; checksum verified), in eval mode on ``device``; None without a teacher. Errors
    name ``key``: :class:`WeightsError` when the model is missing or its weights do not verify,
    :class:`InputError` when it predicts another kind of field than this run (velocity vs displacement,
    integration steps) or is not a registration network: its outputs would not be comparable. A teacher of
    another method predicts one field; it teaches the student's (for ``grad``'s two-branch networks, the
    fused field that warps the moving image, :func:`taught_field`). ``taught``: which pairs it teaches, for
    the message to ``say``."""
    ref = cfg.teacher_model if ref is None else ref
    if not ref:
        return None
    from .models import load_model  # noqa: PLC0415
    method, model = teacher_reference(cfg, ref)
    try:
        spec = training_spec(method)
        if spec.trainer is not None and spec.use_trainer is None:
            raise InputError(f"method '{method}' has no registration network to teach with.")
        network, card = load_model(method, model, spec.build_network, device)
    except (InputError, WeightsError) as err:  # the same kind of error, naming the config key
        raise type(err)(f"{key}: {err}") from err
    if bool(card.diffeomorphic) != bool(cfg.diffeomorphic) or (
            cfg.diffeomorphic and int(card.integration_steps) != int(cfg.integration_steps)):
        raise InputError(f"{key} {card.name} predicts a {'velocity' if card.diffeomorphic else 'displacement'} "
                         f"({card.integration_steps} integration steps), this run a "
                         f"{'velocity' if cfg.diffeomorphic else 'displacement'} ({cfg.integration_steps}); "
                         "choose a teacher of the same kind or set diffeomorphic / integration_steps to match it.")
    if abs(float(card.spacing_mm) - float(cfg.spacing_mm)) > 1e-6 and say is not None:
        say(f"note: teacher {card.name} was trained at {card.spacing_mm:g} mm; it reads this run's "
            f"{cfg.spacing_mm:g} mm grid")
    network.eval()
    for param in network.parameters():
        param.requires_grad_(False)
    if say is not None:
        say(f"teacher{' of ' + taught + ' pairs' if taught else ''}: {card.name} (sha256 {card.sha256}), "
            f"weight {cfg.teacher_weight:g}")
    return network


def load_teachers(cfg: TrainConfig, device, say=None) -> dict:
    """The teacher networks of a run, ``{source: network}`` for ``cfg.teacher_models`` and ``{None: network}``
    for ``cfg.teacher_model`` (the teacher of every other source); empty without teachers. A model named
    twice is loaded once. See :func:`load_teacher`."""
    by_model: dict = {}  # model -> the sources it teaches (None: every source without its own teacher)
    if cfg.teacher_model:
        by_model[cfg.teacher_model] = [None]
    for source, ref in sorted(cfg.teacher_models.items()):
        by_model.setdefault(ref, []).append(source)
    teachers: dict = {}
    for ref, sources in by_model.items():
        own = [s for s in sources if s is not None]
        key = "teacher_model" if None in sources else f"teacher_models.{own[0]}"
        taught = ", ".join(own) + (" and all other" if None in sources else "") if own else ""
        network = load_teacher(cfg, device, say, ref=ref, key=key, taught=taught)
        teachers.update({source: network for source in sources})
    return teachers


def taught_field(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The part of the student's output ``(B, C, *spatial)`` that a teacher's output ``(B, c, *spatial)``
    teaches: all of it when ``c == C``; its first ``c`` channels when a teacher of another method predicts
    one field and the student more (``grad``'s ``cat(phi_ig, phi_g)``: the fused field ``phi_ig``)."""
    if teacher.shape[1] == student.shape[1]:
        return student
    if teacher.shape[1] < student.shape[1] and student.shape[1] % teacher.shape[1] == 0:
        return student[:, :teacher.shape[1]]
    raise InputError(f"The teacher predicts {teacher.shape[1]} channels and this network {student.shape[1]}; "
                     "they do not teach each other.")


def teacher_loss(student: torch.Tensor, teacher: torch.Tensor, weight: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` x the mean over voxels and components of ``(student - teacher)^2``: the two networks'
    raw outputs ``(B, ndim, *spatial)`` on one grid, in its voxels (velocities when the models integrate
    them). The teacher's output carries no gradient. ``mask`` ``(B, 1, *spatial)`` (0..1): the mean is
    taken over the voxels it weighs (e.g. where the fixed image has signal)."""
    from .losses import _check_mask, _masked_mean  # noqa: PLC0415
    squared = (student - teacher.detach()) ** 2
    return float(weight) * _masked_mean(squared, _check_mask(mask, squared))


class OptimisationTeacher:
    """The engine's instance optimisation as a teacher (``teacher_optimisation`` of the config): the
    voxel displacement ``(B, ndim, *spatial)`` it finds for each training pair on the training grid
    (:func:`mmreg.methods.optimize.instance_optimise` with the config's options, field-of-view masks of
    ones), pulling the network's displacement towards it (:func:`teacher_loss`). A field depends only on
    the pair before augmentation, so each is computed once and kept in memory and in ``cache_dir`` (one
    ``.pt`` file per pair, named by a hash of the two images, the grid and the options), where a resumed or
    repeated run finds it (memory: one field per distinct pair, e.g. 4 MB each for the 64 pairs of the
    shared IXI data on the 3 mm grid). ``say``: called with a line per field computed.

    The comparison is restricted to the fixed image's foreground (:meth:`mask`): in the empty background
    the similarity has no signal and the optimiser's field there is whatever the regulariser and noise
    left (measured on IXI T1 pairs, 3 mm grid: its RMS is larger there than in the brain), which a network
    cannot and should not learn to predict."""

    #: Foreground of the fixed image: above this fraction of its maximum after a Gaussian blur (voxels below).
    FOREGROUND_FRACTION, FOREGROUND_BLUR_VOXELS, FOREGROUND_DILATION_VOXELS = 0.05, 1.0, 2

    def __init__(self, options: dict, grid: NetworkGrid, cache_dir: Path | None, device, say=None):
        self.options, self.grid, self.device, self.say = dict(options), grid, device, say
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.fields: dict = {}
        self.computed = 0
        self._key = hashlib.sha256(json.dumps({"options": self.options, "shape": list(grid.spatial_shape),
                                               "spacing": [float(v) for v in grid.spacing]},
                                              sort_keys=True).encode())

    def _pair_key(self, fixed: torch.Tensor, moving: torch.Tensor) -> str:
        h = self._key.copy()
        for image in (fixed, moving):
            h.update(np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32).tobytes())
        return h.hexdigest()[:24]

    def field(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The optimiser's voxel displacement ``(1, ndim, *spatial)`` for ``fixed`` / ``moving``
        ``(1, 1, *spatial)`` on the training grid (resampling convention: moving at x + ddf(x))."""
        key = self._pair_key(fixed, moving)
        if key in self.fields:
            return self.fields[key].to(self.device)
        path = self.cache_dir / f"{key}.pt" if self.cache_dir is not None else None
        ddf = None
        if path is not None and path.is_file():
            try:
                ddf = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a torn file from a killed run: compute it again
                ddf = None
        if ddf is None or tuple(ddf.shape) != (1, fixed.dim() - 2) + tuple(fixed.shape[2:]):
            from .methods.base import GridInputs  # noqa: PLC0415
            from .methods.optimize import instance_optimise  # noqa: PLC0415
            t0 = time.perf_counter()
            ones = torch.ones_like(fixed)
            inputs = GridInputs(self.grid, fixed.detach(), moving.detach(), ones, ones, fixed.device)
            ddf = instance_optimise(inputs, **self.options).detach().cpu()
            self.computed += 1
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
                torch.save(ddf, tmp)
                os.replace(tmp, path)
            if self.say is not None:
                self.say(f"teacher: instance optimisation of a new training pair in {time.perf_counter() - t0:.1f} s "
                         f"({len(self.fields) + 1} pairs known)")
        self.fields[key] = ddf
        return ddf.to(self.device)

    def __call__(self, pairs: list) -> torch.Tensor:
        """The fields of a batch's ``(fixed, moving)`` pairs (:meth:`PairSampler.batch` with ``raw``),
        concatenated ``(B, ndim, *spatial)``."""
        return torch.cat([self.field(f, m) for f, m in pairs])

    def mask(self, pairs: list) -> torch.Tensor:
        """``(B, 1, *spatial)`` 0/1 masks of where the teacher's field is compared: each fixed image's
        foreground (blurred by :attr:`FOREGROUND_BLUR_VOXELS`, above :attr:`FOREGROUND_FRACTION` of its
        maximum, dilated by :attr:`FOREGROUND_DILATION_VOXELS`)."""
        masks = []
        for fixed, _ in pairs:
            smooth = _gaussian_blur(fixed.detach().to(self.device), self.FOREGROUND_BLUR_VOXELS)
            inside = (smooth > self.FOREGROUND_FRACTION * smooth.max()).to(smooth.dtype)
            k = 2 * self.FOREGROUND_DILATION_VOXELS + 1
            masks.append(F.max_pool3d(inside, k, stride=1, padding=k // 2))
        return torch.cat(masks)


def save_checkpoint(path: Path, network, optimizer, step: int, cfg: TrainConfig, history: dict, device) -> Path:
    """Write a checkpoint (network + optimiser state, step, torch RNG states, config, history) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": 1, "step": int(step), "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
                "optimizer": optimizer.state_dict(), "rng": _rng_state(device),
                "config": json.dumps(cfg.to_dict()), "history": json.dumps(history)}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"No checkpoint to resume from at '{path}'; run without --resume first.") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken file
        raise InputError(f"Checkpoint '{path}' cannot be read ({type(exc).__name__}: {exc}); delete it and restart "
                         "the training without --resume.") from None
    ck["config"] = json.loads(ck["config"])
    ck["history"] = json.loads(ck["history"])
    return ck


#: Config keys that may differ between a run and its resumption (they do not change the result).
_RESUMABLE = {"steps", "threads", "device", "validation_every", "checkpoint_every", "output", "description"}


def _check_resume(cfg: TrainConfig, saved: dict, path: Path) -> None:
    now = cfg.to_dict()
    now["data"].pop("root", None), saved["data"].pop("root", None)
    now["data"].pop("cache_dir", None), saved["data"].pop("cache_dir", None)
    saved.setdefault("metric", now["metric"] if now["method"] != "metric" else None)  # older runs had no [metric]
    saved.setdefault("disentangled", now["disentangled"] if now["method"] != "disentangled" else None)
    if isinstance(saved["metric"], dict):  # the ranking term and adversarial negatives came later
        for key, value in dataclasses.asdict(MetricTrainConfig()).items():
            if key.startswith(("ranking_", "adversarial_")):
                saved["metric"].setdefault(key, value)
    for d in (now["data"], saved["data"]):  # keys added later: absent in older checkpoints = their defaults
        d.setdefault("manifest", None), d.setdefault("validation_fraction", 0.2), d.setdefault("prealign", "affine")
    saved.setdefault("warmup_steps", 0), saved.setdefault("gradient_clip", 0.0)
    saved.setdefault("teacher_optimisation", {}), saved.setdefault("teacher_models", {})
    diff = sorted(k for k in set(now) | set(saved) if k not in _RESUMABLE and now.get(k) != saved.get(k))
    if diff:
        raise InputError(f"The config differs from the one of the checkpoint '{path}' in: {', '.join(diff)}. Resume "
                         "with the same config (only steps, threads, device, validation_every, checkpoint_every may "
                         "change), or start a new run in another output folder.")


# ----------------------------------------------------------------------------- files of a run (log, events, stop)

#: Under ``<output>/training/``: the human log, the event stream and the stop request.
LOG_FILE, PROGRESS_FILE, STOP_FILE = "log.txt", "progress.jsonl", "STOP"


def _json_safe(value):
    """``value`` with NaN/Inf floats as None (the event stream is strict JSON)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class RunFiles:
    """The files through which a run reports while it goes (what the Slicer training module and a
    cluster user's ``tail -f`` read): ``log.txt`` (timestamped lines), ``progress.jsonl`` (one JSON
    event per line: start, step, validation, stopped, done, error; see :func:`read_progress`) and
    the ``STOP`` request file (:func:`request_stop`). Writes nothing when ``active`` is False (the
    other processes of a distributed run)."""

    def __init__(self, folder: Path, active: bool = True):
        self.folder, self.active = Path(folder), active
        if active:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / STOP_FILE).unlink(missing_ok=True)  # an old request must not stop the new run

    def line(self, text: str) -> None:
        """Append a timestamped line to ``log.txt``."""
        if self.active:
            with open(self.folder / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def event(self, kind: str, **fields) -> None:
        """Append ``{"event": kind, **fields, "time": unix seconds}`` to ``progress.jsonl`` (flushed)."""
        if self.active:
            record = _json_safe({"event": kind, **fields, "time": round(time.time(), 3)})
            with open(self.folder / PROGRESS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def stop_requested(self) -> bool:
        """True when someone asked the run to stop (:func:`request_stop`)."""
        return (self.folder / STOP_FILE).exists()


def stopped_error(step: int, steps: int, out_dir: Path) -> CancelledError:
    """The error a training run raises when it was stopped (cancel, stop file) at ``step`` of ``steps``
    after saving its checkpoint and model in ``out_dir``."""
    return CancelledError(f"Training stopped at step {step} of {steps}; the checkpoint and the model so far are in "
                          f"{out_dir}; continue with --resume.")


def after_own_step(cfg, step: int, start_step: int, seconds: float, history: dict, files: RunFiles, progress,
                   out_dir: Path, *, validate, checkpoint, stop_run, loss_name: str = "loss") -> None:
    """The bookkeeping after one optimiser step of a method's own training loop (the learned metric, the RDM of
    ``disentangled``): time per step and the step event, validation (``validate()``) and ``checkpoint()`` on
    their schedules, the progress callback, and a stop (cancelled progress or the stop file): ``stop_run("stopped")``
    then :class:`CancelledError`. ``history["loss"]`` must already hold this step's loss."""
    history["seconds_per_step"].append(seconds)
    recent = float(np.median(history["seconds_per_step"][-20:]))
    files.event("step", step=step, steps=cfg.steps, loss=history["loss"][-1], seconds_per_step=round(seconds, 4),
                eta_s=round(recent * (cfg.steps - step), 1))
    if cfg.validation_every and step % cfg.validation_every == 0 and step < cfg.steps:
        validate()
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
        checkpoint()
    stop = False
    try:
        progress((step - start_step) / max(cfg.steps - start_step, 1),
                 f"step {step}/{cfg.steps} {loss_name} {history['loss'][-1]:.4f} {recent:.2f} s/step")
    except CancelledError:
        stop = True
    if (stop or files.stop_requested()) and step < cfg.steps:
        stop_run("stopped")
        raise stopped_error(step, cfg.steps, out_dir)


def stop_own_run(how: str, step: int, checkpoint, write_model, files: RunFiles, say, last_path: Path) -> None:
    """A method's own training loop stops early (``how``: "stopped", "interrupted"): the checkpoint, then the model
    so far (``write_model(stopped=True) -> (folder, chosen weights)``), the "stopped" event and a log line."""
    checkpoint()
    folder, chosen = write_model(stopped=True)
    files.event("stopped", step=step, checkpoint=str(last_path), model_dir=str(folder))
    say(f"{how} at step {step}; checkpoint {last_path}, model so far ({chosen} weights) in {folder} "
        "(continue with --resume)")


def finish_own_run(step: int, history: dict, checkpoint, write_model, files: RunFiles, say, progress, t_start: float):
    """A method's own training loop ends: checkpoint, the model (``write_model(stopped=False)``), the "done" event and
    log line; returns its :class:`TrainResult` (with the card read back from the written model)."""
    from .models import CARD_FILE, ModelCard  # noqa: PLC0415
    checkpoint()
    model_dir, chosen = write_model(stopped=False)
    progress(1.0, "model written")
    files.event("done", step=step, model_dir=str(model_dir), wall_s=round(history["wall_seconds"], 1))
    say(f"model written to {model_dir} ({chosen} weights); wall time {history['wall_seconds']:.1f} s")
    card = ModelCard.from_dict(json.loads((Path(model_dir) / CARD_FILE).read_text()))
    return TrainResult(model_dir, card, history, time.perf_counter() - t_start, step)


def open_own_run(cfg: TrainConfig, resume: bool, progress, log, trainer: str) -> tuple:
    """The start of a method's own single-process training loop (the learned metric, the RDM of ``disentangled``):
    :class:`InputError` under torchrun (``trainer`` names what trains, e.g. "The learned metric"), the device and
    torch threads of ``cfg``, the progress wrapper, the run's paths (:func:`run_paths`), its :class:`RunFiles` and
    ``say(line)``, which writes a line to the run's log (and to ``log`` when given). Returns
    ``(device, threads, progress, (out_dir, ck_dir, last_path, best_path), files, say)``."""
    from .device import choose_device, set_threads  # noqa: PLC0415
    from .progress import Progress  # noqa: PLC0415
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError(f"{trainer} trains in one process; run it without torchrun.")
    device = choose_device(cfg.device)
    threads = set_threads(cfg.threads)
    paths = run_paths(cfg, resume)
    files = RunFiles(paths[1])

    def say(line: str) -> None:
        files.line(line)
        if log:
            log(line)
    return device, threads, Progress(progress), paths, files, say


def resume_checkpoint(cfg: TrainConfig, last_path: Path, network: torch.nn.Module, optimizers, device, say) -> tuple:
    """Continue a run from its checkpoint ``last_path`` (:func:`load_checkpoint`): check that ``cfg`` is the
    run's configuration (:func:`_check_resume`), load the network, the optimiser state (``optimizers``: one
    optimiser, or ``{name: optimiser}`` for a checkpoint that holds several) and the random number generators,
    and say so. Returns ``(history, step)``."""
    ck = load_checkpoint(last_path)
    _check_resume(cfg, ck["config"], last_path)
    network.load_state_dict(ck["network"])
    if isinstance(optimizers, dict):
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(ck["optimizer"][name])
    else:
        optimizers.load_state_dict(ck["optimizer"])
    _set_rng_state(ck["rng"], device)
    step = int(ck["step"])
    say(f"resumed from {last_path} at step {step}")
    return ck["history"], step


def request_stop(output: str | os.PathLike) -> Path:
    """Ask the run writing into ``output`` to stop: it finishes its step, saves the checkpoint and
    the model so far, and exits (``mmreg train`` with code 130); ``--resume`` continues it.
    Returns the request file's path."""
    path = Path(output).expanduser() / CHECKPOINT_DIR / STOP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("stop requested\n")
    return path


def run_paths(cfg: TrainConfig, resume: bool) -> tuple:
    """``(model folder, checkpoint folder, last.pt, best.pt)`` of a run; :class:`InputError` when a new run
    (not ``resume``) would overwrite a run or a model already there."""
    from .models import CARD_FILE  # noqa: PLC0415
    out_dir = cfg.output_dir()
    ck_dir = out_dir / CHECKPOINT_DIR
    last_path, best_path = ck_dir / "last.pt", ck_dir / "best.pt"
    if not resume and last_path.exists():
        raise InputError(f"'{out_dir}' already holds a training run ({last_path}); pass --resume to continue it, or "
                         "choose another --output / name.")
    if not resume and (out_dir / CARD_FILE).exists():
        raise InputError(f"'{out_dir}' already holds a model; choose another --output / name, or delete that model "
                         "first (mmreg models delete).")
    return out_dir, ck_dir, last_path, best_path


def can_resume(output: str | os.PathLike) -> bool:
    """True when ``output`` holds a run's checkpoint (``training/last.pt``) that ``--resume`` continues."""
    return (Path(output).expanduser() / CHECKPOINT_DIR / "last.pt").is_file()


def read_progress(output: str | os.PathLike, offset: int = 0) -> tuple:
    """``(events, new_offset)``: the complete event lines of ``output``'s ``progress.jsonl`` after
    byte ``offset`` (a half-written last line waits for the next call). Events are dicts with
    ``event`` = "start" (method, name, steps, start_step, output, pairs, skipped), "step" (step,
    steps, loss, seconds_per_step, eta_s), "validation" (step, mean_dice or None without labels,
    mean_loss, folding_percent, best_step), "stopped" (step, checkpoint, model_dir), "done" (step,
    model_dir, wall_s) or "error" (message)."""
    path = Path(output).expanduser() / CHECKPOINT_DIR / PROGRESS_FILE
    if not path.is_file():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    events = []
    for raw in data[:end].splitlines():
        try:
            events.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return events, offset + end


def _distributed_setup(device_text: str):
    """``(rank, world_size, initialised_here)`` from torchrun's environment (1 process: ``(0, 1, False)``).

    With ``WORLD_SIZE`` > 1 the default process group is created (NCCL on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist  # noqa: PLC0415
    if not dist.is_available():
        raise InputError("WORLD_SIZE > 1 but this torch has no distributed package; run a single process.")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    use_cuda = device_text.startswith("cuda") or (device_text == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What :func:`train` returns: ``model_dir`` (folder with model.pt/model.json), ``card`` (the
    :class:`mmreg.models.ModelCard`; None in the processes other than 0 of a distributed run, which
    write nothing), ``history`` (losses, s/step, validation), ``seconds`` (wall time of this
    invocation) and ``final_step``."""

    model_dir: Path
    card: object
    history: dict
    seconds: float
    final_step: int


def train(cfg: TrainConfig, data: TrainingData | None = None, *, resume: bool = False,
          progress: ProgressCallback | None = None, log=None) -> TrainResult:
    """Train a model per ``cfg``; returns a :class:`TrainResult`.

    ``data``: prepared volumes (None: :func:`prepare_manifest` when ``cfg.data.manifest`` is set,
    else :func:`prepare_ixi` from the shared data). ``resume``: continue from
    ``<output>/training/last.pt`` (same config except steps and the run settings). Stopping:
    ``progress(fraction, message)`` raising :class:`CancelledError` (or returning False), a
    :func:`request_stop` file, Ctrl-C or SIGTERM: the checkpoint AND the model so far are written,
    then :class:`CancelledError` (KeyboardInterrupt for Ctrl-C) propagates. ``log``: optional
    callable taking a line of text; every line also goes to ``<output>/training/log.txt`` and the
    events to ``progress.jsonl`` (:class:`RunFiles`).

    Distributed data parallel: started by ``torchrun`` (``WORLD_SIZE`` > 1), each process
    computes its share of the global batch ``cfg.batch_size`` (which must divide evenly) and the
    gradients are averaged (DDP; gloo on CPU, NCCL on GPUs). Pair ``k`` of a step is the same
    in any number of processes (:func:`pair_rng`), so N processes give the model one process
    gives with the same global batch. Process 0 validates and writes checkpoints, logs and the model.
    """
    from .device import choose_device, set_threads  # noqa: PLC0415
    from .models import ModelCard, save_model  # noqa: PLC0415
    from .networks import parameter_count  # noqa: PLC0415

    t_start = time.perf_counter()
    validate_config(cfg)
    spec = training_spec(cfg.method)
    if spec.trainer is not None and (spec.use_trainer is None or spec.use_trainer(cfg)):
        # a method (or stage) with its own training procedure: the learned metric, the RDM of ``disentangled``
        return spec.trainer(cfg, data, resume=resume, progress=progress, log=log)
    rank, world, dist_here = _distributed_setup(cfg.device)
    main = rank == 0
    try:
        if cfg.batch_size % world:
            raise InputError(f"batch_size {cfg.batch_size} is the global batch and must be a multiple of the number of "
                             f"training processes ({world}).")
        local = cfg.batch_size // world
        prog = Progress(progress if main else None)
        threads = set_threads(cfg.threads)
        device = choose_device(cfg.device)
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        out_dir, ck_dir, last_path, best_path = run_paths(cfg, resume)
        files = RunFiles(ck_dir, active=main)
    except BaseException:
        if dist_here:
            torch.distributed.destroy_process_group()
        raise

    def say(line: str) -> None:
        if main:
            files.line(line)
            if log:
                log(line)

    try:
        return _train_loop(cfg, data, resume, spec, rank, world, local, device, threads, prog, files, say,
                           out_dir, ck_dir, last_path, best_path, t_start, ModelCard, save_model, parameter_count,
                           lambda arch: network_multiple(cfg.method, arch))
    except (CancelledError, KeyboardInterrupt):
        raise
    except BaseException as exc:
        files.event("error", message=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise
    finally:
        if dist_here:
            torch.distributed.destroy_process_group()


def _train_loop(cfg, data, resume, spec, rank, world, local, device, threads, prog, files, say, out_dir, ck_dir,
                last_path, best_path, t_start, ModelCard, save_model, parameter_count, size_multiple) -> TrainResult:
    """The body of :func:`train` (after the run's folder and processes are set up)."""
    main = rank == 0
    dist = torch.distributed if world > 1 else None
    arch = cfg.full_architecture()
    multiple = size_multiple(arch)
    if data is None:
        if dist is not None and not main:
            dist.barrier()  # process 0 prepares (and caches) the data first
        if cfg.data.manifest:
            data = prepare_manifest(cfg, prog.sub(0.0, 0.05), say)
        else:
            data = prepare_ixi(cfg, prog.sub(0.0, 0.05))
        if dist is not None and main:
            dist.barrier()
    if any(s % multiple for s in data.grid.spatial_shape):
        raise InputError(f"The training grid {data.grid.spatial_shape} is not a multiple of {multiple}.")
    weights = data.check(cfg)

    torch.manual_seed(cfg.seed)
    network = spec.build_network(arch).to(device)
    network.train()
    base_description = start_from_base_model(network, cfg, device, say) if not resume else None
    if spec.prepare_network is not None:  # e.g. load and freeze the parts another stage trained
        spec.prepare_network(network, cfg, device, say)
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=cfg.learning_rate)
    teachers = load_teachers(cfg, device, say)
    optimisation_teacher = None
    if cfg.teacher_optimisation:
        optimisation_teacher = OptimisationTeacher(cfg.teacher_optimisation, data.grid,
                                                   _cache_root(cfg) / "teacher_fields", device, say)
        say(f"teacher: instance optimisation {json.dumps(cfg.teacher_optimisation, sort_keys=True)} on each training "
            f"pair (cached in {optimisation_teacher.cache_dir}), weight {cfg.teacher_weight:g}")
    history = {"loss": [], "source": [], "seconds_per_step": [], "validation": [], "best": None, "wall_seconds": 0.0,
               "base_model": base_description, "skipped_steps": 0}
    step = 0
    if resume:
        history, step = resume_checkpoint(cfg, last_path, network, optimizer, device, say)
        if step >= cfg.steps:
            say(f"the checkpoint is already at step {step} >= steps = {cfg.steps}; writing the model")
    model = network
    if dist is not None:
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415
        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    wall_before = float(history.get("wall_seconds", 0.0))
    sampler = PairSampler(data, cfg, weights, device)
    val_pairs = validation_pairs(data, synth="t1_synth" in weights,  # validate on the kinds of pairs trained
                                 remap="t1_t1_remap" in weights, templates=cfg.data.validate_templates) if main else []
    files.event("start", method=cfg.method, name=cfg.name, steps=cfg.steps, start_step=step, output=str(out_dir),
                processes=world, pairs={"training": len(data.train_pairs) or len(data.training),
                                        "validation": len(val_pairs)},
                skipped=data.info.get("skipped", []))
    for entry in data.info.get("skipped", []):
        say(f"skipped manifest {entry['entry']}: {entry['reason']}")

    def record_validation(v: dict, candidate: bool = True) -> str:
        """Append ``v`` (from :func:`validate`) to the history and the event stream at this step,
        updating the best (unless not a ``candidate``: the untrained start); returns the per-kind
        Dice as text for the log (empty with one kind of pair)."""
        kinds = _dice_by_kind(v)
        history["validation"].append({"step": step, "mean_dice": v["mean_dice"], "mean_loss": v["mean_loss"],
                                      "folding_percent": v["folding_percent"], "dice_by_kind": kinds})
        best = history.get("best")
        if candidate and (best is None or validation_score(v) > validation_score(best)):
            history["best"] = {"step": step, "mean_dice": v["mean_dice"], "mean_loss": v["mean_loss"],
                               "folding_percent": v["folding_percent"],
                               "criterion": "dice" if v["mean_dice"] is not None else "loss"}
        files.event("validation", step=step, mean_dice=v["mean_dice"], mean_loss=v["mean_loss"],
                    folding_percent=v["folding_percent"], dice_by_kind=kinds,
                    best_step=history["best"]["step"] if history.get("best") else None)
        return " (" + ", ".join(f"{k} {d:.4f}" for k, d in kinds.items()) + ")" if len(kinds) > 1 else ""

    def numbers(v: dict, key: str = "") -> str:
        dice, loss = v.get("mean_dice" + key), v.get("mean_loss" + key)
        return f"mean Dice {dice:.4f}" if dice is not None else f"loss {loss:.4f}"

    if val_pairs and not history["validation"]:
        v = validate(network, val_pairs, cfg, device, with_identity=True)
        history["identity_dice"] = v["mean_dice_identity"]
        history["identity_loss"] = v["mean_loss_identity"]
        kinds = record_validation(v, candidate=False)
        say(f"validation at step {step}: {numbers(v, '_identity')} (identity) / {numbers(v)} (network), "
            f"folding {v['folding_percent']:.3f} %{kinds}")

    def checkpoint():
        history["wall_seconds"] = wall_before + time.perf_counter() - t_start
        if main:
            save_checkpoint(last_path, network, optimizer, step, cfg, history, device)

    def run_validation():
        v = validate(network, val_pairs, cfg, device)
        kinds = record_validation(v)
        if history["best"]["step"] == step:
            best_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: t.detach().cpu() for k, t in network.state_dict().items()}, best_path.with_suffix(".tmp"))
            os.replace(best_path.with_suffix(".tmp"), best_path)
        best = history["best"]
        identity = numbers({"mean_dice": history.get("identity_dice"), "mean_loss": history.get("identity_loss", float("nan"))})
        say(f"validation at step {step}: {numbers(v)} (identity {identity}), folding {v['folding_percent']:.3f} %; best {numbers(best)} at step {best['step']}{kinds}")

    def write_model(stopped: bool):
        """The model (best or last weights) and its card into ``out_dir``; returns (folder, card, chosen)."""
        final_state = network.state_dict()
        chosen = "last"
        if cfg.final_model == "best" and history.get("best") and best_path.is_file():
            final_state = torch.load(best_path, map_location="cpu", weights_only=True)
            chosen = f"best (step {history['best']['step']})"
        final_net = spec.build_network(arch)
        final_net.load_state_dict({k: v.cpu() for k, v in final_state.items()})
        sps = history["seconds_per_step"]
        wall = wall_before + time.perf_counter() - t_start
        history["wall_seconds"] = wall
        if data.train_pairs:
            what = f"{len(data.train_pairs)} pairs of {Path(str(data.info.get('manifest', 'a manifest'))).name}"
        else:
            what = "sources " + ", ".join(f"{k} {v:.2f}" for k, v in weights.items())
        description = cfg.description or (
            f"{cfg.method} network trained with `mmreg train` ({step} steps, {cfg.spacing_mm:g} mm grid; {what}).")
        training = {
            "command": "mmreg train", "config": cfg.to_dict(), "data": data.info, "source_weights": weights,
            "steps": step, "weights": chosen, "base_model": history.get("base_model"),
            "skipped_steps": history.get("skipped_steps", 0), "parameters": parameter_count(final_net),
            "grid_size_xyz": list(data.grid.size), "device": str(device), "threads": threads, "processes": world,
            "wall_time_s": round(wall, 1),
            "seconds_per_step_median": float(np.median(sps)) if sps else None,
            "final_loss_mean_last_20": float(np.nanmean(history["loss"][-20:])) if history["loss"] else None,
            "validation": {"identity_mean_dice": history.get("identity_dice"),
                           "identity_mean_loss": history.get("identity_loss"), "history": history["validation"],
                           "best": history.get("best"), "pairs": [p["name"] for p in val_pairs]},
        }
        if stopped:
            training["stopped_at_step"] = step
            training["steps_planned"] = cfg.steps
        card = ModelCard(
            name=cfg.name, method=cfg.method, architecture=arch, spacing_mm=float(np.mean(data.grid.spacing)),
            multiple=multiple, diffeomorphic=cfg.diffeomorphic, integration_steps=cfg.integration_steps,
            description=description, training=training)
        folder = save_model(out_dir, final_net, card)
        (ck_dir / "history.json").write_text(json.dumps(history))
        return folder, card, chosen

    def stop_run(how: str):
        checkpoint()
        if main:
            folder, _, chosen = write_model(stopped=True)
            files.event("stopped", step=step, checkpoint=str(last_path), model_dir=str(folder))
            say(f"{how} at step {step}; checkpoint {last_path}, model so far ({chosen} weights) in {folder} "
                "(continue with --resume)")

    train_prog = prog.sub(0.05, 0.98)
    start_step = step
    indices = list(range(rank * local, (rank + 1) * local))
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            if teachers:
                fixed, moving, sources, teacher_moving = sampler.batch(step, indices, teacher=True)
            elif optimisation_teacher is not None:
                fixed, moving, sources, teacher_pairs = sampler.batch(step, indices, raw=True)
            else:
                fixed, moving, sources = sampler.batch(step, indices)
            output = model(torch.cat([fixed, moving], dim=1))
            loss = 0.0
            parts_sum: dict = {}
            if teachers:
                distill = 0.0
                taught: dict = {}  # teacher -> the batch indices of the pairs it teaches (by their source)
                for k, source in enumerate(sources):  # a source without a teacher is not taught
                    teacher = teachers.get(source, teachers.get(None))
                    if teacher is not None:
                        taught.setdefault(teacher, []).append(k)
                for teacher, rows in taught.items():  # one forward pass per teacher; the mean over taught pairs
                    with torch.no_grad():
                        target = teacher(torch.cat([fixed[rows], teacher_moving[rows]], dim=1))
                    distill = distill + teacher_loss(taught_field(output[rows], target), target,
                                                     cfg.teacher_weight) * (len(rows) / local)
                loss = loss + distill
                parts_sum["teacher"] = float(distill.detach()) if torch.is_tensor(distill) else distill
            elif optimisation_teacher is not None:  # displacements: the optimiser's field is not a network output
                distill = teacher_loss(spec.displacement(output, cfg), optimisation_teacher(teacher_pairs),
                                       cfg.teacher_weight, mask=optimisation_teacher.mask(teacher_pairs))
                loss = loss + distill
                parts_sum["teacher"] = float(distill.detach())
            for k, index in enumerate(indices):  # per pair: its loss randomness does not depend on the batch
                item_loss, parts = spec.loss(fixed[k:k + 1], moving[k:k + 1], output[k:k + 1], cfg,
                                             loss_generator(cfg.seed, step, index), **_network_argument(spec, network))
                loss = loss + item_loss / local
                for key, value in parts.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + value / local
            flags = torch.tensor([float(loss.detach()), 0.0 if torch.isfinite(loss) else 1.0], dtype=torch.float64)
            if dist is not None:  # every process must take (or skip) the same step
                flags = flags.to(device)
                dist.all_reduce(flags)
                flags = flags.cpu() / torch.tensor([world, 1.0], dtype=torch.float64)
            optimizer.zero_grad(set_to_none=True)
            if flags[1] == 0:
                loss.backward()
                for group in optimizer.param_groups:  # from the step count: the same after --resume
                    group["lr"] = learning_rate_at(cfg, step)
                if cfg.gradient_clip > 0:
                    torch.nn.utils.clip_grad_norm_(network.parameters(), cfg.gradient_clip)
                optimizer.step()
            else:  # a non-finite loss would poison the weights: skip this step, count it
                history["skipped_steps"] = history.get("skipped_steps", 0) + 1
                say(f"step {step + 1}: non-finite loss, step skipped ({history['skipped_steps']} so far)")
            step += 1
            dt = time.perf_counter() - t0
            history["loss"].append(float(flags[0]))
            for key, value in parts_sum.items():
                history.setdefault(key, []).append(value)
            history["source"].append(",".join(sources))
            history["seconds_per_step"].append(dt)
            recent = float(np.median(history["seconds_per_step"][-20:]))
            files.event("step", step=step, steps=cfg.steps, loss=history["loss"][-1], seconds_per_step=round(dt, 4),
                        eta_s=round(recent * (cfg.steps - step), 1))
            if cfg.validation_every and step % cfg.validation_every == 0 and step < cfg.steps and val_pairs:
                run_validation()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint()
            stop = False
            if main:
                try:
                    train_prog((step - start_step) / max(cfg.steps - start_step, 1),
                               f"step {step}/{cfg.steps} loss {history['loss'][-1]:.4f} {recent:.2f} s/step")
                except CancelledError:
                    stop = True
                stop = stop or files.stop_requested()
            if dist is not None:  # process 0 decides; the others follow
                flag = torch.tensor([1.0 if stop else 0.0], device=device)
                dist.broadcast(flag, 0)
                stop = bool(flag.item())
            if stop and step < cfg.steps:
                stop_run("stopped")
                raise stopped_error(step, cfg.steps, out_dir)
    except KeyboardInterrupt:
        stop_run("interrupted")
        raise
    if val_pairs and (not history["validation"] or history["validation"][-1]["step"] != step or history["best"] is None):
        run_validation()
    checkpoint()
    if not main:
        dist.barrier()  # process 0 writes the model
        return TrainResult(out_dir, None, history, time.perf_counter() - t_start, step)
    model_dir, card, chosen = write_model(stopped=False)
    prog(1.0, "model written")
    files.event("done", step=step, model_dir=str(model_dir), wall_s=round(history["wall_seconds"], 1))
    say(f"model written to {model_dir} ({chosen} weights); wall time {history['wall_seconds']:.1f} s")
    if dist is not None:
        dist.barrier()
    return TrainResult(model_dir, card, history, time.perf_counter() - t_start, step)
