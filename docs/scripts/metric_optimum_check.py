"""Is a learned metric's optimum the true alignment? Scores on a benchmark case with a known deformation.

    python docs/scripts/metric_optimum_check.py [--modality T2|PD] [--model metric_mr] [--data DIR]

Case: avg152T1 <- avg152T2 (seed 0) or PD (seed 1) warped by the benchmark's known deformation.
Prints the learned metric's mean patch score (lower = more similar; over the whole field of view,
and over the fixed foreground) of the fixed image against: the moving image as given, the moving
image warped by the TRUE inverse deformation, and the results of the registration pipeline with
the learned metric and with MI (the method's defaults: affine start, similarity + B-spline).
If the learned pipeline's result scores lower than the true alignment while its Dice is lower,
the metric's optimum is wrong and no optimiser can fix it. About 4 minutes on one thread.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mmreg  # noqa: E402
from mmreg.bench.cases import template_known_deformation  # noqa: E402
from mmreg.grid import NetworkGrid  # noqa: E402
from mmreg.intensity import normalize_intensity  # noqa: E402
from mmreg.models import load_model  # noqa: E402
from mmreg.patch_metric import dense_dissimilarity, patch_metric_network  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modality", choices=("T2", "PD"), default="T2")
    ap.add_argument("--model", default="metric_mr", help="learned metric: a model name or folder")
    ap.add_argument("--data", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    case = template_known_deformation(args.modality, 0 if args.modality == "T2" else 1, root=args.data)
    fixed, moving = case.fixed, case.moving
    network, card = load_model("metric", args.model, patch_metric_network, "cpu")
    field = sitk.Cast(case.true_displacement, sitk.sitkVectorFloat64)
    truth = sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0)
    grid = NetworkGrid.for_image(fixed, spacing=float(card.spacing_mm), multiple=1)
    fixed_t = grid.image_to_tensor(grid.resample(normalize_intensity(fixed, "MR")[0]))

    def score(image) -> str:
        moving_t = grid.image_to_tensor(grid.resample(normalize_intensity(image, "MR")[0]))
        with torch.no_grad():
            whole = float(dense_dissimilarity(network, fixed_t, moving_t))
            fg = float(dense_dissimilarity(network, fixed_t, moving_t, mask=(fixed_t > 0.05).float()))
        return f"score {whole:+.3f} (foreground {fg:+.3f})"

    print(f"{case.name}, learned metric {args.model}")
    print(f"  moving as given            {score(moving)}")
    print(f"  true alignment             {score(truth)}")
    for similarity in ("learned", "mi"):
        r = mmreg.register(fixed, moving, method="metric", similarity=similarity, threads=1,
                           model=args.model if similarity == "learned" else None)
        print(f"  pipeline result, {similarity:8s}  {score(r.warped)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
