"""The MultiscaleRegistration module headless: its Slicer self-test, its options (model selector with the number
of scales, default model, refinement similarity), and its Logic directly: the attention weights volume, label
propagation to several targets, cancel, bad input and the parameter node (with a list of target volumes).

The self-test uses the installed models (the shipped ``multiscale_brain``, ``_2scales`` and ``_1scale``; without
any it runs the engine's ``optimize`` and says so). The Logic tests here use UNTRAINED FMIRNets written to a
temporary model folder: an untrained FMIRNet is the identity (its field heads start at ~1e-5) with attention
sigmoid(2) = 0.8808 everywhere, so the numbers below are exact and do not depend on training; the affine
pre-alignment does the registration work in the propagation checks.
"""
from __future__ import annotations

import importlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

import mmreg
from MMRegCommonLib.testing import node_ids

HAS_MULTISCALE = "multiscale" in mmreg.method_names()
needs_multiscale = pytest.mark.skipif(not HAS_MULTISCALE, reason="the engine has no 'multiscale' method")
#: The attention weight of an untrained FMIRNet (attention convolution zero, bias 2).
UNTRAINED_ATTENTION = 1.0 / (1.0 + math.exp(-2.0))
MODEL_SCALES = {"multiscale_brain": 3, "multiscale_brain_2scales": 2, "multiscale_brain_1scale": 1}


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores and a training job beside the tests: one torch thread, as the timings in the docstrings."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def untrained_models(tmp_path_factory):
    """A model folder with untrained FMIRNets named like the shipped ones (3, 2 and 1 scales)."""
    import torch

    from mmreg.models import ModelCard, save_model
    from mmreg.networks import DEFAULT_MULTISCALE_ARCHITECTURE, fmirnet
    root = tmp_path_factory.mktemp("models")
    for name, scales in MODEL_SCALES.items():
        architecture = dict(DEFAULT_MULTISCALE_ARCHITECTURE, scales=scales)
        torch.manual_seed(scales)
        card = ModelCard(name=name, method="multiscale", architecture=architecture, spacing_mm=4.0, multiple=16,
                         diffeomorphic=False, description=f"Untrained FMIRNet ({scales} scales) for the tests.")
        save_model(root / "multiscale" / name, fmirnet(architecture), card)
    return root


@pytest.fixture
def models(untrained_models, tmp_path, monkeypatch):
    """Only the untrained models are installed (as the user's), none shipped."""
    monkeypatch.setenv("MMREG_MODELS", str(untrained_models))
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "no shipped models"))
    return untrained_models


@pytest.fixture
def module():
    return importlib.import_module("MultiscaleRegistration")


@pytest.fixture
def options():
    return importlib.import_module("MultiscaleRegistrationLib.options")


def status_with(models=(), available=True):
    """A method status like the engine's for 'multiscale' with the given listing entries."""
    from MMRegCommonLib import panel
    opts = {"model": None, "refinement_steps": 0, "refine_similarity": "lncc", "diffeomorphic": None,
            "max_voxels": 4_000_000, "refinement_max_voxels": 2_000_000}
    return panel.MethodStatus("multiscale", available, "" if available else "Method 'multiscale' has no model.",
                              models=[panel.model_choice(m) for m in models], options=opts)


# ---------------------------------------------------------------------------- the self-test
@needs_multiscale
def test_self_test_runs_headless(module, scene):
    """The same test class Slicer's Self Tests run (all its checks, via runTest) with the installed models."""
    module.MultiscaleRegistrationTest().runTest()


def test_module_description(module):
    parent = SimpleNamespace()
    module.MultiscaleRegistration(parent)
    assert parent.title == "Multiscale Registration (FMIRNet)"
    assert parent.categories == ["Registration.Learning-based"]
    assert "--method multiscale" in parent.helpText and "attention" in parent.helpText
    assert "propagate_segmentation" in parent.helpText and "Propagate segmentation" in parent.helpText


# ---------------------------------------------------------------------------- options
@needs_multiscale
def test_parameter_defaults_are_the_engines(module, scene):
    engine = mmreg.get_method("multiscale").default_options()
    params = module.MultiscaleRegistrationLogic().getParameterNode()
    assert params.refineSimilarity == engine["refine_similarity"] == "lncc"
    assert {c.option for c in module.METHOD_OPTIONS.controls} <= set(engine)
    assert engine["diffeomorphic"] is None  # the model decides: the shared checkbox shows the model's value
    assert (params.makeAttention, params.outputAttention, params.targetVolumes) == (True, None, [])
    from mmreg.methods.optimize import SIMILARITIES
    assert {value for value, _, _ in module.METHOD_OPTIONS.combo_items(status_with())["refineSimilarity"]} == set(
        SIMILARITIES)


def test_model_selector_shows_the_scales(options, tmp_path):
    def card(name, architecture):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.json").write_text(json.dumps({"architecture": architecture}))
        return str(folder)

    status = status_with([
        {"name": "multiscale_brain_1scale", "source": "shipped", "path": card("a", {"kind": "fmirnet", "scales": 1})},
        {"name": "multiscale_brain", "source": "shipped", "path": card("b", {"kind": "fmirnet", "scales": 3}),
         "description": "The 3-scale brain network."},
        {"name": "mine", "source": "user", "path": card("c", {"kind": "fmirnet", "scales": 2})},
        {"name": "old", "source": "user", "path": card("d", {"kind": "fmirnet"})},  # the network's default: 3
        {"name": "broken", "source": "shipped", "path": str(tmp_path / "missing")},
    ])
    items = options.model_items(status)
    assert [value for value, _, _ in items] == ["multiscale_brain", "multiscale_brain_1scale", "mine", "old", "broken"]
    assert [label for _, label, _ in items] == [
        "multiscale_brain (3 scales) — default", "multiscale_brain_1scale (1 scale)", "mine (2 scales) (fine-tuned)",
        "old (3 scales) (fine-tuned)", "broken"]
    assert items[0][2] == "The 3-scale brain network."
    assert options.model_items(status_with(available=False))[0][1] == "Not available"


def test_default_model_and_resolve(options, tmp_path):
    mo = options.METHOD_OPTIONS
    three = status_with([{"name": n, "source": "shipped"} for n in
                         ("multiscale_brain_1scale", "multiscale_brain_2scales", "multiscale_brain")])
    assert options.engine_default_model() == "multiscale_brain"
    assert options.default_model(three) == "multiscale_brain"
    mixed = status_with([{"name": "mine", "source": "user"}, {"name": "b", "source": "shipped"}])
    assert options.default_model(mixed) == "b"
    assert options.default_model(status_with([{"name": "only", "source": "user"}])) == "only"
    assert options.default_model(status_with()) == ""
    values = {"model": "", "refineSimilarity": "lncc", "refinementSteps": 0}
    assert mo.changes(values, three) == {"model": "multiscale_brain"}  # the panel shows what Apply runs
    assert mo.changes(dict(values, model="deleted"), three) == {"model": "multiscale_brain"}
    assert mo.changes(dict(values, model="multiscale_brain_1scale"), three) == {}
    assert mo.changes(dict(values, model=str(tmp_path)), three) == {}  # a model folder stays
    assert mo.problem(dict(values, refineSimilarity="ncc"), three).startswith("Unknown refinement similarity 'ncc'")
    assert mo.problem(values, three) is None


def test_refinement_similarity_applies_with_refinement_steps_only(options):
    mo = options.METHOD_OPTIONS
    status = status_with([{"name": "multiscale_brain", "source": "shipped"}])
    off = {"model": "multiscale_brain", "refineSimilarity": "mse", "refinementSteps": 0}
    assert mo.control_states(off, status)["refineSimilarity"] == (False,
                                                                 "Used only with refinement steps > 0 (Options).")
    assert mo.engine_options(off, status) == {"model": "multiscale_brain"}
    on = dict(off, refinementSteps=20)
    assert mo.control_states(on, status)["refineSimilarity"] == (True, "")
    assert mo.engine_options(on, status) == {"model": "multiscale_brain", "refine_similarity": "mse"}
    assert mo.control_states(on, status_with(available=False))["model"] == (False, "Method 'multiscale' has no model.")


@needs_multiscale
def test_info_line_and_diffeomorphic_checkbox_follow_the_model(options, models):
    from MMRegCommonLib import panel
    status = panel.method_status("multiscale")
    assert status.available and status.model_sets_diffeomorphic
    text = options.METHOD_OPTIONS.info_text({"model": "multiscale_brain_2scales"}, status)
    assert text == ("'multiscale_brain_2scales': FMIRNet with 2 scales (full and 1/2 resolution), network grid 4 mm, "
                    "predicts a displacement. Untrained FMIRNet (2 scales) for the tests.")
    enabled, checked, tip = panel.diffeomorphic_control(status, "multiscale_brain")
    assert (enabled, checked) == (False, False) and "displacement field directly" in tip


# ---------------------------------------------------------------------------- the attention volume
def test_bridge_makes_a_map_volume_in_ras(scene):
    """An engine map on an oblique, anisotropic LPS grid lands at the same physical points in RAS; display range and
    colour table as asked."""
    from mmreg_slicer import bridge
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((5, 6, 7)).astype(np.float64))
    image.SetSpacing((0.8, 1.3, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    angle = np.deg2rad(20.0)
    direction = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    image.SetDirection(tuple(direction.ravel()))
    colours = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "My colours")
    node = bridge.scalar_map_node_from_image(image, scene, "A map", value_range=(0.0, 1.0),
                                             color_node_id=colours.GetID())
    import vtk
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    for index in ((0, 0, 0), (6, 5, 4), (3, 1, 2)):
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = np.array(matrix.MultiplyPoint(list(index) + [1.0])[:3])
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)
    assert slicer_array(node).dtype == np.float32
    np.testing.assert_allclose(slicer_array(node), sitk.GetArrayFromImage(image), atol=1e-6)
    display = node.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    assert display.GetColorNodeID() == colours.GetID()
    other = bridge.scalar_map_node_from_image(image, scene, "Auto", color_node_id="vtkMRMLColorTableNodeNotThere")
    assert other.GetDisplayNode().GetAutoWindowLevel() and other.GetDisplayNode().GetColorNodeID() != colours.GetID()
    with pytest.raises(mmreg.InputError, match="is empty"):
        bridge.scalar_map_node_from_image(image, scene, "Bad", value_range=(1.0, 1.0))


def slicer_array(node):
    import slicer
    return slicer.util.arrayFromVolume(node)


@needs_multiscale
def test_attention_volume_of_an_untrained_network(module, models, scene, case):
    """The attention volume is the engine's map on the fixed grid: sigmoid(2) everywhere for an untrained FMIRNet;
    it is listed as created and replaced in a chosen output volume; the report lists the map."""
    logic = module.MultiscaleRegistrationLogic()
    before = node_ids(scene)
    outcome = logic.run(case["fixed"], case["moving"], model="multiscale_brain_1scale", affine=False)
    node = outcome.extra_nodes["attention"]
    assert node.GetName() == "Phantom moving attention weights"
    values = slicer_array(node)
    assert values.shape == (30, 36, 40)
    np.testing.assert_allclose(values, UNTRAINED_ATTENTION, atol=1e-5)
    assert outcome.report["extra_images"] == ["attention"]
    assert "<b>Map 'attention'</b>: volume 'Phantom moving attention weights', values 0.881 to 0.881 (mean 0.881)" in (
        outcome.summary_text())
    assert set(outcome.created_node_ids) == {outcome.transform_node.GetID(), outcome.volume_node.GetID(), node.GetID()}
    assert node_ids(scene) - before == set(outcome.created_node_ids) | {
        n.GetDisplayNode().GetID() for n in (outcome.volume_node, node)}
    # Switched off: no attention volume.
    assert logic.run(case["fixed"], case["moving"], affine=False, extra_images=()).extra_nodes == {}


@needs_multiscale
def test_failure_while_making_the_attention_volume_removes_every_output(module, models, scene, case, monkeypatch):
    from mmreg_slicer import bridge

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bridge, "scalar_map_node_from_image", broken)  # after transform, volume and segmentation
    before = node_ids(scene)
    with pytest.raises(RuntimeError, match="out of memory"):
        module.MultiscaleRegistrationLogic().run(case["fixed"], case["moving"], case["moving_seg"], affine=False)
    assert node_ids(scene) == before
    assert case["moving"].GetParentTransformNode() is None


@needs_multiscale
def test_run_with_parameters_default_model_and_attention_output(module, models, scene, case):
    """From the parameter node: "" runs the default model (the engine's own default among three installed models),
    refinement with the chosen similarity, the attention volume written back into the parameter."""
    from MultiscaleRegistrationLib.options import engine_default_model
    noise = sitk.GetImageFromArray(np.random.default_rng(1).random((16, 16, 16)).astype(np.float32))
    engine_alone = mmreg.register(noise, noise, "multiscale", affine=False)  # the module and the engine agree
    assert engine_alone.report["model_card"]["name"] == engine_default_model() == "multiscale_brain"
    logic = module.MultiscaleRegistrationLogic()
    p = logic.getParameterNode()
    p.fixedVolume, p.movingVolume, p.affine = case["fixed"], case["moving"], False
    p.refinementSteps, p.refineSimilarity = 3, "mse"
    outcome = logic.run_with_parameters(p)
    options = outcome.report["options"]
    assert (options["model"], options["refinement_steps"], options["refine_similarity"]) == (
        "multiscale_brain", 3, "mse")
    assert p.outputAttention is outcome.extra_nodes["attention"]
    again = logic.run_with_parameters(p)
    assert again.extra_nodes["attention"] is p.outputAttention is outcome.extra_nodes["attention"]
    assert len([n for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode") if "attention" in n.GetName()]) == 1


@needs_multiscale
def test_readable_errors_for_bad_attention_outputs(module, models, scene, case):
    logic = module.MultiscaleRegistrationLogic()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "Labels")
    before = node_ids(scene)
    for output, expected in (({"attention": labelmap}, "must be a scalar volume"),
                             ({"attention": case["fixed"]}, "must not be an input"),
                             ({"gates": case["fixed"]}, "which this run does not make")):
        with pytest.raises(mmreg.InputError, match=expected):
            logic.run(case["fixed"], case["moving"], affine=False, output_extra_images=output)
    assert node_ids(scene) == before


# ---------------------------------------------------------------------------- label propagation
@pytest.fixture
def targets(scene, case):
    """The phantom atlas (moving volume + segmentation) and two targets with known labels."""
    from MMRegCommonLib.testing import make_phantom_nodes
    second, _, labels = make_phantom_nodes(scene, "Target B", shift=(-4.0, 5.0, -3.0), size=(36, 34, 30),
                                           spacing=(3.0, 3.0, 3.2), origin=(-54.0, -50.0, -46.0), rotation_deg=-8.0)
    return {"nodes": [case["fixed"], second], "labels": [case["fixed_labels"], labels]}


def dice_of(node, target, labels) -> dict:
    from mmreg.metrics import dice_per_label
    from mmreg_slicer import bridge
    warped, _ = bridge.segmentation_to_labelmap_image(node, target)
    return dice_per_label(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(labels), [1, 2])


@needs_multiscale
def test_propagation_to_several_targets(module, models, scene, case, targets):
    """Untrained network after the affine: each target gets its segmentation (names, IDs, colours of the atlas) on
    its own grid with Dice > 0.9 per segment (0.29-0.69 unaligned); inputs and scene otherwise unchanged."""
    import slicer
    logic = module.MultiscaleRegistrationLogic()
    arrays = [slicer_array(v).copy() for v in [case["moving"]] + targets["nodes"]]
    before = node_ids(scene)
    seen = []
    nodes = logic.propagate_segmentation(case["moving"], case["moving_seg"], targets["nodes"] + [None],
                                         progress=lambda f, m: seen.append((f, m)))
    assert [n.GetName() for n in nodes] == ["Phantom moving segments on Phantom fixed",
                                            "Phantom moving segments on Target B"]
    assert node_ids(scene) - before == {n.GetID() for n in nodes} | {n.GetDisplayNode().GetID() for n in nodes}
    atlas = case["moving_seg"].GetSegmentation()
    for node, target, labels in zip(nodes, targets["nodes"], targets["labels"]):
        got = node.GetSegmentation()
        assert [got.GetNthSegmentID(i) for i in range(2)] == [atlas.GetNthSegmentID(i) for i in range(2)]
        assert [got.GetNthSegment(i).GetName() for i in range(2)] == ["Body", "Core"]
        np.testing.assert_allclose(got.GetNthSegment(1).GetColor(), (0.2, 0.6, 0.9), atol=1e-6)
        scores = dice_of(node, target, labels)
        assert scores[1] > 0.9 and scores[2] > 0.9, (target.GetName(), scores)
    for volume, array in zip([case["moving"]] + targets["nodes"], arrays):
        np.testing.assert_array_equal(slicer_array(volume), array)
        assert volume.GetParentTransformNode() is None
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("target 1/2" in m for _, m in seen) and any("target 2/2" in m for _, m in seen)
    records = logic.last_propagation
    assert [r.target_volume for r in records] == targets["nodes"] and all(r.seconds > 0 for r in records)
    assert all(r.result.report["options"]["model"] == "multiscale_brain" for r in records)
    assert all(r.folding_percent == 0.0 for r in records)
    from MMRegCommonLib import panel
    text = panel.format_propagation(records)
    assert "Propagated</b> to 2 volume(s)" in text and "Phantom moving segments on Target B" in text
    # Again: new nodes with unique names, the first ones kept.
    again = logic.propagate_segmentation(case["moving"], case["moving_seg"], targets["nodes"][1:], affine=True)
    assert [n.GetName() for n in again] == ["Phantom moving segments on Target B_1"]
    assert nodes[1].GetScene() is scene


@needs_multiscale
def test_propagation_from_the_parameter_node(module, models, scene, case, targets):
    logic = module.MultiscaleRegistrationLogic()
    p = logic.getParameterNode()
    p.movingVolume, p.movingSegmentation = case["moving"], case["moving_seg"]
    p.targetVolumes = targets["nodes"][1:]
    p.model, p.refinementSteps, p.refineSimilarity = "multiscale_brain_2scales", 2, "mse"
    nodes = logic.propagate_with_parameters(p)
    options = logic.last_propagation[0].result.report["options"]
    assert (options["model"], options["refinement_steps"], options["refine_similarity"]) == (
        "multiscale_brain_2scales", 2, "mse")
    assert [n.GetName() for n in nodes] == ["Phantom moving segments on Target B"]
    assert nodes[0].GetSegmentation().GetNumberOfSegments() == 2
    # Two refinement steps keep the affine's alignment (before the refinement's warm-up, Adam's first two
    # steps moved every voxel by about a voxel and took this phantom from 0.97 to about 0.8).
    scores = dice_of(nodes[0], targets["nodes"][1], targets["labels"][1])
    assert scores[1] > 0.9 and scores[2] > 0.9, scores


@needs_multiscale
def test_propagation_cancel_and_failure_leave_the_scene_unchanged(module, models, scene, case, targets, monkeypatch):
    logic = module.MultiscaleRegistrationLogic()
    before = node_ids(scene)
    with pytest.raises(mmreg.CancelledError):  # the second target: the first one's result is dropped too
        logic.propagate_segmentation(case["moving"], case["moving_seg"], targets["nodes"], affine=False,
                                     progress=lambda f, m: "target 2/2" not in m)
    assert node_ids(scene) == before and not logic.is_running
    from mmreg_slicer import bridge
    made = []
    original = bridge.segmentation_node_from_labelmap_image

    def fail_on_second(*args, **kwargs):
        if made:
            raise RuntimeError("disk full")
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(bridge, "segmentation_node_from_labelmap_image", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        logic.propagate_segmentation(case["moving"], case["moving_seg"], targets["nodes"], affine=False)
    assert node_ids(scene) == before and made and made[0].GetScene() is None


def test_propagation_problems_and_button_state(scene, case):
    from MMRegCommonLib import panel
    status = status_with([{"name": "multiscale_brain"}])
    atlas, seg, target = case["moving"], case["moving_seg"], case["fixed"]
    assert panel.propagation_state(status, atlas, seg, [target, None]) == (
        True, "Ready: propagates the 2 segment(s) of 'Phantom moving segments' to 1 volume, one new segmentation each.")
    assert panel.propagation_state(status, atlas, seg, [target], running=True)[0] is False
    assert panel.propagation_state(status_with(available=False), atlas, seg, [target]) == (
        False, "Method 'multiscale' has no model.")
    assert panel.propagation_problem(atlas, seg, []).startswith("Check one or more target volumes")
    assert "is also checked as a target" in panel.propagation_problem(atlas, seg, [target, atlas])
    assert "listed twice" in panel.propagation_problem(atlas, seg, [target, target])
    assert "Select the moving segmentation" in panel.propagation_problem(atlas, None, [target])
    assert "must be a segmentation node" in panel.propagation_problem(atlas, target, [target])
    assert "must be a scalar (image) volume" in panel.propagation_problem(seg, seg, [target])


# ---------------------------------------------------------------------------- the parameter node
def test_target_volumes_are_stored_as_slicer_stores_node_lists(module, scene, case):
    """``targetVolumes_len`` and one node reference per entry (Slicer's ListSerializer); a shorter list drops the
    references it no longer has; a removed node reads as None and is ignored by the propagation checks."""
    from MMRegCommonLib import panel
    logic = module.MultiscaleRegistrationLogic()
    p = logic.getParameterNode()
    node = p.parameterNode
    p.targetVolumes = [case["fixed"], case["moving"]]
    assert node.GetParameter("targetVolumes_len") == "2"
    assert [node.GetNodeReferenceID(f"targetVolumes_{i}") for i in range(2)] == [case["fixed"].GetID(),
                                                                                case["moving"].GetID()]
    p.targetVolumes = [case["moving"]]
    assert node.GetParameter("targetVolumes_len") == "1" and node.GetNodeReferenceID("targetVolumes_1") is None
    assert not node.HasParameter("targetVolumes_1")
    with pytest.raises(ValueError, match="vtkMRMLScalarVolumeNode"):
        p.targetVolumes = [case["moving_seg"]]
    extra = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Gone soon")
    p.targetVolumes = [case["fixed"], extra]
    scene.RemoveNode(extra)
    assert p.targetVolumes == [case["fixed"], None]
    assert panel.propagation_problem(case["moving"], case["moving_seg"], p.targetVolumes) is None


# ---------------------------------------------------------------------------- the panel's logic (no Qt needed)
class FakeCheckableCombo:
    """A stand-in for qMRMLCheckableNodeComboBox (no Qt headless): the nodes it lists, their check states, its
    property and signal; enough for the framework's NodeListCombos."""

    def __init__(self, nodes, binding):
        self.nodes, self.checked, self.binding, self.slots, self.blocked = list(nodes), set(), binding, [], False

    def property(self, name):
        return self.binding if name == "MMRegNodeListParameterName" else None

    def connect(self, signal, slot):
        assert signal == "checkedNodesChanged()"
        self.slots.append(slot)

    def blockSignals(self, block):
        previous, self.blocked = self.blocked, block
        return previous

    def nodeCount(self):
        return len(self.nodes)

    def nodeFromIndex(self, index):
        return self.nodes[index]

    def checkState(self, node):
        return 2 if node.GetID() in self.checked else 0

    def setCheckState(self, node, state):
        (self.checked.add if state == 2 else self.checked.discard)(node.GetID())
        if not self.blocked:
            for slot in self.slots:
                slot()

    def checkedNodes(self):
        return [n for n in self.nodes if n.GetID() in self.checked]


def test_checkable_selector_and_parameter_node_stay_in_step(module, scene, case, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "qt", SimpleNamespace(Qt=SimpleNamespace(Checked=2, Unchecked=0)))
    from MMRegCommonLib.combos import NodeListCombos
    p = module.MultiscaleRegistrationLogic().getParameterNode()
    combo = FakeCheckableCombo([case["fixed"], case["moving"]], "targetVolumes")
    changed = []
    lists = NodeListCombos([combo, SimpleNamespace()], on_change=changed.append)
    assert "targetVolumes" in lists
    p.targetVolumes = [case["moving"]]
    lists.set_parameter_node(p)  # the parameter's list is shown
    assert combo.checked == {case["moving"].GetID()} and changed == []
    combo.setCheckState(case["fixed"], 2)  # the user checks one more: the parameter follows, in the list's order
    assert p.targetVolumes == [case["fixed"], case["moving"]] and changed == ["targetVolumes"]
    p.targetVolumes = []
    lists.update()
    assert combo.checked == set() and p.targetVolumes == []


@needs_multiscale
def test_widget_logic_for_model_refinement_and_propagation(module, models, scene, case):
    """The shared Widget's decisions for this panel, on stand-in widgets: the default model written into the node,
    the refinement similarity enabled with refinement steps only, and the propagation button's state and reason."""
    from MMRegCommonLib.widget import RegistrationWidget
    logic = module.MultiscaleRegistrationLogic()
    params = logic.getParameterNode()
    controls = {name: [SimpleNamespace(enabled=True, toolTip="")] for name in module.METHOD_OPTIONS.parameters}
    text = lambda: SimpleNamespace(text="")  # noqa: E731
    ui = SimpleNamespace(methodOptionsInfoLabel=text(), applyButton=SimpleNamespace(), statusLabel=text(),
                         propagateButton=SimpleNamespace(), propagationStatusLabel=text())
    widget = SimpleNamespace(logic=logic, _parameterNode=params, _controls=controls, ui=ui,
                             _status=logic.method_status())
    widget._controlWidgets = lambda: RegistrationWidget._controlWidgets(widget)
    widget._controlTooltips = {id(w): "From the .ui file." for ws in controls.values() for w in ws}
    RegistrationWidget._updateMethodControls(widget)
    assert params.model == "multiscale_brain"
    RegistrationWidget._updateMethodControls(widget)
    assert params.refinementSteps == 20 and controls["refineSimilarity"][0].enabled is True  # the panel's default
    params.refinementSteps = 0
    RegistrationWidget._updateMethodControls(widget)
    assert controls["refineSimilarity"][0].enabled is False
    assert ui.methodOptionsInfoLabel.text.startswith("'multiscale_brain': FMIRNet with 3 scales")
    params.refinementSteps = 5
    RegistrationWidget._updateMethodControls(widget)
    assert controls["refineSimilarity"][0].enabled is True and controls["refineSimilarity"][0].toolTip == (
        "From the .ui file.")

    RegistrationWidget._updateApplyState(widget)
    assert ui.propagateButton.enabled is False and ui.propagationStatusLabel.text.startswith("Select the moving volume")
    params.movingVolume, params.movingSegmentation, params.targetVolumes = (case["moving"], case["moving_seg"],
                                                                             [case["fixed"]])
    RegistrationWidget._updateApplyState(widget)
    assert ui.propagateButton.enabled is True and ui.propagateButton.toolTip.startswith("Ready: propagates the 2")
    params.refineSimilarity = "ncc"  # a stale value: neither action runs, and both say why
    RegistrationWidget._updateApplyState(widget)
    assert ui.propagateButton.enabled is False and ui.propagationStatusLabel.text.startswith("Unknown refinement")
    params.refineSimilarity = "lncc"
    logic.is_running = True
    RegistrationWidget._updateApplyState(widget)
    assert ui.propagateButton.enabled is False and "Cancel stops it" in ui.propagationStatusLabel.text
