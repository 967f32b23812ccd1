"""Does the ``disentangled`` registration objective point to the right deformation? (docs/disentangled.md)

Optimises a free displacement field (4 mm grid, 80 Adam steps, lr 0.1, diffusion weight 1) of a benchmark
case with one similarity term at a time and prints the tissue Dice before and after:

* ``msd``: 5 x mean squared difference between the warped moving image translated into the fixed modality
  (the RDM of MODEL, frozen) and the fixed image (the registration stage's image term);
* ``content``: L1 between the content codes of the warped moving image and of the fixed image;
* ``both``: the two together (the paper's weights); ``mind``: MIND-SSC on the images themselves (reference).

    python docs/scripts/disentangled_loss_probe.py disentangled_t1t2_rdm template:T2:0 msd,content,both,mind
"""
import sys

import SimpleITK as sitk
import torch

from mmreg.bench.cases import build_cases
from mmreg.grid import NetworkGrid
from mmreg.intensity import normalize_intensity
from mmreg.losses import MINDSSCLoss, diffusion_regulariser
from mmreg.methods.disentangled import disentangled_network
from mmreg.metrics import mean_dice
from mmreg.models import load_model
from mmreg.spatial import warp


def main(model: str, case_spec: str, kinds: str, smoothness: float = 1.0) -> None:
    torch.manual_seed(0)
    net, _ = load_model("disentangled", model, disentangled_network, "cpu")
    rdm = net.rdm.requires_grad_(False)
    case = build_cases(case_spec)[0]
    grid = NetworkGrid.for_image(case.fixed_image(), spacing=4.0, multiple=16)

    def on(img, interp=sitk.sitkLinear):
        return grid.image_to_tensor(sitk.Resample(img, grid.reference_image(), sitk.Transform(), interp, 0.0))
    fixed = on(normalize_intensity(case.fixed_image())[0])
    moving = on(normalize_intensity(case.moving_image())[0])
    fixed_labels = on(case.fixed_label_map(), sitk.sitkNearestNeighbor)[0, 0].numpy().astype(int)
    moving_labels = on(case.moving_label_map(), sitk.sitkNearestNeighbor)
    ids = case.scored_labels()

    def dice(u):
        warped = warp(moving_labels, u, mode="nearest", padding_mode="zeros")[0, 0].round().numpy().astype(int)
        return mean_dice(fixed_labels, warped, ids)
    print(f"{case.name}: identity Dice {dice(torch.zeros(1, 3, *fixed.shape[2:])):.4f}")
    mind = MINDSSCLoss()
    for kind in kinds.split(","):
        u = torch.zeros(1, 3, *fixed.shape[2:], requires_grad=True)
        opt = torch.optim.Adam([u], lr=0.1)
        for _ in range(80):
            w = warp(moving, u)
            if kind == "mind":
                sim = mind(w, fixed)
            else:
                content = rdm.content[1](w)
                msd = 5 * ((rdm.generator[0](content, rdm.style[0](fixed)) - fixed) ** 2).mean()
                cont = (content - rdm.content[0](fixed)).abs().mean()
                sim = {"msd": msd, "content": cont, "both": msd + cont}[kind]
            loss = sim + smoothness * diffusion_regulariser(u)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{kind}: Dice after {dice(u.detach()):.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:4], *(float(a) for a in sys.argv[4:5]))
