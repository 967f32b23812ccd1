"""Render a module's .ui file offscreen with PySide6 to a PNG (for the docs and for review).

    python Testing/modules/render_ui.py                       # every module -> docs/<Module>_panel.png
    python Testing/modules/render_ui.py MIRegistration -o out.png

Slicer's and CTK's widgets do not exist outside Slicer, so for the picture only they are
replaced by plain Qt stand-ins that keep their class name visible: ``ctkCollapsibleButton`` ->
``QGroupBox`` (titled "<text>"), ``qMRMLNodeComboBox`` -> ``QComboBox`` showing its
"none" text followed by "(qMRMLNodeComboBox)", ``qMRMLCheckableNodeComboBox`` -> ``QComboBox``
showing "Check volumes (qMRMLCheckableNodeComboBox)", ``qMRMLWidget`` -> ``QWidget``. The run-time
parts are filled as the module fills them: the method's description or the reason it is not
available, the model and device lists, the Apply button's state and reason (from
``MMRegCommonLib.panel``, i.e. from the installed engine), the controls bound to parameters show
the parameter node's defaults (the module is imported with the headless framework of
``slicer_framework``), a module's method-specific controls (``<Module>Lib/options.py``:
``METHOD_OPTIONS``) get their lists (those that follow the current choices too, e.g. a direction built
from the chosen model), enabled states and info line, and shared option rows the
method lacks are hidden, and a label-propagation section shows why its button is disabled
(``MMRegCommonLib.panel.propagation_state``); for RegistrationTraining the data
sources, trainable methods, base models, Start/Resume state and its reason (from
``RegistrationTrainingLib.panelstate``), with the scene-pairs part shown, as on first use. Needs PySide6 (``pip install
PySide6-Essentials``); uses ``QT_QPA_PLATFORM=offscreen``.
"""
from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Custom widget -> (stand-in class, property renames, properties kept).
STAND_INS = {
    "qMRMLWidget": ("QWidget", {}, None),
    "ctkCollapsibleButton": ("QGroupBox", {"text": "title"}, {"text", "toolTip", "enabled"}),
    "qMRMLNodeComboBox": ("QComboBox", {}, {"toolTip", "enabled"}),
    "qMRMLCheckableNodeComboBox": ("QComboBox", {}, {"toolTip", "enabled"}),
}
#: Text shown by the stand-in of a checkable node selector (it has no "none" entry).
CHECKABLE_TEXT = "Check volumes"


def _string_property(element, name):
    for prop in element.findall("property"):
        if prop.get("name") == name and prop.find("string") is not None:
            return prop.find("string").text or ""
    return None


def stand_in_ui(ui_path: Path) -> bytes:
    """The .ui XML with Slicer/CTK widgets replaced by plain Qt stand-ins (see the module docstring)."""
    tree = ET.parse(ui_path)
    root = tree.getroot()
    for element in root.iter("widget"):
        original = element.get("class")
        if original not in STAND_INS:
            continue
        cls, renames, kept = STAND_INS[original]
        element.set("class", cls)
        none_text = _string_property(element, "noneDisplay")
        for prop in list(element.findall("property")):
            if kept is not None and prop.get("name") not in kept and prop.get("stdset") != "0":
                element.remove(prop)
            elif prop.get("name") in renames:
                prop.set("name", renames[prop.get("name")])
        if original in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox"):
            item = ET.SubElement(element, "item")
            text = ET.SubElement(ET.SubElement(item, "property", name="text"), "string")
            shown = CHECKABLE_TEXT if original == "qMRMLCheckableNodeComboBox" else none_text or "Select"
            text.text = f"{shown}  ({original})"
    for tag in ("customwidgets", "connections"):
        for child in root.findall(tag):
            root.remove(child)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _parameter_defaults(module_name: str) -> dict:
    """``{parameter: default}`` of the module's parameter node class ({} when it cannot be imported)."""
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO / module_name), str(REPO / "MMRegCommon")]
    try:
        import importlib

        import slicer_framework
        slicer_framework.install()
        module = importlib.import_module(module_name)
    except ImportError:
        return {}
    cls = getattr(module, f"{module_name}ParameterNode", None)
    return {name: p.default for name, p in getattr(cls, "allParameters", {}).items() if not p.is_node}


def _show_defaults(widget, defaults: dict) -> None:
    """Set each control bound by ``SlicerParameterName`` to its parameter's default (as the binding does)."""
    from PySide6 import QtWidgets
    for child in widget.findChildren(QtWidgets.QWidget):
        name = child.property("SlicerParameterName")
        if name not in defaults:
            continue
        value = defaults[name]
        if isinstance(child, (QtWidgets.QSpinBox, QtWidgets.QDoubleSpinBox)):
            child.setValue(value)
        elif isinstance(child, QtWidgets.QCheckBox):
            child.setChecked(bool(value))
        elif isinstance(child, QtWidgets.QLineEdit):
            child.setText(str(value))


def _method_options(module_name: str):
    """The module's ``METHOD_OPTIONS`` (``<Module>Lib/options.py``), or None."""
    if not (REPO / module_name / f"{module_name}Lib" / "options.py").is_file():
        return None
    import importlib
    return getattr(importlib.import_module(f"{module_name}Lib.options"), "METHOD_OPTIONS", None)


def _fill_method_options(widget, options, status, defaults: dict) -> None:
    """The method-specific controls as the framework's Widget shows them with the default parameters."""
    from PySide6 import QtWidgets
    from MMRegCommonLib.combos import combo_names, encode_choice
    from MMRegCommonLib.methodoptions import combined_state
    from MMRegCommonLib.parameters import COMBO_PROPERTY
    values = options.resolve({name: defaults.get(name, "") for name in options.parameters}, status)
    combos = {c.property(COMBO_PROPERTY): c for c in widget.findChildren(QtWidgets.QComboBox)
              if c.property(COMBO_PROPERTY)}
    items_by_binding = dict(options.combo_items(status), **options.value_combo_items(values, status))
    for binding, items in items_by_binding.items():
        combo = combos[binding]
        combo.clear()
        for value, label, tooltip in items:
            combo.addItem(label, encode_choice(value))
            if tooltip:
                combo.setItemData(combo.count() - 1, tooltip, 3)  # Qt.ToolTipRole
        names = combo_names(binding)
        current = encode_choice([values[n] for n in names] if len(names) > 1 else values[binding])
        combo.setCurrentIndex(max(0, combo.findData(current)))
    states = options.control_states(values, status)
    for child in widget.findChildren(QtWidgets.QWidget):
        names = combo_names(child.property("SlicerParameterName") or child.property(COMBO_PROPERTY) or "")
        state = combined_state(states, names)
        if state is not None:
            child.setEnabled(state[0])
    info = widget.findChild(QtWidgets.QLabel, "methodOptionsInfoLabel")
    if info is not None:
        info.setText(options.info_text(values, status))


def _fill_run_time_state(widget, module_name: str, method: str | None = None) -> None:
    """Fill what the framework fills in Slicer, from the same pure functions (engine status, devices)."""
    from PySide6 import QtWidgets
    sys.path[:0] = [str(REPO / "MMRegCommon")]
    try:
        from MMRegCommonLib import panel
    except ImportError:
        return
    method = method or _module_method(module_name)
    status = panel.method_status(method) if method else None
    find = lambda cls, name: widget.findChild(cls, name)  # noqa: E731
    defaults = _parameter_defaults(module_name)
    _show_defaults(widget, defaults)
    if status is not None:
        find(QtWidgets.QLabel, "methodInfoLabel").setText(status.description if status.available else status.reason)
        model = find(QtWidgets.QComboBox, "modelComboBox")
        if model is not None:  # (a module whose own controls choose the model has none)
            model.clear()
            for value, label, _ in panel.model_items(status):
                model.addItem(label, value)
            model.setEnabled(status.available and bool(status.models))
        options = _method_options(module_name)
        if options is not None:
            _fill_method_options(widget, options, status, defaults)
        visible = panel.shared_control_visibility(status)
        for name in ("refinementStepsSpinBox", "refinementStepsLabel"):
            find(QtWidgets.QWidget, name).setVisible(visible["refinementSteps"])
        find(QtWidgets.QWidget, "diffeomorphicCheckBox").setVisible(visible["diffeomorphic"])
        find(QtWidgets.QSpinBox, "refinementStepsSpinBox").setEnabled(status.supports_refinement)
        model_value = ""  # the model Apply runs: a module's own model selector resolves "" to its default
        if options is not None and options.controls_parameter("model") and status.available:
            values = {name: defaults.get(name, "") for name in options.parameters}
            model_value = options.resolve(values, status).get("model") or ""
        enabled, checked, tip = panel.diffeomorphic_control(status, model_value)
        box = find(QtWidgets.QCheckBox, "diffeomorphicCheckBox")
        box.setEnabled(enabled)
        box.setToolTip(tip)
        if checked is not None:
            box.setChecked(checked)
        symmetric = find(QtWidgets.QCheckBox, "symmetricCheckBox")
        symmetric.setVisible(visible["symmetric"])
        enabled, tip = panel.symmetric_control(status, model_value)
        symmetric.setEnabled(enabled)
        symmetric.setToolTip(tip)
        enabled, reason = panel.apply_state(status, None, None)
        find(QtWidgets.QPushButton, "applyButton").setEnabled(enabled)
        find(QtWidgets.QLabel, "statusLabel").setText(reason)
        propagate = find(QtWidgets.QPushButton, "propagateButton")
        if propagate is not None:  # the label-propagation section, with nothing selected yet
            enabled, reason = panel.propagation_state(status, None, None, [])
            propagate.setEnabled(enabled)
            find(QtWidgets.QLabel, "propagationStatusLabel").setText(reason)
    device = find(QtWidgets.QComboBox, "deviceComboBox")
    device.clear()
    for value, label in panel.device_choices():
        device.addItem(label, value)


def _fill_training_state(widget, module_name: str) -> None:
    """What RegistrationTraining's Widget fills in on first use (no pairs yet, default parameters)."""
    from PySide6 import QtWidgets
    sys.path[:0] = [str(REPO / module_name), str(REPO / "MMRegCommon")]
    from MMRegCommonLib import panel
    from RegistrationTrainingLib import panelstate
    find = lambda cls, name: widget.findChild(cls, name)  # noqa: E731

    def fill(name, items):
        combo = find(QtWidgets.QComboBox, name)
        combo.clear()
        for value, label, tooltip in items:
            combo.addItem(label, value)
            if tooltip:
                combo.setItemData(combo.count() - 1, tooltip, 3)  # Qt.ToolTipRole

    try:
        import mmreg
        from mmreg.models import default_model_name, list_models
        try:
            from mmreg.training import trainable_methods
        except ImportError:  # (an engine that has it only in mmreg.methods)
            from mmreg.methods import trainable_methods
        methods = list(trainable_methods())
    except ImportError:
        methods = []
    method = methods[0] if methods else ""
    models = list_models(method) if method else []
    default = default_model_name([m["name"] for m in models]) if method else None
    fill("dataSourceComboBox", panelstate.DATA_SOURCES)
    fill("methodComboBox", panelstate.method_items(methods))
    fill("baseModelComboBox", panelstate.base_model_items(models, default))
    fill("deviceComboBox", [(value, label, "") for value, label in panel.device_choices()])
    find(QtWidgets.QLabel, "methodInfoLabel").setText(mmreg.get_method(method).description if method else
                                                      "The engine cannot be loaded.")
    name = find(QtWidgets.QLineEdit, "modelNameLineEdit").text() or "my_model"
    if method:
        from mmreg.models import portable_model_path
        from mmreg.training import default_output  # (shown without this machine's home folder)
        find(QtWidgets.QLabel, "outputInfoLabel").setText(f"Saved to {portable_model_path(default_output(method, name))}")
    find(QtWidgets.QLabel, "pairsHintLabel").setText(panelstate.pairs_hint(method))
    for hidden in ("manifestLabel", "manifestWidget"):  # data source "scene" (the default)
        find(QtWidgets.QWidget, hidden).setVisible(False)
    table = find(QtWidgets.QTableWidget, "pairsTableWidget")
    table.setColumnCount(4)
    table.setHorizontalHeaderLabels(["Fixed", "Moving", "Fixed labels", "Moving labels"])
    table.horizontalHeader().setSectionResizeMode(QtWidgets.QHeaderView.Stretch)
    enabled, reason = panelstate.start_state(engine_missing=not methods, methods=methods, method=method,
                                             source="scene", manifest_path="", pair_count=0, name=name,
                                             existing_names=[m["name"] for m in models], resumable=False,
                                             running=False)
    find(QtWidgets.QPushButton, "startButton").setEnabled(enabled)
    for name_ in ("showLossButton", "showDiceButton"):  # no run yet
        find(QtWidgets.QPushButton, name_).setEnabled(False)
    find(QtWidgets.QLabel, "statusLabel").setText(reason)
    users = [m["name"] for m in models if m["source"] == "user"]
    fill("userModelComboBox", [(n, n, "") for n in users])
    for name_ in ("renameButton", "deleteButton"):
        find(QtWidgets.QPushButton, name_).setEnabled(bool(users))
    find(QtWidgets.QLabel, "modelsInfoLabel").setText(f"{len(users)} fine-tuned model(s) of '{method}'." if users
                                                      else f"No fine-tuned model of '{method}' yet.")


def _module_method(module_name: str) -> str | None:
    """The METHOD constant of the module's .py file, read without importing it (no Slicer needed)."""
    source = (REPO / module_name / f"{module_name}.py").read_text()
    for line in source.splitlines():
        if line.startswith("METHOD = "):
            return line.split("=", 1)[1].strip().strip("\"'")
    return None


def render(module_name: str, png_path: Path, width: int = 440, method: str | None = None) -> Path:
    """Render ``<module>/Resources/UI/<module>.ui`` to ``png_path``; returns the path.

    ``method``: show the state for another engine method than the module's (e.g. "optimize", to
    see the panel of an available method while the module's own is not in the engine yet).
    """
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtCore, QtUiTools, QtWidgets
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    data = QtCore.QByteArray(stand_in_ui(REPO / module_name / "Resources" / "UI" / f"{module_name}.ui"))
    buffer = QtCore.QBuffer(data)
    buffer.open(QtCore.QIODevice.ReadOnly)
    widget = QtUiTools.QUiLoader().load(buffer)
    if widget is None:
        raise RuntimeError(f"PySide6 could not load the .ui of {module_name}")
    if (REPO / module_name / f"{module_name}Lib" / "panelstate.py").is_file():
        _fill_training_state(widget, module_name)
    else:
        _fill_run_time_state(widget, module_name, method)
    widget.resize(width, widget.sizeHint().height())
    app.processEvents()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    if not widget.grab().save(str(png_path)):
        raise RuntimeError(f"Could not write {png_path}")
    return png_path


def main(argv=None) -> int:
    """Command line: render the given modules (default: every module with a .ui) to docs/<Module>_panel.png."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="module folder names (default: all with a Resources/UI/*.ui)")
    parser.add_argument("-o", "--output", type=Path, help="PNG path (one module only)")
    parser.add_argument("--method", help="show the panel's state for this engine method instead of the module's")
    args = parser.parse_args(argv)
    modules = args.modules or sorted(p.parents[2].name for p in REPO.glob("*/Resources/UI/*.ui"))
    for module in modules:
        out = args.output or REPO / "docs" / f"{module}_panel.png"
        print(render(module, out, method=args.method))
    return 0


if __name__ == "__main__":
    sys.exit(main())
