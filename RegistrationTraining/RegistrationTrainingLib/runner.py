"""A training run as a child process: ``python -m mmreg train ...`` (no Qt, no Slicer).

Training takes minutes to hours, so it never runs in Slicer's GUI thread: the Logic starts the
engine's command in a separate Python process and follows it through the files the engine
writes under ``<output>/training/`` (``progress.jsonl``, read with
:func:`mmreg.training.read_progress`; ``STOP`` to ask it to stop; ``last.pt`` to resume). The
process outlives nothing it should not: stopping writes a checkpoint first, so a stopped,
crashed or abandoned run can be resumed later, from Slicer or from a shell.

Inside Slicer ``sys.executable`` may be the application itself; :func:`python_executable` then
finds Slicer's ``PythonSlicer`` (the same interpreter, packages and torch). The engine package is
put on the child's ``PYTHONPATH`` (in Slicer it lives in the extension's module folder, which
only the application's own ``sys.path`` holds).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .progress import TrainingProgress

#: Exit codes of ``mmreg train``.
EXIT_DONE, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 2, 130
_DEVICES = ("auto", "cpu", "cuda", "mps")


def wait_for(run, what: str, timeout: float | None = None, interval: float = 0.2, on_events=None) -> int:
    """Poll ``run`` (anything with ``poll() -> events`` and ``returncode``: a training or joint-segmentation
    run) every ``interval`` seconds until its process ends; returns the exit code. ``on_events(events)`` is
    called with each non-empty batch. :class:`TimeoutError` naming ``what`` after ``timeout`` seconds (the
    run goes on)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        events = run.poll()
        if events and on_events is not None:
            on_events(events)
        if run.returncode is not None:
            return run.returncode
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{what} still runs after {timeout:.0f} s.")
        time.sleep(interval)


def python_executable(executable: str | None = None, which=shutil.which) -> str:
    """The Python interpreter for the training process.

    ``executable`` (default ``sys.executable``) when it is a Python interpreter (its name starts
    with "python", e.g. ``python3.12`` or ``PythonSlicer``). Inside Slicer, where it is the
    application (``SlicerApp-real``, ``Slicer.exe``) or the bare ``python-real`` that needs
    Slicer's launcher environment: ``PythonSlicer`` next to it, else on the ``PATH``, else
    ``executable`` itself.
    """
    executable = executable or sys.executable
    base = os.path.basename(executable).lower()
    if base.startswith("python") and not base.startswith("python-real"):
        return executable
    names = ("PythonSlicer.exe", "PythonSlicer") if os.name == "nt" else ("PythonSlicer",)
    for name in names:
        candidate = os.path.join(os.path.dirname(executable), name)
        if os.path.isfile(candidate):
            return candidate
    found = which("PythonSlicer")
    return found or executable


@dataclass
class TrainingChoices:
    """The user's choices for ``mmreg train`` (None: the engine's default).

    ``base_model``: a model name or folder of the method to fine-tune (None: from scratch);
    ``iterations``: optimisation steps; ``learning_rate``; ``batch_size``: pairs per step;
    ``spacing``: network grid spacing (mm); ``augment``: random augmentation on/off;
    ``smoothness``: weight of the smoothness penalty; ``validation_fraction``: share of the
    pairs without a split in the manifest held out for validation; ``device``: auto, cpu, cuda,
    cuda:N or mps; ``threads``: CPU threads (None: the engine decides).
    """

    base_model: str | None = None
    iterations: int | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    spacing: float | None = None
    augment: bool = True
    smoothness: float | None = None
    validation_fraction: float | None = None
    device: str = "auto"
    threads: int | None = None

    @classmethod
    def from_keywords(cls, **choices) -> "TrainingChoices":
        """Choices from keyword arguments; :class:`mmreg.InputError` names an unknown one."""
        from mmreg import InputError
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(choices) - known)
        if unknown:
            raise InputError(f"Unknown training choice(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        return cls(**choices)

    def problems(self) -> list:
        """Sentences about values the engine would refuse (empty when all are usable)."""
        out = []

        def check(name, ok, what):
            value = getattr(self, name)
            if value is not None and not ok(value):
                out.append(f"{name.replace('_', ' ')} must be {what}, got {value!r}.")

        def finite(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check("iterations", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1")
        check("batch_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1")
        check("threads", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1")
        check("learning_rate", lambda v: finite(v) and v > 0, "a number > 0")
        check("spacing", lambda v: finite(v) and v > 0, "a number of millimetres > 0")
        check("smoothness", lambda v: finite(v) and v >= 0, "a number >= 0")
        check("validation_fraction", lambda v: finite(v) and 0 <= v <= 0.9, "between 0 and 0.9")
        if str(self.device).split(":")[0] not in _DEVICES:
            out.append(f"device must be one of {', '.join(_DEVICES)} (or cuda:N), got {self.device!r}.")
        return out

    def arguments(self) -> list:
        """The command-line options of ``mmreg train`` for these choices."""
        flags = {"base_model": "--base-model", "iterations": "--iterations", "learning_rate": "--learning-rate",
                 "batch_size": "--batch-size", "spacing": "--spacing", "smoothness": "--smoothness",
                 "validation_fraction": "--validation-fraction", "threads": "--threads"}
        args = []
        for key, flag in flags.items():
            value = getattr(self, key)
            if value is not None and value != "":
                args += [flag, repr(value) if isinstance(value, float) else str(value)]
        if not self.augment:
            args.append("--no-augment")
        args += ["--device", self.device or "auto"]
        return args

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return asdict(self)


def train_command(method: str, manifest, name: str, choices: TrainingChoices, output=None, resume: bool = False,
                  python: str | None = None) -> list:
    """The argument list of ``<python> -m mmreg train`` for one run (``--quiet``: no progress bar on the console)."""
    command = [python or python_executable(), "-m", "mmreg", "train", "--method", method, "--data", str(manifest),
               "--name", name]
    if output is not None:
        command += ["--output", str(output)]
    command += choices.arguments()
    if resume:
        command.append("--resume")
    return command + ["--quiet"]


def child_environment(base=None) -> dict:
    """The environment of the training process: ``base`` (default ``os.environ``) with the folder
    that holds the ``mmreg`` package first on ``PYTHONPATH``."""
    import mmreg
    env = dict(os.environ if base is None else base)
    engine_root = str(Path(mmreg.__file__).resolve().parents[1])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != engine_root]
    env["PYTHONPATH"] = os.pathsep.join([engine_root] + paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class TrainingRun:
    """One ``mmreg train`` process and what it reported.

    ``poll()`` reads the new progress events (call it from a timer; it never blocks), ``stop()``
    asks the run to stop after the current step (it checkpoints and exits with 130), ``wait()``
    blocks until it ended. ``returncode`` is None while it runs, then 0 (done), 2 (bad input:
    :meth:`error_message` says why) or 130 (stopped). ``progress`` is the
    :class:`~RegistrationTrainingLib.progress.TrainingProgress` of everything read so far;
    ``console_path`` holds the process's own output. ``initial_offset``: bytes of the progress
    file to skip (the events of an earlier, abandoned run of the same name).
    """

    def __init__(self, command, method: str, name: str, output_dir, console_path, env=None, cwd=None,
                 resume: bool = False, initial_offset: int = 0, popen=subprocess.Popen):
        self.command = list(command)
        self.method, self.name, self.resume = method, name, resume
        self.output_dir = Path(output_dir)
        self.console_path = Path(console_path)
        self.console_path.parent.mkdir(parents=True, exist_ok=True)
        self.progress = TrainingProgress()
        self.returncode = None
        self.choices = None
        self.started = time.time()
        self._offset = int(initial_offset)  # skip what an earlier run left in the file (a resume reads it all)
        kwargs = {}
        if os.name == "nt":  # no console window for the child
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        with open(self.console_path, "wb") as console:
            self.process = popen(self.command, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=cwd, **kwargs)

    @property
    def progress_path(self) -> Path:
        """The run's event file (``<output>/training/progress.jsonl``)."""
        return self.output_dir / "training" / "progress.jsonl"

    @property
    def running(self) -> bool:
        """True until the process has ended (as seen by the last :meth:`poll`)."""
        return self.returncode is None

    def _read(self) -> list:
        from mmreg.training import read_progress
        try:
            size = self.progress_path.stat().st_size
        except OSError:
            return []
        if size < self._offset:  # the file was started anew: read it from the beginning
            self._offset = 0
        events, self._offset = read_progress(self.output_dir, self._offset)
        self.progress.update(events)
        return events

    def poll(self) -> list:
        """The events written since the last call (already folded into :attr:`progress`); sets
        :attr:`returncode` once the process has ended. Never blocks."""
        if self.returncode is not None:
            return self._read()
        code = self.process.poll()  # before reading: an ended process has written all its events
        events = self._read()
        if code is not None:
            self.returncode = code
            if code != EXIT_DONE and self.progress.state in ("starting", "running"):
                self.progress.state = "stopped" if code == EXIT_STOPPED else "error"
                if code != EXIT_STOPPED:
                    self.progress.message = self.error_message()
        return events

    def stop(self) -> None:
        """Ask the run to stop at the end of the current step; it writes a checkpoint (resumable)."""
        if self.returncode is None:
            from mmreg.training import request_stop
            request_stop(self.output_dir)

    def terminate(self) -> None:
        """End the process now (SIGTERM: the engine still checkpoints, as for :meth:`stop`)."""
        if self.returncode is None and self.process.poll() is None:
            self.process.terminate()

    def wait(self, timeout: float | None = None, interval: float = 0.2, on_events=None) -> int:
        """Poll until the process ends; returns its exit code. ``on_events(events)`` is called with
        each non-empty batch. :class:`TimeoutError` after ``timeout`` seconds (the run goes on)."""
        return wait_for(self, f"Training '{self.name}'", timeout, interval, on_events)

    def console_text(self, max_chars: int = 20000) -> str:
        """The end of the process's console output (its errors and warnings)."""
        try:
            data = self.console_path.read_bytes()
        except OSError:
            return ""
        return data[-max_chars:].decode("utf-8", errors="replace")

    def error_message(self) -> str:
        """Why the run failed: the engine's ``error`` event, else its ``mmreg: error: ...`` line,
        else the exit code and where the console output is. Empty for a run that has not failed."""
        if self.progress.state == "error" and self.progress.message:
            return self.progress.message
        if self.returncode in (None, EXIT_DONE, EXIT_STOPPED):
            return ""
        lines = [ln.strip() for ln in self.console_text().splitlines() if ln.strip()]
        for line in reversed(lines):
            if line.startswith("mmreg: error:"):
                return line[len("mmreg: error:"):].strip()
        last = f" Last output: {lines[-1]}" if lines else ""
        return f"Training ended with exit code {self.returncode}.{last} Full output: {self.console_path}"
