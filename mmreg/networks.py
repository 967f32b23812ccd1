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
DEFAULT_ARCHITECTURE = {"kind": "voxelmorph_unet", "spatial_dims": 3, "channels": [16, 32, 32, 32, 32, 32, 32, 32],
                        "final_conv_channels": [16, 16]}


def size_multiple(architecture: dict) -> int:
    """Spatial sizes the network accepts are multiples of this (2 ** number of strided downsamplings)."""
    return 2 ** (len(architecture["channels"]) // 2)


def registration_unet(architecture: dict | None = None) -> nn.Module:
    """Build the network described by ``architecture`` (see :data:`DEFAULT_ARCHITECTURE`)."""
    from monai.networks.nets import VoxelMorphUNet  # noqa: PLC0415

    arch = dict(DEFAULT_ARCHITECTURE, **(architecture or {}))
    if arch.get("kind") != "voxelmorph_unet":
        raise ValueError(f"Unknown network kind '{arch.get('kind')}'; this version builds 'voxelmorph_unet'.")
    dims = int(arch["spatial_dims"])
    net = VoxelMorphUNet(spatial_dims=dims, in_channels=2, unet_out_channels=int(arch["final_conv_channels"][0]),
                         channels=tuple(int(c) for c in arch["channels"]),
                         final_conv_channels=tuple(int(c) for c in arch["final_conv_channels"]),
                         use_maxpool=False)
    last = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))][-1]
    if last.out_channels != dims:  # pragma: no cover - guards against a MONAI layout change
        raise RuntimeError("Unexpected VoxelMorphUNet layout: the last convolution does not output the field.")
    with torch.no_grad():
        nn.init.normal_(last.weight, std=1e-5)
        nn.init.zeros_(last.bias)
    return net


def parameter_count(network: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- FMIRNet (method ``multiscale``)

#: Default architecture of the ``multiscale`` network (FMIRNet): a residual U-Net (MONAI ResidualUnit
#: blocks, LeakyReLU(0.2), strided-convolution downsampling) whose decoder predicts displacement fields
#: at full, 1/2 and 1/4 resolution; ``scales`` = how many of them are used (1: FMIRNet-1, 2, 3).
DEFAULT_MULTISCALE_ARCHITECTURE = {"kind": "fmirnet", "spatial_dims": 3, "scales": 3,
                                   "encoder_channels": [16, 32, 32, 32, 32], "decoder_channels": [32, 32, 32, 16],
                                   "subunits": 2, "max_displacement_voxels": 10.0}


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
    features and the scale fields, then a sigmoid) gives one weight per voxel in (0, 1) that
    multiplies the preliminary field. ``forward`` returns that final field ``(B, ndim, *spatial)``
    (engine convention: channel k along tensor dimension k + 2; a displacement, or a velocity when the
    model is diffeomorphic); :meth:`forward_details` also returns the scale fields and the attention.
    The field heads start at N(0, 1e-5) weights and zero bias: an untrained network is the identity.
    Each scale field is bounded softly, ``b * tanh(f / b)`` with ``b`` = ``max_displacement_voxels`` of
    the full grid (linear for small fields): without a bound, a field scaled up and an attention scaled
    down give the same product, and Adam drove runs there until the attention was 0 and the network dead
    (measured on the brain data: preliminary field ~1e5 voxels, attention 0, at step 150).
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
        in full-grid voxels, "preliminary": their sum, "attention": (B, 1, *spatial) weights in (0, 1)}``."""
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
        attention = torch.sigmoid(self.attention(levels[-1]))
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
