"""What the common panel shows, computed without Qt: method availability, model and device
choices, whether Apply is possible (and why not), the engine options behind the panel's
controls, the results summary and readable error messages.

Everything here is plain Python so that it is unit-tested headless; the Widget
(:mod:`MMRegCommonLib.widget`) only copies these values into Qt widgets. The engine
(:mod:`mmreg`, which imports torch) is imported lazily: a module must load in Slicer before
its dependencies are installed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

#: Engine option (in a method's ``default_options()``) behind the "refinement steps" control:
#: instance-optimisation steps run after a network's prediction (0 = network alone).
REFINEMENT_OPTION = "refinement_steps"
#: Engine option behind the "diffeomorphic" checkbox (integrate the field as a stationary velocity).
#: A method whose default for it is None lets the trained model decide (a network predicts either a
#: velocity or a displacement): the checkbox then shows the chosen model's value, read-only.
DIFFEOMORPHIC_OPTION = "diffeomorphic"
#: Engine option behind the "symmetric" checkbox: a velocity network run on both orders of the pair, half the
#: difference of the two velocities (inverse-consistent; cancels what the network does to every pair alike).
SYMMETRIC_OPTION = "symmetric"


@dataclass
class ModelChoice:
    """One entry of the model selector: ``value`` goes to the engine (``model=``), ``label`` is shown."""

    value: str
    label: str
    tooltip: str = ""
    #: Whether the model predicts a stationary velocity (integrated: diffeomorphic); None: unknown.
    diffeomorphic: bool | None = None
    #: The engine's entry for the model as listed (``source``, ``path``, ``description``, ...; {} for a bare name).
    info: dict = field(default_factory=dict, compare=False)


@dataclass
class MethodStatus:
    """Whether the engine offers a method, and what the panel needs to know about it.

    ``available`` False comes with ``reason`` (a sentence for the user). ``models``: shipped
    and fine-tuned models (empty for methods that need none); ``options``: the method's
    default options; ``supports_refinement`` / ``supports_diffeomorphic``: whether the
    panel's refinement-steps and diffeomorphic controls apply to this method.
    """

    name: str
    available: bool
    reason: str = ""
    description: str = ""
    models: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    #: True when the engine itself could not be imported (missing torch/monai): Apply then
    #: stays enabled and first offers to install the dependencies.
    engine_missing: bool = False

    @property
    def supports_refinement(self) -> bool:
        """True when the method has the :data:`REFINEMENT_OPTION` option."""
        return REFINEMENT_OPTION in self.options

    @property
    def supports_diffeomorphic(self) -> bool:
        """True when the user chooses :data:`DIFFEOMORPHIC_OPTION` (the method has it, with a True/False default)."""
        return self.options.get(DIFFEOMORPHIC_OPTION) is not None

    @property
    def supports_symmetric(self) -> bool:
        """True when the method has the :data:`SYMMETRIC_OPTION` option (network methods)."""
        return SYMMETRIC_OPTION in self.options

    @property
    def model_sets_diffeomorphic(self) -> bool:
        """True when the trained model decides :data:`DIFFEOMORPHIC_OPTION` (the method's default is None)."""
        return DIFFEOMORPHIC_OPTION in self.options and self.options[DIFFEOMORPHIC_OPTION] is None


def model_choice(entry) -> ModelChoice:
    """A selector entry from one item of ``get_method(name).models()``.

    Accepted items: a model name (str), or a dict with ``name`` (or ``id``) and optionally
    ``label``, ``description``, ``diffeomorphic`` and ``source`` ("shipped" or
    "fine-tuned"/"user": fine-tuned models are marked as such in the label).
    """
    if isinstance(entry, str):
        return ModelChoice(entry, entry)
    if isinstance(entry, dict):
        value = str(entry.get("name") or entry.get("id") or "")
        label = str(entry.get("label") or value)
        if str(entry.get("source", "")).lower() in ("fine-tuned", "finetuned", "user"):
            label += " (fine-tuned)"
        diffeomorphic = entry.get("diffeomorphic")
        return ModelChoice(value, label, str(entry.get("description", "")),
                           None if diffeomorphic is None else bool(diffeomorphic), dict(entry))
    return ModelChoice(str(entry), str(entry))


def method_status(name: str) -> MethodStatus:
    """The engine's answer for method ``name`` (never raises; unavailable methods carry a reason)."""
    try:
        import mmreg
    except ImportError as exc:  # torch or monai missing: the dependency check installs them
        return MethodStatus(name, False, f"The registration engine cannot be loaded ({exc}). Click Apply to "
                                         "install the missing Python packages.", engine_missing=True)
    if name not in mmreg.method_names():
        return MethodStatus(name, False, f"Method '{name}' is not available in this version (mmreg "
                                         f"{mmreg.__version__}); available: {', '.join(mmreg.method_names())}.")
    method = mmreg.get_method(name)
    models = [model_choice(m) for m in method.models()]
    if getattr(method, "requires_model", False) and not models:
        return MethodStatus(name, False, f"Method '{name}' has no trained model yet: train one (RegistrationTraining "
                                         f"module, or `mmreg train` in a shell) or install a model folder; see "
                                         "`mmreg methods`.", method.description, [], dict(method.default_options()))
    return MethodStatus(name, True, "", method.description, models, dict(method.default_options()))


def model_items(status: MethodStatus) -> list:
    """``[(value, label, tooltip), ...]`` for the model selector; value "" is the method's default model."""
    if not status.models:
        return [("", "No trained model needed" if status.available else "No models available", "")]
    return [("", "Default model of the method", "The model the method uses when none is chosen.")] + [
        (m.value, m.label, m.tooltip) for m in status.models]


def device_choices() -> list:
    """``[(value, label), ...]`` for the device selector: auto (saying what it picks), CPU, each CUDA GPU, MPS.

    Values are what :func:`mmreg.device.choose_device` accepts. Works without torch (then
    only "auto" and "cpu", labelled accordingly).
    """
    cores = os.cpu_count() or 1
    try:
        import torch
    except ImportError:
        return [("auto", "Automatic (PyTorch not installed yet)"), ("cpu", f"CPU ({cores} cores)")]
    gpus = []
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        for index in range(count):
            props = torch.cuda.get_device_properties(index)
            value = "cuda" if count == 1 else f"cuda:{index}"
            gpus.append((value, f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GB)"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        gpus.append(("mps", "GPU: Apple (MPS)"))
    auto = gpus[0][1] if gpus else f"CPU ({cores} cores), no GPU found"
    return [("auto", f"Automatic: {auto}"), ("cpu", f"CPU ({cores} cores)")] + gpus


def default_model(status: MethodStatus) -> ModelChoice | None:
    """The model the engine uses when none is chosen (:func:`mmreg.models.default_model_name`:
    "default", else the only one); None when that is ambiguous or there are none."""
    from mmreg.models import default_model_name
    by_name = {m.value: m for m in status.models}
    return by_name.get(default_model_name(by_name))


def diffeomorphic_control(status: MethodStatus, model_value: str = "") -> tuple:
    """``(enabled, checked, tooltip)`` of the "diffeomorphic" checkbox for the chosen model.

    The user's choice when the method offers it (``checked`` None: keep the parameter's
    value). For a learned method the trained model decides (a network trained to predict a
    velocity cannot be asked for a displacement): disabled, showing the model's value.
    Methods without the option: disabled, unused.
    """
    if status.supports_diffeomorphic:
        return True, None, ("Integrate the field as a stationary velocity (scaling and squaring): a smooth "
                            "invertible transform without folding.")
    if status.model_sets_diffeomorphic:
        by_name = {m.value: m for m in status.models}
        model = by_name.get(model_value) if model_value else default_model(status)
        if model is None or model.diffeomorphic is None:
            return False, None, "Set by the trained model (see its model card)."
        what = ("predicts a stationary velocity, integrated by scaling and squaring (diffeomorphic)"
                if model.diffeomorphic else "predicts a displacement field directly (not guaranteed diffeomorphic)")
        return False, model.diffeomorphic, f"Set by the model: '{model.value}' {what}."
    return False, None, f"Method '{status.name}' has no diffeomorphic option; this setting is not used."


def symmetric_control(status: MethodStatus, model_value: str = "") -> tuple:
    """``(enabled, tooltip)`` of the "symmetric" checkbox for the chosen model: enabled for a method with the
    option whose model predicts a velocity (or whose model is not known here: the engine then checks it);
    disabled, with the reason, for a displacement model and for methods without the option."""
    if not status.supports_symmetric:
        return False, f"Method '{status.name}' has no symmetric option; this setting is not used."
    by_name = {m.value: m for m in status.models}
    model = by_name.get(model_value) if model_value else default_model(status)
    if model is not None and model.diffeomorphic is False:
        return False, (f"'{model.value}' predicts a displacement field, whose inverse is not its negative: "
                       "symmetric needs a model that predicts a velocity.")
    return True, ("Run the network on both orders of the pair and use half the difference of the two velocities: "
                  "the result is inverse-consistent and a deformation the network applies to every pair cancels. "
                  "Twice the network time.")


def engine_options(status: MethodStatus, refinement_steps=None, diffeomorphic=None, symmetric=None) -> dict:
    """The method options behind the panel's controls; None leaves the method's default.

    Raises :class:`mmreg.InputError` when a value is given for a control the method does not
    have (the Widget disables such controls; this catches scripted calls). A diffeomorphic
    value for a method whose model decides is passed on: the method checks it against the
    model's card (a mismatch is an error naming the model); so is ``symmetric`` (True needs a velocity model).
    """
    from mmreg import InputError
    options = {}
    for option, value in ((REFINEMENT_OPTION, refinement_steps), (DIFFEOMORPHIC_OPTION, diffeomorphic),
                          (SYMMETRIC_OPTION, symmetric)):
        if value is None:
            continue
        if option not in status.options:
            raise InputError(f"Method '{status.name}' has no option '{option}'; leave it unset (None) for this "
                             "method.")
        options[option] = int(value) if option == REFINEMENT_OPTION else bool(value)
    return options


def shared_control_visibility(status: MethodStatus) -> dict:
    """``{"refinementSteps": visible, "diffeomorphic": visible, "symmetric": visible}``: the shared option rows a
    method has.

    A method the engine offers without an option (e.g. ``metric``: no refinement, no diffeomorphic
    integration) does not show its control at all; while the method is unavailable (engine not
    loaded, no model) both stay visible, disabled, with the reason in their tooltips.
    """
    if not status.available:
        return {"refinementSteps": True, "diffeomorphic": True, "symmetric": True}
    return {"refinementSteps": status.supports_refinement,
            "diffeomorphic": status.supports_diffeomorphic or status.model_sets_diffeomorphic,
            "symmetric": status.supports_symmetric}


def apply_state(status: MethodStatus, fixed_volume, moving_volume, running: bool = False,
                option_problem: str | None = None) -> tuple:
    """``(enabled, reason)`` for the Apply button: reason says what is missing when disabled.

    ``option_problem``: why the method-specific choices cannot run (see
    :meth:`MMRegCommonLib.methodoptions.MethodOptions.problem`), checked after the volumes.
    """
    if running:
        return False, "A registration is running; Cancel stops it."
    if not status.available and not status.engine_missing:
        return False, status.reason
    if fixed_volume is None:
        return False, "Select the fixed volume (the image that stays in place)."
    if moving_volume is None:
        return False, "Select the moving volume (the image that is deformed onto the fixed one)."
    if fixed_volume is moving_volume or fixed_volume.GetID() == moving_volume.GetID():
        return False, "The fixed and moving volumes must be two different volumes."
    if option_problem and status.available:
        return False, option_problem
    return True, "Ready: Apply registers the moving volume to the fixed volume."


def user_message(exc: BaseException) -> str:
    """A readable sentence for an error: the engine's own message, or the type and first line otherwise."""
    from mmreg import MMRegError
    if isinstance(exc, MMRegError):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"Unexpected error ({type(exc).__name__}{': ' + text if text else ''}). Details are in the Python log."


_STEP = re.compile(r"[:,]?\s*(step|level)\s*\d+\s*/\s*\d+.*$", re.IGNORECASE)


def progress_stage(message: str) -> str:
    """The stage of a progress message without its step counter ("... level 1/2: step 3/40" -> "...")."""
    return _STEP.sub("", message).strip()


def summarize(report: dict, segment_names: dict | None = None, scored=None) -> dict:
    """The results area's numbers from an engine report (``RegistrationResult.report``).

    Returns ``{"runtime_s", "registration_s", "folding_percent", "device", "dice": [(segment
    name, Dice after affine or None, Dice after registration)], "mean_dice_affine",
    "mean_dice"}``; ``dice`` is empty unless both segmentations were given. ``segment_names``
    maps label values (as in the report) to segment names; ``scored`` (label values) limits
    the rows and means to segments present in both segmentations (None: all reported).
    """
    names = {str(k): v for k, v in (segment_names or {}).items()}
    quality = report.get("quality", {})
    after = quality.get("labels") or {}
    affine = quality.get("labels_after_affine") or {}
    labels = [label for label in after.get("labels", []) if scored is None or label in set(scored)]
    dice = [(names.get(str(label), f"Label {label}"), (affine.get("dice") or {}).get(str(label)),
             (after.get("dice") or {}).get(str(label))) for label in labels]

    def mean(values):
        values = [v for v in values if v is not None]
        return float(sum(values) / len(values)) if values else None

    timings = report.get("timings_s", {})
    return {"runtime_s": timings.get("total"), "registration_s": timings.get("method"),
            "folding_percent": quality.get("deformable", {}).get("folding_percent"),
            "device": report.get("device", ""), "dice": dice,
            "mean_dice_affine": mean(row[1] for row in dice), "mean_dice": mean(row[2] for row in dice)}


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_summary(summary: dict) -> str:
    """The results area's text (HTML for a QLabel/QTextBrowser) from :func:`summarize`."""
    rows = [f"<b>Runtime</b>: {_num(summary['runtime_s'], '.1f')} s (registration "
            f"{_num(summary['registration_s'], '.1f')} s, {summary['device'] or 'device n/a'})",
            f"<b>Folding</b>: {_num(summary['folding_percent'], '.3f')} % of voxels (Jacobian determinant "
            "&le; 0; 0 is ideal)"]
    if summary["dice"]:
        rows.append("<b>Dice per segment</b> (1 = perfect overlap): after affine &rarr; after registration")
        rows.append("<table>" + "".join(
            f"<tr><td>{name}&nbsp;&nbsp;</td><td>{_num(before, '.3f')}</td><td>&nbsp;&rarr;&nbsp;</td>"
            f"<td><b>{_num(after, '.3f')}</b></td></tr>" for name, before, after in summary["dice"])
            + f"<tr><td><i>mean</i></td><td>{_num(summary['mean_dice_affine'], '.3f')}</td><td>&nbsp;&rarr;&nbsp;"
            f"</td><td><b>{_num(summary['mean_dice'], '.3f')}</b></td></tr></table>")
    else:
        rows.append("Dice: select a moving and a fixed segmentation (with matching segment names) to see it.")
    return "<br>".join(rows)


# ---------------------------------------------------------------------------- label propagation
def propagation_problem(atlas_volume, atlas_segmentation, target_volumes) -> str | None:
    """Why "propagate segmentation" cannot run with these nodes (a sentence for the user), or None.

    The atlas is the moving volume with its segmentation; ``target_volumes`` (None entries are
    ignored, as a target removed from the scene reads) must be one or more scalar volumes other
    than the atlas, each once, none under a transform (each result lies on its target's own grid).
    """
    if atlas_volume is None:
        return "Select the moving volume: it is the atlas, the annotated volume whose segmentation is propagated."
    if not atlas_volume.IsA("vtkMRMLScalarVolumeNode") or atlas_volume.IsA("vtkMRMLLabelMapVolumeNode"):
        return (f"The atlas '{atlas_volume.GetName()}' must be a scalar (image) volume, not a "
                f"{atlas_volume.GetClassName()}.")
    if atlas_segmentation is None:
        return "Select the moving segmentation: the segments drawn on the atlas (moving) volume that are propagated."
    if not atlas_segmentation.IsA("vtkMRMLSegmentationNode"):
        return f"The atlas segmentation must be a segmentation node, not a {atlas_segmentation.GetClassName()}."
    if atlas_segmentation.GetSegmentation().GetNumberOfSegments() == 0:
        return f"The segmentation '{atlas_segmentation.GetName()}' has no segments to propagate."
    targets = [t for t in (target_volumes or []) if t is not None]
    if not targets:
        return "Check one or more target volumes: each receives a copy of the atlas segmentation."
    seen = set()
    for target in targets:
        name = target.GetName()
        if not target.IsA("vtkMRMLScalarVolumeNode") or target.IsA("vtkMRMLLabelMapVolumeNode"):
            return f"The target '{name}' is a {target.GetClassName()}; targets must be scalar (image) volumes."
        if target is atlas_volume or (target.GetID() and target.GetID() == atlas_volume.GetID()):
            return (f"The atlas volume '{name}' is also checked as a target: uncheck it (its segmentation is already "
                    "on it).")
        key = target.GetID() or id(target)
        if key in seen:
            return f"The target '{name}' is listed twice."
        seen.add(key)
        parent = target.GetParentTransformNode()
        if parent is not None:
            return (f"The target '{name}' is under the transform '{parent.GetName()}'. Each propagated segmentation "
                    "lies on its target's own grid: harden that transform (Transforms module) or remove it first.")
    return None


def propagation_state(status: MethodStatus, atlas_volume, atlas_segmentation, target_volumes,
                      running: bool = False) -> tuple:
    """``(enabled, reason)`` for the "Propagate segmentation" button (reason says what is missing when disabled)."""
    if running:
        return False, "A registration is running; Cancel stops it."
    if not status.available and not status.engine_missing:
        return False, status.reason
    problem = propagation_problem(atlas_volume, atlas_segmentation, target_volumes)
    if problem:
        return False, problem
    count = len([t for t in target_volumes if t is not None])
    segments = atlas_segmentation.GetSegmentation().GetNumberOfSegments()
    return True, (f"Ready: propagates the {segments} segment(s) of '{atlas_segmentation.GetName()}' to {count} "
                  f"volume{'s' if count != 1 else ''}, one new segmentation each.")


def format_propagation(records) -> str:
    """The results text (HTML) of a propagation: per target its new segmentation, runtime and folding %.

    ``records``: :class:`MMRegCommonLib.logic.PropagatedSegmentation` items (``target_volume``,
    ``segmentation_node``, ``seconds``, ``folding_percent``).
    """
    if not records:
        return "No segmentation was propagated."
    total = sum(r.seconds for r in records)
    rows = "".join(f"<tr><td>{r.target_volume.GetName()}&nbsp;&nbsp;</td><td>{r.segmentation_node.GetName()}"
                   f"&nbsp;&nbsp;</td><td>{r.seconds:.1f} s&nbsp;&nbsp;</td><td>{_num(r.folding_percent, '.3f')} %"
                   "</td></tr>" for r in records)
    return (f"<b>Propagated</b> to {len(records)} volume(s) in {total:.1f} s:"
            "<table><tr><th align='left'>Target</th><th align='left'>New segmentation</th><th align='left'>Runtime"
            f"</th><th align='left'>Folding</th></tr>{rows}</table>")
