"""Registry of registration methods, by the names used everywhere (command line, API, modules).

Names are fixed across the project: ``optimize`` (instance optimisation), ``mi``, ``grad``,
``metric``, ``disentangled``, ``multiscale``. A method appears here when it is implemented.
"""
from __future__ import annotations

import importlib

from ..errors import InputError
from .base import GridInputs, RegistrationMethod, TrainingSpec

#: name -> "module:class" of the implementation (imported on first use).
_METHODS = {
    "optimize": "mmreg.methods.optimize:InstanceOptimisation",
    "mi": "mmreg.methods.mi:MIRegistration",
    "metric": "mmreg.methods.metric:LearnedMetricRegistration",
    "multiscale": "mmreg.methods.multiscale:MultiscaleRegistration",
    "grad": "mmreg.methods.grad:GradRegistration",
    "disentangled": "mmreg.methods.disentangled:DisentangledRegistration",
}
#: Names reserved for methods that later releases add (shown in error messages).
PLANNED: tuple = ()


def method_names() -> list:
    """Names of the installed methods."""
    return list(_METHODS)


def get_method(name: str) -> RegistrationMethod:
    """The method object registered under ``name``; :class:`InputError` for unknown names."""
    if name not in _METHODS:
        planned = f" '{name}' is planned but not available in this version." if name in PLANNED else ""
        raise InputError(f"Unknown registration method '{name}'.{planned} Available: "
                         f"{', '.join(method_names())} (see `mmreg methods`).")
    module_name, cls_name = _METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)()


def describe_methods() -> list:
    """One dict per installed method: name, description, modalities, models, default options."""
    out = []
    for name in method_names():
        method = get_method(name)
        out.append({"name": name, "description": method.description, "modalities": method.modalities,
                    "requires_model": method.requires_model, "models": method.models(),
                    "options": method.default_options()})
    return out


def trainable_methods() -> list:
    """Names of the installed methods that ``mmreg train`` can train (they have a training spec)."""
    return [name for name in method_names() if get_method(name).training_spec() is not None]


__all__ = ["GridInputs", "RegistrationMethod", "TrainingSpec", "trainable_methods", "get_method", "method_names", "describe_methods", "PLANNED"]
