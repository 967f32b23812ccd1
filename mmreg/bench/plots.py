"""Figures of the benchmark harness: Dice per case group, wall time per method, one case's slices.

All figures are PNG, drawn on :class:`matplotlib.figure.Figure` objects with the non-interactive
Agg backend (no pyplot state, no display needed). matplotlib is optional: every public function
raises :class:`mmreg.errors.InputError` with the install command when it is missing.

Records are the per case x method dicts of :mod:`mmreg.bench.harness` (keys used here: ``case``,
``group``, ``method``, ``mean_dice``, ``seconds``, optionally ``seconds_repeats``). ``methods``
selects and orders the methods (default: order of first appearance); ``labels`` maps a method to
its display name (default: the method itself).
"""
from __future__ import annotations

import math
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

DPI = 110
FONT = 9
FIXED_OUTLINE = "#00e5ff"   # cyan: fixed segmentation
WARPED_OUTLINE = "#ff9f1a"  # orange: warped segmentation
DIFF_MAX = 0.5              # colour range of |fixed - warped| after rescaling both to 0..1
AXES = {"axial": 0, "coronal": 1, "sagittal": 2}  # numpy axis of the [S, P, L]-ordered array


def _mpl():
    """matplotlib with the Agg backend, or InputError with the install command."""
    try:
        import matplotlib
        import matplotlib.figure  # noqa: F401
        import matplotlib.ticker  # noqa: F401
        import matplotlib.lines  # noqa: F401
    except ImportError as exc:
        raise InputError("Plots need matplotlib: pip install matplotlib (or pip install mmreg[bench]).") from exc
    if "matplotlib.pyplot" not in sys.modules:  # never switch the backend of a running pyplot session
        matplotlib.use("Agg")
    return matplotlib


def _figure(width: float, height: float, title: str):
    """An Agg-drawn Figure (inches) with constrained layout and a title."""
    fig = _mpl().figure.Figure(figsize=(width, height), dpi=DPI)
    fig.set_layout_engine("constrained", h_pad=0.06, w_pad=0.06)
    fig.suptitle(title, fontsize=FONT + 2)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    return path


def _methods(records, methods) -> list[str]:
    return list(methods) if methods is not None else list(dict.fromkeys(r["method"] for r in records))


def _name(method: str, labels: dict | None) -> str:
    return (labels or {}).get(method, method)


def _wrap(text: str, width: int = 22) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _offsets(n: int, half_width: float = 0.13) -> np.ndarray:
    """Deterministic horizontal spread of n points around a box's centre."""
    return np.linspace(-half_width, half_width, n) if n > 1 else np.zeros(n)


def _boxes(ax, values: list[list[float]], positions, colors) -> None:
    """Box per position (empty lists skipped), light fill, median line in black."""
    keep = [i for i, v in enumerate(values) if v]
    if not keep:
        return
    bp = ax.boxplot([values[i] for i in keep], positions=[positions[i] for i in keep], widths=0.5,
                    showfliers=False, patch_artist=True, medianprops={"color": "black", "linewidth": 1.4})
    for patch, i in zip(bp["boxes"], keep):
        patch.set(facecolor=colors[i], alpha=0.35, edgecolor="0.3")


def _no_data(title: str, text: str):
    """A small Figure (no Axes) that says there is nothing to plot."""
    fig = _figure(5, 2, title)
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=FONT + 1)
    return fig


# --------------------------------------------------------------------------------------------- Dice

def _dice_figure(records: list[dict], methods=None, labels=None):
    """The Figure of :func:`dice_boxplot`: one Axes per group that has a Dice (none otherwise)."""
    mpl = _mpl()
    methods = _methods(records, methods)
    scored = [r for r in records if r.get("mean_dice") is not None and r["method"] in methods]
    groups = list(dict.fromkeys(r["group"] for r in scored))
    title = "Mean Dice per case, by case group"
    if not groups:
        return _no_data(title, "no Dice in these records")
    ncols = min(4, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    panel_w = max(2.4, 0.42 * len(methods) + 1.0)
    fig = _figure(ncols * panel_w, nrows * 3.3 + 0.4, title)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(groups):]:
        fig.delaxes(ax)
    colors = [mpl.colormaps["tab10"](i % 10) for i in range(len(methods))]
    pos = np.arange(len(methods))
    for k, (ax, group) in enumerate(zip(axes.flat, groups)):
        recs = [r for r in scored if r["group"] == group]
        values = [[float(r["mean_dice"]) for r in recs if r["method"] == m] for m in methods]
        _boxes(ax, values, pos, colors)
        for p, v, c in zip(pos, values, colors):
            ax.scatter(p + _offsets(len(v)), v, s=20, color=c, edgecolor="black", linewidth=0.6, zorder=3)
        n_cases = len({r["case"] for r in recs})
        ax.set_title(f"{_wrap(group, 30)}\n{n_cases} case{'s' if n_cases != 1 else ''}", fontsize=FONT)
        ax.set_xticks(pos)
        ax.set_xticklabels([_name(m, labels) for m in methods], rotation=35, ha="right",
                           rotation_mode="anchor", fontsize=FONT - 0.5)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.tick_params(axis="y", labelsize=FONT - 0.5)
        ax.grid(axis="y", alpha=0.3)
        if k % ncols == 0:
            ax.set_ylabel("mean Dice", fontsize=FONT)
    return fig


def dice_boxplot(records: list[dict], path, methods: list[str] | None = None,
                 labels: dict[str, str] | None = None) -> Path:
    """Box plot of the per-case mean Dice (0..1) of each method, one panel per case group.

    Panels follow the groups' first appearance in ``records`` (groups without any Dice are left
    out), wrapped into at most 4 columns; each case is also drawn as a point, since groups often
    hold only one or two cases. Each panel has its own y range. Writes a PNG to ``path`` and
    returns it.
    """
    return _save(_dice_figure(records, methods, labels), path)


# ------------------------------------------------------------------------------------------ runtime

def _case_seconds(rec: dict) -> float | None:
    """Wall seconds of one record: median of ``seconds_repeats`` when given, else ``seconds``; None if not > 0."""
    reps = [float(s) for s in rec.get("seconds_repeats") or [] if s is not None]
    sec = float(np.median(reps)) if reps else rec.get("seconds")
    return float(sec) if sec is not None and sec > 0 else None


def _runtime_figure(records: list[dict], methods=None, labels=None):
    """The Figure of :func:`runtime_plot`."""
    mpl = _mpl()
    methods = [m for m in _methods(records, methods) if m != "affine"]
    timed = [(r, s) for r in records if r["method"] in methods and (s := _case_seconds(r)) is not None]
    methods = [m for m in methods if any(r["method"] == m for r, _ in timed)]
    title = "Registration wall time per case (s)"
    if not timed:
        return _no_data(title, "no timed registrations in these records")
    groups = list(dict.fromkeys(r["group"] for r, _ in timed))
    timed.sort(key=lambda rs: groups.index(rs[0]["group"]))  # points of one method: group after group
    fig = _figure(1.6 + 1.15 * len(methods) + 2.4, 4.4, title)
    ax = fig.subplots()
    pos = np.arange(len(methods))
    values = [[s for r, s in timed if r["method"] == m] for m in methods]
    _boxes(ax, values, pos, ["0.85"] * len(methods))
    cmap = mpl.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    style = [{"color": cmap(g % cmap.N), "marker": "osD^vP*Xh<>"[g % 11]} for g in range(len(groups))]
    for p, m, v in zip(pos, methods, values):
        gidx = np.array([groups.index(r["group"]) for r, _ in timed if r["method"] == m])
        x = p + _offsets(len(v), 0.16)
        for g in np.unique(gidx):
            ax.scatter(x[gidx == g], np.array(v)[gidx == g], s=24, edgecolor="black", linewidth=0.5, zorder=3,
                       **style[g])
    for p, v in zip(pos, values):
        med = float(np.median(v))
        ax.text(p + 0.29, med, f"{med:.3g} s", va="center", ha="left", fontsize=FONT - 1,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}, zorder=4)
    ax.set_yscale("log")
    lo, hi = min(min(v) for v in values), max(max(v) for v in values)
    ax.set_ylim(lo / 1.4, hi * 1.4)
    ax.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    if math.log10(hi / lo) < 1.5:  # few or no decades in range: label the 2x and 5x minor ticks too
        ax.yaxis.set_minor_formatter(mpl.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 5) else ""))
    ax.tick_params(axis="y", which="both", labelsize=FONT - 0.5)
    ax.set_xticks(pos)
    ax.set_xticklabels([_name(m, labels) for m in methods], rotation=25, ha="right", rotation_mode="anchor",
                       fontsize=FONT)
    ax.set_xlim(-0.6, len(methods) - 0.25)
    ax.set_ylabel("wall seconds (log scale)", fontsize=FONT)
    ax.grid(axis="y", which="both", alpha=0.25)
    handles = [mpl.lines.Line2D([], [], linestyle="none", markeredgecolor="black", markeredgewidth=0.5,
                                markersize=6, label=_wrap(g, 28), **st) for g, st in zip(groups, style)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=FONT - 0.5, title="case group", title_fontsize=FONT,
               frameon=False)
    return fig


def runtime_plot(records: list[dict], path, methods: list[str] | None = None,
                 labels: dict[str, str] | None = None) -> Path:
    """Box plot of the registration wall time per case (seconds, log scale) of each method.

    "affine" and records without a positive time are left out. A record's time is the median of
    its ``seconds_repeats`` when present, else its ``seconds``. Points are the cases, coloured by
    case group (legend); each box is annotated with its median. Writes a PNG and returns ``path``.
    """
    return _save(_runtime_figure(records, methods, labels), path)


# --------------------------------------------------------------------------------------- case figure

def _lps_array(img: sitk.Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Voxels as a float array indexed [S, P, L] and its spacing (mm, same order).

    Index axes are snapped to the nearest LPS axis and flipped where they run the other way, so
    any axis-aligned direction (an RAS-stored NIfTI, a coronal acquisition) displays the same way;
    oblique images are shown in their nearest axis-aligned orientation. A 2-D image is one slice.
    """
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("case_figure needs scalar images, not vector images.")
    a = sitk.GetArrayFromImage(img).astype(np.float32)  # [z, y, x] (or [y, x])
    dim = img.GetDimension()
    direction = np.eye(3)
    direction[:dim, :dim] = np.reshape(img.GetDirection(), (dim, dim))
    spacing = list(img.GetSpacing()) + [1.0] * (3 - dim)
    a = a.reshape((1,) * (3 - dim) + a.shape)
    phys = np.abs(direction).argmax(axis=0)  # LPS axis (0=L, 1=P, 2=S) of index axis i (0=x, 1=y, 2=z)
    if len(set(phys.tolist())) < 3:
        phys = np.arange(3)
    for i in range(3):
        if direction[phys[i], i] < 0:
            a = np.flip(a, axis=2 - i)
    src = [int(np.flatnonzero(phys == j)[0]) for j in (2, 1, 0)]  # index axis holding S, P, L
    return np.ascontiguousarray(a.transpose([2 - i for i in src])), tuple(spacing[i] for i in src)


def _slice(a: np.ndarray, axis: int, k: int) -> np.ndarray:
    """2-D display array of an [S, P, L] volume: axial rows P (anterior on top), columns L (patient's
    right on the left); coronal/sagittal rows S (superior on top), columns L or P (anterior on the left)."""
    s = np.take(a, k, axis=axis)
    return s if axis == 0 else s[::-1]


def _unit(a: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Slice s rescaled to 0..1 by the 1st-99th percentile of its volume a (clipped)."""
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((s - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(s)


def _outline(ax, labels: np.ndarray, color: str) -> None:
    """Boundaries of every label > 0 (contour lines, no fill)."""
    for value in np.unique(labels[labels > 0]):
        mask = (labels == value).astype(np.float32)
        if mask.shape[0] > 1 and mask.shape[1] > 1:
            ax.contour(mask, levels=[0.5], colors=[color], linewidths=0.8)


def case_figure(path, fixed: sitk.Image, moving: sitk.Image, warped: dict, *, fixed_labels: sitk.Image | None = None,
                warped_labels: dict | None = None, title: str = "", labels: dict[str, str] | None = None,
                axis: str = "axial") -> Path:
    """One slice of a case: a row per method with fixed | moving (after affine) | warped | |fixed - warped|.

    All images (``fixed``, ``moving``, the values of ``warped`` and of ``warped_labels``, and
    ``fixed_labels``) must be on the fixed grid; ``warped`` and ``warped_labels`` map method ->
    image and give the row order. The slice is the middle one along ``axis`` ("axial": z,
    "coronal": y, "sagittal": x) through the centre of the fixed labels' bounding box, else
    through the image centre; a single-slice image shows that slice. The fixed labels are
    outlined in cyan on the fixed column, each method's warped labels in orange on its warped
    column. The difference is taken after rescaling each image to 0..1 by its 1st-99th
    percentile and drawn on a fixed 0..0.5 colour range.

    Display convention (radiological, in physical proportions from the spacing): images are
    first reoriented to LPS; axial slices have anterior at the top and the patient's right on the
    left of the picture, coronal slices superior at the top and the patient's right on the left,
    sagittal slices superior at the top and anterior on the left. Writes a PNG and returns ``path``.
    """
    return _save(_case_figure(fixed, moving, warped, fixed_labels=fixed_labels, warped_labels=warped_labels,
                              title=title, labels=labels, axis=axis), path)


def _case_figure(fixed, moving, warped, *, fixed_labels=None, warped_labels=None, title="", labels=None,
                 axis="axial"):
    """The Figure of :func:`case_figure`."""
    mpl = _mpl()
    if axis not in AXES:
        raise InputError(f"axis must be one of {', '.join(AXES)}, not {axis!r}.")
    if not warped:
        raise InputError("case_figure needs at least one warped image (warped={method: image}).")
    warped_labels = warped_labels or {}
    named = {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels,
             **{f"warped[{m}]": im for m, im in warped.items()},
             **{f"warped_labels[{m}]": im for m, im in warped_labels.items()}}
    for name, im in named.items():
        if im is not None and im.GetSize() != fixed.GetSize():
            raise InputError(f"case_figure: {name} has size {im.GetSize()}, not the fixed grid's {fixed.GetSize()}; "
                             "resample it onto the fixed grid first.")
    arrays = {name: _lps_array(im) for name, im in named.items() if im is not None}
    vol = {name: a for name, (a, _) in arrays.items()}
    spacing = arrays["fixed"][1]
    ax_i = 0 if vol["fixed"].shape[0] == 1 else AXES[axis]  # single-slice images: show that slice
    k = vol["fixed"].shape[ax_i] // 2
    if "fixed_labels" in vol and (vol["fixed_labels"] > 0).any():
        idx = np.flatnonzero((vol["fixed_labels"] > 0).any(axis=tuple(i for i in range(3) if i != ax_i)))
        k = int(idx[0] + idx[-1]) // 2
    rows_sp, cols_sp = [s for i, s in enumerate(spacing) if i != ax_i]
    sl = {name: _slice(v, ax_i, k) for name, v in vol.items()}
    f_unit = _unit(vol["fixed"], sl["fixed"])
    h, w = sl["fixed"].shape
    aspect = rows_sp / cols_sp  # height / width of one pixel on screen
    panel_w = 2.3
    panel_h = min(panel_w * h * aspect / w, 3.5)
    nrows = len(warped)
    fig = _figure(4 * panel_w + 0.9, nrows * (panel_h + 0.15) + 1.0, title or "Registration result")
    axes = fig.subplots(nrows, 4, squeeze=False)
    gray = {"cmap": "gray", "vmin": 0, "vmax": 1, "aspect": aspect, "interpolation": "nearest"}
    m_unit = _unit(vol["moving"], sl["moving"])
    for row, method in zip(axes, warped):
        w_unit = _unit(vol[f"warped[{method}]"], sl[f"warped[{method}]"])
        row[0].imshow(f_unit, **gray)
        row[1].imshow(m_unit, **gray)
        row[2].imshow(w_unit, **gray)
        diff = row[3].imshow(np.abs(f_unit - w_unit), cmap="magma", vmin=0, vmax=DIFF_MAX, aspect=aspect,
                             interpolation="nearest")
        if "fixed_labels" in sl:
            _outline(row[0], sl["fixed_labels"], FIXED_OUTLINE)
        if f"warped_labels[{method}]" in sl:
            _outline(row[2], sl[f"warped_labels[{method}]"], WARPED_OUTLINE)
        for a in row:
            a.set_xticks([])
            a.set_yticks([])
        row[0].set_ylabel(_wrap(_name(method, labels), 18), fontsize=FONT)
    for a, text in zip(axes[0], ["fixed", "moving (after affine)", "warped", "|fixed − warped|"]):
        a.set_title(text, fontsize=FONT)
    cbar = fig.colorbar(diff, ax=axes[:, 3], shrink=0.9, aspect=max(20, 10 * nrows), label="rescaled intensity")
    cbar.ax.tick_params(labelsize=FONT - 1)
    handles = [mpl.lines.Line2D([], [], color=c, label=t) for c, t, present in (
        (FIXED_OUTLINE, "fixed labels (outline)", "fixed_labels" in sl),
        (WARPED_OUTLINE, "warped labels (outline)", bool(warped_labels))) if present]
    view = ("axial, anterior up, patient's right on the left", "coronal, superior up, patient's right on the left",
            "sagittal, superior up, anterior on the left")[ax_i]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=FONT - 0.5, frameon=False,
                   title=view, title_fontsize=FONT - 0.5)
    else:
        fig.supxlabel(view, fontsize=FONT - 0.5)
    return fig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "example"


def write_all(records: list[dict], out_dir, *, case_images: dict | None = None, methods: list[str] | None = None,
              labels: dict[str, str] | None = None) -> list[Path]:
    """Write ``dice_boxplot.png``, ``runtime.png`` and, with ``case_images``, ``case_<name>.png`` into ``out_dir``.

    ``case_images`` holds the keyword arguments of :func:`case_figure` except ``path`` (``labels``
    defaults to this call's); an optional extra key ``name`` names the file, else the title does.
    Returns the paths written.
    """
    out = Path(out_dir)
    paths = [dice_boxplot(records, out / "dice_boxplot.png", methods, labels),
             runtime_plot(records, out / "runtime.png", methods, labels)]
    if case_images:
        kw = {"labels": labels, **case_images}
        name = _safe(str(kw.pop("name", None) or kw.get("title") or "example"))
        paths.append(case_figure(out / f"case_{name}.png", **kw))
    return paths
