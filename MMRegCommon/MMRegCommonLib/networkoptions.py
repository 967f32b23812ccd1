"""Method-specific options of a module whose engine method is a trained network (the engine's
``NetworkRegistration``: ``multiscale``, ``grad``, ...): a model selector that says what each installed
model is, the module's default model, and the similarity of the optional refinement.

The selector lists every installed model of the method (shipped and the user's fine-tuned ones, as
``mmreg.models.list_models`` gives them through :func:`MMRegCommonLib.panel.method_status`), the default
model first, each labelled by the module (:meth:`NetworkModelOptions.model_label`, from the model card
``model.json``: e.g. FMIRNet's number of scales, GradNet's fusion variant and modality pair). When no model
is chosen, or the chosen one is no longer installed, the module's default model runs
(:meth:`NetworkModelOptions.default_model`: the engine method's ``default_model`` when installed, see
:func:`default_model`); the panel writes it into the parameter node so that it shows what Apply runs. A
model given as a folder path stays as it is. The refinement similarity (engine ``refine_similarity``) is
used only with refinement steps > 0 (the shared ``refinementSteps``).

Plain Python (no Qt, no Slicer), tested headless; the engine is imported only when used.
"""
from __future__ import annotations

import json
from pathlib import Path

from .methodoptions import MethodOptions, OptionControl

#: Tooltip of the refinement similarity while refinement is off.
NO_REFINEMENT = "Used only with refinement steps > 0 (Options)."


def multimodal_refine_similarities(mind_note: str = "the default for scans of different kinds") -> tuple:
    """``(value, label, tooltip)`` of the refinement similarities of a multi-modal network method (CT-MR, T1-T2/PD;
    the engine's ``optimize.SIMILARITIES``), MIND first: MIND descriptors (``mind_note`` ends its tooltip, e.g.
    "the method's default and its training loss") or mutual information; LNCC and MSE only for images of the same
    kind. Shared by the modules of the multi-modal methods (``grad``, ``disentangled``)."""
    return (
        ("mind", "MIND descriptors",
         "Modality-independent neighbourhood descriptors: compares local structure, not intensities, so it works "
         f"across CT and MR or T1 and T2; {mind_note}."),
        ("mi", "Mutual information",
         "Statistical dependence of the intensities: works even when the contrasts differ."),
        ("lncc", "Local cross-correlation (LNCC)",
         "Local normalised cross-correlation in small windows: only for scans of the same kind (T1-T1, CT-CT)."),
        ("mse", "Mean squared difference",
         "Squared intensity difference: only for scans with the same intensities (same scanner and protocol)."),
    )


def model_card(choice) -> dict:
    """The model card (``model.json``) of a model of the selector (a :class:`MMRegCommonLib.panel.ModelChoice`
    whose engine listing has its folder ``path``); {} when it cannot be read."""
    path = (choice.info or {}).get("path")
    if not path:
        return {}
    return read_card(path)


def read_card(folder) -> dict:
    """The model card (``model.json``) in ``folder`` as a dict; {} when it cannot be read."""
    try:
        card = json.loads((Path(folder).expanduser() / "model.json").read_text())
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


def is_fine_tuned(choice) -> bool:
    """True for a user's (fine-tuned) model, as the engine's listing marks it (``source``)."""
    return str((choice.info or {}).get("source", "")).lower() in ("user", "fine-tuned", "finetuned")


def first_sentence(text, limit: int = 200) -> str:
    """The first sentence of ``text`` (whitespace collapsed), shortened to ``limit`` characters."""
    text = " ".join(str(text or "").split())
    end = text.find(". ")
    text = text[:end + 1] if 0 <= end < limit else text
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def engine_default_model(method: str, fallback: str = "") -> str:
    """The model the engine method ``method`` runs when several are installed (its ``default_model``), else
    ``fallback`` (also when the engine cannot be loaded or lacks the method)."""
    try:
        import mmreg
        engine_method = mmreg.get_method(method)
    except Exception:  # noqa: BLE001 - engine not loadable or without the method: the module's own choice
        return fallback
    return getattr(engine_method, "default_model", None) or fallback


def default_model(status, preferred: str = "") -> str:
    """The installed model used when none is chosen: ``preferred`` when installed, else the engine's generic choice
    ("default" or the only one), else the first shipped, else the first listed; "" when none is installed."""
    if not status.models:
        return ""
    names = [m.value for m in status.models]
    if preferred and preferred in names:
        return preferred
    from mmreg.models import default_model_name
    generic = default_model_name(names)
    if generic is not None:
        return generic
    shipped = [m.value for m in status.models if str((m.info or {}).get("source", "")) == "shipped"]
    return (shipped or names)[0]


class NetworkModelOptions(MethodOptions):
    """The controls of a network method: the model (labelled by :meth:`model_label`) and the refinement similarity
    (:attr:`refine_similarities`; it applies only with refinement steps > 0).

    A module subclasses it with its engine method (:attr:`method`), its fallback default model
    (:attr:`fallback_model`, for an engine that names none), its similarities, its labels and its
    :meth:`info_text`.
    """

    #: The engine method (``mmreg.get_method(method)``).
    method = ""
    #: The default model when the engine method does not name one (its ``default_model``).
    fallback_model = ""
    #: ``(value, label, tooltip)`` of the refinement similarities (values of the engine's ``refine_similarity``).
    refine_similarities: tuple = ()

    controls = (
        OptionControl("model", "model", convert=lambda value: value or None),
        OptionControl("refineSimilarity", "refine_similarity", unused_tip=NO_REFINEMENT),
    )
    combo_bindings = ("model", "refineSimilarity")
    context_parameters = ("refinementSteps",)

    # ------------------------------------------------------------------ models
    def engine_default_model(self) -> str:
        """The model run when none is chosen: the engine method's ``default_model``, else :attr:`fallback_model`."""
        return engine_default_model(self.method, self.fallback_model)

    def default_model(self, status) -> str:
        """The installed model used when none is chosen (:func:`default_model` with :meth:`engine_default_model`)."""
        return default_model(status, self.engine_default_model())

    def model_label(self, choice) -> str:
        """The selector's text for one model: its name here; a fine-tuned (user) model is marked."""
        return choice.value + (" (fine-tuned)" if is_fine_tuned(choice) else "")

    def model_items(self, status) -> list:
        """``[(model name, label, tooltip)]`` of the model selector: every installed model with its label (the default
        model first, marked, then the others as the engine lists them)."""
        if not status.available:
            return [("", "Not available", status.reason)]
        default = self.default_model(status)
        ordered = sorted(status.models, key=lambda m: m.value != default)
        return [(m.value, self.model_label(m) + (" — default" if m.value == default else ""), m.tooltip or m.label)
                for m in ordered]

    def chosen_model(self, values: dict, status):
        """The :class:`MMRegCommonLib.panel.ModelChoice` that runs with these values (resolved), or None (a model
        folder path, or no model installed)."""
        model = self.resolve(values, status).get("model")
        return next((m for m in status.models if m.value == model), None)

    def card_of(self, model: str, status) -> dict:
        """The model card of ``model`` (an installed model's name, or a model folder path); {} when unknown."""
        choice = next((m for m in status.models if m.value == model), None)
        if choice is not None:
            return model_card(choice)
        return read_card(model) if model else {}

    # ------------------------------------------------------------------ MethodOptions
    def applies(self, control: OptionControl, values: dict) -> bool:
        """The refinement similarity is used only when refinement steps > 0."""
        if control.parameter == "refineSimilarity":
            return int(values.get("refinementSteps") or 0) > 0
        return MethodOptions.applies(self, control, values)

    def combo_items(self, status) -> dict:
        """The model selector (:meth:`model_items`) and the refinement similarities."""
        return {"model": self.model_items(status), "refineSimilarity": list(self.refine_similarities)}

    def resolve(self, values: dict, status) -> dict:
        """A model left empty, or no longer installed, becomes the default model (:meth:`default_model`); a model
        given as a folder path stays."""
        values = dict(values)
        model = values.get("model") or ""
        if model not in [m.value for m in status.models] and not (model and Path(model).expanduser().is_dir()):
            values["model"] = self.default_model(status)
        return values

    def problem(self, values: dict, status) -> str | None:
        """An unknown refinement similarity (a scripted or stale value)."""
        known = [value for value, _, _ in self.refine_similarities]
        if values.get("refineSimilarity") not in known:
            return (f"Unknown refinement similarity '{values.get('refineSimilarity')}': choose one of "
                    f"{', '.join(known)}.")
        return None
