"""The engine's Python dependencies inside Slicer: check, ask, install.

* torch comes from Slicer's PyTorch extension (``PyTorchUtils``), which installs the build
  that matches the computer's GPU driver; this extension depends on it.
* Other packages the engine needs and Slicer lacks (MONAI; SciPy on Slicer builds without
  it) are installed with ``slicer.util.pip_install`` on first use, after the user agreed.
  They are installed with ``--no-deps`` so that pip can never pull in another numpy or torch.
* Slicer's own numpy, SimpleITK and VTK are never installed, upgraded or replaced: a missing
  or too old one is reported (update Slicer) instead.

:func:`plan_dependencies` is the decision (plain data in, plain data out, unit-tested
without Slicer); :func:`ensure_dependencies` carries it out inside Slicer.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
from dataclasses import dataclass, field

#: Packages that belong to Slicer itself: never installed or upgraded by this extension.
PROTECTED = frozenset({"numpy", "simpleitk", "vtk"})


@dataclass(frozen=True)
class Requirement:
    """A package the engine needs: pip name, import name, minimum version and where it comes from.

    ``source``: "pytorch-extension" (torch, through PyTorchUtils), "pip" (installed after asking)
    or "slicer" (part of Slicer; only checked).
    """

    name: str
    import_name: str
    minimum: str | None
    source: str

    @property
    def specifier(self) -> str:
        """The pip requirement string, e.g. ``monai>=1.4``."""
        return f"{self.name}>={self.minimum}" if self.minimum else self.name


#: What the engine (mmreg) needs inside Slicer; keep in step with pyproject.toml.
REQUIREMENTS = (
    Requirement("torch", "torch", "2.2", "pytorch-extension"),
    Requirement("monai", "monai", "1.4", "pip"),
    Requirement("scipy", "scipy", "1.10", "pip"),
    Requirement("numpy", "numpy", "1.24", "slicer"),
    Requirement("SimpleITK", "SimpleITK", "2.3", "slicer"),
    Requirement("vtk", "vtk", None, "slicer"),
)


@dataclass
class DependencyPlan:
    """What :func:`plan_dependencies` decided.

    ``torch``: None when fine, else why it must be installed/updated through the PyTorch
    extension. ``pip``: requirement strings to install with pip (after asking). ``refused``:
    sentences about packages this extension will not touch (Slicer's own).
    """

    torch: str | None = None
    pip: list = field(default_factory=list)
    refused: list = field(default_factory=list)

    @property
    def satisfied(self) -> bool:
        """True when nothing is missing."""
        return self.torch is None and not self.pip and not self.refused


def _version_tuple(version: str) -> tuple:
    parts = []
    for piece in re.split(r"[.+-]", version):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def is_older(version: str, minimum: str | None) -> bool:
    """True when ``version`` is older than ``minimum`` (numeric comparison of the release parts)."""
    return bool(minimum) and _version_tuple(version) < _version_tuple(minimum)


def installed_versions(requirements=REQUIREMENTS) -> dict:
    """``{import name: version, "" when importable but unversioned, None when missing}``; imports nothing."""
    out = {}
    for req in requirements:
        if importlib.util.find_spec(req.import_name) is None:
            out[req.import_name] = None
            continue
        try:
            out[req.import_name] = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            out[req.import_name] = ""  # importable, version unknown (e.g. Slicer's own VTK build): accepted
    return out


def plan_dependencies(installed: dict, requirements=REQUIREMENTS) -> DependencyPlan:
    """Decide what to install from ``installed`` (``{import name: version, "" (unknown: accepted) or None}``).

    Missing or too old: torch -> ``plan.torch`` (the PyTorch extension installs it); a "pip"
    package -> ``plan.pip`` (unless it is one of :data:`PROTECTED`, which is refused whatever
    its source says); a "slicer" package -> ``plan.refused``.
    """
    plan = DependencyPlan()
    for req in requirements:
        version = installed.get(req.import_name)
        missing = version is None
        if not missing and (not version or not is_older(version, req.minimum)):
            continue
        state = "is missing" if missing else f"{version} is older than the {req.minimum} the engine needs"
        if req.source == "pytorch-extension":
            plan.torch = f"PyTorch {state}"
        elif req.source == "pip" and req.name.lower() not in PROTECTED:
            plan.pip.append(req.specifier)
        else:
            plan.refused.append(f"{req.name} {state}; it is part of Slicer and this extension never installs or "
                                "replaces it. Use a recent Slicer release.")
    return plan


def describe_plan(plan: DependencyPlan) -> str:
    """The question shown before installing (or the explanation when nothing can be installed)."""
    lines = []
    if plan.torch:
        lines.append(f"{plan.torch}: it is installed by Slicer's PyTorch extension (a few GB download).")
    if plan.pip:
        lines.append("These Python packages will be installed with pip: " + ", ".join(plan.pip) + ".")
    lines.extend(plan.refused)
    return "\n".join(lines)


def _install_torch(minimum: str | None) -> bool:
    """Install torch through the PyTorch extension's PyTorchUtils; False when the extension is missing."""
    try:
        import PyTorchUtils
    except ImportError:
        return False
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=f">={minimum}" if minimum else None)
    return torch is not None


def ensure_dependencies(confirm=None, pip_install=None, installed: dict | None = None,
                        requirements=REQUIREMENTS) -> tuple:
    """Check the engine's dependencies and, after the user agreed, install what is missing.

    ``confirm(text) -> bool`` asks (default ``slicer.util.confirmOkCancelDisplay``);
    ``pip_install(args)`` installs (default ``slicer.util.pip_install``, given
    ``[requirement, ..., "--no-deps"]``). Returns ``(ok, message)``: ``ok`` False when the
    user declined, a Slicer package is refused, or the PyTorch extension is missing; the
    message then says what to do.
    """
    import slicer
    confirm = confirm or slicer.util.confirmOkCancelDisplay
    pip_install = pip_install or slicer.util.pip_install
    plan = plan_dependencies(installed_versions(requirements) if installed is None else installed, requirements)
    if plan.satisfied:
        return True, ""
    if plan.refused:
        return False, describe_plan(plan)
    if not confirm(describe_plan(plan) + "\n\nInstall now? Slicer may need a restart afterwards."):
        return False, "The engine's dependencies were not installed; the registration cannot run without them."
    if plan.torch:
        minimum = next((r.minimum for r in requirements if r.source == "pytorch-extension"), None)
        if not _install_torch(minimum):
            return False, ("PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager, restart "
                           "Slicer, and click Apply again.")
    if plan.pip:
        logging.info("Installing %s", ", ".join(plan.pip))
        pip_install(list(plan.pip) + ["--no-deps"])
    importlib.invalidate_caches()
    return True, ""
