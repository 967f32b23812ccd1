"""mmreg instance optimisation vs elastix B-spline: same cases, same affine start, same scoring.

    python -m mmreg.bench.compare [--cases default] [--out docs/optimize_vs_elastix.md]
                                  [--json out.json] [--threads 2] [--cache DIR]

Per case:

1. Affine, once: :func:`mmreg.affine.affine_prealign` on the images normalised by
   :func:`mmreg.intensity.normalize_intensity`; cached as ``.tfm`` (+ ``.json``) under ``--cache``
   (default ``~/.cache/mmreg/bench``), keyed by the case's name and a hash of its pixels and
   geometry (and reused only while the engine's affine/normalisation source is unchanged), so every
   method, and every later run, starts from the identical affine.
2. The normalised moving image is resampled through that affine onto the fixed grid (linear,
   0 outside). Every deformable method registers the normalised fixed image to this SAME
   pre-aligned image, from the identity: elastix B-spline (:func:`mmreg.bench.peers.run_elastix_bspline`)
   and ``mmreg.register(..., method="optimize", affine=False)``. The engine gets nothing extra.
3. The total transform is "deformable, then affine", folded into one field with
   :func:`mmreg.transforms.fold_affine`; "affine" alone is the zero deformable field.
4. One scoring function for all methods: moving labels warped through the total transform
   (:func:`mmreg.labels.warp_labels`, linear), :func:`mmreg.metrics.label_overlap_report` (mean Dice,
   mean HD95), folding % of the deformable part (:func:`mmreg.pipeline.jacobian_report`, whole fixed
   grid and inside the fixed brain mask), and where a ground truth exists the endpoint error
   ``|u_total - u_true|`` inside the fixed brain mask (mean, 95th percentile, mm).
5. ``seconds``: wall time of the deformable registration call (elastix: registration plus
   transformix's dense field; mmreg: the whole ``register`` call). ``core_seconds``: elastix's
   registration alone, mmreg's "method" step alone.

The markdown (``--out``) and the JSON (``--json``, default: ``--out`` with ``.json``) are rewritten
after every case, so a long run leaves usable partial results; ``--resume`` skips case x method
rows already in the JSON.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..affine import affine_prealign
from ..errors import MMRegError
from ..intensity import normalize_intensity
from ..labels import warp_labels
from ..metrics import label_overlap_report
from ..pipeline import jacobian_report
from ..transforms import transform_to_field, displacement_transform, fold_affine
from .cases import SPEC_HELP, Case, build_cases, portable_path
from .peers import (ELASTIX_DEFAULTS, PeerResult, check_elastix_convention, identity_after_affine,
                    run_elastix_bspline, set_itk_threads)

METHODS = ("affine", "elastix", "optimize")
#: Methods run by default: elastix's default map (10 mm final grid) and, because that grid over-fits these
#: 2 mm brain images (folding, worse multi-modal results), the same map with a 20 mm grid.
DEFAULT_METHODS = ("affine", "elastix", "elastix@20", "optimize")
METHOD_LABELS = {"affine": "affine only", "elastix": "elastix B-spline (MI)", "optimize": "mmreg optimize"}
#: ``elastix@S``: the elastix peer with a final B-spline grid spacing of S mm instead of --elastix-grid-spacing.
_ELASTIX_VARIANT = re.compile(r"^elastix@(\d+(?:\.\d+)?)$")


def method_label(method: str) -> str:
    """Display name of a method (``elastix@20`` -> "elastix B-spline (MI), 20 mm grid")."""
    m = _ELASTIX_VARIANT.match(method)
    if m:
        return f"{METHOD_LABELS['elastix']}, {float(m.group(1)):g} mm grid"
    return METHOD_LABELS.get(method, method)


def valid_method(method: str) -> bool:
    return method in METHODS or bool(_ELASTIX_VARIANT.match(method))


def _is_elastix(method: str) -> bool:
    return method == "elastix" or bool(_ELASTIX_VARIANT.match(method))
DEFAULT_CACHE = Path(os.environ.get("MMREG_BENCH_CACHE", Path.home() / ".cache" / "mmreg" / "bench"))
#: Bump when the affine recipe changes, so cached affines are not reused.
AFFINE_RECIPE = "affine_prealign(defaults) on normalize_intensity(case modality) images; v1"


def _affine_code_hash() -> str:
    """Hash of the engine's affine and normalisation source: a changed engine invalidates cached affines."""
    import hashlib  # noqa: PLC0415
    from .. import affine as _affine, intensity as _intensity  # noqa: PLC0415
    h = hashlib.sha1()
    for mod in (_affine, _intensity):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:12]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- affine (cached)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def cached_affine(case: Case, fixed_n: sitk.Image, moving_n: sitk.Image, cache_dir: Path | None) -> tuple:
    """(AffineTransform fixed->moving, info dict) for ``case``, from ``cache_dir`` or computed and stored."""
    key = case.key()
    info = None
    if cache_dir is not None:
        base = Path(cache_dir) / f"{_safe(case.name)}-{key}"
        tfm, meta = base.with_suffix(".tfm"), base.with_suffix(".json")
        if tfm.exists() and meta.exists():
            info = json.loads(meta.read_text())
            if info.get("recipe") == AFFINE_RECIPE and info.get("code") == _affine_code_hash():
                tx = sitk.ReadTransform(str(tfm))
                info["cached"] = True
                return sitk.AffineTransform(tx.Downcast() if hasattr(tx, "Downcast") else tx), info
    res = affine_prealign(fixed_n, moving_n)
    info = dict(res.as_dict(), recipe=AFFINE_RECIPE, code=_affine_code_hash(), case_key=key, cached=False)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        sitk.WriteTransform(res.transform, str(tfm))
        meta.write_text(json.dumps(info, indent=1))
    return res.transform, info


# ----------------------------------------------------------------------------- scoring


def score(case: Case, fixed: sitk.Image, total: sitk.Image, deformable: sitk.Image, *,
          fixed_labels: sitk.Image | None, moving_labels: sitk.Image | None, label_ids, mask: sitk.Image | None,
          per_label: bool = True) -> dict:
    """The benchmark's numbers for one transform (same code for every method).

    ``total``: displacement of the whole transform (affine folded in), ``deformable``: the deformable
    part, both on the fixed grid (LPS mm, resampling convention).
    """
    out: dict = {}
    if fixed_labels is not None and moving_labels is not None:
        warped = warp_labels(moving_labels, displacement_transform(total), fixed, "linear")
        rep = label_overlap_report(fixed_labels, warped, labels=label_ids)
        out.update(mean_dice=rep["mean_dice"], mean_hd95_mm=rep["mean_hd95_mm"], mean_asd_mm=rep["mean_asd_mm"],
                   n_labels=len(rep["labels"]))
        if per_label:
            out.update(dice=rep["dice"], hd95_mm=rep["hd95_mm"])
    jac = jacobian_report(deformable)
    out.update(folding_percent=jac["folding_percent"], jacobian_min=jac["jacobian_min"],
               jacobian_max=jac["jacobian_max"], jacobian_std=jac["jacobian_std"])
    if mask is not None:
        out["folding_percent_mask"] = jacobian_report(deformable, mask)["folding_percent"]
    if case.true_displacement is not None:
        diff = sitk.GetArrayFromImage(total) - sitk.GetArrayFromImage(case.true_displacement)
        epe = np.linalg.norm(diff, axis=-1)
        region = sitk.GetArrayViewFromImage(mask) > 0 if mask is not None else np.ones(epe.shape, bool)
        out.update(epe_mean_mm=float(epe[region].mean()), epe_p95_mm=float(np.percentile(epe[region], 95)),
                   epe_max_mm=float(epe[region].max()))
    return out


# ----------------------------------------------------------------------------- methods


def run_method(method: str, fixed_n: sitk.Image, aligned_n: sitk.Image, *, threads: int, device: str,
               elastix_settings: dict, optimize_options: dict) -> PeerResult:
    """One deformable method from the common pre-aligned start; its deformable field on the fixed grid."""
    if method == "affine":
        return identity_after_affine(fixed_n)
    if _is_elastix(method):
        variant = _ELASTIX_VARIANT.match(method)
        opts = dict(elastix_settings)
        if variant:
            opts["final_grid_spacing_mm"] = float(variant.group(1))
        res = run_elastix_bspline(fixed_n, aligned_n, threads=threads, **opts)
        res.timings["core_s"] = res.timings["elastix_s"]
        res.seconds = res.timings["elastix_s"] + res.timings["deformation_field_s"]
        return res
    if method == "optimize":
        import mmreg  # noqa: PLC0415 - the engine's public API, as a user calls it
        t0 = time.perf_counter()
        r = mmreg.register(fixed_n, aligned_n, method="optimize", affine=False, threads=threads, device=device,
                           fixed_modality="MR", moving_modality="MR", **optimize_options)
        seconds = time.perf_counter() - t0
        timings = dict(r.report["timings_s"], core_s=r.report["timings_s"]["method"])
        settings = {"method": "mmreg.register(method='optimize', affine=False)", "options": r.report["options"],
                    "device": r.report["device"], "threads": r.report["threads"],
                    "network_grid": r.report["network_grid"]}
        return PeerResult(r.displacement, seconds, settings, timings, r.warped)
    raise MMRegError(f"Unknown benchmark method '{method}'; use {', '.join(METHODS)} or elastix@SPACING.")


def run_case(case: Case, methods, *, threads: int, device: str, cache_dir: Path | None, elastix_settings: dict,
             optimize_options: dict, skip=(), per_label: bool = True) -> tuple:
    """All ``methods`` on one case; returns (records, settings per method, case info)."""
    fixed, moving = case.fixed_image(), case.moving_image()
    fixed_labels, moving_labels = case.fixed_label_map(), case.moving_label_map()
    label_ids = case.scored_labels()
    mask = case.evaluation_mask()
    fixed_n, fixed_norm = normalize_intensity(fixed, case.fixed_modality)
    moving_n, moving_norm = normalize_intensity(moving, case.moving_modality)
    t0 = time.perf_counter()
    affine, aff_info = cached_affine(case, fixed_n, moving_n, cache_dir)
    _log(f"{case.name}: affine {'from cache' if aff_info.get('cached') else f'in {time.perf_counter() - t0:.1f} s'}"
         f" (Mattes MI {aff_info.get('mattes_mi_before')} -> {aff_info.get('mattes_mi_after')})")
    aligned_n = sitk.Resample(moving_n, fixed, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    records, settings = [], {}
    for method in methods:
        if (case.name, method) in skip:
            continue
        _log(f"{case.name}: {method} ...")
        res = run_method(method, fixed_n, aligned_n, threads=threads, device=device,
                         elastix_settings=elastix_settings, optimize_options=optimize_options)
        total = fold_affine(res.displacement, affine) if method != "affine" else transform_to_field(affine, fixed)
        t1 = time.perf_counter()
        numbers = score(case, fixed, total, res.displacement, fixed_labels=fixed_labels, moving_labels=moving_labels,
                        label_ids=label_ids, mask=mask, per_label=per_label)
        rec = {"case": case.name, "group": case.group, "method": method, "seconds": round(res.seconds, 3),
               "core_seconds": round(float(res.timings.get("core_s", res.seconds)), 3), "timings": res.timings,
               "scoring_s": round(time.perf_counter() - t1, 3), **numbers}
        if _is_elastix(method):
            # Guard on every run: the dense field reproduces elastix's own result image (see peers).
            rec["convention_check"] = check_elastix_convention(aligned_n, res)
            if not rec["convention_check"]["convention_ok"]:
                _log(f"WARNING {case.name}: {method}: the elastix field does not reproduce elastix's result image: "
                     f"{rec['convention_check']}")
        records.append(rec)
        settings[method] = res.settings
        _log(f"{case.name}: {method}: " + _short(rec))
    info = dict(case.describe(), affine=aff_info, normalisation={"fixed": fixed_norm, "moving": moving_norm},
                scored_label_count=None if label_ids is None else len(label_ids),
                fixed_size=list(fixed.GetSize()), fixed_spacing_mm=list(fixed.GetSpacing()),
                moving_size=list(moving.GetSize()), moving_spacing_mm=list(moving.GetSpacing()))
    return records, settings, info


def _short(rec: dict) -> str:
    parts = [f"Dice {rec['mean_dice']:.3f}" if rec.get("mean_dice") is not None else None,
             f"HD95 {rec['mean_hd95_mm']:.2f} mm" if rec.get("mean_hd95_mm") is not None else None,
             f"fold {rec['folding_percent']:.4f} %",
             f"EPE {rec['epe_mean_mm']:.2f}/{rec['epe_p95_mm']:.2f} mm" if "epe_mean_mm" in rec else None,
             f"{rec['seconds']:.1f} s"]
    return ", ".join(p for p in parts if p)


# ----------------------------------------------------------------------------- report


def machine_info(threads: int, device: str) -> dict:
    """CPU, cores, threads, device and library versions for the report header."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    versions = {"mmreg": __version__, "python": platform.python_version()}
    for mod in ("torch", "SimpleITK", "monai", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            pass
    try:
        from importlib.metadata import version  # noqa: PLC0415
        versions["itk-elastix"] = version("itk-elastix")
    except Exception:  # pragma: no cover
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cores": usable, "threads": threads, "device": device,
            "platform": platform.platform(), "versions": versions,
            "load_average_at_start": [round(v, 2) for v in load] if load else None}


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def _median(values):
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(vals)) if vals else None


def summarise(records: list) -> list:
    """Per group x method medians, plus the median per-case time ratio to elastix and Dice gain over affine."""
    by_case = {(r["case"], r["method"]): r for r in records}
    groups = list(dict.fromkeys(r["group"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    rows = []
    for group in groups + ["all"]:
        for method in methods:
            recs = [r for r in records if r["method"] == method and (group == "all" or r["group"] == group)]
            if not recs:
                continue
            ratios, gains = [], []
            for r in recs:
                e = by_case.get((r["case"], "elastix"))
                if e is not None and method != "affine" and e["seconds"] > 0:
                    ratios.append(r["seconds"] / e["seconds"])
                a = by_case.get((r["case"], "affine"))
                if a is not None and r.get("mean_dice") is not None and a.get("mean_dice") is not None:
                    gains.append(r["mean_dice"] - a["mean_dice"])
            rows.append({"group": group, "method": method, "cases": len(recs),
                         "mean_dice": _median([r.get("mean_dice") for r in recs]),
                         "dice_gain": _median(gains),
                         "mean_hd95_mm": _median([r.get("mean_hd95_mm") for r in recs]),
                         "folding_percent": _median([r.get("folding_percent") for r in recs]),
                         "epe_mean_mm": _median([r.get("epe_mean_mm") for r in recs]),
                         "epe_p95_mm": _median([r.get("epe_p95_mm") for r in recs]),
                         "seconds": _median([r["seconds"] for r in recs]) if method != "affine" else None,
                         "time_ratio_to_elastix": _median(ratios)})
    return rows


def write_markdown(path: Path, records: list, summary: list, meta: dict, settings: dict, case_infos: list) -> None:
    """Write the comparison table (rows per case x method), the per-group medians and the settings."""
    m = meta["machine"]
    lines = [
        "# mmreg instance optimisation vs elastix B-spline",
        "",
        f"Generated by `{meta['command']}` on {meta['started']} (finished {meta.get('finished', 'running')}).",
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['cpu_count']} visible); every method limited to "
        f"**{m['threads']} threads**; mmreg device: {m['device']}; load average at start "
        f"{m['load_average_at_start']}. Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "",
        "## Protocol",
        "",
        "- One affine per case: `mmreg.affine.affine_prealign` on images normalised by "
        "`mmreg.intensity.normalize_intensity`, computed once and cached (`.tfm`), so every method starts from the "
        "identical affine.",
        "- Both deformable methods register the same normalised fixed image to the same normalised moving image "
        "resampled through that affine onto the fixed grid (linear), from the identity. mmreg is called as "
        "`mmreg.register(fixed, aligned_moving, method=\"optimize\", affine=False)`; nothing is added to the engine.",
        "- Total transform = deformable then affine, folded into one displacement field "
        "(`mmreg.transforms.fold_affine`; fixed grid, LPS mm, fixed point x <-> moving point x + u(x)).",
        "- Scoring, the same code for every row: moving labels warped through the total transform "
        "(`mmreg.labels.warp_labels`, per-label linear), `mmreg.metrics.label_overlap_report` (mean Dice and mean HD95 "
        "over the scored labels), folding = % of fixed-grid voxels with Jacobian determinant <= 0 of the deformable part "
        "(`mmreg.pipeline.jacobian_report`), endpoint error |u_total - u_true| inside the fixed brain mask where the "
        "deformation is known.",
        "- Seconds = wall time of the deformable registration call (elastix: registration + transformix dense field; "
        "mmreg: the whole `register` call). Timings are from one run on a shared machine: compare the ratios within a "
        "run, not absolute values across runs.",
    ]
    checks = [r["convention_check"] for r in records if "convention_check" in r]
    if checks:
        lines += [
            f"- elastix's dense field (transformix) is checked on every elastix row: resampling the pre-aligned moving "
            f"image through it with SimpleITK reproduces elastix's own result image to a relative mean absolute "
            f"difference of at most {max(c['relative_mad_field'] for c in checks):.1e} (the negated field: at least "
            f"{min(c['relative_mad_negated_field'] for c in checks):.1e}); "
            f"{sum(c['convention_ok'] for c in checks)}/{len(checks)} rows pass.",
        ]
    lines += [
        "",
        "## Results per case",
        "",
        "| case | group | method | mean Dice | mean HD95 (mm) | folding % | EPE mean (mm) | EPE p95 (mm) | seconds |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(f"| {r['case']} | {r['group']} | {method_label(r['method'])} | "
                     f"{_fmt(r.get('mean_dice'))} | {_fmt(r.get('mean_hd95_mm'), 2)} | "
                     f"{_fmt(r.get('folding_percent'), 4)} | {_fmt(r.get('epe_mean_mm'), 2)} | "
                     f"{_fmt(r.get('epe_p95_mm'), 2)} | "
                     f"{_fmt(r['seconds'], 1) if r['method'] != 'affine' else '-'} |")
    lines += [
        "",
        "## Summary per group (medians over cases)",
        "",
        "Dice gain = median over cases of (mean Dice of the method - mean Dice after the affine); time ratio = median "
        "over cases of (seconds of the method / seconds of elastix on the same case).",
        "",
        "| group | method | cases | mean Dice | Dice gain | mean HD95 (mm) | folding % | EPE mean (mm) | EPE p95 (mm) "
        "| seconds | time ratio to elastix |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(f"| {s['group']} | {method_label(s['method'])} | {s['cases']} | "
                     f"{_fmt(s['mean_dice'])} | {_fmt(s['dice_gain'])} | {_fmt(s['mean_hd95_mm'], 2)} | "
                     f"{_fmt(s['folding_percent'], 4)} | {_fmt(s['epe_mean_mm'], 2)} | {_fmt(s['epe_p95_mm'], 2)} | "
                     f"{_fmt(s['seconds'], 1)} | {_fmt(s['time_ratio_to_elastix'], 2)} |")
    lines += ["", "## Settings", ""]
    lines += [f"- **affine**: {AFFINE_RECIPE} (Mattes MI, 32 bins, rigid then affine, 3-level pyramid; start chosen "
              "between geometric centring and centre of mass)."]
    opt = settings.get("optimize")
    if opt:
        lines.append(f"- **mmreg optimize**: `{opt['method']}`, options {json.dumps(opt['options'])}, device "
                     f"{opt['device']}, {opt['threads']} torch threads, network grid of the first case "
                     f"{opt['network_grid']}.")
    elx = settings.get("elastix")
    if elx:
        pm = elx["parameter_map"]
        keys = ["Registration", "Metric", "Metric0Weight", "Metric1Weight", "NumberOfHistogramBins", "Transform",
                "FinalGridSpacingInPhysicalUnits", "GridSpacingSchedule", "NumberOfResolutions",
                "MaximumNumberOfIterations", "Optimizer", "AutomaticParameterEstimation", "ImageSampler",
                "NumberOfSpatialSamples", "NewSamplesEveryIteration", "FixedImagePyramid", "Interpolator",
                "RandomSeed"]
        lines.append(f"- **elastix B-spline**: itk-elastix {elx.get('itk_elastix_version', '?')} default 'bspline' "
                     f"parameter map, {elx['threads']} ITK threads (global thread pool); key parameters: "
                     + "; ".join(f"{k} = {' '.join(pm[k])}" for k in keys if k in pm) + ".")
    for name in sorted(k for k in settings if _ELASTIX_VARIANT.match(k)):
        pm = settings[name]["parameter_map"]
        lines.append(f"- **{method_label(name)}** (`{name}`): the same map with FinalGridSpacingInPhysicalUnits = "
                     f"{' '.join(pm['FinalGridSpacingInPhysicalUnits'])}.")
    lines += ["", "## Cases", "", "| case | group | labels scored | affine | notes |", "|---|---|---:|---|---|"]
    for c in case_infos:
        aff = c.get("affine", {})
        extra = ""
        if "direction_check" in c.get("info", {}):
            i = c["info"]
            extra = (f" Known deformation: max {i['max_displacement_mm']:.1f} mm (mean {i['mean_displacement_mm_in_mask']:.1f}"
                     f" mm in the brain), Jacobian {i['forward_jacobian_min']:.2f}..{i['forward_jacobian_max']:.2f}, "
                     f"inverse residual max {i['inverse_residual_mm_max']:.2g} mm; direction check "
                     f"MAD moving {i['direction_check']['mad_moving']:.4f} -> through truth "
                     f"{i['direction_check']['mad_through_truth']:.4f} (through the forward field "
                     f"{i['direction_check']['mad_through_forward']:.4f}).")
        lines.append(f"| {c['name']} | {c['group']} | {c.get('scored_label_count')} | Mattes MI "
                     f"{_fmt(aff.get('mattes_mi_before'))} -> {_fmt(aff.get('mattes_mi_after'))}, "
                     f"{aff.get('seconds', '-')} s | {c['notes']}.{extra} |")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments of ``python -m mmreg.bench.compare``."""
    p = argparse.ArgumentParser(prog="python -m mmreg.bench.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SPEC_HELP)
    p.add_argument("--cases", nargs="+", default=["default"], help="case specs (see below); default: default")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated list of {', '.join(METHODS)} and elastix@SPACING (elastix with another "
                        "final grid spacing in mm, e.g. elastix@20); default: " + ",".join(DEFAULT_METHODS))
    p.add_argument("--out", default="docs/optimize_vs_elastix.md", help="markdown report path")
    p.add_argument("--json", default=None, help="JSON results path (default: --out with .json)")
    p.add_argument("--threads", type=int, default=2, help="threads for every method (torch, ITK/elastix, SimpleITK)")
    p.add_argument("--device", default="cpu", help="mmreg device (cpu, cuda, mps, auto); elastix runs on the CPU")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="affine cache folder ('none' to recompute)")
    p.add_argument("--data", default=None, help="shared data folder (default: $MMREG_DATA or <repo>/../shared/data)")
    p.add_argument("--optimize-options", default="{}", help="JSON dict of extra options for method 'optimize'")
    p.add_argument("--elastix-grid-spacing", type=float, default=ELASTIX_DEFAULTS["final_grid_spacing_mm"])
    p.add_argument("--elastix-resolutions", type=int, default=ELASTIX_DEFAULTS["resolutions"])
    p.add_argument("--elastix-iterations", type=int, default=ELASTIX_DEFAULTS["iterations"])
    p.add_argument("--no-per-label", action="store_true", help="leave per-label Dice/HD95 out of the JSON")
    p.add_argument("--resume", action="store_true", help="keep rows already in --json and skip those case x method")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the comparison; returns the exit code."""
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if not valid_method(m)]
    if bad:
        print(f"error: unknown method(s) {bad}; use {', '.join(METHODS)} or elastix@SPACING", file=sys.stderr)
        return 2
    try:
        optimize_options = json.loads(args.optimize_options)
    except json.JSONDecodeError as exc:
        print(f"error: --optimize-options is not JSON: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    cache = None if str(args.cache).lower() == "none" else Path(args.cache).expanduser()
    elastix_settings = {"final_grid_spacing_mm": args.elastix_grid_spacing, "resolutions": args.elastix_resolutions,
                        "iterations": args.elastix_iterations}

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(max(1, args.threads))
    if any(_is_elastix(m) for m in methods):
        set_itk_threads(args.threads)
    try:
        cases = build_cases(args.cases, args.data)
    except MMRegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    records, case_infos, settings = [], [], {}
    if args.resume and json_path.exists():
        old = json.loads(json_path.read_text())
        records, case_infos, settings = old.get("results", []), old.get("cases", []), old.get("settings", {})
    skip = {(r["case"], r["method"]) for r in records}
    meta = {"command": "python -m mmreg.bench.compare " + " ".join(sys.argv[1:] if argv is None else argv),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_info(args.threads, args.device), "methods": methods,
            "elastix_settings": elastix_settings, "optimize_options": optimize_options,
            "affine_cache": portable_path(cache) if cache else None}
    _log(f"{len(cases)} case(s): {', '.join(c.name for c in cases)}; methods {methods}; threads {args.threads}")

    def flush(final=False):
        if final:
            meta["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
            load = os.getloadavg() if hasattr(os, "getloadavg") else None
            meta["load_average_at_end"] = [round(v, 2) for v in load] if load else None
        summary = summarise(records)
        write_markdown(out, records, summary, meta, settings, case_infos)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"meta": meta, "settings": settings, "cases": case_infos, "results": records,
                                         "summary": summary}, indent=1, default=str))

    for case in cases:
        recs, sets, info = run_case(case, methods, threads=args.threads, device=args.device, cache_dir=cache,
                                    elastix_settings=elastix_settings, optimize_options=optimize_options,
                                    skip=skip, per_label=not args.no_per_label)
        records.extend(recs)
        for k, v in sets.items():
            settings.setdefault(k, v)
        case_infos = [c for c in case_infos if c["name"] != info["name"]] + [info]
        flush()
    flush(final=True)
    _log(f"wrote {out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
