"""Module metadata shared by the method modules (what Slicer shows in its module list and Help)."""
from __future__ import annotations

CATEGORY = "Registration.Learning-based"
CONTRIBUTORS = ["MultiModalRegistration contributors"]
ACKNOWLEDGEMENT = ("Part of the MultiModalRegistration extension (Apache-2.0). The engine (mmreg) uses PyTorch, "
                   "MONAI and SimpleITK; Slicer's PyTorch extension provides torch.")


def configure_module(parent, module_name: str, title: str, method: str, summary: str, usage: str | None = None,
                     dependencies=()) -> None:
    """Fill a module's ``parent`` (title, categories, dependencies, contributors, help, acknowledgement).

    ``module_name``: the module's name (its class name); ``method``: the engine method it runs;
    ``summary``: one paragraph on the method for the Help section. ``usage``: the Help text after
    the summary (HTML); None gives the method modules' text (inputs, results, Python console).
    ``dependencies``: names of modules this one uses.
    """
    parent.title = title
    parent.categories = [CATEGORY]
    parent.dependencies = list(dependencies)
    parent.contributors = list(CONTRIBUTORS)
    parent.acknowledgementText = ACKNOWLEDGEMENT
    if usage is not None:
        parent.helpText = f"<p>{summary}</p>{usage}"
        return
    parent.helpText = (
        f"<p>{summary}</p>"
        "<p><b>Use</b>: choose the fixed volume (stays in place) and the moving volume (deformed onto it); "
        "optionally a moving segmentation (warped with the image) and a fixed segmentation (only for scoring: "
        "Dice per segment, matched by name). Apply runs the registration; Cancel stops it and leaves the scene "
        "unchanged.</p>"
        "<p><b>Results</b>: a grid transform (fixed to moving: Slicer's 'from parent' direction; the moving "
        "volume is placed under it so it overlays the fixed one), the moving volume and segmentation resampled "
        "on the fixed grid, and the runtime, folding % (Jacobian determinant &le; 0) and Dice per segment.</p>"
        f"<p><b>Python console</b>: <code>logic = slicer.util.getModuleLogic('{module_name}'); "
        "outcome = logic.run(fixedVolume, movingVolume, movingSegmentation)</code>. On files, without Slicer: "
        f"<code>mmreg register FIXED MOVING --method {method}</code>.</p>")
