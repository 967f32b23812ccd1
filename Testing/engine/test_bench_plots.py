"""Tests of mmreg.bench.plots: the benchmark's PNG figures (Dice, wall time, one case's slices)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import SimpleITK as sitk

from mmreg.bench import plots
from mmreg.errors import InputError

GROUPS = ["IXI T1-T1", "template T1<-T2 (known)", "spinal cord T2<-T1"]
METHODS = ["affine", "elastix", "ants", "optimize"]
LABELS = {"affine": "affine only", "elastix": "elastix B-spline", "ants": "ANTs SyN", "optimize": "mmreg optimize"}


def make_records() -> list[dict]:
    rng = np.random.default_rng(0)
    recs = []
    for g, group in enumerate(GROUPS):
        for c in range(g + 1):  # 1, 2, 3 cases
            for m, method in enumerate(METHODS):
                recs.append({"case": f"c{g}{c}", "group": group, "method": method,
                             "mean_dice": 0.6 + 0.05 * m + rng.normal(0, 0.01),
                             "seconds": 0.0 if method == "affine" else 10.0 * (m + 1) * rng.uniform(0.8, 1.2)})
    recs.append({"case": "x", "group": "no labels", "method": "elastix", "mean_dice": None, "seconds": 12.0})
    return recs


def sphere(shape_zyx=(36, 48, 40), centre_zyx=(18, 24, 20), radius=10.0, spacing_xyz=(1.0, 1.0, 1.0)) -> sitk.Image:
    z, y, x = np.indices(shape_zyx)
    r = np.sqrt((z - centre_zyx[0]) ** 2 + (y - centre_zyx[1]) ** 2 + (x - centre_zyx[2]) ** 2)
    img = sitk.GetImageFromArray((100.0 * (r < radius) + 20.0 * (r < radius / 2)).astype(np.float32))
    img.SetSpacing(spacing_xyz)
    return img


def label_of(img: sitk.Image) -> sitk.Image:
    lab = sitk.GetImageFromArray((sitk.GetArrayFromImage(img) > 50).astype(np.uint8)
                                 + (sitk.GetArrayFromImage(img) > 110).astype(np.uint8))
    lab.CopyInformation(img)
    return lab


def assert_png(path, min_w=300, min_h=200):
    mpimg = pytest.importorskip("matplotlib.image")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = mpimg.imread(path).shape[:2]
    assert min_w <= w <= 4000 and min_h <= h <= 4000, (w, h)
    return w, h


def test_dice_boxplot_one_panel_per_group_with_dice(tmp_path):
    pytest.importorskip("matplotlib")
    recs = make_records()
    path = plots.dice_boxplot(recs, tmp_path / "dice.png", METHODS, LABELS)
    assert_png(path)
    fig = plots._dice_figure(recs, METHODS, LABELS)
    assert len(fig.axes) == len(GROUPS)  # "no labels" has no Dice: no panel
    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == GROUPS
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [LABELS[m] for m in METHODS]
    # 6 groups wrap into 2 rows of at most 4 columns; method subset and order follow `methods`
    many = [dict(r, group=f"g{i}") for i in range(6) for r in recs if r["group"] == GROUPS[0]]
    fig = plots._dice_figure(many, ["optimize", "affine"])
    assert len(fig.axes) == 6
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes} == {(2, 4)}
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["optimize", "affine"]


def test_dice_boxplot_without_dice_still_writes(tmp_path):
    pytest.importorskip("matplotlib")
    recs = [{"case": "a", "group": "g", "method": "elastix", "mean_dice": None, "seconds": 3.0}]
    assert_png(plots.dice_boxplot(recs, tmp_path / "dice.png"), min_w=200, min_h=100)
    assert len(plots._dice_figure(recs).axes) == 0


def test_runtime_plot_skips_affine_and_uses_repeats(tmp_path):
    pytest.importorskip("matplotlib")
    recs = make_records()
    assert_png(plots.runtime_plot(recs, tmp_path / "runtime.png", labels=LABELS))
    fig = plots._runtime_figure(recs, labels=LABELS)
    ax, = fig.axes
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == [LABELS[m] for m in METHODS[1:]]
    assert sum(t.get_text().endswith(" s") for t in ax.texts) == 3  # one median per box
    assert len(fig.legends[0].get_texts()) == len(GROUPS) + 1  # points coloured by group, "no labels" included
    assert plots._case_seconds({"seconds": 99.0, "seconds_repeats": [3.0, 1.0, 2.0]}) == 2.0
    assert plots._case_seconds({"seconds": 0}) is None and plots._case_seconds({"seconds": None}) is None


def test_case_figure_rows_columns_and_outlines(tmp_path):
    pytest.importorskip("matplotlib")
    fixed = sphere()
    moving = sphere(centre_zyx=(18, 27, 23))
    warped = {"elastix": sphere(centre_zyx=(18, 25, 21)), "optimize": sphere(centre_zyx=(18, 24, 21))}
    kw = dict(fixed_labels=label_of(fixed), warped_labels={m: label_of(im) for m, im in warped.items()},
              title="spheres", labels=LABELS)
    w, h = assert_png(plots.case_figure(tmp_path / "case.png", fixed, moving, warped, **kw))
    assert w > h  # 4 columns, 2 rows of roughly square slices
    fig = plots._case_figure(fixed, moving, warped, **kw)
    image_axes = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 2 * 4
    assert [ax.get_ylabel() for ax in image_axes[::4]] == ["elastix B-spline", "mmreg optimize"]
    # outlines: fixed labels on column 0, warped labels on column 2, nothing on the others
    assert [bool(ax.collections) for ax in image_axes[:4]] == [True, False, True, False]
    assert fig.axes[-1].get_ylim() == (0.0, plots.DIFF_MAX)  # colourbar of the difference


@pytest.mark.parametrize("axis, shape, aspect", [("axial", (48, 40), 1.0), ("coronal", (12, 40), 3.0),
                                                  ("sagittal", (12, 48), 3.0)])
def test_case_figure_axes_and_single_slice(tmp_path, axis, shape, aspect):
    pytest.importorskip("matplotlib")
    fixed = sphere(shape_zyx=(12, 48, 40), centre_zyx=(6, 24, 20), spacing_xyz=(1.0, 1.0, 3.0))
    ax = plots._case_figure(fixed, fixed, {"optimize": fixed}, axis=axis).axes[0]
    assert ax.images[0].get_array().shape == shape
    assert ax.get_aspect() == aspect  # physical proportions: 3 mm slices are 3x taller than 1 mm pixels
    flat = sphere(shape_zyx=(1, 48, 40), centre_zyx=(0, 24, 20))
    fig = plots._case_figure(flat, flat, {"optimize": flat}, fixed_labels=label_of(flat), axis=axis)
    assert fig.axes[0].images[0].get_array().shape == (48, 40)  # the one slice, whatever the axis
    assert_png(plots.case_figure(tmp_path / "flat.png", flat, flat, {"optimize": flat}, axis=axis))


@pytest.mark.parametrize("flip", [False, True])
def test_display_orientation_is_radiological(flip):
    """A marker at the patient's right-anterior-superior corner shows top-left in axial and coronal views,
    whatever the image's direction (identity LPS, or RAS-stored like most NIfTI files)."""
    arr = np.zeros((6, 5, 4), np.float32)  # [z, y, x]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 2.0, 3.0))
    lps = np.array([-1.0, -1.0, 1.0])  # right (-L), anterior (-P), superior (+S) of the centre
    if flip:
        img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
    corner = [c + 100.0 * d for c, d in zip(centre, lps)]
    idx = [int(np.clip(round(v), 0, s - 1)) for v, s in zip(img.TransformPhysicalPointToContinuousIndex(corner),
                                                            img.GetSize())]
    img[idx] = 1.0
    a, spacing = plots._lps_array(img)
    assert spacing == (3.0, 2.0, 1.0)
    axial = plots._slice(a, 0, a.shape[0] - 1)
    coronal = plots._slice(a, 1, 0)
    assert axial[0, 0] == 1.0 and axial.sum() == 1.0
    assert coronal[0, 0] == 1.0 and coronal.sum() == 1.0


def test_case_figure_bad_input():
    pytest.importorskip("matplotlib")
    fixed = sphere()
    with pytest.raises(InputError, match="fixed grid"):
        plots.case_figure("x.png", fixed, sphere(shape_zyx=(30, 48, 40)), {"m": fixed})
    with pytest.raises(InputError, match="axis"):
        plots._case_figure(fixed, fixed, {"m": fixed}, axis="oblique")
    with pytest.raises(InputError, match="warped"):
        plots._case_figure(fixed, fixed, {})


def test_write_all(tmp_path):
    pytest.importorskip("matplotlib")
    fixed = sphere()
    case = {"fixed": fixed, "moving": fixed, "warped": {"ants": fixed}, "title": "IXI002<-IXI012 (IXI T1-T1)"}
    paths = plots.write_all(make_records(), tmp_path / "figs", case_images=case, labels=LABELS)
    assert [p.name for p in paths] == ["dice_boxplot.png", "runtime.png", "case_IXI002_-IXI012_IXI_T1-T1.png"]
    for p in paths:
        assert_png(p)
    assert [p.name for p in plots.write_all(make_records(), tmp_path)] == ["dice_boxplot.png", "runtime.png"]


def test_missing_matplotlib_raises_input_error(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" now raises ImportError
    with pytest.raises(InputError, match="pip install matplotlib"):
        plots.dice_boxplot(make_records(), tmp_path / "dice.png")
    with pytest.raises(InputError, match="matplotlib"):
        plots.write_all(make_records(), tmp_path)
