"""Bad inputs to :func:`mmreg.register` each get an :class:`mmreg.InputError` that names the problem.

Every case goes through the public entry point (images as SimpleITK images or file paths) and
asserts on the key words of the message, and that the error comes before any expensive work
(well under a few seconds). A 2-D image (a PNG or a single slice) is not an error: it is
registered as a single-slice volume.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import mmreg
from mmreg import InputError

pytestmark = pytest.mark.filterwarnings("ignore:.*grid_sample.*")

QUICK = dict(iterations=(3, 3), levels=2)  # bad input must fail before the optimiser matters


@pytest.fixture(autouse=True)
def _one_torch_thread(monkeypatch):
    if "MMREG_THREADS" not in os.environ:
        monkeypatch.setenv("MMREG_THREADS", "1")


def blob_image(size=(24, 20, 16), spacing=(1.2, 1.0, 1.5), origin=(0.0, 0.0, 0.0), shift=(0.0, 0.0, 0.0)):
    """A smooth blob (float32) on an axis-aligned grid; ``shift`` moves the blob in mm."""
    arr = np.zeros(tuple(reversed(size)), np.float32)
    idx = np.meshgrid(*[np.arange(n) for n in reversed(size)], indexing="ij")  # numpy order (z, y, x)
    pos = [idx[len(size) - 1 - a] * spacing[a] + origin[a] for a in range(len(size))]
    centre = [origin[a] + spacing[a] * (size[a] - 1) / 2 + shift[a] for a in range(len(size))]
    r2 = sum((p - c) ** 2 for p, c in zip(pos, centre))
    arr[...] = 100.0 * np.exp(-r2 / (2 * 5.0 ** 2)) + 10.0
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def labels_of(image: sitk.Image, threshold=50.0) -> sitk.Image:
    return sitk.Cast(image > threshold, sitk.sitkUInt8)


@pytest.fixture(scope="module")
def fixed():
    return blob_image()


@pytest.fixture(scope="module")
def moving():
    return blob_image(shift=(1.5, -1.0, 0.5))


def expect_input_error(*words, **kwargs):
    """Run register(**kwargs) and return the InputError; check each word occurs (case-insensitive)."""
    t0 = time.perf_counter()
    with pytest.raises(InputError) as info:
        mmreg.register(**kwargs)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in message: {message}"
    assert time.perf_counter() - t0 < 10, "the error should come before the registration runs"
    return info.value


# ----------------------------------------------------------------------------- images


def test_4d_image(fixed, moving):
    four_d = sitk.JoinSeries([blob_image(shift=(s, 0.0, 0.0)) for s in (0.0, 1.0, 2.0)])  # 3 time points
    assert four_d.GetDimension() == 4
    expect_input_error("fixed image", "4-D", "time", fixed=four_d, moving=moving, affine=False, **QUICK)


def test_vector_rgb_image(fixed):
    rgb = sitk.Image([24, 20, 16], sitk.sitkVectorUInt8, 3)
    expect_input_error("moving image", "vector", "3 components", "grayscale", fixed=fixed, moving=rgb, **QUICK)
    rgb2d = sitk.Image([32, 24], sitk.sitkVectorUInt8, 3)  # a colour PNG
    expect_input_error("vector", "RGB", fixed=fixed, moving=rgb2d, **QUICK)


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")])
def test_non_finite_voxels(fixed, moving, bad, word):
    arr = sitk.GetArrayFromImage(moving)
    arr[3, 4, 5] = bad
    arr[7, 8, 9] = bad
    broken = sitk.GetImageFromArray(arr)
    broken.CopyInformation(moving)
    err = expect_input_error("moving image", word, fixed=fixed, moving=broken, **QUICK)
    assert "2" in str(err)  # the number of bad voxels


def test_empty_image(moving):
    empty = sitk.Image([0, 0, 0], sitk.sitkFloat32)  # SimpleITK 2.5 allows size 0
    expect_input_error("fixed image", "empty", fixed=empty, moving=moving, **QUICK)
    flat = sitk.Image([0, 20, 16], sitk.sitkFloat32)
    expect_input_error("empty", fixed=flat, moving=moving, **QUICK)


def test_constant_image(fixed):
    constant = sitk.Image([24, 20, 16], sitk.sitkFloat32) + 7.0
    expect_input_error("moving image", "constant", "7", fixed=fixed, moving=constant, **QUICK)


def test_unreadable_file(tmp_path, moving):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_input_error("fixed image", "garbage.nii.gz", "unreadable", fixed=path, moving=moving, **QUICK)


def test_missing_file(tmp_path, fixed):
    path = tmp_path / "nowhere" / "moving.nii.gz"
    expect_input_error("moving image", "does not exist", str(path), fixed=fixed, moving=path, **QUICK)


# ----------------------------------------------------------------------------- label maps


def test_label_map_with_non_integer_values(fixed, moving):
    lab = sitk.Cast(labels_of(fixed), sitk.sitkFloat32) * 0.5  # 0 and 0.5
    expect_input_error("fixed label map", "non-integer", "0.5", fixed=fixed, moving=moving, fixed_labels=lab,
                       moving_labels=labels_of(moving), **QUICK)


def test_float_label_map_with_whole_numbers_is_accepted(fixed, moving):
    lab = sitk.Cast(labels_of(fixed), sitk.sitkFloat32) * 3.0  # 0 and 3, stored as float
    result = mmreg.register(fixed, moving, affine=False, fixed_labels=lab, moving_labels=labels_of(moving) * 3,
                            **QUICK)
    assert result.report["quality"]["labels"]["labels"] == [3]


def test_negative_labels(fixed, moving):
    lab = sitk.Cast(labels_of(moving), sitk.sitkInt16) - 1  # -1 and 0
    expect_input_error("moving label map", "negative", "-1", fixed=fixed, moving=moving,
                       fixed_labels=labels_of(fixed), moving_labels=lab, **QUICK)


def test_label_map_on_another_grid(fixed, moving):
    other = labels_of(blob_image(size=(20, 20, 16)))
    expect_input_error("moving label map", "grid", "moving image", fixed=fixed, moving=moving,
                       fixed_labels=labels_of(fixed), moving_labels=other, **QUICK)


# A label map of the same size but another origin is caught before the registration runs
# (register() compares the whole geometry, not only the size).
@pytest.mark.parametrize("which", ["fixed", "moving"])
def test_label_map_same_size_other_origin(fixed, moving, which):
    lab = {"fixed": labels_of(fixed), "moving": labels_of(moving)}
    shifted = sitk.Image(lab[which])
    shifted.SetOrigin((6.0, 0.0, 0.0))
    lab[which] = shifted
    expect_input_error(f"{which} label map", "grid", fixed=fixed, moving=moving, affine=False,
                       fixed_labels=lab["fixed"], moving_labels=lab["moving"], **QUICK)


# ----------------------------------------------------------------------------- parameters


def test_unknown_method(fixed, moving):
    expect_input_error("unknown registration method", "'nosuch'", "optimize", fixed=fixed, moving=moving,
                       method="nosuch")


def test_unknown_option(fixed, moving):
    expect_input_error("unknown option", "iteratons", "iterations", fixed=fixed, moving=moving, iteratons=5)


def test_images_that_do_not_overlap_with_affine_off(fixed):
    far = blob_image(origin=(500.0, 0.0, 0.0))
    expect_input_error("do not overlap", "affine", fixed=fixed, moving=far, affine=False, **QUICK)


def test_bad_device_name(fixed, moving):
    expect_input_error("unknown device", "'tpu'", "cpu", fixed=fixed, moving=moving, device="tpu", **QUICK)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a CUDA GPU is available here, so cuda is not an error")
def test_cuda_requested_without_cuda(fixed, moving):
    expect_input_error("cuda", "no cuda gpu is available", "--device cpu", fixed=fixed, moving=moving, device="cuda", **QUICK)
    expect_input_error("cuda", fixed=fixed, moving=moving, device="cuda:1", **QUICK)


# ----------------------------------------------------------------------------- 2-D inputs are fine


def _png_like(shift=(0.0, 0.0)):
    image = blob_image(size=(48, 40), spacing=(1.0, 1.0), origin=(0.0, 0.0), shift=shift)
    return sitk.Cast(sitk.RescaleIntensity(image, 0, 255), sitk.sitkUInt8)


def test_2d_png_image_is_a_single_slice_volume(tmp_path):
    fixed2d, moving2d = _png_like(), _png_like(shift=(2.0, -1.5))
    sitk.WriteImage(fixed2d, str(tmp_path / "fixed.png"))
    vol = mmreg.read_image(tmp_path / "fixed.png")
    assert vol.GetDimension() == 3 and vol.GetSize() == (48, 40, 1)
    assert vol.GetPixelID() == sitk.sitkFloat32
    for affine in (False, True):
        result = mmreg.register(tmp_path / "fixed.png", moving2d, affine=affine, **QUICK)
        assert result.displacement.GetSize() == (48, 40, 1)
        assert result.warped.GetSize() == (48, 40, 1)
        u = sitk.GetArrayFromImage(result.displacement)
        assert np.all(np.isfinite(u)) and np.abs(u[..., 2]).max() < 1e-6  # nothing moves out of the slice
        assert result.report["network_grid"]["size"][2] == 1


# ----------------------------------------------------------------------------- found in review


def test_single_slice_with_volume_and_affine_is_refused_with_the_fix(fixed):
    slice_img = fixed[:, :, 8:9]
    expect_input_error("single slice with a volume", "--no-affine", fixed=slice_img, moving=fixed, **QUICK)


def test_cancel_during_affine_is_a_cancellation_not_a_crash(fixed, moving):
    from mmreg import CancelledError

    seen = []

    def cancel_in_affine(fraction, message):
        seen.append(message)
        if "affine" in message:
            raise CancelledError("stop")

    with pytest.raises(CancelledError):
        mmreg.register(fixed, moving, progress=cancel_in_affine, **QUICK)
    assert "affine pre-alignment" in seen


def test_unwritable_output_is_an_input_error_and_leaves_no_partial_file(fixed, moving, tmp_path):
    result = mmreg.register(fixed, moving, affine=False, **QUICK)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(InputError) as info:
        result.save(blocker / "t.h5")
    assert "Could not write" in str(info.value)
    result.save(tmp_path / "t.nii.gz", tmp_path / "w.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder", "t.nii.gz", "w.nii.gz"]


def test_soft_and_negative_background_masks_are_accepted(fixed, moving):
    soft = sitk.Cast(fixed, sitk.sitkFloat32) / 255.0  # probability-like, values in [0, 1]
    negative = sitk.Cast(labels_of(fixed), sitk.sitkInt16) * 2 - 1  # -1 outside, 1 inside
    for mask in (soft, negative):
        result = mmreg.register(fixed, moving, affine=False, fixed_mask=mask, **QUICK)
        assert result.displacement.GetSize() == fixed.GetSize()
    expect_input_error("fixed mask", "empty", fixed=fixed, moving=moving, affine=False,
                       fixed_mask=sitk.Cast(fixed * 0, sitk.sitkUInt8), **QUICK)


def test_bad_iterations_option(fixed, moving):
    expect_input_error("iterations", fixed=fixed, moving=moving, affine=False, iterations=[], levels=2)
