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
