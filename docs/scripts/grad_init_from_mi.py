"""Initial weights for a ``grad`` network taken from a trained ``mi`` model (the experiment of docs/grad.md,
"Starting from mi_brain").

``grad``'s image branch is the same VoxelMorph U-Net as ``mi``'s network (same ``channels`` and
``final_conv_channels``), so ``mi_brain``'s weights fit it under the prefix ``image_branch.``. For the
dual-branch variants (``gated``, ``average``) the gradient branch gets the same weights (it reads the two
gradient maps, 2 channels like the image pair), and a gated network's gate and fusion convolutions keep
their fresh initialisation (gates 0.5, fusion [I, I]: the average of the two fields).

    python docs/scripts/grad_init_from_mi.py --variant vm --out mi_brain_as_vm.pt
    mmreg train Resources/Training/grad_mr_vm.toml --base-model mi_brain_as_vm.pt \
        --output grad_vm_from_mi --learning-rate 2e-4 --smoothness 0.1 --iterations 2000

(The runs of docs/grad.md also set ``gradient_smoothness = 0.05`` in a copy of the recipe; it has no
command-line flag.)

The ``vm_concat`` variant reads 4 channels and cannot take ``mi``'s first convolution.
"""
from __future__ import annotations

import argparse

import torch

from mmreg.methods.grad import GradRegistration
from mmreg.methods.mi import MIRegistration
from mmreg.models import load_model


def grad_weights_from_mi(variant: str, mi_model: str = "mi_brain") -> dict:
    """A state dict for a ``grad`` network of ``variant`` (vm, average, gated) whose branches hold ``mi_model``'s
    weights; raises ValueError for ``vm_concat`` or an ``mi`` model of another architecture."""
    if variant not in ("vm", "average", "gated"):
        raise ValueError(f"variant {variant!r}: only vm, average and gated have 2-channel branches like mi's network")
    mi_net, card = load_model("mi", mi_model, MIRegistration.build_network, "cpu")
    architecture = {"kind": "gradnet", "spatial_dims": int(card.architecture.get("spatial_dims", 3)),
                    "variant": variant, "channels": card.architecture["channels"],
                    "final_conv_channels": card.architecture["final_conv_channels"]}
    state = GradRegistration.build_network(architecture).state_dict()
    branches = ["image_branch"] + (["gradient_branch"] if variant in ("average", "gated") else [])
    for prefix in branches:
        for key, value in mi_net.state_dict().items():
            name = f"{prefix}.{key}"
            if name not in state or state[name].shape != value.shape:
                raise ValueError(f"{mi_model}: '{key}' does not fit the grad {variant} network's {prefix}")
            state[name] = value.clone()
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="vm", choices=("vm", "average", "gated"))
    parser.add_argument("--mi-model", default="mi_brain")
    parser.add_argument("--out", required=True, help="the .pt file to write (give it to mmreg train --base-model)")
    args = parser.parse_args()
    torch.save(grad_weights_from_mi(args.variant, args.mi_model), args.out)
    print(f"wrote {args.out}: grad {args.variant} network with {args.mi_model}'s weights in its branches")


if __name__ == "__main__":
    main()
