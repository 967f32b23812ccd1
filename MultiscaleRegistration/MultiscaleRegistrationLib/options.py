"""The MultiscaleRegistration module's own controls and how they become the engine's ``multiscale`` options.

The engine method ``multiscale`` runs FMIRNet: a residual U-Net whose displacement fields at full,
1/2 and 1/4 resolution are fused with a spatial attention map. Its trained models differ in how
many of those scales they use (``architecture.scales`` in the model card: the paper's FMIRNet-1,
-2 and -3), so the model selector names each model with its number of scales ("multiscale_brain
(3 scales)"). When no model is chosen the module runs the engine method's ``default_model``
(``multiscale_brain``; :data:`DEFAULT_MODEL` for an engine that does not name one), which the panel
writes into the parameter node so that it shows what Apply runs. The refinement similarity (engine ``refine_similarity``) is used only with
refinement steps > 0.

Plain Python, tested headless; the engine is imported only when used.
"""
from __future__ import annotations

import json
from pathlib import Path

from MMRegCommonLib.methodoptions import MethodOptions, OptionControl

#: The model used when none is chosen, unless the engine's ``multiscale`` method names another (its ``default_model``).
DEFAULT_MODEL = "multiscale_brain"
#: Similarities of the refinement (instance optimisation, the engine's ``optimize.SIMILARITIES``): (value,
#: label, tooltip). Mono-modal pairs: LNCC (the method's default) or MSE; MIND and MI also work across contrasts.
REFINE_SIMILARITIES = (
    ("lncc", "Local cross-correlation (LNCC)",
     "Local normalised cross-correlation in small windows: robust to smooth intensity differences between the "
     "scans (bias field, scanner); the method's default."),
    ("mse", "Mean squared difference",
     "Squared intensity difference: for scans with the same intensities (same scanner and protocol)."),
    ("mind", "MIND descriptors",
     "Modality-independent neighbourhood descriptors: local structure rather than intensity."),
    ("mi", "Mutual information",
     "Statistical dependence of the intensities: works even when the contrasts differ."),
)
_SCALE_NAMES = {1: "full resolution", 2: "full and 1/2 resolution", 3: "full, 1/2 and 1/4 resolution"}
_NO_REFINEMENT = "Used only with refinement steps > 0 (Options)."


def model_card(choice) -> dict:
    """The model card (``model.json``) of a model of the selector (a :class:`MMRegCommonLib.panel.ModelChoice`
    whose engine listing has its folder ``path``); {} when it cannot be read."""
    path = (choice.info or {}).get("path")
    if not path:
        return {}
    try:
        return json.loads((Path(path) / "model.json").read_text())
    except (OSError, ValueError):
        return {}


def model_scales(choice) -> int | None:
    """The number of FMIRNet scales of a model (``architecture.scales`` of its card; 3, the network's default,
    when the card's FMIRNet architecture does not say); None when unknown (no readable card)."""
    card = model_card(choice)
    architecture = card.get("architecture")
    if not isinstance(architecture, dict):
        return None
    scales = architecture.get("scales")
    if scales is None:
        from mmreg.networks import DEFAULT_MULTISCALE_ARCHITECTURE
        is_fmirnet = architecture.get("kind", "fmirnet") == "fmirnet"
        return int(DEFAULT_MULTISCALE_ARCHITECTURE["scales"]) if is_fmirnet else None
    try:
        return int(scales)
    except (TypeError, ValueError):
        return None


def model_label(choice) -> str:
    """"multiscale_brain (3 scales)"; a fine-tuned (user) model is marked; "name" alone when the card says nothing."""
    scales = model_scales(choice)
    label = choice.value if scales is None else f"{choice.value} ({scales} scale{'s' if scales != 1 else ''})"
    if str((choice.info or {}).get("source", "")).lower() in ("user", "fine-tuned", "finetuned"):
        label += " (fine-tuned)"
    return label


def model_items(status) -> list:
    """``[(model name, label, tooltip)]`` of the model selector: every installed ``multiscale`` model with its
    number of scales (the default model first, then the others as the engine lists them)."""
    if not status.available:
        return [("", "Not available", status.reason)]
    default = default_model(status)
    ordered = sorted(status.models, key=lambda m: m.value != default)
    return [(m.value, model_label(m) + (" — default" if m.value == default else ""), m.tooltip or m.label)
            for m in ordered]


def engine_default_model() -> str:
    """The model the module runs when none is chosen: the engine ``multiscale`` method's ``default_model`` when it
    names one, else :data:`DEFAULT_MODEL`."""
    try:
        import mmreg
        method = mmreg.get_method("multiscale")
    except Exception:  # noqa: BLE001 - engine not loadable or without the method: the module's own choice
        return DEFAULT_MODEL
    return getattr(method, "default_model", None) or DEFAULT_MODEL


def default_model(status) -> str:
    """The installed model used when none is chosen: :func:`engine_default_model` when installed, else the engine's
    generic choice ("default" or the only one), else the first shipped, else the first listed; "" when none."""
    if not status.models:
        return ""
    names = [m.value for m in status.models]
    preferred = engine_default_model()
    if preferred in names:
        return preferred
    from mmreg.models import default_model_name
    generic = default_model_name(names)
    if generic is not None:
        return generic
    shipped = [m.value for m in status.models if str((m.info or {}).get("source", "")) == "shipped"]
    return (shipped or names)[0]


def _first_sentence(text: str, limit: int = 200) -> str:
    text = " ".join(str(text or "").split())
    end = text.find(". ")
    text = text[:end + 1] if 0 <= end < limit else text
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


class MultiscaleOptions(MethodOptions):
    """The ``multiscale`` method's controls: the model (with its number of scales) and the refinement similarity
    (which applies only with refinement steps > 0, the shared ``refinementSteps``)."""

    controls = (
        OptionControl("model", "model", convert=lambda value: value or None),
        OptionControl("refineSimilarity", "refine_similarity", unused_tip=_NO_REFINEMENT),
    )
    combo_bindings = ("model", "refineSimilarity")
    context_parameters = ("refinementSteps",)

    def applies(self, control: OptionControl, values: dict) -> bool:
        """The refinement similarity is used only when refinement steps > 0."""
        if control.parameter == "refineSimilarity":
            return int(values.get("refinementSteps") or 0) > 0
        return MethodOptions.applies(self, control, values)

    def combo_items(self, status) -> dict:
        """The model selector (:func:`model_items`) and the refinement similarities."""
        return {"model": model_items(status), "refineSimilarity": list(REFINE_SIMILARITIES)}

    def resolve(self, values: dict, status) -> dict:
        """A model left empty, or no longer installed, becomes the default model (:func:`default_model`); a model
        given as a folder path stays."""
        values = dict(values)
        model = values.get("model") or ""
        if model not in [m.value for m in status.models] and not (model and Path(model).expanduser().is_dir()):
            values["model"] = default_model(status)
        return values

    def problem(self, values: dict, status) -> str | None:
        """An unknown refinement similarity (a scripted or stale value)."""
        known = [value for value, _, _ in REFINE_SIMILARITIES]
        if values.get("refineSimilarity") not in known:
            return (f"Unknown refinement similarity '{values.get('refineSimilarity')}': choose one of "
                    f"{', '.join(known)}.")
        return None

    def info_text(self, values: dict, status) -> str:
        """What the chosen model is: its scales, network grid, field type and description."""
        if not status.available:
            return ""
        values = self.resolve(values, status)
        by_name = {m.value: m for m in status.models}
        choice = by_name.get(values.get("model"))
        if choice is None:
            return f"Model from the folder {values.get('model')}." if values.get("model") else ""
        card = model_card(choice)
        scales = model_scales(choice)
        parts = [f"FMIRNet with {scales} scale{'s' if scales != 1 else ''} ({_SCALE_NAMES.get(scales, '')})"
                 if scales in _SCALE_NAMES else "FMIRNet"]
        if card.get("spacing_mm"):
            parts.append(f"network grid {float(card['spacing_mm']):g} mm")
        if card.get("diffeomorphic") is not None:
            parts.append("predicts a velocity (diffeomorphic)" if card["diffeomorphic"] else "predicts a displacement")
        description = _first_sentence(card.get("description") or choice.tooltip)
        return f"'{choice.value}': {', '.join(parts)}." + (f" {description}" if description else "")


#: The module's method-specific options (used by its Logic and Widget, and by the panel rendering).
METHOD_OPTIONS = MultiscaleOptions()
