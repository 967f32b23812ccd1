"""The base Logic of every method module: one call from MRML nodes to registered outputs.

From the Slicer Python console (any method module; ``optimize`` needs no trained model)::

    logic = slicer.util.getModuleLogic("MIRegistration")
    outcome = logic.run(fixedVolume, movingVolume, movingSegmentation, fixedSegmentation,
                        progress=lambda fraction, message: print(f"{fraction:.0%} {message}"))
    outcome.transform_node, outcome.volume_node, outcome.segmentation_node, outcome.summary()

Conventions (DESIGN.md): the result is a grid transform whose *FromParent* maps a fixed-space
point (RAS) to the corresponding moving-space point; the warped volume and segmentation lie on
the fixed volume's grid. Every conversion goes through :mod:`mmreg_slicer.bridge`.

Choices made here:

* Inputs are not modified, with one documented exception: with
  ``place_moving_under_transform=True`` (the default, as the panel does) the moving volume's
  parent transform is set to the result, so that it overlays the fixed volume; its voxels are
  untouched, and the previous parent is kept in :attr:`RegistrationOutcome.previous_moving_parent_id`.
* The registration works on the nodes' own (local) coordinates: parent transforms of the
  moving volume and segmentation are ignored (a previous result is replaced, not composed),
  and a fixed volume under a transform is refused (the result is defined on its grid).
* Outputs are made only after the engine finished; a cancel or an error before that leaves
  the scene exactly as it was, and a failure while making them removes what was made. Output
  nodes that the caller chose get their content replaced (node, name and display kept).
* Method-specific options (:attr:`RegistrationLogic.methodOptions`) go to the engine when running
  from the parameter node; from the console they are the engine's own keyword options.
* A method that reports its metric per iteration (:attr:`RegistrationLogic.reports_convergence`)
  gets a live :class:`~MMRegCommonLib.convergence.ConvergenceTrace` (:attr:`RegistrationLogic.trace`)
  and, after a successful run, a convergence table and plot chart in the scene
  (:attr:`RegistrationOutcome.convergence`), made from the report's ``method_trace``.
* Maps a method makes besides the field (``RegistrationResult.extra_images``, e.g. the attention
  weights of ``multiscale``) become scalar volume nodes on the fixed grid for the names the module
  declares in :attr:`RegistrationLogic.extra_image_outputs` (:class:`ExtraImageOutput`: node name,
  display range, colour table, parameters of its output selector and on/off checkbox), or for the
  names given to :meth:`RegistrationLogic.run` (``extra_images``); they are in
  :attr:`RegistrationOutcome.extra_nodes`.
* :meth:`RegistrationLogic.propagate_segmentation` (label propagation): an annotated volume (the
  atlas: volume + segmentation) registered to several target volumes, one new segmentation node per
  target; all-or-nothing like :meth:`RegistrationLogic.run`, inputs untouched.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from . import panel
from .convergence import ConvergenceTrace, update_convergence_nodes
from .methodoptions import MethodOptions


@dataclass(frozen=True)
class ExtraImageOutput:
    """A map of the engine's ``RegistrationResult.extra_images`` that a module shows as a scalar volume node.

    ``name``: the map's key in ``extra_images`` (e.g. "attention"); ``label``: the node name's suffix
    ("<moving> attention weights"); ``value_range``: ``(low, high)`` of a fixed display window (None:
    automatic window/level); ``color_node_id``: colour table of the display when the scene has it;
    ``output_parameter``: the parameter (a scalar volume node) of the module's output selector for it
    ("" if none: always a new node); ``enable_parameter``: a bool parameter that switches the map's
    node on or off ("" if none: always made); ``show_button``: object name of a push button in the
    module's ``.ui`` that overlays the last run's map on the fixed volume ("" if none; the framework's
    Widget connects it and enables it once a run made the map).
    """

    name: str
    label: str
    value_range: tuple | None = None
    color_node_id: str | None = None
    output_parameter: str = ""
    enable_parameter: str = ""
    show_button: str = ""


@dataclass
class RegistrationOutcome:
    """What :meth:`RegistrationLogic.run` returns.

    ``transform_node``: grid transform, FromParent = fixed (RAS) -> moving (RAS).
    ``volume_node``: the moving volume resampled onto the fixed grid. ``segmentation_node``:
    the moving segmentation warped onto the fixed grid (None without one). ``result``: the
    engine's :class:`mmreg.RegistrationResult` (displacement in LPS mm, report).
    ``segment_names``: label value in the report -> segment name; ``scored_labels``: the
    values that have a fixed segment of the same name (None: all). ``created_node_ids``: nodes
    this run added to the scene. ``notes``: remarks for the user (e.g. unmatched segments).
    ``trace``: the metric per iteration (a :class:`~MMRegCommonLib.convergence.ConvergenceTrace`,
    from the report's ``method_trace``) for methods that report it, else None; ``convergence``:
    its nodes (``{"table", "chart", "series"}``), else None. ``extra_nodes``: ``{map name: scalar volume
    node}`` of the engine's extra maps shown (see :class:`ExtraImageOutput`), on the fixed grid.
    """

    transform_node: object
    volume_node: object
    segmentation_node: object
    result: object
    segment_names: dict = field(default_factory=dict)
    scored_labels: list | None = None
    created_node_ids: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    previous_moving_parent_id: str | None = None
    trace: ConvergenceTrace | None = None
    convergence: dict | None = None
    extra_nodes: dict = field(default_factory=dict)

    @property
    def report(self) -> dict:
        """The engine's JSON-friendly report (timings in s, quality numbers, options)."""
        return self.result.report

    def summary(self) -> dict:
        """Runtime, folding % and Dice per segment name (see :func:`MMRegCommonLib.panel.summarize`)."""
        return panel.summarize(self.result.report, self.segment_names, self.scored_labels)

    def summary_text(self) -> str:
        """The results area's HTML text (with a line per extra map shown: its volume and value range), followed by
        the notes."""
        text = panel.format_summary(self.summary())
        for name, node in self.extra_nodes.items():
            image = self.result.extra_images.get(name)
            if image is None:
                continue
            values = sitk.GetArrayViewFromImage(image)
            text += (f"<br><b>Map '{name}'</b>: volume '{node.GetName()}', values {values.min():.3f} to "
                     f"{values.max():.3f} (mean {values.mean():.3f})")
        return text + "".join(f"<br><i>{note}</i>" for note in self.notes)


@dataclass
class PropagatedSegmentation:
    """One target of :meth:`RegistrationLogic.propagate_segmentation`.

    ``target_volume``: the target (fixed) volume node; ``segmentation_node``: the new segmentation
    node with the atlas segments on the target's grid; ``seconds``: wall time of this target's
    registration (s); ``result``: the engine's :class:`mmreg.RegistrationResult` (target <- atlas:
    displacement on the target's grid in LPS mm, report).
    """

    target_volume: object
    segmentation_node: object
    seconds: float
    result: object

    @property
    def folding_percent(self) -> float | None:
        """Percentage of the target's voxels where the deformation folds (Jacobian determinant <= 0)."""
        return self.result.report.get("quality", {}).get("deformable", {}).get("folding_percent")


def match_segments(fixed_labels: sitk.Image, fixed_info: dict, moving_info: dict) -> tuple:
    """Renumber a fixed label image so that each segment gets the value of the moving segment of the same name.

    Names are compared case-insensitively. Returns ``(labels, matched moving values, unmatched
    fixed names)``; unmatched fixed segments become background (they cannot be scored).
    """
    by_name = {str(info["name"]).strip().lower(): value for value, info in moving_info.items()}
    arr = sitk.GetArrayFromImage(fixed_labels)
    lut = np.zeros(int(arr.max()) + 1 if arr.size else 1, dtype=np.int32)
    matched, unmatched = [], []
    for value, info in fixed_info.items():
        target = by_name.get(str(info["name"]).strip().lower())
        if target is None:
            unmatched.append(info["name"])
            continue
        matched.append(target)
        if value < lut.size:
            lut[value] = target
    out = sitk.GetImageFromArray(lut[arr])
    out.CopyInformation(fixed_labels)
    return out, sorted(matched), unmatched


def remove_nodes(nodes) -> None:
    """Remove nodes from their scene together with their display and storage nodes."""
    for node in nodes:
        scene = node.GetScene() if node is not None else None
        if scene is None:
            continue
        extra = []
        if node.IsA("vtkMRMLDisplayableNode"):
            extra += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            extra.append(node.GetStorageNode())
        for other in extra:
            if other is not None and other.GetScene() is not None:
                scene.RemoveNode(other)
        scene.RemoveNode(node)


class RegistrationLogic(ScriptedLoadableModuleLogic):
    """Logic shared by the method modules; a module sets :attr:`method_name` and :attr:`parameterNodeClass`.

    :meth:`run` is the documented call from nodes to outputs; :meth:`run_with_parameters` runs
    from the module's parameter node (what Apply does); :meth:`cancel` asks a running
    registration to stop at its next progress report.
    """

    #: The engine method this module runs (a name from ``mmreg.method_names()``).
    method_name = ""
    #: The module's ``@parameterNodeWrapper`` class (a subclass of RegistrationParameters).
    parameterNodeClass = None
    #: The module's method-specific controls (:class:`~MMRegCommonLib.methodoptions.MethodOptions`; none here).
    methodOptions = MethodOptions()
    #: True for a method whose progress messages carry its metric per iteration (see :meth:`parse_progress`).
    reports_convergence = False
    #: The engine's extra maps (``RegistrationResult.extra_images``) this module shows as volume nodes
    #: (:class:`ExtraImageOutput`; none in the base class).
    extra_image_outputs: tuple = ()

    def __init__(self, method_name: str | None = None):
        ScriptedLoadableModuleLogic.__init__(self)
        if method_name:
            self.method_name = method_name
        self._cancel_requested = False
        self.is_running = False
        #: The running (or last) registration's metric per iteration, for methods that report it; else None.
        self.trace = None
        #: The targets of the last :meth:`propagate_segmentation` (:class:`PropagatedSegmentation` each).
        self.last_propagation = []

    def parse_progress(self, message: str) -> dict | None:
        """A progress message of the module's method read as one optimiser iteration (``stage``, ``level``,
        ``levels``, ``iteration``, ``iterations``, ``value``), or None. Modules with
        :attr:`reports_convergence` use their engine method's parser; the base class reads nothing."""
        return None

    def getParameterNode(self):
        """The module's parameter node, wrapped in :attr:`parameterNodeClass` (created on first use)."""
        node = ScriptedLoadableModuleLogic.getParameterNode(self)
        return self.parameterNodeClass(node) if self.parameterNodeClass is not None else node

    def method_status(self, method: str | None = None) -> panel.MethodStatus:
        """Whether the engine offers this module's method (or ``method``), its models and options."""
        return panel.method_status(method or self.method_name)

    def default_model_name(self, status: panel.MethodStatus) -> str | None:
        """The model this module runs when none is chosen (``model=None``), or None to leave it to the engine
        (its "default" model, or the only one). The base class leaves it to the engine; a module whose
        method ships several models names its default here."""
        return None

    def _engine_call(self, method, model, options: dict, refinement_steps, diffeomorphic) -> tuple:
        """``(method, status, model, engine options)`` of a run: ``method`` None = the module's own; its
        :func:`~MMRegCommonLib.panel.method_status`, ``mmreg.InputError`` with the reason when it cannot run;
        ``model`` None = :meth:`default_model_name` for the module's own method; the keyword ``options`` with the
        panel's refinement and diffeomorphic settings (:func:`~MMRegCommonLib.panel.engine_options`)."""
        import mmreg
        method = method or self.method_name
        status = panel.method_status(method)
        if not status.available:
            raise mmreg.InputError(status.reason)
        if model is None and method == self.method_name:
            model = self.default_model_name(status)
        return method, status, model, dict(options, **panel.engine_options(status, refinement_steps, diffeomorphic))

    def cancel(self) -> None:
        """Ask the running registration to stop; it raises ``mmreg.CancelledError`` at its next progress report."""
        self._cancel_requested = True

    def _check_cancel(self) -> None:
        if self._cancel_requested:
            import mmreg
            raise mmreg.CancelledError("Registration cancelled by the user; the scene is unchanged.")

    def _progress(self, user_callback, trace=None):
        def callback(fraction, message):
            self._check_cancel()
            if trace is not None:
                point = self.parse_progress(message)
                if point is not None:
                    trace.add(point)
            if user_callback is not None and user_callback(fraction, message) is False:
                self.cancel()
            self._check_cancel()
        return callback

    # ------------------------------------------------------------------ run
    def run(self, fixed_volume, moving_volume, moving_segmentation=None, fixed_segmentation=None, *,
            model: str | None = None, device: str = "auto", affine: bool = True, refinement_steps: int | None = None,
            diffeomorphic: bool | None = None, output_transform=None, output_volume=None, output_segmentation=None,
            place_moving_under_transform: bool = True, method: str | None = None, threads: int | None = None,
            extra_images=None, output_extra_images: dict | None = None, progress=None,
            **options) -> RegistrationOutcome:
        """Register ``moving_volume`` to ``fixed_volume``; returns a :class:`RegistrationOutcome`.

        ``moving_segmentation`` (optional) is warped with the image; ``fixed_segmentation``
        (optional) is only used to score: Dice/HD95 per segment, matched by segment name.
        ``model``: a trained model of the method (None: its default, see :meth:`default_model_name`).
        ``device``: "auto", "cpu", "cuda", "cuda:N" or "mps". ``affine``: affine pre-alignment first.
        ``refinement_steps`` / ``diffeomorphic``: method options (None: the method's default;
        an error for a method without them). ``output_*``: existing nodes to fill (their
        content is replaced); None creates new ones. ``place_moving_under_transform``: put
        the moving volume under the result afterwards (changes only its parent transform).
        ``method``: another engine method than the module's (e.g. "optimize" in tests).
        ``extra_images``: names of the engine's extra maps to make volume nodes of (None: the
        module's :attr:`extra_image_outputs` when its own method runs; ``()``: none); a name the
        method did not make gives a note. ``output_extra_images``: ``{name: scalar volume node}``
        to fill instead of making new ones.
        ``progress(fraction, message)`` is called often (return False or raise
        ``mmreg.CancelledError`` to cancel, as :meth:`cancel` does). Other keyword
        ``options`` go to the engine method (e.g. ``iterations=[20]``). Raises
        ``mmreg.MMRegError`` subclasses with a readable message for bad input.
        """
        import mmreg
        method, status, model, options = self._engine_call(method, model, options, refinement_steps, diffeomorphic)
        scene = self._check_nodes(fixed_volume, moving_volume, moving_segmentation, fixed_segmentation,
                                  output_transform, output_volume, output_segmentation)
        extras = self._extra_outputs(method, extra_images, output_extra_images, scene,
                                     (fixed_volume, moving_volume, output_volume))
        self._cancel_requested = False
        self.trace = (ConvergenceTrace(str(options.get("similarity") or status.options.get("similarity") or ""))
                      if self.reports_convergence and method == self.method_name else None)
        self.is_running = True
        try:
            inputs = self._engine_inputs(fixed_volume, moving_volume, moving_segmentation, fixed_segmentation)
            self._check_cancel()
            t0 = time.perf_counter()
            result = mmreg.register(inputs["fixed"], inputs["moving"], method, model=model or None, affine=affine,
                                    fixed_labels=inputs["fixed_labels"], moving_labels=inputs["moving_labels"],
                                    device=device, threads=threads, progress=self._progress(progress, self.trace),
                                    **options)
            logging.info("%s: registration with '%s' took %.1f s", self.moduleName, method, time.perf_counter() - t0)
            self._check_cancel()
            outcome = self._make_outputs(scene, result, fixed_volume, moving_volume, inputs["moving_info"],
                                         output_transform, output_volume, output_segmentation, extras)
        finally:
            self.is_running = False
        missing = [spec.name for spec, _ in extras if spec.name not in result.extra_images]
        if missing:
            inputs["notes"].append(f"Method '{method}' made no {', '.join(repr(n) for n in missing)} map "
                                   f"(it made: {', '.join(sorted(result.extra_images)) or 'none'}).")
        inputs["notes"].extend(f"Warning: {text}" for text in result.report.get("warnings", []))
        outcome.notes, outcome.scored_labels = inputs["notes"], inputs["scored"]
        outcome.segment_names = {value: info["name"] for value, info in (inputs["moving_info"] or {}).items()}
        if self.trace is not None:
            self._show_convergence(scene, outcome)
        if place_moving_under_transform:
            parent = moving_volume.GetParentTransformNode()
            outcome.previous_moving_parent_id = parent.GetID() if parent is not None else None
            from mmreg_slicer import bridge
            bridge.place_under_transform(moving_volume, outcome.transform_node)
        return outcome

    def _show_convergence(self, scene, outcome: RegistrationOutcome) -> None:
        """The run's trace (the report's ``method_trace``, else the live one) into the module's convergence
        table and chart. A failure here leaves the registration's outputs as they are, with a note."""
        outcome.trace = ConvergenceTrace.from_report(outcome.report.get("method_trace")) or self.trace
        if not len(outcome.trace):
            return
        try:
            nodes = update_convergence_nodes(scene, outcome.trace, self.moduleName)
        except Exception as exc:  # noqa: BLE001 - the registration itself succeeded; say what is missing
            logging.exception("%s: convergence plot", self.moduleName)
            outcome.notes.append(f"The convergence table and plot could not be made ({exc}).")
            return
        outcome.convergence = {key: nodes[key] for key in ("table", "chart", "series")}
        outcome.created_node_ids += nodes["created"]

    def method_option_values(self, parameters, status=None) -> dict:
        """The method-specific options of ``parameters`` (the module's :attr:`methodOptions`) as engine options,
        including ``model`` when a control chooses it. Raises ``mmreg.InputError`` for unusable choices."""
        status = status or self.method_status()
        return self.methodOptions.engine_options(self.methodOptions.values(parameters), status)

    def _options_from_parameters(self, parameters, options: dict) -> tuple:
        """``(status, model, options)`` for a run from ``parameters``: the module's method-specific options when
        its own method runs and the symmetric checkbox where it applies (keyword ``options`` take precedence), the
        model they or the shared selector choose."""
        status = self.method_status(options.get("method"))
        model = parameters.model or None
        own = options.get("method", self.method_name) == self.method_name
        if own and status.available and self.methodOptions.parameters:
            chosen = self.method_option_values(parameters, status)
            if self.methodOptions.controls_parameter("model"):
                model = chosen.pop("model", None) or None
            options = dict(chosen, **options)
        options = dict(self._symmetric_option(parameters, status, model), **options)
        return status, model, options

    @staticmethod
    def _symmetric_option(parameters, status, model) -> dict:
        """``{"symmetric": True}`` when the panel's checkbox is on and applies to the method and the chosen model
        (:func:`panel.symmetric_control`), else ``{}`` (the method's default, off); built by
        :func:`panel.engine_options` like the other shared controls."""
        if not getattr(parameters, "symmetric", False) or not panel.symmetric_control(status, model or "")[0]:
            return {}
        return panel.engine_options(status, symmetric=True)

    def run_with_parameters(self, parameters, progress=None, **options) -> RegistrationOutcome:
        """Run from a parameter node (the panel's Apply); the outputs made are written back into it.

        Controls the method does not have (refinement steps, diffeomorphic, symmetric) are not passed, nor
        the diffeomorphic checkbox of a method whose trained model decides it, nor the symmetric one for a
        model that predicts a displacement (:func:`panel.symmetric_control`). The module's
        method-specific options (:attr:`methodOptions`) are passed when its own method runs (not
        for another ``method=``); keyword ``options`` given here take precedence. The extra maps of
        :attr:`extra_image_outputs` are made when switched on (their ``enable_parameter``), into
        the node of their ``output_parameter`` when one is chosen (written back after the run).
        """
        status, model, options = self._options_from_parameters(parameters, options)
        own = options.get("method", self.method_name) == self.method_name
        extra_names, extra_nodes = [], {}
        for spec in self.extra_image_outputs if own else ():
            if spec.enable_parameter and not getattr(parameters, spec.enable_parameter):
                continue
            extra_names.append(spec.name)
            chosen_node = getattr(parameters, spec.output_parameter) if spec.output_parameter else None
            if chosen_node is not None:
                extra_nodes[spec.name] = chosen_node
        outcome = self.run(
            parameters.fixedVolume, parameters.movingVolume, parameters.movingSegmentation,
            parameters.fixedSegmentation, model=model, device=parameters.device or "auto",
            affine=parameters.affine,
            refinement_steps=parameters.refinementSteps if status.supports_refinement else None,
            diffeomorphic=parameters.diffeomorphic if status.supports_diffeomorphic else None,
            output_transform=parameters.outputTransform, output_volume=parameters.outputVolume,
            output_segmentation=parameters.outputSegmentation,
            place_moving_under_transform=parameters.placeMovingUnderTransform, extra_images=extra_names,
            output_extra_images=extra_nodes, progress=progress, **options)
        parameters.outputTransform = outcome.transform_node
        parameters.outputVolume = outcome.volume_node
        if outcome.segmentation_node is not None:
            parameters.outputSegmentation = outcome.segmentation_node
        for spec in self.extra_image_outputs:
            if spec.output_parameter and spec.name in outcome.extra_nodes:
                setattr(parameters, spec.output_parameter, outcome.extra_nodes[spec.name])
        return outcome

    def show_outcome(self, outcome: RegistrationOutcome, fixed_volume) -> None:
        """Slice views: fixed volume as background, warped volume as foreground (50 %); warped segmentation shown."""
        slicer.util.setSliceViewerLayers(background=fixed_volume, foreground=outcome.volume_node,
                                         foregroundOpacity=0.5, fit=True)
        if outcome.segmentation_node is not None:
            display = outcome.segmentation_node.GetDisplayNode()
            if display is not None:
                display.SetVisibility(True)

    def show_extra_image(self, outcome: RegistrationOutcome, fixed_volume, name: str, opacity: float = 0.5) -> None:
        """Slice views: the fixed volume as background, the volume of the extra map ``name`` (e.g. "attention")
        over it at ``opacity``; nothing when the run made no such volume."""
        node = outcome.extra_nodes.get(name)
        if node is None:
            return
        slicer.util.setSliceViewerLayers(background=fixed_volume, foreground=node, foregroundOpacity=opacity, fit=True)

    # ------------------------------------------------------------------ label propagation
    def propagate_segmentation(self, atlas_volume, atlas_segmentation, target_volumes, *, model: str | None = None,
                               device: str = "auto", affine: bool = True, refinement_steps: int | None = None,
                               diffeomorphic: bool | None = None, method: str | None = None,
                               threads: int | None = None, progress=None, **options) -> list:
        """Copy an annotated volume's segmentation onto several new volumes by registration; returns the new
        segmentation nodes, one per target, in the order of ``target_volumes``.

        ``atlas_volume`` (scalar volume) with ``atlas_segmentation`` (its segments, exported on the
        atlas volume's grid) is registered, as the MOVING image, to each of ``target_volumes`` (the
        FIXED images, scalar volumes; None entries are skipped) with :func:`mmreg.propagation.propagate_labels`;
        its label map is warped onto each target's grid (per-label linear interpolation) and becomes
        a new segmentation node "<atlas segmentation> on <target>" with the atlas segments' IDs, names
        and colours. Options as :meth:`run` (``model`` None: :meth:`default_model_name`; other
        keyword ``options`` go to the engine method). ``progress(fraction, message)`` runs over all
        targets; :meth:`cancel` (or ``progress`` returning False) stops at the next report and
        leaves the scene unchanged. Nodes are made only after every registration finished
        (all-or-nothing); no input is modified and nothing is placed under a transform. Per-target
        runtimes and reports are in :attr:`last_propagation`. Raises ``mmreg.InputError`` for
        unusable inputs (no target, the atlas among the targets, a target twice, a target under a
        transform or a labelmap, an empty segmentation).
        """
        import mmreg
        from mmreg.propagation import propagate_labels
        from mmreg_slicer import bridge
        method, status, model, options = self._engine_call(method, model, options, refinement_steps, diffeomorphic)
        scene, targets = self._check_propagation(atlas_volume, atlas_segmentation, target_volumes)
        self._cancel_requested = False
        self.trace = None
        self.last_propagation = []
        self.is_running = True
        try:
            atlas = bridge.image_from_volume_node(atlas_volume)
            labels, info = self._labels_on_grid(atlas_segmentation, atlas)
            if not np.any(sitk.GetArrayViewFromImage(labels)):
                raise mmreg.InputError(f"The segmentation '{atlas_segmentation.GetName()}' has no voxel inside the "
                                       f"atlas volume '{atlas_volume.GetName()}': choose the segmentation drawn on "
                                       "that volume.")
            images = [bridge.image_from_volume_node(target) for target in targets]
            self._check_cancel()
            t0 = time.perf_counter()
            propagated = propagate_labels(atlas, labels, images, method=method, model=model or None, device=device,
                                          affine=affine, threads=threads, progress=self._progress(progress), **options)
            logging.info("%s: propagation to %d volume(s) with '%s' took %.1f s", self.moduleName, len(targets),
                         method, time.perf_counter() - t0)
            self._check_cancel()
            nodes = self._make_propagated(scene, atlas_segmentation, targets, propagated, info)
        finally:
            self.is_running = False
        self.last_propagation = [PropagatedSegmentation(target, node, item.seconds, item.result)
                                 for target, node, item in zip(targets, nodes, propagated)]
        return nodes

    def propagate_with_parameters(self, parameters, progress=None, **options) -> list:
        """:meth:`propagate_segmentation` from a parameter node (the panel's "Propagate segmentation"): the atlas is
        its ``movingVolume`` with its ``movingSegmentation``, the targets its ``targetVolumes``; model,
        device, affine, refinement and the module's own options as for :meth:`run_with_parameters`."""
        status, model, options = self._options_from_parameters(parameters, options)
        return self.propagate_segmentation(
            parameters.movingVolume, parameters.movingSegmentation, list(parameters.targetVolumes), model=model,
            device=parameters.device or "auto", affine=parameters.affine,
            refinement_steps=parameters.refinementSteps if status.supports_refinement else None,
            diffeomorphic=parameters.diffeomorphic if status.supports_diffeomorphic else None,
            progress=progress, **options)

    @staticmethod
    def _check_propagation(atlas_volume, atlas_segmentation, target_volumes) -> tuple:
        """Readable errors for unusable propagation inputs; returns ``(scene, targets without None)``."""
        from mmreg import InputError
        problem = panel.propagation_problem(atlas_volume, atlas_segmentation, target_volumes)
        if problem:
            raise InputError(problem)
        targets = [t for t in target_volumes if t is not None]
        scene = atlas_volume.GetScene()
        if scene is None or any(n.GetScene() is not scene for n in [atlas_segmentation] + targets):
            raise InputError("The atlas, its segmentation and the targets must be nodes of the same scene.")
        return scene, targets

    @staticmethod
    def _make_propagated(scene, atlas_segmentation, targets, propagated, info) -> list:
        """A new segmentation node per target ("<atlas segmentation> on <target>"); all-or-nothing."""
        from mmreg_slicer import bridge
        made = []
        try:
            for target, item in zip(targets, propagated):
                name = scene.GenerateUniqueName(f"{atlas_segmentation.GetName()} on {target.GetName()}")
                made.append(bridge.segmentation_node_from_labelmap_image(item.labels, scene, name, info))
        except Exception:
            remove_nodes(made)
            raise
        return made

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _check_nodes(fixed_volume, moving_volume, moving_segmentation, fixed_segmentation, output_transform,
                     output_volume, output_segmentation):
        """Readable errors for unusable node choices; returns the scene."""
        from mmreg import InputError
        if fixed_volume is None or moving_volume is None:
            raise InputError(f"Select the {'fixed' if fixed_volume is None else 'moving'} volume.")
        if fixed_volume is moving_volume or (fixed_volume.GetID() and fixed_volume.GetID() == moving_volume.GetID()):
            raise InputError("The fixed and moving volumes must be two different volumes.")
        scene = fixed_volume.GetScene()
        given = [n for n in (moving_volume, moving_segmentation, fixed_segmentation, output_transform, output_volume,
                             output_segmentation) if n is not None]
        if scene is None or any(n.GetScene() is not scene for n in given):
            raise InputError("All inputs and outputs must be nodes of the same scene.")
        if fixed_volume.GetParentTransformNode() is not None:
            raise InputError(f"The fixed volume '{fixed_volume.GetName()}' is under the transform "
                             f"'{fixed_volume.GetParentTransformNode().GetName()}'. The result is defined on the fixed "
                             "volume's own grid: harden that transform (Transforms module) or remove it first.")
        if output_volume is not None and output_volume in (fixed_volume, moving_volume):
            raise InputError("The output volume must not be the fixed or the moving volume: choose 'Create new'.")
        if output_segmentation is not None and output_segmentation in (moving_segmentation, fixed_segmentation):
            raise InputError("The output segmentation must not be an input segmentation: choose 'Create new'.")
        for node, what in ((moving_segmentation, "moving segmentation"), (fixed_segmentation, "fixed segmentation")):
            if node is not None and not node.IsA("vtkMRMLSegmentationNode"):
                raise InputError(f"The {what} must be a segmentation node, not a {node.GetClassName()}.")
        return scene

    def _extra_outputs(self, method: str, extra_images, output_extra_images, scene, inputs) -> list:
        """``[(ExtraImageOutput, chosen node or None)]`` of the extra maps to show (see :meth:`run`); readable
        errors for unusable output nodes (``inputs``: the nodes an output must not be)."""
        from mmreg import InputError
        declared = {spec.name: spec for spec in self.extra_image_outputs}
        if extra_images is None:
            names = list(declared) if method == self.method_name else []
        elif isinstance(extra_images, str):
            names = [extra_images]
        else:
            names = list(dict.fromkeys(str(name) for name in extra_images))
        chosen = {str(k): v for k, v in (output_extra_images or {}).items() if v is not None}
        unused = sorted(set(chosen) - set(names))
        if unused:
            raise InputError(f"An output volume is given for the map(s) {', '.join(unused)}, which this run does not "
                             f"make (it makes: {', '.join(names) or 'none'}).")
        for name, node in chosen.items():
            if node.GetScene() is not scene:
                raise InputError("All inputs and outputs must be nodes of the same scene.")
            if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise InputError(f"The output of the '{name}' map must be a scalar volume, not a "
                                 f"{node.GetClassName()}.")
            if any(node is other for other in inputs if other is not None):
                raise InputError(f"The output of the '{name}' map must not be an input or the warped volume: choose "
                                 "'Create new'.")
        if len(set(map(id, chosen.values()))) != len(chosen):
            raise InputError("Two maps cannot be written into the same output volume.")
        return [(declared.get(name) or ExtraImageOutput(name, name), chosen.get(name)) for name in names]

    @staticmethod
    def _labels_on_grid(segmentation_node, reference: sitk.Image) -> tuple:
        """The segments as one label image on ``reference``'s grid (local coordinates) and their info."""
        from mmreg_slicer import bridge
        labels, info = bridge.segmentation_to_labelmap_image(segmentation_node)
        labels = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
        return labels, info

    def _engine_inputs(self, fixed_volume, moving_volume, moving_segmentation, fixed_segmentation) -> dict:
        """SimpleITK images (LPS) for the engine, label maps on the image grids, segment info and notes."""
        from mmreg_slicer import bridge
        out = {"fixed": bridge.image_from_volume_node(fixed_volume),
               "moving": bridge.image_from_volume_node(moving_volume),
               "fixed_labels": None, "moving_labels": None, "moving_info": None, "scored": None, "notes": []}
        if moving_segmentation is not None:
            out["moving_labels"], out["moving_info"] = self._labels_on_grid(moving_segmentation, out["moving"])
        if fixed_segmentation is not None:
            if moving_segmentation is None:
                out["notes"].append("The fixed segmentation is only used to score a warped moving segmentation; "
                                    "select a moving segmentation to get Dice.")
            else:
                labels, info = self._labels_on_grid(fixed_segmentation, out["fixed"])
                labels, matched, unmatched = match_segments(labels, info, out["moving_info"])
                if matched:
                    out["fixed_labels"], out["scored"] = labels, matched
                if unmatched:
                    out["notes"].append("Fixed segments without a moving segment of the same name (not scored): "
                                        + ", ".join(unmatched) + ".")
        return out

    def _make_outputs(self, scene, result, fixed_volume, moving_volume, moving_info, output_transform,
                      output_volume, output_segmentation, extras=()) -> RegistrationOutcome:
        """New nodes for the result (bridge), then moved into the chosen output nodes; all-or-nothing.
        ``extras``: ``[(ExtraImageOutput, chosen node or None)]`` of the extra maps to show."""
        from mmreg_slicer import bridge
        created = []
        base = moving_volume.GetName()
        try:
            transform = bridge.grid_transform_node_from_displacement(
                result.displacement, scene, scene.GenerateUniqueName(f"{base} to {fixed_volume.GetName()}"))
            created.append(transform)
            volume = bridge.volume_node_from_image(result.warped, scene, scene.GenerateUniqueName(f"{base} registered"))
            created.append(volume)
            segmentation = None
            if result.warped_labels is not None:
                segmentation = bridge.segmentation_node_from_labelmap_image(
                    result.warped_labels, scene, scene.GenerateUniqueName(f"{base} segmentation registered"),
                    moving_info)
                created.append(segmentation)
            extra_made = []
            for spec, target in extras:
                image = result.extra_images.get(spec.name)
                if image is None:
                    continue
                node = bridge.scalar_map_node_from_image(image, scene, scene.GenerateUniqueName(f"{base} {spec.label}"),
                                                         spec.value_range, spec.color_node_id)
                created.append(node)
                extra_made.append((spec, target, node))
        except Exception:
            remove_nodes(created)
            raise
        kept = []
        for target, made in ((output_transform, transform), (output_volume, volume),
                             (output_segmentation, segmentation)) + tuple((t, n) for _, t, n in extra_made):
            if made is None:
                continue
            if target is None:
                kept.append(made)
                continue
            target.CopyContent(made, True)
            if not target.IsA("vtkMRMLTransformNode") and target.GetDisplayNode() is None:
                target.CreateDefaultDisplayNodes()
                spec = next((spec for spec, t, _ in extra_made if t is target), None)
                if spec is not None:  # a chosen map node without a display gets the map's one
                    bridge.set_scalar_display(target, spec.value_range, spec.color_node_id)
            remove_nodes([made])
        chosen = {"transform": output_transform or transform, "volume": output_volume or volume,
                  "segmentation": (output_segmentation or segmentation) if segmentation is not None else None}
        return RegistrationOutcome(chosen["transform"], chosen["volume"], chosen["segmentation"], result,
                                   created_node_ids=[n.GetID() for n in kept],
                                   extra_nodes={spec.name: target or node for spec, target, node in extra_made})
