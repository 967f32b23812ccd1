"""A joint registration-segmentation run as a child process: ``python -m mmreg joint-seg ...`` (no Qt, no Slicer).

Registering every annotated image to every unannotated one and training the segmentation U-Net takes
minutes, so, like a training (:mod:`RegistrationTrainingLib.runner`), it never runs in Slicer's GUI
thread. The engine command writes its progress as JSON lines (``--progress-file``: ``{"fraction",
"message"}``) and stops, writing nothing, once a stop file exists (``--stop-file``; exit 130).

The segmenter is written into a hidden sibling folder of the output (``.<name>.partial-<pid>``) and moved to
the output only when the command succeeded, so a stopped, failed or killed run never leaves a half-written
segmenter where :func:`mmreg.segmentation.load_segmenter` (or Slicer) would find it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from .runner import EXIT_DONE, EXIT_STOPPED, python_executable, wait_for

#: Names of the segments, written beside the segmenter (``{"1": "Body", ...}``; label id -> segment name).
SEGMENT_NAMES = "labels.json"


def joint_seg_command(annotated, unannotated, output, *, method: str = "multiscale", model: str | None = None,
                      steps: int | None = None, spacing: float | None = None, labels=None, threads: int | None = None,
                      test=(), options=None, progress_file=None, stop_file=None, python: str | None = None) -> list:
    """The argument list of ``<python> -m mmreg joint-seg`` for files: ``annotated`` ``[(image, labels)]``,
    ``unannotated`` ``[image]``, ``test`` ``[(image, labels)]`` (held-out, scored), ``labels`` the ids to learn
    (a list, or the engine's "all" / "largest:N"), ``options`` registration method options ``{key: value}``."""
    command = [python or python_executable(), "-m", "mmreg", "joint-seg",
               "--annotated", *[f"{image}:{lab}" for image, lab in annotated]]
    if unannotated:
        command += ["--unannotated", *[str(image) for image in unannotated]]
    if test:
        command += ["--test", *[f"{image}:{lab}" for image, lab in test]]
    command += ["--output", str(output), "--method", method or "multiscale"]
    if model:
        command += ["--model", str(model)]
    if steps is not None:
        command += ["--steps", str(int(steps))]
    if spacing is not None:
        command += ["--spacing", repr(float(spacing))]
    if labels is not None:
        command += ["--labels", ",".join(str(int(v)) for v in labels) if isinstance(labels, (list, tuple)) else
                    str(labels)]
    if threads:
        command += ["--threads", str(int(threads))]
    for key, value in (options or {}).items():
        command += ["--option", f"{key}={json.dumps(value)}"]
    if progress_file:
        command += ["--progress-file", str(progress_file)]
    if stop_file:
        command += ["--stop-file", str(stop_file)]
    return command


class JointSegmentationRun:
    """One ``mmreg joint-seg`` process, writing the segmenter to ``output`` only when it succeeds.

    ``command_for(partial_folder, progress_file, stop_file)`` builds the command (see :func:`joint_seg_command`).
    ``poll()`` reads new progress (never blocks), ``stop()`` asks the process to stop at its next progress
    report (it exits 130 and writes nothing), ``terminate()`` ends it now, ``wait()`` blocks.
    ``state``: "running", "done", "stopped" or "error"; ``fraction`` and ``message`` the last progress;
    ``returncode`` None while it runs; :meth:`error_message` why it failed. ``segment_names``
    (``{label id: name}``) is written beside the segmenter as :data:`SEGMENT_NAMES`.
    """

    def __init__(self, command_for, name: str, output, work_folder, segment_names=None, env=None,
                 popen=subprocess.Popen):
        self.name = name
        self.output = Path(output)
        self.work_folder = Path(work_folder)
        self.work_folder.mkdir(parents=True, exist_ok=True)
        self.partial = self.output.parent / f".{self.output.name}.partial-{os.getpid()}-{int(time.time() * 1000)}"
        self.progress_file = self.work_folder / "progress.jsonl"
        self.stop_file = self.work_folder / "STOP"
        self.console_path = self.work_folder / "console.txt"
        for path in (self.progress_file, self.stop_file):
            path.unlink(missing_ok=True)
        self.segment_names = {int(k): str(v) for k, v in (segment_names or {}).items()}
        self.command = list(command_for(self.partial, self.progress_file, self.stop_file))
        self.state, self.fraction, self.message, self.returncode = "running", 0.0, "starting", None
        self.held_out_dice = None
        self._terminated = False
        self.started = time.time()
        self.seconds = None
        self._offset = 0
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        with open(self.console_path, "wb") as console:
            self.process = popen(self.command, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, **kwargs)

    @property
    def running(self) -> bool:
        """True until the process has ended (as seen by the last :meth:`poll`)."""
        return self.returncode is None

    def _read(self) -> list:
        try:
            with open(self.progress_file, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1  # only whole lines: the writer may be in the middle of one
        self._offset += end
        events = []
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if events:
            self.fraction = float(events[-1].get("fraction", self.fraction))
            self.message = str(events[-1].get("message", self.message))
        return events

    def poll(self) -> list:
        """The progress reports written since the last call; ends the run (moves the segmenter into place,
        or removes what a stopped or failed run left) once the process has ended. Never blocks."""
        if self.returncode is not None:
            return []
        code = self.process.poll()
        events = self._read()
        if code is not None:
            self.returncode = code
            self.seconds = time.time() - self.started
            self._finish(code)
        return events

    def _finish(self, code: int) -> None:
        shutil.rmtree(self.work_folder / "data", ignore_errors=True)  # the exported copies; the console output stays
        if code == EXIT_DONE and (self.partial / "segmenter.json").is_file():
            try:
                (self.partial / SEGMENT_NAMES).write_text(json.dumps(
                    {str(k): v for k, v in sorted(self.segment_names.items())}, indent=1))
                if self.output.exists():
                    raise OSError(f"'{self.output}' appeared while the run went on")
                self.partial.rename(self.output)
            except OSError as exc:
                self.state, self.message = "error", f"Could not move the segmenter to '{self.output}': {exc}"
                shutil.rmtree(self.partial, ignore_errors=True)
                return
            self.state, self.fraction = "done", 1.0
            for line in reversed(self.console_text().splitlines()):
                if line.startswith("held-out mean Dice"):
                    try:
                        self.held_out_dice = float(line.split()[-1])
                    except ValueError:
                        pass
                    break
            self.message = f"segmenter '{self.name}' written to {self.output}"
            return
        shutil.rmtree(self.partial, ignore_errors=True)
        if code == EXIT_STOPPED or self.stop_file.exists() or self._terminated:  # also killed before its handler
            self.state, self.message = "stopped", "stopped; nothing was written"
        else:
            self.state, self.message = "error", self.error_message()
        self.stop_file.unlink(missing_ok=True)

    def stop(self) -> None:
        """Ask the process to stop at its next progress report (within a step); it writes nothing."""
        if self.returncode is None:
            self.stop_file.write_text("stop\n")

    def terminate(self) -> None:
        """End the process now (SIGTERM: it stops as for :meth:`stop`)."""
        if self.returncode is None and self.process.poll() is None:
            self._terminated = True
            self.process.terminate()

    def wait(self, timeout: float | None = None, interval: float = 0.2, on_events=None) -> int:
        """Poll until the process ends; returns its exit code (``on_events(events)`` for each non-empty batch).
        :class:`TimeoutError` after ``timeout`` seconds (the run goes on)."""
        return wait_for(self, f"Joint segmentation '{self.name}'", timeout, interval, on_events)

    def status_text(self) -> str:
        """One line for the panel's status label."""
        if self.state == "running":
            return f"{100 * self.fraction:.0f} % · {self.message}"
        if self.state == "done":
            dice = "" if self.held_out_dice is None else f" · held-out mean Dice {self.held_out_dice:.3f}"
            return f"Done in {self.seconds:.0f} s · {self.message}{dice}"
        return f"{self.state.capitalize()}: {self.message}"

    def console_text(self, max_chars: int = 20000) -> str:
        """The end of the process's console output."""
        try:
            return self.console_path.read_bytes()[-max_chars:].decode("utf-8", errors="replace")
        except OSError:
            return ""

    def error_message(self) -> str:
        """Why the run failed: the engine's ``mmreg: error: ...`` line, else the exit code and the last output."""
        if self.returncode in (None, EXIT_DONE, EXIT_STOPPED):
            return "" if self.state != "error" else self.message
        lines = [ln.strip() for ln in self.console_text().splitlines() if ln.strip()]
        for line in reversed(lines):
            if line.startswith("mmreg: error:"):
                return line[len("mmreg: error:"):].strip()
        last = f" Last output: {lines[-1]}" if lines else ""
        return f"Joint segmentation ended with exit code {self.returncode}.{last} Full output: {self.console_path}"
