"""The mmreg command on the shipped sample and on bad input (exit codes, files, numbers)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mmreg.cli import main

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "Sample"
FAST = ["-O", "iterations=[30,30,20]"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's demo command (fewer iterations), run once for the module."""
    out = tmp_path_factory.mktemp("demo")
    argv = ["register", str(SAMPLE / "fixed.nii.gz"), str(SAMPLE / "moving.nii.gz"), "--method", "optimize",
            "--fixed-labels", str(SAMPLE / "fixed_labels.nii.gz"),
            "--moving-labels", str(SAMPLE / "moving_labels.nii.gz"),
            "--output-transform", str(out / "transform.h5"), "--output-warped", str(out / "warped.nii.gz"),
            "--output-warped-labels", str(out / "warped_labels.nii.gz"), "--report", str(out / "report.json"),
            "--quiet", *FAST]
    assert main(argv) == 0
    return out


def test_demo_writes_transform_images_and_report(demo_run):
    report = json.loads((demo_run / "report.json").read_text())
    q = report["quality"]
    # The sample's moving header was moved by 8 degrees and ~12 mm: the affine must find it, and
    # the deformable step must improve the tissue overlap further without folding.
    assert report["affine"]["mattes_mi_after"] < report["affine"]["mattes_mi_before"] - 0.1
    assert q["labels_after_affine"]["mean_dice"] > 0.6
    assert q["labels"]["mean_dice"] > q["labels_after_affine"]["mean_dice"] + 0.04
    assert q["deformable"]["folding_percent"] < 0.5
    for step in ("affine", "method", "warp", "total"):
        assert report["timings_s"][step] >= 0
    fixed = sitk.ReadImage(str(SAMPLE / "fixed.nii.gz"))
    warped = sitk.ReadImage(str(demo_run / "warped.nii.gz"))
    assert warped.GetSize() == fixed.GetSize()
    assert np.allclose(warped.GetOrigin(), fixed.GetOrigin())


def test_demo_transform_file_reproduces_warped_image(demo_run):
    """The .h5 applied by plain SimpleITK gives the engine's warped image."""
    fixed = sitk.ReadImage(str(SAMPLE / "fixed.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(SAMPLE / "moving.nii.gz"), sitk.sitkFloat32)
    tx = sitk.ReadTransform(str(demo_run / "transform.h5"))
    again = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0))
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(demo_run / "warped.nii.gz")))
    inside = again > 0
    assert np.abs(again[inside] - warped[inside]).max() < 1e-3


def test_evaluate_scores_the_written_transform(demo_run, capsys):
    report = json.loads((demo_run / "report.json").read_text())
    assert main(["evaluate", str(demo_run / "transform.h5"), "--fixed-labels", str(SAMPLE / "fixed_labels.nii.gz"),
                 "--moving-labels", str(SAMPLE / "moving_labels.nii.gz"),
                 "--report", str(demo_run / "eval.json")]) == 0
    ev = json.loads((demo_run / "eval.json").read_text())
    assert ev["labels"]["mean_dice"] == pytest.approx(report["quality"]["labels"]["mean_dice"], abs=2e-3)
    assert "mean Dice" in capsys.readouterr().out


def test_methods_lists_optimize_and_mi(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "user"))
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "shipped"))
    assert main(["methods", "--json"]) == 0
    methods = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in methods] == ["optimize", "mi", "metric", "multiscale", "grad", "disentangled"]
    assert methods[2]["models"] == [] and methods[2]["requires_model"] is False  # MI runs without a learned metric
    assert methods[0]["options"]["similarity"] == "mind"
    assert methods[1]["models"] == [] and methods[1]["options"]["refinement_steps"] == 0


def test_mi_without_a_model_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "user"))
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "shipped"))
    argv = ["register", str(SAMPLE / "fixed.nii.gz"), str(SAMPLE / "moving.nii.gz"), "-o", str(tmp_path / "x.h5"),
            "--method", "mi", "--no-affine", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No trained model for method 'mi'" in err and "mmreg train" in err
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("argv, words", [
    (["register", "missing_fixed.nii.gz", str(SAMPLE / "moving.nii.gz"), "-o", "x.h5"], ["does not exist"]),
    (["register", str(SAMPLE / "fixed.nii.gz"), str(SAMPLE / "moving.nii.gz"), "-o", "x.h5", "--method", "nosuch"],
     ["Unknown registration method", "nosuch"]),
    (["register", str(SAMPLE / "fixed.nii.gz"), str(SAMPLE / "moving.nii.gz"), "-o", "x.h5", "-O", "bogus=1"],
     ["Unknown option", "bogus"]),
    (["register", str(SAMPLE / "fixed.nii.gz"), str(SAMPLE / "fixed_labels.nii.gz"), "-o", "x.h5",
      "--output-warped-labels", "wl.nii.gz"], ["--moving-labels"]),
])
def test_bad_input_exit_code_2_with_message(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert not (tmp_path / "x.h5").exists()


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "mmreg.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "mmreg" in out.stdout


def test_sigterm_stops_like_ctrl_c_even_inside_a_library_that_rewraps_the_interrupt():
    import os
    import signal

    from mmreg.cli import _terminate_as_interrupt

    def library_call():  # as SimpleITK does with an exception raised in a Python iteration callback
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
        except KeyboardInterrupt:
            raise RuntimeError("There was an error executing the Python Callable.") from None
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        with _terminate_as_interrupt():
            library_call()
    with pytest.raises(RuntimeError, match="other failure"):  # without a signal an error stays an error
        with _terminate_as_interrupt():
            raise RuntimeError("other failure")
