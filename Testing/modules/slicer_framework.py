"""The pieces of Slicer's application framework that ``slicer-core`` lacks, for headless module tests.

``slicer-core`` gives the real MRML libraries (scenes, nodes, logics) but not the application:
no ``slicer.app``, no ``slicer.mrmlScene`` (the application's scene), no
``slicer.ScriptedLoadableModule`` and no ``slicer.parameterNodeWrapper`` (both import Qt). This
file supplies only those, written for these tests (not copies of Slicer's code):

* ``slicer.mrmlScene``: a real ``vtkMRMLScene`` (what the application would create);
* ``slicer.app``: ``processEvents()`` (nothing to process headless), ``testingEnabled()``,
  ``layoutManager()`` (None: no views);
* ``slicer.ScriptedLoadableModule``: the four base classes with the behaviour the modules use
  (module name from the class name, the singleton parameter node in ``slicer.mrmlScene``, the
  test case's ``delayDisplay``); constructing a Widget fails, as there is no GUI;
* ``slicer.parameterNodeWrapper``: the decorator with typed properties stored in the
  parameter node the way Slicer stores them (str/int/float as text, bool as "True"/"False",
  nodes as node references, ``list[T]`` as ``<name>_len`` and one entry ``<name>_<i>`` per
  element, as Slicer's ListSerializer does), ``Default``, ``WithinRange`` and ``Choice``; no GUI
  binding. A list reads as a plain Python list (Slicer's ObservedList also writes in-place
  changes through; the modules assign whole lists).

Nothing here stands in for MRML or for the code under test.
"""
from __future__ import annotations

import logging
import sys
import types
import typing
import unittest
from dataclasses import dataclass

import slicer


# ---------------------------------------------------------------------------- application
class _HeadlessApplication:
    """What the modules call on ``slicer.app``; there is no event loop and no view headless."""

    def processEvents(self, *args):
        """Nothing to process without a GUI."""

    def testingEnabled(self):
        """Pop-ups are skipped in testing mode."""
        return True

    def layoutManager(self):
        """No views headless."""
        return None


# ---------------------------------------------------------------------------- ScriptedLoadableModule
class ScriptedLoadableModule:
    """Module description holder: keeps the parent and the module name."""

    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__


class ScriptedLoadableModuleWidget:
    """No GUI headless: creating a module widget is an error."""

    def __init__(self, parent=None):
        raise RuntimeError("Module widgets need Slicer's GUI; headless tests use the Logic and the Test classes.")


class ScriptedLoadableModuleLogic:
    """Module name from the class name; the module's singleton parameter node in ``slicer.mrmlScene``."""

    def __init__(self, parent=None):
        name = self.__class__.__name__
        self.moduleName = name[:-5] if name.endswith("Logic") else name
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        """The module's parameter node (``vtkMRMLScriptedModuleNode``), created when missing."""
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.AddNode(self.createParameterNode())
        if node.GetAttribute("ModuleName") != self.moduleName:
            node.SetAttribute("ModuleName", self.moduleName)
        return node

    def createParameterNode(self):
        """A new parameter node tagged with the module name (not yet in the scene)."""
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    """``unittest.TestCase`` with ``delayDisplay`` (logged: no pop-ups headless)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messageDelay = 0

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        """Log the message the test would show in Slicer."""
        logging.info(message)


# ---------------------------------------------------------------------------- parameterNodeWrapper
@dataclass
class Default:
    """Default value annotation."""

    value: object


@dataclass
class WithinRange:
    """Range annotation (inclusive)."""

    minimum: float
    maximum: float


@dataclass
class Choice:
    """Allowed values annotation."""

    choices: tuple


def _split(annotation):
    if typing.get_origin(annotation) is typing.Annotated:
        return annotation.__origin__, list(annotation.__metadata__)
    return annotation, []


class _Parameter:
    def __init__(self, name, annotation, default):
        self.name = name
        self.type, extras = _split(annotation)
        self.extras = extras
        self.element = None  # for list[T]: the parameter that reads and writes one element
        if typing.get_origin(self.type) is list:
            (element_type,) = typing.get_args(self.type)
            self.element = _Parameter(name, element_type, _MISSING)
        self.is_node = isinstance(self.type, type) and issubclass(self.type, slicer.vtkMRMLNode)
        explicit = [e.value for e in extras if isinstance(e, Default)]
        self.default = default if default is not _MISSING else (explicit[0] if explicit else self._zero())

    def _zero(self):
        if self.element is not None:
            return []
        return None if self.is_node else {bool: False, int: 0, float: 0.0, str: ""}[self.type]

    def present(self, node) -> bool:
        """Whether the parameter node holds this parameter (a list: its length entry, as Slicer checks)."""
        return node.HasParameter(f"{self.name}_len" if self.element is not None else self.name)

    def validate(self, value):
        if self.element is not None:
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"{self.name} must be a list, not {type(value).__name__}")
            return [self.element.validate(v) for v in value]
        if self.is_node:
            if value is not None and not value.IsA(self.type.__name__):
                raise ValueError(f"{self.name} must be a {self.type.__name__}, not {value.GetClassName()}")
            return value
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise TypeError(f"{self.name} must be {self.type.__name__}, not {type(value).__name__}")
        for extra in self.extras:
            if isinstance(extra, WithinRange) and not extra.minimum <= value <= extra.maximum:
                raise ValueError(f"{self.name}={value} is outside [{extra.minimum}, {extra.maximum}]")
            if isinstance(extra, Choice) and value not in extra.choices:
                raise ValueError(f"{self.name}={value!r} is not one of {extra.choices}")
        return value

    def _write_element(self, node, name, value):
        if self.is_node:
            node.SetParameter(name, "")
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        else:
            node.SetParameter(name, ("True" if value else "False") if self.type is bool else str(value))

    def _read_element(self, node, name):
        if self.is_node:
            return node.GetNodeReference(name)
        text = node.GetParameter(name)
        return text == "True" if self.type is bool else self.type(text)

    def write(self, node, value):
        value = self.validate(value)
        if self.element is not None:  # Slicer's ListSerializer: <name>_len, then <name>_0, <name>_1, ...
            old_length = int(node.GetParameter(f"{self.name}_len") or 0) if self.present(node) else 0
            state = node.StartModify()
            try:
                for index, item in enumerate(value):
                    self.element._write_element(node, f"{self.name}_{index}", item)
                node.SetParameter(f"{self.name}_len", str(len(value)))
                for index in range(len(value), old_length):
                    node.UnsetParameter(f"{self.name}_{index}")
                    node.RemoveNodeReferenceIDs(f"{self.name}_{index}")
            finally:
                node.EndModify(state)
            return
        self._write_element(node, self.name, value)

    def read(self, node):
        if not self.present(node):
            self.write(node, self.default)
        if self.element is not None:
            length = int(node.GetParameter(f"{self.name}_len") or 0)
            return [self.element._read_element(node, f"{self.name}_{index}") for index in range(length)]
        return self._read_element(node, self.name)


_MISSING = object()
_RESERVED = ("allParameters", "parameterNode", "getValue", "setValue", "default")


def parameterNodeWrapper(cls):
    """Typed properties over a ``vtkMRMLScriptedModuleNode``: ``Wrapper(node).name`` reads/writes the node."""
    hints = typing.get_type_hints(cls, include_extras=True)
    parameters = {name: _Parameter(name, hint, getattr(cls, name, _MISSING)) for name, hint in hints.items()}
    for name, parameter in parameters.items():
        if name in _RESERVED:
            raise ValueError(f"Cannot use reserved name '{name}' in a parameterNodeWrapper")
        setattr(cls, name, property(lambda self, p=parameter: p.read(self.parameterNode),
                                    lambda self, value, p=parameter: p.write(self.parameterNode, value)))

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for parameter in parameters.values():
            if not parameter.present(parameterNode):
                parameter.write(parameterNode, parameter.default)

    cls.__init__ = __init__
    cls.allParameters = parameters
    cls.getValue = lambda self, name: getattr(self, name)
    cls.setValue = lambda self, name, value: setattr(self, name, value)
    cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback,
                                                                                                priority)
    cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    return cls


# ---------------------------------------------------------------------------- install
def install() -> None:
    """Add the missing framework pieces to the ``slicer`` package (idempotent)."""
    if getattr(slicer, "_mmreg_headless_framework", False):
        return
    if not hasattr(slicer, "mrmlScene"):
        slicer.mrmlScene = slicer.vtkMRMLScene()
    if not hasattr(slicer, "app"):
        slicer.app = _HeadlessApplication()
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for obj in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(scripted, obj.__name__, obj)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    for obj in (parameterNodeWrapper, Default, WithinRange, Choice):
        setattr(wrapper, obj.__name__, obj)
    for name, module in (("ScriptedLoadableModule", scripted), ("parameterNodeWrapper", wrapper)):
        sys.modules[f"slicer.{name}"] = module
        setattr(slicer, name, module)
    slicer._mmreg_headless_framework = True
