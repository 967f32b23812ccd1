"""Representation disentangling model (RDM) of the ``disentangled`` method (engine side, no Slicer imports).

A MUNIT-like model for two image domains ``a`` and ``b`` (e.g. T1 and T2), reimplemented from the
papers' descriptions (no MUNIT code): per domain

* a **content encoder** ``E_c``: convolutions with instance normalisation, strided downsampling and
  residual blocks; its codes (``(B, C, *spatial / 2**downsamplings)``) live in a space shared by the
  two domains (domain-invariant anatomy);
* a **style encoder** ``E_s``: strided convolutions without normalisation and a global average: a
  small domain-specific style vector ``(B, style_dim)`` (contrast, intensity profile);
* a **generator** ``G``: residual blocks with adaptive instance normalisation whose scales and shifts
  an MLP computes from the style, nearest upsampling with layer-normalised convolutions, a sigmoid
  output (images in [0, 1], as the engine normalises them).

Translation a -> b of an image ``x`` with the style of a b-image ``y``: ``G_b(E_c_a(x), E_s_b(y))``
(:meth:`RepresentationModel.translate`). Training (:func:`rdm_losses`, used by
:func:`mmreg.methods.disentangled.train_rdm`): image reconstruction (L1), latent reconstruction of
content and style (L1), cross-cycle consistency (L1; translate both ways with swapped styles, then
back) and least-squares adversarial losses with one PatchGAN :class:`Discriminator` per domain.

Works in 2-D and 3-D (``spatial_dims``); tensors ``(B, C, *spatial)``, spatial sizes multiples of
``2 ** downsamplings``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

#: Default RDM architecture: 16 base channels, 2 downsamplings (content codes of 64 channels at 1/4
#: resolution), 2 residual blocks in encoder and generator, an 8-dimensional style, 3 discriminator levels.
DEFAULT_RDM_ARCHITECTURE = {"channels": 16, "downsamplings": 2, "residual_blocks": 2, "style_dim": 8,
                            "mlp_channels": 64, "discriminator_channels": 16, "discriminator_levels": 3}


def _conv(nd: int, cin: int, cout: int, *, kernel: int = 3, stride: int = 1, norm=None, act=None) -> nn.Module:
    """A MONAI convolution block (same padding; ``norm``/``act`` None for a bare convolution)."""
    if norm is None and act is None:
        return Convolution(nd, cin, cout, strides=stride, kernel_size=kernel, conv_only=True)
    return Convolution(nd, cin, cout, strides=stride, kernel_size=kernel, norm=norm, act=act, adn_ordering="NA")


class _ResBlock(nn.Module):
    """conv-IN-ReLU-conv-IN with an identity skip (content encoder)."""

    def __init__(self, nd: int, ch: int):
        super().__init__()
        self.body = nn.Sequential(_conv(nd, ch, ch, norm="INSTANCE", act="RELU"), _conv(nd, ch, ch, norm="INSTANCE"))

    def forward(self, x):  # noqa: D102
        return x + self.body(x)


def adaptive_instance_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Instance-normalise ``x`` ``(B, C, *spatial)`` per channel, then ``* (1 + scale) + shift`` (``(B, C)`` each)."""
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    return F.instance_norm(x) * (1.0 + scale.reshape(shape)) + shift.reshape(shape)


class _AdaINResBlock(nn.Module):
    """conv-AdaIN-ReLU-conv-AdaIN with an identity skip; scales/shifts (4 x C per sample) come from outside."""

    def __init__(self, nd: int, ch: int):
        super().__init__()
        self.conv1, self.conv2 = _conv(nd, ch, ch), _conv(nd, ch, ch)
        self.channels = ch

    def forward(self, x, params):  # noqa: D102 - params (B, 4C): scale1, shift1, scale2, shift2
        s1, b1, s2, b2 = params.split(self.channels, dim=1)
        y = F.relu(adaptive_instance_norm(self.conv1(x), s1, b1))
        return x + adaptive_instance_norm(self.conv2(y), s2, b2)


class ContentEncoder(nn.Module):
    """Image ``(B, 1, *spatial)`` -> content code ``(B, channels * 2**downsamplings, *spatial / 2**downsamplings)``."""

    def __init__(self, nd: int, arch: dict):
        super().__init__()
        ch = int(arch["channels"])
        layers = [_conv(nd, 1, ch, kernel=5, norm="INSTANCE", act="RELU")]
        for _ in range(int(arch["downsamplings"])):
            layers.append(_conv(nd, ch, 2 * ch, stride=2, norm="INSTANCE", act="RELU"))
            ch *= 2
        layers += [_ResBlock(nd, ch) for _ in range(int(arch["residual_blocks"]))]
        self.net = nn.Sequential(*layers)
        self.out_channels = ch

    def forward(self, x):  # noqa: D102
        return self.net(x)


class StyleEncoder(nn.Module):
    """Image ``(B, 1, *spatial)`` -> style vector ``(B, style_dim)`` (no normalisation layers: they would remove the style)."""

    def __init__(self, nd: int, arch: dict):
        super().__init__()
        ch = int(arch["channels"])
        layers = [_conv(nd, 1, ch, kernel=5, act="RELU")]
        for i in range(int(arch["downsamplings"]) + 2):
            out = min(2 * ch, 4 * int(arch["channels"]))
            layers.append(_conv(nd, ch, out, stride=2, act="RELU"))
            ch = out
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(ch, int(arch["style_dim"]))

    def forward(self, x):  # noqa: D102
        h = self.net(x)
        return self.head(h.flatten(2).mean(dim=2))


class Generator(nn.Module):
    """Content code + style vector -> image ``(B, 1, *spatial)`` in [0, 1] (AdaIN residual blocks, upsampling)."""

    def __init__(self, nd: int, arch: dict, content_channels: int):
        super().__init__()
        ch = content_channels
        self.blocks = nn.ModuleList(_AdaINResBlock(nd, ch) for _ in range(int(arch["residual_blocks"])))
        mlp = int(arch["mlp_channels"])
        self.mlp = nn.Sequential(nn.Linear(int(arch["style_dim"]), mlp), nn.ReLU(), nn.Linear(mlp, mlp), nn.ReLU(),
                                 nn.Linear(mlp, 4 * ch * len(self.blocks)))
        ups = []
        for _ in range(int(arch["downsamplings"])):
            ups += [nn.Upsample(scale_factor=2, mode="nearest"),
                    _conv(nd, ch, ch // 2, kernel=3, norm=("GROUP", {"num_groups": 1}), act="RELU")]
            ch //= 2
        self.up = nn.Sequential(*ups)
        self.out = _conv(nd, ch, 1, kernel=5)
        self.channels = content_channels

    def forward(self, content, style):  # noqa: D102
        params = self.mlp(style).split(4 * self.channels, dim=1)
        x = content
        for block, p in zip(self.blocks, params):
            x = block(x, p)
        return torch.sigmoid(self.out(self.up(x)))


class Discriminator(nn.Module):
    """PatchGAN: image ``(B, 1, *spatial)`` -> realness map (least-squares GAN: 1 real, 0 fake)."""

    def __init__(self, nd: int, arch: dict):
        super().__init__()
        ch = int(arch["discriminator_channels"])
        layers, cin = [], 1
        for _ in range(int(arch["discriminator_levels"])):
            layers.append(_conv(nd, cin, ch, stride=2, act=("LEAKYRELU", {"negative_slope": 0.2})))
            cin, ch = ch, 2 * ch
        layers.append(_conv(nd, cin, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # noqa: D102
        return self.net(x)


class RepresentationModel(nn.Module):
    """The RDM of two domains (``domains``: their names, e.g. ["T1", "T2"]; index 0 = domain a, 1 = b)."""

    def __init__(self, architecture: dict, domains=("a", "b"), spatial_dims: int = 3):
        super().__init__()
        arch = dict(DEFAULT_RDM_ARCHITECTURE, **(architecture or {}))
        nd = int(spatial_dims)
        self.domains = list(domains)
        self.content = nn.ModuleList(ContentEncoder(nd, arch) for _ in range(2))
        self.style = nn.ModuleList(StyleEncoder(nd, arch) for _ in range(2))
        self.generator = nn.ModuleList(Generator(nd, arch, self.content[0].out_channels) for _ in range(2))
        self.multiple = 2 ** int(arch["downsamplings"])

    def domain_index(self, domain) -> int:
        """0 or 1 for a domain given by index or by name (``ValueError`` naming the domains otherwise)."""
        if domain in (0, 1):
            return int(domain)
        if domain in self.domains:
            return self.domains.index(domain)
        raise ValueError(f"Unknown domain {domain!r}; this model has {', '.join(map(str, self.domains))}.")

    def encode(self, image: torch.Tensor, domain) -> tuple:
        """``(content, style)`` of an image of ``domain``."""
        d = self.domain_index(domain)
        return self.content[d](image), self.style[d](image)

    def translate(self, image: torch.Tensor, source, target_style_image: torch.Tensor) -> torch.Tensor:
        """``image`` (domain ``source``) rendered in the other domain with the style of ``target_style_image``."""
        s = self.domain_index(source)
        t = 1 - s
        return self.generator[t](self.content[s](image), self.style[t](target_style_image))


def lsgan(prediction: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss of a discriminator output: mean (D - 1)^2 for real targets, mean D^2 for fake."""
    return ((prediction - 1.0) ** 2).mean() if real else (prediction ** 2).mean()


def rdm_losses(rdm: RepresentationModel, discriminators: nn.ModuleList, x_a: torch.Tensor, x_b: torch.Tensor,
               weights: dict, aligned: bool = False) -> tuple:
    """The RDM objectives for a batch of unpaired images ``x_a`` (domain a) and ``x_b`` (domain b), ``(B, 1, *spatial)``.

    Returns ``(generator_loss, discriminator_loss, parts)``. Generator (encoders + generators):
    ``reconstruction * (|G_a(c_a, s_a) - x_a| + ...)`` + ``latent * (|E_c_b(x_ab) - c_a| + |E_s_b(x_ab) - s_b| + ...)``
    + ``cycle * (|x_aba - x_a| + |x_bab - x_b|)`` (cross-cycle: ``x_ab = G_b(c_a, s_b)``, ``x_ba = G_a(c_b, s_a)``,
    then ``x_aba = G_a(E_c_b(x_ab), E_s_a(x_ba))``) + ``adversarial * LSGAN(D(x_ab), D(x_ba) as real)``, the
    discriminators' parameters not receiving that term's gradient. Discriminator: LSGAN of real images vs the
    (detached) translations. ``weights``: "reconstruction", "latent", "cycle", "adversarial" (the paper: 10, 1, 10, 1).
    ``aligned``: ``x_a`` and ``x_b`` show the same anatomy at the same place (e.g. the avg152 T1 and T2
    templates): then ``weights["paired"] * (|x_ab - x_b| + |x_ba - x_a|)`` is added (supervised translation; not
    in the paper, whose RDM is unpaired; see :class:`mmreg.training.DisentangledTrainConfig`).
    ``parts``: floats for the log (L1 terms are mean absolute differences of [0, 1] images).
    """
    c_a, s_a = rdm.encode(x_a, 0)
    c_b, s_b = rdm.encode(x_b, 1)
    rec = (x_a - rdm.generator[0](c_a, s_a)).abs().mean() + (x_b - rdm.generator[1](c_b, s_b)).abs().mean()
    x_ab, x_ba = rdm.generator[1](c_a, s_b), rdm.generator[0](c_b, s_a)
    c_ab, s_ab = rdm.encode(x_ab, 1)
    c_ba, s_ba = rdm.encode(x_ba, 0)
    latent = ((c_ab - c_a).abs().mean() + (c_ba - c_b).abs().mean()
              + (s_ab - s_b).abs().mean() + (s_ba - s_a).abs().mean())
    x_aba, x_bab = rdm.generator[0](c_ab, s_ba), rdm.generator[1](c_ba, s_ab)
    cycle = (x_aba - x_a).abs().mean() + (x_bab - x_b).abs().mean()
    frozen = [{k: v.detach() for k, v in d.named_parameters()} for d in discriminators]
    adv = (lsgan(torch.func.functional_call(discriminators[1], frozen[1], (x_ab,)), True)
           + lsgan(torch.func.functional_call(discriminators[0], frozen[0], (x_ba,)), True))
    g_loss = (weights["reconstruction"] * rec + weights["latent"] * latent + weights["cycle"] * cycle
              + weights["adversarial"] * adv)
    paired = None
    if aligned and weights.get("paired", 0.0) > 0:
        paired = (x_ab - x_b).abs().mean() + (x_ba - x_a).abs().mean()
        g_loss = g_loss + weights["paired"] * paired
    d_loss = (lsgan(discriminators[0](x_a), True) + lsgan(discriminators[0](x_ba.detach()), False)
              + lsgan(discriminators[1](x_b), True) + lsgan(discriminators[1](x_ab.detach()), False))
    parts = {"reconstruction": float(rec.detach()) / 2, "latent": float(latent.detach()) / 4,
             "cycle": float(cycle.detach()) / 2, "adversarial": float(adv.detach()) / 2,
             "discriminator": float(d_loss.detach()) / 4}
    if paired is not None:
        parts["paired"] = float(paired.detach()) / 2
    return g_loss, d_loss, parts
