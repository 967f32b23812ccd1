"""The MultiscaleRegistration module's own controls and how they become the engine's ``multiscale`` options.

The engine method ``multiscale`` runs FMIRNet: a residual U-Net whose displacement fields at full,
1/2 and 1/4 resolution are fused with a spatial attention map. Its trained models differ in how
many of those scales they use (``architecture.scales`` in the model card: the paper's FMIRNet-1,
-2 and -3), so the model selector names each model with its number of scales ("multiscale_brain
(3 scales)"). When no model is chosen the module runs the engine method's ``default_model``
(``multiscale_brain``; :data:`DEFAULT_MODEL` for an engine that does not name one), which the panel
writes into the parameter node so that it shows what Apply runs. The refinement similarity (engine ``refine_similarity``) is used only with
refinement steps > 0.

The selector, the default model and the refinement similarity are the framework's
(:class:`MMRegCommonLib.networkoptions.NetworkModelOptions`); this file adds what is FMIRNet's. Plain Python,
tested headless; the engine is imported only when used.
"""
from __future__ import annotations

from MMRegCommonLib import networkoptions
from MMRegCommonLib.networkoptions import NetworkModelOptions, first_sentence, is_fine_tuned, model_card

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
    return label + (" (fine-tuned)" if is_fine_tuned(choice) else "")


def model_items(status) -> list:
    """``[(model name, label, tooltip)]`` of the model selector: every installed ``multiscale`` model with its
    number of scales (the default model first, then the others as the engine lists them)."""
    return METHOD_OPTIONS.model_items(status)


def engine_default_model() -> str:
    """The model the module runs when none is chosen: the engine ``multiscale`` method's ``default_model`` when it
    names one, else :data:`DEFAULT_MODEL`."""
    return networkoptions.engine_default_model("multiscale", DEFAULT_MODEL)


def default_model(status) -> str:
    """The installed model used when none is chosen: :func:`engine_default_model` when installed, else the engine's
    generic choice ("default" or the only one), else the first shipped, else the first listed; "" when none."""
    return networkoptions.default_model(status, engine_default_model())


class MultiscaleOptions(NetworkModelOptions):
    """The ``multiscale`` method's controls: the model (with its number of scales) and the refinement similarity
    (which applies only with refinement steps > 0, the shared ``refinementSteps``); the common part is
    :class:`MMRegCommonLib.networkoptions.NetworkModelOptions`."""

    method = "multiscale"
    fallback_model = DEFAULT_MODEL
    refine_similarities = REFINE_SIMILARITIES

    def engine_default_model(self) -> str:
        """:func:`engine_default_model`."""
        return engine_default_model()

    def model_label(self, choice) -> str:
        """:func:`model_label` (the number of scales)."""
        return model_label(choice)

    def info_text(self, values: dict, status) -> str:
        """What the chosen model is: its scales, network grid, field type and description."""
        if not status.available:
            return ""
        values = self.resolve(values, status)
        choice = self.chosen_model(values, status)
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
        description = first_sentence(card.get("description") or choice.tooltip)
        return f"'{choice.value}': {', '.join(parts)}." + (f" {description}" if description else "")


#: The module's method-specific options (used by its Logic and Widget, and by the panel rendering).
METHOD_OPTIONS = MultiscaleOptions()
