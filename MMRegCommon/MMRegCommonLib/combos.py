"""Combo boxes filled at run time and bound to string parameters of a module's parameter node.

Slicer's ``parameterNodeWrapper`` binds a ``QComboBox`` only to a fixed ``Choice`` list whose
values are the item texts. Lists that change at run time (models found by the engine, devices
of this computer, trainable methods) are bound here instead: such a combo box carries the
dynamic property ``MMRegParameterName`` (:data:`~MMRegCommonLib.parameters.COMBO_PROPERTY`)
in the module's ``.ui`` file; each item's *data* is the value stored in the parameter node and
its text is the label shown. Used by every module's Widget (method modules and
RegistrationTraining).
"""
from __future__ import annotations

from .parameters import COMBO_PROPERTY


class ParameterCombos:
    """The run-time-filled combo boxes of one panel, by parameter name.

    ``widgets``: the panel's widgets (e.g. ``slicer.util.childWidgetVariables(ui).__dict__.values()``);
    every one with the :data:`COMBO_PROPERTY` dynamic property is bound to that parameter.
    ``on_change(name)`` (optional) is called after the user changed a combo box (the parameter
    node already holds the new value).
    """

    def __init__(self, widgets, on_change=None):
        self.combos = {}
        self._parameterNode = None
        self._updating = False
        self._on_change = on_change
        for widget in widgets:
            name = widget.property(COMBO_PROPERTY) if hasattr(widget, "property") else None
            if name:
                self.combos[name] = widget
                widget.connect("currentIndexChanged(int)", lambda index, n=name: self._changed(n))

    def __getitem__(self, name):
        return self.combos[name]

    def set_parameter_node(self, parameterNode) -> None:
        """Bind to ``parameterNode`` (a parameterNodeWrapper instance, or None) and show its values."""
        self._parameterNode = parameterNode
        self.update()

    def fill(self, name: str, items) -> None:
        """Replace the items of combo box ``name`` with ``[(value, label, tooltip), ...]`` and reselect
        the parameter node's value (the first item when the value is not among them)."""
        import qt
        combo = self.combos[name]
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for value, label, tooltip in items:
            combo.addItem(label, value)
            if tooltip:
                combo.setItemData(combo.count - 1, tooltip, qt.Qt.ToolTipRole)
        combo.blockSignals(wasBlocked)
        self.update()

    def update(self) -> None:
        """Select in every combo box the item whose data is the parameter node's value."""
        if self._parameterNode is None:
            return
        self._updating = True
        try:
            for name, combo in self.combos.items():
                value = getattr(self._parameterNode, name)
                combo.currentIndex = next((i for i in range(combo.count) if (combo.itemData(i) or "") == value), 0)
        finally:
            self._updating = False

    def _changed(self, name: str) -> None:
        if self._updating or self._parameterNode is None:
            return
        combo = self.combos[name]
        setattr(self._parameterNode, name, combo.itemData(combo.currentIndex) or "")
        if self._on_change is not None:
            self._on_change(name)
