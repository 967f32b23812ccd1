"""The ``mmreg`` command: register, evaluate, methods.

    mmreg register FIXED MOVING --method optimize --output-transform OUT.h5 \\
        [--output-warped W.nii.gz] [--moving-labels ML --output-warped-labels WL] \\
        [--fixed-labels FL] [--no-affine] [--device cpu|cuda|mps|auto] [--report R.json]
    mmreg evaluate TRANSFORM --fixed-labels FL --moving-labels ML [--report R.json]
    mmreg methods [--json]
    mmreg train CONFIG.toml [--resume] [--steps N] [--output DIR] [--base-model MODEL] [--device auto|cpu|cuda]
                [--threads N] [--data DIR]
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
    written = result.save(args.output_transform, args.output_warped, args.output_warped_labels, args.report)
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
    """While active (main thread only), SIGTERM raises KeyboardInterrupt, so long runs stop as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd_train(args) -> int:
    from .training import load_config, train
    from pathlib import Path
    base = args.base_model
    if base and (base.endswith(".pt") or Path(base).expanduser().is_dir()):
        base = str(Path(base).expanduser().resolve())  # a path from the shell's folder, not the config's
    cfg = load_config(args.config, steps=args.steps, device=args.device, threads=args.threads, base_model=base,
                      output=str(Path(args.output).resolve()) if args.output else None,
                      data_root=str(Path(args.data).resolve()) if args.data else None)
    bar = _Bar(not args.quiet)

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
    h = result.history
    sps = h["seconds_per_step"]
    lines = [f"trained {result.final_step} steps in {result.seconds:.1f} s (total wall time {h['wall_seconds']:.1f} s; "
             f"median {sorted(sps)[len(sps) // 2] if sps else float('nan'):.2f} s/step)"]
    if h.get("validation"):
        last, best = h["validation"][-1], h.get("best") or {}
        lines.append(f"validation mean Dice: {h.get('identity_dice', float('nan')):.4f} identity -> {last['mean_dice']:.4f} "
                     f"at step {last['step']} (best {best.get('mean_dice', float('nan')):.4f} at step {best.get('step')}); "
                     f"folding {last['folding_percent']:.3f} %")
    lines.append(f"model '{result.card.name}' ({result.card.training.get('weights')} weights) written to {result.model_dir}")
    lines.append(f"use it: mmreg register FIXED MOVING --method {result.card.method} --model {result.model_dir}")
    print("\n".join(lines))
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

    tr = sub.add_parser("train", help="train a learned method's network from a TOML config (rerunnable, resumable)")
    tr.add_argument("config", help="training config (TOML), e.g. Resources/Training/mi_brain.toml")
    tr.add_argument("--resume", action="store_true", help="continue the run in the output folder from its last checkpoint")
    tr.add_argument("--steps", type=int, default=None, help="total number of steps (overrides the config)")
    tr.add_argument("--output", default=None, help="model folder (default: <user models>/<method>/<name>, user models = $MMREG_MODELS or ~/.mmreg/models)")
    tr.add_argument("--base-model", default=None, help="fine-tune: start from this model (name or folder) or .pt weights "
                    "instead of a fresh network (overrides the config's base_model)")
    tr.add_argument("--device", default=None, help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    tr.add_argument("--threads", type=int, default=None, help="CPU threads (default: the config's, else all cores)")
    tr.add_argument("--data", default=None, help="shared data folder (default: $MMREG_DATA or ../shared/data)")
    tr.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)

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
