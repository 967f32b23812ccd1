"""Tests of mmreg.metrics: Dice, HD95/ASD in mm, folding percentage, intensity similarity.

Numbers asserted here were measured with numpy/scipy/SimpleITK on CPU; the measurement is stated
next to each bound.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mmreg.errors import InputError
from mmreg import metrics as M

pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*")

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MMREG_DATA", str(REPO.parent / "shared" / "data")))


def to_image(arr, spacing_zyx=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    img.SetOrigin(origin)
    return img


def spheres(shape, spacing, radii):
    """Concentric balls (label 1) of the given radii in mm, centred in the grid (numpy order)."""
    c = [(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    grids = np.meshgrid(*[np.arange(n) * s - cc for n, s, cc in zip(shape, spacing, c)], indexing="ij")
    r = np.sqrt(sum(g ** 2 for g in grids))
    return [(r <= rad).astype(np.int16) for rad in radii]


# ----------------------------------------------------------------------------- Dice


def test_dice_identical_and_boxes_analytic():
    a = np.zeros((20, 30, 40), np.int32)
    a[2:12, 5:15, 5:15] = 3  # 10x10x10 box
    a[14:18, 20:28, 20:30] = 7
    assert M.dice_per_label(a, a) == {3: 1.0, 7: 1.0}
    assert M.mean_dice(a, a) == 1.0

    b = np.zeros_like(a)
    b[2:12, 5:15, 10:20] = 3  # same box shifted by 5 voxels in x: overlap 500 of 1000 + 1000
    b[0:2, 0:2, 0:2] = 9  # a label only present in b
    d = M.dice_per_label(a, b)
    assert d[3] == pytest.approx(2 * 500 / 2000)  # 0.5
    assert d[7] == 0.0 and d[9] == 0.0  # present in one map only
    assert M.mean_dice(a, b) == pytest.approx(0.5 / 3)
    # explicit labels: a label absent from both maps is not scored
    assert M.dice_per_label(a, b, labels=[3, 42]) == {3: pytest.approx(0.5)}
    assert math.isnan(M.mean_dice(a, b, labels=[42]))


def test_dice_on_sitk_images_and_float_labels_and_2d():
    a = np.zeros((16, 16, 16), np.uint8)
    a[4:12, 4:12, 4:12] = 1
    b = np.zeros_like(a)
    b[4:12, 4:12, 6:14] = 1  # overlap 8*8*6
    expected = 2 * 384 / 1024
    ia, ib = to_image(a, (2.0, 1.0, 0.5)), to_image(b, (2.0, 1.0, 0.5))
    assert M.dice_per_label(ia, ib) == {1: pytest.approx(expected)}
    assert M.dice_per_label(a.astype(np.float32), b.astype(np.float64)) == {1: pytest.approx(expected)}
    assert M.dice_per_label(a[8], b[8]) == {1: pytest.approx(2 * 48 / 128)}
    with pytest.raises(InputError, match="not a label map"):
        M.dice_per_label(a + 0.5, b)
    moved = to_image(b, (2.0, 1.0, 0.5), origin=(3.0, 0.0, 0.0))
    with pytest.raises(InputError, match="same grid"):
        M.dice_per_label(ia, moved)
    with pytest.raises(InputError, match="same shape"):
        M.dice_per_label(a, b[:-1])


# ----------------------------------------------------------------------------- surface distances


def test_hd95_concentric_spheres_anisotropic():
    """Balls of radius 10 and 13 mm on a 0.8 x 1.2 x 2.0 mm grid: the surfaces are 3 mm apart.

    Measured: HD95 3.39 mm, ASD 2.71 mm (voxelised surfaces); tolerance: half the largest
    spacing (1.0 mm). Cross-checked against MONAI's compute_hausdorff_distance (same values).
    """
    sp = (0.8, 1.2, 2.0)
    a, b = spheres((80, 60, 40), sp, (10.0, 13.0))
    hd, asd = M.surface_distances(a, b, 1, sp)
    assert abs(hd - 3.0) <= 1.0
    assert abs(asd - 3.0) <= 1.0
    # the same from SimpleITK images, spacing read from the image (x, y, z order reversed)
    ia, ib = to_image(a, sp), to_image(b, sp)
    assert M.surface_distances(ia, ib, 1) == pytest.approx((hd, asd))
    assert M.hd95_per_label(ia, ib) == {1: pytest.approx(hd)}
    # the wrong axis order gives a different answer: spacing really is (z, y, x)
    assert M.surface_distances(a, b, 1, sp[::-1])[0] != pytest.approx(hd)
    # identical maps: 0 mm; missing label: NaN
    assert M.surface_distances(a, a, 1, sp) == (0.0, 0.0)
    assert all(math.isnan(v) for v in M.surface_distances(a, np.zeros_like(a), 1, sp))

    from monai.metrics import compute_hausdorff_distance
    import torch

    ref = compute_hausdorff_distance(torch.from_numpy(a > 0)[None, None], torch.from_numpy(b > 0)[None, None],
                                     percentile=95, spacing=list(sp)).item()
    assert hd == pytest.approx(ref, abs=1e-4)


def test_label_overlap_report_many_labels_fast():
    """150 block labels on 120x120x90 at 2 mm, warped map shifted by 2 voxels (4 mm) along x."""
    shape = (90, 120, 120)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    fixed = (1 + (z // 18) * 30 + (y // 24) * 6 + (x // 20)).astype(np.int16)  # 5 * 5 * 6 = 150 labels
    warped = np.zeros_like(fixed)
    warped[:, :, 2:] = fixed[:, :, :-2]
    fi, wi = to_image(fixed, (2.0, 2.0, 2.0)), to_image(warped, (2.0, 2.0, 2.0))
    t0 = time.perf_counter()
    rep = M.label_overlap_report(fi, wi)
    elapsed = time.perf_counter() - t0
    assert len(rep["labels"]) == 150
    assert set(rep) >= {"dice", "mean_dice", "hd95_mm", "mean_hd95_mm", "mean_asd_mm"}
    json.dumps(rep)  # JSON-friendly (str keys, None for undefined)
    # blocks 20 voxels wide shifted by 2: Dice 18/20 = 0.9 for inner blocks, (18/20)...(16/20) at x=0
    assert rep["dice"]["2"] == pytest.approx(0.9)
    assert rep["hd95_mm"]["2"] == pytest.approx(4.0)
    assert 0.85 < rep["mean_dice"] < 0.95
    assert 3.0 < rep["mean_hd95_mm"] <= 4.0 + 1e-9
    assert 0.0 < rep["mean_asd_mm"] < 4.0
    # measured 0.5-0.8 s on an idle 2-core machine
    assert elapsed < 8.0, elapsed

    same = M.label_overlap_report(fi, fi)
    assert same["mean_dice"] == 1.0 and same["mean_hd95_mm"] == 0.0 and same["mean_asd_mm"] == 0.0


@pytest.mark.shared_data
def test_label_overlap_report_real_parcellations():
    d = DATA / "ixi10_T1_dlmuse" / "dlmuse"
    f1, f2 = d / "IXI012-HH-1211-T1_ds_DLMUSE.nii.gz", d / "IXI013-HH-1212-T1_ds_DLMUSE.nii.gz"
    if not (f1.exists() and f2.exists()):
        pytest.skip(f"shared data not found: {d} (set MMREG_DATA to the shared data folder)")
    fixed = sitk.ReadImage(str(f1))  # 120x120x90, 2 mm, 148 labels
    other = sitk.ReadImage(str(f2))
    other.CopyInformation(fixed)  # a second subject, unregistered, put on the same grid
    t0 = time.perf_counter()
    rep = M.label_overlap_report(fixed, other)
    elapsed = time.perf_counter() - t0
    # measured: 148 labels, mean Dice 0.223, mean HD95 13.0 mm, mean ASD 5.83 mm, 0.8 s
    assert len(rep["labels"]) == 148
    assert 0.15 < rep["mean_dice"] < 0.3
    assert 10.0 < rep["mean_hd95_mm"] < 16.0
    assert elapsed < 10.0, elapsed
    # HD95 agrees with MONAI on a few labels (measured: equal to 1e-6 mm)
    import torch
    from monai.metrics import compute_hausdorff_distance

    fa, oa = sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(other)
    for lab in rep["labels"][:2]:
        ref = compute_hausdorff_distance(torch.from_numpy(fa == lab)[None, None], torch.from_numpy(oa == lab)[None, None],
                                         percentile=95, spacing=[2.0, 2.0, 2.0]).item()
        assert rep["hd95_mm"][str(lab)] == pytest.approx(ref, abs=1e-4)


# ----------------------------------------------------------------------------- folding


def test_folding_percent_known_array():
    det = np.array([[-1.0, 0.0, 0.5, 1.0, 2.0], [1.0, 1.0, 1.0, -0.1, 3.0]])
    assert M.folding_percent(det) == pytest.approx(30.0)  # 3 of 10 voxels have det <= 0
    mask = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    assert M.folding_percent(det, mask) == pytest.approx(100.0)
    assert M.folding_percent(np.ones((4, 4, 4))) == 0.0
    det3 = np.ones((4, 5, 6), np.float32)
    det3[0, 0, :3] = np.nan  # undefined determinants count as folded
    assert M.folding_percent(sitk.GetImageFromArray(det3)) == pytest.approx(100.0 * 3 / 120)
    with pytest.raises(InputError, match="mask is empty"):
        M.folding_percent(det, np.zeros_like(mask))


# ----------------------------------------------------------------------------- intensity similarity


def test_image_similarity_identical_independent_and_inverted():
    rng = np.random.default_rng(0)
    a = rng.random((48, 48, 48))
    same = M.image_similarity(a, a)
    assert same["nmi"] == pytest.approx(2.0, abs=1e-12)
    assert same["ncc"] == pytest.approx(1.0)
    assert same["ssim"] == pytest.approx(1.0)
    assert same["mi"] == pytest.approx(math.log(64), rel=0.01)  # uniform noise fills 64 bins evenly

    noise = M.image_similarity(a, rng.random(a.shape))
    # measured on 110,592 voxels: NMI 1.0023, MI 0.019 nats (finite-sample bias), NCC -0.004, SSIM 0.002
    assert abs(noise["nmi"] - 1.0) < 0.01
    assert noise["mi"] < 0.03
    assert abs(noise["ncc"]) < 0.02
    assert abs(noise["ssim"]) < 0.05

    inv = M.image_similarity(a, 1.0 - a)
    assert inv["nmi"] == pytest.approx(2.0, abs=1e-9)
    assert inv["ncc"] == pytest.approx(-1.0)


def test_image_similarity_mask_2d_and_sitk():
    rng = np.random.default_rng(1)
    a = rng.random((64, 64)).astype(np.float32)
    b = rng.random((64, 64)).astype(np.float32)
    b[:32] = a[:32]  # identical top half
    mask = np.zeros((64, 64), bool)
    mask[:32] = True
    top = M.image_similarity(a, b, mask)
    assert top["nmi"] == pytest.approx(2.0)
    assert top["ncc"] == pytest.approx(1.0)
    whole = M.image_similarity(a, b)
    assert 1.0 < whole["nmi"] < 2.0 and 0.3 < whole["ncc"] < 0.7
    img_a = sitk.GetImageFromArray(a[None])
    img_b = sitk.GetImageFromArray(b[None])
    via_sitk = M.image_similarity(img_a, img_b)
    assert via_sitk["nmi"] == pytest.approx(whole["nmi"])
    assert via_sitk["ncc"] == pytest.approx(whole["ncc"])


@pytest.mark.shared_data
def test_image_similarity_t1_t2_alignment_ranking():
    d = DATA / "spm12_mni_T1T2PD_labels"
    f1, f2 = d / "canonical_avg152T1.nii.gz", d / "canonical_avg152T2.nii.gz"
    if not (f1.exists() and f2.exists()):
        pytest.skip(f"shared data not found: {d} (set MMREG_DATA to the shared data folder)")
    t1 = sitk.GetArrayFromImage(sitk.ReadImage(str(f1)))
    t2 = sitk.GetArrayFromImage(sitk.ReadImage(str(f2)))
    aligned = M.image_similarity(t1[:, :, 4:-4], t2[:, :, 4:-4])
    shifted = M.image_similarity(t1[:, :, 4:-4], t2[:, :, 8:])
    # measured (64 bins): aligned NMI 1.240, MI 1.263 nats; shifted by 4 voxels NMI 1.119, MI 0.694 nats
    assert aligned["nmi"] > shifted["nmi"] and aligned["mi"] > shifted["mi"]
    assert 1.0 < shifted["nmi"] < aligned["nmi"] < 2.0
    assert aligned["mi"] > 1.5 * shifted["mi"]
