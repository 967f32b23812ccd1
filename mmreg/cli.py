"""The ``mmreg`` command: register, evaluate, methods.

    mmreg register FIXED MOVING --method optimize --output-transform OUT.h5 \\
        [--output-warped W.nii.gz] [--moving-labels ML --output-warped-labels WL] \\
        [--fixed-labels FL] [--no-affine] [--device cpu|cuda|mps|auto] [--report R.json] [--output-extra DIR]
    mmreg evaluate TRANSFORM --fixed-labels FL --moving-labels ML [--report R.json]
    mmreg methods [--json]
    mmreg train CONFIG.toml [--resume] [--steps N] [--output DIR] [--base-model MODEL] [--device auto|cpu|cuda]
                [--threads N] [--data DIR]
    mmreg train --method NAME --data MANIFEST [--output DIR] [--base-model MODEL] [--iterations N] [--resume]
                [--learning-rate LR] [--batch-size B] [--spacing MM] [--no-augment] [--validation-fraction F]
                [--warmup-steps N] [--gradient-clip NORM] [--seed N]
    mmreg train --resume --output DIR [--iterations N]      (or --method NAME --name NAME: the run's own config)
    torchrun --nproc_per_node N -m mmreg train ...     (data-parallel; --batch-size is the global batch)
    mmreg models list|rename|delete|install
    mmreg propagate ATLAS ATLAS_LABELS TARGET... --output-dir DIR [--method multiscale] [-O refinement_steps=50]
    mmreg joint-seg --annotated IMG:LAB... --unannotated IMG... [--test IMG:LAB... --compare] --output DIR
                    [--progress-file P.jsonl] [--stop-file STOP]
    mmreg segment MODEL_DIR IMAGE --output LABELS.nii.gz
    mmreg bench [--quick] [--cases ...] [--methods affine,ants,elastix,optimize] [--threads 2] [--repeats N]

Exit codes: 0 success, 2 bad input (message on stderr), 130 cancelled (Ctrl-C).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .errors import CancelledError, MMRegError


def _parse_value(text: str):
    """Option values: JSON when it parses (numbers, lists, true/false), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _options(pairs) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise MMRegError(f"--option expects KEY=VALUE, got '{pair}'.")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value)
    return out


class _Bar:
    """A tqdm progress bar fed by the engine's progress callback (fractions 0..1)."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=1000, unit="", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {desc}",
                            file=sys.stderr, leave=False)

    def __call__(self, fraction: float, message: str):
        if self.bar is not None:
            self.bar.n = int(round(fraction * 1000))
            self.bar.set_description_str(message[:60], refresh=False)
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _cmd_register(args) -> int:
    from .pipeline import register
    if args.output_warped_labels and not args.moving_labels:
        raise MMRegError("--output-warped-labels needs --moving-labels (the label map to warp).")
    bar = _Bar(not args.quiet)
    try:
        result = register(args.fixed, args.moving, method=args.method, model=args.model, affine=not args.no_affine,
                          fixed_labels=args.fixed_labels, moving_labels=args.moving_labels,
                          fixed_mask=args.fixed_mask, moving_mask=args.moving_mask,
                          fixed_modality=args.fixed_modality, moving_modality=args.moving_modality,
                          device=args.device, threads=args.threads, label_interpolation=args.label_interpolation,
                          progress=bar, **_options(args.option))
    finally:
        bar.close()
    extra = {}
    if args.output_extra:
        folder = Path(args.output_extra)
        folder.mkdir(parents=True, exist_ok=True)
        extra = {name: folder / f"{name}.nii.gz" for name in result.extra_images}
    written = result.save(args.output_transform, args.output_warped, args.output_warped_labels, args.report,
                          extra_paths=extra)
    if args.output_extra and not extra:
        print(f"note: method {args.method} makes no extra maps; nothing written to {args.output_extra}")
    q = result.report["quality"]
    lines = [f"method {args.method}: {result.report['timings_s']['total']:.1f} s "
             f"(registration {result.report['timings_s'].get('method', 0.0):.1f} s)"]
    if result.report.get("affine"):
        a = result.report["affine"]
        lines.append(f"affine: Mattes MI {a['mattes_mi_before']:.4f} -> {a['mattes_mi_after']:.4f}"
                     if a["mattes_mi_before"] is not None else "affine: done")
    lines.append(f"folding (det J <= 0): {q['deformable']['folding_percent']:.3f} % of voxels")
    if "labels" in q:
        lines.append(f"mean Dice: {q['labels_after_affine']['mean_dice']:.3f} after affine -> "
                     f"{q['labels']['mean_dice']:.3f} after {args.method}; mean HD95 {q['labels']['mean_hd95_mm']:.2f} mm")
    for kind, path in written.items():
        lines.append(f"wrote {kind}: {path}")
    lines += [f"warning: {text}" for text in result.report.get("warnings", [])]
    print("\n".join(lines))
    return 0


def _cmd_evaluate(args) -> int:
    from .pipeline import evaluate
    out = evaluate(args.transform, args.fixed_labels, args.moving_labels, args.label_interpolation)
    if args.report:
        from .image import atomic_output
        with atomic_output(args.report, "report") as tmp:
            tmp.write_text(json.dumps(out, indent=2))
    labels = out["labels"]
    print(f"mean Dice {labels['mean_dice']:.4f} over {len(labels['dice'])} labels; "
          f"mean HD95 {labels['mean_hd95_mm']:.2f} mm; folding {out['jacobian']['folding_percent']:.3f} %")
    return 0


def _cmd_methods(args) -> int:
    from .methods import PLANNED, describe_methods
    methods = describe_methods()
    if args.json:
        print(json.dumps(methods, indent=2, default=str))
        return 0
    for m in methods:
        models = (", ".join(f"{x['name']} ({x['source']}: {x['path']})" for x in m["models"])
                  or ("none installed: train one with `mmreg train`" if m["requires_model"] else "(needs no model)"))
        print(f"{m['name']:<13} {m['description']}\n{'':<13} modalities: {m['modalities']}; models: {models}")
        print(f"{'':<13} options: " + ", ".join(f"{k}={v}" for k, v in m["options"].items()))
    missing = [p for p in PLANNED if p not in {m["name"] for m in methods}]
    if missing:
        print(f"not yet available: {', '.join(missing)}")
    return 0


@contextlib.contextmanager
def _terminate_as_interrupt():
    """While active (main thread only), SIGTERM raises KeyboardInterrupt, so long runs stop as on Ctrl-C; also when a
    library caught it and raised its own error instead (a SimpleITK registration callback does)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    received = []

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except Exception as exc:
        if received:  # a library turned the interrupt into its own error (SimpleITK's iteration callbacks): still a stop
            raise KeyboardInterrupt(f"signal {received[0]}") from exc
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train_data(text: str | None):
    """``(manifest, data_root)`` from ``--data``: a .csv/.json file (or a folder holding
    manifest.csv / manifest.json) is a manifest of the user's pairs; another folder is the shared data."""
    if not text:
        return None, None
    path = Path(text).expanduser()
    if path.is_dir():
        for candidate in ("manifest.csv", "manifest.json"):
            if (path / candidate).is_file():
                return str((path / candidate).resolve()), None
        return None, str(path.resolve())
    if path.suffix.lower() in (".csv", ".json", ".tsv") or path.is_file():
        return str(path.resolve()), None
    raise MMRegError(f"--data '{text}' does not exist: give a manifest (.csv/.json) of your pairs or the shared data folder.")


def _cmd_train(args) -> int:
    import os

    from .training import AugmentConfig, config_for_manifest, load_config, train
    manifest, data_root = _train_data(args.data)
    base = args.base_model
    if base and (base.endswith(".pt") or Path(base).expanduser().is_dir()):
        base = str(Path(base).expanduser().resolve())  # a path from the shell's folder, not the config's
    output = str(Path(args.output).expanduser().resolve()) if args.output else None
    teacher = args.teacher_model
    if teacher and Path(teacher).expanduser().is_dir():
        teacher = str(Path(teacher).expanduser().resolve())  # a folder from the shell's folder, not the config's
    if args.config:
        overrides = dict(steps=args.steps, device=args.device, threads=args.threads, base_model=base, output=output,
                         data_root=data_root, manifest=manifest, method=args.method, name=args.name,
                         learning_rate=args.learning_rate, batch_size=args.batch_size, spacing_mm=args.spacing,
                         smoothness=args.smoothness, validation_fraction=args.validation_fraction,
                         warmup_steps=args.warmup_steps, gradient_clip=args.gradient_clip, seed=args.seed,
                         teacher_model=teacher, teacher_weight=args.teacher_weight)
        if args.no_augment:
            import dataclasses
            overrides["augment"] = dataclasses.asdict(AugmentConfig.off())
        cfg = load_config(args.config, **overrides)
    elif args.resume and not manifest and (args.output or (args.method and args.name)):
        # Resume from the run's own checkpoint: its config (manifest included) is stored there.
        from .training import config_of_run, default_output
        folder = output or str(default_output(args.method, args.name))
        changed = [flag for flag, value in (("--base-model", args.base_model), ("--learning-rate", args.learning_rate),
                                            ("--batch-size", args.batch_size), ("--spacing", args.spacing),
                                            ("--smoothness", args.smoothness), ("--no-augment", args.no_augment),
                                            ("--validation-fraction", args.validation_fraction),
                                            ("--warmup-steps", args.warmup_steps),
                                            ("--gradient-clip", args.gradient_clip),
                                            ("--teacher-model", args.teacher_model),
                                            ("--teacher-weight", args.teacher_weight)) if value]
        if args.seed is not None:
            changed.append("--seed")
        if changed:
            raise MMRegError(f"{', '.join(changed)} cannot change when resuming; start a new run in another folder.")
        cfg = config_of_run(folder, steps=args.steps, device=args.device, threads=args.threads)
    else:
        if not args.method or not manifest:
            raise MMRegError("mmreg train needs a config file, or --method NAME and --data MANIFEST (a .csv/.json list "
                             "of your image pairs); see `mmreg train --help`.")
        cfg = config_for_manifest(args.method, manifest, name=args.name, output=output, base_model=base,
                                  steps=args.steps, learning_rate=args.learning_rate, batch_size=args.batch_size,
                                  spacing_mm=args.spacing, augment=not args.no_augment, smoothness=args.smoothness,
                                  validation_fraction=args.validation_fraction, device=args.device,
                                  threads=args.threads, warmup_steps=args.warmup_steps,
                                  gradient_clip=args.gradient_clip, seed=args.seed, teacher_model=teacher,
                                  teacher_weight=args.teacher_weight)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only process 0 reports
    bar = _Bar(not args.quiet and main_process)

    def log(line):
        if bar.bar is not None:
            bar.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)
    with _terminate_as_interrupt():  # a scheduler's or `kill`'s SIGTERM stops like Ctrl-C: checkpoint first
        try:
            result = train(cfg, resume=args.resume, progress=bar, log=log)
        finally:
            bar.close()
    if result.card is None:
        return 0
    h = result.history
    sps = h["seconds_per_step"]
    lines = [f"trained {result.final_step} steps in {result.seconds:.1f} s (total wall time {h['wall_seconds']:.1f} s; "
             f"median {sorted(sps)[len(sps) // 2] if sps else float('nan'):.2f} s/step)"]
    if h.get("validation") and "accuracy" in h["validation"][-1]:  # the learned metric: patch classification
        last, best = h["validation"][-1], h.get("best") or {}
        first = h.get("initial_validation") or {}
        lines.append(f"validation hinge loss {first.get('loss', float('nan')):.4f} untrained -> {last['mean_loss']:.4f} "
                     f"at step {last['step']} (accuracy {first.get('accuracy', float('nan')):.3f} -> {last['accuracy']:.3f}; "
                     f"best loss {best.get('mean_loss', float('nan')):.4f} at step {best.get('step')})")
    elif h.get("validation"):
        last, best = h["validation"][-1], h.get("best") or {}

        def number(v, identity=False):
            dice = h.get("identity_dice") if identity else v.get("mean_dice")
            loss = h.get("identity_loss") if identity else v.get("mean_loss")
            return f"{dice:.4f}" if dice is not None else (f"loss {loss:.4f}" if loss is not None else "-")
        lines.append(f"validation mean Dice: {number(None, True)} identity -> {number(last)} "
                     f"at step {last['step']} (best {number(best) if best else '-'} at step {best.get('step')}); "
                     f"folding {last['folding_percent']:.3f} %")
    skipped = result.card.training.get("data", {}).get("skipped") or []
    if skipped:
        lines.append(f"{len(skipped)} manifest entr{'y' if len(skipped) == 1 else 'ies'} skipped (see the log above)")
    lines.append(f"model '{result.card.name}' ({result.card.training.get('weights')} weights) written to {result.model_dir}")
    lines.append(f"use it: mmreg register FIXED MOVING --method {result.card.method} --model {result.model_dir}")
    print("\n".join(lines))
    return 0


def _cmd_models(args) -> int:
    from .methods import method_names
    from .models import delete_model, install_model, list_models, rename_model
    if args.action == "list":
        methods = [args.method] if args.method else method_names()
        rows = [dict(m, method=name) for name in methods for m in list_models(name)]
        if args.json:
            print(json.dumps(rows, indent=2))
        for r in [] if args.json else rows:
            runs_at = f" (network alone at {r['inference_spacing_mm']} mm)" if r.get("inference_spacing_mm") else ""
            print(f"{r['method']:<10} {r['name']:<24} {r['source']:<8} {r['spacing_mm']} mm{runs_at}  {r['path']}")
        return 0
    if args.action == "rename":
        print(f"renamed to {rename_model(args.method, args.name, args.new_name)}")
    elif args.action == "delete":
        print(f"deleted {delete_model(args.method, args.name)}")
    else:
        print(f"installed as {install_model(args.folder, args.name)}")
    return 0


def _pairs(items, what: str) -> list:
    """``IMAGE:LABELS`` arguments to (image, labels) path pairs (a ':' inside a Windows drive letter is kept)."""
    out = []
    for item in items or []:
        image, sep, labels = item.rpartition(":")
        if not sep or not image or not labels or len(labels) == 1:
            raise MMRegError(f"{what} '{item}' must be IMAGE:LABELS (an image and its label map, joined by ':').")
        out.append((image, labels))
    return out


def _cmd_propagate(args) -> int:
    from .propagation import propagate_labels, propagated_label_paths, write_propagated
    paths = propagated_label_paths(args.targets, args.output_dir)
    bar = _Bar(not args.quiet)
    try:
        results = propagate_labels(args.atlas, args.atlas_labels, args.targets, method=args.method, model=args.model,
                                   device=args.device, threads=args.threads, progress=bar, **_options(args.option))
    finally:
        bar.close()
    for r, p in zip(results, write_propagated(results, paths)):
        print(f"{r.target}: {r.seconds:.1f} s, folding {r.report['folding_percent']:.3f} % -> {p}")
    return 0


class _ProgressFile:
    """The progress callback of ``joint-seg --progress-file``: JSON lines ``{"fraction", "message"}`` (at most
    about 5 a second, plus the last), for a GUI that follows the run from another process; returns False (the
    engine then stops with CancelledError, exit 130) once ``stop_file`` exists."""

    def __init__(self, path, stop_file=None):
        import time
        self.path, self.stop_file, self._time, self._last = path, stop_file, time.monotonic, -1.0
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text("")

    def __call__(self, fraction: float, message: str = ""):
        if self.path and (fraction >= 1.0 or self._time() - self._last >= 0.2):
            self._last = self._time()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"fraction": round(float(fraction), 5), "message": message}) + "\n")
        if self.stop_file and Path(self.stop_file).exists():
            return False
        return None


def _cmd_joint_seg(args) -> int:
    from .segmentation import joint_segmentation_experiment, save_segmenter, train_joint_segmenter
    annotated = _pairs(args.annotated, "--annotated")
    test = _pairs(args.test, "--test")
    labels = args.labels if not args.labels or not args.labels[0].isdigit() else [int(v) for v in args.labels.split(",")]
    common = dict(labels=labels, method=args.method, model=args.model, spacing_mm=args.spacing, steps=args.steps,
                  seed=args.seed, threads=args.threads, register_options=_options(args.option), log=print)
    if args.progress_file or args.stop_file:
        common["progress"] = _ProgressFile(args.progress_file, args.stop_file)
    out = Path(args.output)
    if args.compare:
        if not test:
            raise MMRegError("--compare needs --test IMAGE:LABELS (held-out annotated images to score on).")
        res = joint_segmentation_experiment(annotated, args.unannotated, test, **common)
        for key in ("annotated_only", "with_propagated"):
            save_segmenter(out / key, res["networks"][key], res["label_ids"], args.spacing, {"variant": key})
        numbers = {k: v for k, v in res.items() if k != "networks"}
        (out / "comparison.json").write_text(json.dumps(numbers, indent=1))
        print(f"held-out mean Dice: annotated only {res['annotated_only']['mean_dice']:.3f}, with propagated labels "
              f"{res['with_propagated']['mean_dice']:.3f}; models and comparison.json in {out}")
        return 0
    res = train_joint_segmenter(annotated, args.unannotated, **common)
    save_segmenter(out, res["network"], res["label_ids"], args.spacing,
                   {"annotated": len(annotated), "unannotated": len(args.unannotated), "method": args.method})
    if test:
        from .segmentation import evaluate_segmenter
        ev = evaluate_segmenter(res["network"], test, res["label_ids"], args.spacing)
        print(f"held-out mean Dice {ev['mean_dice']:.3f}")
    print(f"segmentation model written to {out}; use it: mmreg segment {out} IMAGE -o LABELS.nii.gz")
    return 0


def _cmd_joint_seg_interruptible(args) -> int:
    with _terminate_as_interrupt():  # `kill`'s SIGTERM stops like Ctrl-C (exit 130); the model is written last
        return _cmd_joint_seg(args)


def _cmd_segment(args) -> int:
    from .segmentation import load_segmenter, segment, write_segmentation
    net, card = load_segmenter(args.model)
    labels = segment(net, args.image, card["label_ids"], card["spacing_mm"], card.get("architecture"))
    print(f"wrote {write_segmentation(labels, args.output)}")
    return 0


def _cmd_bench(args) -> int:
    from .bench.harness import run_benchmark
    run_benchmark(args, "mmreg bench " + " ".join(sys.argv[2:]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mmreg`` command."""
    parser = argparse.ArgumentParser(prog="mmreg", description="Learning-based deformable image registration "
                                     "(mono- and multi-modal) in physical space.")
    parser.add_argument("--version", action="version", version=f"mmreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    reg = sub.add_parser("register", help="register MOVING to FIXED and write the transform (and warped images)")
    reg.add_argument("fixed", help="fixed image (NIfTI, NRRD, MHA, ...)")
    reg.add_argument("moving", help="moving image")
    reg.add_argument("--method", default="optimize", help="registration method (see `mmreg methods`)")
    reg.add_argument("--model", default=None, help="trained model name or folder (learned methods)")
    reg.add_argument("--output-transform", "-o", required=True,
                     help="transform to write: .h5/.tfm (ITK transform) or .nii.gz/.nrrd (displacement image)")
    reg.add_argument("--output-warped", help="moving image resampled onto the fixed grid")
    reg.add_argument("--fixed-labels", help="fixed label map (for Dice/HD95 in the report)")
    reg.add_argument("--moving-labels", help="moving label map (warped; Dice/HD95 with --fixed-labels)")
    reg.add_argument("--output-warped-labels", help="warped moving label map")
    reg.add_argument("--label-interpolation", choices=("linear", "nearest"), default="linear",
                     help="labels: per-label linear + argmax (default) or nearest neighbour")
    reg.add_argument("--output-extra", metavar="DIR",
                     help="folder for the method's extra maps on the fixed grid, one NAME.nii.gz each (e.g. "
                          "multiscale: attention)")
    reg.add_argument("--fixed-mask", help="fixed mask (nonzero = region that counts, e.g. a brain mask)")
    reg.add_argument("--moving-mask", help="moving mask")
    reg.add_argument("--no-affine", action="store_true", help="skip the affine pre-alignment")
    reg.add_argument("--fixed-modality", choices=("auto", "MR", "CT"), default="auto")
    reg.add_argument("--moving-modality", choices=("auto", "MR", "CT"), default="auto")
    reg.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    reg.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    reg.add_argument("--option", "-O", action="append", metavar="KEY=VALUE",
                     help="method option, e.g. -O similarity=mi -O iterations=[100,50]; repeatable")
    reg.add_argument("--report", help="JSON report: timings per step, QA numbers, Dice")
    reg.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    reg.set_defaults(func=_cmd_register)

    ev = sub.add_parser("evaluate", help="score an existing transform against label maps")
    ev.add_argument("transform", help="transform file (.h5, .tfm, .nii.gz, .nrrd; fixed -> moving)")
    ev.add_argument("--fixed-labels", required=True)
    ev.add_argument("--moving-labels", required=True)
    ev.add_argument("--label-interpolation", choices=("linear", "nearest"), default="linear")
    ev.add_argument("--report", help="JSON file for the numbers")
    ev.set_defaults(func=_cmd_evaluate)

    me = sub.add_parser("methods", help="list the installed methods and their models")
    me.add_argument("--json", action="store_true")
    me.set_defaults(func=_cmd_methods)

    tr = sub.add_parser("train", help="train or fine-tune a learned method's network (rerunnable, resumable)",
                        description="Train from a TOML config (the shipped recipes in Resources/Training), or on your "
                                    "own pairs: mmreg train --method mi --data pairs.csv --output DIR "
                                    "[--base-model MODEL] [--iterations N]. A manifest is a CSV/JSON with columns "
                                    "fixed, moving and optional fixed_labels, moving_labels, fixed_modality, "
                                    "moving_modality, split (train/validation). Bad entries are reported and skipped. "
                                    "Multi-process: torchrun --nproc_per_node N -m mmreg train ... (batch size = "
                                    "global batch).")
    tr.add_argument("config", nargs="?", default=None,
                    help="training config (TOML), e.g. Resources/Training/mi_brain.toml (optional with --method/--data)")
    tr.add_argument("--method", default=None, help="method to train (see `mmreg methods`; e.g. mi)")
    tr.add_argument("--data", default=None, help="a manifest (.csv/.json) of your image pairs, or the shared data "
                    "folder for the built-in recipes (default: $MMREG_DATA or ../shared/data)")
    tr.add_argument("--name", default=None, help="model name (default: the --output folder's name)")
    tr.add_argument("--output", default=None, help="model folder (default: <user models>/<method>/<name>, user models = $MMREG_MODELS or ~/.mmreg/models)")
    tr.add_argument("--base-model", default=None, help="fine-tune: start from this model (name or folder) or .pt weights "
                    "instead of a fresh network (overrides the config's base_model)")
    tr.add_argument("--iterations", "--steps", dest="steps", type=int, default=None,
                    help="total number of optimiser steps (overrides the config)")
    tr.add_argument("--learning-rate", type=float, default=None, help="Adam learning rate")
    tr.add_argument("--batch-size", type=int, default=None, help="pairs per step (the global batch under torchrun)")
    tr.add_argument("--warmup-steps", type=int, default=None,
                    help="raise the learning rate linearly from 0 over the first N steps (registration networks; default 0)")
    tr.add_argument("--gradient-clip", type=float, default=None,
                    help="clip the gradient's global L2 norm to this value before each step (registration networks; "
                         "default 0 = off)")
    tr.add_argument("--seed", type=int, default=None,
                    help="random seed of the weights' initialisation, the pair sampling and the augmentation "
                         "(default: the config's, else 0); a second seed shows how much a result depends on chance")
    tr.add_argument("--teacher-model", default=None,
                    help="distillation: also teach the network to reproduce this trained model's fields (name or "
                         "folder of the same method, or METHOD:NAME of another registration method, e.g. "
                         "mi:mi_brain_mind_distilled; it reads each pair before any random intensity curve)")
    tr.add_argument("--teacher-weight", type=float, default=None,
                    help="weight of the teacher term, mean squared difference of the outputs in grid voxels "
                         "(default 1)")
    tr.add_argument("--spacing", type=float, default=None, help="network grid spacing in mm (default: the base model's)")
    tr.add_argument("--smoothness", type=float, default=None, help="weight of the field's smoothness term")
    tr.add_argument("--no-augment", action="store_true", help="no augmentation (bias, noise, deformations)")
    tr.add_argument("--validation-fraction", type=float, default=None,
                    help="share of unmarked manifest pairs held out for validation (default 0.2)")
    tr.add_argument("--resume", action="store_true", help="continue the run in the output folder from its last checkpoint")
    tr.add_argument("--device", default=None, help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    tr.add_argument("--threads", type=int, default=None, help="CPU threads (default: the config's, else all cores)")
    tr.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)

    mo = sub.add_parser("models", help="list, rename, delete or install trained models")
    mo_sub = mo.add_subparsers(dest="action", required=True)
    ml = mo_sub.add_parser("list", help="the shipped and user models")
    ml.add_argument("--method", default=None)
    ml.add_argument("--json", action="store_true")
    mr = mo_sub.add_parser("rename", help="rename a user model")
    mr.add_argument("method")
    mr.add_argument("name")
    mr.add_argument("new_name")
    md = mo_sub.add_parser("delete", help="delete a user model (with its training checkpoints)")
    md.add_argument("method")
    md.add_argument("name")
    mi_ = mo_sub.add_parser("install", help="copy a model folder (e.g. a --output of mmreg train) into the user "
                            "models, to use it by name")
    mi_.add_argument("folder")
    mi_.add_argument("--name", default=None)
    mo.set_defaults(func=_cmd_models)

    pr = sub.add_parser("propagate", help="register an annotated image (atlas) to several images and warp its labels "
                        "onto each")
    pr.add_argument("atlas", help="the annotated image (the moving image of every registration)")
    pr.add_argument("atlas_labels", help="its label map")
    pr.add_argument("targets", nargs="+", help="images that receive the labels (each the fixed image)")
    pr.add_argument("--output-dir", "-o", required=True, help="folder for <target>_labels.nii.gz")
    pr.add_argument("--method", default="multiscale", help="registration method (default multiscale; mono-modal)")
    pr.add_argument("--model", default=None)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--threads", type=int, default=None)
    pr.add_argument("--option", "-O", action="append", metavar="KEY=VALUE", help="method option, e.g. refinement_steps=50")
    pr.add_argument("--quiet", "-q", action="store_true")
    pr.set_defaults(func=_cmd_propagate)

    js = sub.add_parser("joint-seg", help="train a segmentation U-Net on a few annotated images plus labels propagated "
                        "by registration to unannotated ones")
    js.add_argument("--annotated", nargs="+", required=True, metavar="IMAGE:LABELS", help="annotated images")
    js.add_argument("--unannotated", nargs="*", default=[], metavar="IMAGE", help="images without labels")
    js.add_argument("--test", nargs="*", default=[], metavar="IMAGE:LABELS", help="held-out annotated images to score on")
    js.add_argument("--output", "-o", required=True, help="folder for the segmentation model(s)")
    js.add_argument("--labels", default="largest:12", help="ids to learn: 'all', 'largest:N' or a comma list (default largest:12)")
    js.add_argument("--compare", action="store_true", help="also train without the propagated labels and compare on --test")
    js.add_argument("--method", default="multiscale")
    js.add_argument("--model", default=None)
    js.add_argument("--spacing", type=float, default=3.0, help="segmentation grid spacing in mm (default 3)")
    js.add_argument("--steps", type=int, default=400)
    js.add_argument("--seed", type=int, default=0)
    js.add_argument("--threads", type=int, default=None)
    js.add_argument("--option", "-O", action="append", metavar="KEY=VALUE", help="registration method option")
    js.add_argument("--progress-file", default=None, help="append progress as JSON lines (fraction, message) to this "
                    "file (for a GUI following the run)")
    js.add_argument("--stop-file", default=None, help="stop (exit 130, nothing written) once this file exists")
    js.set_defaults(func=_cmd_joint_seg_interruptible)

    sg = sub.add_parser("segment", help="segment an image with a model from `mmreg joint-seg`")
    sg.add_argument("model", help="segmentation model folder")
    sg.add_argument("image")
    sg.add_argument("--output", "-o", required=True)
    sg.set_defaults(func=_cmd_segment)

    from .bench.harness import add_arguments
    be = sub.add_parser("bench", help="benchmark methods against ANTs SyN and elastix on the shared data",
                        description="Run registration methods and the classical peers on the benchmark cases built "
                                    "from the shared data folder, from one cached affine start, scored by one "
                                    "function; write docs/benchmarks.md, its JSON and figures.",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(be).set_defaults(func=_cmd_bench)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``mmreg`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CancelledError as exc:
        print(f"mmreg: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("mmreg: cancelled; files are written whole or not at all.", file=sys.stderr)
        return 130
    except MMRegError as exc:
        print(f"mmreg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
