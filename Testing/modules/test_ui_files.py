"""Checks of every module's .ui file (Qt Designer XML), and its offscreen rendering.

* every widget class is a Qt class or declared in <customwidgets>;
* object names are unique;
* every parameter of the module's parameter node is bound to exactly one widget, of a kind
  that can show its type (``SlicerParameterName`` for parameterNodeWrapper, ``MMRegParameterName``
  for the combo boxes the framework fills at run time, which may name several parameters
  separated by commas, or ``MMRegNodeListParameterName`` for a list of nodes shown by a checkable
  node selector), and no widget names a parameter that does not exist;
* every node selector (plain or checkable) receives the scene (``mrmlSceneChanged`` ->
  ``setMRMLScene``), without which it stays empty in Slicer;
* the widgets the Widget code uses exist (``self.ui.<name>`` in the module's .py, and the shared
  panel's widgets for modules built on ``RegistrationWidget``, with the convergence widgets for
  a module whose Logic reports convergence, the label-propagation widgets for a module whose
  parameter node has the propagation targets, and the "show" buttons its Logic's extra maps name);
* the panel renders offscreen with PySide6 (skipped when PySide6 is missing).
"""
from __future__ import annotations

import importlib
import re
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UI_FILES = sorted(REPO.glob("*/Resources/UI/*.ui"))
#: Qt classes the .ui files may use without declaring them.
QT_CLASSES = {"QWidget", "QLabel", "QComboBox", "QCheckBox", "QSpinBox", "QDoubleSpinBox", "QPushButton",
              "QProgressBar", "QPlainTextEdit", "QTextBrowser", "QGroupBox", "QLineEdit", "QFrame", "QTableWidget"}
#: Widget classes parameterNodeWrapper can bind for each parameter type.
BINDABLE = {bool: {"QCheckBox", "QPushButton"}, int: {"QSpinBox", "QSlider"}, float: {"QDoubleSpinBox", "ctkSliderWidget"},
            str: {"QLineEdit", "QComboBox"}, "node": {"qMRMLNodeComboBox"}, "node list": {"qMRMLCheckableNodeComboBox"}}
#: Node selector classes (each must receive the scene).
NODE_SELECTORS = ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox")
#: Object names the shared Widget (MMRegCommonLib.widget) looks up (modules built on RegistrationWidget).
FRAMEWORK_WIDGETS = {"applyButton", "cancelButton", "progressBar", "statusLabel", "statusLog", "resultsLabel",
                     "methodInfoLabel", "refinementStepsSpinBox", "refinementStepsLabel", "diffeomorphicCheckBox",
                     "inputsCollapsibleButton", "methodCollapsibleButton", "optionsCollapsibleButton",
                     "outputsCollapsibleButton"}


def _dynamic(widget, name):
    for prop in widget.findall("property"):
        if prop.get("name") == name and prop.get("stdset") == "0":
            return prop.find("string").text
    return None


def _parameters(module_name: str) -> dict:
    """{parameter name: type} of the module's parameter node class (imports the module headless)."""
    module = importlib.import_module(module_name)
    cls = getattr(module, f"{module_name}ParameterNode")
    return typing.get_type_hints(cls)


def _combo_parameters(module_name: str) -> tuple:
    """The parameters whose combo boxes the module fills at run time (its ``COMBO_PARAMETERS``, else the framework's)."""
    from MMRegCommonLib.parameters import COMBO_PARAMETERS
    return tuple(getattr(importlib.import_module(module_name), "COMBO_PARAMETERS", COMBO_PARAMETERS))


def _required_widgets(module_name: str) -> set:
    """Object names the module's Widget code looks up: ``self.ui.<name>`` in its .py, plus the shared
    panel's widgets when its Widget is a ``RegistrationWidget``."""
    source = (REPO / module_name / f"{module_name}.py").read_text()
    names = set(re.findall(r"self\.ui\.([A-Za-z]\w*)", source))
    if re.search(r"class \w+Widget\(RegistrationWidget\)", source):
        names |= FRAMEWORK_WIDGETS
        if re.search(r"^\s+reports_convergence = True", source, re.MULTILINE):
            from MMRegCommonLib.widget import CONVERGENCE_WIDGETS
            names |= set(CONVERGENCE_WIDGETS)
        if "targetVolumes" in _parameters(module_name):
            from MMRegCommonLib.widget import PROPAGATION_WIDGETS
            names |= set(PROPAGATION_WIDGETS)
        logic = getattr(importlib.import_module(module_name), f"{module_name}Logic", None)
        names |= {spec.show_button for spec in getattr(logic, "extra_image_outputs", ()) if spec.show_button}
    return names


def _kind(annotation):
    """The BINDABLE key of a parameter's type: the type itself, "node", or "node list" (``list[vtkMRML...Node]``)."""
    import slicer
    if typing.get_origin(annotation) is list:
        (element,) = typing.get_args(annotation)
        return "node list" if isinstance(element, type) and issubclass(element, slicer.vtkMRMLNode) else list
    return "node" if isinstance(annotation, type) and issubclass(annotation, slicer.vtkMRMLNode) else annotation


@pytest.fixture(params=UI_FILES, ids=lambda p: p.stem)
def ui(request):
    return request.param, ET.parse(request.param).getroot()


def test_there_are_ui_files():
    assert {"MIRegistration", "RegistrationTraining", "LearnedMetric", "MultiscaleRegistration",
            "GradRegistration", "DisentangledRegistration"} <= {p.stem for p in UI_FILES}


def test_required_widgets_are_found_in_the_code():
    # The source scan sees the training panel's own widgets, and the shared ones for a method module.
    assert {"startButton", "pairsTableWidget", "statusLog"} <= _required_widgets("RegistrationTraining")
    # and its joint registration-segmentation section
    assert {"jointStartButton", "jointStopButton", "jointAnnotatedTableWidget", "jointProgressBar",
            "segmentButton"} <= _required_widgets("RegistrationTraining")
    assert FRAMEWORK_WIDGETS <= _required_widgets("MIRegistration")
    assert "convergenceLog" in _required_widgets("LearnedMetric") and "convergenceLog" not in _required_widgets(
        "MIRegistration")
    assert {"propagateButton", "targetVolumesSelector", "showAttentionButton"} <= _required_widgets(
        "MultiscaleRegistration")
    assert "propagateButton" not in _required_widgets("LearnedMetric")
    assert "showGateButton" in _required_widgets("GradRegistration") and "propagateButton" not in _required_widgets(
        "GradRegistration")
    # (the "show" buttons of the extra maps are connected by the framework: named by the Logic's ExtraImageOutput)
    assert "showTranslatedButton" in _required_widgets("DisentangledRegistration")


def test_custom_widgets_declared_and_names_unique(ui):
    path, root = ui
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    widgets = list(root.iter("widget"))
    undeclared = {w.get("class") for w in widgets} - declared - QT_CLASSES
    assert not undeclared, f"{path.name}: classes used but not declared in <customwidgets>: {undeclared}"
    for custom in root.iter("customwidget"):
        assert custom.findtext("header"), f"{path.name}: {custom.findtext('class')} has no <header>"
    names = [e.get("name") for e in root.iter() if e.tag in ("widget", "layout", "spacer")]
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"{path.name}: object names used more than once: {duplicates}"
    assert root.find("widget").get("name") == path.stem, "top-level widget must be named after the module"
    required = _required_widgets(path.stem)
    assert required <= set(names), f"missing widgets: {required - set(names)}"


def test_every_parameter_bound_once_to_a_suitable_widget(ui):
    from MMRegCommonLib.combos import combo_names
    from MMRegCommonLib.parameters import COMBO_PROPERTY, NODE_LIST_PROPERTY

    path, root = ui
    parameters = _parameters(path.stem)
    combo_parameters = _combo_parameters(path.stem)
    bound = {}
    for widget in root.iter("widget"):
        for prop_name in ("SlicerParameterName", COMBO_PROPERTY, NODE_LIST_PROPERTY):
            binding = _dynamic(widget, prop_name)
            if binding is None:
                continue
            names = combo_names(binding) if prop_name == COMBO_PROPERTY else (binding,)
            for name in names:
                assert name not in bound, f"parameter '{name}' is bound twice"
                assert name in parameters, f"{widget.get('name')} binds unknown parameter '{name}'"
                bound[name] = (widget.get("class"), prop_name)
    assert set(bound) == set(parameters), f"parameters without a widget: {set(parameters) - set(bound)}"
    for name, (cls, prop_name) in bound.items():
        kind = _kind(parameters[name])  # (get_type_hints drops Annotated[...] extras)
        assert cls in BINDABLE.get(kind, ()), f"{name}: a {cls} cannot show a {kind}"
        # Run-time-filled combos and node lists are bound by the framework, everything else by parameterNodeWrapper.
        assert (prop_name == COMBO_PROPERTY) == (name in combo_parameters), f"{name} bound by {prop_name}"
        assert (prop_name == NODE_LIST_PROPERTY) == (kind == "node list"), f"{name} bound by {prop_name}"


def test_node_selectors_receive_the_scene(ui):
    path, root = ui
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") in NODE_SELECTORS}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)" and c.findtext("sender") == path.stem}
    assert selectors and selectors <= connected, f"selectors without the scene: {selectors - connected}"


def test_every_input_has_a_tooltip(ui):
    path, root = ui
    interactive = NODE_SELECTORS + ("QComboBox", "QCheckBox", "QSpinBox", "QPushButton")
    missing = [w.get("name") for w in root.iter("widget") if w.get("class") in interactive
               and not any(p.get("name") == "toolTip" for p in w.findall("property"))]
    assert not missing, f"{path.name}: controls without a tooltip: {missing}"


def test_panel_renders_offscreen(tmp_path):
    pytest.importorskip("PySide6.QtUiTools", reason="PySide6 is not installed (pip install PySide6-Essentials)")
    import render_ui
    from PySide6 import QtGui

    for path in UI_FILES:
        png = render_ui.render(path.stem, tmp_path / f"{path.stem}.png")
        image = QtGui.QImage(str(png))
        assert image.width() >= 400 and image.height() >= 600
        colours = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
        assert len(colours) > 20, "the rendering looks blank"
