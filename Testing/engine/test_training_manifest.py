"""Training on a user's own pairs: manifests, bad entries skipped, stop/resume through the STOP file,
the `mmreg train --method --data` command, model management, and torchrun data parallelism."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import mmreg
from mmreg.errors import CancelledError, InputError
from mmreg.manifest import read_manifest, write_manifest
from mmreg.models import delete_model, install_model, list_models, load_model, rename_model
from mmreg.networks import registration_unet
from mmreg.training import (config_for_manifest, config_from_dict, load_checkpoint, prepare_manifest, read_progress,
                            request_stop, train)
from test_training import blob  # the same phantom as the subject-based training tests

N = 32
TINY_ARCH = {"channels": [8, 8, 8, 8], "final_conv_channels": [8]}
NO_AUGMENT = {"deformation_max_mm": 0, "rotation_deg": 0, "scale": 0, "translation_mm": 0, "bias_strength": 0,
              "noise_std": 0}


def blob_images(shift_x: float, origin=(0.0, 0.0, 0.0), contrast=(0, 0.5, 0.8, 0.3, 0.6)):
    """The 32^3 phantom of test_training.blob as 2 mm SimpleITK images at ``origin``: (image x 1000, labels)."""
    subject = blob("", shift_x, contrast)
    out = []
    for arr in (subject.image * 1000.0, subject.labels):
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing([2.0, 2.0, 2.0])
        im.SetOrigin(origin)
        out.append(im)
    return out


def write_pairs(folder: Path, shifts=(3.0, 2.0, -3.0, 3.0)) -> list:
    """Fixed blobs at 0, moving blobs shifted (in another world position per pair); manifest rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, shift in enumerate(shifts):
        origin = (10.0 * k, -5.0 * k, 3.0 * k)
        fixed, fixed_lab = blob_images(0.0, origin)
        moving, moving_lab = blob_images(shift, origin, contrast=(0, 0.9, 0.2, 0.6, 0.4))  # another contrast
        names = [f"f{k}.nii.gz", f"f{k}_lab.nii.gz", f"m{k}.nrrd", f"m{k}_lab.nrrd"]
        for im, name in zip((fixed, fixed_lab, moving, moving_lab), names):
            sitk.WriteImage(im, str(folder / name))
        rows.append({"fixed": str(folder / names[0]), "moving": str(folder / names[2]),
                     "fixed_labels": str(folder / names[1]), "moving_labels": str(folder / names[3]),
                     "fixed_modality": "MR", "moving_modality": "MR", "split": "validation" if k == 3 else "train"})
    return rows


def tiny_table(tmp_path: Path, manifest: Path, **kw) -> dict:
    table = {"name": "tiny", "output": str(tmp_path / "model"), "steps": 10, "learning_rate": 4e-3, "threads": 1,
             "device": "cpu", "validation_every": 5, "checkpoint_every": 5, "architecture": TINY_ARCH,
             "smoothness": 0.1, "spacing_mm": 2.0,
             "data": {"manifest": str(manifest), "prealign": "none", "cache_dir": str(tmp_path / "cache")},
             "augment": NO_AUGMENT}
    table.update(kw)
    return table


# ----------------------------------------------------------------------------- manifests


def test_manifest_round_trip_relative_paths_and_malformed_rows(tmp_path):
    rows = write_pairs(tmp_path / "d", shifts=(1.0,))
    for suffix in (".csv", ".json"):
        path = write_manifest(tmp_path / "d" / f"pairs{suffix}", rows)
        text = path.read_text()
        assert "f0.nii.gz" in text and str(tmp_path) not in text  # written relative to the manifest's folder
        entries, problems = read_manifest(path)
        assert problems == [] and len(entries) == 1
        assert entries[0].fixed == rows[0]["fixed"] and entries[0].moving_labels == rows[0]["moving_labels"]
        assert entries[0].split == "train" and entries[0].fixed_modality == "MR"
    bad = tmp_path / "bad.csv"
    bad.write_text("fixed,moving,fixed_modality,split\n"
                   "a.nii,b.nii,PET,\n"          # unknown modality
                   "a.nii,,MR,\n"                # no moving
                   "a.nii,b.nii,ct,val\n")       # fine: CT, validation
    entries, problems = read_manifest(bad)
    assert [e.row for e in entries] == [3] and entries[0].fixed_modality == "CT" and entries[0].split == "validation"
    assert problems == ["row 1: unknown modality 'pet' (use MR, CT or auto)", "row 2: fixed and moving are both required"]
    (tmp_path / "nohead.csv").write_text("a.nii,b.nii\n")
    with pytest.raises(InputError, match="header line"):
        read_manifest(tmp_path / "nohead.csv")
    with pytest.raises(InputError, match="does not exist"):
        read_manifest(tmp_path / "none.csv")


def test_bad_entries_are_reported_and_skipped_and_the_good_pairs_train(tmp_path):
    """A manifest with 4 good pairs and 6 bad entries: the bad ones are named with their reason and left out
    before the first step; the network learns the +x shifts (validation Dice up from the identity's)."""
    d = tmp_path / "d"
    rows = write_pairs(d, shifts=(3.0, 2.0, 2.5, 3.0))
    ref = sitk.ReadImage(rows[0]["fixed"])
    nan = sitk.GetArrayFromImage(ref)
    nan[3, 3, 3] = np.nan
    nan_image = sitk.GetImageFromArray(nan)
    nan_image.CopyInformation(ref)
    sitk.WriteImage(nan_image, str(d / "nan.mha"))
    sitk.WriteImage(sitk.Image([N, N, N], sitk.sitkFloat32), str(d / "flat.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((1, N, N)).astype(np.float32)),
                    str(d / "slice.nii.gz"))
    (d / "broken.nii.gz").write_bytes(b"not an image")
    small_lab = sitk.Image([N // 2, N // 2, N // 2], sitk.sitkUInt8)
    sitk.WriteImage(small_lab, str(d / "small_lab.nii.gz"))
    good = rows[0]
    bad = [dict(good, moving=str(d / "missing.nii.gz"), split=""), dict(good, fixed=str(d / "nan.mha"), split=""),
           dict(good, moving=str(d / "flat.nii.gz"), split=""), dict(good, fixed=str(d / "broken.nii.gz"), split=""),
           dict(good, moving_labels=str(d / "small_lab.nii.gz"), split=""),
           dict(good, fixed=str(d / "slice.nii.gz"), fixed_labels="", split="")]
    manifest = write_manifest(d / "pairs.csv", rows + bad)
    with open(manifest, "a") as f:
        f.write("only_fixed.nii.gz,,,,,,\n")
    cfg = config_from_dict(tiny_table(tmp_path, manifest, steps=40, validation_every=10))
    lines = []
    result = train(cfg, log=lines.append)
    info = result.card.training["data"]
    reasons = {s["entry"].split(":")[0]: s["reason"] for s in info["skipped"]}
    assert set(reasons) == {f"row {i}" for i in range(5, 12)}, reasons
    assert "missing.nii.gz" in reasons["row 5"] and "NaN" in reasons["row 6"]
    assert "constant" in reasons["row 7"] and "could not read" in reasons["row 8"].lower()
    assert "label map is not on the grid" in reasons["row 9"] and "2-D" in reasons["row 10"]
    assert "required" in reasons["row 11"]
    assert sum("skipped" in line for line in lines) >= 7
    assert len(info["training_pairs"]) == 3 and info["validation_pairs"] == ["row 4: f3.nii.gz <- m3.nrrd"]
    assert len(info["manifest_sha256"]) == 64
    h = result.history
    assert np.mean(h["loss"][-10:]) < np.mean(h["loss"][:10]) - 0.01
    assert [v["step"] for v in h["validation"]] == [0, 10, 20, 30, 40]
    assert h["identity_dice"] < 0.6 and h["best"]["mean_dice"] > h["identity_dice"] + 0.1, h["validation"]
    assert result.card.training["weights"] == f"best (step {h['best']['step']})"
    events, offset = read_progress(result.model_dir)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 40 and kinds.count("validation") == 5
    assert events[0]["pairs"] == {"training": 3, "validation": 1} and len(events[0]["skipped"]) == 7
    steps = [e for e in events if e["event"] == "step"]
    assert steps[-1]["eta_s"] == 0 and steps[0]["eta_s"] > 0 and all(np.isfinite(e["loss"]) for e in steps)
    assert read_progress(result.model_dir, offset) == ([], offset)  # nothing new
    assert "model written" in (result.model_dir / "training" / "log.txt").read_text()

    # The model registers a pair from files through the normal API (its folder as the model).
    res = mmreg.register(rows[3]["fixed"], rows[3]["moving"], method="mi", model=str(result.model_dir), affine=False,
                         fixed_labels=rows[3]["fixed_labels"], moving_labels=rows[3]["moving_labels"], device="cpu",
                         threads=1)
    q = res.report["quality"]
    assert q["labels"]["mean_dice"] > q["labels_after_affine"]["mean_dice"] + 0.05  # (no affine: the identity)


def test_every_entry_bad_or_validation_only_is_an_input_error(tmp_path):
    d = tmp_path / "d"
    rows = write_pairs(d, shifts=(1.0, 2.0))
    manifest = write_manifest(d / "bad.csv", [dict(rows[0], moving=str(d / "gone.nii.gz"))])
    with pytest.raises(InputError, match="No usable pair.*gone.nii.gz"):
        prepare_manifest(config_from_dict(tiny_table(tmp_path, manifest)))
    manifest = write_manifest(d / "val.csv", [dict(r, split="validation") for r in rows])
    with pytest.raises(InputError, match="marked validation"):
        prepare_manifest(config_from_dict(tiny_table(tmp_path, manifest)))
    # Automatic split: 20 % of 2 unmarked pairs -> 1 held out; with affine pre-alignment the shift is gone.
    manifest = write_manifest(d / "auto.csv", [dict(r, split="") for r in rows])
    data = prepare_manifest(config_from_dict(tiny_table(tmp_path, manifest, data={
        "manifest": str(manifest), "cache_dir": str(tmp_path / "cache"), "prealign": "affine"})))
    assert len(data.train_pairs) == 1 and len(data.val_pairs) == 1
    plain = prepare_manifest(config_from_dict(tiny_table(tmp_path, manifest)))  # prealign "none"
    assert [p.name for p in plain.val_pairs] == [p.name for p in data.val_pairs]  # the same seeded split
    from mmreg.metrics import mean_dice
    dice = [mean_dice(p.fixed_labels, p.moving_labels, [1, 2, 3, 4]) for p in (plain.val_pairs[0], data.val_pairs[0])]
    assert dice[1] > dice[0] + 0.05  # the affine took out most of the shift


def test_stop_file_keeps_checkpoint_and_model_and_resume_is_exact(tmp_path):
    """request_stop() during a run: it stops after that step with the checkpoint and a usable model; --resume
    then ends with the weights of an uninterrupted run (every pair comes from its own seed)."""
    d = tmp_path / "d"
    manifest = write_manifest(d / "pairs.csv", write_pairs(d))
    aug = {"bias_strength": 0.3, "noise_std": 0.02}
    straight = train(config_from_dict(tiny_table(tmp_path / "a", manifest, steps=6, checkpoint_every=0, augment=aug,
                                                 batch_size=2)))
    cfg = config_from_dict(tiny_table(tmp_path / "b", manifest, steps=6, checkpoint_every=0, augment=aug, batch_size=2))
    out = cfg.output_dir()

    def stop_at_three(fraction, message):
        if message.startswith("step 3/"):
            request_stop(out)
    with pytest.raises(CancelledError, match="stopped at step 3"):
        train(cfg, progress=stop_at_three)
    assert load_checkpoint(out / "training" / "last.pt")["step"] == 3
    net, card = load_model("mi", out, registration_unet)
    assert card.training["stopped_at_step"] == 3
    events, _ = read_progress(out)
    assert events[-1]["event"] == "stopped" and events[-1]["model_dir"] == str(out)
    resumed = train(cfg, resume=True)
    assert resumed.final_step == 6
    a = torch.load(straight.model_dir / "model.pt", weights_only=True)
    b = torch.load(resumed.model_dir / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(straight.history["loss"], resumed.history["loss"], rtol=1e-5)


# ----------------------------------------------------------------------------- the command and the models


def test_cli_trains_from_a_manifest_and_fine_tunes_with_the_base_models_settings(tmp_path, monkeypatch, capsys):
    from mmreg.cli import main
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("MMREG_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "d"
    manifest = write_manifest(d / "pairs.json", write_pairs(d, shifts=(3.0, 2.0)))
    cfg_file = tmp_path / "tiny.toml"
    cfg_file.write_text('name = "tiny"\nspacing_mm = 4.0\nthreads = 1\nvalidation_every = 0\ncheckpoint_every = 0\n'
                        'mi_blur_voxels = 0.5\nsmoothness = 0.3\n'
                        '[architecture]\nchannels = [8, 8, 8, 8]\nfinal_conv_channels = [8]\n')
    assert main(["train", str(cfg_file), "--data", str(manifest), "--iterations", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "written to" in out  # (both pairs marked train: no validation)
    assert [m["name"] for m in list_models("mi") if m["source"] == "user"] == ["tiny"]
    # Without a config: the base model's architecture and spacing are taken from its card.
    cfg = config_for_manifest("mi", manifest, base_model="tiny", steps=1, augment=False)
    assert cfg.spacing_mm == 4.0 and cfg.architecture["channels"] == [8, 8, 8, 8] and cfg.name == "mi_pairs"
    assert cfg.mi_blur_voxels == 0.5 and cfg.smoothness == 0.3  # the base model's loss settings
    assert config_for_manifest("mi", manifest, base_model="tiny", smoothness=0.7).smoothness == 0.7
    assert cfg.augment.bias_strength == 0 and cfg.data.manifest == str(manifest.resolve())
    assert cfg.warmup_steps == 0 and cfg.gradient_clip == 0  # off unless asked for
    code = main(["train", "--method", "mi", "--data", str(manifest), "--base-model", "tiny", "--name", "tuned",
                 "--iterations", "1", "--threads", "1", "--device", "cpu", "--quiet",
                 "--warmup-steps", "3", "--gradient-clip", "2.5", "--seed", "7"])
    assert code == 0, capsys.readouterr().err
    card = json.loads((tmp_path / "models" / "mi" / "tuned" / "model.json").read_text())
    assert card["training"]["base_model"].startswith("tiny") and card["spacing_mm"] == 4.0
    assert card["training"]["config"]["warmup_steps"] == 3 and card["training"]["config"]["gradient_clip"] == 2.5
    assert card["training"]["config"]["seed"] == 7 and cfg.seed == 0  # the default seed is 0
    assert main(["train", "--method", "mi", "--data", str(manifest), "--gradient-clip", "-1", "--quiet"]) == 2
    assert "gradient_clip must be >= 0" in capsys.readouterr().err
    assert main(["train", "--method", "optimize", "--data", str(manifest), "--quiet"]) == 2
    assert "cannot be trained" in capsys.readouterr().err
    assert main(["train", str(cfg_file), "--data", str(manifest), "--validation-fraction", "2", "--quiet"]) == 2
    assert "validation_fraction must be in [0, 0.9]" in capsys.readouterr().err
    assert main(["train", "--method", "mi", "--quiet"]) == 2
    assert "--data MANIFEST" in capsys.readouterr().err
    assert main(["train", "--method", "mi", "--data", str(tmp_path / "nothing.csv"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    code = main(["train", "--method", "mi", "--data", str(manifest), "--name", "tuned", "--iterations", "1", "--quiet"])
    assert code == 2 and "already holds a training run" in capsys.readouterr().err
    # Resume (train further) from the run's own checkpoint: no config file, no --data.
    assert main(["train", "--resume", "--method", "mi", "--name", "tuned", "--iterations", "2", "--quiet"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out  # the run now ends at step 2
    assert json.loads((tmp_path / "models" / "mi" / "tuned" / "model.json").read_text())["training"]["steps"] == 2
    assert main(["train", "--resume", "--output", str(tmp_path / "models" / "mi" / "tuned"), "--learning-rate", "1",
                 "--quiet"]) == 2
    assert "cannot change when resuming" in capsys.readouterr().err
    assert main(["train", "--resume", "--output", str(tmp_path / "models" / "mi" / "tuned"), "--seed", "3",
                 "--quiet"]) == 2
    assert "--seed cannot change when resuming" in capsys.readouterr().err
    assert main(["train", "--resume", "--output", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "holds no training run" in capsys.readouterr().err


def test_models_rename_delete_install(tmp_path, monkeypatch, capsys):
    from mmreg.cli import main
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "models"))
    d = tmp_path / "d"
    manifest = write_manifest(d / "pairs.csv", write_pairs(d, shifts=(3.0, 2.0)))
    result = train(config_from_dict(tiny_table(tmp_path, manifest, steps=1, validation_every=0)))
    assert main(["models", "install", str(result.model_dir), "--name", "clinic"]) == 0
    assert (tmp_path / "models" / "mi" / "clinic" / "model.pt").is_file()
    assert not (tmp_path / "models" / "mi" / "clinic" / "training").exists()  # weights and card only
    load_model("mi", "clinic", registration_unet)  # usable by name, checksum intact
    with pytest.raises(InputError, match="exists already"):
        install_model(result.model_dir, "clinic")
    renamed = rename_model("mi", "clinic", "clinic_v2")
    _, card = load_model("mi", "clinic_v2", registration_unet)
    assert renamed.name == "clinic_v2" and card.name == "clinic_v2"
    shipped = [m["name"] for m in list_models("mi") if m["source"] == "shipped"]
    if shipped:
        with pytest.raises(InputError, match="shipped model"):
            delete_model("mi", shipped[0])
        with pytest.raises(InputError, match="exists already"):
            rename_model("mi", "clinic_v2", shipped[0])
    with pytest.raises(InputError, match="plain folder name"):
        rename_model("mi", "clinic_v2", "../x")
    assert main(["models", "delete", "mi", "clinic_v2"]) == 0
    assert "clinic_v2" not in [m["name"] for m in list_models("mi")]
    assert main(["models", "delete", "mi", "clinic_v2"]) == 2
    assert "No user model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- distributed


def test_two_process_torchrun_gives_the_single_process_model(tmp_path):
    """torchrun, 2 CPU processes (gloo), global batch 2 = 1 pair each, vs one process with batch 2: the same model
    (same pairs per step by their seeds; DDP averages the gradients as the batch mean does)."""
    d = tmp_path / "d"
    manifest = write_manifest(d / "pairs.csv", write_pairs(d))
    table = tiny_table(tmp_path / "single", manifest, steps=3, batch_size=2, validation_every=0, checkpoint_every=0,
                       augment={"bias_strength": 0.3, "noise_std": 0.02, "deformation_max_mm": 4.0})
    single = train(config_from_dict(table))
    cfg_file = tmp_path / "ddp.toml"
    lines = []
    for key, value in dict(table, output=str(tmp_path / "ddp" / "model")).items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for section in ("architecture", "data", "augment"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table[section].items()]
    cfg_file.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mmreg", "train", str(cfg_file), "--quiet"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 3 steps") == 1  # only process 0 reports
    card = json.loads((tmp_path / "ddp" / "model" / "model.json").read_text())
    assert card["training"]["processes"] == 2
    a = torch.load(single.model_dir / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "model" / "model.pt", weights_only=True)
    torch.manual_seed(0)  # the run's seed: its starting network
    base = registration_unet(dict(single.card.architecture)).state_dict()
    moved = max(float((a[k] - base[k]).abs().max()) for k in a)
    assert moved > 1e-3  # the three steps changed the network
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.shared_data
def test_fine_tuning_manifest_of_the_shared_data(shared_data, tmp_path):
    """python -m mmreg.bench.finetune: IXI T1 <- avg152T2/PD for all 10 subjects, the two held out from mi_brain
    marked validation, template labels written beside the manifest on the template grid."""
    from mmreg.bench.finetune import main
    assert main(["--output", str(tmp_path), "--data", str(shared_data)]) == 0
    entries, problems = read_manifest(tmp_path / "manifest.csv")
    assert problems == [] and len(entries) == 20
    val = [e for e in entries if e.split == "validation"]
    assert len(val) == 4 and all(("IXI049" in e.fixed) or ("IXI051" in e.fixed) for e in val)
    labels = sitk.ReadImage(str(tmp_path / "avg152T2_labels.nii.gz"))
    template = sitk.ReadImage(entries[0].moving)
    assert labels.GetSize() == template.GetSize() and len(np.unique(sitk.GetArrayViewFromImage(labels))) > 100
