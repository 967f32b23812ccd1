"""Training of the learned methods: ``mmreg train CONFIG.toml`` (engine side, no Slicer imports).

The recipe (method ``mi``): every volume is brought once onto ONE common training grid (the
avg152T1 template's extent at ``spacing_mm``, sizes padded to the network's size multiple),
intensities in [0, 1]; IXI T1 images (and their DLMUSE label maps) are affinely aligned to the
template first (:func:`mmreg.affine.affine_prealign`), the avg152 T2/PD templates already lie on
the template grid. Each step samples a pair per the data weights

* ``t1_t1``: IXI T1 (fixed) vs another training subject's T1 (moving), mono-modal;
* ``t1_template``: IXI T1 (fixed) vs avg152 T2 or PD (moving), real multi-modal;
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

from .errors import CancelledError, InputError
from .grid import NetworkGrid
from .progress import Progress, ProgressCallback

#: Data sources a pair can be drawn from (see the module doc).
SOURCES = ("t1_t1", "t1_t1_remap", "t1_template", "t1_synth", "t1_self")
#: Bump when the prepared-data layout or recipe changes (invalidates the cache).
PREP_VERSION = 1
CHECKPOINT_DIR = "training"

# ----------------------------------------------------------------------------- configuration


@dataclass
class DataConfig:
    """``[data]`` of the config: where the images come from and how pairs are drawn.

    ``root``: the shared data folder (None: ``$MMREG_DATA`` or ``<repo>/../shared/data``).
    ``sources``: relative weights of the pair kinds (:data:`SOURCES`). ``template_modalities``:
    which avg152 templates ``t1_template`` uses ("T2", "PD"). ``validation_subjects``: held-out
    IXI ids (never trained on). ``training_subjects``: ids to train on (empty: every other one).
    ``cache_dir``: where prepared volumes are cached (None: ``$MMREG_CACHE/train`` or
    ``~/.cache/mmreg/train``).
    """

    root: str | None = None
    sources: dict = field(default_factory=lambda: {"t1_t1": 0.4, "t1_template": 0.3, "t1_synth": 0.3})
    template_modalities: list = field(default_factory=lambda: ["T2", "PD"])
    validation_subjects: list = field(default_factory=lambda: ["IXI049", "IXI051"])
    training_subjects: list = field(default_factory=list)
    cache_dir: str | None = None


@dataclass
class AugmentConfig:
    """``[augment]`` of the config (0 switches an augmentation off).

    ``deformation_max_mm``: largest displacement (mm, about) of the random smooth deformation of
    the moving image (a stationary velocity on a control grid of ``deformation_control_mm``
    spacing, integrated: diffeomorphic); its size is drawn uniformly in [0.25, 1] x max.
    ``rotation_deg`` / ``scale`` / ``translation_mm``: uniform affine jitter of the moving image
    (per axis, +-). ``bias_strength``: a smooth multiplicative field ``exp(s * g)`` with g in
    [-1, 1]; ``noise_std``: Gaussian noise (intensities in [0, 1]); ``synth_blur_voxels``: largest
    Gaussian sigma of the synthesised contrasts; ``augment_fixed``: bias and noise on the fixed
    image too.
    """

    deformation_max_mm: float = 8.0
    deformation_control_mm: float = 40.0
    rotation_deg: float = 5.0
    scale: float = 0.05
    translation_mm: float = 4.0
    bias_strength: float = 0.3
    noise_std: float = 0.02
    synth_blur_voxels: float = 1.0
    augment_fixed: bool = True


@dataclass
class TrainConfig:
    """A training run (read from TOML with :func:`load_config`; every field has a default).

    ``method``: "mi" (the only trainable method so far). ``name``: the model name (folder name
    under the user model folder). ``output``: the model folder (None:
    ``user_model_root()/<method>/<name>``); checkpoints go to ``<output>/training/``.
    ``spacing_mm``: isotropic spacing of the training grid (= the model's network spacing).
    ``grid_size``: ITK (x, y, z) size of the training grid centred on the template, each a
    multiple of the network multiple (empty: the template's extent, padded). ``steps``: total
    optimiser steps; ``batch_size``: pairs per step; ``learning_rate``: Adam. ``smoothness``,
    ``diffeomorphic``, ``integration_steps``, ``mi_bins``, ``mi_max_voxels``, ``mi_blur_voxels``: the loss and the
    field (see :func:`mmreg.methods.mi.training_loss`). ``validation_every`` /
    ``checkpoint_every``: in steps (0: only at the end). ``final_model``: "best" (by validation
    Dice) or "last". ``threads``: CPU threads (None: all cores); ``device``: auto/cpu/cuda/mps.
    ``architecture``: overrides of :data:`mmreg.networks.DEFAULT_ARCHITECTURE`. ``base_model``:
    start from trained weights instead of a fresh network (fine-tuning): a model name or folder of
    this method (see :func:`mmreg.models.resolve_model`), or a ``.pt`` file (a model's weights, a
    run's ``best.pt`` or a checkpoint); the architecture must match. Relative paths are taken from
    the config file's folder.
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
    smoothness: float = 1.0
    diffeomorphic: bool = True
    integration_steps: int = 7
    mi_bins: int = 32
    mi_max_voxels: int = 100_000
    mi_blur_voxels: float = 0.0
    validation_every: int = 100
    checkpoint_every: int = 100
    final_model: str = "best"
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    architecture: dict = field(default_factory=dict)
    base_model: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict:
        """JSON/TOML-friendly dict (nested sections as dicts)."""
        return dataclasses.asdict(self)

    def output_dir(self) -> Path:
        """The model folder: ``output`` or ``user_model_root()/<method>/<name>``."""
        from .models import user_model_root  # noqa: PLC0415
        return Path(self.output).expanduser() if self.output else user_model_root() / self.method / self.name

    def full_architecture(self) -> dict:
        """The network description: the default architecture with this config's overrides."""
        from .networks import DEFAULT_ARCHITECTURE  # noqa: PLC0415
        return dict(DEFAULT_ARCHITECTURE, **self.architecture)


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
        if key in ("data", "augment") and cls is TrainConfig:
            continue
        values[key] = _check_type(where, key, value, getattr(defaults, key))
    return values


def config_from_dict(table: dict) -> TrainConfig:
    """A validated :class:`TrainConfig` from a dict (the parsed TOML); :class:`InputError` on any problem."""
    if not isinstance(table, dict):
        raise InputError("The training config must be a TOML table.")
    top = _fill(TrainConfig, table, "")
    for section in ("data", "augment"):
        if section in table and not isinstance(table[section], dict):
            raise InputError(f"[{section}] must be a table in the training config.")
    data = DataConfig(**_fill(DataConfig, table.get("data", {}), "data."))
    augment = AugmentConfig(**_fill(AugmentConfig, table.get("augment", {}), "augment."))
    cfg = TrainConfig(**top, data=data, augment=augment)
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """Check value ranges and combinations of a config; :class:`InputError` naming the key and the fix."""
    from .networks import size_multiple  # noqa: PLC0415

    def need(ok, message):
        if not ok:
            raise InputError(f"Training config: {message}")

    need(cfg.method == "mi", f"method '{cfg.method}' cannot be trained by this version; use method = \"mi\".")
    need(bool(cfg.name) and "/" not in cfg.name and "\\" not in cfg.name and cfg.name not in (".", ".."),
         f"name must be a plain folder name, got {cfg.name!r}.")
    need(cfg.spacing_mm > 0, f"spacing_mm must be > 0 mm, got {cfg.spacing_mm}.")
    need(cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}.")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}.")
    need(cfg.learning_rate > 0, f"learning_rate must be > 0, got {cfg.learning_rate}.")
    need(cfg.smoothness >= 0, f"smoothness must be >= 0, got {cfg.smoothness}.")
    need(cfg.integration_steps >= 1, f"integration_steps must be >= 1, got {cfg.integration_steps}.")
    need(cfg.mi_bins >= 2, f"mi_bins must be >= 2, got {cfg.mi_bins}.")
    need(cfg.mi_max_voxels >= 100, f"mi_max_voxels must be >= 100, got {cfg.mi_max_voxels}.")
    need(cfg.mi_blur_voxels >= 0, f"mi_blur_voxels must be >= 0 (0: no smoothing), got {cfg.mi_blur_voxels}.")
    need(cfg.validation_every >= 0, f"validation_every must be >= 0 (0: only at the end), got {cfg.validation_every}.")
    need(cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0: only at the end), got {cfg.checkpoint_every}.")
    need(cfg.final_model in ("best", "last"), f"final_model must be \"best\" or \"last\", got {cfg.final_model!r}.")
    need(cfg.threads is None or cfg.threads >= 1, f"threads must be >= 1, got {cfg.threads}.")
    need(cfg.device.split(":")[0] in ("auto", "cpu", "cuda", "mps"),
         f"device must be auto, cpu, cuda or mps, got {cfg.device!r}.")
    arch = cfg.full_architecture()
    need(arch.get("kind") == "voxelmorph_unet", f"architecture.kind must be \"voxelmorph_unet\", got {arch.get('kind')!r}.")
    need(int(arch.get("spatial_dims", 3)) == 3, "architecture.spatial_dims must be 3 (the training grid is 3-D).")
    ch = arch.get("channels")
    need(isinstance(ch, list) and len(ch) >= 2 and len(ch) % 2 == 0 and all(isinstance(c, int) and c > 0 for c in ch),
         f"architecture.channels must be an even-length list of positive integers, got {ch!r}.")
    fc = arch.get("final_conv_channels")
    need(isinstance(fc, list) and len(fc) >= 1 and all(isinstance(c, int) and c > 0 for c in fc),
         f"architecture.final_conv_channels must be a non-empty list of positive integers, got {fc!r}.")
    multiple = size_multiple(arch)
    if cfg.grid_size:
        need(len(cfg.grid_size) == 3 and all(isinstance(s, int) and s > 0 and s % multiple == 0 for s in cfg.grid_size),
             f"grid_size must be 3 positive multiples of {multiple} (ITK x, y, z order) or empty, got {cfg.grid_size}.")
    src = cfg.data.sources
    unknown = sorted(set(src) - set(SOURCES))
    need(not unknown, f"data.sources has unknown source(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}.")
    need(all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in src.values())
         and sum(src.values()) > 0, f"data.sources weights must be numbers >= 0 with a positive sum, got {src}.")
    bad = [m for m in cfg.data.template_modalities if m not in ("T2", "PD")]
    need(not bad, f"data.template_modalities may hold \"T2\" and \"PD\", got {cfg.data.template_modalities}.")
    overlap = set(cfg.data.validation_subjects) & set(cfg.data.training_subjects)
    need(not overlap, f"subject(s) {', '.join(sorted(overlap))} are in both data.training_subjects and "
                      "data.validation_subjects; validation must use held-out subjects.")
    a = cfg.augment
    for key in ("deformation_max_mm", "rotation_deg", "scale", "translation_mm", "bias_strength", "noise_std",
                "synth_blur_voxels"):
        need(getattr(a, key) >= 0, f"augment.{key} must be >= 0, got {getattr(a, key)}.")
    need(a.deformation_control_mm > 0, f"augment.deformation_control_mm must be > 0, got {a.deformation_control_mm}.")
    need(a.scale < 0.5, f"augment.scale is a relative jitter (e.g. 0.05), got {a.scale}.")


def load_config(path: str | os.PathLike, **overrides) -> TrainConfig:
    """Read and validate a TOML training config; keyword ``overrides`` (not None) replace top-level keys.

    Relative paths in ``output``, ``data.root`` and ``data.cache_dir`` are taken relative to the
    config file's folder.
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
            if key == "data_root":
                table.setdefault("data", {})["root"] = str(value)
            else:
                table[key] = value
    cfg = config_from_dict(table)
    base = path.resolve().parent
    if cfg.output and not Path(cfg.output).expanduser().is_absolute():
        cfg.output = str(base / cfg.output)
    if cfg.base_model and cfg.base_model.endswith(".pt") and not Path(cfg.base_model).expanduser().is_absolute():
        cfg.base_model = str(base / cfg.base_model)
    for key in ("root", "cache_dir"):
        value = getattr(cfg.data, key)
        if value and not Path(value).expanduser().is_absolute():
            setattr(cfg.data, key, str(base / value))
    return cfg


# ----------------------------------------------------------------------------- data on the training grid


@dataclass
class Subject:
    """One training/validation subject on the training grid: ``image`` float32 (z, y, x) in [0, 1]
    (a T1), ``labels`` integer (z, y, x) label map (0 = background) or None."""

    id: str
    image: np.ndarray
    labels: np.ndarray | None = None


@dataclass
class TrainingData:
    """Every volume of a training run, on ONE grid (numpy arrays in (z, y, x) order).

    ``grid``: the training grid (its spacing is the model's network spacing). ``training`` /
    ``validation``: subjects (T1 + labels). ``templates``: modality name -> image already aligned
    with the grid (e.g. avg152 "T2", "PD") for the ``t1_template`` source. ``info``: where the data
    came from (goes into the model card). Build from the shared data with :func:`prepare_ixi`, or
    directly from in-memory arrays (tests, other anatomies).
    """

    grid: NetworkGrid
    training: list
    validation: list = field(default_factory=list)
    templates: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def check(self, cfg: TrainConfig) -> dict:
        """Validate against ``cfg`` and return the normalised source weights (only sources with data)."""
        shape = self.grid.spatial_shape
        for s in self.training + self.validation:
            if s.image.shape != shape or (s.labels is not None and s.labels.shape != shape):
                raise InputError(f"Subject {s.id} is not on the training grid {shape} (got {s.image.shape}).")
        for name, img in self.templates.items():
            if img.shape != shape:
                raise InputError(f"Template {name} is not on the training grid {shape} (got {img.shape}).")
        weights = {k: float(v) for k, v in cfg.data.sources.items() if v > 0}
        if not self.training:
            raise InputError("No training subjects: check data.training_subjects / data.validation_subjects.")
        for key in ("t1_t1", "t1_t1_remap"):
            if key in weights and len(self.training) < 2:
                raise InputError(f"data.sources.{key} needs at least 2 training subjects.")
        if "t1_template" in weights and not self.templates:
            raise InputError("data.sources.t1_template needs the avg152 T2/PD templates (none were prepared).")
        if "t1_synth" in weights and not any(s.labels is not None for s in self.training):
            raise InputError("data.sources.t1_synth needs label maps of the training subjects.")
        total = sum(weights.values())
        return {k: v / total for k, v in weights.items()}


def _cache_root(cfg: TrainConfig) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    env = os.environ.get("MMREG_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "mmreg") / "train"


def template_grid(template: sitk.Image, spacing_mm: float, multiple: int, grid_size=None) -> NetworkGrid:
    """The training grid: the template's extent at ``spacing_mm`` (sizes padded to ``multiple``),
    or a grid of ``grid_size`` (ITK x, y, z) voxels centred on the template."""
    grid = NetworkGrid.for_image(template, spacing=float(spacing_mm), multiple=int(multiple))
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
    normalised and resampled onto the grid (same world space). Subjects are split per
    ``cfg.data``; the affine of each subject is recorded in ``info``.
    """
    from .affine import affine_prealign  # noqa: PLC0415
    from .bench.cases import SPM_DIR, data_dir, ixi_subjects  # noqa: PLC0415
    from .intensity import normalize_intensity  # noqa: PLC0415
    from .networks import size_multiple  # noqa: PLC0415

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
    multiple = size_multiple(cfg.full_architecture())
    grid = template_grid(template, cfg.spacing_mm, multiple, cfg.grid_size)

    key = hashlib.sha1(json.dumps([PREP_VERSION, grid.size, grid.spacing, grid.origin, grid.direction]).encode())
    cache = _cache_root(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    template_norm, _ = normalize_intensity(template, "MR")

    def cached(name: str, files, make):
        h = key.copy()
        for f in files:
            st = Path(f).stat()
            h.update(f"{Path(f).name}:{st.st_size}:{int(st.st_mtime)}".encode())
        path = cache / f"{name}_{h.hexdigest()[:12]}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        arrays = make()
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        return arrays

    def to_grid(img, tx=None, interp=sitk.sitkLinear):
        return sitk.GetArrayFromImage(grid.resample(img, tx, interp)).reshape(grid.spatial_shape)

    info = {"source": "shared data (ixi10_T1_dlmuse, spm12_mni_T1T2PD_labels)", "template": "avg152T1",
            "grid": {"size": list(grid.size), "spacing_mm": list(grid.spacing)}, "affine_mattes_mi": {}}
    templates = {}
    for mod in cfg.data.template_modalities:
        p = root / SPM_DIR / f"canonical_avg152{mod}.nii.gz"
        if not p.is_file():
            raise InputError(f"Template '{p}' is missing; drop {mod} from data.template_modalities or fix the data folder.")

        def make_template(p=p):
            img, _ = normalize_intensity(sitk.ReadImage(str(p), sitk.sitkFloat32), "MR")
            return {"image": to_grid(img).astype(np.float32)}
        templates[mod] = cached(f"avg152{mod}", [p], make_template)["image"]

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
    return TrainingData(grid, train, val, templates, info)


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


class PairSampler:
    """Draws augmented training pairs from :class:`TrainingData` per the config (all randomness from
    one ``numpy.random.Generator``, so a run is reproducible and resumable from its state)."""

    def __init__(self, data: TrainingData, cfg: TrainConfig, weights: dict, device):
        self.data, self.cfg, self.device = data, cfg, device
        self.names = sorted(weights)
        self.p = np.array([weights[n] for n in self.names])
        self.spacing = float(np.mean(data.grid.spacing))
        self.labelled = [s for s in data.training if s.labels is not None]

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None].to(self.device)

    def raw_pair(self, rng: np.random.Generator) -> tuple:
        """(fixed, moving, source name) before augmentation, each ``(1, 1, *spatial)``."""
        source = self.names[int(rng.choice(len(self.names), p=self.p))]
        subjects = self.data.training
        i = int(rng.integers(len(subjects)))
        fixed = self._tensor(subjects[i].image)
        if source in ("t1_t1", "t1_t1_remap"):
            j = int(rng.integers(len(subjects) - 1))
            j = j + 1 if j >= i else j
            moving = self._tensor(subjects[j].image)
            if source == "t1_t1_remap":
                moving = remap_intensities(moving, rng)
        elif source == "t1_template":
            names = sorted(self.data.templates)
            moving = self._tensor(self.data.templates[names[int(rng.integers(len(names)))]])
        elif source == "t1_self":
            moving = fixed
            if rng.uniform() < 0.5:
                moving = remap_intensities(fixed, rng)
        else:
            s = self.labelled[int(rng.integers(len(self.labelled)))]
            moving = synthesise_contrast(s.labels, rng, self.cfg.augment.synth_blur_voxels, self.device)
            if subjects[i].labels is not None:  # label maps cover the brain only: compare brain with brain
                fixed = fixed * self._tensor(brain_mask(subjects[i].labels))
        return fixed, moving, source

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

    def batch(self, rng: np.random.Generator) -> tuple:
        """``(fixed, moving, sources)``: ``(B, 1, *spatial)`` tensors of ``cfg.batch_size`` augmented pairs."""
        fs, ms, srcs = [], [], []
        for _ in range(self.cfg.batch_size):
            f, m, s = self.raw_pair(rng)
            f, m = self.augment(f, m, rng)
            fs.append(f)
            ms.append(m)
            srcs.append(s)
        return torch.cat(fs), torch.cat(ms), srcs


# ----------------------------------------------------------------------------- validation


def validation_pairs(data: TrainingData, seed: int = 12345, max_subject_pairs: int = 4, synth: bool = True,
                     remap: bool = False) -> list:
    """Fixed validation pairs among the held-out subjects with labels: for the first
    ``max_subject_pairs`` ordered pairs (a <- b), a mono pair (T1_a, T1_b) and a multi-modal pair
    (T1_a inside its labelled brain, a contrast synthesised from b's labels with a fixed seed). With a single held-out
    subject, b runs over the training subjects instead (the fixed image stays unseen). ``synth``
    False: the mono pairs only. ``remap``: also (T1_a, T1_b through a random intensity curve with a
    fixed seed, :func:`remap_intensities`). Dicts with name, fixed,
    moving (``(1, 1, *spatial)`` CPU tensors), fixed_labels, moving_labels (numpy)."""
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


def _dice_by_kind(result: dict) -> dict:
    """Mean Dice per kind of validation pair (the word after the pair's ids: "T1", "synth", "remapped")."""
    groups: dict = {}
    for name, entry in result.get("pairs", {}).items():
        groups.setdefault(name.split(" ", 1)[-1], []).append(entry["dice"])
    return {k: float(np.nanmean(v)) for k, v in groups.items()}


def validate(network, pairs: list, cfg: TrainConfig, device, with_identity: bool = False) -> dict:
    """Mean Dice of the warped moving labels (nearest neighbour) vs the fixed labels after the
    network (and, with ``with_identity``, before it), and the mean folding %, over ``pairs``."""
    from .spatial import integrate_velocity, warp  # noqa: PLC0415
    if not pairs:
        return {}
    was_training = network.training
    network.eval()
    per, after, before, folds = {}, [], [], []
    with torch.inference_mode():
        for p in pairs:
            fixed, moving = p["fixed"].to(device), p["moving"].to(device)
            field = network(torch.cat([fixed, moving], dim=1))
            ddf = integrate_velocity(field, cfg.integration_steps) if cfg.diffeomorphic else field
            lab = torch.from_numpy(p["moving_labels"].astype(np.float32))[None, None].to(device)
            warped = warp(lab, ddf, mode="nearest", padding_mode="zeros")[0, 0].round().cpu().numpy().astype(np.int64)
            d = _dice(p["fixed_labels"], warped)
            after.append(d)
            folds.append(_folding_percent(ddf))
            entry = {"dice": d, "folding_percent": folds[-1]}
            if with_identity:
                entry["dice_identity"] = _dice(p["fixed_labels"], p["moving_labels"])
                before.append(entry["dice_identity"])
            per[p["name"]] = entry
    network.train(was_training)
    out = {"mean_dice": float(np.nanmean(after)), "folding_percent": float(np.mean(folds)), "pairs": per}
    if with_identity:
        out["mean_dice_identity"] = float(np.nanmean(before))
    return out


# ----------------------------------------------------------------------------- checkpoints


def _rng_state(rng: np.random.Generator, device) -> dict:
    state = {"numpy": json.dumps(rng.bit_generator.state), "torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def _set_rng_state(rng: np.random.Generator, state: dict, device) -> None:
    rng.bit_generator.state = json.loads(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def load_base_weights(cfg: TrainConfig) -> tuple:
    """``(state_dict, description)`` of ``cfg.base_model``: a ``.pt`` file (plain weights, or a
    checkpoint's ``network``) or a model of ``cfg.method`` (name or folder; checksum verified by
    :func:`mmreg.models.load_model`). :class:`InputError` when it is missing or unreadable."""
    from .models import load_model  # noqa: PLC0415
    from .networks import registration_unet  # noqa: PLC0415
    ref = str(cfg.base_model)
    if ref.endswith(".pt"):
        path = Path(ref).expanduser()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise InputError(f"base_model '{path}' does not exist; give a model name, a model folder or a .pt file.") from None
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken file
            raise InputError(f"base_model '{path}' cannot be read ({type(exc).__name__}: {exc}).") from None
        state = state.get("network", state) if isinstance(state, dict) else state
        return state, str(path)
    network, card = load_model(cfg.method, ref, registration_unet, "cpu")
    return network.state_dict(), f"{card.name} (sha256 {card.sha256})"


def save_checkpoint(path: Path, network, optimizer, step: int, rng, cfg: TrainConfig, history: dict, device) -> Path:
    """Write a checkpoint (network + optimiser state, step, RNG states, config, history) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": 1, "step": int(step), "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
                "optimizer": optimizer.state_dict(), "rng": _rng_state(rng, device),
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
    diff = sorted(k for k in set(now) | set(saved) if k not in _RESUMABLE and now.get(k) != saved.get(k))
    if diff:
        raise InputError(f"The config differs from the one of the checkpoint '{path}' in: {', '.join(diff)}. Resume "
                         "with the same config (only steps, threads, device, validation_every, checkpoint_every may "
                         "change), or start a new run in another output folder.")


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What :func:`train` returns: ``model_dir`` (folder with model.pt/model.json), ``card`` (the
    :class:`mmreg.models.ModelCard`), ``history`` (losses, s/step, validation), ``seconds`` (wall
    time of this invocation) and ``final_step``."""

    model_dir: Path
    card: object
    history: dict
    seconds: float
    final_step: int


def train(cfg: TrainConfig, data: TrainingData | None = None, *, resume: bool = False,
          progress: ProgressCallback | None = None, log=None) -> TrainResult:
    """Train a model per ``cfg``; returns a :class:`TrainResult`.

    ``data``: prepared volumes on the training grid (None: :func:`prepare_ixi` from the shared
    data). ``resume``: continue from ``<output>/training/last.pt`` (same config except steps and
    the run settings). ``progress(fraction, message)`` may raise :class:`CancelledError` (or return
    False) to stop: the current state is checkpointed first, then the error propagates (also on
    Ctrl-C). ``log``: optional callable taking a line of text (validation results, throughput).
    """
    from .device import choose_device, set_threads  # noqa: PLC0415
    from .methods.mi import training_loss  # noqa: PLC0415
    from .models import ModelCard, save_model  # noqa: PLC0415
    from .networks import parameter_count, registration_unet, size_multiple  # noqa: PLC0415

    t_start = time.perf_counter()
    validate_config(cfg)
    say = log or (lambda line: None)
    prog = Progress(progress)
    threads = set_threads(cfg.threads)
    device = choose_device(cfg.device)
    out_dir = cfg.output_dir()
    ck_dir = out_dir / CHECKPOINT_DIR
    last_path, best_path = ck_dir / "last.pt", ck_dir / "best.pt"
    if not resume and last_path.exists():
        raise InputError(f"'{out_dir}' already holds a training run ({last_path}); pass --resume to continue it, or "
                         "choose another --output / name.")
    arch = cfg.full_architecture()
    multiple = size_multiple(arch)
    if data is None:
        data = prepare_ixi(cfg, prog.sub(0.0, 0.05))
    if any(s % multiple for s in data.grid.spatial_shape):
        raise InputError(f"The training grid {data.grid.spatial_shape} is not a multiple of {multiple}.")
    weights = data.check(cfg)

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    network = registration_unet(arch).to(device)
    network.train()
    base_description = None
    if cfg.base_model and not resume:
        state, base_description = load_base_weights(cfg)
        try:
            network.load_state_dict({k: v.to(device) for k, v in state.items()})
        except RuntimeError as exc:
            raise InputError(f"base_model {base_description} does not fit this config's architecture ({exc}); use the "
                             "architecture it was trained with.") from None
        say(f"starting from base model {base_description}")
    optimizer = torch.optim.Adam(network.parameters(), lr=cfg.learning_rate)
    history = {"loss": [], "mi": [], "smoothness": [], "source": [], "seconds_per_step": [], "validation": [],
               "best": None, "wall_seconds": 0.0, "base_model": base_description, "skipped_steps": 0}
    step = 0
    if resume:
        ck = load_checkpoint(last_path)
        _check_resume(cfg, ck["config"], last_path)
        network.load_state_dict(ck["network"])
        optimizer.load_state_dict(ck["optimizer"])
        _set_rng_state(rng, ck["rng"], device)
        history, step = ck["history"], int(ck["step"])
        say(f"resumed from {last_path} at step {step}")
        if step >= cfg.steps:
            say(f"the checkpoint is already at step {step} >= steps = {cfg.steps}; writing the model")
    wall_before = float(history.get("wall_seconds", 0.0))
    sampler = PairSampler(data, cfg, weights, device)
    val_pairs = validation_pairs(data, synth="t1_synth" in weights,  # validate on the kinds of pairs trained
                                 remap="t1_t1_remap" in weights)
    def record_validation(v: dict) -> str:
        """Append ``v`` (from :func:`validate`) to the history at this step; returns the per-kind
        Dice as text for the log (empty with one kind of pair)."""
        kinds = _dice_by_kind(v)
        history["validation"].append({"step": step, "mean_dice": v["mean_dice"], "folding_percent": v["folding_percent"],
                                      "dice_by_kind": kinds})
        return " (" + ", ".join(f"{k} {d:.4f}" for k, d in kinds.items()) + ")" if len(kinds) > 1 else ""

    if val_pairs and not history["validation"]:
        v = validate(network, val_pairs, cfg, device, with_identity=True)
        history["identity_dice"] = v["mean_dice_identity"]
        kinds = record_validation(v)
        say(f"validation at step {step}: mean Dice {v['mean_dice_identity']:.4f} (identity) / {v['mean_dice']:.4f} "
            f"(network), folding {v['folding_percent']:.3f} %{kinds}")

    def checkpoint():
        history["wall_seconds"] = wall_before + time.perf_counter() - t_start
        save_checkpoint(last_path, network, optimizer, step, rng, cfg, history, device)

    def run_validation():
        v = validate(network, val_pairs, cfg, device)
        kinds = record_validation(v)
        best = history.get("best")
        if best is None or v["mean_dice"] > best["mean_dice"]:
            history["best"] = {"step": step, "mean_dice": v["mean_dice"], "folding_percent": v["folding_percent"]}
            best_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: t.detach().cpu() for k, t in network.state_dict().items()}, best_path.with_suffix(".tmp"))
            os.replace(best_path.with_suffix(".tmp"), best_path)
        say(f"validation at step {step}: mean Dice {v['mean_dice']:.4f} (identity {history.get('identity_dice', float('nan')):.4f}), "
            f"folding {v['folding_percent']:.3f} %; best {history['best']['mean_dice']:.4f} at step {history['best']['step']}"
            f"{kinds}")

    train_prog = prog.sub(0.05, 0.98)
    start_step = step
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            fixed, moving, sources = sampler.batch(rng)
            field = network(torch.cat([fixed, moving], dim=1))
            loss, parts = training_loss(fixed, moving, field, diffeomorphic=cfg.diffeomorphic,
                                        integration_steps=cfg.integration_steps, smoothness=cfg.smoothness,
                                        mi_bins=cfg.mi_bins, mi_max_voxels=cfg.mi_max_voxels,
                                        mi_blur_voxels=cfg.mi_blur_voxels)
            optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                optimizer.step()
            else:  # a non-finite loss would poison the weights: skip this pair, count it
                history["skipped_steps"] = history.get("skipped_steps", 0) + 1
                say(f"step {step + 1}: non-finite loss, step skipped ({history['skipped_steps']} so far)")
            step += 1
            dt = time.perf_counter() - t0
            history["loss"].append(float(loss.detach()))
            history["mi"].append(parts["mi"])
            history["smoothness"].append(parts["smoothness"])
            history["source"].append(",".join(sources))
            history["seconds_per_step"].append(dt)
            if cfg.validation_every and step % cfg.validation_every == 0 and step < cfg.steps and val_pairs:
                run_validation()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint()
            recent = history["seconds_per_step"][-20:]
            train_prog((step - start_step) / max(cfg.steps - start_step, 1),
                       f"step {step}/{cfg.steps} loss {history['loss'][-1]:.4f} {np.median(recent):.2f} s/step")
    except (CancelledError, KeyboardInterrupt):
        checkpoint()
        say(f"stopped at step {step}; checkpoint {last_path} (continue with --resume)")
        raise
    if val_pairs and (not history["validation"] or history["validation"][-1]["step"] != step):
        run_validation()
    checkpoint()

    final_state = network.state_dict()
    chosen = "last"
    if cfg.final_model == "best" and history.get("best") and best_path.is_file():
        final_state = torch.load(best_path, map_location="cpu", weights_only=True)
        chosen = f"best (step {history['best']['step']})"
    final_net = registration_unet(arch)
    final_net.load_state_dict({k: v.cpu() for k, v in final_state.items()})
    sps = history["seconds_per_step"]
    wall = wall_before + time.perf_counter() - t_start
    history["wall_seconds"] = wall
    description = cfg.description or (
        f"mi network trained with `mmreg train` ({step} steps, {cfg.spacing_mm:g} mm grid; "
        f"sources {', '.join(f'{k} {v:.2f}' for k, v in weights.items())}).")
    card = ModelCard(
        name=cfg.name, method=cfg.method, architecture=arch, spacing_mm=float(np.mean(data.grid.spacing)),
        multiple=multiple, diffeomorphic=cfg.diffeomorphic, integration_steps=cfg.integration_steps,
        description=description,
        training={
            "command": "mmreg train", "config": cfg.to_dict(), "data": data.info, "source_weights": weights,
            "steps": step, "weights": chosen, "base_model": history.get("base_model"),
            "skipped_steps": history.get("skipped_steps", 0), "parameters": parameter_count(final_net),
            "grid_size_xyz": list(data.grid.size), "device": str(device), "threads": threads,
            "wall_time_s": round(wall, 1),
            "seconds_per_step_median": float(np.median(sps)) if sps else None,
            "final_loss_mean_last_20": float(np.mean(history["loss"][-20:])) if history["loss"] else None,
            "validation": {"identity_mean_dice": history.get("identity_dice"), "history": history["validation"],
                           "best": history.get("best"),
                           "pairs": [p["name"] for p in val_pairs]},
        })
    model_dir = save_model(out_dir, final_net, card)
    (ck_dir / "history.json").write_text(json.dumps(history))
    prog(1.0, "model written")
    say(f"model written to {model_dir} ({chosen} weights); wall time {wall:.1f} s")
    return TrainResult(model_dir, card, history, time.perf_counter() - t_start, step)
