"""Combo boxes filled at run time and bound to string parameters of a module's parameter node.

Slicer's ``parameterNodeWrapper`` binds a ``QComboBox`` only to a fixed ``Choice`` list whose
values are the item texts. Lists that change at run time (models found by the engine, devices
of this computer, trainable methods) are bound here instead: such a combo box carries the
dynamic property ``MMRegParameterName`` (:data:`~MMRegCommonLib.parameters.COMBO_PROPERTY`)
in the module's ``.ui`` file; each item's *data* is the value stored in the parameter node and
its text is the label shown. Used by every module's Widget (method modules and
RegistrationTraining).

One combo box may choose several parameters at once: its property lists them separated by
commas (``"metric,model"``: the LearnedMetric selector picks a similarity and, for a learned
one, its model). Its items' data then hold one value per parameter (:func:`encode_choice`),
and choosing an item sets all of them in one modification of the parameter node.

A list of nodes (``list[vtkMRML...Node]``, e.g. the target volumes of a label propagation) is
shown by a ``qMRMLCheckableNodeComboBox`` carrying ``MMRegNodeListParameterName``
(:data:`~MMRegCommonLib.parameters.NODE_LIST_PROPERTY`): :class:`NodeListCombos` keeps its
checked nodes and the parameter's list the same, both ways.
"""
from __future__ import annotations

import json

from .parameters import COMBO_PROPERTY, NODE_LIST_PROPERTY


def combo_names(binding: str) -> tuple:
    """The parameter names of a combo box's :data:`COMBO_PROPERTY` value (``"metric,model"`` -> two names)."""
    return tuple(name.strip() for name in str(binding or "").split(",") if name.strip())


def encode_choice(value) -> str:
    """Item data for a value: a string as it is; a tuple or list (one value per parameter of a combo box
    bound to several) as a JSON list."""
    if isinstance(value, (tuple, list)):
        return json.dumps([str(v) for v in value])
    return str(value)


def decode_choice(data, count: int) -> tuple:
    """The ``count`` parameter values of an item's data (inverse of :func:`encode_choice`; ``count`` 1: the
    string itself). Data that does not hold ``count`` values gives empty strings."""
    text = str(data or "")
    if count == 1:
        return (text,)
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    if not isinstance(values, list) or len(values) != count:
        return ("",) * count
    return tuple(str(v) for v in values)


class ParameterCombos:
    """The run-time-filled combo boxes of one panel, by their binding (the :data:`COMBO_PROPERTY` value:
    a parameter name, or several separated by commas).

    ``widgets``: the panel's widgets (e.g. ``slicer.util.childWidgetVariables(ui).__dict__.values()``);
    every one with the :data:`COMBO_PROPERTY` dynamic property is bound to its parameter(s).
    ``on_change(binding)`` (optional) is called after the user changed a combo box (the parameter
    node already holds the new values).
    """

    def __init__(self, widgets, on_change=None):
        self.combos = {}
        self._names = {}
        self._parameterNode = None
        self._updating = False
        self._on_change = on_change
        for widget in widgets:
            binding = widget.property(COMBO_PROPERTY) if hasattr(widget, "property") else None
            if binding:
                self.combos[binding] = widget
                self._names[binding] = combo_names(binding)
                widget.connect("currentIndexChanged(int)", lambda index, b=binding: self._changed(b))

    def __contains__(self, binding) -> bool:
        return binding in self.combos

    def __getitem__(self, name):
        return self.combos[name]

    def set_parameter_node(self, parameterNode) -> None:
        """Bind to ``parameterNode`` (a parameterNodeWrapper instance, or None) and show its values."""
        self._parameterNode = parameterNode
        self.update()

    def fill(self, name: str, items) -> None:
        """Replace the items of combo box ``name`` (its binding) with ``[(value, label, tooltip), ...]`` and
        reselect the parameter node's value (the first item when the value is not among them). A combo
        box bound to several parameters takes tuples of values, one per parameter."""
        import qt
        combo = self.combos[name]
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for value, label, tooltip in items:
            combo.addItem(label, encode_choice(value))
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
            for binding, combo in self.combos.items():
                value = encode_choice([getattr(self._parameterNode, n) for n in self._names[binding]]
                                      if len(self._names[binding]) > 1 else getattr(self._parameterNode, binding))
                combo.currentIndex = next((i for i in range(combo.count) if (combo.itemData(i) or "") == value), 0)
        finally:
            self._updating = False

    def _changed(self, binding: str) -> None:
        if self._updating or self._parameterNode is None:
            return
        combo = self.combos[binding]
        names = self._names[binding]
        values = decode_choice(combo.itemData(combo.currentIndex), len(names))
        node = getattr(self._parameterNode, "parameterNode", None)  # one Modified event for all values
        state = node.StartModify() if node is not None else None
        try:
            for name, value in zip(names, values):
                setattr(self._parameterNode, name, value)
        finally:
            if node is not None:
                node.EndModify(state)
        if self._on_change is not None:
            self._on_change(binding)


class NodeListCombos:
    """The checkable node selectors of one panel, each bound to a list-of-nodes parameter (its
    :data:`~MMRegCommonLib.parameters.NODE_LIST_PROPERTY` value).

    ``widgets``: the panel's widgets; every ``qMRMLCheckableNodeComboBox`` with the property is bound:
    checking or unchecking a node writes the checked nodes (in the selector's order) into the
    parameter, and a change of the parameter node checks exactly the nodes of the list (None entries,
    nodes removed from the scene, are ignored). ``on_change(name)`` (optional) is called after the
    user changed a selector.
    """

    def __init__(self, widgets, on_change=None):
        self.combos = {}
        self._parameterNode = None
        self._updating = False
        self._on_change = on_change
        for widget in widgets:
            name = widget.property(NODE_LIST_PROPERTY) if hasattr(widget, "property") else None
            if name:
                self.combos[name] = widget
                widget.connect("checkedNodesChanged()", lambda n=name: self._changed(n))

    def __contains__(self, name) -> bool:
        return name in self.combos

    def set_parameter_node(self, parameterNode) -> None:
        """Bind to ``parameterNode`` (a parameterNodeWrapper instance, or None) and show its lists."""
        self._parameterNode = parameterNode
        self.update()

    def update(self) -> None:
        """Check in every selector exactly the nodes of its parameter's list."""
        if self._parameterNode is None:
            return
        import qt
        self._updating = True
        try:
            for name, combo in self.combos.items():
                wanted = {node.GetID() for node in getattr(self._parameterNode, name) if node is not None}
                wasBlocked = combo.blockSignals(True)
                try:
                    for index in range(combo.nodeCount()):
                        node = combo.nodeFromIndex(index)
                        state = qt.Qt.Checked if node is not None and node.GetID() in wanted else qt.Qt.Unchecked
                        if node is not None and combo.checkState(node) != state:
                            combo.setCheckState(node, state)
                finally:
                    combo.blockSignals(wasBlocked)
        finally:
            self._updating = False

    def _changed(self, name: str) -> None:
        if self._updating or self._parameterNode is None:
            return
        setattr(self._parameterNode, name, list(self.combos[name].checkedNodes()))
        if self._on_change is not None:
            self._on_change(name)
