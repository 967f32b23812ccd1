"""The DisentangledRegistration module's own controls and how they become the engine's ``disentangled`` options.

The engine method ``disentangled`` (:class:`mmreg.methods.disentangled.DisentangledRegistration`) runs one
registration network for both directions between the two modalities of its model (the model card's
``architecture.domains``, e.g. ["T1", "T2"]), trained through a disentangled content/style representation
(the RDM). Its options, beyond the shared network ones:

* ``moving_domain``: which modality the MOVING image is (None: the second domain). The panel offers the
  direction as a combo box built from the chosen model's domains, "Moving is T2, fixed is T1" (the
  engine's default, first) and "Moving is T1, fixed is T2" (parameter ``movingDomain``: the moving
  domain's name; it follows the model: a domain the chosen model does not have becomes its second one,
  written into the parameter node so that the panel shows what Apply runs);
* ``translate``: make the extra output ``"translated_moving"`` (the warped moving image rendered in the
  fixed image's modality, on the fixed grid, in [0, 1]); set from the "Translated moving volume" checkbox
  (parameter ``makeTranslated``), so the translation is computed only when that volume is wanted.

Models of the first training stage (card ``training.stage == "rdm"``) hold only the representation: their
registration network is untrained and the engine refuses to register with them (an InputError saying so).
The selector lists them last, labelled "representation only: cannot register", and the model line says
what to do; they are never the default model. Apply with one of them shows the engine's message.

The model selector, the default model and the refinement similarity are the framework's
(:class:`MMRegCommonLib.networkoptions.NetworkModelOptions`; the multi-modal similarities, MIND first).
Plain Python, tested headless; the engine is imported only when used.
"""
from __future__ import annotations

import dataclasses

from MMRegCommonLib.methodoptions import OptionControl
from MMRegCommonLib.networkoptions import (NetworkModelOptions, first_sentence, is_fine_tuned, model_card,
                                          multimodal_refine_similarities)

#: The model used when none is chosen, unless the engine's ``disentangled`` method names another (its
#: ``default_model``).
DEFAULT_MODEL = "disentangled_t1t2"
#: The two modalities of a model whose card does not name them (the engine's default architecture).
DEFAULT_DOMAINS = ("T1", "T2")
#: ``training.stage`` of a representation-only model (stage 1 of training; cannot register).
RDM_STAGE = "rdm"
#: Added to the selector label of a representation-only model.
REPRESENTATION_ONLY = "representation only: cannot register"
#: The engine's extra output: the warped moving image in the fixed image's modality.
TRANSLATED = "translated_moving"
#: Similarities of the refinement: MIND first (the default: structure, not intensities, across T1 and T2).
REFINE_SIMILARITIES = multimodal_refine_similarities("the method's default")
#: Tooltip of the translated-volume output selector while "Translated moving volume" is off.
TRANSLATED_OFF = "Check 'Translated moving volume' to make it."


def domains_of_card(card: dict) -> tuple:
    """The two modalities of a model card (``architecture.domains``), :data:`DEFAULT_DOMAINS` when it does not name
    two."""
    architecture = card.get("architecture") if isinstance(card, dict) else None
    domains = architecture.get("domains") if isinstance(architecture, dict) else None
    if isinstance(domains, (list, tuple)) and len(domains) == 2 and all(isinstance(d, str) and d for d in domains):
        return tuple(domains)
    return DEFAULT_DOMAINS


def is_representation_only(card: dict) -> bool:
    """True for a model of the first training stage (card ``training.stage == "rdm"``): no registration network."""
    training = card.get("training") if isinstance(card, dict) else None
    return isinstance(training, dict) and training.get("stage") == RDM_STAGE


def model_domains(choice) -> tuple:
    """The two modalities of a model of the selector (from its card)."""
    return domains_of_card(model_card(choice))


def other_domain(domains, moving: str) -> str:
    """The fixed image's modality when the moving image is ``moving`` (one of ``domains``)."""
    return domains[0] if moving == domains[1] else domains[1]


def direction_label(domains, moving: str) -> str:
    """"Moving is T2, fixed is T1"."""
    return f"Moving is {moving}, fixed is {other_domain(domains, moving)}"


def direction_items(domains) -> list:
    """``[(moving domain, label, tooltip)]`` of the direction combo box for a model of ``domains``: the engine's
    default first (the moving image is the second domain), then the reverse."""
    first, second = domains
    return [(moving, direction_label(domains, moving),
             f"The moving volume is a {moving} scan and the fixed volume a {other_domain(domains, moving)} scan. The "
             f"same network registers both directions; the translated moving volume is rendered in "
             f"{other_domain(domains, moving)}.")
            for moving in (second, first)]


def model_label(choice) -> str:
    """"disentangled_t1t2 (T1-T2)"; a representation-only model says that it cannot register; a fine-tuned (user)
    model is marked."""
    card = model_card(choice)
    details = ["-".join(domains_of_card(card))] if card else []
    if is_representation_only(card):
        details.append(REPRESENTATION_ONLY)
    label = f"{choice.value} ({', '.join(details)})" if details else choice.value
    return label + (" (fine-tuned)" if is_fine_tuned(choice) else "")


class DisentangledOptions(NetworkModelOptions):
    """The ``disentangled`` method's controls: the model (with its modalities; representation-only models marked),
    the refinement similarity, the direction (``movingDomain`` -> ``moving_domain``) and whether to make the
    translated moving volume (``makeTranslated`` -> ``translate``, also the switch of that output)."""

    method = "disentangled"
    fallback_model = DEFAULT_MODEL
    refine_similarities = REFINE_SIMILARITIES
    controls = NetworkModelOptions.controls + (
        OptionControl("movingDomain", "moving_domain", convert=lambda value: value or None),
        OptionControl("makeTranslated", "translate", convert=bool),
    )
    combo_bindings = ("model", "refineSimilarity", "movingDomain")

    # ------------------------------------------------------------------ models
    def model_label(self, choice) -> str:
        """:func:`model_label` (modalities; representation only)."""
        return model_label(choice)

    def default_model(self, status) -> str:
        """The installed model used when none is chosen, among the models that can register (representation-only
        ones only when nothing else is installed): the engine's ``default_model`` when installed, else the
        generic choice (see :meth:`NetworkModelOptions.default_model`)."""
        usable = [m for m in status.models if not is_representation_only(model_card(m))]
        if usable and len(usable) < len(status.models):
            status = dataclasses.replace(status, models=usable)
        return NetworkModelOptions.default_model(self, status)

    def model_items(self, status) -> list:
        """The framework's selector (default first) with the representation-only models last."""
        items = NetworkModelOptions.model_items(self, status)
        cannot = {m.value for m in status.models if is_representation_only(model_card(m))}
        return sorted(items, key=lambda item: item[0] in cannot)

    def domains(self, model: str, status) -> tuple:
        """The two modalities of ``model`` (an installed model's name or a model folder path)."""
        return domains_of_card(self.card_of(model, status))

    def representation_only(self, model: str, status) -> bool:
        """Whether ``model`` holds only the representation (stage 1): the engine cannot register with it."""
        return is_representation_only(self.card_of(model, status))

    # ------------------------------------------------------------------ MethodOptions
    def resolve(self, values: dict, status) -> dict:
        """The default model for an unset or uninstalled one (the framework's), and the direction: a moving domain
        the model does not have ("" included) becomes its second domain (the engine's default)."""
        values = NetworkModelOptions.resolve(self, values, status)
        if "movingDomain" in values and status.available:
            domains = self.domains(values.get("model") or "", status)
            if values["movingDomain"] not in domains:
                values["movingDomain"] = domains[1]
        return values

    def value_combo_items(self, values: dict, status) -> dict:
        """The direction combo box: the two directions of the chosen model's modalities (see
        :func:`direction_items`)."""
        if not status.available:
            return {"movingDomain": [("", "Not available", status.reason)]}
        values = self.resolve(values, status)
        return {"movingDomain": direction_items(self.domains(values.get("model") or "", status))}

    def control_states(self, values: dict, status) -> dict:
        """The shared controls' states, and the translated-volume output selector: enabled only while "Translated
        moving volume" is checked."""
        states = NetworkModelOptions.control_states(self, values, status)
        if status.available:
            on = bool(values.get("makeTranslated"))
            states["outputTranslated"] = (on, "" if on else TRANSLATED_OFF)
        else:
            states["outputTranslated"] = (False, status.reason)
        return states

    def info_text(self, values: dict, status) -> str:
        """What the chosen model is: its modalities, network grid, field type and description; for a
        representation-only model, that it cannot register and what to do instead."""
        if not status.available:
            return ""
        values = self.resolve(values, status)
        model = values.get("model") or ""
        choice = self.chosen_model(values, status)
        card = model_card(choice) if choice is not None else self.card_of(model, status)
        if not model:
            return ""
        name = choice.value if choice is not None else f"the folder {model}"
        first, second = domains_of_card(card)
        if is_representation_only(card):
            reference = card.get("name") or model
            return (f"Model '{name}' holds only the {first}<->{second} representation (stage 1 of training): its "
                    "registration network is untrained, so Apply stops with an error. Choose a registration model, or "
                    f"train the registration stage with it (`[disentangled] rdm_model = \"{reference}\"`).")
        parts = [f"one network for both directions between {first} and {second}, trained through a disentangled "
                 "content/style representation"]
        if card.get("spacing_mm"):
            parts.append(f"network grid {float(card['spacing_mm']):g} mm")
        if card.get("diffeomorphic") is not None:
            parts.append("predicts a velocity (diffeomorphic)" if card["diffeomorphic"] else "predicts a displacement")
        description = first_sentence(card.get("description") or (choice.tooltip if choice is not None else ""))
        return f"'{choice.value if choice is not None else model}': {'; '.join(parts)}." + (
            f" {description}" if description else "")


#: The module's method-specific options (used by its Logic and Widget, and by the panel rendering).
METHOD_OPTIONS = DisentangledOptions()
