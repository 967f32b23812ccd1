"""The benchmark harness behind ``mmreg bench``: every method on the same cases, same start, same scoring.

    mmreg bench [--quick] [--cases full] [--methods affine,ants,elastix,optimize] [--threads 2]
                [--repeats N] [--out docs/benchmarks.md] [--options optimize='{"levels": 2}']

Per case (:mod:`mmreg.bench.cases`):

1. Affine, once: :func:`mmreg.affine.affine_prealign` on the images normalised by
   :func:`mmreg.intensity.normalize_intensity`; cached as ``.tfm`` + ``.json`` under ``--cache``
   (default ``~/.cache/mmreg/bench``), keyed by the case's name and a hash of its pixels and
   geometry, and reused only while the engine's affine/normalisation source is unchanged. Every
   method, and every later run, starts from the identical affine.
2. The normalised moving image is resampled through that affine onto the fixed grid (linear, 0
   outside). Every deformable method registers the normalised fixed image to this SAME pre-aligned
   image, from the identity: ANTs SyN, elastix B-spline, and the engine's methods through the public
   API (``mmreg.register(fixed, aligned, method=NAME, affine=False)``).
3. The total transform is "deformable, then affine", folded into one field
   (:func:`mmreg.transforms.fold_affine`); "affine" alone is the zero deformable field.
4. One scoring function for every method (:func:`score`): moving labels warped through the total
   transform (:func:`mmreg.labels.warp_labels`, per-label linear), Dice per label and mean, HD95 and
   ASD (:func:`mmreg.metrics.label_overlap_report`), folding % of the deformable part (whole fixed
   grid and inside the fixed labels), and where the deformation is known the endpoint error
   ``|u_total - u_true|`` inside the fixed labels (mean, 95th percentile, max; mm).
5. Time and memory, measured around each method's call in this process: ``seconds`` = wall time of
   the whole call, from the two pre-aligned images to a dense field on the fixed grid (peers:
   registration + conversion of their transform; mmreg: the ``register`` call);
   ``core_seconds`` = the registration itself (ANTs's or elastix's registration call; mmreg's
   "method" step); ``peak_memory_mb`` = the process's peak resident memory during the call (Linux
   VmHWM, reset before each call; it includes what the process already held, reported as
   ``baseline_memory_mb``). With ``--repeats N`` every method runs N times per case, interleaved
   (repeat 1 of all methods, then repeat 2, ...), times are medians over the repeats and the
   scores come from the first run. Speed is compared as per-case ratios to the peers of the same
   run (median over cases).

The markdown (``--out``), the JSON (``--json``) and the figures (``--figures``) are rewritten after
every case, so a long run leaves usable partial results; ``--resume`` skips case x method rows
already in the JSON.

Methods: ``affine``; ``ants`` (SyN: CC on mono-modal cases, Mattes MI otherwise), ``ants-mi``,
``ants-cc``; ``elastix`` (B-spline, Mattes MI), ``elastix@S`` (final grid S mm); every method of the
engine (``mmreg methods``); ``NAME+refine[N]``: a learned engine method followed by N steps of its
instance-optimisation refinement (default :data:`DEFAULT_REFINEMENT_STEPS`); and methods registered
with :func:`register_bench_method`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..affine import affine_prealign
from ..errors import InputError, MMRegError
from ..intensity import normalize_intensity
from ..labels import warp_labels
from ..metrics import label_overlap_report
from ..pipeline import jacobian_report
from ..transforms import displacement_transform, fold_affine, transform_to_field
from .cases import SPEC_HELP, Case, build_cases, portable_path
from .peers import (ANTS_DEFAULTS, ELASTIX_DEFAULTS, PeerResult, check_peer_convention, identity_after_affine,
                    run_ants_syn, run_elastix_bspline, set_ants_threads, set_itk_threads)

DEFAULT_CACHE = Path(os.environ.get("MMREG_BENCH_CACHE", Path.home() / ".cache" / "mmreg" / "bench"))
#: Bump when the affine recipe changes, so cached affines are not reused.
AFFINE_RECIPE = "affine_prealign(defaults) on normalize_intensity(case modality) images; v1"
#: Peers whose per-case wall time is the denominator of the speed ratios.
PEERS = ("ants", "elastix")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- methods


@dataclass
class MethodContext:
    """What a benchmark method gets: the case, the normalised fixed image, the normalised moving image
    resampled through the case's affine onto the fixed grid (``aligned``), that affine (fixed ->
    moving), the thread count, the torch device and the method's extra options."""

    case: Case
    fixed: sitk.Image
    aligned: sitk.Image
    affine: sitk.Transform
    threads: int = 2
    device: str = "cpu"
    options: dict = field(default_factory=dict)


@dataclass
class BenchMethod:
    """A method the harness can run: ``run(ctx)`` returns a :class:`~mmreg.bench.peers.PeerResult`
    whose ``displacement`` is the DEFORMABLE part on the fixed grid (LPS mm, fixed point x <-> point
    x + v(x) of the pre-aligned moving image), ``seconds`` the whole call and ``timings['core_s']``
    the registration itself. ``kind``: baseline, peer, mmreg or custom."""

    name: str
    label: str
    kind: str
    run: Callable[[MethodContext], PeerResult]


_CUSTOM_METHODS: dict = {}
_ELASTIX_VARIANT = re.compile(r"^elastix@(\d+(?:\.\d+)?)$")
_REFINED_VARIANT = re.compile(r"^(?P<base>[a-z][\w-]*)\+refine(?P<steps>\d+)?$")
#: Instance-optimisation steps of ``NAME+refine`` (a learned method followed by its refinement).
DEFAULT_REFINEMENT_STEPS = 50


def register_bench_method(name: str, run: Callable[[MethodContext], PeerResult], label: str | None = None) -> None:
    """Make ``run`` available to the harness as method ``name`` (plug-ins, tests)."""
    _CUSTOM_METHODS[name] = BenchMethod(name, label or name, "custom", run)


def unregister_bench_method(name: str) -> None:
    """Remove a method added with :func:`register_bench_method`."""
    _CUSTOM_METHODS.pop(name, None)


def _run_affine(ctx: MethodContext) -> PeerResult:
    res = identity_after_affine(ctx.fixed)
    res.timings["core_s"] = 0.0
    return res


def _run_elastix(spacing: float | None):
    def run(ctx: MethodContext) -> PeerResult:
        opts = dict(ctx.options)
        if spacing is not None:
            opts["final_grid_spacing_mm"] = spacing
        res = run_elastix_bspline(ctx.fixed, ctx.aligned, threads=ctx.threads, **opts)
        res.timings["core_s"] = res.timings["elastix_s"]
        res.seconds = res.timings["elastix_s"] + res.timings["deformation_field_s"]
        return res
    return run


def _run_ants(metric: str | None):
    def run(ctx: MethodContext) -> PeerResult:
        chosen = metric or ("CC" if ctx.case.mono_modal else "mattes")
        res = run_ants_syn(ctx.fixed, ctx.aligned, metric=chosen, threads=ctx.threads, **ctx.options)
        res.timings["core_s"] = res.timings["ants_s"]
        res.seconds = res.timings["ants_s"] + res.timings["deformation_field_s"]
        return res
    return run


def _run_engine(name: str, fixed_options: dict | None = None):
    def run(ctx: MethodContext) -> PeerResult:
        import mmreg  # noqa: PLC0415 - the engine's public API, as a user calls it
        t0 = time.perf_counter()
        options = dict(fixed_options or {}, **ctx.options)
        r = mmreg.register(ctx.fixed, ctx.aligned, method=name, affine=False, threads=ctx.threads,
                           device=ctx.device, fixed_modality="MR", moving_modality="MR", **options)
        seconds = time.perf_counter() - t0
        model = r.report.get("model_card")
        if model:
            from ..models import portable_model_path  # noqa: PLC0415
            model = dict(model, path=portable_model_path(model["path"]))
        settings = {"method": f"mmreg.register(method='{name}', affine=False)", "engine_method": name,
                    "options": r.report["options"], "model": model or r.report.get("model"),
                    "device": r.report["device"], "threads": r.report["threads"],
                    "network_grid": r.report["network_grid"]}
        timings = dict(r.report["timings_s"], core_s=r.report["timings_s"].get("method", seconds))
        return PeerResult(r.displacement, seconds, settings, timings, r.warped)
    return run


#: Benchmark variants of the learned-metric method: the same torch similarity + B-spline pipeline with
#: the learned metric (the CT-MR model on cases with a CT, the MR-MR model otherwise) or with MI.
METRIC_VARIANTS = {"metric": ("mmreg metric (learned)", {"similarity": "learned"}),
                   "metric-mi": ("mmreg metric pipeline with MI", {"similarity": "mi"}),
                   "metric-mi-masked": ("mmreg metric pipeline with MI, masked", {"similarity": "mi_masked"})}
#: Learned metric per kind of case: cases whose group names a CT use the CT-MR model.
METRIC_MODELS = {"ct": "metric_ctmr", "mr": "metric_mr"}


#: Benchmark variants of ``multiscale``: the paper's scale ablation (FMIRNet-1, -2, -3) as the shipped models
#: of one shared recipe (``Resources/Training/multiscale_brain_{1scale,2scales,3scales}.toml``); the plain name
#: runs the default model (3 scales, its own recipe). ``NAME+refine[STEPS]`` works for each.
MULTISCALE_VARIANTS = {"multiscale-1": ("mmreg multiscale, 1 scale (FMIRNet-1)", {"model": "multiscale_brain_1scale"}),
                       "multiscale-2": ("mmreg multiscale, 2 scales (FMIRNet-2)", {"model": "multiscale_brain_2scales"}),
                       "multiscale-3": ("mmreg multiscale, 3 scales (FMIRNet-3, ablation recipe)",
                                        {"model": "multiscale_brain_3scales"})}


#: Benchmark variants of ``grad``: the paper's ablation, one shipped model per fusion (name -> label, the
#: variant in the model names). Cases whose group names a CT use the CT-MR model of the variant when one is
#: installed (``grad_ctmr_<variant>``), else its MR-MR model (``grad_mr_<variant>``); the settings record
#: which. ``NAME+refine[STEPS]`` works for each.
GRAD_VARIANTS = {"grad": ("mmreg grad, gated fusion", "gated"),
                 "grad-average": ("mmreg grad, average fusion", "average"),
                 "grad-vm": ("mmreg grad, VM baseline", "vm"),
                 "grad-vmconcat": ("mmreg grad, VM(concat) baseline", "vmconcat")}


def grad_model_for(variant: str, group: str) -> str:
    """The ``grad`` model a benchmark case uses: ``grad_ctmr_<variant>`` for a case group naming a CT when
    it is installed, else ``grad_mr_<variant>``."""
    from ..methods import get_method  # noqa: PLC0415
    installed = {m if isinstance(m, str) else m.get("name") for m in get_method("grad").models()}
    ct = f"grad_ctmr_{variant}"
    return ct if "CT" in group and ct in installed else f"grad_mr_{variant}"


def _run_grad(variant: str, options: dict | None = None):
    engine = _run_engine("grad", options)

    def run(ctx: MethodContext) -> PeerResult:
        if "model" not in ctx.options:
            ctx = dataclasses.replace(ctx, options=dict(ctx.options, model=grad_model_for(variant, ctx.case.group)))
        return engine(ctx)
    return run


def _run_metric(options: dict):
    engine = _run_engine("metric", options)

    def run(ctx: MethodContext) -> PeerResult:
        if options.get("similarity") == "learned" and "model" not in ctx.options:
            model = METRIC_MODELS["ct" if "CT" in ctx.case.group else "mr"]
            ctx = dataclasses.replace(ctx, options=dict(ctx.options, model=model))
        return engine(ctx)
    return run


def resolve_method(name: str) -> BenchMethod:
    """The :class:`BenchMethod` called ``name``; :class:`InputError` naming the choices otherwise."""
    from ..methods import method_names  # noqa: PLC0415

    if name in _CUSTOM_METHODS:
        return _CUSTOM_METHODS[name]
    if name == "affine":
        return BenchMethod(name, "affine only", "baseline", _run_affine)
    if name == "elastix" or _ELASTIX_VARIANT.match(name):
        m = _ELASTIX_VARIANT.match(name)
        spacing = float(m.group(1)) if m else None
        label = "elastix B-spline" + (f" ({spacing:g} mm grid)" if m else "")
        return BenchMethod(name, label, "peer", _run_elastix(spacing))
    if name in ("ants", "ants-mi", "ants-cc"):
        metric = {"ants": None, "ants-mi": "mattes", "ants-cc": "CC"}[name]
        label = {"ants": "ANTs SyN", "ants-mi": "ANTs SyN (MI)", "ants-cc": "ANTs SyN (CC)"}[name]
        return BenchMethod(name, label, "peer", _run_ants(metric))
    if name in METRIC_VARIANTS and "metric" in method_names():
        label, options = METRIC_VARIANTS[name]
        return BenchMethod(name, label, "mmreg", _run_metric(options))
    if name in MULTISCALE_VARIANTS and "multiscale" in method_names():
        label, options = MULTISCALE_VARIANTS[name]
        return BenchMethod(name, label, "mmreg", _run_engine("multiscale", options))
    if name in GRAD_VARIANTS and "grad" in method_names():
        label, variant = GRAD_VARIANTS[name]
        return BenchMethod(name, label, "mmreg", _run_grad(variant))
    if name in method_names():
        return BenchMethod(name, f"mmreg {name}" + (" (3 scales)" if name == "multiscale" else ""), "mmreg",
                           _run_engine(name))
    refined = _REFINED_VARIANT.match(name)
    if refined and refined["base"] in MULTISCALE_VARIANTS:
        label, options = MULTISCALE_VARIANTS[refined["base"]]
        steps = int(refined["steps"] or DEFAULT_REFINEMENT_STEPS)
        return BenchMethod(name, f"{label} + {steps} refinement steps", "mmreg",
                           _run_engine("multiscale", dict(options, refinement_steps=steps)))
    if refined and refined["base"] in GRAD_VARIANTS and "grad" in method_names():
        label, variant = GRAD_VARIANTS[refined["base"]]
        steps = int(refined["steps"] or DEFAULT_REFINEMENT_STEPS)
        return BenchMethod(name, f"{label} + {steps} refinement steps", "mmreg",
                           _run_grad(variant, {"refinement_steps": steps}))
    if refined and refined["base"] in method_names():
        from ..methods import get_method  # noqa: PLC0415
        if "refinement_steps" not in get_method(refined["base"]).default_options():
            raise InputError(f"Method '{refined['base']}' has no refinement; '{name}' is not a benchmark method.")
        steps = int(refined["steps"] or DEFAULT_REFINEMENT_STEPS)
        return BenchMethod(name, f"mmreg {refined['base']} + {steps} refinement steps", "mmreg",
                           _run_engine(refined["base"], {"refinement_steps": steps}))
    raise InputError(f"Unknown benchmark method '{name}'. Choose from: affine, ants, ants-mi, ants-cc, elastix, "
                     f"elastix@SPACING, {', '.join(method_names() + list(_CUSTOM_METHODS))}, and NAME+refine[STEPS] "
                     "for a learned method with refinement.")


def default_methods() -> list:
    """affine, the two peers and every engine method that can run here (learned ones need a trained model)."""
    from ..methods import get_method, method_names  # noqa: PLC0415
    usable = []
    for n in method_names():
        method = get_method(n)
        if n == "metric":  # MI needs no model; the learned variant needs the shipped metrics
            names = {m if isinstance(m, str) else m.get("name") for m in method.models()}
            usable += (["metric"] if set(METRIC_MODELS.values()) <= names else []) + ["metric-mi"]
            continue
        if method.requires_model and not method.models():
            continue
        usable.append(n)
        if method.requires_model and "refinement_steps" in method.default_options():
            usable.append(f"{n}+refine")
    return ["affine", "ants", "elastix"] + usable


def _peer_family(name: str) -> str | None:
    for peer in PEERS:
        if name == peer or name.startswith(peer + "-") or name.startswith(peer + "@"):
            return peer
    return None


# ----------------------------------------------------------------------------- affine (cached)


def _affine_code_hash() -> str:
    """Hash of the engine's affine and normalisation source: a changed engine invalidates cached affines."""
    from .. import affine as _affine, intensity as _intensity  # noqa: PLC0415
    h = hashlib.sha1()
    for mod in (_affine, _intensity):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:12]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def cached_affine(case: Case, fixed_n: sitk.Image, moving_n: sitk.Image, cache_dir: Path | None) -> tuple:
    """(AffineTransform fixed -> moving, info dict) for ``case``, from ``cache_dir`` or computed and stored."""
    key = case.key()
    if cache_dir is not None:
        base = Path(cache_dir) / f"{_safe(case.name)}-{key}"
        tfm, meta = base.with_suffix(".tfm"), base.with_suffix(".json")
        if tfm.exists() and meta.exists():
            info = json.loads(meta.read_text())
            if info.get("recipe") == AFFINE_RECIPE and info.get("code") == _affine_code_hash():
                tx = sitk.ReadTransform(str(tfm))
                info["cached"] = True
                return sitk.AffineTransform(tx.Downcast() if hasattr(tx, "Downcast") else tx), info
    t0 = time.perf_counter()
    res = affine_prealign(fixed_n, moving_n)
    info = dict(res.as_dict(), recipe=AFFINE_RECIPE, code=_affine_code_hash(), case_key=key, cached=False,
                wall_s=round(time.perf_counter() - t0, 2))
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        sitk.WriteTransform(res.transform, str(tfm))
        meta.write_text(json.dumps(info, indent=1))
    return res.transform, info


# ----------------------------------------------------------------------------- memory


def _vm_kb(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:  # pragma: no cover - not Linux
        return None
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak resident memory of this process during a ``with`` block, in MB (``peak_mb``, ``baseline_mb``).

    On Linux the kernel's high-water mark (VmHWM) is reset at entry (``/proc/self/clear_refs``) and
    read at exit; where that is not possible a thread samples VmRSS every 10 ms. ``gpu_peak_mb``: torch's
    peak CUDA allocation during the block when CUDA is in use, else None.
    """

    def __enter__(self):
        self.baseline_mb = (_vm_kb("VmRSS") or 0) / 1024
        self._sampled, self._stop = self.baseline_mb, threading.Event()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._thread = None
        except OSError:  # pragma: no cover - older kernels / other systems
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._torch = sys.modules.get("torch")
        if self._torch is not None and self._torch.cuda.is_available():
            self._torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self):  # pragma: no cover - fallback path
        while not self._stop.wait(0.01):
            self._sampled = max(self._sampled, (_vm_kb("VmRSS") or 0) / 1024)

    def __exit__(self, *exc):
        if self._thread is None:
            self.peak_mb = (_vm_kb("VmHWM") or 0) / 1024
        else:  # pragma: no cover
            self._stop.set()
            self._thread.join()
            self.peak_mb = self._sampled
        torch = sys.modules.get("torch")
        self.gpu_peak_mb = (torch.cuda.max_memory_allocated() / 2**20
                            if torch is not None and torch.cuda.is_available() else None)
        return False


# ----------------------------------------------------------------------------- scoring


def score(case: Case, fixed: sitk.Image, total: sitk.Image, deformable: sitk.Image, *,
          fixed_labels: sitk.Image | None, moving_labels: sitk.Image | None, label_ids, mask: sitk.Image | None,
          per_label: bool = True) -> tuple:
    """The benchmark's numbers for one transform (the same code for every method): (numbers, warped labels).

    ``total``: displacement of the whole transform (affine folded in), ``deformable``: its deformable
    part, both on the fixed grid (LPS mm, fixed point x <-> moving point x + u(x)). ``mask``: fixed
    region for the masked folding and the endpoint error.
    """
    out: dict = {}
    warped = None
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
    return out, warped


# ----------------------------------------------------------------------------- one case


@dataclass
class CaseRun:
    """Everything one case produced: rows, settings per method, case description, and (when asked)
    the images of the case figure: normalised fixed and pre-aligned moving image, and per method the
    warped moving image and warped labels (all on the fixed grid)."""

    records: list
    settings: dict
    info: dict
    images: dict | None = None


def _label(method: BenchMethod, user_options: dict, settings: dict) -> str:
    """The method's table label; with a model of the user's (``--options M='{"model": ...}'``) the
    label without its description of the default model (e.g. "(3 scales)") and with that model's
    name, keeping what the label says about the run (e.g. "+ 50 refinement steps"); the user's
    other options follow as ``key=value`` (JSON values), so two runs of one method differ in the table."""
    label = method.label
    if "model" in user_options:
        model = settings.get("model")
        name = model.get("name") if isinstance(model, dict) else None
        without_description = re.sub(r"\s*\([^)]*\)", "", label)
        label = f"{without_description}, model '{name or user_options['model']}'"
    others = [f"{k}={json.dumps(v)}" for k, v in user_options.items() if k != "model"]
    return ", ".join([label] + others)


def run_case(case: Case, methods, *, threads: int = 2, device: str = "cpu", cache_dir: Path | None = DEFAULT_CACHE,
             repeats: int = 1, options: dict | None = None, skip=(), per_label: bool = True,
             keep_images: bool = False) -> CaseRun:
    """All ``methods`` (names) on one case, ``repeats`` times each (interleaved); see the module doc."""
    options = options or {}
    resolved = [resolve_method(m) for m in methods if (case.name, m) not in skip]
    if not resolved:  # everything already done (--resume)
        return CaseRun([], {}, {}, None)
    fixed, moving = case.fixed_image(), case.moving_image()
    fixed_labels, moving_labels = case.fixed_label_map(), case.moving_label_map()
    label_ids, mask = case.scored_labels(), case.evaluation_mask()
    fixed_n, fixed_norm = normalize_intensity(fixed, case.fixed_modality)
    moving_n, moving_norm = normalize_intensity(moving, case.moving_modality)
    affine, aff_info = cached_affine(case, fixed_n, moving_n, cache_dir)
    how = "from cache" if aff_info.get("cached") else f"in {aff_info.get('wall_s')} s"
    _log(f"{case.name}: affine {how} (Mattes MI {aff_info.get('mattes_mi_before')} -> {aff_info.get('mattes_mi_after')})")
    aligned_n = sitk.Resample(moving_n, fixed, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)

    runs: dict = {m.name: [] for m in resolved}
    for rep in range(max(1, int(repeats))):
        for method in resolved:
            ctx = MethodContext(case, fixed_n, aligned_n, affine, threads, device, dict(options.get(method.name, {})))
            with PeakMemory() as mem:
                res = method.run(ctx)
            runs[method.name].append((res, mem))
            if repeats > 1:
                _log(f"{case.name}: {method.name} repeat {rep + 1}/{repeats}: {res.seconds:.1f} s")

    records, settings = [], {}
    images = {"fixed": fixed_n, "moving": aligned_n, "warped": {}, "warped_labels": {}, "fixed_labels": fixed_labels,
              "title": case.name} if keep_images else None
    for method in resolved:
        res, _ = runs[method.name][0]
        mems = [m for _, m in runs[method.name]]
        calls = [r.seconds for r, _ in runs[method.name]]
        cores = [float(r.timings.get("core_s", r.seconds)) for r, _ in runs[method.name]]
        total = fold_affine(res.displacement, affine) if method.kind != "baseline" else transform_to_field(affine, fixed)
        t1 = time.perf_counter()
        numbers, warped_labels = score(case, fixed, total, res.displacement, fixed_labels=fixed_labels,
                                       moving_labels=moving_labels, label_ids=label_ids, mask=mask,
                                       per_label=per_label)
        rec = {"case": case.name, "group": case.group, "method": method.name, "kind": method.kind,
               "seconds": round(float(np.median(calls)), 3), "core_seconds": round(float(np.median(cores)), 3),
               "seconds_repeats": [round(v, 3) for v in calls], "core_seconds_repeats": [round(v, 3) for v in cores],
               "peak_memory_mb": round(max(m.peak_mb for m in mems), 1),
               "baseline_memory_mb": round(min(m.baseline_mb for m in mems), 1),
               "memory_increase_mb": round(max(m.peak_mb - m.baseline_mb for m in mems), 1),
               "gpu_peak_memory_mb": (round(max(m.gpu_peak_mb for m in mems), 1)
                                      if mems[0].gpu_peak_mb is not None else None),
               "timings": res.timings, "scoring_s": round(time.perf_counter() - t1, 3), **numbers}
        if method.kind == "peer" and res.result_image is not None:
            # Guard on every run: the dense field reproduces the peer's own warped image.
            interp = sitk.sitkLinear if _peer_family(method.name) == "ants" else sitk.sitkBSpline
            rec["convention_check"] = check_peer_convention(aligned_n, res, interpolator=interp)
            if not rec["convention_check"]["convention_ok"]:
                _log(f"WARNING {case.name}: {method.name}: the field does not reproduce the peer's own warped image: "
                     f"{rec['convention_check']}")
        records.append(rec)
        settings[method.name] = dict(res.settings, label=_label(method, options.get(method.name, {}), res.settings),
                                     kind=method.kind)
        if images is not None:
            images["warped"][method.name] = sitk.Resample(moving_n, fixed, displacement_transform(total),
                                                          sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            if warped_labels is not None:
                images["warped_labels"][method.name] = warped_labels
        _log(f"{case.name}: {method.name}: " + _short(rec))
    info = dict(case.describe(), affine=aff_info, normalisation={"fixed": fixed_norm, "moving": moving_norm},
                scored_label_count=None if label_ids is None else len(label_ids),
                fixed_size=list(fixed.GetSize()), fixed_spacing_mm=list(fixed.GetSpacing()),
                moving_size=list(moving.GetSize()), moving_spacing_mm=list(moving.GetSpacing()))
    return CaseRun(records, settings, info, images)


def _short(rec: dict) -> str:
    parts = [f"Dice {rec['mean_dice']:.3f}" if rec.get("mean_dice") is not None else None,
             f"HD95 {rec['mean_hd95_mm']:.2f} mm" if rec.get("mean_hd95_mm") is not None else None,
             f"fold {rec['folding_percent']:.4f} %",
             f"EPE {rec['epe_mean_mm']:.2f}/{rec['epe_p95_mm']:.2f} mm" if "epe_mean_mm" in rec else None,
             f"{rec['seconds']:.1f} s", f"peak {rec['peak_memory_mb']:.0f} MB"]
    return ", ".join(p for p in parts if p)


# ----------------------------------------------------------------------------- summary


def _median(values):
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(vals)) if vals else None


def summarise(records: list) -> list:
    """Per group (and "all") x method: medians over cases of the scores, Dice gain over affine, wall
    seconds, the largest peak memory, and the median per-case time ratio to each peer of the run."""
    by = {(r["case"], r["method"]): r for r in records}
    groups = list(dict.fromkeys(r["group"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    peers = [m for m in methods if m in PEERS]
    rows = []
    for group in groups + ["all"]:
        for method in methods:
            recs = [r for r in records if r["method"] == method and (group == "all" or r["group"] == group)]
            if not recs:
                continue
            gains = [r["mean_dice"] - by[(r["case"], "affine")]["mean_dice"] for r in recs
                     if r.get("mean_dice") is not None and (r["case"], "affine") in by
                     and by[(r["case"], "affine")].get("mean_dice") is not None]
            timed = method != "affine"
            row = {"group": group, "method": method, "cases": len(recs),
                   "mean_dice": _median([r.get("mean_dice") for r in recs]), "dice_gain": _median(gains),
                   "mean_hd95_mm": _median([r.get("mean_hd95_mm") for r in recs]),
                   "folding_percent": _median([r.get("folding_percent") for r in recs]),
                   "epe_mean_mm": _median([r.get("epe_mean_mm") for r in recs]),
                   "epe_p95_mm": _median([r.get("epe_p95_mm") for r in recs]),
                   "seconds": _median([r["seconds"] for r in recs]) if timed else None,
                   "core_seconds": _median([r["core_seconds"] for r in recs]) if timed else None,
                   "peak_memory_mb": max(r["peak_memory_mb"] for r in recs) if timed else None,
                   "memory_increase_mb": max(r.get("memory_increase_mb", 0.0) for r in recs) if timed else None}
            for peer in peers:
                ratios = [r["seconds"] / by[(r["case"], peer)]["seconds"] for r in recs
                          if timed and (r["case"], peer) in by and by[(r["case"], peer)]["seconds"] > 0]
                row[f"time_ratio_to_{peer}"] = _median(ratios)
            rows.append(row)
    return rows


def findings(summary: list, labels: dict) -> list:
    """Plain sentences computed from the summary: per group, which methods end below affine."""
    out = []
    for group in dict.fromkeys(s["group"] for s in summary if s["group"] != "all"):
        rows = [s for s in summary if s["group"] == group and s["method"] != "affine" and s["dice_gain"] is not None]
        below = [f"{labels.get(s['method'], s['method'])} ({s['dice_gain']:+.3f})" for s in rows if s["dice_gain"] < 0]
        if rows and below:
            out.append(f"**{group}**: below affine (median Dice gain): {', '.join(below)}.")
    return out


# ----------------------------------------------------------------------------- report


def machine_info(threads: int, device: str) -> dict:
    """CPU, cores, threads, device and library versions for the report header."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415
    versions = {"mmreg": __version__, "python": platform.python_version()}
    for dist in ("torch", "monai", "SimpleITK", "numpy", "itk-elastix", "antspyx"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cores": usable, "threads": threads, "device": device,
            "platform": platform.platform(), "versions": versions,
            "load_average_at_start": [round(v, 2) for v in load] if load else None}


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def training_overlap(records: list, settings: dict) -> list:
    """One sentence per learned method whose model card names its training subjects: the cases of
    ``records`` whose name contains one of those subject ids (their Dice flatters the network)."""
    from ..models import CARD_FILE, local_model_path  # noqa: PLC0415
    out = []
    for method, st in settings.items():
        model = st.get("model") if isinstance(st.get("model"), dict) else None
        if not model or not model.get("path"):
            continue
        folder = local_model_path(model["path"])
        try:
            card = json.loads((folder / CARD_FILE).read_text())
        except (OSError, ValueError):
            continue
        subjects = (card.get("training") or {}).get("data", {}).get("training_subjects") or []
        cases = sorted({r["case"] for r in records if r["method"] == method and any(sid in r["case"] for sid in subjects)})
        if cases:
            out.append(f"{st.get('label', method)}: its model '{card.get('name')}' was trained on {', '.join(subjects)}; "
                       f"the cases {', '.join(cases)} contain training subjects (images it has seen), the others do not.")
    return out


def write_markdown(path: Path, records: list, summary: list, meta: dict, settings: dict, case_infos: list,
                   figures: list) -> None:
    """Write the benchmark report: protocol, summary and speed tables, per-case rows, figures, settings, cases."""
    m = meta["machine"]
    labels = {k: v.get("label", k) for k, v in settings.items()}
    name = lambda method: labels.get(method, method)  # noqa: E731
    peers = [p for p in PEERS if any(r["method"] == p for r in records)]
    lines = [
        "# Benchmarks: mmreg methods against ANTs SyN and elastix",
        "",
        f"Generated by `{meta['command']}` on {meta['started']} (finished {meta.get('finished', 'running')})"
        + (f", resuming the run `{meta['resumed_from']['command']}` of {meta['resumed_from']['started']}"
           if meta.get("resumed_from") else "") + ".",
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['cpu_count']} visible); every method limited to "
        f"**{m['threads']} threads**; mmreg device: {m['device']}; load average at start {m['load_average_at_start']}"
        f", at end {meta.get('load_average_at_end', '-')}. Repeats per case and method: {meta['repeats']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "",
        "## Protocol",
        "",
        "- One affine per case (`mmreg.affine.affine_prealign` on images normalised by "
        "`mmreg.intensity.normalize_intensity`), computed once and cached, so every method starts from the identical "
        "affine. Every deformable method registers the same normalised fixed image to the same normalised moving image "
        "resampled through that affine onto the fixed grid, from the identity; mmreg's methods are called through the "
        "public API, `mmreg.register(fixed, aligned_moving, method=NAME, affine=False)`.",
        "- Total transform = deformable then affine, folded into one displacement field (fixed grid, LPS mm, fixed "
        "point x <-> moving point x + u(x)). One scoring function for every row: moving labels warped through the "
        "total transform (per-label linear interpolation), Dice and HD95 (mm) per label and their means over the "
        "scored labels; folding = % of fixed-grid voxels where the Jacobian determinant of the deformable part is "
        "<= 0; endpoint error (EPE) = |u_total - u_true| inside the fixed labels where the deformation is known.",
        "- Time: **call s** = wall time of the method's whole call, from the two pre-aligned images to a dense "
        "field on the fixed grid (peers: registration + conversion of their transform; mmreg: the `register` call); "
        "**reg. s** = the registration itself (ANTs's or elastix's registration call; mmreg's optimisation or "
        "network step). Both are medians over the repeats. **Peak MB** = peak resident memory of the benchmark "
        "process during the call; it includes what the process already holds (Python, torch, ITK, ANTs, images), so "
        "**+MB** gives the rise over the level at the start of the call, the method's own working memory. "
        "Speed ratios are per case against the peer's time on the same case in the same run, then the median over "
        "cases: the machine is shared and noisy, so compare ratios within a run, not absolute seconds across runs.",
    ]
    checks = [(r["method"], r["convention_check"]) for r in records if "convention_check" in r]
    if checks:
        worst = max(c["relative_mad_field"] for _, c in checks)
        lines.append(f"- The peers' transforms are read in the engine's convention and checked on every peer row: "
                     f"resampling the pre-aligned moving image through the dense field with SimpleITK reproduces the "
                     f"peer's own warped image to a relative mean absolute difference of at most {worst:.1e} "
                     f"(the negated field: at least {min(c['relative_mad_negated_field'] for _, c in checks):.1e}); "
                     f"{sum(c['convention_ok'] for _, c in checks)}/{len(checks)} rows pass.")
    lines += ["", "## Summary per case group (medians over cases)", "",
              "Dice gain = median over cases of (mean Dice of the method - mean Dice after the affine).", "",
              "| group | method | cases | mean Dice | Dice gain | HD95 (mm) | folding % | EPE mean (mm) | EPE p95 (mm) "
              "| call s | peak MB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['group']} | {name(s['method'])} | {s['cases']} | {_fmt(s['mean_dice'])} | "
                     f"{_fmt(s['dice_gain'])} | {_fmt(s['mean_hd95_mm'], 2)} | {_fmt(s['folding_percent'], 4)} | "
                     f"{_fmt(s['epe_mean_mm'], 2)} | {_fmt(s['epe_p95_mm'], 2)} | {_fmt(s['seconds'], 1)} | "
                     f"{_fmt(s['peak_memory_mb'], 0)} |")
    found = findings(summary, labels)
    if found:
        lines += ["", "Where deformable registration ended below the affine start:", ""] + [f"- {f}" for f in found]
    lines += ["", "Reading the table: on IXI T1 <- avg152 T2/PD the two label maps come from different atlases "
              "(DLMUSE on the subject, Neuromorphometrics on the template) and the templates are blurry averages, so "
              "Dice there measures how far a method agrees with another atlas as much as how well it registers; judge "
              "methods also on the cases with an exact ground truth (the endpoint error of the template cases). The "
              "abdominal labels are TotalSegmentator predictions on two different subjects, and the spinal-cord Dice "
              "moves in coarse steps (the cord is ~2 % of the voxels)."]
    lines += [f"- {line}" for line in training_overlap(records, settings)]
    lines += ["", "## Speed (all cases)", "",
              "| method | call s (median) | reg. s (median) | peak MB (max) | +MB (max) | "
              + " | ".join(f"time / {name(p)} (median)" for p in peers) + " |",
              "|---|---:|---:|---:|---:|" + "---:|" * len(peers)]
    for s in summary:
        if s["group"] == "all" and s["method"] != "affine":
            lines.append(f"| {name(s['method'])} | {_fmt(s['seconds'], 1)} | {_fmt(s['core_seconds'], 1)} | "
                         f"{_fmt(s['peak_memory_mb'], 0)} | {_fmt(s['memory_increase_mb'], 0)} | "
                         + " | ".join(_fmt(s.get(f"time_ratio_to_{p}"), 2) for p in peers) + " |")
    lines += ["", "## Results per case", "",
              "| case | group | method | mean Dice | HD95 (mm) | folding % | EPE mean (mm) | EPE p95 (mm) | call s "
              "| reg. s | repeats (call s) | peak MB | +MB |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in records:
        timed = r["method"] != "affine"
        lines.append(f"| {r['case']} | {r['group']} | {name(r['method'])} | {_fmt(r.get('mean_dice'))} | "
                     f"{_fmt(r.get('mean_hd95_mm'), 2)} | {_fmt(r.get('folding_percent'), 4)} | "
                     f"{_fmt(r.get('epe_mean_mm'), 2)} | {_fmt(r.get('epe_p95_mm'), 2)} | "
                     f"{_fmt(r['seconds'], 1) if timed else '-'} | {_fmt(r['core_seconds'], 1) if timed else '-'} | "
                     f"{' '.join(f'{v:.1f}' for v in r['seconds_repeats']) if timed else '-'} | "
                     f"{_fmt(r['peak_memory_mb'], 0) if timed else '-'} | "
                     f"{_fmt(r.get('memory_increase_mb'), 0) if timed else '-'} |")
    if figures:
        lines += ["", "## Figures", ""]
        for fig in figures:
            rel = os.path.relpath(fig, path.parent)
            lines += [f"![{Path(fig).stem}]({rel})", ""]
    lines += ["", "## Settings", "",
              f"- **affine**: {AFFINE_RECIPE} (Mattes MI, 32 bins, rigid then affine, 3-level pyramid; start chosen "
              "between geometric centring and centre of mass)."]
    for method, s in settings.items():
        if s.get("kind") == "mmreg":
            lines.append(f"- **{s['label']}**: `{s['method']}`, options {json.dumps(s['options'])}, model "
                         f"{s.get('model')}, device {s['device']}, {s['threads']} torch threads, network grid of "
                         f"the first case {s['network_grid']}.")
        elif _peer_family(method) == "ants":
            lines.append(f"- **{s['label']}** (`{method}`): antspyx {s.get('antspyx_version', '?')}, {s['method']}; "
                         f"metric {'CC (radius 4) on mono-modal cases, Mattes MI (32 bins) otherwise' if method == 'ants' else s['metric']}"
                         f"; SyN[gradient step {s['grad_step']}, update-field sigma {s['flow_sigma']}, total-field "
                         f"sigma {s['total_sigma']}]; iterations {s['reg_iterations']} at shrink factors "
                         f"{[2 ** i for i in reversed(range(len(s['reg_iterations'])))]} with smoothing sigmas "
                         f"{list(reversed(range(len(s['reg_iterations']))))} voxels (antspyx's defaults); "
                         f"{s['threads']} ITK threads (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS).")
        elif _peer_family(method) == "elastix":
            pm = s["parameter_map"]
            keys = ["Registration", "Metric", "Metric0Weight", "Metric1Weight", "NumberOfHistogramBins", "Transform",
                    "FinalGridSpacingInPhysicalUnits", "GridSpacingSchedule", "NumberOfResolutions",
                    "MaximumNumberOfIterations", "Optimizer", "AutomaticParameterEstimation", "ImageSampler",
                    "NumberOfSpatialSamples", "NewSamplesEveryIteration", "FixedImagePyramid", "Interpolator",
                    "RandomSeed"]
            lines.append(f"- **{s['label']}** (`{method}`): itk-elastix {s.get('itk_elastix_version', '?')} default "
                         f"'bspline' parameter map, {s['threads']} ITK threads (global thread pool); key parameters: "
                         + "; ".join(f"{k} = {' '.join(pm[k])}" for k in keys if k in pm) + ".")
        elif s.get("kind") == "custom":
            lines.append(f"- **{s['label']}** (`{method}`): {s.get('method', 'registered with register_bench_method')}.")
    lines += ["", "## Cases", "", "| case | group | labels scored | affine (Mattes MI before -> after) | notes |",
              "|---|---|---:|---|---|"]
    for c in case_infos:
        aff = c.get("affine", {})
        extra = ""
        i = c.get("info", {})
        if "direction_check" in i:
            extra = (f" Known deformation: max {i['max_displacement_mm']:.1f} mm (mean {i['mean_displacement_mm_in_mask']:.1f}"
                     f" mm in the brain), Jacobian {i['forward_jacobian_min']:.2f}..{i['forward_jacobian_max']:.2f}, "
                     f"inverse residual max {i['inverse_residual_mm_max']:.2g} mm; direction check: "
                     f"MAD moving {i['direction_check']['mad_moving']:.4f} -> through the truth "
                     f"{i['direction_check']['mad_through_truth']:.4f} (through the forward field "
                     f"{i['direction_check']['mad_through_forward']:.4f}).")
        if c.get("label_names") and len(c["label_names"]) <= 30:
            extra += " Labels: " + ", ".join(str(v) for v in c["label_names"].values()) + "."
        lines.append(f"| {c['name']} | {c['group']} | {c.get('scored_label_count')} | "
                     f"{_fmt(aff.get('mattes_mi_before'))} -> {_fmt(aff.get('mattes_mi_after'))} | "
                     f"{c['notes']}.{extra} |")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------- command line


#: Case set and repeats of ``--quick``.
QUICK = {"cases": ["quick"], "repeats": 3}


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``mmreg bench`` (shared by ``python -m mmreg.bench``)."""
    p.add_argument("--quick", action="store_true",
                   help=f"development mode: cases '{' '.join(QUICK['cases'])}', {QUICK['repeats']} repeats")
    p.add_argument("--cases", nargs="+", default=None, help="case specs or sets (see below); default: full")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (affine, ants, ants-mi, ants-cc, elastix, elastix@SPACING, the "
                        "engine's methods, NAME+refine[STEPS] for a learned method with refinement); default: "
                        "affine, ants, elastix and every engine method that can run (learned methods only with a "
                        "trained model, alone and +refine); model and options with --options")
    p.add_argument("--threads", type=int, default=2, help="threads for every method (torch, ITK, elastix, ANTs)")
    p.add_argument("--record-models", action="store_true",
                   help="write each learned method's summary into its model card (benchmark section)")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per case and method for the timings (medians); default 1, 3 with --quick")
    p.add_argument("--out", default="docs/benchmarks.md", help="markdown report (default docs/benchmarks.md)")
    p.add_argument("--json", default=None, help="JSON results (default: --out with .json)")
    p.add_argument("--figures", default=None, help="folder for the PNG figures (default: --out without suffix)")
    p.add_argument("--no-plots", action="store_true", help="write no figures")
    p.add_argument("--figure-case", default=None,
                   help="case shown in the case figure (default: the first case with a known deformation)")
    p.add_argument("--device", default="cpu", help="device of the engine's methods (cpu, cuda, mps, auto)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="affine cache folder ('none' to recompute)")
    p.add_argument("--data", default=None, help="shared data folder (default: $MMREG_DATA or <repo>/../shared/data)")
    p.add_argument("--options", action="append", default=[], metavar="METHOD=JSON",
                   help="extra options of one method as a JSON dict, e.g. optimize='{\"levels\": 2}' or "
                        "elastix='{\"iterations\": 500}' (repeatable)")
    p.add_argument("--no-per-label", action="store_true", help="leave per-label Dice/HD95 out of the JSON")
    p.add_argument("--resume", action="store_true", help="keep rows already in --json and skip those case x method")
    p.epilog = SPEC_HELP
    return p


def _parse_options(pairs) -> dict:
    out = {}
    for pair in pairs:
        method, sep, text = pair.partition("=")
        if not sep:
            raise InputError(f"--options expects METHOD=JSON, got '{pair}'.")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"--options {method}: not JSON ({exc}).") from None
        if not isinstance(value, dict):
            raise InputError(f"--options {method}: expected a JSON object, got {text}.")
        out[method.strip()] = value
    return out


def run_benchmark(args: argparse.Namespace, command: str = "mmreg bench") -> Path:
    """Run the benchmark described by parsed ``args`` (see :func:`add_arguments`); returns the markdown path."""
    cases_spec = args.cases or (QUICK["cases"] if args.quick else ["full"])
    repeats = args.repeats or (QUICK["repeats"] if args.quick else 1)
    if repeats < 1 or args.threads < 1:
        raise InputError("--repeats and --threads must be at least 1.")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else default_methods()
    if "affine" not in methods:
        methods = ["affine"] + methods  # the reference of the Dice gain
    for m in methods:
        resolve_method(m)  # unknown names fail before any work
    options = _parse_options(args.options)
    unknown = set(options) - set(methods)
    if unknown:
        raise InputError(f"--options for method(s) not run: {', '.join(sorted(unknown))}.")
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    fig_dir = Path(args.figures) if args.figures else out.with_suffix("")
    cache = None if str(args.cache).lower() == "none" else Path(args.cache).expanduser()

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(args.threads)
    if any(_peer_family(m) == "elastix" for m in methods):
        set_itk_threads(args.threads)
    if any(_peer_family(m) == "ants" for m in methods):
        set_ants_threads(args.threads)
    cases = build_cases(cases_spec, args.data)
    figure_case = args.figure_case or next((c.name for c in cases if c.true_displacement is not None and
                                            not c.mono_modal), cases[0].name if cases else None)
    if args.figure_case and figure_case not in {c.name for c in cases}:
        raise InputError(f"--figure-case '{figure_case}' is not among the cases: {', '.join(c.name for c in cases)}.")

    records, case_infos, settings = [], [], {}
    previous = None
    if args.resume and json_path.exists():
        old = json.loads(json_path.read_text())
        records, case_infos, settings = old.get("results", []), old.get("cases", []), old.get("settings", {})
        previous = {k: old.get("meta", {}).get(k) for k in ("command", "started", "finished")}
    skip = {(r["case"], r["method"]) for r in records}
    meta = {"command": command, "started": _dt.datetime.now().isoformat(timespec="seconds"), "resumed_from": previous,
            "machine": machine_info(args.threads, args.device), "methods": methods, "repeats": repeats,
            "cases": [c.name for c in cases], "options": options,
            "elastix_defaults": ELASTIX_DEFAULTS, "ants_defaults": ANTS_DEFAULTS,
            "affine_cache": portable_path(cache) if cache else None}
    _log(f"{len(cases)} case(s): {', '.join(c.name for c in cases)}; methods {methods}; threads {args.threads}; "
         f"repeats {repeats}")
    figures: list = []
    case_images = None

    def flush(final=False):
        nonlocal figures
        if final:
            meta["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
            load = os.getloadavg() if hasattr(os, "getloadavg") else None
            meta["load_average_at_end"] = [round(v, 2) for v in load] if load else None
        summary = summarise(records)
        if not args.no_plots and records:
            from .plots import write_all  # noqa: PLC0415 - matplotlib is optional
            labels = {k: v.get("label", k) for k, v in settings.items()}
            figures = write_all(records, fig_dir, case_images=case_images, methods=methods, labels=labels)
            if case_images is None:  # --resume without rerunning the figure case: keep its earlier figure
                figures += sorted(fig_dir.glob("case_*.png"))
        write_markdown(out, records, summary, meta, settings, case_infos, figures)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"meta": meta, "settings": settings, "cases": case_infos,
                                         "results": records, "summary": summary}, indent=1, default=str))

    fresh: set = set()  # methods run in this invocation: their settings replace those of a resumed report
    for case in cases:
        keep = case.name == figure_case and not args.no_plots
        run = run_case(case, methods, threads=args.threads, device=args.device, cache_dir=cache, repeats=repeats,
                       options=options, skip=skip, per_label=not args.no_per_label, keep_images=keep)
        if not run.records:
            continue
        records.extend(run.records)
        for k, v in run.settings.items():
            if k not in fresh:
                settings[k] = v
                fresh.add(k)
        case_infos = [c for c in case_infos if c["name"] != run.info["name"]] + [run.info]
        if keep and run.images["warped"]:
            case_images = dict(run.images, name=case.name)
        flush()
    flush(final=True)
    if getattr(args, "record_models", False):
        record_in_model_cards(summarise(records), settings, meta, out.as_posix())
    _log(f"wrote {out}, {json_path}" + (f" and {len(figures)} figure(s) in {fig_dir}" if figures else ""))
    return out


#: Summary columns copied into model cards by ``--record-models``.
_CARD_COLUMNS = ("cases", "mean_dice", "dice_gain", "mean_hd95_mm", "folding_percent", "epe_mean_mm", "seconds",
                 "peak_memory_mb", "time_ratio_to_ants", "time_ratio_to_elastix")


def record_in_model_cards(summary: list, settings: dict, meta: dict, report: str) -> list:
    """Write each learned method's summary rows into its model's card (``benchmark[<bench method>]``),
    only when the card's weights checksum is the one benchmarked. Returns the cards written."""
    from ..models import CARD_FILE, record_benchmark, resolve_model  # noqa: PLC0415
    written = []
    for method, s in settings.items():
        model = s.get("model")
        if not isinstance(model, dict) or not s.get("engine_method"):
            continue
        try:
            folder = resolve_model(s["engine_method"], model["name"])
            card = json.loads((folder / CARD_FILE).read_text())
        except (MMRegError, OSError, ValueError) as exc:
            _log(f"not recorded in a model card ({method}): {exc}")
            continue
        if card.get("sha256") != model.get("sha256"):
            _log(f"not recorded: the weights in {folder} changed since '{method}' was benchmarked")
            continue
        rows = {r["group"]: {k: r.get(k) for k in _CARD_COLUMNS if r.get(k) is not None}
                for r in summary if r["method"] == method}
        references = {group: {r["method"]: r["mean_dice"] for r in summary
                              if r["group"] == group and r["method"] in PEERS + ("affine",)} for group in rows}
        numbers = {"date": meta.get("finished") or meta.get("started"), "command": meta.get("command"),
                   "report": report, "label": s.get("label", method), "options": s.get("options"),
                   "machine": {k: meta.get("machine", {}).get(k) for k in ("cpu", "threads", "device")},
                   "by_group": rows, "reference_dice_by_group": references}
        written.append(record_benchmark(folder, method, numbers))
        _log(f"benchmark of '{method}' recorded in {written[-1]}")
    return written


def main(argv=None) -> int:
    """``python -m mmreg.bench``: the same as ``mmreg bench``."""
    parser = add_arguments(argparse.ArgumentParser(prog="python -m mmreg.bench", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        run_benchmark(args, "python -m mmreg.bench " + " ".join(sys.argv[1:] if argv is None else argv))
    except MMRegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
