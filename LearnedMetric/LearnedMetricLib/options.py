"""The LearnedMetric module's own controls and how they become the engine's ``metric`` options.

The engine method ``metric`` optimises a similarity transform and then a B-spline transform
(control points every ``control_spacing_mm`` at the finest level, ``levels`` resolutions) against a
similarity measure: a learned CNN metric (``similarity="learned"`` with a trained ``model``) or
Parzen-window mutual information (``"mi"``; ``"mi_masked"``: restricted to the foreground).

The panel's metric selector lists the installed learned metrics (named by the modalities they
were trained on, from their model cards; fine-tuned ones marked), then the two MI variants;
picking one sets the parameters ``metric`` and ``model`` together (a combo box bound to both,
see :mod:`MMRegCommonLib.combos`). Plain Python, tested headless; the engine is imported only
when used.
"""
from __future__ import annotations

import json
from pathlib import Path

from MMRegCommonLib.methodoptions import MethodOptions, OptionControl

LEARNED, MI, MI_MASKED = "learned", "mi", "mi_masked"
#: The similarity measures of the engine's ``metric`` method.
METRICS = (LEARNED, MI, MI_MASKED)
BSPLINE, SIMILARITY = "bspline", "similarity"
#: Transformation models: (value, label, tooltip).
TRANSFORM_ITEMS = (
    (BSPLINE, "Similarity, then B-spline (deformable)",
     "A similarity transform (rotation, translation, isotropic scale) first, then a B-spline deformation on a "
     "grid of control points."),
    (SIMILARITY, "Similarity only (rotation, translation, scale)",
     "Only the similarity transform: no deformation (fast; for images of the same anatomy at another position)."),
)
#: MR contrasts recognised in a model card's modalities (compared in upper case).
MR_CONTRASTS = ("T1", "T2", "PD", "FLAIR", "T1W", "T2W", "PDW")
_NOT_BSPLINE = "Used only by the B-spline stage; 'Similarity only' has none."


def _tokens(value) -> list:
    """The modality names in a card's ``modalities`` (a string, a list, nested lists, or a dict of them)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [t for t in value.replace("-", " ").replace("/", " ").replace(",", " ").split() if t]
    if isinstance(value, dict):
        value = list(value.values())
    out = []
    for item in value:
        out += _tokens(item)
    return out


def modality_label(modalities) -> str:
    """A short label for the modalities a learned metric was trained on.

    A string is shown as it is ("MR-MR (T1/T2/PD)"); lists (or a dict of lists) are summarised:
    ``["T1", "T2", "PD"]`` or the recipe's kinds of pairs ``["T1-T2", "T1-PD", "IXI-synth"]`` ->
    "MR-MR (T1/T2/PD)", ``["CT", "MR"]`` -> "CT-MR", ``["CT", "T1"]`` -> "CT-MR (T1)". Words that
    name no CT or MR modality (a data set, "pairs") are left out; "" when none is left.
    """
    if isinstance(modalities, str):
        return modalities.strip()
    tokens = list(dict.fromkeys(_tokens(modalities)))
    if not tokens:
        return ""
    upper = [t.upper() for t in tokens]
    contrasts = sorted((t for t, u in zip(tokens, upper) if u in MR_CONTRASTS),
                       key=lambda t: MR_CONTRASTS.index(t.upper()))  # T1/T2/PD whatever the card's order
    has_mr = bool(contrasts) or any(u in ("MR", "MRI") for u in upper)
    has_ct = "CT" in upper
    if not (has_mr or has_ct):
        return ""
    base = "CT-MR" if has_ct and has_mr else ("CT-CT" if has_ct else "MR-MR")
    return f"{base} ({'/'.join(contrasts)})" if contrasts else base


def model_modalities(choice):
    """The ``modalities`` of a learned metric (a :class:`MMRegCommonLib.panel.ModelChoice`): from the engine's
    listing when it has them, else from the model card's ``training`` record (None when unknown)."""
    info = choice.info or {}
    for source in (info, info.get("training") or {}):
        if source.get("modalities"):
            return source["modalities"]
    path = info.get("path")
    if not path:
        return None
    try:
        card = json.loads((Path(path) / "model.json").read_text())
    except (OSError, ValueError):
        return None
    return (card.get("training") or {}).get("modalities") or card.get("modalities")


def learned_label(choice) -> str:
    """"Learned: MR-MR (T1/T2/PD) — metric_mr" (fine-tuned user models marked)."""
    modalities = modality_label(model_modalities(choice))
    label = f"Learned: {modalities} — {choice.value}" if modalities else f"Learned metric — {choice.value}"
    if str((choice.info or {}).get("source", "")).lower() in ("user", "fine-tuned", "finetuned"):
        label += " (fine-tuned)"
    return label


def mi_bins(status) -> int:
    """The number of histogram bins of the method's mutual information (its ``mi_bins`` default)."""
    return int(status.options.get("mi_bins") or 75)


def metric_items(status) -> list:
    """``[((metric, model), label, tooltip)]`` of the metric selector: each installed learned metric, then
    mutual information and mutual information with the background masked. Without an installed learned
    metric its place says so (choosing it keeps Apply disabled, with the reason)."""
    items = []
    for choice in status.models:
        items.append(((LEARNED, choice.value), learned_label(choice), choice.tooltip or choice.label))
    if not items:
        items.append(((LEARNED, ""), "Learned metric: none installed",
                      "No trained learned metric is installed; train one with the RegistrationTraining module "
                      "(method 'metric', on aligned pairs) or use mutual information."))
    bins = mi_bins(status)
    items.append(((MI, ""), f"Mutual information ({bins} bins)",
                  f"Parzen-window mutual information with {bins} histogram bins over the whole overlap of the "
                  "images: any pair of modalities, no trained model needed."))
    items.append(((MI_MASKED, ""), "Mutual information, background masked",
                  "Mutual information over the foreground only: the empty background (air, padding) does not "
                  "count. For images with large empty regions."))
    return items


def engine_default_model() -> str | None:
    """The learned metric the engine's ``metric`` method uses when none is given (its ``DEFAULT_MODEL``, e.g.
    "metric_mr"), or None when the engine does not name one."""
    try:
        from mmreg.methods import metric
    except ImportError:
        return None
    return getattr(metric, "DEFAULT_MODEL", None)


def default_learned_model(status) -> str:
    """The learned metric used when none is chosen: the engine's default when it is installed, else the
    generic default ("default" or the only one), else the first shipped model, else the first listed; ""
    when none is installed."""
    if not status.models:
        return ""
    preferred = engine_default_model()
    if preferred and any(m.value == preferred for m in status.models):
        return preferred
    from MMRegCommonLib.panel import default_model
    chosen = default_model(status)
    if chosen is not None:
        return chosen.value
    shipped = [m for m in status.models if str((m.info or {}).get("source", "")) == "shipped"]
    return (shipped or status.models)[0].value


def _first_sentence(text: str, limit: int = 220) -> str:
    text = " ".join(str(text or "").split())
    end = text.find(". ")
    text = text[:end + 1] if 0 <= end < limit else text
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


class MetricOptions(MethodOptions):
    """The ``metric`` method's controls: metric (with its model), transformation model, control-point spacing,
    levels and the iterations per level of each stage."""

    controls = (
        OptionControl("metric", "similarity"),
        OptionControl("model", "model", convert=lambda value: value or None, applies_when=("metric", (LEARNED,))),
        OptionControl("transformModel", "transform"),
        OptionControl("controlPointSpacing", "control_spacing_mm", float, ("transformModel", (BSPLINE,)),
                      _NOT_BSPLINE),
        OptionControl("levels", "levels", int),
        OptionControl("similarityIterations", "iterations_similarity", int),
        OptionControl("bsplineIterations", "iterations_bspline", int, ("transformModel", (BSPLINE,)), _NOT_BSPLINE),
    )
    combo_bindings = ("metric,model", "transformModel")

    def combo_items(self, status) -> dict:
        """The metric selector (:func:`metric_items`) and the transformation models."""
        if not status.available:
            return {"metric,model": [((LEARNED, ""), "Not available", status.reason)],
                    "transformModel": list(TRANSFORM_ITEMS)}
        return {"metric,model": metric_items(status), "transformModel": list(TRANSFORM_ITEMS)}

    def resolve(self, values: dict, status) -> dict:
        """A learned metric without a model (or with one that is no longer installed) gets the default learned
        metric ("" when none is installed); mutual information runs without a model. A model given as a
        folder path stays."""
        values = dict(values)
        if values.get("metric") == LEARNED:
            model = values.get("model") or ""
            if model not in [m.value for m in status.models] and not (model and Path(model).expanduser().is_dir()):
                values["model"] = default_learned_model(status)
        elif "model" in values:
            values["model"] = ""
        return values

    def problem(self, values: dict, status) -> str | None:
        """Unknown metric or transformation model; a learned metric while none is installed."""
        metric = values.get("metric")
        if metric not in METRICS:
            return f"Unknown metric '{metric}': choose one of {', '.join(METRICS)}."
        if values.get("transformModel") not in (BSPLINE, SIMILARITY):
            return (f"Unknown transformation model '{values.get('transformModel')}': choose '{BSPLINE}' or "
                    f"'{SIMILARITY}'.")
        if metric == LEARNED and not status.models and not values.get("model"):
            return ("No learned metric is installed: choose mutual information, or train a learned metric with the "
                    "RegistrationTraining module (method 'metric', on aligned pairs).")
        return None

    def info_text(self, values: dict, status) -> str:
        """What the chosen metric is: the learned model's modalities and description, or the MI variant."""
        if not status.available:
            return ""
        values = self.resolve(values, status)
        metric = values.get("metric")
        if metric == MI:
            return (f"Mutual information ({mi_bins(status)} bins) over the whole overlap of the images: works for any "
                    "pair of modalities without a trained model.")
        if metric == MI_MASKED:
            return ("Mutual information over the foreground of both images only: large empty or padded regions do "
                    "not dilute it.")
        by_name = {m.value: m for m in status.models}
        choice = by_name.get(values.get("model"))
        if choice is None:
            return self.problem(values, status) or f"Learned metric from the folder {values.get('model')}."
        modalities = modality_label(model_modalities(choice))
        head = f"Learned metric '{choice.value}'" + (f", trained on {modalities} pairs" if modalities else "")
        description = _first_sentence(choice.tooltip)
        return f"{head}. {description}" if description else f"{head}."


#: The module's method-specific options (used by its Logic and Widget, and by the panel rendering).
METHOD_OPTIONS = MetricOptions()
