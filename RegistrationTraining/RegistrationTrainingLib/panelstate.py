"""What the RegistrationTraining panel shows, computed without Qt or Slicer (unit-tested headless).

The Widget copies these values into its widgets: the choices of the method, data source and
base model selectors, whether Start and Resume are possible (and why not), and the checks of
a model name. The engine is imported lazily (a module must load before its dependencies are
installed).
"""
from __future__ import annotations

import re

#: Data sources of the panel: (value, label, tooltip).
DATA_SOURCES = (
    ("scene", "Image pairs from the scene",
     "Pairs of volumes loaded in Slicer (with optional segmentations or labelmaps); they are exported to files "
     "for the training process."),
    ("manifest", "Manifest file (CSV or JSON)",
     "A file listing the pairs (columns fixed, moving, fixed_labels, moving_labels, fixed_modality, "
     "moving_modality, split); for cohorts on disk or prepared with a script."),
)
#: Base-model value meaning "train from scratch" (not a valid model name).
FROM_SCRATCH = "-"
#: Methods trained on ALIGNED pairs: each pair is one subject's image in modality A (fixed) and in modality B
#: (moving), already in the same space; the method learns what corresponding points look like in the two
#: modalities (the learned metric), so nothing is registered while it trains and no labels are needed.
ALIGNED_PAIR_METHODS = ("metric",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a model name (None when it can): 1-64 letters, digits, ``_ . -``,
    starting with a letter or digit (it becomes a folder name on every operating system)."""
    name = name or ""
    if not name.strip():
        return "Enter a name for the new model."
    if not _NAME.match(name):
        return (f"Model name '{name}' is not usable as a folder name: use letters, digits, '_', '.' and '-' "
                "(up to 64, starting with a letter or digit).")
    return None


def method_items(methods) -> list:
    """``[(value, label, tooltip)]`` of the method selector from the engine's trainable methods."""
    if not methods:
        return [("", "No trainable method (engine not loaded)", "")]
    out = []
    for name in methods:
        try:
            import mmreg
            description = mmreg.get_method(name).description
        except Exception:  # noqa: BLE001 - the label is enough without the description
            description = ""
        out.append((name, name, description))
    return out


def base_model_items(models, default_name: str | None) -> list:
    """``[(value, label, tooltip)]`` of the base-model selector.

    ``models``: :func:`mmreg.models.list_models` of the method. "" is the method's default model
    (offered when there is one: ``default_name``), :data:`FROM_SCRATCH` a fresh network, then
    every model by name (fine-tuned ones marked).
    """
    items = []
    if default_name:
        items.append(("", f"Default model: {default_name}",
                      "Fine-tune the model the method uses when none is chosen."))
    items.append((FROM_SCRATCH, "None: train from scratch",
                  "A freshly initialised network (needs many pairs and steps)."))
    for m in models:
        label = m["name"] + (" (fine-tuned)" if m.get("source") == "user" else "")
        items.append((m["name"], label, m.get("description") or ""))
    return items


def base_model_value(value: str, default_name: str | None) -> str | None:
    """The engine's ``--base-model`` for a selector value: the default model for "", None for
    :data:`FROM_SCRATCH` (and for "" when the method has no default model), else the value."""
    if value == FROM_SCRATCH:
        return None
    if value == "":
        return default_name or None
    return value


def pairs_hint(method: str) -> str:
    """What the training pairs of ``method`` must be (the data section's note): aligned pairs of two modalities
    for :data:`ALIGNED_PAIR_METHODS`, otherwise pairs to register."""
    if method in ALIGNED_PAIR_METHODS:
        return (f"Method '{method}' learns from ALIGNED pairs: fixed = the image in one modality (e.g. T1 or CT), "
                "moving = the same subject in the other modality (e.g. T2/PD or MR), already in the same space "
                "(register them first). Keep the same modality order in every pair; no labels are needed.")
    return ("Pairs to register: fixed = the image that stays in place, moving = the image the network learns to "
            "deform onto it (another subject or modality). Labels on both are optional; with them the validation "
            "reports Dice.")


def start_state(*, engine_missing: bool, methods, method: str, source: str, manifest_path: str, pair_count: int,
                name: str, existing_names, resumable: bool, running: bool) -> tuple:
    """``(enabled, reason)`` of the Start button; the reason says what is missing when disabled."""
    if running:
        return False, "A training runs; Stop ends it after the current step (it can be resumed)."
    if engine_missing:
        return True, "Start first installs the engine's missing Python packages (after asking)."
    if method not in (methods or []):
        return False, f"Choose a trainable method ({', '.join(methods or []) or 'none available'})."
    if source == "manifest":
        if not (manifest_path or "").strip():
            return False, "Choose the manifest file that lists the training pairs."
    elif pair_count < 1:
        if method in ALIGNED_PAIR_METHODS:
            return False, ("Add at least one aligned pair (fixed = modality A, moving = modality B of the same "
                           "subject, in the same space) with 'Add pair'.")
        return False, "Add at least one pair (fixed and moving volume) with 'Add pair'."
    problem = name_problem(name)
    if problem:
        return False, problem
    if name in set(existing_names or ()):
        return False, (f"A model named '{name}' already exists for method '{method}': choose another name, or "
                       "rename/delete it under 'Trained models'.")
    if resumable:
        return False, f"An unfinished run of '{name}' exists: Resume continues it (or choose another name)."
    return True, f"Ready: Start trains '{name}' in a separate process; Slicer stays usable."


def resume_state(*, resumable: bool, running: bool, name: str) -> tuple:
    """``(enabled, reason)`` of the Resume button."""
    if running:
        return False, "A training runs."
    if not resumable:
        return False, f"No stopped or interrupted run of '{name}' to resume." if name else "Enter the model name."
    return True, f"Resume the run of '{name}' from its last checkpoint."
