"""Joint registration-segmentation: train a segmentation network on a few annotated images plus labels
propagated by registration to many unannotated ones (the FMIRNet paper's label-propagation use).

Workflow (:func:`train_joint_segmenter`): every annotated image (the atlases) is registered to every
unannotated image (:func:`mmreg.propagation.propagate_labels`, by default with the ``multiscale``
method), the atlas labels are warped onto it, and a MONAI U-Net is trained on the annotated images
with their own labels together with the unannotated images with the propagated labels.
:func:`joint_segmentation_experiment` measures what the propagated labels bring: the same network
trained with and without them, scored by Dice on held-out annotated images.

Geometry: each image is segmented on its own isotropic grid (``spacing_mm``, sizes padded to the
U-Net's multiple, :class:`mmreg.grid.NetworkGrid`, same direction and centre as the image), and the
class scores are resampled (linear) back onto the image's grid before the argmax, so a label map comes
back on exactly the grid of the image it segments (LPS physical space).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError, WeightsError
from .grid import NetworkGrid
from .image import ImageLike, read_image, read_labels, write_image
from .intensity import normalize_intensity
from .progress import Progress, ProgressCallback

#: The segmentation U-Net (MONAI UNet with residual units): channels per level and strides.
DEFAULT_SEGMENTER = {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1}
WEIGHTS = "segmenter.pt"
CARD = "segmenter.json"


def build_segmenter(n_classes: int, architecture: dict | None = None) -> torch.nn.Module:
    """A MONAI 3-D U-Net from 1 image channel to ``n_classes`` scores (class 0 = background)."""
    from monai.networks.nets import UNet  # noqa: PLC0415
    arch = dict(DEFAULT_SEGMENTER, **(architecture or {}))
    return UNet(spatial_dims=3, in_channels=1, out_channels=int(n_classes), channels=tuple(arch["channels"]),
                strides=tuple(arch["strides"]), num_res_units=int(arch["num_res_units"]))


def _multiple(architecture: dict | None = None) -> int:
    arch = dict(DEFAULT_SEGMENTER, **(architecture or {}))
    return int(np.prod(arch["strides"]))


def choose_labels(label_map: ImageLike, spec) -> list:
    """Label ids to learn: a list of ids as given, ``"all"`` (every nonzero id of ``label_map``) or
    ``"largest:N"`` (the N largest by voxel count)."""
    if isinstance(spec, (list, tuple)):
        ids = [int(v) for v in spec]
        if not ids or any(v <= 0 for v in ids):
            raise InputError(f"Label ids must be positive integers, got {spec}.")
        return ids
    arr = sitk.GetArrayFromImage(read_labels(label_map, "Label map"))  # a copy: the image is a temporary
    values, counts = np.unique(arr[arr > 0], return_counts=True)
    if spec == "all":
        return [int(v) for v in values]
    if isinstance(spec, str) and spec.startswith("largest:"):
        n = int(spec.split(":", 1)[1])
        order = np.argsort(-counts, kind="stable")[:n]
        return sorted(int(values[i]) for i in order)
    raise InputError(f"Labels must be a list of ids, \"all\" or \"largest:N\", got {spec!r}.")


@dataclass
class SegSample:
    """One training or test image on its segmentation grid: ``image`` ``(1, 1, *spatial)`` in [0, 1],
    ``target`` ``(1, 1, *spatial)`` class indices (0 = background), ``name``."""

    name: str
    image: torch.Tensor
    target: torch.Tensor | None
    grid: NetworkGrid


def _classes(labels: sitk.Image, label_ids: list) -> np.ndarray:
    arr = sitk.GetArrayFromImage(labels)
    out = np.zeros(arr.shape, np.int64)
    for k, v in enumerate(label_ids, start=1):
        out[arr == v] = k
    return out


def make_sample(image: ImageLike, labels: ImageLike | None, label_ids: list, spacing_mm: float,
                name: str = "", architecture: dict | None = None) -> SegSample:
    """``image`` (normalised to [0, 1]) and ``labels`` (ids -> class indices, others -> 0) on the image's
    isotropic segmentation grid (``spacing_mm``; nearest neighbour for the labels)."""
    img = read_image(image, "Image")
    grid = NetworkGrid.for_image(img, spacing=spacing_mm, multiple=_multiple(architecture))
    norm, _ = normalize_intensity(img, "auto")
    tensor = grid.image_to_tensor(grid.resample(norm))
    target = None
    if labels is not None:
        lab = read_labels(labels, "Label map")
        classes = sitk.GetImageFromArray(_classes(lab, label_ids).astype(np.int16))
        classes.CopyInformation(lab)
        on_grid = sitk.Resample(classes, grid.reference_image(sitk.sitkInt16), sitk.Transform(),
                                sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
        target = torch.from_numpy(sitk.GetArrayFromImage(on_grid).astype(np.int64).reshape(grid.spatial_shape))[None, None]
    return SegSample(name or (str(image) if not isinstance(image, sitk.Image) else "<image>"), tensor, target, grid)


def train_segmenter(samples: list, n_classes: int, *, steps: int = 400, learning_rate: float = 1e-3, seed: int = 0,
                    architecture: dict | None = None, threads: int | None = None,
                    progress: ProgressCallback | None = None, log=None) -> tuple:
    """Train the U-Net on ``samples`` (:class:`SegSample` with targets); returns ``(network, history)``.

    One image per step, cycling through a seeded shuffle; Dice + cross-entropy loss (MONAI DiceCELoss,
    softmax, background included), Adam, random flips along each axis and a small intensity gamma as
    augmentation. ``history``: ``loss`` per step and ``seconds``.
    """
    from monai.losses import DiceCELoss  # noqa: PLC0415
    from .device import set_threads  # noqa: PLC0415
    if not samples or any(s.target is None for s in samples):
        raise InputError("train_segmenter needs at least one image with labels.")
    if threads:
        set_threads(threads)
    prog = Progress(progress)
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = build_segmenter(n_classes, architecture)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    history = {"loss": []}
    t0 = time.perf_counter()
    order: list = []
    for step in range(steps):
        if not order:
            order = list(gen.permutation(len(samples)))
        s = samples[order.pop()]
        x, y = s.image, s.target
        for axis in range(2, 5):
            if gen.random() < 0.5:
                x, y = x.flip(axis), y.flip(axis)
        x = x.clamp(0, 1) ** float(np.exp(gen.uniform(-0.2, 0.2)))
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["loss"].append(float(loss.detach()))
        prog((step + 1) / steps, f"segmentation step {step + 1}/{steps} loss {history['loss'][-1]:.4f}")
        if log and ((step + 1) % 100 == 0 or step + 1 == steps):
            log(f"segmentation step {step + 1}/{steps}: loss {np.mean(history['loss'][-20:]):.4f}")
    history["seconds"] = time.perf_counter() - t0
    net.eval()
    return net, history


def segment(network: torch.nn.Module, image: ImageLike, label_ids: list, spacing_mm: float,
            architecture: dict | None = None) -> sitk.Image:
    """Label map of ``image`` on its own grid (ids from ``label_ids``, 0 = background): the U-Net on the
    image's segmentation grid, class scores resampled linearly onto the image grid, then argmax."""
    img = read_image(image, "Image")
    sample = make_sample(img, None, label_ids, spacing_mm, architecture=architecture)
    with torch.inference_mode():
        scores = torch.softmax(network(sample.image), dim=1)[0]
    planes = []
    for k in range(scores.shape[0]):
        on_img = sitk.Resample(sample.grid.tensor_to_image(scores[k]), img, sitk.Transform(), sitk.sitkLinear, 0.0,
                               sitk.sitkFloat32)
        planes.append(sitk.GetArrayFromImage(on_img))
    classes = np.argmax(np.stack(planes), axis=0)
    lut = np.array([0] + [int(v) for v in label_ids], dtype=np.int32)
    out = sitk.GetImageFromArray(lut[classes].astype(np.int16 if max(label_ids) < 32768 else np.int32))
    out.CopyInformation(img)
    return out


def save_segmenter(folder: str | os.PathLike, network: torch.nn.Module, label_ids: list, spacing_mm: float,
                   info: dict | None = None, architecture: dict | None = None) -> Path:
    """Write ``segmenter.pt`` (weights) and ``segmenter.json`` (label ids, spacing in mm, architecture,
    sha256, what it was trained on) into ``folder``; returns the folder."""
    from .models import sha256_of  # noqa: PLC0415
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, folder / WEIGHTS)
    card = {"kind": "mmreg segmentation U-Net", "label_ids": [int(v) for v in label_ids], "spacing_mm": float(spacing_mm),
            "architecture": dict(DEFAULT_SEGMENTER, **(architecture or {})), "sha256": sha256_of(folder / WEIGHTS),
            "normalisation": "mmreg.intensity.normalize_intensity(auto) to [0, 1]", "training": info or {}}
    (folder / CARD).write_text(json.dumps(card, indent=1))
    return folder


def load_segmenter(folder: str | os.PathLike) -> tuple:
    """``(network, card)`` from a folder written by :func:`save_segmenter`; :class:`WeightsError` when the
    files are missing, corrupted or do not fit."""
    from .models import sha256_of  # noqa: PLC0415
    folder = Path(folder)
    card_path, weights = folder / CARD, folder / WEIGHTS
    for path in (card_path, weights):
        if not path.is_file():
            raise WeightsError(f"Segmentation model folder '{folder}' has no {path.name}; train it with "
                               "`mmreg joint-seg` first.")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"'{card_path}' is not valid JSON ({exc}); retrain the segmentation model.") from None
    if card.get("sha256") and sha256_of(weights) != card["sha256"]:
        raise WeightsError(f"'{weights}' does not match the checksum in '{card_path}'; retrain the segmentation model.")
    net = build_segmenter(len(card["label_ids"]) + 1, card.get("architecture"))
    try:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - a broken or foreign weights file
        raise WeightsError(f"'{weights}' does not fit its card ({type(exc).__name__}); retrain the segmentation "
                           "model.") from None
    return net.eval(), card


def dice_per_label(reference: sitk.Image, labels: sitk.Image, label_ids: list) -> dict:
    """Dice per label id of two label maps on the same grid (NaN where a label is in neither)."""
    a, b = sitk.GetArrayViewFromImage(reference), sitk.GetArrayViewFromImage(labels)
    out = {}
    for v in label_ids:
        x, y = a == v, b == v
        s = int(x.sum()) + int(y.sum())
        out[int(v)] = float(2.0 * np.logical_and(x, y).sum() / s) if s else float("nan")
    return out


def propagate_to_unannotated(annotated: list, unannotated: list, *, method: str = "multiscale",
                             model: str | None = None, register_options: dict | None = None,
                             progress: ProgressCallback | None = None, log=None) -> list:
    """The labels of every annotated ``(image, labels)`` propagated to every unannotated image by
    registration (:func:`mmreg.propagation.propagate_labels`; the unannotated image is the fixed one):
    ``[(unannotated image, labels on its grid)]``, atlas-major (all targets of the first annotated
    image, then of the second, ...). ``progress`` may cancel (:class:`~mmreg.errors.CancelledError`)."""
    from .propagation import propagate_labels  # noqa: PLC0415
    if not unannotated:
        raise InputError("No unannotated images to propagate labels to; give some, or train without propagation.")
    prog = Progress(progress)
    propagated = []
    n = len(annotated)
    for k, (atlas, atlas_labels) in enumerate(annotated):
        results = propagate_labels(atlas, atlas_labels, unannotated, method=method, model=model,
                                   progress=prog.sub(k / n, (k + 1) / n), **(register_options or {}))
        propagated.extend((target, r.labels) for target, r in zip(unannotated, results))
        if log:
            log(f"propagated the labels of annotated image {k + 1}/{n} to {len(unannotated)} image(s)")
    return propagated


def train_joint_segmenter(annotated: list, unannotated: list, *, labels="largest:12", method: str = "multiscale",
                          model: str | None = None, spacing_mm: float = 3.0, steps: int = 400, seed: int = 0,
                          use_propagated: bool = True, propagated: list | None = None,
                          register_options: dict | None = None, threads: int | None = None,
                          progress: ProgressCallback | None = None, log=None) -> dict:
    """Train the segmenter on ``annotated`` ``[(image, labels), ...]`` plus, when ``use_propagated``, the
    ``unannotated`` images with labels propagated from every annotated image by ``method``.

    ``labels``: which ids to learn (see :func:`choose_labels`; from the first annotated label map).
    ``propagated``: already propagated ``[(image, labels), ...]`` to reuse (skips the registrations).
    Returns ``{"network", "label_ids", "history", "propagated": [(image, labels)], "propagation_s"}``.
    """
    if not annotated:
        raise InputError("The joint segmentation needs at least one annotated image (image and label map).")
    prog = Progress(progress)
    label_ids = choose_labels(annotated[0][1], labels)
    t0 = time.perf_counter()
    if use_propagated and propagated is None:
        propagated = propagate_to_unannotated(annotated, unannotated, method=method, model=model,
                                              register_options=register_options, progress=prog.sub(0.0, 0.4), log=log)
    prop_s = time.perf_counter() - t0
    pairs = list(annotated) + (list(propagated) if use_propagated else [])
    samples = [make_sample(img, lab, label_ids, spacing_mm, name=f"pair {i}") for i, (img, lab) in enumerate(pairs)]
    net, history = train_segmenter(samples, len(label_ids) + 1, steps=steps, seed=seed, threads=threads,
                                   progress=prog.sub(0.4, 1.0), log=log)
    return {"network": net, "label_ids": label_ids, "history": history, "propagated": propagated or [],
            "propagation_s": prop_s, "spacing_mm": spacing_mm}


def evaluate_segmenter(network, test: list, label_ids: list, spacing_mm: float) -> dict:
    """Mean Dice (over labels, then images) of ``network`` on ``test`` ``[(image, labels), ...]``."""
    per_image = []
    for img, lab in test:
        pred = segment(network, img, label_ids, spacing_mm)
        d = dice_per_label(read_labels(lab, "Label map"), pred, label_ids)
        per_image.append(d)
    means = [float(np.nanmean(list(d.values()))) for d in per_image]
    per_label = {v: float(np.nanmean([d[v] for d in per_image])) for v in label_ids}
    return {"mean_dice": float(np.mean(means)), "per_image": means, "per_label": per_label}


def joint_segmentation_experiment(annotated: list, unannotated: list, test: list, **kwargs) -> dict:
    """Train the segmenter twice (annotated only; annotated + propagated labels), same seed and steps, and
    score both on ``test``; also scores the propagated labels themselves on any unannotated image whose
    true labels are given as ``kwargs["unannotated_truth"]`` (optional). Returns the numbers, plus
    ``"networks"`` (both segmenters) and ``"propagated"`` ``[(image, labels)]`` (for reuse, see
    :func:`train_joint_segmenter`)."""
    truth = kwargs.pop("unannotated_truth", None)
    log = kwargs.get("log")
    with_prop = train_joint_segmenter(annotated, unannotated, use_propagated=True, **kwargs)
    label_ids, spacing = with_prop["label_ids"], with_prop["spacing_mm"]
    kwargs_alone = dict(kwargs)
    kwargs_alone["labels"] = label_ids
    alone = train_joint_segmenter(annotated, [], use_propagated=False, **kwargs_alone)
    out = {"label_ids": label_ids, "spacing_mm": spacing, "steps": len(alone["history"]["loss"]),
           "annotated": len(annotated), "unannotated": len(unannotated), "test": len(test),
           "propagation_s": with_prop["propagation_s"],
           "annotated_only": evaluate_segmenter(alone["network"], test, label_ids, spacing),
           "with_propagated": evaluate_segmenter(with_prop["network"], test, label_ids, spacing),
           "train_s": {"annotated_only": alone["history"]["seconds"], "with_propagated": with_prop["history"]["seconds"]}}
    if truth is not None:
        scores = [float(np.nanmean(list(dice_per_label(read_labels(t, "Label map"), read_labels(lab, "Propagated labels"),
                                                        label_ids).values())))
                  for (target, lab), t in zip(with_prop["propagated"], list(truth) * max(1, len(annotated)))]
        out["propagated_label_dice"] = float(np.mean(scores)) if scores else None
    if log:
        log(f"held-out Dice: annotated only {out['annotated_only']['mean_dice']:.3f}, with propagated labels "
            f"{out['with_propagated']['mean_dice']:.3f}")
    out["networks"] = {"annotated_only": alone["network"], "with_propagated": with_prop["network"]}
    out["propagated"] = with_prop["propagated"]
    return out


def write_segmentation(labels: sitk.Image, path: str | os.PathLike) -> Path:
    """Write a label map produced by :func:`segment` (see :func:`mmreg.image.write_image`)."""
    return write_image(labels, path)
