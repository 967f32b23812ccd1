"""The LearnedMetric module headless: its Slicer self-test, its method-specific options (metric selector,
transformation model, spacing, levels, iterations) and the framework pieces it brought (combo boxes bound
to several parameters, method options, convergence trace, table and chart).

Registrations run the engine's ``metric`` method with mutual information on the small phantom pair (a 4 mm
grid, about 30 iterations): no trained model is needed. Where the engine has no ``metric`` method the
registration checks are skipped (the self-test then checks that the module says so).
"""
from __future__ import annotations

import importlib
import json
import math
from types import SimpleNamespace

import pytest

import mmreg
from MMRegCommonLib.testing import node_ids

HAS_METRIC = "metric" in mmreg.method_names()
needs_metric = pytest.mark.skipif(not HAS_METRIC, reason="the engine has no 'metric' method yet")


@pytest.fixture
def module():
    return importlib.import_module("LearnedMetric")


@pytest.fixture
def options():
    return importlib.import_module("LearnedMetricLib.options")


ENGINE_OPTIONS = {"model": None, "similarity": "learned", "transform": "bspline", "control_spacing_mm": 16.0,
                  "levels": 2, "iterations_similarity": 40, "iterations_bspline": 60, "learning_rate": None,
                  "mi_bins": 75, "spacing": None, "max_voxels": 2_000_000}


def status_with(models=(), options=None, available=True):
    """A method status like the engine's for 'metric' with the given model listing entries."""
    from MMRegCommonLib import panel
    return panel.MethodStatus("metric", available, "" if available else "Method 'metric' is not available.",
                              models=[panel.model_choice(m) for m in models],
                              options=dict(ENGINE_OPTIONS if options is None else options))


def defaults(**changes) -> dict:
    values = {"metric": "learned", "model": "", "transformModel": "bspline", "controlPointSpacing": 16.0,
              "levels": 2, "similarityIterations": 40, "bsplineIterations": 60}
    values.update(changes)
    return values


# ---------------------------------------------------------------------------- the self-test
def test_self_test_runs_headless(module, scene):
    """The same test class Slicer's Self Tests run: all its checks, via runTest()."""
    module.LearnedMetricTest().runTest()


def test_module_description(module):
    parent = SimpleNamespace()
    module.LearnedMetric(parent)
    assert parent.title == "Learned Metric Registration"
    assert parent.categories == ["Registration.Learning-based"]
    assert "--method metric" in parent.helpText and "control-point spacing" in parent.helpText
    assert "getModuleLogic('LearnedMetric')" in parent.helpText


@needs_metric
def test_parameter_defaults_are_the_engines(module, scene):
    """The parameter node starts from the engine's own defaults, and the options cover every control."""
    engine = mmreg.get_method("metric").default_options()
    params = module.LearnedMetricLogic().getParameterNode()
    assert (params.metric, params.transformModel, params.controlPointSpacing, params.levels,
            params.similarityIterations, params.bsplineIterations) == (
        engine["similarity"], engine["transform"], engine["control_spacing_mm"], engine["levels"],
        engine["iterations_similarity"], engine["iterations_bspline"])
    assert {c.option for c in module.METHOD_OPTIONS.controls} <= set(engine)
    assert "refinement_steps" not in engine and "diffeomorphic" not in engine  # hence the hidden shared rows


# ---------------------------------------------------------------------------- metric selector
def test_modality_labels(options):
    assert options.modality_label("MR-MR (T1/T2/PD)") == "MR-MR (T1/T2/PD)"
    assert options.modality_label(["T1", "T2", "PD"]) == "MR-MR (T1/T2/PD)"
    assert options.modality_label(["CT", "MR"]) == "CT-MR"
    assert options.modality_label({"fixed": "CT", "moving": ["T1"]}) == "CT-MR (T1)"
    assert options.modality_label([["T1", "T2"], ["T1", "PD"]]) == "MR-MR (T1/T2/PD)"
    assert options.modality_label(None) == "" and options.modality_label([]) == ""
    assert options.modality_label(["T1-T2", "T1-PD", "T2-PD", "IXI-synth"]) == "MR-MR (T1/T2/PD)"  # a recipe's pairs
    assert options.modality_label(["IXI-synth", "T1-PD", "T1-T2", "T2-PD"]) == "MR-MR (T1/T2/PD)"  # metric_mr's card
    assert options.modality_label(["pairs"]) == "" and options.modality_label(["US", "X"]) == ""


def test_metric_selector_lists_learned_metrics_then_mi(options, tmp_path):
    # A shipped card listing its modalities in the engine's listing, one read from the card's training
    # record, and a fine-tuned user model without modalities.
    card = tmp_path / "metric_ctmr"
    card.mkdir()
    (card / "model.json").write_text(json.dumps({"training": {"modalities": ["CT", "MR"]}}))
    status = status_with([
        {"name": "metric_mr", "source": "shipped", "modalities": ["T1", "T2", "PD"], "description": "IXI pairs."},
        {"name": "metric_ctmr", "source": "shipped", "path": str(card), "description": "CT-MR pairs."},
        {"name": "mine", "source": "user", "path": str(tmp_path / "missing")},
    ])
    items = options.metric_items(status)
    assert [value for value, _, _ in items] == [("learned", "metric_mr"), ("learned", "metric_ctmr"),
                                                ("learned", "mine"), ("mi", ""), ("mi_masked", "")]
    assert [label for _, label, _ in items] == [
        "Learned: MR-MR (T1/T2/PD) — metric_mr", "Learned: CT-MR — metric_ctmr", "Learned metric — mine (fine-tuned)",
        "Mutual information (75 bins)", "Mutual information, background masked"]
    assert items[0][2] == "IXI pairs."
    bins = options.metric_items(status_with(options=dict(ENGINE_OPTIONS, mi_bins=50)))
    assert bins[0][0] == ("learned", "") and "none installed" in bins[0][1]
    assert bins[1][1] == "Mutual information (50 bins)"
    combos = options.METHOD_OPTIONS.combo_items(status_with(available=False))
    assert combos["metric,model"][0][1] == "Not available" and len(combos["transformModel"]) == 2


def test_default_learned_model_and_resolve(options):
    mo = options.METHOD_OPTIONS
    two = status_with([{"name": "mine", "source": "user"}, {"name": "metric_ctmr", "source": "shipped"},
                       {"name": "metric_mr", "source": "shipped"}])
    engine_default = options.engine_default_model()
    if HAS_METRIC:  # the engine names its default learned metric: the panel picks the same one
        assert engine_default == "metric_mr" and options.default_learned_model(two) == "metric_mr"
    ct_only = status_with([{"name": "mine", "source": "user"}, {"name": "metric_ctmr", "source": "shipped"},
                           {"name": "other", "source": "shipped"}])
    assert options.default_learned_model(ct_only) == "metric_ctmr"  # otherwise the first shipped one
    assert options.default_learned_model(status_with([{"name": "default", "source": "user"}, "b"])) == "default"
    assert options.default_learned_model(status_with()) == ""
    # A learned metric without a model (or with one no longer installed) gets the default one, written back.
    assert mo.changes(defaults(), ct_only) == {"model": "metric_ctmr"}
    assert mo.changes(defaults(model="deleted"), ct_only) == {"model": "metric_ctmr"}
    assert mo.changes(defaults(model="metric_mr"), two) == {}
    # Mutual information runs without a model.
    assert mo.changes(defaults(metric="mi", model="metric_mr"), two) == {"model": ""}
    # Nothing installed: the choice stays, without a model (Apply says why it cannot run).
    assert mo.changes(defaults(), status_with()) == {}
    assert mo.changes(defaults(model="metric_mr"), status_with()) == {"model": ""}


def test_options_reach_the_engine_as_its_option_names(options):
    mo = options.METHOD_OPTIONS
    two = status_with([{"name": "metric_mr", "source": "shipped"}, {"name": "metric_ctmr", "source": "shipped"}])
    assert mo.engine_options(defaults(model="metric_mr", controlPointSpacing=12.5, levels=3), two) == {
        "similarity": "learned", "model": "metric_mr", "transform": "bspline", "control_spacing_mm": 12.5,
        "levels": 3, "iterations_similarity": 40, "iterations_bspline": 60}
    # MI: no model; similarity only: no control points and no B-spline iterations (the method's defaults).
    assert mo.engine_options(defaults(metric="mi_masked", model="metric_mr", transformModel="similarity",
                                      similarityIterations=25), two) == {
        "similarity": "mi_masked", "transform": "similarity", "levels": 2, "iterations_similarity": 25}
    assert isinstance(mo.engine_options(defaults(metric="mi", levels=2), two)["levels"], int)
    with pytest.raises(mmreg.InputError, match="No learned metric is installed"):
        mo.engine_options(defaults(), status_with())
    with pytest.raises(mmreg.InputError, match="Unknown metric 'ncc'"):
        mo.engine_options(defaults(metric="ncc"), two)
    with pytest.raises(mmreg.InputError, match="Unknown transformation model 'affine'"):
        mo.engine_options(defaults(metric="mi", transformModel="affine"), two)
    # An engine without an option the panel sets: the mismatch is named.
    older = status_with(options={k: v for k, v in ENGINE_OPTIONS.items() if k != "iterations_bspline"})
    with pytest.raises(mmreg.InputError, match="no option 'iterations_bspline'.*bsplineIterations"):
        mo.engine_options(defaults(metric="mi"), older)


def test_controls_follow_the_transformation_model(options):
    mo = options.METHOD_OPTIONS
    status = status_with([{"name": "metric_mr", "source": "shipped"}])
    states = mo.control_states(defaults(transformModel="similarity"), status)
    assert states["controlPointSpacing"] == (False, "Used only by the B-spline stage; 'Similarity only' has none.")
    assert states["bsplineIterations"][0] is False and states["similarityIterations"] == (True, "")
    assert states["model"] == (True, "")  # learned metric: its model is chosen
    assert mo.control_states(defaults(metric="mi"), status)["model"][0] is False
    assert all(enabled for enabled, _ in mo.control_states(defaults(), status).values())
    gone = mo.control_states(defaults(), status_with(available=False))
    assert all(state == (False, "Method 'metric' is not available.") for state in gone.values())
    from MMRegCommonLib.methodoptions import combined_state
    mi = mo.control_states(defaults(metric="mi"), status)
    assert combined_state(mi, ("metric", "model")) == (True, "")  # the selector setting both stays enabled
    assert combined_state(mi, ("model",)) == (False, "") and combined_state(mi, ("device",)) is None
    assert combined_state(gone, ("metric", "model")) == (False, "Method 'metric' is not available.")


def test_info_line_says_what_the_metric_is(options):
    mo = options.METHOD_OPTIONS
    status = status_with([{"name": "metric_mr", "source": "shipped", "modalities": "MR-MR (T1/T2/PD)",
                           "description": "Patch metric trained on IXI T1/T2/PD. Second sentence."}])
    assert mo.info_text(defaults(), status) == ("Learned metric 'metric_mr', trained on MR-MR (T1/T2/PD) pairs. "
                                                "Patch metric trained on IXI T1/T2/PD.")
    assert "75 bins" in mo.info_text(defaults(metric="mi"), status)
    assert "foreground" in mo.info_text(defaults(metric="mi_masked"), status)
    assert "No learned metric is installed" in mo.info_text(defaults(), status_with())
    assert mo.info_text(defaults(), status_with(available=False)) == ""


def test_apply_waits_for_a_usable_metric(options):
    from MMRegCommonLib import panel

    class Node:
        def __init__(self, node_id):
            self.node_id = node_id

        def GetID(self):
            return self.node_id

    empty = status_with()
    problem = options.METHOD_OPTIONS.problem(defaults(), empty)
    assert panel.apply_state(empty, Node("a"), Node("b"), option_problem=problem) == (False, problem)
    assert panel.apply_state(empty, None, Node("b"), option_problem=problem)[1].startswith("Select the fixed")
    assert panel.apply_state(empty, Node("a"), Node("b"), option_problem=None)[0] is True


# ---------------------------------------------------------------------------- framework pieces
def test_combo_boxes_bound_to_several_parameters():
    from MMRegCommonLib.combos import combo_names, decode_choice, encode_choice
    assert combo_names("metric, model") == ("metric", "model") and combo_names("device") == ("device",)
    data = encode_choice(("learned", "metric_mr"))
    assert decode_choice(data, 2) == ("learned", "metric_mr")
    assert encode_choice("cpu") == "cpu" and decode_choice("cpu", 1) == ("cpu",)
    assert decode_choice("not json", 2) == ("", "") and decode_choice(encode_choice(("a",)), 2) == ("", "")


def test_shared_rows_hidden_for_a_method_without_them():
    from MMRegCommonLib import panel
    assert panel.shared_control_visibility(status_with()) == {"refinementSteps": False, "diffeomorphic": False,
                                                              "symmetric": False}
    assert panel.shared_control_visibility(status_with(available=False)) == {"refinementSteps": True,
                                                                            "diffeomorphic": True, "symmetric": True}
    mi_like = panel.MethodStatus("mi", True, options={"refinement_steps": 0, "diffeomorphic": None,
                                                      "symmetric": False})
    assert panel.shared_control_visibility(mi_like) == {"refinementSteps": True, "diffeomorphic": True,
                                                        "symmetric": True}
    assert panel.shared_control_visibility(panel.method_status("optimize")) == {"refinementSteps": False,
                                                                                "diffeomorphic": True,
                                                                                "symmetric": False}


def point(stage, level, iteration, value, levels=2, iterations=3):
    return {"stage": stage, "level": level, "levels": levels, "iteration": iteration, "iterations": iterations,
            "value": value}


def test_convergence_trace_from_progress_and_from_the_report():
    from MMRegCommonLib.convergence import ConvergenceTrace, log_line, sparkline
    live = ConvergenceTrace("mi")
    for i, v in enumerate([-0.2, -0.5, -0.6], 1):
        live.add(point("similarity", 1, i, v))
    live.add(point("similarity", 2, 1, -0.4))
    live.add(point("B-spline", 1, 1, -0.7))
    live.add(point("B-spline", 1, 1, -0.71))  # the count restarted: a new stage record
    assert [(s.name, len(s.values)) for s in live.stages] == [
        ("similarity level 1/2", 3), ("similarity level 2/2", 1), ("B-spline level 1/2", 1),
        ("B-spline level 1/2", 1)]
    assert live.count == len(live) == 6
    assert live.rows()[:4] == [(1, 0, 1, -0.2), (2, 0, 2, -0.5), (3, 0, 3, -0.6), (4, 1, 1, -0.4)]
    assert live.summary_lines() == ["similarity level 1/2:  -0.2 → -0.6   █▃▁  (3/3 it.)",  # aligned columns
                                    "similarity level 2/2:  -0.4 → -0.4   ▄    (1/3 it.)",
                                    "B-spline level 1/2:    -0.7 → -0.7   ▄    (1/3 it.)",
                                    "B-spline level 1/2:   -0.71 → -0.71  ▄    (1/3 it.)"]
    assert log_line(point("B-spline", 2, 7, -0.0312, iterations=60)) == "B-spline 2/2  it.   7/60  metric -0.0312"

    report = {"similarity": "mi", "levels": [2, 1], "stages": [
        {"stage": "similarity", "level": 1, "factor": 2, "values": [0.5, 0.4]},
        {"stage": "similarity", "level": 2, "factor": 1, "values": [0.3]},
        {"stage": "B-spline", "level": 1, "factor": 2, "values": [0.2, 0.1, 0.05], "control_points": 64}]}
    trace = ConvergenceTrace.from_report(report)
    assert [(s.name, s.values, s.steps) for s in trace.stages] == [
        ("similarity level 1/2", [0.5, 0.4], [1, 2]), ("similarity level 2/2", [0.3], [1]),
        ("B-spline level 1/1", [0.2, 0.1, 0.05], [1, 2, 3])]
    assert trace.similarity == "mi" and len(trace) == 6
    assert ConvergenceTrace.from_report(None) is None and ConvergenceTrace.from_report({"stages": []}) is None

    assert sparkline([]) == "" and sparkline([1.0, 1.0]) == "▄▄"
    assert sparkline(range(100), width=8) == "▁▂▃▄▅▆▇█" and sparkline([3.0, math.nan, 1.0]) == "█▁"


def test_convergence_table_and_chart_are_reused(scene):
    from MMRegCommonLib.convergence import OWNER_ATTRIBUTE, ConvergenceTrace, update_convergence_nodes
    trace = ConvergenceTrace.from_report({"similarity": "mi", "stages": [
        {"stage": "similarity", "level": 1, "values": [0.5, 0.4]},
        {"stage": "B-spline", "level": 1, "values": [0.3, 0.2, 0.1]}]})
    nodes = update_convergence_nodes(scene, trace, "LearnedMetric")
    table, chart = nodes["table"], nodes["chart"]
    assert len(nodes["created"]) == 4 and table.GetAttribute(OWNER_ATTRIBUTE) == "LearnedMetric"
    vtk_table = table.GetTable()
    assert [vtk_table.GetColumnName(i) for i in range(vtk_table.GetNumberOfColumns())] == [
        "iteration", "stage", "level", "stage iteration", "metric", "similarity L1", "B-spline L1"]
    assert [vtk_table.GetValueByName(i, "iteration").ToDouble() for i in range(5)] == [1, 2, 3, 4, 5]
    assert vtk_table.GetValueByName(2, "stage").ToString() == "B-spline"
    assert [vtk_table.GetValueByName(i, "stage iteration").ToInt() for i in range(5)] == [1, 2, 1, 2, 3]
    spline = [vtk_table.GetValueByName(i, "B-spline L1").ToDouble() for i in range(5)]
    assert all(math.isnan(v) for v in spline[:2]) and spline[2:] == [0.3, 0.2, 0.1]
    assert chart.GetNumberOfPlotSeriesNodes() == 2 and chart.GetTitle() == "LearnedMetric: mi per iteration"
    series = chart.GetNthPlotSeriesNode(1)
    assert (series.GetXColumnName(), series.GetYColumnName(), series.GetTableNodeID()) == (
        "iteration", "B-spline L1", table.GetID())
    # The next run: same table and chart, new series (the old ones removed), nothing else left behind.
    before = node_ids(scene)
    shorter = ConvergenceTrace.from_report({"stages": [{"stage": "similarity", "level": 1, "values": [1.0]}]})
    again = update_convergence_nodes(scene, shorter, "LearnedMetric", title="Run 2")
    assert (again["table"], again["chart"]) == (table, chart) and table.GetNumberOfRows() == 1
    assert chart.GetNumberOfPlotSeriesNodes() == 1 and chart.GetTitle() == "Run 2"
    assert len(node_ids(scene) - before) == 1 and len(before - node_ids(scene)) == 2
    # Another module keeps its own.
    other = update_convergence_nodes(scene, shorter, "OtherModule")
    assert other["table"] is not table


# ---------------------------------------------------------------------------- Logic
def test_learned_metric_without_a_model_is_a_readable_error(module, scene, case, tmp_path, monkeypatch):
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "user"))
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "shipped"))
    logic = module.LearnedMetricLogic()
    status = logic.method_status()
    if not HAS_METRIC:
        assert not status.available and "Method 'metric' is not available" in status.reason
        return
    assert status.available and status.models == []  # MI needs no model: the method is usable
    params = logic.getParameterNode()
    params.fixedVolume, params.movingVolume = case["fixed"], case["moving"]
    before = node_ids(scene)
    with pytest.raises(mmreg.InputError, match="No learned metric is installed: choose mutual information"):
        logic.run_with_parameters(params)
    with pytest.raises(mmreg.InputError, match="(?i)learned"):
        logic.run(case["fixed"], case["moving"], similarity="learned")
    params.metric = "ncc"
    with pytest.raises(mmreg.InputError, match="Unknown metric 'ncc'"):
        logic.run_with_parameters(params)
    assert node_ids(scene) == before and case["moving"].GetParentTransformNode() is None


@needs_metric
def test_another_method_gets_no_metric_options(module, scene, case):
    """The module's options go with its own method only (the self-test's fallback runs 'optimize')."""
    logic = module.LearnedMetricLogic()
    params = logic.getParameterNode()
    params.fixedVolume, params.movingVolume = case["fixed"], case["moving"]
    params.metric, params.placeMovingUnderTransform = "mi", False
    outcome = logic.run_with_parameters(params, method="optimize", levels=1, iterations=[2])
    used = outcome.report["options"]
    assert "transform" not in used and "iterations_similarity" not in used and used.get("similarity") != "mi"
    assert outcome.trace is None and outcome.convergence is None and logic.trace is None


def test_widget_logic_for_method_controls_and_live_convergence(module, scene, case):
    """The shared Widget's parts that LearnedMetric brought, run on stand-in widgets (Qt is not needed for them):
    resolved choices written back, controls enabled for the transformation model, the info line, Apply's reason,
    and the live convergence log and sparklines."""
    from MMRegCommonLib.convergence import ConvergenceTrace
    from MMRegCommonLib.widget import RegistrationWidget

    logic = module.LearnedMetricLogic()
    params = logic.getParameterNode()
    params.fixedVolume, params.movingVolume = case["fixed"], case["moving"]
    controls = {name: [SimpleNamespace(enabled=True, toolTip="")] for name in module.METHOD_OPTIONS.parameters}
    controls["model"] = controls["metric"]  # one selector sets both (as _widgetsByParameter finds it)
    log = []
    ui = SimpleNamespace(methodOptionsInfoLabel=SimpleNamespace(text=""), applyButton=SimpleNamespace(),
                         statusLabel=SimpleNamespace(text=""), convergenceLabel=SimpleNamespace(text=""),
                         convergenceLog=SimpleNamespace(appendPlainText=log.append, clear=log.clear))
    widget = SimpleNamespace(logic=logic, _parameterNode=params, _controls=controls, ui=ui, _shownPoints=0,
                             _status=status_with([{"name": "metric_mr", "source": "shipped",
                                                   "modalities": ["T1", "T2"]}]))
    widget._controlWidgets = lambda: RegistrationWidget._controlWidgets(widget)
    widget._controlTooltips = {id(w): "From the .ui file." for ws in controls.values() for w in ws}
    RegistrationWidget._updateMethodControls(widget)  # the default learned metric is written into the node
    assert params.model == "metric_mr"
    params.transformModel = "similarity"
    RegistrationWidget._updateMethodControls(widget)
    assert controls["controlPointSpacing"][0].enabled is False and "B-spline stage" in controls[
        "controlPointSpacing"][0].toolTip
    assert controls["levels"][0].enabled is True
    params.transformModel = "bspline"  # enabled again: the .ui's tooltip is back
    RegistrationWidget._updateMethodControls(widget)
    assert controls["controlPointSpacing"][0].enabled is True
    assert controls["controlPointSpacing"][0].toolTip == "From the .ui file."
    params.metric = "mi"  # the selector stays usable (its 'model' part does not apply to MI)
    RegistrationWidget._updateMethodControls(widget)
    RegistrationWidget._updateMethodControls(widget)
    assert params.model == "" and controls["metric"][0].enabled is True
    params.metric = "learned"
    RegistrationWidget._updateMethodControls(widget)
    RegistrationWidget._updateMethodControls(widget)
    assert ui.methodOptionsInfoLabel.text == "Learned metric 'metric_mr', trained on MR-MR (T1/T2) pairs."
    RegistrationWidget._updateApplyState(widget)
    assert ui.applyButton.enabled is True
    widget._status = status_with()  # nothing installed: Apply says why
    RegistrationWidget._updateApplyState(widget)
    assert ui.applyButton.enabled is False and ui.statusLabel.text.startswith("No learned metric is installed")

    logic.trace = ConvergenceTrace("mi")
    for i, value in enumerate([-0.3, -0.5], 1):
        logic.trace.add(point("similarity", 1, i, value, levels=1, iterations=2))
    RegistrationWidget._showLiveConvergence(widget)
    logic.trace.add(point("B-spline", 1, 1, -0.6, levels=1, iterations=5))
    RegistrationWidget._showLiveConvergence(widget)
    RegistrationWidget._showLiveConvergence(widget)  # nothing new: nothing added
    assert log == ["similarity 1/1  it.   1/2  metric -0.3", "similarity 1/1  it.   2/2  metric -0.5",
                   "B-spline 1/1  it.   1/5  metric -0.6"]
    assert ui.convergenceLabel.text.splitlines() == ["similarity level 1/1: -0.3 → -0.5  █▁  (2/2 it.)",
                                                     "B-spline level 1/1:   -0.6 → -0.6  ▄   (1/5 it.)"]


@needs_metric
def test_a_metric_that_sees_the_pair_as_misaligned_warns_with_the_results(module, scene, case, tmp_path):
    """The engine's warning (the learned metric scores the affinely aligned pair above 0: images unlike its
    training data) reaches the user with the results, as a note in the results text and the status log."""
    from MMRegCommonLib.testing import set_constant_output, user_models
    from mmreg.models import ModelCard, save_model
    from mmreg.patch_metric import DEFAULT_METRIC_ARCHITECTURE, patch_metric_network
    network = patch_metric_network()
    set_constant_output(network, [0.8])  # every patch pair scores +0.8: "misaligned"
    card = ModelCard(name="unfamiliar", method="metric", architecture=dict(DEFAULT_METRIC_ARCHITECTURE),
                     spacing_mm=4.0, multiple=1, diffeomorphic=False)
    with user_models(tmp_path):
        save_model(tmp_path / "metric" / "unfamiliar", network, card)
        logic = module.LearnedMetricLogic()
        params = logic.getParameterNode()
        params.fixedVolume, params.movingVolume = case["fixed"], case["moving"]
        params.metric, params.model, params.levels = "learned", "unfamiliar", 1
        params.transformModel, params.similarityIterations = "similarity", 2
        outcome = logic.run_with_parameters(params)
    warnings = [note for note in outcome.notes if note.startswith("Warning: ")]
    assert len(warnings) == 1 and "scores this pair +0.80 before registration" in warnings[0], outcome.notes
    assert warnings[0] in outcome.summary_text() and outcome.report["warnings"] == [warnings[0][len("Warning: "):]]
