"""The joint registration-segmentation measurement on the shared IXI data (issue: FMIRNet label propagation).

    python -m mmreg.bench.jointseg [--annotated 2] [--steps 300] [--method multiscale] [--output docs]
                                   [--seed 0] [--propagated-dir DIR]

A few IXI T1 subjects are "annotated" (their DLMUSE labels are used), the others except the held-out
pair are "unannotated" (their labels are NOT used for training; they only score the propagated
labels), IXI049 and IXI051 are the held-out test images. The same U-Net (same seed, same steps) is
trained on the annotated images alone and on the annotated images plus the labels propagated by
registration from each annotated image to each unannotated one; both are scored by Dice on the
held-out images. Writes ``joint_segmentation.md`` and ``.json`` into ``--output``.

``--propagated-dir DIR`` keeps the propagated label maps (``ATLAS_to_TARGET.nii.gz``): a later run with
the same subjects reuses them instead of registering again (the registrations are most of a run's
time when the segmenter trains briefly), so the segmentation settings can be varied on the same labels.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from .cases import ixi_subjects

HELD_OUT = ("IXI049", "IXI051")


def main(argv=None) -> int:
    """Run the comparison and write the tables; returns 0."""
    parser = argparse.ArgumentParser(prog="python -m mmreg.bench.jointseg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotated", type=int, default=2, help="how many IXI subjects keep their labels (default 2)")
    parser.add_argument("--labels", default="largest:12", help="label ids to learn (default largest:12)")
    parser.add_argument("--method", default="multiscale")
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of both segmenters (default 0)")
    parser.add_argument("--propagated-dir", default=None,
                        help="keep the propagated label maps here and reuse them when all are present")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data", default=None)
    parser.add_argument("--output", default="docs")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    from ..cli import _options  # noqa: PLC0415
    from ..segmentation import joint_segmentation_experiment, propagate_to_unannotated, write_segmentation  # noqa: PLC0415

    subjects = ixi_subjects(args.data)
    test = [(img, lab) for sid, img, lab in subjects if sid in HELD_OUT]
    rest = [(sid, img, lab) for sid, img, lab in subjects if sid not in HELD_OUT]
    annotated = [(img, lab) for _, img, lab in rest[:args.annotated]]
    unannotated = [img for _, img, _ in rest[args.annotated:]]
    truth = [lab for _, _, lab in rest[args.annotated:]]
    cache = _propagated_files(args.propagated_dir, [sid for sid, _, _ in rest[:args.annotated]],
                              [sid for sid, _, _ in rest[args.annotated:]])
    reuse = cache is not None and all(f.is_file() for f in cache)
    register_options = dict(_options(args.option), threads=args.threads)
    t0 = time.perf_counter()
    propagated = None
    if reuse:
        propagated = [(img, str(f)) for img, f in zip(unannotated * args.annotated, cache)]
    elif cache is not None:  # propagate first and keep the labels before the (long) segmentation training
        propagated = propagate_to_unannotated(annotated, unannotated, method=args.method, model=args.model,
                                              register_options=register_options, log=_log)
        for (_, labels), f in zip(propagated, cache):
            write_segmentation(labels, f)
    prop_s = time.perf_counter() - t0
    res = joint_segmentation_experiment(
        annotated, unannotated, test, labels=args.labels, method=args.method, model=args.model,
        spacing_mm=args.spacing, steps=args.steps, seed=args.seed, threads=args.threads, propagated=propagated,
        register_options=register_options, unannotated_truth=truth, log=_log)
    if propagated is not None and not reuse:
        res["propagation_s"] = prop_s
    res.pop("networks")
    res.pop("propagated")
    res["propagated_reused_from"] = str(args.propagated_dir) if reuse else None
    res.update({"command": " ".join(["python -m mmreg.bench.jointseg", *argv]),
                "annotated_subjects": [sid for sid, _, _ in rest[:args.annotated]],
                "unannotated_subjects": [sid for sid, _, _ in rest[args.annotated:]], "test_subjects": list(HELD_OUT),
                "method": args.method, "model": args.model, "options": args.option, "wall_s": time.perf_counter() - t0,
                "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads"})
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "joint_segmentation.json").write_text(json.dumps(res, indent=1))
    a, w = res["annotated_only"], res["with_propagated"]
    lines = [
        "# Joint registration-segmentation on IXI T1 (label propagation)", "",
        f"Generated by `{res['command']}`. Annotated: {', '.join(res['annotated_subjects'])}; unannotated (labels "
        f"not used for training): {', '.join(res['unannotated_subjects'])}; held-out test: {', '.join(HELD_OUT)}. "
        f"Labels: the {len(res['label_ids'])} DLMUSE ids chosen by `{args.labels}` on the first annotated subject. "
        f"Segmentation network: MONAI U-Net (channels 16-128, residual units), {res['steps']} Adam steps, "
        f"{args.spacing:g} mm grid, same seed ({args.seed}) for both rows. Registration: `{args.method}`"
        f"{' model ' + args.model if args.model else ''}{' options ' + ' '.join(args.option) if args.option else ''}"
        f"{' (propagated labels reused from an earlier run of the same registrations)' if reuse else ''}.", "",
        "| training labels | training images | held-out mean Dice | per test image | training s |",
        "|---|---:|---:|---|---:|",
        f"| annotated only | {res['annotated']} | {a['mean_dice']:.3f} | {', '.join(f'{d:.3f}' for d in a['per_image'])} | "
        f"{res['train_s']['annotated_only']:.0f} |",
        f"| annotated + propagated | {res['annotated'] + res['annotated'] * res['unannotated']} | {w['mean_dice']:.3f} | "
        f"{', '.join(f'{d:.3f}' for d in w['per_image'])} | {res['train_s']['with_propagated']:.0f} |", "",
        f"Propagated labels against the unannotated subjects' true labels (mean Dice over labels and pairs): "
        f"{res.get('propagated_label_dice', float('nan')):.3f}; "
        + (f"reused from {args.propagated_dir}" if reuse else
           f"propagation took {res['propagation_s']:.0f} s for {res['annotated'] * res['unannotated']} registrations")
        + f". Whole run {res['wall_s']:.0f} s on {res['machine']}.", "",
        "Per label (held-out mean Dice, annotated only -> with propagated labels): "
        + ", ".join(f"{k}: {a['per_label'][k]:.2f} -> {w['per_label'][k]:.2f}" for k in a["per_label"]), ""]
    (out / "joint_segmentation.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _log(message: str) -> None:
    print(message, flush=True)


def _propagated_files(folder, atlas_ids: list, target_ids: list):
    """The cache files of the propagated label maps, atlas-major like the propagation itself, or None."""
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return [Path(folder) / f"{a}_to_{t}.nii.gz" for a in atlas_ids for t in target_ids]


if __name__ == "__main__":
    raise SystemExit(main())
