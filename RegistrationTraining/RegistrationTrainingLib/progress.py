"""What a training run has reported so far, from the events of its ``progress.jsonl`` (no Qt, no Slicer).

``mmreg train`` appends one JSON object per line to ``<output>/training/progress.jsonl``
(events ``start``, ``step``, ``validation``, ``stopped``, ``done``, ``error``; see
:mod:`mmreg.training`). :class:`TrainingProgress` folds them into the numbers the panel shows
(step, progress fraction, ETA, loss curve, validation Dice) and that the loss and Dice tables
are made from. A resumed run appends to the same file: its ``start`` event (with ``start_step``)
drops the steps after the checkpoint it resumed from, so a crash followed by a resume never shows
a step twice; a ``start`` at step 0 (a fresh run) forgets everything before it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Run states, in the order a run goes through them.
STATES = ("starting", "running", "stopped", "done", "error")


def _number(value):
    """float(value), or None for None / non-numbers (NaN and infinities are kept: they are news)."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def format_duration(seconds) -> str:
    """A short human duration: ``"45 s"``, ``"12 min"``, ``"2 h 05 min"``; ``"?"`` when unknown."""
    seconds = _number(seconds)
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(round(seconds / 60))
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


@dataclass
class TrainingProgress:
    """The state of one training run, updated by :meth:`update` with new events.

    ``loss_steps`` / ``losses``: the training loss per reported step. ``validation``: rows
    ``(step, mean_dice or None, mean_loss or None)``. ``best_step``: the step of the best
    validation so far (the engine's choice). ``pairs``: ``{"training": n, "validation": n}``;
    ``skipped``: manifest entries the engine left out, ``[{"entry", "reason"}]``. ``message``:
    the error message of an ``error`` event. ``model_dir``: the model written (a stopped run writes the
    model so far); ``wall_s``: from the ``done`` event.
    """

    state: str = "starting"
    steps: int = 0
    step: int = 0
    start_step: int = 0
    loss_steps: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    validation: list = field(default_factory=list)
    best_step: int | None = None
    seconds_per_step: float | None = None
    eta_s: float | None = None
    pairs: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    checkpoint: str | None = None
    model_dir: str | None = None
    wall_s: float | None = None
    message: str = ""
    events: int = 0

    def update(self, events) -> None:
        """Fold new events (dicts, in file order) into the state; unknown events are ignored."""
        for event in events:
            if not isinstance(event, dict):
                continue
            self.events += 1
            kind = event.get("event")
            handler = getattr(self, f"_on_{kind}", None)
            if handler is not None:
                handler(event)

    def _on_start(self, e):
        start = int(e.get("start_step") or 0)
        if start == 0:  # a fresh run: nothing before it belongs to it
            fresh = TrainingProgress()
            self.__dict__.update({k: v for k, v in fresh.__dict__.items() if k != "events"})
        keep = [i for i, s in enumerate(self.loss_steps) if s <= start]
        self.loss_steps = [self.loss_steps[i] for i in keep]
        self.losses = [self.losses[i] for i in keep]
        self.validation = [row for row in self.validation if row[0] <= start]
        self.state, self.message = "running", ""
        self.start_step = self.step = start
        self.steps = int(e.get("steps") or self.steps)
        self.pairs = dict(e.get("pairs") or {})
        self.skipped = list(e.get("skipped") or [])
        self.eta_s = None

    def _on_step(self, e):
        self.state = "running"
        self.step = int(e.get("step") or self.step)
        self.steps = int(e.get("steps") or self.steps)
        loss = _number(e.get("loss"))
        if loss is not None:
            self.loss_steps.append(self.step)
            self.losses.append(loss)
        self.seconds_per_step = _number(e.get("seconds_per_step"))
        self.eta_s = _number(e.get("eta_s"))

    def _on_validation(self, e):
        step = int(e.get("step") or self.step)
        self.validation = [row for row in self.validation if row[0] != step]
        self.validation.append((step, _number(e.get("mean_dice")), _number(e.get("mean_loss"))))
        if e.get("best_step") is not None:
            self.best_step = int(e["best_step"])

    def _on_stopped(self, e):
        self.state = "stopped"
        self.step = int(e.get("step") or self.step)
        self.checkpoint = e.get("checkpoint")
        self.model_dir = e.get("model_dir") or self.model_dir
        self.eta_s = None

    def _on_done(self, e):
        self.state = "done"
        self.step = int(e.get("step") or self.step)
        self.model_dir = e.get("model_dir")
        self.wall_s = _number(e.get("wall_s"))
        self.eta_s = 0.0

    def _on_error(self, e):
        self.state = "error"
        self.message = str(e.get("message") or "training failed")
        self.eta_s = None

    # ------------------------------------------------------------------ read-outs
    @property
    def fraction(self) -> float:
        """Share of the requested steps done, 0..1 (1 when done)."""
        if self.state == "done":
            return 1.0
        return min(1.0, self.step / self.steps) if self.steps else 0.0

    @property
    def last_loss(self) -> float | None:
        """The latest training loss (None before the first step)."""
        return self.losses[-1] if self.losses else None

    @property
    def last_dice(self) -> float | None:
        """The latest validation mean Dice (None without a labelled validation)."""
        values = [dice for _, dice, _ in self.validation if dice is not None]
        return values[-1] if values else None

    @property
    def best_dice(self) -> float | None:
        """Mean validation Dice at :attr:`best_step` (None when unknown)."""
        row = next((r for r in self.validation if r[0] == self.best_step), None)
        return row[1] if row is not None else None

    def status_text(self) -> str:
        """One line for the panel, e.g. ``Step 120/1000 · loss -0.4123 · Dice 0.612 · 2.1 s/step · 31 min left``."""
        if self.state == "starting":
            return "Starting: loading the engine and preparing the pairs..."
        if self.state == "error":
            return f"Failed: {self.message}"
        parts = [f"Step {self.step}/{self.steps or '?'}"]
        if self.last_loss is not None:
            parts.append(f"loss {self.last_loss:.4g}")
        if self.last_dice is not None:
            parts.append(f"Dice {self.last_dice:.3f}")
        if self.state == "running":
            if self.seconds_per_step is not None:
                parts.append(f"{self.seconds_per_step:.2g} s/step")
            if self.eta_s is not None:
                parts.append(f"{format_duration(self.eta_s)} left")
        elif self.state == "stopped":
            parts.append("stopped (Resume continues from the checkpoint)")
        elif self.state == "done":
            parts.append(f"done in {format_duration(self.wall_s)}" if self.wall_s is not None else "done")
        return " · ".join(parts)
