"""Method ``disentangled``: cross-modality registration through disentangled content and style.

Two networks in one model (:class:`DisentangledNet`):

* the representation disentangling model (RDM, :class:`mmreg.rdm.RepresentationModel`): content
  encoders into a space shared by the two modalities, style encoders and generators, so an image
  of one modality can be rendered in the other (``G_b(E_c_a(x), E_s_b(y))``);
* a registration network ``R`` (the engine's VoxelMorph-style encoder-decoder with skips and
  LeakyReLU, :func:`mmreg.networks.registration_unet`) shared by both directions:
  ``R(cat(fixed, moving))`` is the field that warps ``moving`` onto ``fixed``, whichever modality
  is fixed.

Training has two stages, each ``mmreg train CONFIG`` (``[disentangled] stage``):

1. ``"rdm"`` (:func:`train_rdm`): the RDM from unpaired images of the two domains (domain a = the
   fixed image of each training pair, domain b = the moving one), :func:`mmreg.rdm.rdm_losses`.
2. ``"registration"`` (the shared training loop with :func:`training_loss`): the RDM of
   ``rdm_model`` frozen; for a pair ``(x, y)`` (x in a, y in b) ``phi_1 = R(x, y)`` warps y onto x and
   ``phi_2 = R(y, x)`` warps x onto y; each warped image is translated into the other modality and
   compared with its target by the mean squared difference, the content codes of the warped image and
   of the target by L1, plus the smoothness of both fields: ``smooth(phi_1) + smooth(phi_2) + content
   + 5 MSD`` (the paper's weights; ``smoothness``, ``content_weight``, ``msd_weight``).

Registering needs only ``R`` (one forward pass; optional diffeomorphic integration and instance-
optimisation refinement as every :class:`NetworkRegistration`). The translated moving image (the
warped moving image rendered in the fixed image's modality with the fixed image's style: what the
registration compared) is the extra output ``"translated_moving"`` on the fixed grid. Which modality
the moving image is: option ``moving_domain`` (one of the model's ``domains``; default the second,
e.g. "T2" for a T1 <- T2 pair).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CancelledError, InputError
from ..grid import downsample_image, upsample_field
from ..losses import diffusion_regulariser
from ..networks import DEFAULT_ARCHITECTURE, registration_unet, size_multiple
from ..rdm import DEFAULT_RDM_ARCHITECTURE, Discriminator, RepresentationModel, rdm_losses
from ..spatial import integrate_velocity, warp
from .base import TrainingSpec
from .network_method import NetworkRegistration, middle_of_slab, slab

#: Default architecture of a ``disentangled`` model: the RDM (:data:`mmreg.rdm.DEFAULT_RDM_ARCHITECTURE`) of
#: two named domains and the registration network (:data:`mmreg.networks.DEFAULT_ARCHITECTURE`'s widths).
DEFAULT_DISENTANGLED_ARCHITECTURE = {
    "kind": "disentangled", "spatial_dims": 3, "domains": ["T1", "T2"], "rdm": dict(DEFAULT_RDM_ARCHITECTURE),
    "registration": {"channels": list(DEFAULT_ARCHITECTURE["channels"]),
                     "final_conv_channels": list(DEFAULT_ARCHITECTURE["final_conv_channels"])}}

#: Sources whose pairs have the fixed image in domain a and the moving one in domain b.
_DOMAIN_SOURCES = {"t1_template"}


def _full(architecture: dict | None) -> dict:
    arch = dict(DEFAULT_DISENTANGLED_ARCHITECTURE, **(architecture or {}))
    arch["rdm"] = dict(DEFAULT_RDM_ARCHITECTURE, **(arch.get("rdm") or {}))
    return arch


class DisentangledNet(nn.Module):
    """The RDM (``rdm``) and the registration network (``registration``) of one model.

    ``forward(cat(fixed, moving))`` gives both directions, ``cat(R(fixed, moving), R(moving, fixed))``
    ``(B, 2 ndim, *spatial)`` (voxel units; velocities for diffeomorphic models), for training;
    :meth:`field` the first only (registration)."""

    def __init__(self, architecture: dict | None = None):
        super().__init__()
        arch = _full(architecture)
        nd = int(arch["spatial_dims"])
        self.domains = list(arch["domains"])
        self.rdm = RepresentationModel(arch["rdm"], self.domains, nd)
        self.registration = registration_unet(dict(arch["registration"], kind="voxelmorph_unet", spatial_dims=nd))

    def field(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The field warping ``moving`` onto ``fixed`` (either modality may be fixed)."""
        return self.registration(torch.cat([fixed, moving], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see the class doc
        fixed, moving = x[:, :1], x[:, 1:2]
        return torch.cat([self.field(fixed, moving), self.field(moving, fixed)], dim=1)


def disentangled_network(architecture: dict | None = None) -> DisentangledNet:
    """The untrained :class:`DisentangledNet` a model card's ``architecture`` describes."""
    return DisentangledNet(architecture)


def disentangled_size_multiple(architecture: dict) -> int:
    """Grid sizes must be multiples of this: the larger of the registration network's and the RDM's."""
    arch = _full(architecture)
    return max(size_multiple(arch["registration"]), 2 ** int(arch["rdm"]["downsamplings"]))


def check_architecture(architecture: dict) -> None:
    """:class:`InputError` naming the key when a ``disentangled`` architecture (training config) is unusable."""
    arch = _full(architecture)
    if int(arch.get("spatial_dims", 3)) != 3:
        raise InputError("Training config: architecture.spatial_dims must be 3 (the training grid is 3-D).")
    doms = arch.get("domains")
    if not (isinstance(doms, list) and len(doms) == 2 and all(isinstance(d, str) and d for d in doms) and doms[0] != doms[1]):
        raise InputError(f"Training config: architecture.domains must name two different modalities, got {doms!r}.")
    reg = arch.get("registration") or {}
    ch, fc = reg.get("channels"), reg.get("final_conv_channels")
    if not (isinstance(ch, list) and len(ch) >= 2 and len(ch) % 2 == 0 and all(isinstance(c, int) and c > 0 for c in ch)):
        raise InputError("Training config: architecture.registration.channels must be an even-length list of positive "
                         f"integers, got {ch!r}.")
    if not (isinstance(fc, list) and fc and all(isinstance(c, int) and c > 0 for c in fc)):
        raise InputError("Training config: architecture.registration.final_conv_channels must be a non-empty list of "
                         f"positive integers, got {fc!r}.")
    for key in ("channels", "downsamplings", "residual_blocks", "style_dim", "mlp_channels", "discriminator_channels",
                "discriminator_levels"):
        value = arch["rdm"].get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "residual_blocks" else 1):
            raise InputError(f"Training config: architecture.rdm.{key} must be a positive integer, got {value!r}.")


def check_config(cfg) -> None:
    """:class:`InputError` for settings the two stages cannot train with (see :class:`mmreg.training.DisentangledTrainConfig`)."""
    d = cfg.disentangled
    if d.stage not in ("rdm", "registration"):
        raise InputError(f"Training config: disentangled.stage must be \"rdm\" or \"registration\", got {d.stage!r}.")
    if d.stage == "registration" and not d.rdm_model and not cfg.base_model:
        raise InputError("Training config: the registration stage needs the trained RDM: set disentangled.rdm_model to "
                         "the model of the \"rdm\" stage (name, folder or .pt), or base_model to a full model.")
    for key in ("reconstruction_weight", "latent_weight", "cycle_weight", "adversarial_weight", "content_weight",
                "msd_weight", "paired_weight"):
        if getattr(d, key) < 0:
            raise InputError(f"Training config: disentangled.{key} must be >= 0, got {getattr(d, key)}.")
    if not 0.0 <= d.paired_fraction <= 1.0:
        raise InputError(f"Training config: disentangled.paired_fraction must be in [0, 1], got {d.paired_fraction}.")
    if d.paired_weight > 0 and cfg.data.manifest:
        raise InputError("Training config: disentangled.paired_weight needs the aligned avg152 templates; a manifest's "
                         "pairs are not aligned voxel by voxel. Set paired_weight = 0 to train the RDM unpaired on them.")
    if d.crop_voxels < 0:
        raise InputError(f"Training config: disentangled.crop_voxels must be >= 0 (0: whole volumes), got {d.crop_voxels}.")
    if not cfg.data.manifest:
        other = sorted(k for k, v in cfg.data.sources.items() if v > 0 and k not in _DOMAIN_SOURCES)
        if other:
            raise InputError(f"Training config: method disentangled needs pairs whose fixed image is of domain a and "
                             f"moving image of domain b: data.sources may only weigh {', '.join(sorted(_DOMAIN_SOURCES))} "
                             f"(an IXI T1 fixed, a template of data.template_modalities moving), got {', '.join(other)}.")
        if len(cfg.data.template_modalities) != 1:
            raise InputError("Training config: method disentangled learns two modalities: data.template_modalities must "
                             f"name exactly one (domain b), got {cfg.data.template_modalities}.")


# ----------------------------------------------------------------------------- stage 2: registration loss


def training_loss(fixed: torch.Tensor, moving: torch.Tensor, output: torch.Tensor, rdm: RepresentationModel, *,
                  diffeomorphic: bool = False, integration_steps: int = 7, smoothness: float = 1.0,
                  content_weight: float = 1.0, msd_weight: float = 5.0) -> tuple:
    """The registration-stage objective for a batch: ``(loss, parts)``.

    ``fixed`` ``(B, 1, *spatial)`` in domain a and ``moving`` in domain b, in [0, 1]; ``output``:
    :class:`DisentangledNet` output ``cat(phi_1, phi_2)`` in voxels (``phi_1`` warps moving onto fixed,
    ``phi_2`` fixed onto moving; velocities when ``diffeomorphic``). With the RDM ``rdm`` (frozen):
    ``MSD_1 = mean (G_a(E_c_b(moving o phi_1), E_s_a(fixed)) - fixed)^2``, ``content_1 = mean
    |E_c_b(moving o phi_1) - E_c_a(fixed)|``, and the same for direction 2. Loss = ``smoothness *
    (diffusion(phi_1) + diffusion(phi_2)) + content_weight * (content_1 + content_2) + msd_weight *
    (MSD_1 + MSD_2)``. ``parts``: "msd", "content", "smoothness" (sums over both directions) and
    "similarity" = 1 - msd (higher is better).
    """
    nd = fixed.dim() - 2
    phi1, phi2 = output[:, :nd], output[:, nd:]
    if diffeomorphic:
        phi1, phi2 = integrate_velocity(phi1, integration_steps), integrate_velocity(phi2, integration_steps)
    msd = content = 0.0
    for ddf, source, target, s, t in ((phi1, moving, fixed, 1, 0), (phi2, fixed, moving, 0, 1)):
        warped = warp(source, ddf)
        c_warped = rdm.content[s](warped)
        translated = rdm.generator[t](c_warped, rdm.style[t](target))
        msd = msd + ((translated - target) ** 2).mean()
        content = content + (c_warped - rdm.content[t](target)).abs().mean()
    reg = diffusion_regulariser(phi1) + diffusion_regulariser(phi2)
    loss = float(smoothness) * reg + float(content_weight) * content + float(msd_weight) * msd
    return loss, {"msd": float(msd.detach()), "content": float(content.detach()), "smoothness": float(reg.detach()),
                  "similarity": float(1.0 - msd.detach())}


def _training_objective(fixed, moving, output, cfg, generator=None, network=None) -> tuple:
    """:func:`training_loss` with a :class:`mmreg.training.TrainConfig`'s settings and the network's RDM."""
    return training_loss(fixed, moving, output, network.rdm, diffeomorphic=cfg.diffeomorphic,
                         integration_steps=cfg.integration_steps, smoothness=cfg.smoothness,
                         content_weight=cfg.disentangled.content_weight, msd_weight=cfg.disentangled.msd_weight)


def _training_displacement(output, cfg) -> torch.Tensor:
    """The voxel displacement of ``phi_1`` (moving onto fixed; integrated when the run is diffeomorphic)."""
    phi = output[:, :output.dim() - 2]
    return integrate_velocity(phi, cfg.integration_steps) if cfg.diffeomorphic else phi


def load_rdm_state(reference: str, base: Path | None = None) -> tuple:
    """``(rdm state dict, description)`` of a ``disentangled`` model (name or folder) or a ``.pt`` file of
    its weights (a model's, a run's ``best.pt`` or a checkpoint). :class:`InputError` when it has no RDM."""
    from ..models import load_model  # noqa: PLC0415
    ref = str(reference)
    if ref.endswith(".pt"):
        from ..training import read_weights_file  # noqa: PLC0415
        state, description = read_weights_file(ref, "disentangled.rdm_model"), str(Path(ref).expanduser())
    else:
        network, card = load_model("disentangled", ref, disentangled_network, "cpu")
        state, description = network.state_dict(), f"{card.name} (sha256 {card.sha256})"
    prefix = "rdm."
    rdm = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not rdm:  # an RDM-stage checkpoint holds the training wrapper ("net.rdm.*")
        rdm = {k[len("net.rdm."):]: v for k, v in state.items() if k.startswith("net.rdm.")}
    if not rdm:
        raise InputError(f"disentangled.rdm_model {description} holds no representation model (no rdm.* weights).")
    return rdm, description


def _prepare_network(network: DisentangledNet, cfg, device, say) -> None:
    """Registration stage: load the RDM of ``disentangled.rdm_model`` (unless the base model brought one) and freeze it."""
    if cfg.disentangled.rdm_model:
        state, description = load_rdm_state(cfg.disentangled.rdm_model)
        try:
            network.rdm.load_state_dict({k: v.to(device) for k, v in state.items()})
        except RuntimeError as exc:
            raise InputError(f"disentangled.rdm_model {description} does not fit architecture.rdm ({exc}); use the "
                             "RDM architecture it was trained with.") from None
        say(f"representation model (frozen) from {description}")
    for p in network.rdm.parameters():
        p.requires_grad_(False)


# ----------------------------------------------------------------------------- stage 1: the RDM


class RDMTraining(nn.Module):
    """What the RDM stage optimises and checkpoints: the model (``net``) and one discriminator per domain."""

    def __init__(self, architecture: dict):
        super().__init__()
        arch = _full(architecture)
        self.net = DisentangledNet(arch)
        self.discriminators = nn.ModuleList(Discriminator(int(arch["spatial_dims"]), arch["rdm"]) for _ in range(2))


def random_crop(image: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """A random cube of ``size`` voxels per axis (whole axes where they are shorter; 0: the image as it is)."""
    if size <= 0:
        return image
    slices = [slice(None), slice(None)]
    for n in image.shape[2:]:
        start = int(rng.integers(0, n - size + 1)) if n > size else 0
        slices.append(slice(start, start + min(size, n)))
    return image[tuple(slices)]


def translation_quality(rdm: RepresentationModel, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """How well the RDM translates an ALIGNED pair (``a`` in domain a, ``b`` in domain b, ``(1, 1, *spatial)``):
    ``{direction}_{ssim, nmi, ncc}`` between the translated and the real image of the other modality
    (:func:`mmreg.metrics.image_similarity`, inside ``mask`` when given), for directions "a_to_b" and
    "b_to_a", and the same numbers for the untranslated image as ``identity_*`` (the baseline: how
    similar the two modalities are before translation)."""
    from ..metrics import image_similarity  # noqa: PLC0415
    with torch.inference_mode():
        ab, ba = rdm.translate(a, 0, b), rdm.translate(b, 1, a)
    m = None if mask is None else mask[0, 0].bool().cpu().numpy()
    out = {}
    for name, produced, target, source in (("a_to_b", ab, b, a), ("b_to_a", ba, a, b)):
        for prefix, img in (("", produced), ("identity_", source)):
            sim = image_similarity(img[0, 0].cpu().numpy(), target[0, 0].cpu().numpy(), m)
            out.update({f"{prefix}{name}_{k}": float(sim[k]) for k in ("ssim", "nmi", "ncc")})
    return out


def _rdm_validation_images(data, device) -> list:
    """Aligned (a, b, mask) image pairs for the RDM's validation: the avg152 T1 template against the domain-b
    template when both are prepared (they share one grid), else none."""
    names = sorted(data.templates)
    if "T1" not in data.templates or len(names) < 2:
        return []
    b = [n for n in names if n != "T1"][0]
    t = [torch.from_numpy(np.ascontiguousarray(data.templates[n], dtype=np.float32))[None, None].to(device) for n in ("T1", b)]
    return [(f"avg152 T1/{b}", t[0], t[1], ((t[0] > 0.05) | (t[1] > 0.05)).float())]


def train_rdm(cfg, data=None, *, resume: bool = False, progress=None, log=None):
    """Stage 1 of ``disentangled`` (``[disentangled] stage = "rdm"``): train the RDM; returns a
    :class:`mmreg.training.TrainResult`.

    Each step draws a training pair (:class:`mmreg.training.PairSampler`: an IXI T1 = domain a, the
    template of ``data.template_modalities`` = domain b, augmented independently; with ``data.manifest``
    the fixed image of a user's pair = domain a, its moving image = domain b), crops a random cube of
    ``crop_voxels`` from each (unpaired), or, on a ``paired_fraction`` of the steps when ``paired_weight``
    > 0, the aligned avg152 T1 and domain-b templates with one augmentation and crop, and takes one Adam step of the encoders/generators on the
    generator loss and one of the discriminators on theirs (:func:`mmreg.rdm.rdm_losses`), both at
    ``learning_rate``. Validation (every ``validation_every`` steps): the loss on fixed held-out crops and,
    when the avg152 T1 template is prepared with the domain-b template (aligned), the translation quality
    (:func:`translation_quality`); the weights with the best validation SSIM (else loss) are kept. Same run
    files, checkpoints, resume and stop request as every training run. The written model holds the RDM and
    an untrained registration network: train the registration stage with ``rdm_model`` set to it.
    """
    from ..models import ModelCard, save_model  # noqa: PLC0415
    from ..networks import parameter_count  # noqa: PLC0415
    from ..training import (PairSampler, after_own_step, finish_own_run, open_own_run, pair_rng,  # noqa: PLC0415
                            prepare_ixi, prepare_manifest, resume_checkpoint, save_checkpoint, stop_own_run)

    t_start = time.perf_counter()
    device, threads, prog, (out_dir, ck_dir, last_path, best_path), files, say = open_own_run(
        cfg, resume, progress, log, "The RDM stage")
    try:
        if data is None and cfg.data.manifest:  # a user's pairs: fixed images = domain a, moving = domain b
            data = prepare_manifest(cfg, prog.sub(0.0, 0.05), say)
        elif data is None:
            # with the avg152 T1 template too (aligned with the domain-b template): the translation-quality check
            modalities = sorted(set(cfg.data.template_modalities) | {"T1"})
            data = prepare_ixi(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template_modalities=modalities)),
                               prog.sub(0.0, 0.05))
        arch = cfg.full_architecture()
        if data.train_pairs:
            train_data = data
            val_images = [(p.fixed, p.moving) for p in (data.val_pairs or data.train_pairs[:1])]
            what = f"{len(data.train_pairs)} pairs of {Path(str(data.info.get('manifest', 'a manifest'))).name}"
        else:
            domain_b = cfg.data.template_modalities[0]
            train_data = type(data)(grid=data.grid, training=data.training, validation=data.validation,
                                    templates={domain_b: data.templates[domain_b]} if domain_b in data.templates else {},
                                    info=data.info)
            val_images = [(s.image, train_data.templates[domain_b]) for s in (data.validation[:2] or data.training[:1])]
            what = f"IXI T1 ({len(data.training)} subjects) and avg152 {domain_b}"
        weights = train_data.check(cfg)
        torch.manual_seed(cfg.seed)
        module = RDMTraining(arch).to(device)
        rdm, discs = module.net.rdm, module.discriminators
        sampler = PairSampler(train_data, cfg, weights, device)
        opt_g = torch.optim.Adam(rdm.parameters(), lr=cfg.learning_rate, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(discs.parameters(), lr=cfg.learning_rate, betas=(0.5, 0.999))
        d = cfg.disentangled
        loss_weights = {"reconstruction": d.reconstruction_weight, "latent": d.latent_weight, "cycle": d.cycle_weight,
                        "adversarial": d.adversarial_weight, "paired": d.paired_weight}
        aligned_pair = None  # the avg152 T1 and domain-b templates (same grid): the paired steps
        if d.paired_weight > 0 and not data.train_pairs:
            if "T1" not in data.templates:
                raise InputError("disentangled.paired_weight > 0 needs the avg152 T1 template (not prepared).")
            aligned_pair = (sampler._tensor(data.templates["T1"]), sampler._tensor(data.templates[domain_b]))
        history = {"loss": [], "seconds_per_step": [], "validation": [], "best": None, "wall_seconds": 0.0}
        step = 0
        if resume:
            history, step = resume_checkpoint(cfg, last_path, module, {"generator": opt_g, "discriminator": opt_d},
                                              device, say)
        wall_before = float(history.get("wall_seconds", 0.0))
        # fixed validation crops: held-out images of each domain (held-out subjects / validation pairs)
        vrng = np.random.default_rng(cfg.seed + 99)

        def tensor(arr):
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None].to(device)
        val_batches = [(random_crop(tensor(a), d.crop_voxels, vrng), random_crop(tensor(b), d.crop_voxels, vrng))
                       for a, b in val_images]
        aligned = _rdm_validation_images(data, device)
        files.event("start", method=cfg.method, name=cfg.name, steps=cfg.steps, start_step=step, output=str(out_dir),
                    processes=1, pairs={"training": len(data.train_pairs) or len(data.training),
                                        "validation": len(val_batches)}, skipped=data.info.get("skipped", []))
        say(f"RDM stage: domains {arch['domains'][0]} and {arch['domains'][1]} from {what}; crops of {d.crop_voxels or 'whole'} voxels on a "
            f"{'x'.join(map(str, data.grid.spatial_shape))} grid; {parameter_count(rdm)} RDM parameters, "
            f"{parameter_count(discs)} discriminator parameters; Adam lr {cfg.learning_rate}")

        def evaluate() -> dict:
            was = module.training
            module.eval()
            with torch.inference_mode(), torch.random.fork_rng(devices=[]):
                losses = []
                for a, b in val_batches:
                    g, _, parts = rdm_losses(rdm, discs, a, b, loss_weights)
                    losses.append(float(g) - d.adversarial_weight * 2 * parts["adversarial"])  # without the GAN term
                v = {"loss": float(np.mean(losses))}
            for name, a, b, mask in aligned:
                v.update(translation_quality(rdm, a, b, mask))
                v["pair"] = name
            module.train(was)
            return v

        def score(v: dict) -> float:
            return (v["a_to_b_ssim"] + v["b_to_a_ssim"]) / 2 if "a_to_b_ssim" in v else -v["loss"]

        def record(v: dict) -> None:
            history["validation"].append(dict(v, step=step, mean_dice=None, mean_loss=v["loss"], folding_percent=None))
            best = history.get("best")
            if best is None or score(v) > best["score"]:
                history["best"] = {"step": step, "mean_dice": None, "mean_loss": v["loss"], "score": score(v),
                                   "criterion": "translation SSIM" if "a_to_b_ssim" in v else "loss"}
                ck_dir.mkdir(parents=True, exist_ok=True)
                torch.save({k: t.detach().cpu() for k, t in module.net.state_dict().items()}, best_path.with_suffix(".tmp"))
                os.replace(best_path.with_suffix(".tmp"), best_path)
            files.event("validation", step=step, mean_dice=None, mean_loss=v["loss"], folding_percent=None,
                        best_step=history["best"]["step"],
                        **{k: v[k] for k in ("a_to_b_ssim", "b_to_a_ssim") if k in v})
            quality = (f", translation SSIM {arch['domains'][0]}->{arch['domains'][1]} {v['a_to_b_ssim']:.3f} "
                       f"(untranslated {v['identity_a_to_b_ssim']:.3f}), {arch['domains'][1]}->{arch['domains'][0]} "
                       f"{v['b_to_a_ssim']:.3f} (untranslated {v['identity_b_to_a_ssim']:.3f})") if "a_to_b_ssim" in v else ""
            say(f"validation at step {step}: loss {v['loss']:.4f}{quality}; best at step {history['best']['step']}")

        if not history["validation"]:
            v0 = evaluate()
            history["initial_validation"] = v0
            say(f"validation at step 0 (untrained): loss {v0['loss']:.4f}")

        def checkpoint():
            history["wall_seconds"] = wall_before + time.perf_counter() - t_start
            save_checkpoint(last_path, module, _TwoOptimizers(opt_g, opt_d), step, cfg, history, device)

        def write_model(stopped: bool):
            final_state, chosen = module.net.state_dict(), "last"
            if cfg.final_model == "best" and history.get("best") and best_path.is_file():
                final_state = torch.load(best_path, map_location="cpu", weights_only=True)
                chosen = f"best (step {history['best']['step']})"
            final_net = disentangled_network(arch)
            final_net.load_state_dict({k: t.cpu() for k, t in final_state.items()})
            wall = wall_before + time.perf_counter() - t_start
            history["wall_seconds"] = wall
            sps = history["seconds_per_step"]
            best_v = next((v for v in history["validation"] if history.get("best") and v["step"] == history["best"]["step"]), None)
            description = cfg.description or (
                f"disentangled representation model (stage 1 of 2) {arch['domains'][0]}<->{arch['domains'][1]}, "
                f"{step} steps at {cfg.spacing_mm:g} mm; train the registration stage with rdm_model = \"{cfg.name}\".")
            training = {
                "command": "mmreg train", "stage": "rdm", "config": cfg.to_dict(), "data": data.info,
                "steps": step, "weights": chosen, "parameters": parameter_count(final_net.rdm),
                "discriminator_parameters": parameter_count(discs), "device": str(device), "threads": threads,
                "processes": 1, "wall_time_s": round(wall, 1),
                "seconds_per_step_median": float(np.median(sps)) if sps else None,
                "final_loss_mean_last_20": float(np.mean(history["loss"][-20:])) if history["loss"] else None,
                "translation_quality": best_v,
                "validation": {"initial": history.get("initial_validation"), "history": history["validation"],
                               "best": history.get("best")},
            }
            if stopped:
                training["stopped_at_step"], training["steps_planned"] = step, cfg.steps
            card = ModelCard(name=cfg.name, method=cfg.method, architecture=arch, spacing_mm=float(np.mean(data.grid.spacing)),
                             multiple=disentangled_size_multiple(arch), diffeomorphic=cfg.diffeomorphic,
                             integration_steps=cfg.integration_steps, description=description, training=training)
            folder = save_model(out_dir, final_net, card)
            (ck_dir / "history.json").write_text(json.dumps(history))
            return folder, chosen

        def stop_run(how: str):
            stop_own_run(how, step, checkpoint, write_model, files, say, last_path)

        train_prog = prog.sub(0.05, 0.98)
        start_step = step
        try:
            while step < cfg.steps:
                t0 = time.perf_counter()
                rng = pair_rng(cfg.seed, step, 0)
                paired = aligned_pair is not None and rng.uniform() < d.paired_fraction
                if paired:  # the same augmentation and crop for both images of the aligned pair
                    state = rng.bit_generator.state
                    x_a = random_crop(sampler.augment(aligned_pair[0], aligned_pair[0], rng)[1], d.crop_voxels, rng)
                    rng.bit_generator.state = state
                    x_b = random_crop(sampler.augment(aligned_pair[1], aligned_pair[1], rng)[1], d.crop_voxels, rng)
                else:
                    fixed, moving, _ = sampler.raw_pair(rng)
                    fixed, moving = sampler.augment(fixed, moving, rng)
                    x_a, x_b = random_crop(fixed, d.crop_voxels, rng), random_crop(moving, d.crop_voxels, rng)
                g_loss, d_loss, parts = rdm_losses(rdm, discs, x_a, x_b, loss_weights, aligned=paired)
                opt_g.zero_grad(set_to_none=True)
                opt_d.zero_grad(set_to_none=True)
                if torch.isfinite(g_loss) and torch.isfinite(d_loss):
                    (g_loss + d_loss).backward()  # disjoint parameters: each optimiser steps on its own loss
                    opt_g.step()
                    opt_d.step()
                step += 1
                history["loss"].append(float(g_loss.detach()))
                for key, value in parts.items():
                    history.setdefault(key, []).append(value)
                after_own_step(cfg, step, start_step, time.perf_counter() - t0, history, files, train_prog, out_dir,
                               validate=lambda: record(evaluate()), checkpoint=checkpoint, stop_run=stop_run)
        except KeyboardInterrupt:
            stop_run("interrupted")
            raise
        if not history["validation"] or history["validation"][-1]["step"] != step:
            record(evaluate())
        return finish_own_run(step, history, checkpoint, write_model, files, say, prog, t_start)
    except (CancelledError, KeyboardInterrupt):
        raise
    except BaseException as exc:
        files.event("error", message=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise


class _TwoOptimizers:
    """The generator's and the discriminators' optimisers as one checkpoint entry."""

    def __init__(self, generator, discriminator):
        self.generator, self.discriminator = generator, discriminator

    def state_dict(self) -> dict:  # noqa: D102
        return {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict()}


# ----------------------------------------------------------------------------- the method


class DisentangledRegistration(NetworkRegistration):
    """Cross-modality registration network trained through a disentangled representation (needs a model
    of the registration stage: shipped ``disentangled_t1t2`` or one from ``mmreg train``)."""

    name = "disentangled"
    description = ("Registration network trained through a disentangled content/style representation (MUNIT-like "
                   "RDM): warped images are translated into the other modality and compared there; one network for "
                   "both directions; the translated moving image is an extra output; optional MIND refinement.")
    modalities = "multi"
    default_model = "disentangled_t1t2"

    @staticmethod
    def build_network(architecture: dict) -> torch.nn.Module:
        """:class:`DisentangledNet` (the RDM and the registration network)."""
        return disentangled_network(architecture)

    def default_options(self) -> dict:
        """:class:`NetworkRegistration`'s options plus ``moving_domain``: the moving image's modality, one
        of the model's ``domains`` (None: the second, e.g. "T2" of a T1/T2 model; the fixed image is then
        the other), used for the translated image only (the registration network serves both directions);
        ``translate``: make the extra output ``"translated_moving"`` (default True)."""
        return dict(super().default_options(), moving_domain=None, translate=True)

    def _domains(self, options: dict) -> tuple:
        """``(moving domain index, domains)`` for the chosen model; :class:`InputError` for an unknown modality."""
        card = self.card(options)
        domains = list(card.architecture.get("domains", DEFAULT_DISENTANGLED_ARCHITECTURE["domains"]))
        wanted = options.get("moving_domain")
        if wanted in (None, ""):
            return 1, domains
        if wanted not in domains:
            raise InputError(f"moving_domain must be one of the model's modalities ({', '.join(domains)}), "
                             f"got {wanted!r}.")
        return domains.index(wanted), domains

    def run_network(self, network, fixed, moving) -> torch.Tensor:
        """``R(fixed, moving)``: one direction only (keeps the network for the translation)."""
        self._network = network
        return network.field(fixed, moving)

    def predict(self, inputs, options, progress):
        """The field (see :class:`NetworkRegistration`), then the translated warped moving image as extra output."""
        card = self.card(options)
        if (card.training or {}).get("stage") == "rdm":
            raise InputError(f"Model '{card.name}' holds only the representation model (stage 1 of training); its "
                             f"registration network is untrained. Train the registration stage with "
                             f"`[disentangled] rdm_model = \"{card.name}\"`, or choose a registration model.")
        moving_domain, _ = self._domains(options)
        ddf = super().predict(inputs, options, progress)
        if options.get("translate", True):
            factor = self.network_pooling(options, card)  # the translation runs at the network's spacing
            with torch.inference_mode():
                warped = downsample_image(warp(inputs.moving, ddf.detach()), factor)
                fixed = downsample_image(inputs.fixed, factor)
                if warped.dim() == 4 and int(card.architecture.get("spatial_dims", 3)) == 3:  # a slice: as a slab
                    depth = int(card.multiple)
                    translated = middle_of_slab(self._network.rdm.translate(slab(warped, depth), moving_domain,
                                                                            slab(fixed, depth)))
                else:
                    translated = self._network.rdm.translate(warped, moving_domain, fixed)
                self._extra = {"translated_moving": upsample_field(translated, factor) / factor}
        return ddf

    def training_spec(self) -> TrainingSpec:
        """Two stages (``[disentangled] stage``): the RDM by :func:`train_rdm`, then the registration network by the
        shared loop with :func:`training_loss` (RDM frozen)."""
        return TrainingSpec(build_network=disentangled_network,
                            default_architecture=json.loads(json.dumps(DEFAULT_DISENTANGLED_ARCHITECTURE)),
                            loss=_training_objective, displacement=_training_displacement, similarity_key="similarity",
                            loss_keys=("smoothness",), trainer=train_rdm,
                            use_trainer=lambda cfg: cfg.disentangled.stage == "rdm",
                            prepare_network=_prepare_network, loss_needs_network=True, check_config=check_config,
                            check_architecture=check_architecture, size_multiple=disentangled_size_multiple,
                            default_settings={"learning_rate": 1e-4, "smoothness": 1.0})


