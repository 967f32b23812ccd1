"""The framework shared by the method modules of the MultiModalRegistration extension.

A method module (e.g. ``MIRegistration``) is a set of thin subclasses:

* :class:`~MMRegCommonLib.parameters.RegistrationParameters`: the parameter node's fields;
* :class:`~MMRegCommonLib.logic.RegistrationLogic`: one call from MRML nodes to outputs;
* :class:`~MMRegCommonLib.widget.RegistrationWidget`: the common panel from the module's .ui;
* :class:`~MMRegCommonLib.testing.RegistrationModuleTest`: the self-test;
* :func:`~MMRegCommonLib.module.configure_module`: title, category, help, acknowledgement.

Pure helpers (no Qt): :mod:`~MMRegCommonLib.panel` (what the panel shows),
:mod:`~MMRegCommonLib.networkoptions` (model selector, default model and refinement similarity of the
network methods' modules) and :mod:`~MMRegCommonLib.dependencies` (torch through the PyTorch
extension, other packages by pip after asking). The engine (``mmreg``, which needs torch) is imported only when used, so the
modules load before their dependencies are installed.
"""
