"""The base Widget of every method module: the common panel, built from the module's ``.ui`` file.

The Widget only collects parameters (in the module's parameter node), runs the Logic, and
shows progress, results and errors; every decision it shows (Apply enabled and why, model
and device lists, results text, error text) comes from :mod:`MMRegCommonLib.panel`, which
is tested headless.

Responsiveness: the registration runs in Slicer's main thread and the progress callback calls
``slicer.app.processEvents()``. The engine reports progress between optimisation steps and
pipeline stages (typically every 0.05-1 s), so the GUI repaints, the progress bar moves and the
Cancel button is handled; a click sets a flag that the Logic turns into
``mmreg.CancelledError`` at the next report. A worker thread or process would keep the GUI
live even inside one long step, but MRML and VTK are not thread-safe, Slicer's Python threads
only progress while the main thread runs Python, and a process would have to copy the images;
the outputs are anyway made in the main thread after the engine returns. Apply and the input
sections are disabled while running, so processEvents cannot start a second run.

Optional parts, used when the module's ``.ui`` file and Logic have them:

* method-specific controls (the Logic's :attr:`~MMRegCommonLib.logic.RegistrationLogic.methodOptions`)
  in a section ``methodOptionsCollapsibleButton``, with ``methodOptionsInfoLabel`` for a line about
  the current choice; their run-time combo boxes are filled and each control is enabled or
  disabled as :mod:`MMRegCommonLib.methodoptions` decides;
* a convergence section (Logic with ``reports_convergence``): ``convergenceLabel`` (a sparkline
  per stage), ``convergenceLog`` (one line per optimiser iteration, live) and
  ``showConvergenceButton`` (shows the run's convergence chart in the Plots view);
* a label-propagation section (:data:`PROPAGATION_WIDGETS`, a parameter node with
  :class:`~MMRegCommonLib.parameters.PropagationParameters`): the target volumes in a checkable
  node selector, "Propagate segmentation" (the Logic's ``propagate_with_parameters``: the moving
  volume and segmentation are the atlas), its own Cancel button, progress bar and status line;
* checkable node selectors bound to list-of-nodes parameters (:class:`~MMRegCommonLib.combos.NodeListCombos`);
* a "show" button per extra map of the Logic (:attr:`~MMRegCommonLib.logic.ExtraImageOutput.show_button`):
  enabled once a run made that map's volume, it overlays the volume on the fixed one
  (:meth:`~MMRegCommonLib.logic.RegistrationLogic.show_extra_image`).

Combo boxes whose items follow the current choices (``methodOptions.value_combo_items``, e.g. the
registration direction offered by the chosen model) are refilled whenever the parameters change.
The notes of a run (e.g. why a map was not made) are written to the log.

Shared option rows that the method does not have (refinement steps, diffeomorphic, symmetric) are hidden
(:func:`MMRegCommonLib.panel.shared_control_visibility`).
"""
from __future__ import annotations

import logging
import traceback

import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from . import panel
from .combos import NodeListCombos, ParameterCombos, combo_names
from .methodoptions import combined_state
from .parameters import COMBO_PROPERTY

#: Sections disabled while a registration runs (object names in the .ui file; the method-specific one
#: only where the module has it).
_SECTIONS = ("inputsCollapsibleButton", "methodCollapsibleButton", "methodOptionsCollapsibleButton",
             "optionsCollapsibleButton", "outputsCollapsibleButton")
#: Convergence widgets of a module whose Logic reports convergence.
CONVERGENCE_WIDGETS = ("convergenceCollapsibleButton", "convergenceLabel", "convergenceLog", "showConvergenceButton")
#: Label-propagation widgets of a module whose parameter node has PropagationParameters.
PROPAGATION_WIDGETS = ("propagationCollapsibleButton", "targetVolumesSelector", "propagateButton",
                       "propagationCancelButton", "propagationProgressBar", "propagationStatusLabel")


def has_propagation(ui) -> bool:
    """Whether a panel (its ``ui`` namespace) has the label-propagation section ("Propagate segmentation")."""
    return hasattr(ui, "propagateButton")


class RegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The common panel; a module sets :attr:`logicClass` (its RegistrationLogic subclass)."""

    #: The module's Logic class.
    logicClass = None

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._status = None
        self._combos = None
        self._lastStage = ""
        self._controls = {}
        self._controlTooltips = {}
        self._shownPoints = 0
        self._convergenceChartId = None
        self._nodeLists = None
        self._progressBar = None
        self._valueComboItems = {}
        #: The last successful registration's outcome (None before the first Apply).
        self.lastOutcome = None

    # ------------------------------------------------------------------ set-up
    def setup(self):
        """Load the .ui file, bind it to the parameter node, fill the run-time choices."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.logicClass()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.value = 0
        self._progressBar = self.ui.progressBar
        if has_propagation(self.ui):
            self.ui.propagateButton.connect("clicked(bool)", self.onPropagateButton)
            self.ui.propagationCancelButton.connect("clicked(bool)", self.onCancelButton)
            self.ui.propagationCancelButton.enabled = False
            self.ui.propagationProgressBar.value = 0

        self._combos = ParameterCombos(self.ui.__dict__.values())
        self._nodeLists = NodeListCombos(self.ui.__dict__.values())
        self._controls = self._widgetsByParameter()
        self._controlTooltips = {id(w): w.toolTip for ws in self._controls.values() for w in ws}  # (.ui texts)
        if self.logic.reports_convergence:
            self.ui.showConvergenceButton.connect("clicked(bool)", self.onShowConvergenceButton)
            self.ui.showConvergenceButton.enabled = False
        for spec in self._mapsWithButtons():
            button = getattr(self.ui, spec.show_button)
            button.connect("clicked(bool)", lambda checked=False, name=spec.name: self.onShowExtraImage(name))
            button.enabled = False
        self.refreshMethod()
        self.initializeParameterNode()

    def _mapsWithButtons(self) -> list:
        """The Logic's extra maps that have a "show" button in the panel."""
        return [spec for spec in self.logic.extra_image_outputs if spec.show_button]

    def _controlWidgets(self) -> list:
        """``[(widget, parameter names it sets)]`` from :meth:`_widgetsByParameter`'s ``{name: [widgets]}``."""
        names = {}
        for name, widgets in self._controls.items():
            for widget in widgets:
                names.setdefault(id(widget), (widget, []))[1].append(name)
        return list(names.values())

    def _widgetsByParameter(self) -> dict:
        """``{parameter name: [widgets bound to it]}`` (parameterNodeWrapper's and the framework's bindings)."""
        out = {}
        for widget in self.ui.__dict__.values():
            if not hasattr(widget, "property"):
                continue
            for prop in ("SlicerParameterName", COMBO_PROPERTY):
                for name in combo_names(widget.property(prop) or ""):
                    out.setdefault(name, []).append(widget)
        return out

    def refreshMethod(self):
        """Ask the engine again about the method (after installing dependencies) and refill the choices."""
        self._status = self.logic.method_status()
        status = self._status
        self.ui.methodInfoLabel.text = status.description if status.available else status.reason
        if "model" in self._combos:  # (a module whose own controls choose the model has no shared selector)
            self._combos.fill("model", panel.model_items(status))
            self._combos["model"].enabled = status.available and bool(status.models)
        self._combos.fill("device", [(value, label, "") for value, label in panel.device_choices()])
        for binding, items in self.logic.methodOptions.combo_items(status).items():
            self._combos.fill(binding, items)
        self.ui.refinementStepsSpinBox.enabled = status.supports_refinement
        if not status.supports_refinement:
            self.ui.refinementStepsSpinBox.toolTip = (f"Method '{status.name}' has no refinement; this setting is "
                                                      "not used.")
        visible = panel.shared_control_visibility(status)
        self.ui.refinementStepsSpinBox.visible = self.ui.refinementStepsLabel.visible = visible["refinementSteps"]
        self.ui.diffeomorphicCheckBox.visible = visible["diffeomorphic"]
        self.ui.symmetricCheckBox.visible = visible["symmetric"]
        self._updateDiffeomorphicControl()
        self._updateSymmetricControl()
        self._updateMethodControls()
        self._updateApplyState()

    def _updateMethodControls(self):
        """Method-specific controls: resolved values written back (the panel shows what Apply runs), each
        control enabled or not with its reason, and the line about the current choice."""
        options = self.logic.methodOptions
        if self._status is None or self._parameterNode is None or not options.parameters:
            return
        values = options.values(self._parameterNode)
        changes = options.changes(values, self._status) if self._status.available else {}
        if changes:  # the parameter node's Modified event calls this again with the resolved values
            node = self._parameterNode.parameterNode
            state = node.StartModify()
            try:
                for name, value in changes.items():
                    setattr(self._parameterNode, name, value)
            finally:
                node.EndModify(state)
            return
        for binding, items in options.value_combo_items(values, self._status).items():
            if binding in self._combos and self._valueComboItems.get(binding) != items:
                self._valueComboItems[binding] = items
                self._combos.fill(binding, items)
        states = options.control_states(values, self._status)
        for widget, names in self._controlWidgets():
            state = combined_state(states, names)
            if state is not None:  # a disabled control says why; enabled again, its own tooltip comes back
                widget.enabled = state[0]
                widget.toolTip = state[1] or self._controlTooltips.get(id(widget), widget.toolTip)
        label = getattr(self.ui, "methodOptionsInfoLabel", None)
        if label is not None:
            label.text = options.info_text(values, self._status)

    def _updateDiffeomorphicControl(self):
        """The checkbox follows the chosen model for learned methods (read-only), else the user's choice."""
        if self._status is None:
            return
        model = self._parameterNode.model if self._parameterNode is not None else ""
        enabled, checked, tooltip = panel.diffeomorphic_control(self._status, model or "")
        box = self.ui.diffeomorphicCheckBox
        box.enabled, box.toolTip = enabled, tooltip
        if checked is not None:
            wasBlocked = box.blockSignals(True)  # shows the model's value; the parameter node keeps the user's
            box.checked = checked
            box.blockSignals(wasBlocked)

    def _updateSymmetricControl(self):
        """The checkbox is enabled only for a model that predicts a velocity (the tooltip says why not)."""
        if self._status is None:
            return
        model = self._parameterNode.model if self._parameterNode is not None else ""
        enabled, tooltip = panel.symmetric_control(self._status, model or "")
        self.ui.symmetricCheckBox.enabled, self.ui.symmetricCheckBox.toolTip = enabled, tooltip

    def cleanup(self):
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self):
        """Called each time the user opens this module: bind the parameter node, and list the models
        again (a model trained or renamed in RegistrationTraining since shows up at once)."""
        self.initializeParameterNode()
        self.refreshMethod()

    def exit(self):
        """Called each time the user opens a different module: stop updating the GUI from the node."""
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        """The scene is about to close: forget its parameter node."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        """The scene closed: a fresh parameter node when the module is shown."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        """Use the module's parameter node; select the first two volumes as fixed/moving when none are set."""
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if p.fixedVolume is None and p.movingVolume is None:
            volumes = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if not n.IsA("vtkMRMLLabelMapVolumeNode")]
            if len(volumes) >= 2:
                p.fixedVolume, p.movingVolume = volumes[0], volumes[1]

    def setParameterNode(self, parameterNode):
        """Bind the GUI to ``parameterNode`` (a parameterNodeWrapper of the module) or unbind (None)."""
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._combos.set_parameter_node(parameterNode)
        self._nodeLists.set_parameter_node(parameterNode)
        if parameterNode is not None:
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        self._combos.update()
        self._nodeLists.update()
        self._updateDiffeomorphicControl()
        self._updateSymmetricControl()
        self._updateMethodControls()
        self._updateApplyState()

    def _updateApplyState(self):
        if self._status is None or self._parameterNode is None:
            return
        p = self._parameterNode
        options = self.logic.methodOptions
        problem = (options.problem(options.resolve(options.values(p), self._status), self._status)
                   if options.parameters and self._status.available else None)
        enabled, reason = panel.apply_state(self._status, p.fixedVolume, p.movingVolume, self.logic.is_running,
                                            problem)
        self.ui.applyButton.enabled = enabled
        self.ui.applyButton.toolTip = reason
        self.ui.statusLabel.text = reason
        if has_propagation(self.ui):
            enabled, reason = panel.propagation_state(self._status, p.movingVolume, p.movingSegmentation,
                                                      list(p.targetVolumes), self.logic.is_running)
            if enabled and problem and self._status.available:
                enabled, reason = False, problem
            self.ui.propagateButton.enabled = enabled
            self.ui.propagateButton.toolTip = reason
            self.ui.propagationStatusLabel.text = reason

    # ------------------------------------------------------------------ running
    def _log(self, text):
        self.ui.statusLog.appendPlainText(text)
        logging.info("%s: %s", self.moduleName, text)

    def _setRunning(self, running):
        for name in _SECTIONS:
            section = getattr(self.ui, name, None)
            if section is not None:
                section.enabled = not running
        self.ui.cancelButton.enabled = running
        if has_propagation(self.ui):
            self.ui.propagationCancelButton.enabled = running
            self.ui.targetVolumesSelector.enabled = not running
        self._updateApplyState()

    def _onProgress(self, fraction, message):
        self._progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        stage = panel.progress_stage(message)
        if stage != self._lastStage:
            self._log(f"{fraction:4.0%}  {stage}")
            self._lastStage = stage
        self._showLiveConvergence()
        slicer.app.processEvents()

    # ------------------------------------------------------------------ convergence
    def _showLiveConvergence(self):
        """New iterations of the running registration into the convergence log, and the sparklines."""
        trace = self.logic.trace
        if trace is None or trace.count == self._shownPoints:
            return
        from .convergence import log_line
        points = [(stage, step, value) for stage in trace.stages for step, value in zip(stage.steps, stage.values)]
        for stage, step, value in points[self._shownPoints:]:
            self.ui.convergenceLog.appendPlainText(log_line({"stage": stage.stage, "level": stage.level,
                                                             "levels": stage.levels, "iteration": step,
                                                             "iterations": stage.iterations, "value": value}))
        self._shownPoints = trace.count
        self.ui.convergenceLabel.text = "\n".join(trace.summary_lines())

    def _resetConvergence(self):
        if not self.logic.reports_convergence:
            return
        self._shownPoints = 0
        self.ui.convergenceLog.clear()
        self.ui.convergenceLabel.text = "The metric per iteration appears here while the registration runs."

    def _showFinalConvergence(self, outcome):
        if not self.logic.reports_convergence or outcome.trace is None:
            return
        self.ui.convergenceLabel.text = "\n".join(outcome.trace.summary_lines())
        chart = (outcome.convergence or {}).get("chart")
        self._convergenceChartId = chart.GetID() if chart is not None else None
        self.ui.showConvergenceButton.enabled = chart is not None

    def onShowConvergenceButton(self):
        """Show the last run's convergence chart (metric per iteration) in a Plots view of the layout."""
        chart = slicer.mrmlScene.GetNodeByID(self._convergenceChartId) if self._convergenceChartId else None
        if chart is None:
            self.ui.showConvergenceButton.enabled = False
            return
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    def onCancelButton(self):
        """Ask the running registration to stop (at its next progress report)."""
        self.logic.cancel()
        self._log("Cancelling...")

    def _runAction(self, start_message: str, action, on_success, progressBar) -> None:
        """Install missing dependencies (after asking), then run ``action(progress)`` with the panel disabled and
        ``progressBar`` moving; ``on_success(result)`` shows the result; a cancel is logged, an error shown in
        a readable sentence (with the traceback for a bug)."""
        from .dependencies import ensure_dependencies
        ok, message = ensure_dependencies()
        if not ok:
            self._log(message)
            slicer.util.warningDisplay(message)
            return
        if self._status.engine_missing:
            self.refreshMethod()
            if not self._status.available:
                self._log(self._status.reason)
                return
        import mmreg
        self._lastStage = ""
        self._log(start_message)
        self._progressBar = progressBar
        progressBar.value = 0
        self._resetConvergence()
        self.logic.is_running = True
        self._setRunning(True)
        try:
            result = action(self._onProgress)
        except mmreg.CancelledError as exc:
            self._log(str(exc))
            progressBar.value = 0
        except Exception as exc:
            text = panel.user_message(exc)
            self._log("Error: " + text)
            extra = {}
            if not isinstance(exc, mmreg.MMRegError):  # a bug, not bad input: keep the traceback at hand
                extra["detailedText"] = traceback.format_exc()
                logging.error(extra["detailedText"])
            slicer.util.errorDisplay(text, **extra)
        else:
            on_success(result)
        finally:
            self.logic.is_running = False
            self._setRunning(False)

    def onApplyButton(self):
        """Install missing dependencies (after asking), run the registration, show results or a readable error."""
        p = self._parameterNode
        self._runAction(f"--- {self._status.name}: registering '{p.movingVolume.GetName()}' to "
                        f"'{p.fixedVolume.GetName()}'",
                        lambda progress: self.logic.run_with_parameters(p, progress=progress),
                        self._showOutcome, self.ui.progressBar)

    def _showOutcome(self, outcome):
        """After Apply: results text, convergence, slice views, log line."""
        self.lastOutcome = outcome
        self.ui.resultsLabel.text = outcome.summary_text()
        self._showFinalConvergence(outcome)
        self.logic.show_outcome(outcome, self._parameterNode.fixedVolume)
        summary = outcome.summary()
        self._log(f"Done in {summary['runtime_s']:.1f} s; folding {summary['folding_percent']:.3f} %.")
        for note in outcome.notes:
            self._log(note)
        for spec in self._mapsWithButtons():
            getattr(self.ui, spec.show_button).enabled = spec.name in outcome.extra_nodes
        self.onOutcome(outcome)

    def onOutcome(self, outcome):
        """Called after a successful Apply, once the results are shown; modules add their own views here."""

    def onShowExtraImage(self, name: str):
        """Overlay the last run's extra map ``name`` (its volume) on the fixed volume (a map's "show" button)."""
        if self.lastOutcome is not None:
            self.logic.show_extra_image(self.lastOutcome, self._parameterNode.fixedVolume, name)

    def onPropagateButton(self):
        """Propagate the moving segmentation to the checked target volumes; show the new segmentations."""
        p = self._parameterNode
        targets = [t for t in p.targetVolumes if t is not None]
        self._runAction(f"--- {self._status.name}: propagating '{p.movingSegmentation.GetName()}' from "
                        f"'{p.movingVolume.GetName()}' to {len(targets)} volume(s)",
                        lambda progress: self.logic.propagate_with_parameters(p, progress=progress),
                        self._showPropagation, self.ui.propagationProgressBar)

    def _showPropagation(self, nodes):
        records = self.logic.last_propagation
        self.ui.resultsLabel.text = panel.format_propagation(records)
        if records:  # the first target with its new segmentation
            slicer.util.setSliceViewerLayers(background=records[0].target_volume, foreground=None, fit=True)
            for record in records:
                display = record.segmentation_node.GetDisplayNode()
                if display is not None:
                    display.SetVisibility(record is records[0])
        self._log(f"Propagated to {len(nodes)} volume(s) in {sum(r.seconds for r in records):.1f} s: "
                  + ", ".join(node.GetName() for node in nodes) + ".")
