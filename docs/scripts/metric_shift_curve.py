"""The learned metrics and MI on ALIGNED multi-modal pairs shifted along one axis (issue 6's check).

    python docs/scripts/metric_shift_curve.py [--output docs] [--max-shift 12] [--step 1]
        [--mr-model NAME_OR_FOLDER] [--ctmr-model NAME_OR_FOLDER] [--learned-only]

(``--mr-model`` / ``--ctmr-model``: check a retrained metric in place of the shipped one;
``--learned-only``: skip the MI curves.)

For each aligned pair of the shared data (avg152 T1 with avg152 T2 and PD, and the scct_cormack CT
template with avg152 T1: one space, one grid) the moving image is translated by -max..+max mm along
each axis (x = left-right, y = posterior-anterior, z = inferior-superior, LPS) and compared with the
fixed image as the registration compares them (:func:`mmreg.methods.metric.similarity_profile`):

* the learned metric (``metric_mr`` for MR-MR, ``metric_ctmr`` for CT-MR) on its own grid (its
  training spacing), the mean patch score over the field of view;
* minus MI, 75 bins, over the field of view and over the dilated fixed foreground (``mi_masked``),
  on a 2 mm grid, the same 200k-voxel subset at every shift.

A good metric gives a smooth curve with its minimum at 0 mm. Writes ``learned_metric_shift_curve.png``
and ``.json`` in ``--output``: each curve min-max scaled to [0, 1] in the figure (the raw values are in
the JSON), with the minimum's position and the curve's roughness (the largest second difference of
the scaled curve, 0 for a straight line) and the width of its flat bottom (the shifts around the
minimum within 5 % of the curve's range of it) listed per curve.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))

from mmreg.bench.cases import data_dir  # noqa: E402
from mmreg.grid import NetworkGrid  # noqa: E402
from mmreg.image import read_image  # noqa: E402
from mmreg.intensity import normalize_intensity  # noqa: E402
from mmreg.methods.metric import similarity_profile  # noqa: E402
from mmreg.models import load_model  # noqa: E402
from mmreg.pipeline import _ones_like  # noqa: E402
from mmreg.patch_metric import patch_metric_network  # noqa: E402

PAIRS = [  # (label, fixed file, moving file, learned model)
    ("avg152 T1 <- T2", ("spm12_mni_T1T2PD_labels", "canonical_avg152T1.nii.gz"),
     ("spm12_mni_T1T2PD_labels", "canonical_avg152T2.nii.gz"), "metric_mr"),
    ("avg152 T1 <- PD", ("spm12_mni_T1T2PD_labels", "canonical_avg152T1.nii.gz"),
     ("spm12_mni_T1T2PD_labels", "canonical_avg152PD.nii.gz"), "metric_mr"),
    ("avg152 T1 <- CT template", ("spm12_mni_T1T2PD_labels", "canonical_avg152T1.nii.gz"),
     ("ichseg_CT_template_MNI", "scct_cormack.nii.gz"), "metric_ctmr"),
]
AXES = {"x (L-R)": 2, "y (P-A)": 1, "z (I-S)": 0}  # numpy axis of the (z, y, x) tensors
MI_SPACING_MM = 2.0


@lru_cache(maxsize=None)
def tensors(fixed_path: Path, moving_path: Path, spacing: float):
    """Normalised fixed and moving images and the fixed field of view on one grid of ``spacing`` mm over
    the fixed image (cached: the similarities sharing a grid read and resample the files once)."""
    fixed, moving = read_image(fixed_path, "fixed"), read_image(moving_path, "moving")
    fixed_n, _ = normalize_intensity(fixed, "MR")
    moving_n, _ = normalize_intensity(moving, "MR")  # the Cormack-unit CT template is normalised like MR
    grid = NetworkGrid.for_image(fixed, spacing=spacing, multiple=1)
    return (grid.image_to_tensor(grid.resample(fixed_n)), grid.image_to_tensor(grid.resample(moving_n)),
            grid.image_to_tensor(grid.resample(_ones_like(fixed))), grid)


def scaled(values: np.ndarray) -> np.ndarray:
    """A curve min-max scaled to [0, 1] (a flat curve to 0)."""
    return (values - values.min()) / max(float(np.ptp(values)), 1e-12)


def roughness(values: np.ndarray) -> float:
    return float(np.abs(np.diff(scaled(values), 2)).max()) if len(values) > 2 else 0.0


def flat_width(shifts_mm: np.ndarray, values: np.ndarray, level: float = 0.05) -> float:
    """Width (mm) of the run of shifts around the minimum whose scaled value stays within ``level`` of
    it: a wide flat bottom gives gradient descent nothing to follow near alignment."""
    curve = scaled(values)
    lo = hi = int(np.argmin(curve))
    while lo > 0 and curve[lo - 1] <= level:
        lo -= 1
    while hi < len(curve) - 1 and curve[hi + 1] <= level:
        hi += 1
    return float(shifts_mm[hi] - shifts_mm[lo])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(HERE.parents[1]))
    ap.add_argument("--max-shift", type=float, default=12.0, help="mm")
    ap.add_argument("--step", type=float, default=1.0, help="mm")
    ap.add_argument("--data", default=None)
    ap.add_argument("--mr-model", default="metric_mr", help="learned MR-MR metric: a model name or folder")
    ap.add_argument("--ctmr-model", default="metric_ctmr", help="learned CT-MR metric: a model name or folder")
    ap.add_argument("--learned-only", action="store_true", help="only the learned metric's curves")
    args = ap.parse_args(argv)
    chosen = {"metric_mr": args.mr_model, "metric_ctmr": args.ctmr_model}
    torch.set_num_threads(1)
    root = data_dir(args.data)
    shifts_mm = np.round(np.arange(-args.max_shift, args.max_shift + 1e-6, args.step), 6)
    out, t0 = Path(args.output), time.time()
    results = []
    for label, fixed_parts, moving_parts, shipped in PAIRS:
        model = chosen[shipped]
        network, card = load_model("metric", model, patch_metric_network, "cpu")
        for similarity in ("learned",) if args.learned_only else ("learned", "mi", "mi_masked"):
            spacing = float(card.spacing_mm) if similarity == "learned" else MI_SPACING_MM
            fixed, moving, fov, grid = tensors(root.joinpath(*fixed_parts), root.joinpath(*moving_parts), spacing)
            for axis_name, axis in AXES.items():
                values = np.array(similarity_profile(fixed, moving, shifts_mm / grid.spacing[2 - axis], axis=axis,
                                                     similarity=similarity, mask=fov,
                                                     network=network if similarity == "learned" else None))
                best = float(shifts_mm[int(np.argmin(values))])
                results.append({"pair": label, "similarity": similarity, "model": model if similarity == "learned" else None,
                                "axis": axis_name, "grid_mm": spacing, "shifts_mm": shifts_mm.tolist(),
                                "values": values.tolist(), "minimum_at_mm": best, "roughness": roughness(values),
                                "flat_width_mm": flat_width(shifts_mm, values)})
                print(f"{label:26s} {similarity:9s} {axis_name:8s} minimum at {best:+.1f} mm, "
                      f"roughness {results[-1]['roughness']:.3f}, flat bottom {results[-1]['flat_width_mm']:.0f} mm",
                      flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learned_metric_shift_curve.json").write_text(json.dumps(
        {"command": "python docs/scripts/metric_shift_curve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
         "seconds": round(time.time() - t0, 1), "curves": results}, indent=1))
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    fig, axes = plt.subplots(len(PAIRS), len(AXES), figsize=(4.2 * len(AXES), 3.2 * len(PAIRS)), sharex=True)
    colours = {"learned": "tab:red", "mi": "tab:blue", "mi_masked": "tab:green"}
    names = {"learned": "learned metric", "mi": "minus MI", "mi_masked": "minus MI, masked"}
    for r, (label, *_rest) in enumerate(PAIRS):
        for c, axis_name in enumerate(AXES):
            ax = axes[r, c]
            for rec in (x for x in results if x["pair"] == label and x["axis"] == axis_name):
                ax.plot(rec["shifts_mm"], scaled(np.array(rec["values"])), color=colours[rec["similarity"]],
                        label=f"{names[rec['similarity']]} (min {rec['minimum_at_mm']:+.0f} mm)")
            ax.axvline(0, color="grey", lw=0.8, ls=":")
            ax.set_title(f"{label}, shift along {axis_name}", fontsize=9)
            ax.legend(fontsize=7, loc="upper center")
            if r == len(PAIRS) - 1:
                ax.set_xlabel("shift of the moving image (mm)")
            if c == 0:
                ax.set_ylabel("value, scaled to [0, 1]")
    fig.suptitle("Similarity of aligned pairs under a shift (lower = more similar; should be smooth, minimum at 0)")
    fig.tight_layout()
    fig.savefig(out / "learned_metric_shift_curve.png", dpi=90)
    print(f"wrote {out / 'learned_metric_shift_curve.png'} and .json in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
