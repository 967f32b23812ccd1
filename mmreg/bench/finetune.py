"""Fine-tuning on the shared data: a manifest of a modality pair that a shipped model did not see.

    python -m mmreg.bench.finetune --output DIR [--data SHARED_DATA]
    mmreg train --method mi --data DIR/manifest.csv --base-model mi_brain --output DIR/model --iterations 500

The manifest pairs every IXI T1 (fixed, with its DLMUSE labels) with SPM's avg152T2 and avg152PD
templates (moving, with the Neuromorphometrics labels resampled onto the template grid and written
into DIR; the numbering is shared with DLMUSE, so Dice runs over the common IDs). The IXI subjects
held out from the shipped ``mi_brain`` (IXI049, IXI051) are the validation pairs. The images stay
in the shared data folder (the manifest points at them); nothing is copied into the project.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import SimpleITK as sitk

from ..manifest import write_manifest
from .cases import SPM_DIR, data_dir, ixi_subjects, neuromorphometrics_on

#: IXI subjects never trained on by the shipped mi_brain (its validation subjects).
HELD_OUT = ("IXI049", "IXI051")


def write_t1_template_manifest(output, root=None, validation_subjects=HELD_OUT, modalities=("T2", "PD")) -> Path:
    """Write ``output/manifest.csv``: IXI T1 (fixed) <- avg152 ``modalities`` (moving) for every IXI
    subject, ``validation_subjects`` marked "validation", the rest "train"; the templates' label maps
    go to ``output/avg152<mod>_labels.nii.gz``. Returns the manifest's path."""
    output = Path(output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    base = data_dir(root) / SPM_DIR
    templates = {}
    for mod in modalities:
        image_path = base / f"canonical_avg152{mod}.nii.gz"
        labels_path = output / f"avg152{mod}_labels.nii.gz"
        sitk.WriteImage(neuromorphometrics_on(sitk.ReadImage(str(image_path)), root), str(labels_path), True)
        templates[mod] = (image_path, labels_path)
    rows = []
    for sid, t1, labels in ixi_subjects(root):
        for mod, (image_path, labels_path) in templates.items():
            rows.append({"fixed": str(t1), "moving": str(image_path), "fixed_labels": str(labels),
                         "moving_labels": str(labels_path), "fixed_modality": "MR", "moving_modality": "MR",
                         "split": "validation" if sid in validation_subjects else "train"})
    return write_manifest(output / "manifest.csv", rows)


def main(argv=None) -> int:
    """``python -m mmreg.bench.finetune --output DIR [--data SHARED]``: write the manifest, print its path."""
    parser = argparse.ArgumentParser(prog="python -m mmreg.bench.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for manifest.csv and the template label maps")
    parser.add_argument("--data", default=None, help="shared data folder (default: $MMREG_DATA or ../shared/data)")
    args = parser.parse_args(argv)
    print(write_t1_template_manifest(args.output, args.data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
