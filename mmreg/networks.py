"""Networks of the learned methods, built from MONAI blocks.

:func:`registration_unet`: the VoxelMorph-style encoder-decoder used by the ``mi`` method (the
paper's CNN: 3x3x3 convolutions, LeakyReLU(0.2), strided-convolution downsampling, skip
connections, full-resolution output). Input ``(B, 2, *spatial)`` = fixed and moving image,
output ``(B, ndim, *spatial)`` = a field in VOXEL units of the network grid, channel k along
tensor dimension k + 2 (the engine's convention, :mod:`mmreg.grid`). The last convolution starts
at N(0, 1e-5) weights and zero bias, so an untrained network predicts (almost) the identity.
Spatial sizes must be multiples of :func:`size_multiple`.
"""
from __future__ import annotations

import torch
from torch import nn

#: Default architecture of the ``mi`` network: VoxelMorph's encoder/decoder widths (16, 32, 32, 32 down;
#: 32, 32, 32, 32 up), two 16-channel convolutions at full resolution. ~300k parameters.
#: ``input_features``: what the U-Net reads of each image, "intensity" (the paper: the images
#: themselves) or "mind" (the MIND-SSC descriptor of each image, :func:`mmreg.losses.mind_ssc` with
#: ``mind_radius`` / ``mind_dilation`` in network voxels, 12 channels per image in 3-D: a fixed,
#: non-trainable, contrast-insensitive input, so that a network trained on T1-T1 pairs reads a T1-T2
#: pair much as it reads a T1-T1 one; see docs/mi_training.md) or "intensity_and_mind" (both: the images,
#: then their descriptors, 1 + 12 channels per image in 3-D).
DEFAULT_ARCHITECTURE = {"kind": "voxelmorph_unet", "spatial_dims": 3, "channels": [16, 32, 32, 32, 32, 32, 32, 32],
                        "final_conv_channels": [16, 16]}

#: What a ``voxelmorph_unet`` can read of its two images (``architecture["input_features"]``).
INPUT_FEATURES = ("intensity", "mind", "intensity_and_mind")


def size_multiple(architecture: dict) -> int:
    """Spatial sizes the network accepts are multiples of this (2 ** number of strided downsamplings)."""
    return 2 ** (len(architecture["channels"]) // 2)


class FeatureInputNetwork(nn.Module):
    """A registration network that reads fixed, non-trainable features of its input images instead of
    the images: input ``(B, C, *spatial)`` (C images, e.g. fixed and moving), each channel turned into
    its MIND-SSC descriptor (:func:`mmreg.losses.mind_ssc`, ``radius`` / ``dilation`` in voxels of the
    input grid), the descriptors concatenated in channel order and passed to ``network``; with
    ``with_intensity`` the C images themselves come first, then the descriptors. The output is
    ``network``'s (a field in voxels). The features have no parameters, so the weights are those of
    ``network`` (state-dict keys prefixed ``network.``)."""

    def __init__(self, network: nn.Module, radius: int = 1, dilation: int = 1, with_intensity: bool = False):
        super().__init__()
        self.network, self.radius, self.dilation = network, int(radius), int(dilation)
        self.with_intensity = bool(with_intensity)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The MIND-SSC descriptors of every input channel, ``(B, C * K, *spatial)`` (K = 12 in 3-D, 4 in 2-D),
        after the C input images when ``with_intensity`` (``(B, C + C * K, *spatial)``)."""
        from .losses import mind_ssc  # noqa: PLC0415
        descriptors = mind_ssc(x, radius=self.radius, dilation=self.dilation)  # per channel, in channel order
        return torch.cat([x, descriptors], dim=1) if self.with_intensity else descriptors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.features(x))


def check_input_features(arch: dict) -> None:
    """``ValueError`` naming the fix when ``arch``'s ``input_features`` / ``mind_radius`` / ``mind_dilation``
    are not usable (see :data:`DEFAULT_ARCHITECTURE`)."""
    kind = arch.get("input_features", "intensity")
    if kind not in INPUT_FEATURES:
        raise ValueError(f"architecture.input_features must be one of {', '.join(INPUT_FEATURES)}, got {kind!r}.")
    for key, low in (("mind_radius", 0), ("mind_dilation", 1)):
        value = arch.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"architecture.{key} must be an integer >= {low} (network voxels), got {value!r}.")


def registration_unet(architecture: dict | None = None, in_channels: int = 2) -> nn.Module:
    """Build the network described by ``architecture`` (see :data:`DEFAULT_ARCHITECTURE`) reading
    ``in_channels`` input channels (2: fixed and moving image; ``grad``'s branches read 2 or 4). With
    ``input_features = "mind"`` the U-Net reads the images' MIND-SSC descriptors, with
    ``"intensity_and_mind"`` the images and then their descriptors (:class:`FeatureInputNetwork`); the
    input is still the ``in_channels`` images."""
    from monai.networks.nets import VoxelMorphUNet  # noqa: PLC0415

    arch = dict(DEFAULT_ARCHITECTURE, **(architecture or {}))
    if arch.get("kind") != "voxelmorph_unet":
        raise ValueError(f"Unknown network kind '{arch.get('kind')}'; this version builds 'voxelmorph_unet'.")
    check_input_features(arch)
    dims = int(arch["spatial_dims"])
    layout = input_channel_layout(arch, in_channels)
    mind = "mind" in layout
    in_channels = max(part.stop for part in layout.values())
    net = VoxelMorphUNet(spatial_dims=dims, in_channels=int(in_channels), unet_out_channels=int(arch["final_conv_channels"][0]),
                         channels=tuple(int(c) for c in arch["channels"]),
                         final_conv_channels=tuple(int(c) for c in arch["final_conv_channels"]),
                         use_maxpool=False)
    last = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))][-1]
    if last.out_channels != dims:  # pragma: no cover - guards against a MONAI layout change
        raise RuntimeError("Unexpected VoxelMorphUNet layout: the last convolution does not output the field.")
    with torch.no_grad():
        nn.init.normal_(last.weight, std=1e-5)
        nn.init.zeros_(last.bias)
    if mind:
        return FeatureInputNetwork(net, radius=int(arch.get("mind_radius", 1)), dilation=int(arch.get("mind_dilation", 1)),
                                   with_intensity="intensity" in layout)
    return net


def input_channel_layout(architecture: dict, images: int = 2) -> dict:
    """Which channels of the U-Net's first convolution read what, for ``images`` input images:
    ``{"intensity": slice, "mind": slice}`` with the kinds ``architecture["input_features"]`` has
    (intensity: one channel per image; mind: K = 12 per image in 3-D, 4 in 2-D; intensity first)."""
    from .losses import mind_ssc_channels  # noqa: PLC0415
    arch = dict(DEFAULT_ARCHITECTURE, **(architecture or {}))
    kind = arch.get("input_features", "intensity")
    layout, start = {}, 0
    for part, width in (("intensity", int(images)), ("mind", int(images) * mind_ssc_channels(int(arch["spatial_dims"])))):
        if part in kind.split("_and_"):
            layout[part] = slice(start, start + width)
            start += width
    return layout


def first_convolution_key(network: nn.Module) -> str:
    """State-dict key of the weight of ``network``'s first convolution (the one that reads the input)."""
    name = next(n for n, m in network.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    return f"{name}.weight"


def widen_input_weights(state: dict, network: nn.Module, base_architecture: dict, architecture: dict,
                        images: int = 2) -> dict:
    """``state`` (weights of a network built from ``base_architecture``) made to load into ``network`` (built
    from ``architecture``) when ``architecture`` reads more input features than the base, e.g. a ``"mind"``
    model continued as ``"intensity_and_mind"``: the first convolution's weights of the kinds the base read are
    copied to their new channels, the weights of the new kinds start at zero, so the widened network
    predicts exactly the base model's field until it is trained. Every other weight is unchanged.
    ``ValueError`` when the base reads a kind ``architecture`` does not, or another layer differs."""
    old, new = input_channel_layout(base_architecture, images), input_channel_layout(architecture, images)
    if old == new:
        return state
    missing = sorted(set(old) - set(new))
    if missing:
        raise ValueError(f"the base model reads {', '.join(missing)} input features, which this architecture does not")
    key = first_convolution_key(network)
    if key.startswith("network.") and not any(k.startswith("network.") for k in state):
        state = {f"network.{k}": v for k, v in state.items()}  # an intensity base under the feature wrapper
    target = network.state_dict()[key]
    if key not in state or state[key].shape[0] != target.shape[0] or state[key].shape[2:] != target.shape[2:]:
        raise ValueError(f"the base model's first convolution ({key}) does not match this architecture's")
    weight = torch.zeros_like(target, dtype=state[key].dtype)
    for part, where in old.items():
        weight[:, new[part]] = state[key][:, where]
    return dict(state, **{key: weight})


def parameter_count(network: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- FMIRNet (method ``multiscale``)

#: Default architecture of the ``multiscale`` network (FMIRNet): a residual U-Net (MONAI ResidualUnit
#: blocks, LeakyReLU(0.2), strided-convolution downsampling) whose decoder predicts displacement fields
#: at full, 1/2 and 1/4 resolution; ``scales`` = how many of them are used (1: FMIRNet-1, 2, 3).
#: ``attention_normalization``: "none" (default) is the paper's plain sigmoid; "max" divides it by its
#: maximum over the image (weights in (0, 1]) and "mean" by its spatial mean (weights of mean 1), so that
#: a uniform shift of the attention's logits, the direction in which the 3-D 1- and 2-scale runs
#: collapsed, no longer shrinks the whole field. Measured (docs/multiscale.md): no difference in 2-D
#: training, and neither normalisation saved a 3-D 1-scale run, so the paper's form stays the default.
DEFAULT_MULTISCALE_ARCHITECTURE = {"kind": "fmirnet", "spatial_dims": 3, "scales": 3,
                                   "encoder_channels": [16, 32, 32, 32, 32], "decoder_channels": [32, 32, 32, 16],
                                   "subunits": 2, "max_displacement_voxels": 10.0,
                                   "attention_normalization": "none"}

#: The attention normalisations FMIRNet knows (see :data:`DEFAULT_MULTISCALE_ARCHITECTURE`).
ATTENTION_NORMALIZATIONS = ("none", "max", "mean")


def _leaky():
    return ("LeakyReLU", {"negative_slope": 0.2})


class FMIRNet(nn.Module):
    """FMIRNet: multiscale displacement fields fused with spatial attention.

    Input ``(B, 2, *spatial)`` = fixed and moving image (sizes multiples of ``2 ** (levels - 1)``,
    see :func:`fmirnet_size_multiple`). The encoder has ``len(encoder_channels)`` residual units, the
    first at full resolution and each further one strided by 2; the decoder upsamples (trilinear)
    back to full resolution, concatenating the encoder skips, with ``decoder_channels`` per level.
    The decoder's last three levels (1/4, 1/2, full resolution) each end in a 3x3x3 convolution to an
    ``ndim``-channel field in VOXEL units of that level's grid. Fusion: the coarse fields are upsampled
    to full resolution and their vectors scaled by 4 and 2 (voxel units of the full grid), summed into
    a preliminary field; the spatial attention module (a 3x3x3 convolution of the decoder's last
    features, then a sigmoid) gives one weight per voxel that multiplies the preliminary field. With
    ``attention_normalization = "max"`` the sigmoid is divided by its maximum over the image (weights
    in (0, 1], the most trusted voxel at 1); ``"mean"``: by its mean (weights of mean 1); ``"none"``:
    the sigmoid itself, in (0, 1). ``forward`` returns that final field ``(B, ndim, *spatial)``
    (engine convention: channel k along tensor dimension k + 2; a displacement, or a velocity when the
    model is diffeomorphic); :meth:`forward_details` also returns the scale fields and the attention.
    The field heads start at N(0, 1e-5) weights and zero bias: an untrained network is the identity.
    Each scale field is bounded softly, ``b * tanh(f / b)`` with ``b`` = ``max_displacement_voxels`` of
    the full grid (linear for small fields): without a bound, a field scaled up and an attention scaled
    down give the same product, and Adam drove runs there until the attention was 0 and the network dead
    (measured on the brain data: preliminary field ~1e5 voxels, attention 0, at step 150). The bound
    stopped the blow-up but not the collapse (the 1- and 2-scale brain runs still ended at attention 0,
    the identity). Normalising the attention ("max" or "mean") removes that direction: a uniform shift
    of its logits no longer changes the field. It did not save a 3-D 1-scale run: with "mean" the loss
    spiked at step 161 (0.23 -> 1.03) and the field ended at its bound everywhere; with "max" the
    preliminary field also went to its bound and the attention to ~0 everywhere but one voxel (the
    per-voxel scale symmetry of field x attention remains). 2-D runs train alike with all three.
    """

    def __init__(self, architecture: dict | None = None):
        from monai.networks.blocks import Convolution, ResidualUnit  # noqa: PLC0415
        super().__init__()
        arch = dict(DEFAULT_MULTISCALE_ARCHITECTURE, **(architecture or {}))
        if arch.get("kind") != "fmirnet":
            raise ValueError(f"Unknown network kind '{arch.get('kind')}'; the multiscale method builds 'fmirnet'.")
        self.architecture = arch
        dims = self.dims = int(arch["spatial_dims"])
        enc = [int(c) for c in arch["encoder_channels"]]
        dec = [int(c) for c in arch["decoder_channels"]]
        self.scales = int(arch["scales"])
        if self.scales not in (1, 2, 3):
            raise ValueError(f"FMIRNet scales must be 1, 2 or 3, got {self.scales}.")
        if arch.get("attention_normalization", "none") not in ATTENTION_NORMALIZATIONS:
            raise ValueError(f"FMIRNet attention_normalization must be one of {', '.join(ATTENTION_NORMALIZATIONS)}, "
                             f"got '{arch.get('attention_normalization')}'.")
        self.attention_normalization = arch.get("attention_normalization", "none")
        if len(dec) != len(enc) - 1 or len(enc) < 3:
            raise ValueError("FMIRNet needs len(decoder_channels) == len(encoder_channels) - 1 >= 2.")
        sub = int(arch.get("subunits", 2))
        self.encoder = nn.ModuleList()
        c_in = 2
        for i, c in enumerate(enc):
            self.encoder.append(ResidualUnit(dims, c_in, c, strides=1 if i == 0 else 2, subunits=sub, act=_leaky(),
                                             norm=None))
            c_in = c
        self.decoder = nn.ModuleList()
        for i, c in enumerate(dec):  # decoder level i upsamples to encoder level len(enc) - 2 - i
            skip = enc[len(enc) - 2 - i]
            self.decoder.append(ResidualUnit(dims, c_in + skip, c, strides=1, subunits=sub, act=_leaky(), norm=None))
            c_in = c
        # heads: full resolution (last decoder level), 1/2, 1/4
        self.heads = nn.ModuleList()
        for s in range(self.scales):
            conv = Convolution(dims, dec[len(dec) - 1 - s], dims, kernel_size=3, conv_only=True)
            nn.init.normal_(conv.conv.weight, std=1e-5)
            nn.init.zeros_(conv.conv.bias)
            self.heads.append(conv)
        self.attention = Convolution(dims, dec[-1], 1, kernel_size=3, conv_only=True)
        nn.init.zeros_(self.attention.conv.weight)
        nn.init.constant_(self.attention.conv.bias, 2.0)  # start near 0.88: the fields pass almost unchanged
        self._mode = "trilinear" if dims == 3 else "bilinear"

    def _up(self, x: torch.Tensor, size) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, size=size, mode=self._mode, align_corners=False)

    def forward_details(self, x: torch.Tensor) -> dict:
        """``{"field": final field, "scale_fields": [full, 1/2, 1/4 (as used)] upsampled to full resolution
        in full-grid voxels, "preliminary": their sum, "attention": (B, 1, *spatial) weights}`` (in (0, 1]
        with the "max" normalisation, > 0 with mean 1 with "mean", in (0, 1) with "none")."""
        skips = []
        h = x
        for unit in self.encoder:
            h = unit(h)
            skips.append(h)
        levels = []  # decoder outputs, coarse to fine
        for i, unit in enumerate(self.decoder):
            skip = skips[len(skips) - 2 - i]
            h = unit(torch.cat([self._up(h, skip.shape[2:]), skip], dim=1))
            levels.append(h)
        full = x.shape[2:]
        fields = []
        bound = float(self.architecture.get("max_displacement_voxels") or 0.0)
        for s, head in enumerate(self.heads):
            feat = levels[len(levels) - 1 - s]
            f = head(feat)
            if bound > 0:  # in this level's voxels: bound / 2**s, i.e. ``bound`` full-grid voxels once upsampled
                b = bound / 2 ** s
                f = b * torch.tanh(f / b)
            if s:
                factor = 2 ** s
                f = self._up(f, full) * factor
            fields.append(f)
        preliminary = torch.stack(fields, dim=0).sum(dim=0)
        logits = self.attention(levels[-1])
        spatial = tuple(range(2, logits.dim()))
        if self.attention_normalization == "max":  # in log space: finite even where every sigmoid underflows
            log_att = torch.nn.functional.logsigmoid(logits)
            attention = torch.exp(log_att - log_att.amax(dim=spatial, keepdim=True))
        elif self.attention_normalization == "mean":
            attention = torch.sigmoid(logits)
            attention = attention / attention.mean(dim=spatial, keepdim=True).clamp_min(1e-30)
        else:
            attention = torch.sigmoid(logits)
        return {"field": preliminary * attention, "scale_fields": fields, "preliminary": preliminary,
                "attention": attention}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_details(x)["field"]


def fmirnet_size_multiple(architecture: dict) -> int:
    """Spatial sizes FMIRNet accepts are multiples of this (2 ** number of strided residual units)."""
    arch = dict(DEFAULT_MULTISCALE_ARCHITECTURE, **(architecture or {}))
    return 2 ** (len(arch["encoder_channels"]) - 1)


def fmirnet(architecture: dict | None = None) -> nn.Module:
    """Build the FMIRNet described by ``architecture`` (see :data:`DEFAULT_MULTISCALE_ARCHITECTURE`)."""
    return FMIRNet(architecture)


# ----------------------------------------------------------------------------- dual-branch gradient network (method ``grad``)

#: The variants of the ``grad`` network: "gated" (image and gradient branches, gated fusion), "average"
#: (the two fields averaged), "vm" (the image branch alone: VoxelMorph, 2-channel input) and "vm_concat"
#: (one VoxelMorph reading the images and their gradient maps, 4 channels).
GRAD_VARIANTS = ("gated", "average", "vm", "vm_concat")

#: Default architecture of the ``grad`` network: each branch is the VoxelMorph U-Net of ``mi`` (four
#: stride-2 convolutions 16-32-32-32, a 32-filter decoder with four upsamplings and skips, then
#: convolutions at full resolution), ``variant`` one of :data:`GRAD_VARIANTS`.
DEFAULT_GRAD_ARCHITECTURE = {"kind": "gradnet", "spatial_dims": 3, "variant": "gated",
                             "channels": [16, 32, 32, 32, 32, 32, 32, 32], "final_conv_channels": [16, 16]}

#: Largest number of voxels read to find a gradient map's 99th percentile (a strided subset above it).
_PERCENTILE_VOXELS = 1_000_000


def gradient_magnitude(image: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """Gradient-magnitude map of ``image`` ``(B, C, *spatial)`` (2-D or 3-D) by a fixed finite-difference
    convolution: per voxel, ``sqrt(sum_k ((I(x + e_k) - I(x - e_k)) / 2) ** 2)``, intensity per VOXEL of
    the grid (central differences, replicate borders). ``normalise``: each map divided by its own 99th
    percentile and clipped to [0, 1], so maps of different modalities (CT edges are stronger than MR's)
    share one range. Not trainable; differentiable."""
    dims = image.dim() - 2
    if dims not in (2, 3):
        raise ValueError(f"gradient_magnitude needs a (B, C, *spatial) tensor with 2 or 3 spatial dims, got {tuple(image.shape)}.")
    pad = torch.nn.functional.pad(image, [1] * (2 * dims), mode="replicate")
    squares = 0.0
    for axis in range(dims):  # tensor axis 2 + axis
        n = image.shape[2 + axis]
        ahead = pad.narrow(2 + axis, 2, n)
        behind = pad.narrow(2 + axis, 0, n)
        rest = [a for a in range(dims) if a != axis]
        for a in rest:  # drop the padding of the other axes
            ahead = ahead.narrow(2 + a, 1, image.shape[2 + a])
            behind = behind.narrow(2 + a, 1, image.shape[2 + a])
        squares = squares + ((ahead - behind) * 0.5) ** 2
    grad = torch.sqrt(squares + 1e-12)
    if not normalise:
        return grad
    flat = grad.detach().flatten(1)
    step = max(1, flat.shape[1] // _PERCENTILE_VOXELS)
    scale = torch.quantile(flat[:, ::step], 0.99, dim=1).clamp_min(1e-6)
    return (grad / scale.reshape(-1, *([1] * (grad.dim() - 1)))).clamp(0.0, 1.0)


class GradNet(nn.Module):
    """The ``grad`` network: image and gradient-map registration with gated fusion.

    Input ``(B, 2, *spatial)`` = fixed and moving image (intensities in [0, 1], sizes multiples of
    :func:`gradnet_size_multiple`). Their gradient-magnitude maps (:func:`gradient_magnitude`, fixed)
    outline organ boundaries. Variant (``architecture["variant"]``, :data:`GRAD_VARIANTS`):

    - "gated": an image branch (VoxelMorph U-Net on the two images) predicts ``phi_i``, a gradient
      branch (the same architecture on the two gradient maps) predicts ``phi_g``; a 3x3x3 convolution
      of ``cat(phi_i, phi_g)`` to ``2 ndim`` channels and a sigmoid give two ``ndim``-channel gate maps,
      each multiplies its field, and a 1x1x1 convolution of the two products gives ``phi_ig``. The gate
      convolution starts at zero (gates 0.5) and the 1x1x1 one at ``[I, I]``: an untrained network
      averages the two fields.
    - "average": ``phi_ig = (phi_i + phi_g) / 2``.
    - "vm": the image branch alone (``phi_ig = phi_i``); "vm_concat": one branch reading the images and
      both gradient maps (4 channels).

    Fields are in VOXEL units of the input grid, channel k along tensor dimension k + 2 (a displacement,
    or a velocity when the model is diffeomorphic). ``forward`` returns ``phi_ig`` for "vm" and
    "vm_concat" and ``cat(phi_ig, phi_g)`` (``2 ndim`` channels: the training loss also warps the
    moving gradient map with ``phi_g``) for the two-branch variants; :meth:`forward_details` returns a
    dict (``field``, ``image_field``, ``gradient_field``, ``image_gate``, ``gradient_gate``, the gradient maps).
    """

    def __init__(self, architecture: dict | None = None):
        super().__init__()
        arch = dict(DEFAULT_GRAD_ARCHITECTURE, **(architecture or {}))
        if arch.get("kind") != "gradnet":
            raise ValueError(f"Unknown network kind '{arch.get('kind')}'; the grad method builds 'gradnet'.")
        if arch.get("variant") not in GRAD_VARIANTS:
            raise ValueError(f"GradNet variant must be one of {', '.join(GRAD_VARIANTS)}, got {arch.get('variant')!r}.")
        self.architecture = arch
        self.variant = arch["variant"]
        dims = self.dims = int(arch["spatial_dims"])
        unet = {"kind": "voxelmorph_unet", "spatial_dims": dims, "channels": list(arch["channels"]),
                "final_conv_channels": list(arch["final_conv_channels"])}
        self.image_branch = registration_unet(unet, in_channels=4 if self.variant == "vm_concat" else 2)
        self.dual = self.variant in ("gated", "average")
        if self.dual:
            self.gradient_branch = registration_unet(unet, in_channels=2)
        if self.variant == "gated":
            conv = nn.Conv3d if dims == 3 else nn.Conv2d
            self.gate = conv(2 * dims, 2 * dims, kernel_size=3, padding=1)
            self.fuse = conv(2 * dims, dims, kernel_size=1)
            with torch.no_grad():
                nn.init.zeros_(self.gate.weight)
                nn.init.zeros_(self.gate.bias)
                eye = torch.eye(dims).reshape(dims, dims, *([1] * dims))
                self.fuse.weight.copy_(torch.cat([eye, eye], dim=1))
                nn.init.zeros_(self.fuse.bias)

    @property
    def output_channels(self) -> int:
        """Channels of :meth:`forward`'s output: ``2 ndim`` for the two-branch variants, else ``ndim``."""
        return 2 * self.dims if self.dual else self.dims

    def forward_details(self, x: torch.Tensor) -> dict:
        """Every intermediate of one pass: ``field`` (phi_ig), ``image_field`` (phi_i), ``gradient_field``
        (phi_g, None for the single-branch variants), ``image_gate`` / ``gradient_gate`` (``(B, ndim, *spatial)``
        in (0, 1), "gated" only, else None), ``fixed_gradient`` / ``moving_gradient`` (the gradient maps)."""
        if x.shape[1] != 2:
            raise ValueError(f"GradNet reads 2 channels (fixed, moving), got {x.shape[1]}.")
        gf, gm = gradient_magnitude(x[:, :1]), gradient_magnitude(x[:, 1:2])
        out = {"fixed_gradient": gf, "moving_gradient": gm, "gradient_field": None, "image_gate": None,
               "gradient_gate": None}
        if self.variant == "vm_concat":
            phi_i = self.image_branch(torch.cat([x, gf, gm], dim=1))
        else:
            phi_i = self.image_branch(x)
        out["image_field"] = phi_i
        if not self.dual:
            out["field"] = phi_i
            return out
        phi_g = self.gradient_branch(torch.cat([gf, gm], dim=1))
        out["gradient_field"] = phi_g
        if self.variant == "average":
            out["field"] = 0.5 * (phi_i + phi_g)
            return out
        gates = torch.sigmoid(self.gate(torch.cat([phi_i, phi_g], dim=1)))
        gi, gg = gates[:, :self.dims], gates[:, self.dims:]
        out["image_gate"], out["gradient_gate"] = gi, gg
        out["field"] = self.fuse(torch.cat([gi * phi_i, gg * phi_g], dim=1))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.forward_details(x)
        return torch.cat([d["field"], d["gradient_field"]], dim=1) if self.dual else d["field"]


def gradnet_size_multiple(architecture: dict) -> int:
    """Spatial sizes GradNet accepts are multiples of this (its VoxelMorph branches' multiple)."""
    return size_multiple(dict(DEFAULT_GRAD_ARCHITECTURE, **(architecture or {})))


def gradnet(architecture: dict | None = None) -> nn.Module:
    """Build the GradNet described by ``architecture`` (see :data:`DEFAULT_GRAD_ARCHITECTURE`)."""
    return GradNet(architecture)
