"""The GradRegistration module's own controls and how they become the engine's ``grad`` options.

The engine method ``grad`` runs GradNet (:class:`mmreg.networks.GradNet`): an image branch and a
gradient-magnitude branch whose fields are fused by learned gates ("gated fusion") or averaged
("average fusion"), and the paper's baselines as models of the same method: the image branch alone
("VM") and one branch reading the images and their gradient maps ("VM(concat)"). The variant is the
model card's ``architecture.variant``; the model selector names each model with its variant and the
modality pair it was trained for (CT-MR or MR-MR, from its name, description or training data):
"grad_mr_gated (gated fusion, MR-MR)". When no model is chosen the module runs the engine method's
``default_model`` (``grad_mr_gated``; :data:`DEFAULT_MODEL` for an engine that does not name one).

Only gated models make the gate maps (engine extra outputs ``image_gate`` and ``gradient_gate``): with
another model the "Gate maps" controls are disabled and say why, and a run that asked for them says so
in its notes instead of failing (:func:`gates_unavailable_note`).

The selector, the default model and the refinement similarity (used only with refinement steps > 0;
MIND by default, as the network was trained with it) are the framework's
(:class:`MMRegCommonLib.networkoptions.NetworkModelOptions`). Plain Python, tested headless; the engine
is imported only when used.
"""
from __future__ import annotations

import re

from MMRegCommonLib.networkoptions import (NetworkModelOptions, first_sentence, is_fine_tuned, model_card,
                                          multimodal_refine_similarities)

#: The model used when none is chosen, unless the engine's ``grad`` method names another (its ``default_model``).
DEFAULT_MODEL = "grad_mr_gated"
#: GradNet variants (``architecture.variant`` of a model card) as the panel names them.
VARIANT_LABELS = {"gated": "gated fusion", "average": "average fusion", "vm": "VM", "vm_concat": "VM(concat)"}
#: What each variant's network is (the model line under the selector).
VARIANT_DESCRIPTIONS = {
    "gated": "an image branch and a gradient-map branch, their fields fused by learned gates",
    "average": "an image branch and a gradient-map branch, their fields averaged",
    "vm": "the image branch alone, VoxelMorph baseline",
    "vm_concat": "one branch reading the images and their gradient maps, VoxelMorph(concat) baseline",
}
#: The variant whose models make the gate maps.
GATED = "gated"
#: The engine's extra output maps of a gated model.
GATE_MAP_NAMES = ("image_gate", "gradient_gate")
#: Parameters of the gate-map outputs (checkbox and output selectors).
GATE_PARAMETERS = ("makeGateMaps", "outputImageGate", "outputGradientGate")
#: Similarities of the refinement (instance optimisation, the engine's ``optimize.SIMILARITIES``): (value,
#: label, tooltip). The pairs are multi-modal (CT-MR, T1-T2/PD): MIND (the method's default, the training
#: loss) or mutual information; LNCC and MSE only for images of the same kind (the framework's list).
REFINE_SIMILARITIES = multimodal_refine_similarities("the method's default and its training loss")
#: Tooltip of the gate-map outputs while "Gate maps" is off.
GATES_OFF = "Check 'Gate maps' to make the gate volumes."


def variant_of_card(card: dict) -> str | None:
    """The GradNet variant of a model card (``architecture.variant``; the network's default, "gated", when a GradNet
    card does not say); None when the card has no GradNet architecture (unreadable card, another network)."""
    architecture = card.get("architecture") if isinstance(card, dict) else None
    if not isinstance(architecture, dict):
        return None
    variant = architecture.get("variant")
    if variant is None:
        if architecture.get("kind", "gradnet") != "gradnet":
            return None
        from mmreg.networks import DEFAULT_GRAD_ARCHITECTURE
        return str(DEFAULT_GRAD_ARCHITECTURE["variant"])
    return str(variant)


def model_variant(choice) -> str | None:
    """The GradNet variant of a model of the selector (from its card), or None when unknown."""
    return variant_of_card(model_card(choice))


_CT = re.compile(r"\bCT\b", re.IGNORECASE)
_MR = re.compile(r"\b(MR|MRI|T1|T1w|T2|T2w|PD|PDw|FLAIR)\b", re.IGNORECASE)
_CT_MR = re.compile(r"\b(CT\s*[-/–]\s*MRI?|MRI?\s*[-/–]\s*CT)\b", re.IGNORECASE)
_MR_MR = re.compile(r"\b(MRI?\s*[-/–]\s*MRI?|T1w?\s*[-/–]\s*(T2|PD)w?)\b", re.IGNORECASE)


def modality_pair(name: str, card: dict, description: str = "") -> str | None:
    """The modality pair a model was trained for: "CT-MR" or "MR-MR", from (in this order) its name ("ctmr", or the
    words "ct" and "mr"/"mri": CT-MR; "mr", "mri" or "mrmr" alone: MR-MR), its description ("CT-MR", "MR-MR",
    "T1-T2"; else CT with MR words: CT-MR, MR words alone: MR-MR) and its training data (``training.config.data.template_modalities``); None when
    none of them says."""
    tokens = {t for t in re.split(r"[^a-z0-9]+", str(name).lower()) if t}
    has_mr = bool(tokens & {"mr", "mri"})
    if tokens & {"ctmr", "mrct"} or ("ct" in tokens and has_mr):
        return "CT-MR"
    if has_mr or "mrmr" in tokens:
        return "MR-MR"
    text = " ".join(str(t) for t in (card.get("description") if isinstance(card, dict) else "", description) if t)
    if _CT_MR.search(text):
        return "CT-MR"
    if _MR_MR.search(text):
        return "MR-MR"
    if _CT.search(text) and _MR.search(text):
        return "CT-MR"
    if _MR.search(text) and not _CT.search(text):
        return "MR-MR"
    data = (((card.get("training") or {}).get("config") or {}).get("data") or {}) if isinstance(card, dict) else {}
    modalities = [str(m).upper() for m in (data.get("template_modalities") or []) if m]
    if modalities:
        return "CT-MR" if "CT" in modalities else "MR-MR"
    return None


def model_modality(choice) -> str | None:
    """The modality pair of a model of the selector (:func:`modality_pair` of its name, card and listed description)."""
    return modality_pair(choice.value, model_card(choice), (choice.info or {}).get("description") or choice.tooltip)


def model_label(choice) -> str:
    """"grad_mr_gated (gated fusion, MR-MR)"; a fine-tuned (user) model is marked; the name alone when the card says
    nothing."""
    details = [VARIANT_LABELS.get(v, v) for v in (model_variant(choice),) if v]
    details += [m for m in (model_modality(choice),) if m]
    label = f"{choice.value} ({', '.join(details)})" if details else choice.value
    return label + (" (fine-tuned)" if is_fine_tuned(choice) else "")


def a_variant(variant: str) -> str:
    """"a VM", "an average fusion": the variant's label with its article."""
    label = VARIANT_LABELS.get(variant, str(variant))
    return ("an " if label[:1].lower() in "aeiou" else "a ") + label


def gates_unavailable_note(model: str, variant: str | None) -> str:
    """The sentence shown when gate maps were asked for with a model that has no gates."""
    what = f"{a_variant(variant)} model" if variant else "not a gated model"
    return (f"Gate maps are only available for gated models: '{model}' is {what} (no gates), so no gate volumes "
            "were made.")


def model_items(status) -> list:
    """``[(model name, label, tooltip)]`` of the model selector: every installed ``grad`` model with its variant and
    modality pair (the default model first, then the others as the engine lists them)."""
    return METHOD_OPTIONS.model_items(status)


def engine_default_model() -> str:
    """The model the module runs when none is chosen: the engine ``grad`` method's ``default_model`` when it names
    one, else :data:`DEFAULT_MODEL`."""
    return METHOD_OPTIONS.engine_default_model()


def default_model(status) -> str:
    """The installed model used when none is chosen: :func:`engine_default_model` when installed, else the engine's
    generic choice ("default" or the only one), else the first shipped, else the first listed; "" when none."""
    return METHOD_OPTIONS.default_model(status)


class GradOptions(NetworkModelOptions):
    """The ``grad`` method's controls: the model (with its variant and modality pair) and the refinement similarity;
    and whether the gate-map outputs apply (gated models only; the ``makeGateMaps`` checkbox, read as a context
    parameter, never passed to the engine)."""

    method = "grad"
    fallback_model = DEFAULT_MODEL
    refine_similarities = REFINE_SIMILARITIES
    context_parameters = ("refinementSteps", "makeGateMaps")

    def model_label(self, choice) -> str:
        """:func:`model_label` (variant and modality pair)."""
        return model_label(choice)

    def variant_of(self, model: str, status) -> str | None:
        """The variant of ``model`` (an installed model's name or a model folder path), None when unknown."""
        return variant_of_card(self.card_of(model, status))

    def gates_available(self, values: dict, status) -> tuple:
        """``(available, reason)``: whether the model that runs with these values makes gate maps (a model of unknown
        variant may: the run decides); ``reason`` says why not."""
        if not status.available:
            return False, status.reason
        model = self.resolve(values, status).get("model") or ""
        variant = self.variant_of(model, status)
        if variant is None or variant == GATED:
            return True, ""
        return False, (f"Gate maps are only available for gated models; '{model}' is {a_variant(variant)} model "
                       "(no gates).")

    def control_states(self, values: dict, status) -> dict:
        """The model and refinement controls, and the gate-map outputs: the checkbox enabled for a gated model, its
        output selectors when it is also checked; disabled ones say why."""
        states = NetworkModelOptions.control_states(self, values, status)
        available, reason = self.gates_available(values, status)
        states["makeGateMaps"] = (available, reason)
        outputs = (available and bool(values.get("makeGateMaps")), reason or GATES_OFF)
        states["outputImageGate"] = states["outputGradientGate"] = (outputs[0], "" if outputs[0] else outputs[1])
        return states

    def info_text(self, values: dict, status) -> str:
        """What the chosen model is: variant, modality pair, network grid, field type, description, and whether it
        makes gate maps."""
        if not status.available:
            return ""
        values = self.resolve(values, status)
        choice = self.chosen_model(values, status)
        if choice is None:
            if not values.get("model"):
                return ""
            variant = self.variant_of(values["model"], status)
            text = f"Model from the folder {values['model']}"
            return text + (f" ({VARIANT_LABELS.get(variant, variant)})." if variant else ".")
        card = model_card(choice)
        variant, modality = model_variant(choice), model_modality(choice)
        parts = [f"{VARIANT_LABELS.get(variant, variant)} ({VARIANT_DESCRIPTIONS[variant]})"
                 if variant in VARIANT_DESCRIPTIONS else "GradNet"]
        if modality:
            parts.append(f"{modality} pairs")
        if card.get("spacing_mm"):
            parts.append(f"network grid {float(card['spacing_mm']):g} mm")
        if card.get("diffeomorphic") is not None:
            parts.append("predicts a velocity (diffeomorphic)" if card["diffeomorphic"] else "predicts a displacement")
        description = first_sentence(card.get("description") or choice.tooltip)
        text = f"'{choice.value}': {'; '.join(parts)}." + (f" {description}" if description else "")
        if variant is not None and variant != GATED:
            text += " Gate maps are only available for gated models."
        return text


#: The module's method-specific options (used by its Logic and Widget, and by the panel rendering).
METHOD_OPTIONS = GradOptions()
